//! The sandbox's grants that need no user sign-in: Google's JWT bearer grant for a
//! service account with domain-wide delegation (the assertion's RS256 signature is
//! verified against the key the sandbox issued, then `iss`, `aud`, `iat`/`exp`, `scope`
//! and `sub` are checked, with Google's error codes and texts), and Microsoft's
//! client-credentials grant for app-only SMTP (`/.default` scope, AADSTS errors).
//!
//! Google's texts: `invalid_grant` "Invalid JWT Signature." (unknown or deleted key),
//! "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable
//! timeframe. Check your iat and exp values in the JWT claim.", "Invalid email or User
//! ID" (unknown `sub`), and `unauthorized_client` "Client is unauthorized to retrieve
//! access tokens using this method, or client not authorized for any of the scopes
//! requested." (HTTP 401) when no domain-wide delegation covers the scope.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use super::authorize::microsoft_error;
use super::token::{json_response, mint_access_token, oauth_error};
use super::{lock, Shared, GMAIL_SCOPE};
use crate::oauth::manager::unix_now;

pub(crate) const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope of Microsoft 365 app-only SMTP.
pub(crate) const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Google's allowance for clock skew on `iat` (assertions "in a reasonable timeframe").
const CLOCK_SKEW_SECS: u64 = 300;

const BAD_SIGNATURE: &str = "Invalid JWT Signature.";
const BAD_TIMEFRAME: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.";
const NOT_DELEGATED: &str = "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.";

/// The sandbox's service account (created on first use) and its delegation.
#[derive(Default)]
pub(crate) struct ServiceState {
    account: Option<Arc<ServiceAccount>>,
    /// Whether the Workspace admin allowed domain-wide delegation of the Gmail scope.
    delegation_revoked: bool,
}

pub(crate) struct ServiceAccount {
    client_email: String,
    client_id: String,
    private_key_id: String,
    private_key_pem: String,
    public_key_pem: String,
    /// The `token_uri` of the key file, the audience assertions must name.
    token_uri: String,
}

/// The service account's key file, Google's shape (creates the account on first call).
pub(crate) fn key_file_json(shared: &Shared, token_uri: &str) -> std::io::Result<String> {
    let mut st = lock(&shared.service);
    let account = match &st.account {
        Some(a) => a.clone(),
        None => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
                .map_err(std::io::Error::other)?;
            let a = Arc::new(ServiceAccount {
                client_email: "relay@sandbox-project.iam.gserviceaccount.com".into(),
                client_id: "100000000000000000001".into(),
                private_key_id: hex_id(),
                private_key_pem: kp.serialize_pem(),
                public_key_pem: kp.public_key_pem(),
                token_uri: token_uri.to_owned(),
            });
            st.account = Some(a.clone());
            a
        }
    };
    Ok(serde_json::to_string_pretty(&json!({
        "type": "service_account",
        "project_id": "sandbox-project",
        "private_key_id": account.private_key_id,
        "private_key": account.private_key_pem,
        "client_email": account.client_email,
        "client_id": account.client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": account.token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": format!("https://www.googleapis.com/robot/v1/metadata/x509/{}", account.client_email.replace('@', "%40")),
        "universe_domain": "googleapis.com",
    }))
    .unwrap_or_default())
}

/// The service account's key is deleted: assertions signed with it fail, and the next
/// `key_file_json` creates a new key.
pub(crate) fn delete_key(shared: &Shared) {
    lock(&shared.service).account = None;
}

pub(crate) fn set_delegation(shared: &Shared, allowed: bool) {
    lock(&shared.service).delegation_revoked = !allowed;
}

fn hex_id() -> String {
    (0..40)
        .map(|_| char::from_digit(rand::random_range(0..16u32), 16).unwrap_or('0'))
        .collect()
}

/// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=…`.
pub(crate) fn jwt_bearer_grant(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let stats = &shared.token_stats;
    let invalid_grant = |text: &str| {
        stats.invalid_grant.fetch_add(1, Ordering::Relaxed);
        oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", text)
    };
    let Some(assertion) = form.get("assertion").filter(|a| !a.is_empty()) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    let (account, delegation_revoked) = {
        let st = lock(&shared.service);
        (st.account.clone(), st.delegation_revoked)
    };
    let Some(account) = account else {
        return invalid_grant(BAD_SIGNATURE);
    };
    let Ok(key) = DecodingKey::from_rsa_pem(account.public_key_pem.as_bytes()) else {
        return invalid_grant(BAD_SIGNATURE);
    };
    // Only the signature and algorithm here; the claims are checked below with
    // Google's own error texts.
    let mut v = Validation::new(Algorithm::RS256);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let claims: Value = match jsonwebtoken::decode(assertion, &key, &v) {
        Ok(data)
            if data
                .header
                .kid
                .as_deref()
                .is_none_or(|k| k == account.private_key_id) =>
        {
            data.claims
        }
        _ => return invalid_grant(BAD_SIGNATURE),
    };
    let text = |k: &str| claims.get(k).and_then(Value::as_str).unwrap_or("");
    if text("iss") != account.client_email {
        return invalid_grant(BAD_SIGNATURE);
    }
    if text("aud") != account.token_uri {
        return invalid_grant("Invalid JWT: Failed audience check.");
    }
    let (iat, exp) = (
        claims.get("iat").and_then(Value::as_u64),
        claims.get("exp").and_then(Value::as_u64),
    );
    let now = unix_now();
    let timely = matches!((iat, exp), (Some(iat), Some(exp))
        if iat <= now + CLOCK_SKEW_SECS && exp > now && exp > iat && exp - iat <= 3600);
    if !timely {
        return invalid_grant(BAD_TIMEFRAME);
    }
    let scopes: Vec<&str> = text("scope").split_whitespace().collect();
    if scopes.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        );
    }
    if delegation_revoked || scopes.iter().any(|s| *s != GMAIL_SCOPE) {
        stats.invalid_client.fetch_add(1, Ordering::Relaxed);
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized_client",
            NOT_DELEGATED,
        );
    }
    let sub = text("sub");
    if !sub.is_empty() && !sub.eq_ignore_ascii_case(&shared.username) {
        return invalid_grant("Invalid email or User ID");
    }
    let mut t = lock(&shared.tokens);
    let (access, lifetime) = mint_access_token(&mut t, "ya29.c.sandbox-");
    if sub.is_empty() {
        // A token for the service account itself: no mailbox accepts it.
        t.access.remove(&access);
    }
    drop(t);
    stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    json_response(
        StatusCode::OK,
        json!({ "access_token": access, "expires_in": lifetime.as_secs(), "token_type": "Bearer" }),
    )
}

