//! Google service accounts with domain-wide delegation (`service_account_json`): the key
//! file as the Cloud console writes it, and `ServiceAccountRefresher`, the JWT bearer
//! grant (RFC 7523) that buys an access token for the mailbox `sub` without any refresh
//! token or browser — the assertion is signed RS256 with the service account's key.
//!
//! Like `client_json`, the file is parsed by hand so that no error message quotes a value
//! from it (it holds a private key); errors name the key and the fix.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::manager::unix_now;
use super::refresh::{classify_reply, http_client, one_line, Grant, RefreshError, Refresher};
use super::OAuthError;

/// Google's token endpoint, the default `token_uri`.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// RFC 7523's grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Google accepts assertions valid for at most an hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a service account key file cannot be used. Never quotes the file.
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what} (line {line}, column {column}); download a new key (IAM & Admin → Service accounts → your account → Keys → Add key → JSON)")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        what: &'static str,
    },
    #[error("{path} is an OAuth client file, not a service-account key; write `client_secret_json = \"{path}\"` for it, or create a key for a service account (IAM & Admin → Service accounts → Keys → Add key → JSON)")]
    ClientFile { path: PathBuf },
    #[error("{path} is not a service-account key (its \"type\" is not \"service_account\"); create one in the Google Cloud console: IAM & Admin → Service accounts → your account → Keys → Add key → JSON")]
    NotServiceAccount { path: PathBuf },
    #[error("{path}: \"{key}\" {problem}; download a new key from the Google Cloud console")]
    BadValue {
        path: PathBuf,
        key: &'static str,
        problem: &'static str,
    },
}

/// A service account's key. `Debug` never shows the private key.
#[derive(Clone)]
pub struct ServiceAccountKey {
    pub client_email: String,
    /// The numeric OAuth client ID an admin authorizes for domain-wide delegation.
    pub client_id: String,
    pub private_key_id: Option<String>,
    pub token_uri: Option<String>,
    key: EncodingKey,
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("client_id", &self.client_id)
            .field("private_key_id", &self.private_key_id)
            .field("token_uri", &self.token_uri)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

impl ServiceAccountKey {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ServiceAccountError> {
        let bytes = std::fs::read(path).map_err(|source| ServiceAccountError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses the file's bytes; `path` is used in messages only.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ServiceAccountError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ServiceAccountError::Syntax {
                path: path.to_owned(),
                line: e.line(),
                column: e.column(),
                what: match e.classify() {
                    serde_json::error::Category::Eof => "the file ends too early",
                    _ => "it is not valid JSON",
                },
            })?;
        let Value::Object(map) = value else {
            return Err(ServiceAccountError::NotServiceAccount {
                path: path.to_owned(),
            });
        };
        if map.get("type").and_then(Value::as_str) != Some("service_account") {
            return Err(
                if map.contains_key("installed") || map.contains_key("web") {
                    ServiceAccountError::ClientFile {
                        path: path.to_owned(),
                    }
                } else {
                    ServiceAccountError::NotServiceAccount {
                        path: path.to_owned(),
                    }
                },
            );
        }
        let bad = |key: &'static str, problem: &'static str| ServiceAccountError::BadValue {
            path: path.to_owned(),
            key,
            problem,
        };
        let string = |map: &Map<String, Value>, key: &'static str| match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(bad(key, "is not a non-empty string")),
        };
        let client_email = string(&map, "client_email")?
            .filter(|e| e.contains('@'))
            .ok_or_else(|| bad("client_email", "is missing or not an email address"))?;
        let pem = string(&map, "private_key")?.ok_or_else(|| bad("private_key", "is missing"))?;
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
            bad(
                "private_key",
                "is not an RSA private key in PEM form (-----BEGIN PRIVATE KEY-----)",
            )
        })?;
        let token_uri = string(&map, "token_uri")?;
        if let Some(u) = &token_uri {
            if super::refresh::validate_token_url(u).is_err() {
                return Err(bad(
                    "token_uri",
                    "is not an https URL (plain http only on loopback)",
                ));
            }
        }
        Ok(ServiceAccountKey {
            client_email,
            client_id: string(&map, "client_id")?.unwrap_or_default(),
            private_key_id: string(&map, "private_key_id")?,
            token_uri,
            key,
        })
    }

    /// The signed assertion asking `aud` for a token for `subject` with `scopes`,
    /// valid from `now` for an hour (Google's maximum).
    pub fn assertion(
        &self,
        subject: &str,
        scopes: &[String],
        aud: &str,
        now: u64,
    ) -> Result<String, RefreshError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.private_key_id.clone();
        let claims = serde_json::json!({
            "iss": self.client_email,
            "sub": subject,
            "scope": scopes.join(" "),
            "aud": aud,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| RefreshError::Other {
            detail: format!(
                "cannot sign the service-account assertion: {}",
                one_line(&e.to_string(), 200)
            ),
        })
    }
}

