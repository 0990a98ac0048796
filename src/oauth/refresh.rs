//! Getting a new access token: the `Refresher` trait the manager is generic over (so
//! tests use an in-memory fake), and `OAuth2Refresher`, the real one on the `oauth2`
//! crate — a refresh-token grant, or a client-credentials grant (Microsoft app-only) —
//! which sorts the token endpoint's failures into what the manager must do about them:
//! give up and ask for `authorize` (`InvalidGrant`), fix the client credentials
//! (`InvalidClient`), or retry later (`Transient`). The JWT bearer grant of Google
//! service accounts is `service_account`, sharing this module's error sorting.

use std::{
    fmt,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use oauth2::{
    basic::{BasicClient, BasicErrorResponseType},
    AsyncHttpClient, ClientId, ClientSecret, EndpointNotSet, EndpointSet, HttpClientError,
    HttpRequest, HttpResponse, RefreshToken, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};

use super::OAuthError;

/// Used when the provider's reply has no `expires_in` (Google always sends one).
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(3600);

/// How long one request to the token endpoint may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A successful refresh. `Debug` never shows a token.
pub struct Grant {
    pub access_token: SecretString,
    pub expires_in: Duration,
    /// `Some` when the provider rotated the refresh token (Microsoft does): the old one
    /// may already be dead, so this must be saved.
    pub refresh_token: Option<SecretString>,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("access_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// Why a refresh failed. `Display` never contains a secret; it is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The refresh token is expired or revoked: only `authorize` helps.
    #[error("invalid_grant: {description}")]
    InvalidGrant { description: String },
    /// The client id/secret are wrong, or the refresh token belongs to another client.
    #[error("invalid_client: {description}")]
    InvalidClient { description: String },
    /// 5xx, 429, network trouble, timeout: try again later.
    #[error("temporary failure: {detail}")]
    Transient { detail: String },
    #[error("{detail}")]
    Other { detail: String },
}

impl RefreshError {
    /// Retrying later may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RefreshError::Transient { .. })
    }
}

/// Gets a new access token, with the token file's refresh token when the grant uses one
/// (`None` when the file has none).
pub trait Refresher: Send + Sync + 'static {
    fn refresh(
        &self,
        refresh_token: Option<&SecretString>,
    ) -> impl Future<Output = Result<Grant, RefreshError>> + Send;
}

impl<R: Refresher> Refresher for std::sync::Arc<R> {
    fn refresh(
        &self,
        refresh_token: Option<&SecretString>,
    ) -> impl Future<Output = Result<Grant, RefreshError>> + Send {
        (**self).refresh(refresh_token)
    }
}

type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The real refresher: `grant_type=refresh_token` (or `client_credentials`) against the
/// provider's token URL.
pub struct OAuth2Refresher {
    client: TokenClient,
    http: reqwest::Client,
    /// `Some(scopes)`: the client-credentials grant (no refresh token, no user).
    client_credentials: Option<Vec<String>>,
}

impl fmt::Debug for OAuth2Refresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Refresher")
            .field("client_id", &self.client.client_id().as_str())
            .field("token_url", &self.client.token_uri().as_str())
            .finish_non_exhaustive()
    }
}

impl OAuth2Refresher {
    /// `token_url` must be https, or http on a loopback host (tests, sandbox).
    pub fn new(
        client_id: String,
        client_secret: Option<SecretString>,
        token_url: String,
    ) -> Result<Self, OAuthError> {
        validate_token_url(&token_url)?;
        let token_url = TokenUrl::new(token_url.clone()).map_err(|e| OAuthError::TokenUrl {
            url: token_url,
            reason: e.to_string(),
        })?;
        let mut client = BasicClient::new(ClientId::new(client_id)).set_token_uri(token_url);
        if let Some(secret) = client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        Ok(OAuth2Refresher {
            client,
            http: http_client()?,
            client_credentials: None,
        })
    }

