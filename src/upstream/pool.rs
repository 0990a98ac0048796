//! The per-account pool of authenticated upstream connections, deadpool-style: a
//! `Semaphore` bounds the connections in use (so no number of callers ever opens more
//! than `pool_size`; with `pool_size = 0`, a connection per message, at most
//! `PER_MESSAGE_MAX_CONNECTIONS` at once), idle connections wait in a `VecDeque` (most recently used first
//! out, so spare ones age out), and each is recycled — RSET after a failed transaction,
//! NOOP after a quiet spell, dropped when old, dead, told 421, or used up — before reuse.
//!
//! Retries: a connection found dead before its MAIL reply was read is replaced and the
//! send repeated once, transparently; a 535 at login asks the token manager for a fresh
//! token and tries once more; nothing is ever resent after the final dot.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use super::{conn::Connection, error::UpstreamError, SendReport, UpstreamSettings};
use crate::{envelope::Envelope, oauth::TokenHandle};

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections opened (and logged in) since start.
    pub connections_opened: u64,
    /// Connections open now, idle or in use.
    pub connections_open: u64,
    /// Connections waiting in the pool.
    pub idle: usize,
    /// Logins the upstream refused (535 and the like).
    pub auth_failures: u64,
    /// Connection attempts that failed before login (TCP, TLS, greeting, STARTTLS).
    pub connect_failures: u64,
    /// Messages the upstream accepted (final 2xx).
    pub messages_sent: u64,
    /// Sends repeated on a fresh connection because the pooled one was dead.
    pub retries: u64,
    /// Sends whose outcome is unknown (connection lost after the final dot).
    pub indeterminate: u64,
}

#[derive(Default)]
struct Counters {
    connections_opened: AtomicU64,
    connections_open: AtomicU64,
    auth_failures: AtomicU64,
    connect_failures: AtomicU64,
    messages_sent: AtomicU64,
    retries: AtomicU64,
    indeterminate: AtomicU64,
}

/// A connection counted in `connections_open` for as long as it lives.
struct Pooled {
    conn: Connection,
    _open: OpenCount,
}

struct OpenCount(Arc<Counters>);

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

impl Pooled {
    async fn quit(self) {
        let Pooled { conn, _open } = self;
        conn.quit().await;
    }
}

/// With `pool_size = 0` (no pooling), how many one-message connections may be open at
/// once: the default pool size, so turning pooling off never multiplies the connections
/// an account opens (Gmail answers too many concurrent ones with 421 4.7.0).
pub const PER_MESSAGE_MAX_CONNECTIONS: usize = 4;

struct Inner {
    settings: UpstreamSettings,
    addr: String,
    tokens: TokenHandle,
    connector: TlsConnector,
    /// Connections in use (and idle ones): `pool_size`, or `PER_MESSAGE_MAX_CONNECTIONS`.
    permits: Arc<Semaphore>,
    idle: Mutex<VecDeque<Pooled>>,
    closed: AtomicBool,
    counters: Arc<Counters>,
}

/// The connections of one upstream account. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamPool {
    inner: Arc<Inner>,
}

impl UpstreamPool {
    pub fn new(settings: UpstreamSettings, tokens: TokenHandle) -> Self {
        let permits = Arc::new(Semaphore::new(match settings.pool_size {
            0 => PER_MESSAGE_MAX_CONNECTIONS,
            n => n,
        }));
        UpstreamPool {
            inner: Arc::new(Inner {
                addr: settings.addr(),
                connector: TlsConnector::from(settings.tls.clone()),
                idle: Mutex::new(VecDeque::with_capacity(settings.pool_size)),
                settings,
                tokens,
                permits,
                closed: AtomicBool::new(false),
                counters: Arc::default(),
            }),
        }
    }

