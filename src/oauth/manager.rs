//! The `TokenManager`: one background task per account that keeps a valid access token
//! published on the `TokenHandle`, refreshing *ahead* of expiry so no message waits.
//!
//! It is the only place that talks to the token endpoint, so there is never more than
//! one refresh in flight however many senders there are. Senders that got a 535 ask for
//! a refresh through the handle; such forced refreshes are debounced. Temporary
//! failures are retried with capped exponential backoff and full jitter while the old
//! token stays usable; a dead refresh token (`invalid_grant`) is reported once, with the
//! fix, and the task then watches the token file until `authorize` writes a new one.
//! `refresh_now` is the same refresh-and-save step for the `token refresh` command.

use std::{
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use tokio::{
    task::JoinHandle,
    time::{sleep, sleep_until, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    handle::{token_channel, AccessToken, TokenHandle, TokenPublisher, TokenState},
    refresh::{one_line, Grant, RefreshError, Refresher},
    store::{StoreError, TokenFile, TokenStore},
    OAuthError,
};

/// Default for `ManagerSettings::refresh_margin`.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// At most one refresh forced by senders (after a 535) per this interval.
pub const FORCED_REFRESH_DEBOUNCE: Duration = Duration::from_secs(10);
/// How often the token file is checked for a new refresh token after `invalid_grant`.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// First retry delay ceiling after a temporary failure; it doubles per attempt…
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// …up to this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// A refresh (one call of the `Refresher`) that takes longer than this counts as failed.
const REFRESH_DEADLINE: Duration = Duration::from_secs(60);
/// Never schedule refreshes closer together than this, whatever `expires_in` says.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// Which provider's advice to give when the refresh token is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderHint {
    #[default]
    Gmail,
    /// Microsoft 365: AADSTS error codes, `authorize --device`.
    Microsoft,
    Custom,
}

/// How an account gets its access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialKind {
    /// A refresh token from `authorize`, kept in the token file.
    #[default]
    RefreshToken,
    /// A Google service account's signed assertion (domain-wide delegation, `sub`).
    ServiceAccount,
    /// The client-credentials grant: client id + secret (Microsoft 365 app-only).
    ClientCredentials,
}

impl CredentialKind {
    /// The config's name for it (`credential = "…"`).
    pub fn name(self) -> &'static str {
        match self {
            CredentialKind::RefreshToken => "refresh_token",
            CredentialKind::ServiceAccount => "service_account",
            CredentialKind::ClientCredentials => "client_credentials",
        }
    }

    /// Whether the token file holds a refresh token that `authorize` obtains.
    pub fn uses_refresh_token(self) -> bool {
        self == CredentialKind::RefreshToken
    }
}

#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// The account name, as in the config (used in log lines and hints).
    pub account: String,
    pub credential: CredentialKind,
    /// Refresh when the token has less than min(refresh_margin, lifetime/2) left.
    pub refresh_margin: Duration,
    pub provider_hint: ProviderHint,
    /// The config file, for the `authorize --config …` command line in hints.
    pub config_path: Option<PathBuf>,
}

impl ManagerSettings {
    /// Settings with the defaults: 300 s margin, Gmail hints, no config path.
    pub fn new(account: impl Into<String>) -> Self {
        ManagerSettings {
            account: account.into(),
            credential: CredentialKind::RefreshToken,
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            provider_hint: ProviderHint::Gmail,
            config_path: None,
        }
    }

    fn account(&self) -> String {
        one_line(&self.account, 120)
    }

    /// `" in /etc/…/config.toml"`, or nothing without a config path.
    fn in_config(&self) -> String {
        match &self.config_path {
            Some(p) => format!(" in {}", one_line(&p.display().to_string(), 300)),
            None => String::new(),
        }
    }

    /// The command that fixes a dead refresh token.
    pub fn authorize_command(&self) -> String {
        match &self.config_path {
            Some(p) => format!(
                "smtp-oauth-relay authorize --config {} --account {}",
                one_line(&p.display().to_string(), 300),
                self.account()
            ),
            None => format!("smtp-oauth-relay authorize --account {}", self.account()),
        }
    }

    /// The full, one-line explanation and fix for a refresh failure that retrying will
    /// not cure (`invalid_grant`, `invalid_client`); `None` for the others.
    pub fn remedy(&self, err: &RefreshError) -> Option<String> {
        let account = self.account();
        match (self.credential, err) {
            (CredentialKind::ServiceAccount, RefreshError::InvalidGrant { description }) => {
                return Some(format!(
                    "account {account}: Google refused the service account's assertion (invalid_grant: {description}); {}; the relay tries again every few minutes and reads the key file again each time",
                    service_account_hint(description)
                ))
            }
            (CredentialKind::ServiceAccount, RefreshError::InvalidClient { description }) => {
                return Some(format!(
                    "account {account}: the service account may not act for this mailbox (unauthorized_client: {description}); a Workspace super admin must allow it in the Google Admin console: Security → Access and data control → API controls → Manage Domain Wide Delegation → Add new, with the client_id from the service_account_json file and the scope https://mail.google.com/ (changes can take up to 24 hours to apply; the relay tries again every few minutes)"
                ))
            }
            (CredentialKind::ClientCredentials, RefreshError::InvalidGrant { description } | RefreshError::InvalidClient { description }) => {
                let mut s = format!(
                    "account {account}: the token endpoint rejected the app's client credentials ({err}); check client_id and client_secret{} — give the client secret's Value, not its Secret ID, and note that client secrets expire (app registration → Certificates & secrets); the relay tries again every few minutes",
                    self.in_config(),
                );
                if self.provider_hint == ProviderHint::Microsoft {
                    if let Some((code, why)) = MICROSOFT_CLIENT_ERRORS.iter().find(|(c, _)| description.contains(c)) {
                        s.push_str(&format!("; Microsoft says {code}: {why}"));
                    }
                }
                return Some(s);
            }
            _ => {}
        }
        match err {
            RefreshError::InvalidGrant { description } => {
                let command = match self.provider_hint {
                    ProviderHint::Microsoft => format!("{} --device", self.authorize_command()),
                    _ => self.authorize_command(),
                };
                let mut s = format!(
                    "account {account}: refresh token expired or revoked (invalid_grant: {description}); run `{command}` to get a new one (the running relay picks it up without a restart)"
                );
                if self.provider_hint == ProviderHint::Microsoft {
                    s.push_str(" (or without --device, where a browser can sign in)");
                    s.push_str(&microsoft_invalid_grant_hint(description));
                }
                if self.provider_hint == ProviderHint::Gmail {
                    s.push_str(
                        "; Google expires refresh tokens after 7 days while the OAuth consent screen is External in Testing (publish the app or use an Internal one); they also stop working when access is revoked, the password changes, the token goes unused for 6 months, or too many newer tokens were issued",
                    );
                }
                Some(s)
            }
            RefreshError::InvalidClient { description } => {
                let mut s = format!(
                    "account {account}: the token endpoint rejected the OAuth client (invalid_client: {description}); check client_id and client_secret{} — the refresh token must have been issued to this same client; after changing the client run `{}`",
                    self.in_config(),
                    self.authorize_command()
                );
                if self.provider_hint == ProviderHint::Gmail {
                    s.push_str(
                        "; for Google use the client JSON downloaded from the Cloud console (APIs & Services → Credentials)",
                    );
                }
                Some(s)
            }
            RefreshError::Transient { .. } | RefreshError::Other { .. } => None,
        }
    }

