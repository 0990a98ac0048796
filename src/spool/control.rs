//! The control socket (`<dir>/control.sock`, mode 0600) and the `queue` CLI on top of it.
//!
//! Protocol: one JSON request per line, one JSON response per line
//! (`{"op":"list"}`, `{"op":"show","id":"…"}`, `{"op":"flush"}`,
//! `{"op":"delete","ids":["…"]}`, `{"op":"stats"}`). The daemon serves it from the
//! queue's owner task, so `queue` commands never race delivery. With no daemon
//! answering, the CLI takes the spool's lock and reads (or, for `delete`, marks) the
//! files itself; `flush` then has nothing to talk to and says so.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    queue::{offline_item, offline_items, Event, QueueItem, ShowItem, SpoolStats},
    store::{DiskWriter, Store},
    SpoolError,
};

/// A request to the daemon's queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    List,
    Show { id: String },
    Flush,
    Delete { ids: Vec<String> },
    Stats,
}

/// The queue's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Response {
    Items {
        items: Vec<QueueItem>,
    },
    Show(Box<ShowItem>),
    Flushed {
        count: usize,
    },
    Deleted {
        deleted: Vec<String>,
        missing: Vec<String>,
    },
    Stats(SpoolStats),
    Error {
        message: String,
    },
}

/// Serves the control socket until `stop`. A stale socket file is replaced (the caller
/// holds the spool's lock, so no other daemon owns it).
pub fn serve(
    path: PathBuf,
    events: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, SpoolError> {
    let _ = std::fs::remove_file(&path);
    let io = |op| {
        let path = path.clone();
        move |source| SpoolError::Io { op, path, source }
    };
    let listener = UnixListener::bind(&path).map_err(io("bind"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io("chmod"))?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let events = events.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = TokioBufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Err(e) => Response::Error {
                            message: format!("bad request: {e}"),
                        },
                        Ok(req) => {
                            let (tx, rx) = oneshot::channel();
                            if events.send(Event::Control(req, tx)).is_err() {
                                break;
                            }
                            match rx.await {
                                Ok(r) => r,
                                Err(_) => break,
                            }
                        }
                    };
                    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }))
}

/// Sends one request to the daemon serving `dir`. `Ok(None)`: no daemon answers.
pub fn request(dir: &Path, req: &Request) -> Result<Option<Response>, SpoolError> {
    let path = dir.join("control.sock");
    let mut s = match StdUnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(SpoolError::Io {
                op: "connect to",
                path,
                source: e,
            })
        }
    };
    let io = |op| {
        let path = path.clone();
        move |source| SpoolError::Io { op, path, source }
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io("configure"))?;
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line).map_err(io("write to"))?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .map_err(io("read from"))?;
    serde_json::from_str(&resp)
        .map(Some)
        .map_err(|e| SpoolError::Control(format!("bad answer from the daemon: {e}")))
}

/// Answers `req` from the files, when no daemon runs (holding the spool's lock).
pub fn offline(dir: &Path, req: &Request) -> Result<Response, SpoolError> {
    let store = Store::new(dir.to_owned(), Box::new(DiskWriter));
    if !store.queue_dir().is_dir() {
        return Err(SpoolError::NotASpool(dir.to_owned()));
    }
    let _lock = store.lock().map_err(|_| {
        SpoolError::Control(format!(
            "a relay holds the spool {} but does not answer on its control socket; try again",
            dir.display()
        ))
    })?;
    let now_ms = super::queue::Clock::new().now_ms();
    Ok(match req {
        Request::List => Response::Items {
            items: offline_items(&store)?,
        },
        Request::Stats => Response::Error {
            message: "no relay is running on this spool".into(),
        },
        Request::Flush => Response::Error {
            message: "no relay is running on this spool; queued mail is tried when it starts"
                .into(),
        },
        Request::Show { id } => match store
            .scan_readonly()?
            .into_iter()
            .find(|r| &r.meta.id == id)
        {
            None => Response::Error {
                message: format!("no message {id} in the queue"),
            },
            Some(r) => {
                let headers = store
                    .read_data(&r.loc)
                    .map(|d| String::from_utf8_lossy(crate::dsn::header_section(&d)).into_owned())
                    .unwrap_or_default();
                let item = offline_item(&r, now_ms);
                let recipients = r
                    .state
                    .clone()
                    .unwrap_or_else(|| super::store::MessageState::new(&r.meta))
                    .recipients;
                Response::Show(Box::new(ShowItem {
                    item,
                    recipients,
                    headers,
                }))
            }
        },
        Request::Delete { ids } => {
            let live = store.scan_readonly()?;
            let (mut deleted, mut missing) = (Vec::new(), Vec::new());
            for id in ids {
                match live.iter().find(|r| &r.meta.id == id) {
                    Some(r) => {
                        store.mark_done(&r.loc.segment, id)?;
                        deleted.push(id.clone());
                    }
                    None => missing.push(id.clone()),
                }
            }
            Response::Deleted { deleted, missing }
        }
    })
}