/// The JWT bearer grant for one mailbox. The key file is read again before each token
/// request, so a replaced key takes effect without a restart.
pub struct ServiceAccountRefresher {
    path: PathBuf,
    subject: String,
    scopes: Vec<String>,
    token_url: String,
    http: reqwest::Client,
}

impl fmt::Debug for ServiceAccountRefresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountRefresher")
            .field("path", &self.path)
            .field("subject", &self.subject)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountRefresher {
    /// `subject`: the mailbox to act for (the account's `username`); `token_url` is also
    /// the assertion's audience.
    pub fn new(
        path: PathBuf,
        subject: String,
        scopes: Vec<String>,
        token_url: String,
    ) -> Result<Self, OAuthError> {
        super::refresh::validate_token_url(&token_url)?;
        Ok(ServiceAccountRefresher {
            path,
            subject,
            scopes,
            token_url,
            http: http_client()?,
        })
    }
}

impl Refresher for ServiceAccountRefresher {
    async fn refresh(
        &self,
        _refresh_token: Option<&secrecy::SecretString>,
    ) -> Result<Grant, RefreshError> {
        let path = self.path.clone();
        let key = tokio::task::spawn_blocking(move || ServiceAccountKey::load(&path))
            .await
            .map_err(|e| RefreshError::Other {
                detail: e.to_string(),
            })?
            .map_err(|e| RefreshError::Other {
                detail: e.to_string(),
            })?;
        let assertion = key.assertion(&self.subject, &self.scopes, &self.token_url, unix_now())?;
        let reply = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| RefreshError::Transient {
                detail: super::refresh::error_chain(&e),
            })?;
        let status = reply.status().as_u16();
        let body = reply.bytes().await.map_err(|e| RefreshError::Transient {
            detail: super::refresh::error_chain(&e),
        })?;
        classify_reply(status, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_json(kp: &rcgen::KeyPair) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "abc123",
            "private_key": kp.serialize_pem(),
            "client_email": "relay@p.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    fn rsa() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap()
    }

    #[test]
    fn assertion_carries_google_claims_and_verifies_with_the_public_key() {
        let kp = rsa();
        let key = ServiceAccountKey::parse(key_json(&kp).as_bytes(), Path::new("k.json")).unwrap();
        let scopes = vec!["https://mail.google.com/".to_owned()];
        let jwt = key
            .assertion("me@example.com", &scopes, GOOGLE_TOKEN_URI, 1_700_000_000)
            .unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("abc123"));
        let public =
            jsonwebtoken::DecodingKey::from_rsa_pem(kp.public_key_pem().as_bytes()).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.set_audience(&[GOOGLE_TOKEN_URI]);
        let claims: Value = jsonwebtoken::decode(&jwt, &public, &v).unwrap().claims;
        assert_eq!(claims["iss"], "relay@p.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], "me@example.com");
        assert_eq!(claims["scope"], "https://mail.google.com/");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        // Another key's signature does not verify.
        let other =
            jsonwebtoken::DecodingKey::from_rsa_pem(rsa().public_key_pem().as_bytes()).unwrap();
        assert!(jsonwebtoken::decode::<Value>(&jwt, &other, &v).is_err());
    }

    #[test]
    fn bad_files_get_messages_that_name_the_problem_and_never_quote_the_key() {
        let p = Path::new("/etc/k.json");
        let err = |text: &str| {
            ServiceAccountKey::parse(text.as_bytes(), p)
                .unwrap_err()
                .to_string()
        };
        assert!(err("{").contains("ends too early"));
        let client = r#"{"installed":{"client_id":"x","client_secret":"s"}}"#;
        assert!(
            err(client).contains("client_secret_json"),
            "{}",
            err(client)
        );
        assert!(err(r#"{"type":"authorized_user"}"#).contains("not a service-account key"));
        let no_key = r#"{"type":"service_account","client_email":"a@b.c"}"#;
        assert!(err(no_key).contains("\"private_key\" is missing"));
        let junk =
            r#"{"type":"service_account","client_email":"a@b.c","private_key":"SECRETJUNK"}"#;
        let e = err(junk);
        assert!(
            e.contains("not an RSA private key") && !e.contains("SECRETJUNK"),
            "{e}"
        );
        let no_mail = key_json(&rsa()).replace("relay@p.iam.gserviceaccount.com", "relay");
        assert!(err(&no_mail).contains("client_email"));
        let key = ServiceAccountKey::parse(key_json(&rsa()).as_bytes(), p).unwrap();
        assert!(!format!("{key:?}").contains("PRIVATE KEY"));
    }
}
