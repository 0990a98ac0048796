//! The sandbox's identity provider: a fake of Google's authorization endpoint
//! (`GET /auth`, as `https://accounts.google.com/o/oauth2/auth`) and of the
//! `grant_type=authorization_code` exchange at the token endpoint, so that
//! `smtp-oauth-relay authorize` is tested end to end over loopback. The same server also
//! plays Microsoft's v2.0 endpoints, by path as Microsoft serves them:
//! `GET /{tenant}/oauth2/v2.0/authorize` and `POST /{tenant}/oauth2/v2.0/token` (see
//! [`Sandbox::microsoft_url`]).
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
//!
//! As Microsoft (checked against Microsoft's own pages: "Microsoft identity platform and
//! OAuth 2.0 authorization code flow", learn.microsoft.com/entra/identity-platform/
//! v2-oauth2-auth-code-flow; "Microsoft Entra authentication and authorization error
//! codes", learn.microsoft.com/entra/identity-platform/reference-error-codes; "Redirect
//! URI (reply URL) restrictions", learn.microsoft.com/entra/identity-platform/reply-url):
//! - the scopes are Microsoft's (`https://outlook.office.com/SMTP.Send`, `offline_access`,
//!   `openid`, `profile`, `email`); Google's are `invalid_scope` (AADSTS70011);
//! - a refresh token comes back only when `offline_access` was asked for, whatever
//!   `prompt` says; Google-only parameters (`access_type`) are ignored, `prompt=consent`
//!   and `login_hint` are accepted;
//! - a bad client or redirect URI (AADSTS700016, AADSTS50011) is an error page; other
//!   errors go back to the redirect URI as `error` + `error_description`, as in RFC 6749
//!   4.1.2.1; the success redirect carries `code`, `state` and `session_state`, no `scope`;
//! - token endpoint errors have Microsoft's shape: `error`, an `error_description` that
//!   starts with the AADSTS code and ends with Trace ID, Correlation ID and Timestamp
//!   lines, `error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`. Codes
//!   used: AADSTS501481 (wrong `code_verifier`), AADSTS54005 (code already redeemed),
//!   AADSTS70008 (code expired), AADSTS70000 (unknown code), AADSTS500112 (redirect URI
//!   differs from the authorization request's), AADSTS900144 (missing parameter), and for
//!   what `token.rs` answers: AADSTS7000215 / AADSTS700016 (client), AADSTS70003 (grant
//!   type), AADSTS50173 (revoked refresh token);
//! - every refresh returns a new refresh token (the old one stays usable, as Microsoft's
//!   do; with [`super::SandboxOptions::rotate_refresh_tokens`] the old one dies at once).
//!
//! Stricter than Microsoft here too: PKCE with S256 is required.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use tokio::time::Instant;

use super::token::{json_response, oauth_error, parse_basic, parse_form};
use super::{lock, new_refresh_token, random_string, Sandbox, SandboxControl, Shared, GMAIL_SCOPE};

/// How long an authorization code can be exchanged.
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);

/// Scopes the fake grants (Gmail's, and the sign-in ones Google allows alongside).
const KNOWN_SCOPES: [&str; 4] = [GMAIL_SCOPE, "openid", "email", "profile"];

/// Microsoft 365's SMTP AUTH scope, the resource scope the Microsoft flavour grants.
pub const MICROSOFT_SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// The scope that makes Microsoft return a refresh token.
const MICROSOFT_OFFLINE_SCOPE: &str = "offline_access";
/// Scopes the Microsoft flavour grants: SMTP.Send and the OpenID Connect ones.
const MICROSOFT_SCOPES: [&str; 5] = [
    MICROSOFT_SMTP_SCOPE,
    MICROSOFT_OFFLINE_SCOPE,
    "openid",
    "profile",
    "email",
];

/// Which identity provider a request is played as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flavour {
    Google,
    /// Microsoft's v2.0 endpoint for this tenant (as in the URL path).
    Microsoft {
        tenant: String,
    },
}

