//! The sandbox's identity provider: a fake of Google's authorization endpoint
//! (`GET /auth`, as `https://accounts.google.com/o/oauth2/auth`) and of the
//! `grant_type=authorization_code` exchange at the token endpoint, so that
//! `smtp-oauth-relay authorize` is tested end to end over loopback.
//!
//! `/auth` checks what Google checks (known client, an allowed redirect URI — any loopback
//! `http` URI as for a "Desktop app" client, or one registered with
//! [`SandboxControl::register_redirect_uri`] — `response_type=code`, a scope) and, stricter
//! than Google, insists on PKCE with S256. The user always consents at once, unless told
//! to decline ([`SandboxControl::deny_next_authorizations`]): then the browser is sent
//! back with `error=access_denied`. Errors that Google shows on its own page (unknown
//! client, `redirect_uri_mismatch`, …) are a 400 page here too, never a redirect.
//!
//! Codes are single-use and live 10 minutes; the exchange checks the client, the
//! redirect URI (exactly the one of `/auth`) and the PKCE verifier. Like Google, a refresh
//! token comes back only for `access_type=offline` with `prompt=consent`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::time::Instant;

use super::token::{json_response, oauth_error};
use super::{lock, new_refresh_token, random_string, SandboxControl, Shared, GMAIL_SCOPE};

/// How long an authorization code can be exchanged.
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// Scopes the fake grants (Gmail's, and the sign-in ones Google allows alongside).
const KNOWN_SCOPES: [&str; 4] = [GMAIL_SCOPE, "openid", "email", "profile"];

/// State of the fake authorization server, in [`Shared`].
#[derive(Default)]
pub(crate) struct AuthzState {
    codes: HashMap<String, IssuedCode>,
    redeemed: HashSet<String>,
    registered_redirects: Vec<String>,
    deny_next: u32,
    last_request: Option<HashMap<String, String>>,
}

struct IssuedCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    offline_consent: bool,
    expires: Instant,
}

impl SandboxControl {
    /// The next `n` sign-ins end with the user declining: the browser is redirected with
    /// `error=access_denied`.
    pub fn deny_next_authorizations(&self, n: u32) {
        lock(&self.shared.authz).deny_next = n;
    }

    /// Allows `uri` as a redirect URI (a "Web application" client's registered callback).
    /// Loopback `http` URIs on any port are always allowed ("Desktop app" client).
    pub fn register_redirect_uri(&self, uri: &str) {
        lock(&self.shared.authz)
            .registered_redirects
            .push(uri.to_owned());
    }

    /// The query parameters of the last `/auth` request (whatever its outcome).
    pub fn last_authorization_request(&self) -> Option<HashMap<String, String>> {
        lock(&self.shared.authz).last_request.clone()
    }
}

/// A Google-style error page: the browser shows it, nothing is redirected.
fn error_page(error: &str, detail: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html><head><title>Error 400: {error}</title></head><body>\
         <h1>Access blocked: Authorization Error</h1><p>{detail}</p>\
         <p>Error 400: {error}</p></body></html>\n"
    );
    let mut resp = (StatusCode::BAD_REQUEST, html).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn redirect(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(location) => {
            let mut resp = StatusCode::FOUND.into_response();
            resp.headers_mut().insert(header::LOCATION, location);
            resp
        }
        Err(_) => error_page("invalid_request", "Invalid redirect_uri."),
    }
}