    /// The short reason published to senders (it ends up in SMTP 454 replies).
    fn short_reason(&self, err: &RefreshError) -> String {
        let account = self.account();
        let s = match (self.credential, err) {
            (CredentialKind::ServiceAccount, RefreshError::InvalidGrant { .. }) => format!(
                "Google refused the service account assertion for {account} (invalid_grant); see the relay's log"
            ),
            (CredentialKind::ServiceAccount, RefreshError::InvalidClient { .. }) => format!(
                "the service account for {account} is not allowed domain-wide delegation of https://mail.google.com/ (unauthorized_client)"
            ),
            (CredentialKind::ClientCredentials, RefreshError::InvalidGrant { .. } | RefreshError::InvalidClient { .. }) => format!(
                "OAuth client credentials for {account} rejected by the token endpoint; check client_id/client_secret"
            ),
            (_, err) => self.refresh_token_reason(&account, err),
        };
        one_line(&s, 400)
    }

    fn refresh_token_reason(&self, account: &str, err: &RefreshError) -> String {
        match err {
            RefreshError::InvalidGrant { .. } => format!(
                "OAuth refresh token for {account} expired or revoked (invalid_grant); run `smtp-oauth-relay authorize{}`",
                if self.provider_hint == ProviderHint::Microsoft { " --device" } else { "" }
            ),
            RefreshError::InvalidClient { .. } => format!(
                "OAuth client for {account} rejected by the token endpoint (invalid_client); check client_id/client_secret"
            ),
            other => format!("OAuth token refresh for {account} failed: {other}"),
        }
    }
}

/// What Google's `invalid_grant` description for a service-account assertion means.
fn service_account_hint(description: &str) -> &'static str {
    if description.contains("Signature") {
        "the key in service_account_json was deleted or disabled, or the file was edited: create a new key (IAM & Admin → Service accounts → your account → Keys → Add key → JSON) and point service_account_json at it"
    } else if description.contains("email") || description.contains("User ID") {
        "`username` is not an existing user of the Workspace domain the service account is delegated for: set it to that user's primary address"
    } else if description.contains("iat") || description.contains("timeframe") {
        "this machine's clock is off: check it (`timedatectl`) and enable NTP"
    } else {
        "check that the service account and its key still exist (IAM & Admin → Service accounts) and that `username` is a user of the delegated Workspace domain"
    }
}

/// Microsoft's AADSTS codes for rejected client credentials.
const MICROSOFT_CLIENT_ERRORS: [(&str, &str); 4] = [
    (
        "AADSTS7000215",
        "the client secret is wrong (give its Value, not its Secret ID)",
    ),
    (
        "AADSTS7000222",
        "the client secret has expired: add a new one under Certificates & secrets",
    ),
    (
        "AADSTS700016",
        "no application with this client_id exists in the tenant: check client_id and tenant",
    ),
    ("AADSTS90002", "the tenant was not found: check `tenant`"),
];

/// What Microsoft's AADSTS code in an `invalid_grant` description means (`; …`), or the
/// usual causes when the description carries no code this knows.
fn microsoft_invalid_grant_hint(description: &str) -> String {
    let known: [(&str, &str); 6] = [
        ("AADSTS700082", "the refresh token expired after 90 days without use"),
        ("AADSTS50173", "the user's password was changed or reset, which revokes refresh tokens"),
        ("AADSTS50076", "the tenant now requires multi-factor authentication; sign in again"),
        ("AADSTS65001", "the user or an administrator has not consented to the SMTP.Send permission (or consent was withdrawn)"),
        ("AADSTS50126", "the sign-in failed (wrong credentials)"),
        ("AADSTS70043", "a Conditional Access sign-in frequency policy made the refresh token expire"),
    ];
    match known.iter().find(|(code, _)| description.contains(code)) {
        Some((code, why)) => format!("; Microsoft says {code}: {why}"),
        None => "; Microsoft refresh tokens die after 90 days unused, when the password is changed or reset, when an admin revokes the user's sessions, or under a Conditional Access sign-in frequency policy".to_owned(),
    }
}

/// Full-jitter backoff: uniform in (0, min(cap, base·2^attempt)], at least 100 ms.
pub fn backoff_delay(attempt: u32) -> Duration {
    let ceiling = backoff_ceiling(attempt).as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(100..=ceiling.max(100)))
}