/// State of the fake authorization server, in [`Shared`].
#[derive(Default)]
pub(crate) struct AuthzState {
    codes: HashMap<String, IssuedCode>,
    redeemed: HashSet<String>,
    /// Redeemed codes issued as Microsoft (their reuse gets AADSTS54005).
    redeemed_microsoft: HashSet<String>,
    registered_redirects: Vec<String>,
    deny_next: u32,
    last_request: Option<HashMap<String, String>>,
}

struct IssuedCode {
    flavour: Flavour,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    /// The `scope` of the token response.
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

impl Sandbox {
    /// The sandbox's stand-in for `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/
    /// {endpoint}`: `http://127.0.0.1:PORT/{tenant}/oauth2/v2.0/{endpoint}`, where
    /// `endpoint` is `authorize` or `token`. There the identity provider plays
    /// Microsoft (see `authorize.rs`); any tenant is accepted.
    pub fn microsoft_url(&self, tenant: &str, endpoint: &str) -> String {
        let base = self.token_url.trim_end_matches("/token");
        format!("{base}/{tenant}/oauth2/v2.0/{endpoint}")
    }
}

/// The Microsoft v2.0 endpoints, merged into the token server's router.
pub(crate) fn microsoft_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/authorize", get(microsoft_auth))
        .route("/{tenant}/oauth2/v2.0/token", post(microsoft_token))
}

/// A Google-style error page: the browser shows it, nothing is redirected.
fn error_page(error: &str, detail: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html><head><title>Error 400: {error}</title></head><body>\
         <h1>Access blocked: Authorization Error</h1><p>{detail}</p>\
         <p>Error 400: {error}</p></body></html>\n"
    );
    html_page(StatusCode::BAD_REQUEST, html)
}

