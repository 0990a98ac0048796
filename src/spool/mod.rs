//! The durable spool: DATA is answered `250 … queued as ID` only once the message and its
//! envelope are fsynced; delivery workers then take queued messages through the upstream
//! pool, retry 4xx with backoff, bounce 5xx with a DSN, and survive restarts and crashes.
//!
//! Parts: `store` (files on disk and their format), `commit` (the group committer:
//! concurrent messages share one segment file and its two fsyncs), `queue` (the one
//! owner task of the in-memory queue, fed by typed events: scheduling, upstream probe,
//! bounded delivery workers), `attempt` (one delivery attempt and its verdict per
//! recipient), `control` (the Unix control socket and the `queue` CLI).

mod attempt;
mod commit;
pub mod control;
mod queue;
pub mod store;

use std::{path::PathBuf, sync::Arc};

use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::SpoolConfig,
    envelope::{Deliver, Envelope, Message},
    reply::Reply,
    upstream::{SendReport, UpstreamError, UpstreamPool},
};

pub use commit::Committer;
pub use queue::{QueueItem, ShowItem, SpoolStats};
pub use store::{DiskWriter, SpoolWriter, Store};

/// What can go wrong in the spool; [`SpoolError::reply`] is the client's reply.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool directory {} is in use by another running relay (its lock is held)", dir.display())]
    Locked { dir: PathBuf },
    #[error("the spool is shutting down")]
    Stopped,
    #[error("no message {0} in the queue")]
    NotFound(String),
    #[error("control socket: {0}")]
    Control(String),
    #[error("{} is not a spool directory (no queue/ in it); the relay creates it when it first runs with this [spool] dir", .0.display())]
    NotASpool(PathBuf),
    /// A blocking task of the spool died (a bug, not bad input).
    #[error("spool task failed: {0}")]
    Task(String),
}

impl SpoolError {
    /// The reply for the client whose message could not be queued.
    pub fn reply(&self) -> Reply {
        match self {
            SpoolError::Io { .. } | SpoolError::Locked { .. } => Reply::new(
                452,
                [4, 3, 1],
                "Insufficient system storage: the relay cannot queue mail right now; try again later",
            ),
            SpoolError::Stopped => Reply::new(
                421,
                [4, 3, 0],
                "The relay is shutting down; try again later",
            ),
            SpoolError::NotFound(_)
            | SpoolError::Control(_)
            | SpoolError::NotASpool(_)
            | SpoolError::Task(_) => Reply::new(
                451,
                [4, 3, 0],
                "Local error in the relay's queue; try again later",
            ),
        }
    }
}

/// Names the upstream (the account) a message leaves through: the queue holds and probes
/// each one apart, so one account's outage or revoked token does not hold the others.
pub type RouteKey = Arc<str>;

/// Sends one message upstream. The accounts' pools in production; fakes in unit tests.
pub trait Transport: Clone + Send + Sync + 'static {
    fn send(
        &self,
        envelope: &Envelope,
        data: &[u8],
    ) -> impl std::future::Future<Output = Result<SendReport, UpstreamError>> + Send;

    /// The upstream mail from `sender` leaves through; `None` when no upstream takes it
    /// (the configuration changed since it was queued). Must agree with `send`. A
    /// transport with one upstream needs only this default.
    fn route_key(&self, _sender: &str) -> Option<RouteKey> {
        Some(RouteKey::from(""))
    }

    /// The host mail from `sender` goes to, for DSNs (Remote-MTA); `None`: the spool's
    /// `upstream_host`.
    fn upstream_host(&self, _sender: &str) -> Option<String> {
        None
    }
}

impl Transport for UpstreamPool {
    async fn send(&self, envelope: &Envelope, data: &[u8]) -> Result<SendReport, UpstreamError> {
        UpstreamPool::send(self, envelope, data).await
    }
}

/// How the spool runs: the `[spool]` table, plus the names it needs for DSNs.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub config: SpoolConfig,
    /// Our host name (Reporting-MTA in DSNs).
    pub hostname: String,
    /// The upstream host (Remote-MTA in DSNs, logs) when the transport names none.
    pub upstream_host: String,
}

impl std::ops::Deref for SpoolSettings {
    type Target = SpoolConfig;
    fn deref(&self) -> &SpoolConfig {
        &self.config
    }
}