/// The upper bound of `backoff_delay(attempt)`.
pub fn backoff_ceiling(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(20))
        .min(BACKOFF_CAP)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a successful grant into the file; returns whether the refresh token rotated.
fn apply_grant(file: &mut TokenFile, grant: &Grant, requested_at_unix: u64) -> bool {
    let now = unix_now();
    let rotated = grant.refresh_token.is_some();
    if let Some(rt) = &grant.refresh_token {
        file.refresh_token = Some(rt.clone());
        file.refresh_token_issued_at = Some(now);
    }
    if file.refresh_token.is_some() {
        file.refresh_token_rotates = Some(rotated);
    }
    file.access_token = Some(grant.access_token.clone());
    file.expires_at = Some(requested_at_unix.saturating_add(grant.expires_in.as_secs()));
    file.last_refresh_at = Some(now);
    file.last_error = None;
    rotated
}

fn same_secret(a: &Option<SecretString>, b: &Option<SecretString>) -> bool {
    a.as_ref().map(ExposeSecret::expose_secret) == b.as_ref().map(ExposeSecret::expose_secret)
}

/// Starts the refresh-ahead task for one account.
pub struct TokenManager;

impl TokenManager {
    /// Loads the token file (an unreadable file is an error now, not later); publishes
    /// its access token at once if it is valid for more than `refresh_margin`, else the
    /// task refreshes immediately. The task ends when `shutdown` is cancelled.
    pub fn start<R: Refresher>(
        settings: ManagerSettings,
        store: TokenStore,
        refresher: R,
        shutdown: CancellationToken,
    ) -> Result<(TokenHandle, JoinHandle<()>), OAuthError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OAuthError::NoRuntime)?;
        let file = store.load()?;
        let (publisher, handle) = token_channel();
        let mut manager = Manager {
            settings,
            store,
            refresher,
            publisher,
            shutdown,
            file,
            current: None,
            generation: 0,
            last_success: None,
            unsaved_rotation: false,
        };
        let first = manager.adopt_stored_token();
        match &first {
            Some(_) => {
                info!(account = %manager.settings.account(), "using the stored access token")
            }
            None => {
                info!(account = %manager.settings.account(), "no usable stored access token: refreshing now")
            }
        }
        let join = runtime.spawn(manager.run(first.unwrap_or(Next::RefreshAt(Instant::now()))));
        Ok((handle, join))
    }
}

/// What the task does next.
#[derive(Debug)]
enum Next {
    /// Healthy: refresh ahead at this time (or earlier if a sender asks).
    RefreshAt(Instant),
    /// A temporary failure: try again at this time.
    RetryAt { at: Instant, attempt: u32 },
    /// The refresh token (or client) was rejected: wait for a new refresh token on disk.
    WaitForNewGrant,
}

struct Manager<R> {
    settings: ManagerSettings,
    store: TokenStore,
    refresher: R,
    publisher: TokenPublisher,
    shutdown: CancellationToken,
    /// The file as last loaded or saved.
    file: TokenFile,
    current: Option<AccessToken>,
    generation: u64,
    last_success: Option<Instant>,
    /// A rotated refresh token could not be saved: the one in memory is the live one.
    unsaved_rotation: bool,
}

