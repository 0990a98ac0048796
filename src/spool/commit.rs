//! The group committer: one task that takes messages waiting to be queued, writes all of
//! those that arrived together as one segment (one file fsync plus one directory fsync for
//! the whole batch, on a blocking thread), then tells the queue and answers each sender.
//! While a batch is being fsynced the next one gathers, so under load the fsyncs per
//! message fall towards 2 / (messages per batch).

use std::sync::Arc;

use bytes::Bytes;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    queue::{Event, NewMessage},
    store::{MessageMeta, Store},
    SpoolError,
};
use crate::envelope::{BodyType, Message};

/// At most this many messages…
const MAX_BATCH: usize = 1024;
/// …or bytes in one segment.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Messages waiting for the committer; more make senders wait (back-pressure).
const QUEUE_DEPTH: usize = 4096;

struct Job {
    meta: MessageMeta,
    data: Bytes,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Hands messages to the committer. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Committer {
    /// Queues `msg` durably; returns once it is fsynced (or why it could not be).
    pub async fn commit(&self, msg: Message) -> Result<(), SpoolError> {
        let meta = MessageMeta {
            id: msg.id,
            sender: msg.envelope.sender,
            recipients: msg.envelope.recipients,
            eight_bit: msg.envelope.body == BodyType::EightBitMime,
            smtputf8: msg.envelope.smtputf8,
            arrival_ms: now_ms(),
        };
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Job {
                meta,
                data: msg.data,
                done,
            })
            .await
            .map_err(|_| SpoolError::Stopped)?;
        rx.await.map_err(|_| SpoolError::Stopped)?
    }
}

/// A copy of an I/O error for each message of a failed batch.
fn each(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Io { op, path, source } => SpoolError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        SpoolError::Locked { dir } => SpoolError::Locked { dir: dir.clone() },
        SpoolError::NotFound(s) => SpoolError::NotFound(s.clone()),
        SpoolError::Control(s) => SpoolError::Control(s.clone()),
        SpoolError::Task(s) => SpoolError::Task(s.clone()),
        SpoolError::NotASpool(p) => SpoolError::NotASpool(p.clone()),
        SpoolError::Stopped => SpoolError::Stopped,
    }
}

/// Starts the committer. It ends when every `Committer` is dropped.
pub fn start(
    store: Arc<Store>,
    events: mpsc::UnboundedSender<Event>,
) -> (Committer, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
    let task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut bytes = first.data.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(j) => {
                        bytes += j.data.len();
                        batch.push(j);
                    }
                    Err(_) => break,
                }
            }
            let store = store.clone();
            let written = tokio::task::spawn_blocking(move || {
                let refs: Vec<(MessageMeta, &[u8])> = batch
                    .iter()
                    .map(|j| (j.meta.clone(), &j.data[..]))
                    .collect();
                let r = store.write_segment(&refs);
                (r, batch)
            })
            .await;
            let (result, batch) = match written {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(error = %e, "spool: commit task failed");
                    continue;
                }
            };
            match result {
                Ok((_seg, locs)) => {
                    let mut news = Vec::with_capacity(batch.len());
                    let mut dones = Vec::with_capacity(batch.len());
                    for (job, loc) in batch.into_iter().zip(locs) {
                        news.push(NewMessage {
                            meta: job.meta,
                            loc,
                            data: Some(job.data),
                        });
                        dones.push(job.done);
                    }
                    // Durable now: the queue learns of it before the client does.
                    let _ = events.send(Event::Enqueued(news));
                    for d in dones {
                        let _ = d.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, messages = batch.len(), "spool: cannot write to the queue");
                    for job in batch {
                        let _ = job.done.send(Err(each(&e)));
                    }
                }
            }
        }
    });
    (Committer { tx }, task)
}