fn html_page(status: StatusCode, html: String) -> Response {
    let mut resp = (status, html).into_response();
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

/// Why `/auth` refused a request. The first group is shown on the provider's own page
/// (the redirect URI cannot be trusted yet); Microsoft redirects the others back.
enum AuthError {
    MissingClient,
    UnknownClient(String),
    MissingRedirect,
    BadRedirect(String),
    RedirectMismatch(String),
    MissingResponseType,
    BadResponseType(String),
    MissingScope,
    InvalidScope(String),
    MissingChallenge,
    BadChallengeMethod,
    BadChallenge,
}

impl AuthError {
    /// Whether the error is shown on the provider's page rather than redirected.
    fn on_provider_page(&self) -> bool {
        matches!(
            self,
            AuthError::MissingClient
                | AuthError::UnknownClient(_)
                | AuthError::MissingRedirect
                | AuthError::BadRedirect(_)
                | AuthError::RedirectMismatch(_)
        )
    }

    /// Google's page for it (Google shows every `/auth` error on its own page).
    fn google_page(&self) -> Response {
        match self {
            AuthError::MissingClient => {
                error_page("invalid_request", "Missing required parameter: client_id")
            }
            AuthError::UnknownClient(_) => {
                error_page("invalid_client", "The OAuth client was not found.")
            }
            AuthError::MissingRedirect => error_page(
                "invalid_request",
                "Missing required parameter: redirect_uri",
            ),
            AuthError::BadRedirect(_) => error_page(
                "invalid_request",
                "Invalid parameter value for redirect_uri",
            ),
            AuthError::RedirectMismatch(_) => error_page(
                "redirect_uri_mismatch",
                "You can't sign in to this app because it doesn't comply with Google's OAuth 2.0 policy. \
                 If you're the app developer, register the redirect URI in the Google Cloud Console.",
            ),
            AuthError::MissingResponseType => error_page(
                "invalid_request",
                "Required parameter is missing: response_type",
            ),
            AuthError::BadResponseType(_) => {
                error_page("unsupported_response_type", "Invalid response_type")
            }
            AuthError::MissingScope => {
                error_page("invalid_request", "Missing required parameter: scope")
            }
            AuthError::InvalidScope(_) => {
                error_page("invalid_scope", "Some requested scopes were invalid.")
            }
            AuthError::MissingChallenge => error_page(
                "invalid_request",
                "Missing required parameter: code_challenge (this sandbox requires PKCE)",
            ),
            AuthError::BadChallengeMethod => error_page(
                "invalid_request",
                "code_challenge_method must be S256 (this sandbox refuses \"plain\")",
            ),
            AuthError::BadChallenge => error_page("invalid_request", "Invalid code_challenge."),
        }
    }

    /// Microsoft's `error`, AADSTS code and text for it.
    fn microsoft(&self, client_id: &str, tenant: &str) -> (&'static str, u32, String) {
        let missing =
            |p: &str| format!("The request body must contain the following parameter: '{p}'.");
        match self {
            AuthError::MissingClient => ("invalid_request", 900144, missing("client_id")),
            AuthError::UnknownClient(id) => (
                "unauthorized_client",
                700016,
                format!(
                    "Application with identifier '{id}' was not found in the directory '{tenant}'. \
                     This can happen if the application has not been installed by the administrator \
                     of the tenant or consented to by any user in the tenant. You may have sent your \
                     authentication request to the wrong tenant."
                ),
            ),
            AuthError::MissingRedirect => ("invalid_request", 900144, missing("redirect_uri")),
            AuthError::BadRedirect(uri) | AuthError::RedirectMismatch(uri) => (
                "invalid_request",
                50011,
                format!(
                    "The redirect URI '{uri}' specified in the request does not match the redirect \
                     URIs configured for the application '{client_id}'. Make sure the redirect URI \
                     sent in the request matches one added to your application in the Azure portal. \
                     Navigate to https://aka.ms/redirectUriMismatchError to learn more about how to \
                     fix this."
                ),
            ),
            AuthError::MissingResponseType => {
                ("invalid_request", 900144, missing("response_type"))
            }
            AuthError::BadResponseType(t) => (
                "unsupported_response_type",
                700051,
                format!("response_type '{t}' is not enabled for the application."),
            ),
            AuthError::MissingScope => ("invalid_request", 900144, missing("scope")),
            AuthError::InvalidScope(s) => (
                "invalid_scope",
                70011,
                format!(
                    "The provided value for the input parameter 'scope' is not valid. The scope '{s}' is not valid."
                ),
            ),
            AuthError::MissingChallenge => (
                "invalid_request",
                900144,
                format!("{} (this sandbox requires PKCE)", missing("code_challenge")),
            ),
            AuthError::BadChallengeMethod => (
                "invalid_request",
                90100,
                "code_challenge_method parameter is empty or not valid (this sandbox accepts only S256)."
                    .to_owned(),
            ),
            AuthError::BadChallenge => (
                "invalid_request",
                90100,
                "code_challenge parameter is empty or not valid.".to_owned(),
            ),
        }
    }
}

/// The Trace ID / Correlation ID / Timestamp that Microsoft attaches to every error.
struct MicrosoftTrace {
    trace_id: String,
    correlation_id: String,
    timestamp: String,
}

impl MicrosoftTrace {
    fn new() -> Self {
        MicrosoftTrace {
            trace_id: guid(),
            correlation_id: guid(),
            timestamp: chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string(),
        }
    }

    /// `AADSTS{code}: {text}` and the three trailer lines, CRLF-separated as Microsoft does.
    fn description(&self, code: u32, text: &str) -> String {
        format!(
            "AADSTS{code}: {text}\r\nTrace ID: {}\r\nCorrelation ID: {}\r\nTimestamp: {}",
            self.trace_id, self.correlation_id, self.timestamp
        )
    }
}

/// A random GUID-shaped id (`8-4-4-4-12` lowercase hex), like Microsoft's trace ids.
fn guid() -> String {
    let hex: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16usize)]))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Microsoft's page for an error it cannot redirect (bad client or redirect URI).
fn microsoft_error_page(code: u32, text: &str, trace: &MicrosoftTrace) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html><head><title>Sign in to your account</title></head><body>\
         <div id=\"login_workload_logo_text\">Sorry, but we're having trouble signing you in.</div>\
         <div>AADSTS{code}: {}</div>\
         <div>Request Id: {}</div><div>Correlation Id: {}</div><div>Timestamp: {}</div>\
         </body></html>\n",
        html_escape(text),
        trace.trace_id,
        trace.correlation_id,
        trace.timestamp
    );
    html_page(StatusCode::BAD_REQUEST, html)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A Microsoft token endpoint error: the JSON shape of the error codes reference page.
