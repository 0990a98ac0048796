//! The sandbox's fake of Google's OAuth token endpoint (`POST /token`,
//! `application/x-www-form-urlencoded`), with Google's status codes and error JSON:
//! `invalid_grant` "Token has been expired or revoked.", `invalid_client` "Unauthorized" /
//! "The OAuth client was not found.", `invalid_request`, `unsupported_grant_type`, and
//! injected outages. Client credentials are accepted as HTTP Basic (the `oauth2` crate's
//! default, URL-encoded then base64) or as `client_id` / `client_secret` form fields.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::{lock, new_refresh_token, random_string, Shared, GMAIL_SCOPE};

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let cancel = shared.cancel.clone();
    let app = Router::new()
        .route("/token", post(token))
        .route("/auth", axum::routing::get(super::authorize::auth))
        .route("/devicecode", post(super::device::devicecode))
        .merge(super::authorize::microsoft_routes())
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "sandbox: token endpoint stopped");
    }
}

/// A JSON reply the way Google formats it (pretty, two-space indent, no-store).
pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let text = serde_json::to_string_pretty(&body).unwrap_or_default();
    let mut resp = (status, text).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, max-age=0, must-revalidate"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

pub(super) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({ "error": error, "error_description": description }),
    )
}

/// What an injected failure looks like: Google's front end answers 5xx with an HTML page.
fn injected_failure(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    if status.is_server_error() {
        let reason = status.canonical_reason().unwrap_or("Error");
        let code = status.as_u16();
        let html = format!(
            "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  \
             <title>Error {code} ({reason})!!1</title>\n  \
             <p><b>{code}.</b> <ins>That’s an error.</ins>\n  \
             <p>The server encountered a temporary error and could not complete your request.\
             <p>Please try again in 30 seconds.  <ins>That’s all we know.</ins>\n"
        );
        let mut resp = (status, html).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=UTF-8"),
        );
        resp
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        oauth_error(status, "rate_limit_exceeded", "Rate Limit Exceeded")
    } else if status == StatusCode::UNAUTHORIZED {
        oauth_error(status, "invalid_client", "Unauthorized")
    } else {
        oauth_error(status, "internal_failure", "Backend Error")
    }
}

pub(super) async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &shared.token_stats;
    stats.refresh_requests.fetch_add(1, Ordering::Relaxed);

    {
        let mut t = lock(&shared.tokens);
        if t.fail_next > 0 {
            t.fail_next -= 1;
            let status = t.fail_status;
            drop(t);
            stats.failures_injected.fetch_add(1, Ordering::Relaxed);
            return injected_failure(status);
        }
    }

    let form = parse_form(&body);

    // `service.rs`: grants without a user's refresh token, with their own client checks.
    match form.get("grant_type").map(String::as_str) {
        Some(super::service::JWT_BEARER_GRANT) => {
            return super::service::jwt_bearer_grant(&shared, &form)
        }
        Some("client_credentials") => {
            let basic = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_basic);
            return super::service::client_credentials_grant(&shared, &form, basic);
        }
        _ => {}
    }

    // Client authentication: HTTP Basic or form fields (not conflicting ones).
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let (client_id, client_secret) = match (&basic, form.get("client_id")) {
        (Some((id, secret)), form_id) => {
            if form_id.is_some_and(|f| f != id) {
                stats.invalid_client.fetch_add(1, Ordering::Relaxed);
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Unauthorized");
            }
            (Some(id.clone()), Some(secret.clone()))
        }
        (None, form_id) => (form_id.cloned(), form.get("client_secret").cloned()),
    };
    let Some(client_id) = client_id.filter(|id| !id.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Could not determine client ID from request.",
        );
    };
    if client_id != shared.client_id {
        stats.invalid_client.fetch_add(1, Ordering::Relaxed);
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "The OAuth client was not found.",
        );
    }
    let public_client = client_secret.is_none() && lock(&shared.device).allow_public_client;
    if !public_client && client_secret.as_deref() != Some(shared.client_secret.as_str()) {
        stats.invalid_client.fetch_add(1, Ordering::Relaxed);
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Unauthorized");
    }

    match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {
            let Some(refresh) = form.get("refresh_token").filter(|r| !r.is_empty()) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Missing required parameter: refresh_token",
                );
            };
            refresh_grant(&shared, refresh)
        }
        // `authorize.rs`: the authorization code + PKCE exchange.
        Some("authorization_code") => super::authorize::code_grant(&shared, &form),
        // `device.rs`: the device authorization grant (RFC 8628).
        Some(super::device::DEVICE_GRANT_TYPE) => super::device::device_grant(&shared, &form),
        other => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("Invalid grant_type: {}", other.unwrap_or("")),
        ),
    }
}

fn refresh_grant(shared: &Shared, refresh: &str) -> Response {
    let stats = &shared.token_stats;
    let mut t = lock(&shared.tokens);
    let Some(pos) = t.refresh.iter().position(|r| r == refresh) else {
        drop(t);
        stats.invalid_grant.fetch_add(1, Ordering::Relaxed);
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Token has been expired or revoked.",
        );
    };

    let (access, lifetime) = mint_access_token(&mut t, "ya29.sandbox-");

    let mut body = json!({
        "access_token": access,
        "expires_in": lifetime.as_secs(),
        "scope": GMAIL_SCOPE,
        "token_type": "Bearer",
    });
    if t.rotate {
        let new = new_refresh_token();
        t.refresh.remove(pos);
        t.refresh.push(new.clone());
        t.newest_refresh = new.clone();
        body["refresh_token"] = json!(new);
    }
    drop(t);
    stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, body)
}

/// A new access token valid for the configured lifetime (expired ones are forgotten).
pub(super) fn mint_access_token(
    t: &mut super::TokenState,
    prefix: &str,
) -> (String, std::time::Duration) {
    let now = Instant::now();
    t.access.retain(|_, expiry| *expiry > now);
    let access = format!("{prefix}{}", random_string(64));
    let lifetime = t.lifetime;
    t.access.insert(access.clone(), now + lifetime);
    (access, lifetime)
}

/// `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 2.3.1).
pub(super) fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((percent_decode(id), percent_decode(secret)))
}

/// Parses an `application/x-www-form-urlencoded` body (first occurrence of a name wins).
pub(super) fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let pair = String::from_utf8_lossy(pair);
        let (k, v) = pair.split_once('=').unwrap_or((&pair, ""));
        map.entry(percent_decode(k))
            .or_insert_with(|| percent_decode(v));
    }
    map
}

pub(super) fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