    /// The client-credentials grant (RFC 6749 4.4; Microsoft 365 app-only access):
    /// client id + secret buy a token for `scopes`, e.g.
    /// `https://outlook.office365.com/.default`.
    pub fn client_credentials(
        client_id: String,
        client_secret: SecretString,
        token_url: String,
        scopes: Vec<String>,
    ) -> Result<Self, OAuthError> {
        let mut r = OAuth2Refresher::new(client_id, Some(client_secret), token_url)?;
        r.client_credentials = Some(scopes);
        Ok(r)
    }
}

/// The HTTP client for token endpoints: no redirects, bounded time.
pub(crate) fn http_client() -> Result<reqwest::Client, OAuthError> {
    reqwest::Client::builder()
        // oauth2 5: following redirects would expose the credentials to SSRF.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| OAuthError::HttpClient(error_chain(&e)))
}

/// Checks a token URL: https, or http only for 127.0.0.1 / ::1 / localhost.
pub fn validate_token_url(url: &str) -> Result<(), OAuthError> {
    let bad = |reason: &str| OAuthError::TokenUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = oauth2::url::Url::parse(url).map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(OAuthError::TokenUrl {
            url: "(not shown: it contains credentials)".into(),
            reason: "it must not contain user:password@".into(),
        });
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(oauth2::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(oauth2::url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(oauth2::url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(bad(
                    "it must be https (plain http is allowed only for 127.0.0.1, ::1 and localhost)",
                ))
            }
        }
        other => Err(bad(&format!("scheme {other:?} is not https"))),
    }
}

/// Remembers the HTTP status of the reply: `oauth2` drops it, but a 503 must be retried
/// and a 400 must not.
struct StatusRecorder<'a> {
    inner: &'a reqwest::Client,
    status: AtomicU16,
}

type HttpError = HttpClientError<reqwest::Error>;

impl<'c> AsyncHttpClient<'c> for StatusRecorder<'_> {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let result = self.inner.call(request).await;
            if let Ok(response) = &result {
                self.status
                    .store(response.status().as_u16(), Ordering::Relaxed);
            }
            result
        })
    }
}

impl Refresher for OAuth2Refresher {
    async fn refresh(&self, refresh_token: Option<&SecretString>) -> Result<Grant, RefreshError> {
        let http = StatusRecorder {
            inner: &self.http,
            status: AtomicU16::new(0),
        };
        let result = match (&self.client_credentials, refresh_token) {
            (Some(scopes), _) => {
                self.client
                    .exchange_client_credentials()
                    .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
                    .request_async(&http)
                    .await
            }
            (None, Some(rt)) => {
                let token = RefreshToken::new(rt.expose_secret().to_owned());
                self.client
                    .exchange_refresh_token(&token)
                    .request_async(&http)
                    .await
            }
            (None, None) => {
                return Err(RefreshError::InvalidGrant {
                    description: "the token file holds no refresh token".into(),
                })
            }
        };
        let status = http.status.load(Ordering::Relaxed);
        match result {
            Ok(reply) => Ok(grant_from(&reply)),
            Err(e) => Err(classify(e, status)),
        }
    }
}

fn grant_from(reply: &impl TokenResponse) -> Grant {
    Grant {
        access_token: SecretString::from(reply.access_token().secret().to_owned()),
        expires_in: reply.expires_in().unwrap_or(DEFAULT_EXPIRES_IN),
        refresh_token: reply
            .refresh_token()
            .map(|t| SecretString::from(t.secret().to_owned())),
    }
}

/// Sorts a token endpoint's raw reply like `classify` does, for grants the `oauth2`
/// crate has no request for (the JWT bearer grant). Never shows the body.
pub(crate) fn classify_reply(status: u16, body: &[u8]) -> Result<Grant, RefreshError> {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<oauth2::basic::BasicTokenResponse>(body) {
            Ok(reply) => Ok(grant_from(&reply)),
            Err(e) => Err(RefreshError::Other {
                detail: format!(
                    "cannot understand the token endpoint's reply (HTTP {status}): {} (line {}, column {})",
                    match e.classify() {
                        serde_json::error::Category::Data => "unexpected or missing value",
                        serde_json::error::Category::Eof => "truncated JSON",
                        _ => "not JSON",
                    },
                    e.line(),
                    e.column()
                ),
            }),
        };
    }
    Err(
        match serde_json::from_slice::<oauth2::basic::BasicErrorResponse>(body) {
            Ok(reply) => classify(RequestTokenError::ServerResponse(reply), status),
            Err(_) if retryable_status(status) => RefreshError::Transient {
                detail: format!("HTTP {status} from the token endpoint"),
            },
            Err(_) => RefreshError::Other {
                detail: format!(
                    "HTTP {status} from the token endpoint, without an OAuth error in the reply"
                ),
            },
        },
    )
}