pub(super) fn microsoft_error(
    status: StatusCode,
    error: &str,
    code: Option<u32>,
    text: &str,
) -> Response {
    let trace = MicrosoftTrace::new();
    let (description, codes) = match code {
        Some(c) => (trace.description(c, text), vec![c]),
        None => (text.to_owned(), Vec::new()),
    };
    let mut body = json!({
        "error": error,
        "error_description": description,
        "error_codes": codes,
        "timestamp": trace.timestamp,
        "trace_id": trace.trace_id,
        "correlation_id": trace.correlation_id,
    });
    if let Some(c) = code {
        body["error_uri"] = json!(format!("https://login.microsoftonline.com/error?code={c}"));
    }
    json_response(status, body)
}

/// `GET /auth?response_type=code&client_id&redirect_uri&scope&state&code_challenge&…`
pub(crate) async fn auth(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    authorization(&shared, Flavour::Google, query)
}

/// `GET /{tenant}/oauth2/v2.0/authorize?…`: the same, played as Microsoft.
async fn microsoft_auth(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    authorization(&shared, Flavour::Microsoft { tenant }, query)
}

/// What a valid authorization request asked for.
struct Checked {
    client_id: String,
    redirect_uri: String,
    back: oauth2::url::Url,
    scope: String,
    challenge: String,
}

fn check_authorization(
    shared: &Shared,
    authz: &AuthzState,
    flavour: &Flavour,
    params: &HashMap<String, String>,
) -> Result<Checked, (AuthError, Option<oauth2::url::Url>)> {
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let Some(client_id) = get("client_id") else {
        return Err((AuthError::MissingClient, None));
    };
    if client_id != shared.client_id {
        return Err((AuthError::UnknownClient(client_id.to_owned()), None));
    }
    let Some(redirect_uri) = get("redirect_uri") else {
        return Err((AuthError::MissingRedirect, None));
    };
    let Ok(parsed) = oauth2::url::Url::parse(redirect_uri) else {
        return Err((AuthError::BadRedirect(redirect_uri.to_owned()), None));
    };
    let registered = authz.registered_redirects.iter().any(|r| r == redirect_uri);
    if !(registered || is_loopback_http(&parsed)) || parsed.fragment().is_some() {
        return Err((AuthError::RedirectMismatch(redirect_uri.to_owned()), None));
    }
    // From here on the redirect URI is trusted: Microsoft sends errors back to it.
    let fail = |e: AuthError| Err((e, Some(parsed.clone())));
    match get("response_type") {
        Some("code") => {}
        None => return fail(AuthError::MissingResponseType),
        Some(other) => return fail(AuthError::BadResponseType(other.to_owned())),
    }
    let Some(scope) = get("scope") else {
        return fail(AuthError::MissingScope);
    };
    let known: &[&str] = match flavour {
        Flavour::Google => &KNOWN_SCOPES,
        Flavour::Microsoft { .. } => &MICROSOFT_SCOPES,
    };
    if let Some(bad) = scope
        .split(' ')
        .find(|s| !s.is_empty() && !known.contains(s))
    {
        return fail(AuthError::InvalidScope(bad.to_owned()));
    }
    let Some(challenge) = get("code_challenge") else {
        return fail(AuthError::MissingChallenge);
    };
    if get("code_challenge_method") != Some("S256") {
        return fail(AuthError::BadChallengeMethod);
    }
    if challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return fail(AuthError::BadChallenge);
    }
    Ok(Checked {
        client_id: client_id.to_owned(),
        redirect_uri: redirect_uri.to_owned(),
        back: parsed,
        scope: scope.to_owned(),
        challenge: challenge.to_owned(),
    })
}