impl<R: Refresher> Manager<R> {
    async fn run(mut self, mut next: Next) {
        loop {
            let step = match next {
                Next::RefreshAt(at) => {
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => None,
                        _ = sleep_until(at) => self.refresh(0).await,
                        _ = self.publisher.refresh_requested() => {
                            match self.last_success.map(|t| t + FORCED_REFRESH_DEBOUNCE) {
                                Some(earliest) if earliest > Instant::now() => {
                                    debug!(account = %self.settings.account(), "refresh request deferred: a new token was fetched moments ago");
                                    Some(Next::RefreshAt(at.min(earliest)))
                                }
                                _ => {
                                    info!(account = %self.settings.account(), "refreshing now: a sender's token was rejected");
                                    self.refresh(0).await
                                }
                            }
                        }
                    }
                }
                Next::RetryAt { at, attempt } => {
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => None,
                        _ = sleep_until(at) => self.refresh(attempt).await,
                    }
                }
                Next::WaitForNewGrant => {
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => None,
                        _ = sleep(FILE_POLL_INTERVAL) => self.check_file().await,
                    }
                }
            };
            match step {
                Some(n) => next = n,
                None => break,
            }
        }
        debug!(account = %self.settings.account(), "token manager stopped");
    }

    /// Publishes the file's access token if it is valid for more than the margin.
    fn adopt_stored_token(&mut self) -> Option<Next> {
        let (Some(secret), Some(expires_unix)) = (&self.file.access_token, self.file.expires_at)
        else {
            return None;
        };
        let now = unix_now();
        let margin = self.settings.refresh_margin;
        if expires_unix <= now.saturating_add(margin.as_secs()) {
            return None;
        }
        let remaining = Duration::from_secs(expires_unix - now);
        let lifetime = self
            .file
            .last_refresh_at
            .filter(|&t| t < expires_unix)
            .map(|t| Duration::from_secs(expires_unix - t))
            .unwrap_or(remaining);
        let expires_at = Instant::now() + remaining;
        self.generation += 1;
        let token = AccessToken::new(secret.clone(), expires_at, self.generation);
        self.current = Some(token.clone());
        self.publisher.publish(TokenState::Ready(token));
        let at = expires_at - margin.min(lifetime / 2);
        Some(Next::RefreshAt(at.max(Instant::now() + MIN_REFRESH_GAP)))
    }

    /// One refresh attempt (`attempt` counts the temporary failures before it).
    /// `None` means shutdown.
    async fn refresh(&mut self, attempt: u32) -> Option<Next> {
        self.pick_up_new_refresh_token().await;
        let refresh_token = self.file.refresh_token.clone();
        let started = Instant::now();
        let started_unix = unix_now();
        let result = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return None,
            r = tokio::time::timeout(REFRESH_DEADLINE, self.refresher.refresh(refresh_token.as_ref())) => {
                r.unwrap_or_else(|_| Err(RefreshError::Transient {
                    detail: format!("no answer from the token endpoint within {} s", REFRESH_DEADLINE.as_secs()),
                }))
            }
        };
        Some(match result {
            Ok(grant) => self.on_success(grant, started, started_unix).await,
            // Only `authorize` cures a dead refresh token; the other credentials are
            // mended outside (a new key, an admin's delegation): keep trying.
            Err(e @ (RefreshError::InvalidGrant { .. } | RefreshError::InvalidClient { .. }))
                if self.settings.credential.uses_refresh_token() =>
            {
                self.on_fatal(e).await
            }
            Err(e) => self.on_retryable(e, attempt).await,
        })
    }

    async fn on_success(&mut self, grant: Grant, started: Instant, started_unix: u64) -> Next {
        let account = self.settings.account();
        let rotated = apply_grant(&mut self.file, &grant, started_unix);
        self.generation += 1;
        let lifetime = grant.expires_in;
        let expires_at = started + lifetime;
        let token = AccessToken::new(grant.access_token, expires_at, self.generation);
        if rotated {
            // The old refresh token may be dead already: save the new one first.
            match self.save().await {
                Ok(()) => {
                    info!(account = %account, "the provider rotated the refresh token; saved it")
                }
                Err(e) => {
                    self.unsaved_rotation = true;
                    error!(
                    account = %account,
                    "the provider ROTATED the refresh token but saving it failed: {e}; the new access token is in use, but after a restart the old refresh token may be rejected — fix the file's directory permissions now, or run `{}` later",
                    self.settings.authorize_command()
                    )
                }
            }
            self.publish_ready(token);
        } else {
            self.publish_ready(token);
            if let Err(e) = self.save().await {
                warn!(account = %account, "access token refreshed but not saved: {e}");
            }
        }
        self.last_success = Some(Instant::now());
        info!(
            account = %account,
            generation = self.generation,
            expires_in_s = lifetime.as_secs(),
            "access token refreshed"
        );
        let at = expires_at - self.settings.refresh_margin.min(lifetime / 2);
        Next::RefreshAt(at.max(Instant::now() + MIN_REFRESH_GAP))
    }

    fn publish_ready(&mut self, token: AccessToken) {
        // Requests made so far came from senders holding an older token, which this one
        // answers: forget them, so that only requests about this token force a refresh.
        let pending = std::pin::pin!(self.publisher.refresh_requested());
        let _ = pending.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        self.current = Some(token.clone());
        self.publisher.publish(TokenState::Ready(token));
    }

    async fn on_retryable(&mut self, err: RefreshError, attempt: u32) -> Next {
        let account = self.settings.account();
        if let Some(remedy) = self.settings.remedy(&err).filter(|_| attempt == 0) {
            error!(account = %account, "{remedy}");
        }
        let delay = backoff_delay(attempt);
        let secs = delay.as_secs_f32();
        if err.is_transient() {
            warn!(account = %account, attempt = attempt + 1, "access token refresh failed: {err}; retrying in {secs:.1} s");
        } else {
            error!(account = %account, attempt = attempt + 1, "access token refresh failed: {err}; retrying in {secs:.1} s");
        }
        let reason = format!(
            "{}; retrying in {} s",
            self.settings.short_reason(&err),
            delay.as_secs().max(1)
        );
        self.publisher.publish(TokenState::Failed {
            last: self.current.clone(),
            reason: Arc::from(one_line(&reason, 400)),
        });
        self.record_error(&err).await;
        Next::RetryAt {
            at: Instant::now() + delay,
            attempt: attempt.saturating_add(1),
        }
    }

    async fn on_fatal(&mut self, err: RefreshError) -> Next {
        let account = self.settings.account();
        if let Some(remedy) = self.settings.remedy(&err) {
            error!(account = %account, "{remedy}");
        }
        self.publisher.publish(TokenState::Failed {
            last: self.current.clone(),
            reason: Arc::from(self.settings.short_reason(&err)),
        });
        self.record_error(&err).await;
        Next::WaitForNewGrant
    }

    async fn record_error(&mut self, err: &RefreshError) {
        self.file.last_error = Some(one_line(&err.to_string(), 300));
        if let Err(e) = self.save().await {
            warn!(account = %self.settings.account(), "cannot record the refresh failure in the token file: {e}");
        }
    }

    /// While the refresh token is dead: has `authorize` (or `token refresh`) written a
    /// new one?
    async fn check_file(&mut self) -> Option<Next> {
        let disk = match self.load().await {
            Ok(f) => f,
            Err(e) => {
                debug!(account = %self.settings.account(), "token file not readable yet: {e}");
                return Some(Next::WaitForNewGrant);
            }
        };
        if same_secret(&disk.refresh_token, &self.file.refresh_token) {
            return Some(Next::WaitForNewGrant);
        }
        info!(account = %self.settings.account(), "the token file has a new refresh token: using it");
        self.file = disk;
        self.unsaved_rotation = false;
        if let Some(next) = self.adopt_stored_token() {
            return Some(next);
        }
        self.refresh(0).await
    }

    /// Before a refresh: another process (`authorize`) may have written a new refresh
    /// token; prefer it, unless ours is a rotated one that only lives in memory.
    async fn pick_up_new_refresh_token(&mut self) {
        if self.unsaved_rotation {
            return;
        }
        let Ok(disk) = self.load().await else {
            return;
        };
        if !same_secret(&disk.refresh_token, &self.file.refresh_token) {
            info!(account = %self.settings.account(), "the token file has a new refresh token: using it");
            self.file.refresh_token = disk.refresh_token;
            self.file.refresh_token_issued_at = disk.refresh_token_issued_at;
        }
        self.file.extra = disk.extra;
    }

    async fn load(&self) -> Result<TokenFile, StoreError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.load()).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Read {
                path: self.store.path().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    async fn save(&mut self) -> Result<(), StoreError> {
        let store = self.store.clone();
        let file = self.file.clone();
        let result = match tokio::task::spawn_blocking(move || store.save(&file)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Write {
                path: self.store.path().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
                hint: "",
            }),
        };
        if result.is_ok() {
            self.unsaved_rotation = false;
        }
        result
    }
}

