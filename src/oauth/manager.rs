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
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use secrecy::ExposeSecret;
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
    Custom,
}

#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// The account name, as in the config (used in log lines and hints).
    pub account: String,
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
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            provider_hint: ProviderHint::Gmail,
            config_path: None,
        }
    }

    fn account(&self) -> String {
        one_line(&self.account, 120)
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
        match err {
            RefreshError::InvalidGrant { description } => {
                let mut s = format!(
                    "account {account}: refresh token expired or revoked (invalid_grant: {description}); run `{}` to get a new one (the running relay picks it up without a restart)",
                    self.authorize_command()
                );
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
                    match &self.config_path {
                        Some(p) => format!(" in {}", one_line(&p.display().to_string(), 300)),
                        None => String::new(),
                    },
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
        let s = match err {
            RefreshError::InvalidGrant { .. } => format!(
                "OAuth refresh token for {account} expired or revoked (invalid_grant); run `smtp-oauth-relay authorize`"
            ),
            RefreshError::InvalidClient { .. } => format!(
                "OAuth client for {account} rejected by the token endpoint (invalid_client); check client_id/client_secret"
            ),
            other => format!("OAuth token refresh for {account} failed: {other}"),
        };
        one_line(&s, 400)
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
        file.refresh_token = rt.clone();
        file.refresh_token_issued_at = Some(now);
    }
    file.access_token = Some(grant.access_token.clone());
    file.expires_at = Some(requested_at_unix.saturating_add(grant.expires_in.as_secs()));
    file.last_refresh_at = Some(now);
    file.last_error = None;
    rotated
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
                            if self.last_success.is_some_and(|t| t.elapsed() < FORCED_REFRESH_DEBOUNCE) {
                                debug!(account = %self.settings.account(), "refresh request ignored: a new token was fetched moments ago");
                                Some(Next::RefreshAt(at))
                            } else {
                                info!(account = %self.settings.account(), "refreshing now: a sender's token was rejected");
                                self.refresh(0).await
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
            r = tokio::time::timeout(REFRESH_DEADLINE, self.refresher.refresh(&refresh_token)) => {
                r.unwrap_or_else(|_| Err(RefreshError::Transient {
                    detail: format!("no answer from the token endpoint within {} s", REFRESH_DEADLINE.as_secs()),
                }))
            }
        };
        Some(match result {
            Ok(grant) => self.on_success(grant, started, started_unix).await,
            Err(e @ (RefreshError::InvalidGrant { .. } | RefreshError::InvalidClient { .. })) => {
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
        self.current = Some(token.clone());
        self.publisher.publish(TokenState::Ready(token));
    }

    async fn on_retryable(&mut self, err: RefreshError, attempt: u32) -> Next {
        let account = self.settings.account();
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
        if disk.refresh_token.expose_secret() == self.file.refresh_token.expose_secret() {
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
        if disk.refresh_token.expose_secret() != self.file.refresh_token.expose_secret() {
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
    match refresher.refresh(&file.refresh_token).await {
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