fn authorization(shared: &Shared, flavour: Flavour, query: Option<String>) -> Response {
    let params: HashMap<String, String> =
        oauth2::url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let mut authz = lock(&shared.authz);
    authz.last_request = Some(params.clone());
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());

    let checked = match check_authorization(shared, &authz, &flavour, &params) {
        Ok(c) => c,
        Err((e, back)) => {
            let Flavour::Microsoft { tenant } = &flavour else {
                return e.google_page();
            };
            let (error, code, text) = e.microsoft(get("client_id").unwrap_or(""), tenant);
            let trace = MicrosoftTrace::new();
            return match back {
                Some(mut back) if !e.on_provider_page() => {
                    let mut q = back.query_pairs_mut();
                    q.append_pair("error", error)
                        .append_pair("error_description", &trace.description(code, &text))
                        .append_pair(
                            "error_uri",
                            &format!("https://login.microsoftonline.com/error?code={code}"),
                        );
                    if let Some(state) = get("state") {
                        q.append_pair("state", state);
                    }
                    drop(q);
                    redirect(back.as_str())
                }
                _ => microsoft_error_page(code, &text, &trace),
            };
        }
    };

    let mut back = checked.back.clone();
    if authz.deny_next > 0 {
        authz.deny_next -= 1;
        let mut q = back.query_pairs_mut();
        if let Some(state) = get("state") {
            q.append_pair("state", state);
        }
        q.append_pair("error", "access_denied");
        if matches!(flavour, Flavour::Microsoft { .. }) {
            q.append_pair(
                "error_description",
                &MicrosoftTrace::new()
                    .description(65004, "User declined to consent to access the app."),
            );
        }
        drop(q);
        return redirect(back.as_str());
    }
    let (code, offline_consent, granted) = match &flavour {
        Flavour::Google => (
            format!("4/0sandbox-{}", random_string(48)),
            get("access_type") == Some("offline")
                && get("prompt").is_some_and(|p| p.split(' ').any(|p| p == "consent")),
            checked.scope.clone(),
        ),
        // Microsoft: `offline_access` alone decides; the token response lists the
        // resource scopes granted, not `offline_access` or the OpenID Connect ones.
        Flavour::Microsoft { .. } => (
            format!("1.AQsandbox-{}", random_string(48)),
            checked
                .scope
                .split(' ')
                .any(|s| s == MICROSOFT_OFFLINE_SCOPE),
            checked
                .scope
                .split(' ')
                .filter(|s| *s == MICROSOFT_SMTP_SCOPE)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    };
    let now = Instant::now();
    authz.codes.retain(|_, c| c.expires > now);
    authz.codes.insert(
        code.clone(),
        IssuedCode {
            flavour: flavour.clone(),
            client_id: checked.client_id,
            redirect_uri: checked.redirect_uri,
            challenge: checked.challenge,
            scope: granted,
            offline_consent,
            expires: now + CODE_LIFETIME,
        },
    );
    drop(authz);
    {
        let mut q = back.query_pairs_mut();
        match flavour {
            Flavour::Google => {
                if let Some(state) = get("state") {
                    q.append_pair("state", state);
                }
                q.append_pair("code", &code)
                    .append_pair("scope", &checked.scope);
            }
            Flavour::Microsoft { .. } => {
                q.append_pair("code", &code);
                if let Some(state) = get("state") {
                    q.append_pair("state", state);
                }
                q.append_pair("session_state", &guid());
            }
        }
    }
    redirect(back.as_str())
}

/// Why the code exchange failed.
enum GrantError {
    MissingCode,
    /// Redeemed before (Google: "Bad Request"; Microsoft: AADSTS54005).
    Redeemed,
    /// Never issued.
    Unknown,
    Expired,
    ClientMismatch,
    MissingRedirect,
    RedirectMismatch {
        sent: String,
        issued: String,
    },
    MissingVerifier,
    BadVerifier,
}

impl GrantError {
    fn google(&self) -> (&'static str, &'static str) {
        match self {
            GrantError::MissingCode => ("invalid_request", "Missing required parameter: code"),
            // Google: a code used twice is "Bad Request", garbage is "Malformed auth code."
            GrantError::Redeemed | GrantError::Expired | GrantError::ClientMismatch => {
                ("invalid_grant", "Bad Request")
            }
            GrantError::Unknown => ("invalid_grant", "Malformed auth code."),
            GrantError::MissingRedirect => ("invalid_request", "Missing parameter: redirect_uri"),
            GrantError::RedirectMismatch { .. } => ("redirect_uri_mismatch", "Bad Request"),
            GrantError::MissingVerifier => ("invalid_grant", "Missing code verifier."),
            GrantError::BadVerifier => ("invalid_grant", "Invalid code verifier."),
        }
    }

