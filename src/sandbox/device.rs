//! The sandbox's device authorization endpoint (RFC 8628), behaving like Microsoft's
//! `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode`, so that
//! `smtp-oauth-relay authorize --device` is tested end to end over loopback.
//!
//! `POST /devicecode` (client_id, scope) answers `device_code`, `user_code`,
//! `verification_uri`, `expires_in`, `interval` and Microsoft's `message`. Polling the
//! token endpoint with `grant_type=urn:ietf:params:oauth:grant-type:device_code` gets
//! `authorization_pending` until the test approves the user code
//! ([`SandboxControl::approve_device`]), `slow_down` when polled faster than the minimum
//! gap (or when told to, [`SandboxControl::slow_down_next_device_polls`]),
//! `access_denied` after [`SandboxControl::deny_device`] and `expired_token` once the
//! code's lifetime is over. Approved, it issues tokens as Microsoft does: the granted
//! `scope` without `offline_access`, a refresh token only when `offline_access` was
//! asked for. Device codes are single-use.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;
use tokio::time::Instant;

use super::token::{json_response, oauth_error, parse_form};
use super::{lock, new_refresh_token, random_string, SandboxControl, Shared};

/// The grant type of a device access token request.
pub const DEVICE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// State of the fake device authorization server, in [`Shared`].
pub(crate) struct DeviceState {
    grants: HashMap<String, DeviceGrant>,
    /// `interval` advertised, in seconds (Microsoft: 5).
    interval_secs: u64,
    /// Polls closer together than this get `slow_down`.
    min_gap: Duration,
    /// Lifetime of a device code (Microsoft: 900 s).
    lifetime: Duration,
    slow_down_next: u32,
    /// Public clients (no secret at all) are accepted at the token endpoint.
    pub(crate) allow_public_client: bool,
    /// What each device poll was answered, oldest first.
    outcomes: Vec<&'static str>,
}

impl Default for DeviceState {
    fn default() -> Self {
        DeviceState {
            grants: HashMap::new(),
            interval_secs: 5,
            min_gap: Duration::from_secs(5),
            lifetime: Duration::from_secs(900),
            slow_down_next: 0,
            allow_public_client: false,
            outcomes: Vec::new(),
        }
    }
}

struct DeviceGrant {
    client_id: String,
    user_code: String,
    scope: String,
    expires: Instant,
    approved: bool,
    denied: bool,
    last_poll: Option<Instant>,
}

impl SandboxControl {
    /// The user signs in and approves the request shown with `user_code`; false if no
    /// live request has that code.
    pub fn approve_device(&self, user_code: &str) -> bool {
        self.mark_device(user_code, true)
    }

    /// The user declines the request shown with `user_code`: the next poll gets
    /// `access_denied`.
    pub fn deny_device(&self, user_code: &str) -> bool {
        self.mark_device(user_code, false)
    }

    fn mark_device(&self, user_code: &str, approve: bool) -> bool {
        let mut d = lock(&self.shared.device);
        match d.grants.values_mut().find(|g| g.user_code == user_code) {
            Some(g) => {
                g.approved = approve;
                g.denied = !approve;
                true
            }
            None => false,
        }
    }

    /// The `interval` advertised (seconds, at least 1) and the gap under which a poll
    /// gets `slow_down` (default: 5 s and 5 s).
    pub fn set_device_polling(&self, interval_secs: u64, min_gap: Duration) {
        let mut d = lock(&self.shared.device);
        d.interval_secs = interval_secs.max(1);
        d.min_gap = min_gap;
    }

    /// Lifetime of device codes issued from now on (default 900 s).
    pub fn set_device_code_lifetime(&self, lifetime: Duration) {
        lock(&self.shared.device).lifetime = lifetime;
    }

    /// The next `n` device polls get `slow_down` whatever their timing.
    pub fn slow_down_next_device_polls(&self, n: u32) {
        lock(&self.shared.device).slow_down_next = n;
    }

    /// Accept token requests that carry a client ID and no secret at all (a public
    /// client, as Microsoft's "Allow public client flows"). A wrong secret is still
    /// refused. Default false.
    pub fn allow_public_client(&self, allow: bool) {
        lock(&self.shared.device).allow_public_client = allow;
    }

    /// What each device poll was answered (`authorization_pending`, `slow_down`,
    /// `access_denied`, `expired_token`, `invalid_grant`, `ok`), oldest first.
    pub fn device_poll_outcomes(&self) -> Vec<&'static str> {
        lock(&self.shared.device).outcomes.clone()
    }

    /// User codes of the device requests not yet redeemed.
    pub fn pending_user_codes(&self) -> Vec<String> {
        lock(&self.shared.device)
            .grants
            .values()
            .map(|g| g.user_code.clone())
            .collect()
    }
}