fn is_loopback_http(uri: &oauth2::url::Url) -> bool {
    uri.scheme() == "http"
        && match uri.host() {
            Some(oauth2::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(oauth2::url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(oauth2::url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        }
}

/// `GET /auth?response_type=code&client_id&redirect_uri&scope&state&code_challenge&…`
pub(crate) async fn auth(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let params: HashMap<String, String> =
        oauth2::url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut authz = lock(&shared.authz);
    authz.last_request = Some(params.clone());
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());

    let Some(client_id) = get("client_id") else {
        return error_page("invalid_request", "Missing required parameter: client_id");
    };
    if client_id != shared.client_id {
        return error_page("invalid_client", "The OAuth client was not found.");
    }
    let Some(redirect_uri) = get("redirect_uri") else {
        return error_page(
            "invalid_request",
            "Missing required parameter: redirect_uri",
        );
    };
    let Ok(parsed) = oauth2::url::Url::parse(redirect_uri) else {
        return error_page(
            "invalid_request",
            "Invalid parameter value for redirect_uri",
        );
    };
    let registered = authz.registered_redirects.iter().any(|r| r == redirect_uri);
    if !(registered || is_loopback_http(&parsed)) || parsed.fragment().is_some() {
        return error_page(
            "redirect_uri_mismatch",
            "You can't sign in to this app because it doesn't comply with Google's OAuth 2.0 policy. \
             If you're the app developer, register the redirect URI in the Google Cloud Console.",
        );
    }
    match get("response_type") {
        Some("code") => {}
        None => {
            return error_page(
                "invalid_request",
                "Required parameter is missing: response_type",
            )
        }
        Some(_) => return error_page("unsupported_response_type", "Invalid response_type"),
    }
    let Some(scope) = get("scope") else {
        return error_page("invalid_request", "Missing required parameter: scope");
    };
    if scope
        .split(' ')
        .any(|s| !s.is_empty() && !KNOWN_SCOPES.contains(&s))
    {
        return error_page("invalid_scope", "Some requested scopes were invalid.");
    }
    let Some(challenge) = get("code_challenge") else {
        return error_page(
            "invalid_request",
            "Missing required parameter: code_challenge (this sandbox requires PKCE)",
        );
    };
    match get("code_challenge_method") {
        Some("S256") => {}
        _ => {
            return error_page(
                "invalid_request",
                "code_challenge_method must be S256 (this sandbox refuses \"plain\")",
            )
        }
    }
    if challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return error_page("invalid_request", "Invalid code_challenge.");
    }

    let mut back = parsed.clone();
    {
        let mut q = back.query_pairs_mut();
        if let Some(state) = get("state") {
            q.append_pair("state", state);
        }
        if authz.deny_next > 0 {
            authz.deny_next -= 1;
            q.append_pair("error", "access_denied");
            drop(q);
            return redirect(back.as_str());
        }
    }
    let code = format!("4/0sandbox-{}", random_string(48));
    let offline_consent = get("access_type") == Some("offline")
        && get("prompt").is_some_and(|p| p.split(' ').any(|p| p == "consent"));
    let now = Instant::now();
    authz.codes.retain(|_, c| c.expires > now);
    authz.codes.insert(
        code.clone(),
        IssuedCode {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            challenge: challenge.to_owned(),
            scope: scope.to_owned(),
            offline_consent,
            expires: now + CODE_LIFETIME,
        },
    );
    drop(authz);
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("scope", scope);
    redirect(back.as_str())
}

/// `grant_type=authorization_code` at `/token`; the client is already authenticated.
pub(crate) fn code_grant(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let stats = &shared.token_stats;
    let invalid_grant = |description: &str| {
        stats.invalid_grant.fetch_add(1, Ordering::Relaxed);
        oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
    };
    let Some(code) = form.get("code").filter(|c| !c.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: code",
        );
    };
    let issued = {
        let mut authz = lock(&shared.authz);
        match authz.codes.remove(code) {
            Some(issued) => {
                authz.redeemed.insert(code.clone());
                issued
            }
            // Google: a code used twice is "Bad Request", garbage is "Malformed auth code."
            None if authz.redeemed.contains(code) => return invalid_grant("Bad Request"),
            None => return invalid_grant("Malformed auth code."),
        }
    };
    if Instant::now() >= issued.expires {
        return invalid_grant("Bad Request");
    }
    if form
        .get("client_id")
        .is_some_and(|id| *id != issued.client_id)
        || issued.client_id != shared.client_id
    {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad Request");
    }
    match form.get("redirect_uri") {
        None => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing parameter: redirect_uri",
            )
        }
        Some(r) if *r != issued.redirect_uri => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "redirect_uri_mismatch",
                "Bad Request",
            )
        }
        Some(_) => {}
    }
    let Some(verifier) = form.get("code_verifier").filter(|v| !v.is_empty()) else {
        return invalid_grant("Missing code verifier.");
    };
    // RFC 7636 4.1; checked first, `from_code_verifier_sha256` asserts the length.
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !well_formed {
        return invalid_grant("Invalid code verifier.");
    }
    let computed = oauth2::PkceCodeChallenge::from_code_verifier_sha256(
        &oauth2::PkceCodeVerifier::new(verifier.clone()),
    );
    if computed.as_str() != issued.challenge {
        return invalid_grant("Invalid code verifier.");
    }

    let mut t = lock(&shared.tokens);
    let now = Instant::now();
    t.access.retain(|_, expiry| *expiry > now);
    let access = format!("ya29.sandbox-{}", random_string(64));
    let lifetime = t.lifetime;
    t.access.insert(access.clone(), now + lifetime);
    let mut body = json!({
        "access_token": access,
        "expires_in": lifetime.as_secs(),
        "scope": issued.scope,
        "token_type": "Bearer",
    });
    if issued.offline_consent {
        let refresh = new_refresh_token();
        t.refresh.push(refresh.clone());
        t.newest_refresh = refresh.clone();
        body["refresh_token"] = json!(refresh);
    }
    drop(t);
    stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, body)
}