    fn microsoft(&self) -> (&'static str, u32, String) {
        let missing =
            |p: &str| format!("The request body must contain the following parameter: '{p}'.");
        match self {
            GrantError::MissingCode => ("invalid_request", 900144, missing("code")),
            GrantError::Redeemed => (
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.".to_owned(),
            ),
            GrantError::Unknown | GrantError::ClientMismatch => (
                "invalid_grant",
                70000,
                "The provided value for the 'code' parameter is not valid.".to_owned(),
            ),
            GrantError::Expired => (
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".to_owned(),
            ),
            GrantError::MissingRedirect => ("invalid_request", 900144, missing("redirect_uri")),
            GrantError::RedirectMismatch { sent, issued } => (
                "invalid_grant",
                500112,
                format!("The reply address '{sent}' does not match the reply address '{issued}' provided when requesting Authorization code."),
            ),
            GrantError::MissingVerifier => ("invalid_request", 900144, missing("code_verifier")),
            GrantError::BadVerifier => (
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the authorization request.".to_owned(),
            ),
        }
    }

    fn respond(&self, shared: &Shared, flavour: &Flavour) -> Response {
        let (error, response) = match flavour {
            Flavour::Google => {
                let (error, description) = self.google();
                (
                    error,
                    oauth_error(StatusCode::BAD_REQUEST, error, description),
                )
            }
            Flavour::Microsoft { .. } => {
                let (error, code, text) = self.microsoft();
                (
                    error,
                    microsoft_error(StatusCode::BAD_REQUEST, error, Some(code), &text),
                )
            }
        };
        // As before: a client mismatch is not counted as a refused grant.
        if error == "invalid_grant" && !matches!(self, GrantError::ClientMismatch) {
            shared
                .token_stats
                .invalid_grant
                .fetch_add(1, Ordering::Relaxed);
        }
        response
    }
}

/// `grant_type=authorization_code` at `/token`; the client is already authenticated.
/// Answers in the flavour the code was issued in (Google's for codes never issued: at
/// Microsoft's endpoint, [`microsoft_token`] turns that into Microsoft's shape).
pub(crate) fn code_grant(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let Some(code) = form.get("code").filter(|c| !c.is_empty()) else {
        return GrantError::MissingCode.respond(shared, &Flavour::Google);
    };
    let issued = {
        let mut authz = lock(&shared.authz);
        match authz.codes.remove(code) {
            Some(issued) => {
                authz.redeemed.insert(code.clone());
                if let Flavour::Microsoft { .. } = issued.flavour {
                    authz.redeemed_microsoft.insert(code.clone());
                }
                issued
            }
            None if authz.redeemed_microsoft.contains(code) => {
                let flavour = Flavour::Microsoft {
                    tenant: String::new(),
                };
                return GrantError::Redeemed.respond(shared, &flavour);
            }
            None if authz.redeemed.contains(code) => {
                return GrantError::Redeemed.respond(shared, &Flavour::Google)
            }
            None => return GrantError::Unknown.respond(shared, &Flavour::Google),
        }
    };
    if let Err(e) = check_grant(shared, form, &issued) {
        return e.respond(shared, &issued.flavour);
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
    if let Flavour::Microsoft { .. } = issued.flavour {
        body["ext_expires_in"] = json!(lifetime.as_secs());
    }
    if issued.offline_consent {
        let refresh = new_refresh_token();
        t.refresh.push(refresh.clone());
        t.newest_refresh = refresh.clone();
        body["refresh_token"] = json!(refresh);
    }
    drop(t);
    shared
        .token_stats
        .tokens_issued
        .fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, body)
}