/// `grant_type=client_credentials&scope=https://outlook.office365.com/.default`, client
/// authenticated by HTTP Basic or form fields.
pub(crate) fn client_credentials_grant(
    shared: &Shared,
    form: &HashMap<String, String>,
    basic: Option<(String, String)>,
) -> Response {
    let stats = &shared.token_stats;
    let (client_id, secret) = match basic {
        Some((id, secret)) => (Some(id), Some(secret)),
        None => (
            form.get("client_id").cloned(),
            form.get("client_secret").cloned(),
        ),
    };
    let client_id = client_id.unwrap_or_default();
    if client_id != shared.client_id {
        stats.invalid_client.fetch_add(1, Ordering::Relaxed);
        return microsoft_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            Some(700016),
            &format!("Application with identifier '{client_id}' was not found in the directory 'sandbox'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."),
        );
    }
    if secret.as_deref() != Some(shared.client_secret.as_str()) {
        stats.invalid_client.fetch_add(1, Ordering::Relaxed);
        return microsoft_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            Some(7000215),
            &format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."),
        );
    }
    let Some(scope) = form.get("scope").filter(|s| !s.is_empty()) else {
        return microsoft_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some(900144),
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    if scope != MICROSOFT_APP_SCOPE {
        return microsoft_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            Some(1002012),
            &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
        );
    }
    let mut t = lock(&shared.tokens);
    let (access, lifetime) = mint_access_token(&mut t, "eyJ0eXAiOiJKV1Qi.sandbox-app-");
    drop(t);
    stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    json_response(
        StatusCode::OK,
        json!({
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": access,
        }),
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::oauth::service_account::ServiceAccountKey;
    use crate::sandbox::{Sandbox, SandboxOptions};

    async fn post(sb: &Sandbox, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(&sb.token_url)
            .form(form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn grant(sb: &Sandbox, assertion: String) -> (u16, serde_json::Value) {
        post(
            sb,
            &[
                ("grant_type", super::JWT_BEARER_GRANT),
                ("assertion", &assertion),
            ],
        )
        .await
    }

    /// Each claim Google checks is checked here too, with Google's code and text.
    #[tokio::test]
    async fn assertions_are_checked_claim_by_claim() {
        let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let json = sb.control.service_account_json().unwrap();
        let key = ServiceAccountKey::parse(json.as_bytes(), Path::new("sa.json")).unwrap();
        let now = crate::oauth::manager::unix_now();
        let mail = vec![super::GMAIL_SCOPE.to_owned()];
        let ask = |sub: &str, scopes: &[String], aud: &str, iat: u64| {
            key.assertion(sub, scopes, aud, iat).unwrap()
        };
        let (status, body) = grant(&sb, ask(&sb.username, &mail, &sb.token_url, now)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_in"], 3599);

        let cases = [
            (
                ask(&sb.username, &mail, "https://example.com/token", now),
                400,
                "invalid_grant",
                "audience",
            ),
            (
                ask(&sb.username, &mail, &sb.token_url, now - 7200),
                400,
                "invalid_grant",
                "short-lived",
            ),
            (
                ask(&sb.username, &mail, &sb.token_url, now + 3600),
                400,
                "invalid_grant",
                "short-lived",
            ),
            (
                ask("stranger@sandbox.test", &mail, &sb.token_url, now),
                400,
                "invalid_grant",
                "Invalid email or User ID",
            ),
            (
                ask(
                    &sb.username,
                    &["https://www.googleapis.com/auth/drive".to_owned()],
                    &sb.token_url,
                    now,
                ),
                401,
                "unauthorized_client",
                "not authorized",
            ),
            (
                format!("{}x", ask(&sb.username, &mail, &sb.token_url, now)),
                400,
                "invalid_grant",
                "Invalid JWT Signature.",
            ),
        ];
        for (assertion, code, error, text) in cases {
            let (status, body) = grant(&sb, assertion).await;
            assert_eq!(
                (status, body["error"].as_str().unwrap()),
                (code, error),
                "{body}"
            );
            assert!(
                body["error_description"].as_str().unwrap().contains(text),
                "{body}"
            );
        }
        sb.control.set_domain_wide_delegation(false);
        let (status, body) = grant(&sb, ask(&sb.username, &mail, &sb.token_url, now)).await;
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (401, "unauthorized_client")
        );
        sb.control.set_domain_wide_delegation(true);
        sb.control.delete_service_account_key();
        let (status, body) = grant(&sb, ask(&sb.username, &mail, &sb.token_url, now)).await;
        assert_eq!(
            (status, body["error_description"].as_str().unwrap()),
            (400, "Invalid JWT Signature.")
        );
    }

    #[tokio::test]
    async fn client_credentials_want_the_default_scope_and_the_secret_value() {
        let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let ok = [
            ("grant_type", "client_credentials"),
            ("client_id", sb.client_id.as_str()),
            ("client_secret", sb.client_secret.as_str()),
            ("scope", super::MICROSOFT_APP_SCOPE),
        ];
        let (status, body) = post(&sb, &ok).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("refresh_token").is_none());
        let mut bad_scope = ok;
        bad_scope[3].1 = "https://outlook.office.com/SMTP.Send";
        let (status, body) = post(&sb, &bad_scope).await;
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (400, "invalid_scope")
        );
        assert_eq!(body["error_codes"][0], 1002012);
        let mut bad_secret = ok;
        bad_secret[2].1 = "secret-id";
        let (status, body) = post(&sb, &bad_secret).await;
        assert_eq!(
            (status, body["error"].as_str().unwrap()),
            (401, "invalid_client")
        );
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215:"));
    }
}
