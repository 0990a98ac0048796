//! OAuth 2.0 tokens: the token file (`store`), exchanging a refresh token for an access
//! token (`refresh`), the refresh-ahead `manager` task, the `token status` report
//! (`status`), and the lock-free `handle` senders read the current access token from.
//! `authorize` gets the first refresh token (authorization code + PKCE), reading Google's
//! downloaded client file through `client_json`; `device` is `authorize --device` (RFC 8628).
//! `service_account` needs neither: a Google service account signs its own JWT assertion.

pub mod authorize;
pub mod client_json;
pub mod device;
pub mod handle;
pub mod manager;
pub mod refresh;
pub mod service_account;
pub mod status;
pub mod store;

pub use handle::{
    token_channel, AccessToken, TokenHandle, TokenPublisher, TokenState, TokenUnavailable,
};
pub use manager::{refresh_now, CredentialKind, ManagerSettings, ProviderHint, TokenManager};
pub use refresh::{AccountRefresher, Grant, OAuth2Refresher, RefreshError, Refresher};
pub use status::{status, status_with, TokenStatus};
pub use store::{ParseError, StoreError, TokenFile, TokenStore};

/// Errors of the `oauth` module as a whole. None of them ever shows a secret.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("token refresh failed: {0}")]
    Refresh(#[from] RefreshError),
    /// A refresh succeeded but its result could not be saved.
    #[error("the token was refreshed but could not be saved{}: {source}", if *.rotated { " (the provider ROTATED the refresh token: the old one may no longer work, run `smtp-oauth-relay authorize` if the next start fails)" } else { "" })]
    NotSaved { source: StoreError, rotated: bool },
    #[error("token_url {url}: {reason}")]
    TokenUrl { url: String, reason: String },
    #[error("cannot set up the HTTP client for the token endpoint: {0}")]
    HttpClient(String),
    #[error("the token manager must be started inside a tokio runtime")]
    NoRuntime,
}