/// `token refresh`: refreshes once and saves the result; returns the new file. A
/// failure is recorded in the file's `last_error` (best effort) and returned.
pub async fn refresh_now<R: Refresher>(
    store: &TokenStore,
    refresher: &R,
) -> Result<TokenFile, OAuthError> {
    let mut file = store.load()?;
    let started_unix = unix_now();
    match refresher.refresh(file.refresh_token.as_ref()).await {
        Ok(grant) => {
            let rotated = apply_grant(&mut file, &grant, started_unix);
            store
                .save(&file)
                .map_err(|source| OAuthError::NotSaved { source, rotated })?;
            Ok(file)
        }
        Err(e) => {
            file.last_error = Some(one_line(&e.to_string(), 300));
            if let Err(se) = store.save(&file) {
                warn!("cannot record the refresh failure in the token file: {se}");
            }
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::TokenUnavailable;
    use secrecy::SecretString;
    use std::{
        collections::VecDeque,
        io::Write,
        sync::{
            atomic::{AtomicU64, Ordering},
            Mutex,
        },
    };

    const RT: &str = "1//0refresh-SECRET-abc";
    const RT2: &str = "1//0refresh-SECRET-new";
    const ROTATED: &str = "1//0refresh-SECRET-rotated";

    enum Step {
        Reply(Result<Grant, RefreshError>),
        /// Answer after this long.
        Slow(Duration, Result<Grant, RefreshError>),
        Hang,
    }

    fn grant(access: &str, secs: u64) -> Result<Grant, RefreshError> {
        Ok(Grant {
            access_token: SecretString::from(access.to_owned()),
            expires_in: Duration::from_secs(secs),
            refresh_token: None,
        })
    }

    fn rotated_grant(access: &str, secs: u64) -> Result<Grant, RefreshError> {
        Ok(Grant {
            access_token: SecretString::from(access.to_owned()),
            expires_in: Duration::from_secs(secs),
            refresh_token: Some(SecretString::from(ROTATED.to_owned())),
        })
    }

    fn transient() -> Result<Grant, RefreshError> {
        Err(RefreshError::Transient {
            detail: "HTTP 503 from the token endpoint".into(),
        })
    }

    fn invalid_grant() -> Result<Grant, RefreshError> {
        Err(RefreshError::InvalidGrant {
            description: "Token has been expired or revoked.".into(),
        })
    }

    /// An in-memory token endpoint: scripted replies, then 3600 s tokens
    /// "ya29.SECRET-<n>"; records when it was called and with which refresh token.
    #[derive(Clone, Default)]
    struct Fake {
        steps: Arc<Mutex<VecDeque<Step>>>,
        calls: Arc<Mutex<Vec<(Instant, String)>>>,
        n: Arc<AtomicU64>,
    }

    impl Fake {
        fn with(steps: Vec<Step>) -> Self {
            let f = Fake::default();
            f.steps.lock().unwrap().extend(steps);
            f
        }
        fn push(&self, step: Step) {
            self.steps.lock().unwrap().push_back(step);
        }
        fn count(&self) -> usize {
            self.calls.lock().unwrap().len()
        }
        fn call_times(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().iter().map(|c| c.0).collect()
        }
    }

    impl Refresher for Fake {
        fn refresh(
            &self,
            refresh_token: Option<&SecretString>,
        ) -> impl std::future::Future<Output = Result<Grant, RefreshError>> + Send {
            self.calls.lock().unwrap().push((
                Instant::now(),
                refresh_token
                    .map(|t| t.expose_secret().to_owned())
                    .unwrap_or_default(),
            ));
            let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
            let step = self.steps.lock().unwrap().pop_front();
            async move {
                match step {
                    Some(Step::Reply(r)) => r,
                    Some(Step::Slow(d, r)) => {
                        sleep(d).await;
                        r
                    }
                    Some(Step::Hang) => std::future::pending().await,
                    None => grant(&format!("ya29.SECRET-{n}"), 3600),
                }
            }
        }
    }

    fn settings() -> ManagerSettings {
        ManagerSettings {
            account: "relay@example.com".into(),
            credential: CredentialKind::RefreshToken,
            refresh_margin: Duration::from_secs(300),
            provider_hint: ProviderHint::Gmail,
            config_path: Some(PathBuf::from("/etc/smtp-oauth-relay.toml")),
        }
    }

    fn store_with(json: &str) -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("token.json"));
        std::fs::write(store.path(), json).unwrap();
        (dir, store)
    }

    fn minimal_store() -> (tempfile::TempDir, TokenStore) {
        store_with(&format!(r#"{{"refresh_token": "{RT}"}}"#))
    }

    /// Waits (in paused time) until a token of at least `generation` is published.
    async fn wait_generation(h: &TokenHandle, generation: u64) -> AccessToken {
        for _ in 0..100_000 {
            if let Ok(t) = h.current() {
                if t.generation >= generation {
                    return t;
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("generation {generation} never came");
    }

    /// Log lines written while the guard lives.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        fn capture(&self) -> tracing::subscriber::DefaultGuard {
            let buf = self.0.clone();
            let sub = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || LogWriter(buf.clone()))
                .finish();
            tracing::subscriber::set_default(sub)
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    struct LogWriter(Arc<Mutex<Vec<u8>>>);

    impl Write for LogWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_at_min_of_margin_and_half_lifetime() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![
            Step::Reply(grant("ya29.SECRET-a", 3599)),
            Step::Reply(grant("ya29.SECRET-b", 4)),
            Step::Reply(grant("ya29.SECRET-c", 4)),
            Step::Reply(grant("ya29.SECRET-d", 4)),
        ]);
        let stop = CancellationToken::new();
        let (h, join) = TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        assert_eq!(wait_generation(&h, 1).await.secret(), "ya29.SECRET-a");
        wait_generation(&h, 4).await;
        let t = fake.call_times();
        assert_eq!(
            t[1] - t[0],
            Duration::from_secs(3299),
            "3599 s token, 300 s margin"
        );
        assert_eq!(
            t[2] - t[1],
            Duration::from_secs(2),
            "4 s token: at half its life"
        );
        assert_eq!(t[3] - t[2], Duration::from_secs(2));
        stop.cancel();
        join.await.unwrap();
    }

    #[tokio::test]
    async fn a_kept_refresh_token_is_recorded_as_not_rotating() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![Step::Reply(grant("ya29.SECRET-a", 3599))]);
        let file = refresh_now(&store, &fake).await.unwrap();
        assert_eq!(file.refresh_token.as_ref().unwrap().expose_secret(), RT);
        assert_eq!(store.load().unwrap().refresh_token_rotates, Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn stored_valid_token_is_published_without_refresh() {
        let now = unix_now();
        let (_d, store) = store_with(&format!(
            r#"{{"refresh_token": "{RT}", "access_token": "ya29.SECRET-stored", "expires_at": {}, "last_refresh_at": {}}}"#,
            now + 3000,
            now - 599
        ));
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        let t = h.current().expect("published at once");
        assert_eq!((t.secret(), t.generation), ("ya29.SECRET-stored", 1));
        sleep(Duration::from_secs(2600)).await;
        assert_eq!(fake.count(), 0);
        let t = wait_generation(&h, 2).await;
        assert_eq!(t.secret(), "ya29.SECRET-1");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn stored_token_near_expiry_is_refreshed_at_once() {
        let now = unix_now();
        let (_d, store) = store_with(&format!(
            r#"{{"refresh_token": "{RT}", "access_token": "ya29.SECRET-stored", "expires_at": {}}}"#,
            now + 200
        ));
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        assert!(matches!(h.current(), Err(TokenUnavailable { .. })));
        let t = h.ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!((t.secret(), t.generation), ("ya29.SECRET-1", 1));
        assert_eq!(fake.count(), 1);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn rotated_refresh_token_is_saved_before_the_access_token_is_published() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![Step::Reply(rotated_grant("ya29.SECRET-a", 3600))]);
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store.clone(), fake.clone(), stop.clone()).unwrap();
        let reader = store.clone();
        // Reads the file the moment the token appears.
        let on_disk = tokio::spawn(async move {
            let t = h.ready(Duration::from_secs(10)).await.unwrap();
            (t, reader.load().unwrap())
        })
        .await
        .unwrap();
        let (token, file) = on_disk;
        assert_eq!(token.secret(), "ya29.SECRET-a");
        assert_eq!(
            file.refresh_token.as_ref().unwrap().expose_secret(),
            ROTATED
        );
        assert_eq!(file.access_token.unwrap().expose_secret(), "ya29.SECRET-a");
        let issued = file
            .refresh_token_issued_at
            .expect("issued_at set on rotation");
        assert!(file.last_refresh_at.is_some() && file.expires_at.is_some());

        // The next refresh uses the rotated token; without rotation it is kept.
        sleep(Duration::from_secs(3301)).await;
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls[1].1, ROTATED);
        let file = store.load().unwrap();
        assert_eq!(
            file.refresh_token.as_ref().unwrap().expose_secret(),
            ROTATED
        );
        assert_eq!(file.refresh_token_issued_at, Some(issued));
        assert_eq!(file.access_token.unwrap().expose_secret(), "ya29.SECRET-2");
        assert_eq!(store.mode(), Some(0o600));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_save_of_rotated_token_is_loud_but_the_token_is_used() {
        let logs = Logs::default();
        let _g = logs.capture();
        let (dir, store) = minimal_store();
        let fake = Fake::with(vec![
            Step::Slow(Duration::from_secs(1), rotated_grant("ya29.SECRET-a", 3600)),
            Step::Reply(grant("ya29.SECRET-b", 3600)),
        ]);
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        sleep(Duration::from_millis(100)).await;
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert_eq!(wait_generation(&h, 1).await.secret(), "ya29.SECRET-a");
        let text = logs.text();
        assert!(
            text.lines()
                .any(|l| l.contains("ERROR") && l.contains("ROTATED") && l.contains("token.json")),
            "{text}"
        );
        // The rotated token (only in memory now) is the one used next.
        wait_generation(&h, 2).await;
        assert_eq!(fake.calls.lock().unwrap()[1].1, ROTATED);
        assert!(!logs.text().contains(ROTATED) && !logs.text().contains(RT));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn forced_refresh_is_single_flight_and_debounced() {
        let (_d, store) = minimal_store();
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        wait_generation(&h, 1).await;
        sleep(FORCED_REFRESH_DEBOUNCE).await;
        fake.push(Step::Slow(
            Duration::from_secs(2),
            grant("ya29.SECRET-forced", 3600),
        ));
        // 20 senders see a 535 at once: one refresh, right away.
        let asked = Instant::now();
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.refresh_after(1, Duration::from_secs(30)).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().unwrap().secret(), "ya29.SECRET-forced");
        }
        assert!(asked.elapsed() < Duration::from_secs(3));
        assert_eq!(fake.count(), 2, "one refresh for twenty requests");
        // The storm leaves nothing behind.
        sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.count(), 2);

        // The new token is rejected too: the next forced refresh waits for the debounce.
        sleep(Duration::from_secs(1)).await;
        fake.push(Step::Reply(grant("ya29.SECRET-again", 3600)));
        let t = h.refresh_after(2, Duration::from_secs(1)).await.unwrap();
        assert_eq!(t.generation, 3, "61 s after the last refresh: honoured");
        let asked = Instant::now();
        assert!(h.refresh_after(3, Duration::from_secs(3)).await.is_err());
        assert_eq!(fake.count(), 3, "not within 10 s of the last success");
        let t = h.refresh_after(3, Duration::from_secs(30)).await.unwrap();
        assert_eq!(t.generation, 4);
        let gap = fake.call_times()[3] - fake.call_times()[2];
        assert_eq!(gap, FORCED_REFRESH_DEBOUNCE, "deferred, not dropped");
        assert!(asked.elapsed() <= FORCED_REFRESH_DEBOUNCE);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_back_off_and_keep_the_valid_token() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![
            Step::Reply(grant("ya29.SECRET-a", 3599)),
            Step::Reply(transient()),
            Step::Reply(transient()),
            Step::Reply(transient()),
            Step::Reply(transient()),
        ]);
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store.clone(), fake.clone(), stop.clone()).unwrap();
        wait_generation(&h, 1).await;
        sleep(Duration::from_millis(3_299_500)).await;
        // The refresh-ahead failed; the old token is still handed out.
        assert!(fake.count() >= 2);
        assert_eq!(h.current().unwrap().secret(), "ya29.SECRET-a");
        assert!(store.load().unwrap().last_error.unwrap().contains("503"));
        let t = wait_generation(&h, 2).await;
        assert_eq!(t.secret(), "ya29.SECRET-6");
        let times = fake.call_times();
        assert_eq!(times.len(), 6);
        for (i, pair) in times[1..].windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            assert!(gap <= backoff_ceiling(i as u32), "retry {i} after {gap:?}");
            assert!(gap >= Duration::from_millis(100));
        }
        assert!(store.load().unwrap().last_error.is_none());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failure_is_the_reason_once_the_token_expired() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![Step::Reply(grant("ya29.SECRET-a", 20))]);
        for _ in 0..100 {
            fake.push(Step::Reply(transient()));
        }
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        wait_generation(&h, 1).await;
        sleep(Duration::from_secs(30)).await;
        let e = h.current().unwrap_err();
        assert!(e.reason.contains("HTTP 503"), "{}", e.reason);
        assert!(e.reason.contains("relay@example.com") && !e.reason.contains('\n'));
        // Backoff keeps the attempts few: 1 + at most ~log2 of the time passed.
        assert!(fake.count() < 12, "{} attempts", fake.count());
        stop.cancel();
    }

    #[test]
    fn backoff_is_full_jitter_doubling_to_five_minutes() {
        assert_eq!(backoff_ceiling(0), Duration::from_secs(1));
        assert_eq!(backoff_ceiling(3), Duration::from_secs(8));
        assert_eq!(backoff_ceiling(8), Duration::from_secs(256));
        assert_eq!(backoff_ceiling(9), Duration::from_secs(300));
        assert_eq!(backoff_ceiling(u32::MAX), Duration::from_secs(300));
        let samples: Vec<_> = (0..200).map(|_| backoff_delay(12)).collect();
        assert!(samples.iter().all(|d| *d <= BACKOFF_CAP));
        assert!(
            samples.iter().any(|d| *d < Duration::from_secs(150)),
            "jitter"
        );
        assert!(
            samples.iter().any(|d| *d > Duration::from_secs(150)),
            "jitter"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_grant_is_reported_once_and_a_new_token_file_recovers() {
        let logs = Logs::default();
        let _g = logs.capture();
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![Step::Reply(invalid_grant())]);
        let stop = CancellationToken::new();
        let (h, join) =
            TokenManager::start(settings(), store.clone(), fake.clone(), stop.clone()).unwrap();
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(fake.count(), 1, "invalid_grant is not retried");
        let e = h.current().unwrap_err();
        assert!(e.reason.contains("invalid_grant"), "{}", e.reason);
        assert!(!e.reason.contains('\n') && e.reason.len() < 400);
        assert_eq!(
            store.load().unwrap().last_error.as_deref(),
            Some("invalid_grant: Token has been expired or revoked.")
        );
        let text = logs.text();
        let errors: Vec<_> = text.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{text}");
        let line = errors[0];
        for needle in [
            "relay@example.com",
            "refresh token expired or revoked (invalid_grant: Token has been expired or revoked.)",
            "run `smtp-oauth-relay authorize --config /etc/smtp-oauth-relay.toml --account relay@example.com`",
            "Google expires refresh tokens after 7 days while the OAuth consent screen is External in Testing",
            "the password changes",
            "6 months",
            "too many newer tokens",
        ] {
            assert!(line.contains(needle), "missing {needle:?} in {line}");
        }

        // `authorize` writes a new refresh token: picked up without a restart.
        let mut file = store.load().unwrap();
        file.refresh_token = Some(SecretString::from(RT2.to_owned()));
        file.last_error = None;
        store.save(&file).unwrap();
        let t = wait_generation(&h, 1).await;
        assert_eq!(t.secret(), "ya29.SECRET-2");
        assert_eq!(fake.calls.lock().unwrap()[1].1, RT2);
        let text = logs.text();
        for secret in [RT, RT2, "ya29.SECRET-2"] {
            assert!(!text.contains(secret), "{secret} logged");
        }
        stop.cancel();
        join.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_client_hints_at_the_client_credentials() {
        let logs = Logs::default();
        let _g = logs.capture();
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![Step::Reply(Err(RefreshError::InvalidClient {
            description: "Unauthorized".into(),
        }))]);
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        sleep(Duration::from_secs(600)).await;
        assert_eq!(fake.count(), 1);
        assert!(h
            .current()
            .unwrap_err()
            .reason
            .contains("client_id/client_secret"));
        let text = logs.text();
        assert!(
            text.lines().any(|l| l.contains("ERROR")
                && l.contains("invalid_client: Unauthorized")
                && l.contains("client_secret in /etc/smtp-oauth-relay.toml")),
            "{text}"
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_is_prompt_while_waiting_and_mid_refresh() {
        let (_d, store) = minimal_store();
        let stop = CancellationToken::new();
        let (h, join) =
            TokenManager::start(settings(), store.clone(), Fake::default(), stop.clone()).unwrap();
        wait_generation(&h, 1).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(10), join)
            .await
            .expect("stopped while waiting")
            .unwrap();

        let stop = CancellationToken::new();
        let (_h, join) = TokenManager::start(
            settings(),
            store,
            Fake::with(vec![Step::Hang]),
            stop.clone(),
        )
        .unwrap();
        sleep(Duration::from_secs(1)).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(10), join)
            .await
            .expect("stopped mid-refresh")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn secrets_never_reach_the_log() {
        let logs = Logs::default();
        let _g = logs.capture();
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![
            Step::Reply(rotated_grant("ya29.SECRET-a", 60)),
            Step::Reply(transient()),
            Step::Reply(Err(RefreshError::Other {
                detail: "cannot understand the token endpoint's reply".into(),
            })),
            Step::Reply(grant("ya29.SECRET-b", 60)),
            Step::Reply(invalid_grant()),
        ]);
        let stop = CancellationToken::new();
        let (h, _join) =
            TokenManager::start(settings(), store, fake.clone(), stop.clone()).unwrap();
        sleep(Duration::from_secs(600)).await;
        assert_eq!(fake.count(), 5);
        let _ = format!("{:?} {:?}", h.current(), fake.calls.lock().unwrap().len());
        let text = logs.text();
        assert!(text.contains("access token refreshed"), "{text}");
        for secret in [RT, ROTATED, "ya29.SECRET-a", "ya29.SECRET-b"] {
            assert!(!text.contains(secret), "{secret} logged:\n{text}");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn start_without_token_file_says_run_authorize() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("missing.json"));
        let e = TokenManager::start(settings(), store, Fake::default(), CancellationToken::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("missing.json") && e.contains("smtp-oauth-relay authorize"),
            "{e}"
        );
    }

    #[test]
    fn start_outside_a_runtime_is_an_error_not_a_panic() {
        let (_d, store) = minimal_store();
        let e = TokenManager::start(settings(), store, Fake::default(), CancellationToken::new());
        assert!(matches!(e, Err(OAuthError::NoRuntime)));
    }

    #[tokio::test]
    async fn refresh_now_saves_the_grant_and_records_failures() {
        let (_d, store) = minimal_store();
        let fake = Fake::with(vec![
            Step::Reply(rotated_grant("ya29.SECRET-a", 3599)),
            Step::Reply(invalid_grant()),
        ]);
        let before = unix_now();
        let file = refresh_now(&store, &fake).await.unwrap();
        assert_eq!(
            file.refresh_token.as_ref().unwrap().expose_secret(),
            ROTATED
        );
        let disk = store.load().unwrap();
        assert_eq!(
            disk.refresh_token_rotates,
            Some(true),
            "token status says it rotates"
        );
        assert_eq!(disk.access_token.unwrap().expose_secret(), "ya29.SECRET-a");
        let exp = disk.expires_at.unwrap();
        assert!(exp >= before + 3599 && exp <= unix_now() + 3599);
        assert!(disk.refresh_token_issued_at.is_some() && disk.last_refresh_at.is_some());

        let e = refresh_now(&store, &fake).await.unwrap_err();
        assert!(matches!(
            e,
            OAuthError::Refresh(RefreshError::InvalidGrant { .. })
        ));
        assert!(!e.to_string().contains(ROTATED));
        let disk = store.load().unwrap();
        assert_eq!(
            disk.last_error.as_deref(),
            Some("invalid_grant: Token has been expired or revoked.")
        );
        assert_eq!(
            disk.refresh_token.as_ref().unwrap().expose_secret(),
            ROTATED
        );
    }

    #[test]
    fn remedy_texts() {
        let mut s = settings();
        let ig = RefreshError::InvalidGrant {
            description: "Token has been expired or revoked.".into(),
        };
        assert!(s.remedy(&ig).unwrap().contains("7 days"));
        s.provider_hint = ProviderHint::Custom;
        s.config_path = None;
        let r = s.remedy(&ig).unwrap();
        assert!(!r.contains("Google"), "{r}");
        assert!(r.contains("run `smtp-oauth-relay authorize --account relay@example.com`"));
        assert!(s
            .remedy(&RefreshError::Transient { detail: "x".into() })
            .is_none());
        s.provider_hint = ProviderHint::Microsoft;
        let r = s
            .remedy(&RefreshError::InvalidGrant {
                description: "AADSTS700082: The refresh token has expired due to inactivity."
                    .into(),
            })
            .unwrap();
        assert!(
            r.contains("authorize --account relay@example.com --device")
                && r.contains("AADSTS700082: the refresh token expired after 90 days")
                && !r.contains("Google"),
            "{r}"
        );
        let r = s
            .remedy(&RefreshError::InvalidGrant {
                description: "AADSTS50173: The provided grant has expired due to it being revoked."
                    .into(),
            })
            .unwrap();
        assert!(r.contains("password was changed"), "{r}");
        let r = s
            .remedy(&RefreshError::InvalidGrant {
                description: "something else".into(),
            })
            .unwrap();
        assert!(r.contains("90 days unused"), "{r}");
        assert_eq!(
            ManagerSettings::new("a").refresh_margin,
            DEFAULT_REFRESH_MARGIN
        );
    }
}
