//! The published access token: `TokenManager` writes it, senders read it.
//!
//! Readers take the current token from an `ArcSwap` (no lock); those that must wait (the
//! first token after start, a forced refresh after a 535) wait on a `watch` channel.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

/// An access token and when it stops being valid. `Debug` never shows the secret.
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    /// When the provider says it expires (monotonic clock, so `tokio::time::pause` works).
    pub expires_at: Instant,
    /// Increases by one with every token the manager publishes.
    pub generation: u64,
}

impl AccessToken {
    pub fn new(secret: SecretString, expires_at: Instant, generation: u64) -> Self {
        AccessToken {
            secret,
            expires_at,
            generation,
        }
    }

    /// The bearer token. Only the XOAUTH2 encoder should call this.
    pub fn secret(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Still valid for at least `slack`?
    pub fn valid_for(&self, slack: Duration) -> bool {
        Instant::now() + slack < self.expires_at
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What the manager last published.
#[derive(Debug, Clone)]
pub enum TokenState {
    /// No token yet (the first refresh is under way).
    Pending,
    Ready(AccessToken),
    /// The last refresh failed. `last` is the previous token, usable while it is valid.
    Failed {
        last: Option<AccessToken>,
        reason: Arc<str>,
    },
}

/// Why no usable token can be had; `reason` is fit for a log line and an SMTP reply
/// (it never holds a secret).
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid access token: {reason}")]
pub struct TokenUnavailable {
    pub reason: Arc<str>,
}

/// A token is not handed out when it has less than this left: the upstream may see it
/// after it expired otherwise.
const MIN_REMAINING: Duration = Duration::from_secs(1);

/// The reading side, cloned into every sender.
#[derive(Clone)]
pub struct TokenHandle {
    current: Arc<ArcSwap<TokenState>>,
    changes: watch::Receiver<u64>,
    refresh_wanted: Arc<Notify>,
}

/// The writing side, owned by the `TokenManager`.
pub struct TokenPublisher {
    current: Arc<ArcSwap<TokenState>>,
    changes: watch::Sender<u64>,
    refresh_wanted: Arc<Notify>,
}

/// Creates a connected publisher/handle pair, starting in `Pending`.
pub fn token_channel() -> (TokenPublisher, TokenHandle) {
    let current = Arc::new(ArcSwap::from_pointee(TokenState::Pending));
    let (tx, rx) = watch::channel(0);
    let refresh_wanted = Arc::new(Notify::new());
    (
        TokenPublisher {
            current: current.clone(),
            changes: tx,
            refresh_wanted: refresh_wanted.clone(),
        },
        TokenHandle {
            current,
            changes: rx,
            refresh_wanted,
        },
    )
}

impl TokenPublisher {
    pub fn publish(&self, state: TokenState) {
        self.current.store(Arc::new(state));
        self.changes.send_modify(|n| *n += 1);
    }

    /// The state last published.
    pub fn state(&self) -> Arc<TokenState> {
        self.current.load_full()
    }

    /// Completes when some sender asked for a refresh now (see `TokenHandle::refresh_after`).
    pub async fn refresh_requested(&self) {
        self.refresh_wanted.notified().await
    }
}

impl TokenHandle {
    /// A handle that always returns the same token (benchmarks, tests).
    pub fn fixed(secret: &str, lifetime: Duration) -> TokenHandle {
        let (publisher, handle) = token_channel();
        publisher.publish(TokenState::Ready(AccessToken::new(
            SecretString::from(secret.to_owned()),
            Instant::now() + lifetime,
            1,
        )));
        // Dropping the publisher is fine: waiters then read the state as it stands.
        handle
    }

    /// The current token, if it is valid for a few more seconds. Never waits.
    pub fn current(&self) -> Result<AccessToken, TokenUnavailable> {
        match &**self.current.load() {
            TokenState::Ready(t) if t.valid_for(MIN_REMAINING) => Ok(t.clone()),
            TokenState::Failed { last: Some(t), .. } if t.valid_for(MIN_REMAINING) => Ok(t.clone()),
            TokenState::Failed { reason, .. } => Err(TokenUnavailable {
                reason: reason.clone(),
            }),
            TokenState::Ready(_) => Err(TokenUnavailable {
                reason: "the access token expired and its refresh has not finished yet".into(),
            }),
            TokenState::Pending => Err(TokenUnavailable {
                reason: "the first access token has not arrived yet".into(),
            }),
        }
    }

    /// Waits up to `wait` for a valid token.
    pub async fn ready(&self, wait: Duration) -> Result<AccessToken, TokenUnavailable> {
        self.wait_for(wait, |t| t.valid_for(MIN_REMAINING), true)
            .await
    }

    /// The upstream rejected the token of generation `stale`: asks the manager for a new
    /// one (however many senders ask, it refreshes once) and waits up to `wait` for it.
    pub async fn refresh_after(
        &self,
        stale: u64,
        wait: Duration,
    ) -> Result<AccessToken, TokenUnavailable> {
        if let Ok(t) = self.current() {
            if t.generation > stale {
                return Ok(t);
            }
        }
        self.refresh_wanted.notify_one();
        self.wait_for(
            wait,
            |t| t.generation > stale && t.valid_for(MIN_REMAINING),
            false,
        )
        .await
    }

    /// Waits for a token that is `good`. A published failure ends the wait at once when
    /// `fail_fast` (the manager has already retried; a client should not hang on it), or
    /// from the first change on otherwise (a refresh was just requested: wait for its
    /// outcome, not for the failure from before).
    async fn wait_for(
        &self,
        wait: Duration,
        good: impl Fn(&AccessToken) -> bool,
        mut fail_fast: bool,
    ) -> Result<AccessToken, TokenUnavailable> {
        let mut changes = self.changes.clone();
        let deadline = Instant::now() + wait;
        loop {
            changes.borrow_and_update();
            match &**self.current.load() {
                TokenState::Ready(t) if good(t) => return Ok(t.clone()),
                TokenState::Failed { last: Some(t), .. } if good(t) => return Ok(t.clone()),
                TokenState::Failed { reason, .. } if fail_fast => {
                    return Err(TokenUnavailable {
                        reason: reason.clone(),
                    })
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    fail_fast = true;
                    continue;
                }
                Ok(Err(_)) | Err(_) => {
                    return self.current().and_then(|t| {
                        if good(&t) {
                            Ok(t)
                        } else {
                            Err(TokenUnavailable {
                                reason: "timed out waiting for a refreshed access token".into(),
                            })
                        }
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_first_token() {
        let (p, h) = token_channel();
        assert!(h.current().is_err());
        let waiter = tokio::spawn(async move { h.ready(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.publish(TokenState::Ready(AccessToken::new(
            SecretString::from("t1".to_owned()),
            Instant::now() + Duration::from_secs(3600),
            1,
        )));
        let t = waiter.await.unwrap().unwrap();
        assert_eq!(t.generation, 1);
        assert!(!format!("{t:?}").contains("t1"));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_not_handed_out() {
        let h = TokenHandle::fixed("x", Duration::from_secs(10));
        assert!(h.current().is_ok());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(h.current().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_after_waits_for_newer_generation() {
        let (p, h) = token_channel();
        let tok = |g| {
            TokenState::Ready(AccessToken::new(
                SecretString::from(format!("t{g}")),
                Instant::now() + Duration::from_secs(3600),
                g,
            ))
        };
        p.publish(tok(1));
        let h2 = h.clone();
        let waiter =
            tokio::spawn(async move { h2.refresh_after(1, Duration::from_secs(30)).await });
        p.refresh_requested().await;
        p.publish(tok(2));
        assert_eq!(waiter.await.unwrap().unwrap().generation, 2);
        // Timeout when nobody publishes.
        let r = h.refresh_after(2, Duration::from_secs(5)).await;
        assert!(r.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_published_failure_ends_the_wait() {
        let (p, h) = token_channel();
        p.publish(TokenState::Failed {
            last: None,
            reason: "invalid_grant".into(),
        });
        let started = Instant::now();
        let e = h.ready(Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(&*e.reason, "invalid_grant");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait on a known failure"
        );

        // After a forced refresh request, the old failure does not count: its outcome does.
        let h2 = h.clone();
        let waiter =
            tokio::spawn(async move { h2.refresh_after(0, Duration::from_secs(30)).await });
        p.refresh_requested().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        p.publish(TokenState::Failed {
            last: None,
            reason: "still revoked".into(),
        });
        assert_eq!(&*waiter.await.unwrap().unwrap_err().reason, "still revoked");
    }
}