impl SpoolSettings {
    pub fn new(config: SpoolConfig, hostname: &str, upstream_host: &str) -> Self {
        SpoolSettings {
            config,
            hostname: hostname.to_owned(),
            upstream_host: upstream_host.to_owned(),
        }
    }
}

/// A running spool: committer, queue owner and control socket.
pub struct Spool {
    committer: Committer,
    events: mpsc::UnboundedSender<queue::Event>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    store: Arc<Store>,
    _lock: std::fs::File,
}

impl Spool {
    /// Opens the spool (creating it, taking its lock, recovering what a previous run
    /// left), starts the committer, the queue and the control socket. Every recovered
    /// message is tried at once.
    pub async fn start<T: Transport>(
        settings: SpoolSettings,
        transport: T,
        writer: Box<dyn SpoolWriter>,
    ) -> Result<Spool, SpoolError> {
        let store = Arc::new(Store::new(settings.dir.clone(), writer));
        let (lock, recovery) = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || -> Result<_, SpoolError> {
                store.create_dirs()?;
                let lock = store.lock()?;
                let recovery = store.recover()?;
                Ok((lock, recovery))
            })
            .await
            .map_err(|e| SpoolError::Task(format!("start-up: {e}")))??
        };
        if recovery.temp_removed > 0
            || !recovery.corrupt.is_empty()
            || !recovery.messages.is_empty()
        {
            info!(
                dir = %settings.dir.display(),
                queued = recovery.messages.len(),
                temp_removed = recovery.temp_removed,
                corrupt = recovery.corrupt.len(),
                "spool: recovered the queue; trying every message now"
            );
        }
        let stop = CancellationToken::new();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (committer, commit_task) = commit::start(store.clone(), events.clone());
        let owner = queue::start(
            settings.clone(),
            store.clone(),
            transport,
            committer.clone(),
            events.clone(),
            events_rx,
            recovery.messages,
            stop.clone(),
        );
        let mut tasks = vec![commit_task, owner];
        match control::serve(store.socket_path(), events.clone(), stop.clone()) {
            Ok(t) => tasks.push(t),
            Err(e) => {
                warn!(error = %e, "spool: no control socket; `queue` commands will not reach this daemon")
            }
        }
        Ok(Spool {
            committer,
            events,
            stop,
            tasks,
            store,
            _lock: lock,
        })
    }

    /// The `Deliver` for ingress.
    pub fn deliverer(&self) -> SpoolDeliver {
        SpoolDeliver {
            committer: self.committer.clone(),
        }
    }

    /// Counters as they stand.
    pub async fn stats(&self) -> Option<SpoolStats> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.events
            .send(queue::Event::Control(control::Request::Stats, tx))
            .ok()?;
        match rx.await.ok()? {
            control::Response::Stats(s) => Some(s),
            _ => None,
        }
    }

    /// Stops after ingress has stopped: attempts in flight get a short grace period,
    /// then the queue, the committer and the socket stop. Logs the fsync figures.
    pub async fn stop(self) {
        self.stop.cancel();
        drop(self.committer);
        drop(self.events);
        for t in self.tasks {
            if let Err(e) = t.await {
                error!(error = %e, "spool task ended abnormally");
            }
        }
        let _ = std::fs::remove_file(self.store.socket_path());
        let c = &self.store.counters;
        let committed = c.committed.load(std::sync::atomic::Ordering::Relaxed);
        let fsyncs = c.fsyncs.load(std::sync::atomic::Ordering::Relaxed);
        info!(
            committed,
            batches = c.batches.load(std::sync::atomic::Ordering::Relaxed),
            fsyncs,
            fsyncs_per_message = format!("{:.3}", fsyncs as f64 / committed.max(1) as f64),
            "spool stopped"
        );
    }
}

/// The `Deliver` of a daemon with a spool: 250 once durable, 452 4.3.1 if not.
#[derive(Clone)]
pub struct SpoolDeliver {
    committer: Committer,
}

impl Deliver for SpoolDeliver {
    async fn deliver(&self, msg: Message) -> Reply {
        let id = msg.id.clone();
        match self.committer.commit(msg).await {
            Ok(()) => Reply::new(250, [2, 0, 0], format!("Ok: queued as {id}")),
            Err(e) => {
                error!(%id, error = %e, "spool: message not queued; client told to retry");
                e.reply()
            }
        }
    }
}