fn user_code() -> String {
    random_string(9).to_ascii_uppercase()
}

/// `POST /devicecode` with `client_id` and `scope` (form-encoded).
pub(crate) async fn devicecode(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let Some(client_id) = form.get("client_id").filter(|c| !c.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
        );
    };
    if *client_id != shared.client_id {
        shared
            .token_stats
            .invalid_client
            .fetch_add(1, Ordering::Relaxed);
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "AADSTS700016: Application with identifier was not found in the directory.",
        );
    }
    let Some(scope) = form.get("scope").filter(|s| !s.trim().is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'scope'.",
        );
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let verification_uri = format!("http://{host}/device");
    let device_code = format!("DAQABAAEAAAD-sandbox-{}", random_string(48));
    let code = user_code();
    let mut d = lock(&shared.device);
    let now = Instant::now();
    d.grants.retain(|_, g| g.expires > now);
    let (lifetime, interval) = (d.lifetime, d.interval_secs);
    d.grants.insert(
        device_code.clone(),
        DeviceGrant {
            client_id: client_id.clone(),
            user_code: code.clone(),
            scope: scope.clone(),
            expires: now + lifetime,
            approved: false,
            denied: false,
            last_poll: None,
        },
    );
    drop(d);
    json_response(
        StatusCode::OK,
        json!({
            "user_code": code,
            "device_code": device_code,
            "verification_uri": verification_uri,
            "expires_in": lifetime.as_secs(),
            "interval": interval,
            "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {code} to authenticate."),
        }),
    )
}

/// `grant_type=urn:ietf:params:oauth:grant-type:device_code` at `/token`; the client is
/// already authenticated.
pub(crate) fn device_grant(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let Some(device_code) = form.get("device_code").filter(|c| !c.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'device_code'.",
        );
    };
    let mut d = lock(&shared.device);
    let now = Instant::now();
    let slow_down_forced = d.slow_down_next > 0;
    if slow_down_forced {
        d.slow_down_next -= 1;
    }
    let min_gap = d.min_gap;
    let outcome: Result<String, (&'static str, &'static str)> =
        match d.grants.get_mut(device_code.as_str()) {
            None => Err((
                "invalid_grant",
                "AADSTS70000: Provided grant is invalid or malformed.",
            )),
            Some(g) if form.get("client_id").is_some_and(|id| *id != g.client_id) => Err((
                "invalid_grant",
                "AADSTS70000: The device code was issued to another client.",
            )),
            Some(g) if now >= g.expires => Err((
                "expired_token",
                "AADSTS70020: The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
            )),
            Some(g) => {
                let too_soon = g.last_poll.is_some_and(|t| now < t + min_gap);
                g.last_poll = Some(now);
                if slow_down_forced || too_soon {
                    Err(("slow_down", "AADSTS70000: Polling too fast; slow down."))
                } else if g.denied {
                    Err((
                        "access_denied",
                        "AADSTS70000: The user declined the authorization request.",
                    ))
                } else if !g.approved {
                    Err((
                        "authorization_pending",
                        "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                    ))
                } else {
                    Ok(g.scope.clone())
                }
            }
        };
    let scope = match outcome {
        Err((error, description)) => {
            d.outcomes.push(error);
            if matches!(error, "expired_token" | "access_denied") {
                d.grants.remove(device_code.as_str());
            }
            drop(d);
            if error == "invalid_grant" {
                shared
                    .token_stats
                    .invalid_grant
                    .fetch_add(1, Ordering::Relaxed);
            }
            return oauth_error(StatusCode::BAD_REQUEST, error, description);
        }
        Ok(scope) => scope,
    };
    d.grants.remove(device_code.as_str());
    d.outcomes.push("ok");
    drop(d);

    let offline = scope.split(' ').any(|s| s == "offline_access");
    let granted: Vec<&str> = scope
        .split(' ')
        .filter(|s| !s.is_empty() && *s != "offline_access")
        .collect();
    let mut t = lock(&shared.tokens);
    t.access.retain(|_, expiry| *expiry > now);
    let access = format!("eyJ0eXAiOiJKV1Qi.sandbox-{}", random_string(64));
    let lifetime = t.lifetime;
    t.access.insert(access.clone(), now + lifetime);
    let mut body = json!({
        "token_type": "Bearer",
        "scope": granted.join(" "),
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": access,
    });
    if offline {
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