/// The refresher of one configured account, whichever grant it uses.
#[derive(Debug)]
pub enum AccountRefresher {
    /// Refresh token or client credentials.
    OAuth2(Box<OAuth2Refresher>),
    /// A Google service account's JWT bearer grant.
    ServiceAccount(super::service_account::ServiceAccountRefresher),
}

impl Refresher for AccountRefresher {
    async fn refresh(&self, refresh_token: Option<&SecretString>) -> Result<Grant, RefreshError> {
        match self {
            AccountRefresher::OAuth2(r) => r.refresh(refresh_token).await,
            AccountRefresher::ServiceAccount(r) => r.refresh(refresh_token).await,
        }
    }
}

fn retryable_status(status: u16) -> bool {
    status == 429 || status == 408 || (500..600).contains(&status)
}

/// One line, printable, bounded: server-supplied text goes into logs and SMTP replies.
pub(crate) fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out.trim().to_owned()
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    one_line(&s, 300)
}

fn classify(
    e: RequestTokenError<HttpError, oauth2::basic::BasicErrorResponse>,
    status: u16,
) -> RefreshError {
    match e {
        RequestTokenError::ServerResponse(reply) => {
            let description = one_line(
                reply
                    .error_description()
                    .map(String::as_str)
                    .unwrap_or("(no description)"),
                200,
            );
            match reply.error() {
                BasicErrorResponseType::InvalidGrant => RefreshError::InvalidGrant { description },
                BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => {
                    RefreshError::InvalidClient { description }
                }
                other if retryable_status(status) => RefreshError::Transient {
                    detail: format!(
                        "HTTP {status} from the token endpoint ({other}: {description})"
                    ),
                },
                other => RefreshError::Other {
                    detail: format!(
                        "token endpoint refused: {}: {description}",
                        one_line(other.as_ref(), 60)
                    ),
                },
            }
        }
        RequestTokenError::Request(e) => {
            let detail = match &e {
                HttpClientError::Reqwest(re) if re.is_timeout() => {
                    format!(
                        "token endpoint did not answer in time ({})",
                        error_chain(&**re)
                    )
                }
                HttpClientError::Reqwest(re) => error_chain(&**re),
                HttpClientError::Io(io) => error_chain(io),
                HttpClientError::Http(h) => {
                    return RefreshError::Other {
                        detail: format!("cannot build the token request: {}", error_chain(h)),
                    }
                }
                HttpClientError::Other(s) => one_line(s, 300),
                _ => "request to the token endpoint failed".to_owned(),
            };
            RefreshError::Transient { detail }
        }
        // Never show the body or serde's message: both may quote a token.
        RequestTokenError::Parse(pe, _body) if retryable_status(status) => {
            let _ = pe;
            RefreshError::Transient {
                detail: format!("HTTP {status} from the token endpoint"),
            }
        }
        RequestTokenError::Parse(pe, _body) => {
            let path = pe.path().to_string();
            RefreshError::Other {
                detail: format!(
                    "cannot understand the token endpoint's reply (HTTP {status}): {} at `{path}` (line {}, column {})",
                    match pe.inner().classify() {
                        serde_json::error::Category::Data => "unexpected or missing value",
                        serde_json::error::Category::Eof => "truncated JSON",
                        _ => "not JSON",
                    },
                    pe.inner().line(),
                    pe.inner().column(),
                ),
            }
        }
        RequestTokenError::Other(_) if retryable_status(status) => RefreshError::Transient {
            detail: format!("HTTP {status} from the token endpoint"),
        },
        RequestTokenError::Other(s) => RefreshError::Other {
            detail: format!(
                "unexpected reply from the token endpoint (HTTP {status}): {}",
                one_line(&s, 200)
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{
        extract::State, http::StatusCode, response::IntoResponse, routing::post, Form, Router,
    };
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    const RT: &str = "1//0refresh-SECRET-abc";
    const AT: &str = "ya29.access-SECRET-xyz";

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<HashMap<String, String>>>>);

    /// A token endpoint answering `status` with `body` (JSON content type).
    async fn endpoint(status: u16, body: &'static str, ctype: &'static str) -> (String, Seen) {
        let seen = Seen::default();
        let app =
            Router::new()
                .route(
                    "/token",
                    post(
                        move |State(seen): State<Seen>,
                              Form(form): Form<HashMap<String, String>>| async move {
                            seen.0.lock().unwrap().push(form);
                            (
                                StatusCode::from_u16(status).unwrap(),
                                [("content-type", ctype)],
                                body,
                            )
                                .into_response()
                        },
                    ),
                )
                .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (format!("http://{addr}/token"), seen)
    }

    const JSON: &str = "application/json; charset=utf-8";

    fn refresher(url: String) -> OAuth2Refresher {
        OAuth2Refresher::new(
            "123-abc.apps.googleusercontent.com".into(),
            Some(SecretString::from("GOCSPX-client-SECRET".to_owned())),
            url,
        )
        .unwrap()
    }

    async fn run(
        status: u16,
        body: &'static str,
        ctype: &'static str,
    ) -> Result<Grant, RefreshError> {
        let (url, _) = endpoint(status, body, ctype).await;
        refresher(url)
            .refresh(Some(&SecretString::from(RT.to_owned())))
            .await
    }

    #[tokio::test]
    async fn google_success_reply() {
        let (url, seen) = endpoint(
            200,
            r#"{"access_token": "ya29.access-SECRET-xyz", "expires_in": 3599, "scope": "https://mail.google.com/", "token_type": "Bearer"}"#,
            JSON,
        )
        .await;
        let g = refresher(url)
            .refresh(Some(&SecretString::from(RT.to_owned())))
            .await
            .unwrap();
        assert_eq!(g.access_token.expose_secret(), AT);
        assert_eq!(g.expires_in, Duration::from_secs(3599));
        assert!(g.refresh_token.is_none());
        let d = format!("{g:?}");
        assert!(!d.contains(AT), "{d}");
        let forms = seen.0.lock().unwrap();
        assert_eq!(forms[0]["grant_type"], "refresh_token");
        assert_eq!(forms[0]["refresh_token"], RT);
    }

    #[tokio::test]
    async fn missing_expires_in_means_an_hour_and_rotation_is_seen() {
        let g = run(
            200,
            r#"{"access_token": "a", "token_type": "bearer", "refresh_token": "rotated"}"#,
            JSON,
        )
        .await
        .unwrap();
        assert_eq!(g.expires_in, DEFAULT_EXPIRES_IN);
        assert_eq!(g.refresh_token.unwrap().expose_secret(), "rotated");
    }

    #[tokio::test]
    async fn invalid_grant_keeps_description() {
        let e = run(
            400,
            r#"{"error": "invalid_grant", "error_description": "Token has been expired or revoked."}"#,
            JSON,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e,
            RefreshError::InvalidGrant {
                description: "Token has been expired or revoked.".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "invalid_grant: Token has been expired or revoked."
        );
    }

    #[tokio::test]
    async fn invalid_client_and_unauthorized_client() {
        let e = run(
            401,
            r#"{"error": "invalid_client", "error_description": "Unauthorized"}"#,
            JSON,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RefreshError::InvalidClient { .. }), "{e:?}");
        let e = run(
            400,
            r#"{"error": "unauthorized_client", "error_description": "Unauthorized"}"#,
            JSON,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RefreshError::InvalidClient { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn server_errors_and_rate_limits_are_transient() {
        for (status, body, ctype) in [
            (
                503,
                "<html><body>Service Unavailable</body></html>",
                "text/html",
            ),
            (503, "", "text/plain"),
            (500, r#"{"error": "internal_failure"}"#, JSON),
            (429, r#"{"error": "rate_limit_exceeded"}"#, JSON),
        ] {
            let e = run(status, body, ctype).await.unwrap_err();
            assert!(e.is_transient(), "{status} {body}: {e:?}");
            assert!(e.to_string().contains(&status.to_string()), "{e}");
        }
    }

    #[tokio::test]
    async fn connection_refused_is_transient() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", l.local_addr().unwrap());
        drop(l);
        let e = refresher(url)
            .refresh(Some(&SecretString::from(RT.to_owned())))
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }

    #[tokio::test]
    async fn garbage_success_reply_is_other_and_not_echoed() {
        let e = run(
            200,
            r#"{"access_token": "ya29.access-SECRET-xyz", "expires_in": "soon"}"#,
            JSON,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RefreshError::Other { .. }), "{e:?}");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(AT) && !text.contains("soon"), "{text}");
        let e = run(
            400,
            r#"{"error": "invalid_scope", "error_description": "Bad scope"}"#,
            JSON,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, RefreshError::Other { .. }) && e.to_string().contains("invalid_scope"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn token_manager_with_the_real_refresher() {
        use crate::oauth::{ManagerSettings, TokenManager, TokenStore};
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("t.json"));
        std::fs::write(store.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        let (url, _) = endpoint(
            200,
            r#"{"access_token": "ya29.access-SECRET-xyz", "expires_in": 3599, "token_type": "Bearer"}"#,
            JSON,
        )
        .await;
        let stop = tokio_util::sync::CancellationToken::new();
        let (h, join) = TokenManager::start(
            ManagerSettings::new("me@example.com"),
            store.clone(),
            std::sync::Arc::new(refresher(url)),
            stop.clone(),
        )
        .unwrap();
        let t = h.ready(Duration::from_secs(10)).await.unwrap();
        assert_eq!((t.secret(), t.generation), (AT, 1));
        assert!(t.valid_for(Duration::from_secs(3500)));
        // Saved right after publishing.
        let mut saved = None;
        for _ in 0..200 {
            saved = store.load().unwrap().access_token;
            if saved.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(saved.unwrap().expose_secret(), AT);
        stop.cancel();
        join.await.unwrap();

        // A dead refresh token: senders get the reason.
        std::fs::write(store.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        let (url, _) = endpoint(
            400,
            r#"{"error": "invalid_grant", "error_description": "Token has been expired or revoked."}"#,
            JSON,
        )
        .await;
        let stop = tokio_util::sync::CancellationToken::new();
        let (h, _join) = TokenManager::start(
            ManagerSettings::new("me@example.com"),
            store.clone(),
            refresher(url),
            stop.clone(),
        )
        .unwrap();
        let mut reason = String::new();
        for _ in 0..500 {
            reason = h.current().unwrap_err().reason.to_string();
            if reason.contains("invalid_grant") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(reason.contains("invalid_grant"), "{reason}");
        stop.cancel();
    }

    #[test]
    fn token_url_must_be_https_or_loopback_http() {
        for ok in [
            "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:8080/token",
            "http://[::1]:8080/token",
            "http://localhost/token",
        ] {
            assert!(validate_token_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://oauth2.googleapis.com/token",
            "http://10.0.0.1/token",
            "ftp://127.0.0.1/token",
            "not a url",
            "https://user:pw@example.com/token",
        ] {
            let e = validate_token_url(bad).unwrap_err().to_string();
            assert!(!e.contains("pw@"), "{e}");
            assert!(e.contains("token_url"), "{e}");
        }
        assert!(OAuth2Refresher::new("id".into(), None, "http://example.com/t".into()).is_err());
    }

    #[test]
    fn displays_hold_no_secret() {
        let r = refresher("https://oauth2.googleapis.com/token".into());
        assert!(!format!("{r:?}").contains("GOCSPX-client-SECRET"));
    }
}