    /// Opens up to `pool_size` connections now (waiting for the first token if needed),
    /// so the first messages do not pay for TLS and login. Failures are logged only.
    pub async fn warm(&self) {
        if self.inner.settings.pool_size == 0 {
            return;
        }
        let permits = &self.inner.permits;
        if let Err(e) = self
            .inner
            .tokens
            .ready(self.inner.settings.connect_timeout)
            .await
        {
            tracing::warn!(upstream = %self.inner.addr, error = %e, "cannot warm the upstream pool");
            return;
        }
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok(permit) = permits.clone().try_acquire_owned() {
            let pool = self.clone();
            tasks.spawn(async move {
                // Like a send: open only when no connection is idle, so warming twice (or
                // while sends run) never goes past `pool_size`.
                if pool.idle_len() > 0 {
                    return;
                }
                match pool.open().await {
                    Ok(conn) => pool.check_in(conn, permit),
                    Err(e) => {
                        tracing::warn!(upstream = %pool.inner.addr, error = %e, "warming the upstream pool failed")
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Sends one message. `data` is the message without dot-stuffing, lines ending CRLF,
    /// ending with CRLF, without the final dot.
    ///
    /// `Ok` means the transaction ran to its end: look at `report.data` (the reply to the
    /// final dot, which may be a 4xx/5xx; `None` when every recipient was refused) and at
    /// each recipient's outcome. `Err` means no transaction outcome: MAIL or DATA refused
    /// (the upstream's reply, passed on), or a connection, login, pool or token failure,
    /// or `Indeterminate` (lost after the final dot: never resent).
    pub async fn send(
        &self,
        envelope: &Envelope,
        data: &[u8],
    ) -> Result<SendReport, UpstreamError> {
        let permit = self.acquire().await?;
        let mut conn = match self.check_out().await {
            Some(c) => c,
            None => self.open().await?,
        };
        if let Err(e) = conn.conn.check(envelope, data) {
            self.check_in(conn, permit);
            return Err(e);
        }
        match conn.conn.send(envelope, data).await {
            Ok(report) => {
                self.count_report(&report);
                self.check_in(conn, permit);
                Ok(report)
            }
            Err(tx) if tx.retry_on_fresh => {
                tracing::debug!(upstream = %self.inner.addr, error = %tx.error, "pooled connection was dead; resending on a fresh one");
                drop(conn);
                self.inner.counters.retries.fetch_add(1, Relaxed);
                let mut fresh = self.open().await?;
                if let Err(e) = fresh.conn.check(envelope, data) {
                    self.check_in(fresh, permit);
                    return Err(e);
                }
                let result = fresh.conn.send(envelope, data).await;
                if let Ok(report) = &result {
                    self.count_report(report);
                }
                self.check_in(fresh, permit);
                result.map_err(|tx| self.failed(tx.error))
            }
            Err(tx) => {
                self.check_in(conn, permit);
                Err(self.failed(tx.error))
            }
        }
    }

    /// Counters as they stand.
    pub fn stats(&self) -> PoolStats {
        let c = &self.inner.counters;
        PoolStats {
            connections_opened: c.connections_opened.load(Relaxed),
            connections_open: c.connections_open.load(Relaxed),
            idle: self.idle_len(),
            auth_failures: c.auth_failures.load(Relaxed),
            connect_failures: c.connect_failures.load(Relaxed),
            messages_sent: c.messages_sent.load(Relaxed),
            retries: c.retries.load(Relaxed),
            indeterminate: c.indeterminate.load(Relaxed),
        }
    }

    /// Shutdown: QUITs every idle connection; connections in use are closed when their
    /// send finishes. Sends after this still work, on connections that are not kept.
    pub async fn close(&self) {
        self.inner.closed.store(true, Relaxed);
        let idle: Vec<Pooled> = self.lock_idle().drain(..).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for conn in idle {
            tasks.spawn(conn.quit());
        }
        while tasks.join_next().await.is_some() {}
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Pooled>> {
        // A panic while holding this lock leaves a plain queue behind: still usable.
        self.inner.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_len(&self) -> usize {
        self.lock_idle().len()
    }

    fn count_report(&self, report: &SendReport) {
        if report.delivered() {
            self.inner.counters.messages_sent.fetch_add(1, Relaxed);
        }
    }

    fn failed(&self, e: UpstreamError) -> UpstreamError {
        if let UpstreamError::Indeterminate { .. } = e {
            self.inner.counters.indeterminate.fetch_add(1, Relaxed);
            tracing::warn!(upstream = %self.inner.addr, error = %e, "delivery status unknown; not resending");
        }
        e
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        let wait = self.inner.settings.checkout_timeout;
        match tokio::time::timeout(wait, self.inner.permits.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(UpstreamError::PoolTimeout {
                addr: self.inner.addr.clone(),
                waited: wait,
            }),
        }
    }

    /// An idle connection made ready for MAIL, or `None` (open a new one).
    async fn check_out(&self) -> Option<Pooled> {
        let s = &self.inner.settings;
        loop {
            let mut conn = {
                let mut idle = self.lock_idle();
                // Oldest at the front: drop those idle too long (no QUIT: the upstream has
                // most likely closed them already, and this keeps within the bound).
                while idle
                    .front()
                    .is_some_and(|c| c.conn.last_used.elapsed() > s.max_idle)
                {
                    idle.pop_front();
                }
                idle.pop_back()?
            };
            if conn.conn.peer_gone() {
                tracing::debug!(upstream = %self.inner.addr, generation = conn.conn.generation, "idle upstream connection was closed by the server");
                continue;
            }
            match conn.conn.prepare(s.noop_after_idle).await {
                Ok(()) => return Some(conn),
                Err(e) => {
                    tracing::debug!(upstream = %self.inner.addr, error = %e, "idle upstream connection failed its check");
                }
            }
        }
    }

    /// Returns a connection after use: kept if healthy, QUIT if used up or not pooling,
    /// dropped if broken. The permit is released once the connection is idle or gone.
    fn check_in(&self, conn: Pooled, permit: OwnedSemaphorePermit) {
        let s = &self.inner.settings;
        if conn.conn.broken {
            return;
        }
        let keep = s.pool_size > 0
            && !self.inner.closed.load(Relaxed)
            && conn.conn.messages < s.max_messages_per_connection
            && conn.conn.last_used.elapsed() < s.max_idle;
        if keep {
            self.lock_idle().push_back(conn);
            drop(permit);
        } else {
            // QUIT off the caller's path; the permit goes with it so the bound holds.
            tokio::spawn(async move {
                conn.quit().await;
                drop(permit);
            });
        }
    }

    /// Opens and logs in a new connection; after a 5xx login failure, asks for a fresh
    /// token once and tries again.
    async fn open(&self) -> Result<Pooled, UpstreamError> {
        let inner = &self.inner;
        let s = &inner.settings;
        let token = match inner.tokens.current() {
            Ok(t) => t,
            Err(_) => inner.tokens.ready(s.connect_timeout).await?,
        };
        let first = match Connection::open(s, &inner.connector, &token).await {
            Ok(conn) => return Ok(self.track(conn)),
            Err(e) => e,
        };
        match &first {
            UpstreamError::AuthFailed { reply, .. } => {
                inner.counters.auth_failures.fetch_add(1, Relaxed);
                tracing::warn!(upstream = %inner.addr, generation = token.generation, error = %first, "upstream refused the access token");
                if !reply.is_permanent() {
                    return Err(first);
                }
            }
            e => {
                if !matches!(e, UpstreamError::NoToken(_)) {
                    inner.counters.connect_failures.fetch_add(1, Relaxed);
                }
                return Err(first);
            }
        }
        let fresh = match inner
            .tokens
            .refresh_after(token.generation, s.connect_timeout)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(upstream = %inner.addr, error = %e, "no fresh access token after the upstream refused ours");
                return Err(first);
            }
        };
        match Connection::open(s, &inner.connector, &fresh).await {
            Ok(conn) => Ok(self.track(conn)),
            Err(e) => {
                if let UpstreamError::AuthFailed { .. } = e {
                    inner.counters.auth_failures.fetch_add(1, Relaxed);
                } else {
                    inner.counters.connect_failures.fetch_add(1, Relaxed);
                }
                Err(e)
            }
        }
    }

    fn track(&self, conn: Connection) -> Pooled {
        let c = &self.inner.counters;
        c.connections_opened.fetch_add(1, Relaxed);
        c.connections_open.fetch_add(1, Relaxed);
        Pooled {
            conn,
            _open: OpenCount(c.clone()),
        }
    }
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("upstream", &self.inner.addr)
            .field("stats", &self.stats())
            .finish()
    }
}