/// Through the daemon if one answers, else from the files.
pub fn query(dir: &Path, req: &Request) -> Result<Response, SpoolError> {
    match request(dir, req)? {
        Some(r) => Ok(r),
        None => offline(dir, req),
    }
}

fn when(unix: u64) -> String {
    chrono::DateTime::from_timestamp(unix as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The human form of a response (mailq-like for lists).
pub fn render(resp: &Response) -> String {
    let mut out = String::new();
    match resp {
        Response::Items { items } if items.is_empty() => out.push_str("Mail queue is empty\n"),
        Response::Items { items } => {
            out.push_str(&format!(
                "{:<16} {:>5} {:>9} {:>4} {:<19} {:<8} SENDER / RECIPIENTS\n",
                "ID", "AGE", "SIZE", "TRY", "NEXT ATTEMPT", "STATUS"
            ));
            let mut total = 0;
            for i in items {
                total += i.size;
                out.push_str(&format!(
                    "{:<16} {:>5} {:>9} {:>4} {:<19} {:<8} <{}>\n",
                    i.id,
                    age(i.age_secs),
                    i.size,
                    i.attempts,
                    i.next_attempt.map(when).unwrap_or_else(|| "-".into()),
                    i.status,
                    i.sender
                ));
                if let Some(e) = &i.last_error {
                    out.push_str(&format!("    ({e})\n"));
                }
                for r in &i.recipients {
                    out.push_str(&format!("    -> <{r}>\n"));
                }
            }
            out.push_str(&format!(
                "-- {} KiB in {} message(s)\n",
                total.div_ceil(1024),
                items.len()
            ));
        }
        Response::Show(s) => {
            let i = &s.item;
            out.push_str(&format!(
                "id: {}\narrival: {} ({} ago)\nsize: {}\nsender: <{}>\nattempts: {}\nnext attempt: {}\nstatus: {}\n",
                i.id,
                when(i.arrival),
                age(i.age_secs),
                i.size,
                i.sender,
                i.attempts,
                i.next_attempt.map(when).unwrap_or_else(|| "-".into()),
                i.status
            ));
            if let Some(e) = &i.last_error {
                out.push_str(&format!("last error: {e}\n"));
            }
            for r in &s.recipients {
                out.push_str(&format!(
                    "recipient <{}>: {:?}{}\n",
                    r.address,
                    r.status,
                    r.reply
                        .as_ref()
                        .map(|x| format!(" ({})", crate::reply::Reply::from(x)))
                        .unwrap_or_default()
                ));
            }
            out.push('\n');
            out.push_str(&s.headers);
        }
        Response::Flushed { count } => {
            out.push_str(&format!("flushed: {count} message(s) will be tried now\n"))
        }
        Response::Deleted { deleted, missing } => {
            for d in deleted {
                out.push_str(&format!("{d}: deleted\n"));
            }
            for m in missing {
                out.push_str(&format!("{m}: not in the queue\n"));
            }
        }
        Response::Stats(s) => out.push_str(&format!(
            "queued: {}\nin flight: {}\ncommitted: {}\nbatches: {}\nfsyncs: {} ({:.3} per message)\nfinished: {}\ndeferrals: {}\nupstream: {}\n",
            s.queued, s.in_flight, s.committed, s.batches, s.fsyncs, s.fsyncs_per_message, s.finished, s.deferrals, s.upstream
        )),
        Response::Error { message } => {
            out.push_str(message);
            out.push('\n');
        }
    }
    out
}