fn check_grant(
    shared: &Shared,
    form: &HashMap<String, String>,
    issued: &IssuedCode,
) -> Result<(), GrantError> {
    if Instant::now() >= issued.expires {
        return Err(GrantError::Expired);
    }
    if form
        .get("client_id")
        .is_some_and(|id| *id != issued.client_id)
        || issued.client_id != shared.client_id
    {
        return Err(GrantError::ClientMismatch);
    }
    match form.get("redirect_uri") {
        None => return Err(GrantError::MissingRedirect),
        Some(r) if *r != issued.redirect_uri => {
            return Err(GrantError::RedirectMismatch {
                sent: r.clone(),
                issued: issued.redirect_uri.clone(),
            })
        }
        Some(_) => {}
    }
    let Some(verifier) = form.get("code_verifier").filter(|v| !v.is_empty()) else {
        return Err(GrantError::MissingVerifier);
    };
    // RFC 7636 4.1; checked first, `from_code_verifier_sha256` asserts the length.
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !well_formed {
        return Err(GrantError::BadVerifier);
    }
    let computed = oauth2::PkceCodeChallenge::from_code_verifier_sha256(
        &oauth2::PkceCodeVerifier::new(verifier.clone()),
    );
    if computed.as_str() != issued.challenge {
        return Err(GrantError::BadVerifier);
    }
    Ok(())
}

/// `POST /{tenant}/oauth2/v2.0/token`: the token endpoint of `token.rs` (client
/// authentication, grants, injected failures, counters), its answers put in Microsoft's
/// shape: AADSTS errors, and a new refresh token on every refresh.
async fn microsoft_token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let client_id = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic)
        .map(|(id, _)| id)
        .or_else(|| form.get("client_id").cloned())
        .unwrap_or_default();
    let response = super::token::token(State(shared.clone()), headers, body).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        // An injected 5xx page: passed on as it is.
        return response;
    }
    let Ok(bytes) = axum::body::to_bytes(response.into_body(), 1 << 20).await else {
        return microsoft_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, "");
    };
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return microsoft_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, "");
    };
    if json.get("error_codes").is_some() {
        // Already Microsoft's (a code issued at Microsoft's authorize endpoint).
        return json_response(status, json);
    }
    if status.is_success() {
        if grant_type == "refresh_token" {
            microsoft_refresh_reply(&shared, &mut json);
        }
        return json_response(status, json);
    }
    let error = json["error"].as_str().unwrap_or("server_error").to_owned();
    let description = json["error_description"].as_str().unwrap_or("").to_owned();
    let (error, code, text) =
        microsoft_equivalent(&error, &description, &grant_type, &client_id, &tenant);
    microsoft_error(status, &error, code, &text)
}

/// A successful refresh as Microsoft answers it: its scope, `ext_expires_in`, and always a
/// new refresh token (minted here unless `token.rs` already rotated it).
fn microsoft_refresh_reply(shared: &Shared, json: &mut serde_json::Value) {
    json["scope"] = json!(MICROSOFT_SMTP_SCOPE);
    json["ext_expires_in"] = json["expires_in"].clone();
    if json.get("refresh_token").is_none() {
        let new = new_refresh_token();
        let mut t = lock(&shared.tokens);
        t.refresh.push(new.clone());
        t.newest_refresh = new.clone();
        json["refresh_token"] = json!(new);
    }
}

/// Microsoft's `error`, AADSTS code and text for an error `token.rs` answered the
/// Google way; unknown ones keep their text, without a code.
fn microsoft_equivalent(
    error: &str,
    description: &str,
    grant_type: &str,
    client_id: &str,
    tenant: &str,
) -> (String, Option<u32>, String) {
    let (code, text) = match (error, grant_type) {
        ("invalid_client", _) if description.contains("not found") => (
            Some(700016),
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'."
            ),
        ),
        ("invalid_client", _) => (
            Some(7000215),
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to the app.".to_owned(),
        ),
        ("unsupported_grant_type", _) => (
            Some(70003),
            format!("The app requested an unsupported grant type '{grant_type}'."),
        ),
        ("invalid_grant", "refresh_token") => (
            Some(50173),
            "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.".to_owned(),
        ),
        ("invalid_grant", "authorization_code") => (
            Some(70000),
            "The provided value for the 'code' parameter is not valid.".to_owned(),
        ),
        ("invalid_request", _) => {
            let param = description
                .rsplit_once(": ")
                .map(|(_, p)| p.trim_end_matches('.'))
                .filter(|p| !p.contains(' '))
                .unwrap_or(if description.contains("client ID") {
                    "client_id"
                } else {
                    "grant_type"
                });
            (
                Some(900144),
                format!("The request body must contain the following parameter: '{param}'."),
            )
        }
        _ => (None, description.to_owned()),
    };
    (error.to_owned(), code, text)
}
