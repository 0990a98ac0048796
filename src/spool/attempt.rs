//! One delivery attempt of one queued message, run by a worker task: send the message to
//! its pending recipients, judge each recipient by the upstream's reply (2xx delivered,
//! 4xx deferred, 5xx failed — except Gmail's 550 5.4.5 daily quota, which defers), queue
//! a DSN for the failed ones, persist the new state, log one line, and tell the queue
//! what to do next. Failures of the upstream itself (unreachable, no token, login
//! refused) are not the message's fault: they are reported as such, and the queue holds
//! every message of that upstream (account) until a probe gets through. A sender no
//! account takes any more (the configuration changed since it was queued) is a deferral
//! of the message itself: retried with backoff, bounced only at the queue lifetime.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::Rng;
use tracing::{error, info, warn};

use super::{
    commit::Committer,
    queue::Clock,
    store::{Location, MessageMeta, MessageState, RcptStatus, Store, StoredReply},
    SpoolSettings, Transport,
};
use crate::{
    dsn::{DsnReport, FailedRecipient},
    envelope::{BodyType, Envelope, Message},
    reply::Reply,
    upstream::UpstreamError,
};

/// What a worker needs, shared by all of them.
pub struct Ctx<T> {
    pub settings: SpoolSettings,
    pub store: Arc<Store>,
    pub transport: T,
    pub committer: Committer,
    pub clock: Clock,
}

/// One attempt to run.
pub struct Job {
    pub meta: Arc<MessageMeta>,
    pub loc: Location,
    pub state: MessageState,
    pub data: Option<Bytes>,
    /// The message outlived the queue lifetime: bounce what is pending, send nothing.
    pub expire: bool,
}

/// Why the upstream, not the message, is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    /// Unreachable, TLS, no token, login refused, pool exhausted…
    Down(String),
    /// Gmail's daily sending quota (550 5.4.5).
    Quota(String),
}

/// What the queue does next with the message.
#[derive(Debug)]
pub enum Outcome {
    /// Every recipient delivered or bounced; the message is marked done on disk.
    Finished,
    /// Some recipients remain; the state is persisted.
    Deferred {
        state: MessageState,
        /// `None`: the upstream is to blame (see `trouble`), no backoff of its own.
        retry_in: Option<Duration>,
        trouble: Option<Trouble>,
    },
}

#[derive(Debug)]
pub struct Done {
    pub id: String,
    pub outcome: Outcome,
    /// The attempt reached the upstream and got a transaction outcome (a probe that
    /// succeeded, as far as the upstream's health goes).
    pub upstream_ok: bool,
}

/// Gmail's daily sending limit: defer, don't bounce.
pub fn is_quota(r: &Reply) -> bool {
    r.code == 550 && r.esc == Some([5, 4, 5])
}

/// What one attempt found, per pending recipient (same order).
struct Attempted {
    pending: Vec<String>,
    verdicts: Vec<Verdict>,
    trouble: Option<Trouble>,
    upstream_ok: bool,
    /// Past the queue lifetime: deferrals become failures.
    expired: bool,
}

#[derive(Debug, Clone)]
enum Verdict {
    Delivered(Reply),
    Defer(Reply),
    Fail(Reply),
}

fn judge(r: &Reply) -> Verdict {
    if r.is_positive() {
        Verdict::Delivered(r.clone())
    } else if r.is_transient() || is_quota(r) {
        Verdict::Defer(r.clone())
    } else {
        Verdict::Fail(r.clone())
    }
}

/// Whether an error belongs to the upstream (everyone's problem) rather than to the
/// message. A connection closed or lost inside a transaction (Gmail's routine `421`
/// after many messages) is the message's deferral, not an outage: outages show at
/// connect, TLS, login or as a missing token, and hung servers as timeouts.
fn upstream_trouble(e: &UpstreamError) -> bool {
    use crate::upstream::Stage;
    match e {
        UpstreamError::Rejected { .. }
        | UpstreamError::Indeterminate { .. }
        | UpstreamError::NoRoute { .. } => false,
        UpstreamError::Closing { stage, .. } | UpstreamError::ConnectionLost { stage, .. } => {
            matches!(
                stage,
                Stage::Connect | Stage::Greeting | Stage::Ehlo | Stage::StartTls | Stage::Auth
            )
        }
        _ => true,
    }
}

/// The per-recipient verdicts (in `pending` order), and the trouble, if any.
fn classify(
    pending: &[String],
    result: Result<crate::upstream::SendReport, UpstreamError>,
) -> (Vec<Verdict>, Option<Trouble>) {
    match result {
        Ok(report) => {
            let verdicts: Vec<Verdict> = (0..pending.len())
                .map(|i| match report.recipients.get(i) {
                    Some(o) if !o.accepted => judge(&o.reply),
                    Some(_) => match &report.data {
                        Some(d) => judge(d),
                        None => Verdict::Defer(Reply::new(
                            451,
                            [4, 3, 0],
                            "upstream ended the transaction without a reply to the message",
                        )),
                    },
                    None => Verdict::Defer(Reply::new(
                        451,
                        [4, 3, 0],
                        "upstream gave no reply for this recipient",
                    )),
                })
                .collect();
            let quota = report
                .recipients
                .iter()
                .map(|o| &o.reply)
                .chain(report.data.iter())
                .find(|r| is_quota(r));
            (verdicts, quota.map(|r| Trouble::Quota(r.to_string())))
        }
        Err(e) => {
            let reply = match &e {
                // Accepted under a configuration that routed it: keep it (4xx) until
                // the lifetime runs out or a restart brings an account for it.
                UpstreamError::NoRoute { sender } => Reply::new(
                    451,
                    [4, 7, 1],
                    format!(
                        "no [[account]] takes mail from sender <{sender}> any more (the configuration changed since it was queued)"
                    ),
                ),
                _ => e.reply(),
            };
            let trouble = if is_quota(&reply) {
                Some(Trouble::Quota(reply.to_string()))
            } else if upstream_trouble(&e) {
                Some(Trouble::Down(e.to_string()))
            } else {
                None
            };
            let v = if trouble.is_some() || matches!(e, UpstreamError::Indeterminate { .. }) {
                Verdict::Defer(reply)
            } else {
                judge(&reply)
            };
            (vec![v; pending.len()], trouble)
        }
    }
}

/// The delay before attempt `attempts + 1`: `min_retry` doubling per attempt up to
/// `max_retry`, times a jitter factor in [0.75, 1.25).
pub fn retry_delay(attempts: u32, min: Duration, max: Duration) -> Duration {
    let base = min
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max);
    base.mul_f64(rand::rng().random_range(0.75..1.25))
}

fn ms_to_utc(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms as i64).unwrap_or_default()
}

impl<T: Transport> Ctx<T> {
    /// Queues a DSN for `failed` to the sender. `Ok(false)`: no DSN (null sender).
    async fn bounce(
        &self,
        meta: &MessageMeta,
        state: &MessageState,
        data: &[u8],
        failed: &[FailedRecipient],
        expired: bool,
    ) -> Result<bool, super::SpoolError> {
        let remote_mta = self.transport.upstream_host(&meta.sender);
        let dsn = DsnReport {
            reporting_mta: &self.settings.hostname,
            remote_mta: remote_mta
                .as_deref()
                .unwrap_or(&self.settings.upstream_host),
            queue_id: &meta.id,
            original_sender: &meta.sender,
            arrival: ms_to_utc(meta.arrival_ms),
            failed,
            attempts: state.attempts,
            expired_after: expired.then_some(self.settings.max_queue_lifetime),
            last_attempt: (state.last_attempt_ms > 0).then(|| ms_to_utc(state.last_attempt_ms)),
            original: data,
        };
        let (body, eight) = dsn.build(ms_to_utc(self.clock.now_ms()));
        let Some(envelope) = dsn.envelope(eight) else {
            return Ok(false);
        };
        self.committer
            .commit(Message {
                id: crate::ingress::new_message_id(),
                envelope,
                data: Bytes::from(body),
            })
            .await?;
        Ok(true)
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, super::SpoolError> + Send + 'static,
    ) -> Result<R, super::SpoolError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| super::SpoolError::Task(e.to_string()))?
    }

    /// Runs one attempt (or the expiry of a message) and reports the outcome.
    pub async fn run(self: Arc<Self>, job: Job) -> Done {
        let meta = job.meta.clone();
        let id = meta.id.clone();
        let mut state = job.state;
        let data = match job.data {
            Some(d) => d,
            None => {
                let loc = job.loc.clone();
                match self.blocking(move |s| s.read_data(&loc)).await {
                    Ok(d) => Bytes::from(d),
                    // Giving up needs no message bytes: the DSN then lacks its headers.
                    Err(e) if job.expire => {
                        warn!(%id, error = %e, "spool: cannot read an expired message; bouncing without its headers");
                        Bytes::new()
                    }
                    Err(e) => {
                        error!(%id, error = %e, "spool: cannot read a queued message; will retry");
                        state.last_error = Some(e.to_string());
                        return Done {
                            id,
                            outcome: Outcome::Deferred {
                                state,
                                retry_in: Some(self.settings.max_retry),
                                trouble: None,
                            },
                            upstream_ok: false,
                        };
                    }
                }
            }
        };
        let pending: Vec<String> = state.pending().map(|r| r.address.clone()).collect();
        let (verdicts, trouble, upstream_ok) = if pending.is_empty() {
            // Every recipient was settled before a crash kept it from being marked done.
            (Vec::new(), None, false)
        } else if job.expire {
            let v = state
                .pending()
                .map(|r| {
                    Verdict::Fail(r.reply.as_ref().map(Reply::from).unwrap_or_else(|| {
                        Reply::new(
                            451,
                            [4, 4, 7],
                            format!(
                                "delivery time expired: {}",
                                state.last_error.as_deref().unwrap_or("never delivered")
                            ),
                        )
                    }))
                })
                .collect();
            (v, None, false)
        } else {
            let envelope = Envelope {
                sender: meta.sender.clone(),
                recipients: pending.clone(),
                body: if meta.eight_bit {
                    BodyType::EightBitMime
                } else {
                    BodyType::SevenBit
                },
                smtputf8: meta.smtputf8,
            };
            state.attempts += 1;
            state.last_attempt_ms = self.clock.now_ms();
            let result = self.transport.send(&envelope, &data).await;
            let upstream_ok = !matches!(
                &result,
                Err(e) if upstream_trouble(e) || matches!(e, UpstreamError::NoRoute { .. })
            );
            let (v, t) = classify(&pending, result);
            (v, t, upstream_ok)
        };
        let attempted = Attempted {
            pending,
            verdicts,
            trouble,
            upstream_ok,
            expired: job.expire,
        };
        self.conclude(meta, &job.loc.segment, state, &data, attempted)
            .await
    }

    /// Applies the verdicts: DSN for the failed, state for the rest, log line, outcome.
    async fn conclude(
        &self,
        meta: Arc<MessageMeta>,
        segment: &str,
        mut state: MessageState,
        data: &Bytes,
        attempted: Attempted,
    ) -> Done {
        let Attempted {
            pending,
            mut verdicts,
            trouble,
            upstream_ok,
            expired,
        } = attempted;
        let id = meta.id.clone();
        let now = self.clock.now_ms();
        let expiry = meta
            .arrival_ms
            .saturating_add(self.settings.max_queue_lifetime.as_millis() as u64);
        // Past the lifetime, a deferral becomes a failure (unless the upstream is to
        // blame for this very attempt: then the expiry pass bounces it).
        let expired = expired || (now >= expiry && trouble.is_none());
        if expired {
            for v in verdicts.iter_mut() {
                if let Verdict::Defer(r) = v {
                    *v = Verdict::Fail(r.clone());
                }
            }
        }
        let failed: Vec<FailedRecipient> = pending
            .iter()
            .zip(&verdicts)
            .filter_map(|(a, v)| match v {
                Verdict::Fail(r) => Some(FailedRecipient {
                    address: a.clone(),
                    reply: r.clone(),
                }),
                _ => None,
            })
            .collect();
        let mut bounce_note = "-";
        if !failed.is_empty() {
            match self.bounce(&meta, &state, data, &failed, expired).await {
                Ok(true) => bounce_note = "bounce queued for the sender",
                Ok(false) => bounce_note = "no bounce to the null sender",
                Err(e) => {
                    // Without a DSN on disk, nobody is told: keep them pending instead.
                    error!(%id, error = %e, "spool: cannot queue the bounce; recipients stay queued");
                    for v in verdicts.iter_mut() {
                        if let Verdict::Fail(r) = v {
                            *v = Verdict::Defer(r.clone());
                        }
                    }
                    bounce_note = "bounce could not be queued";
                }
            }
        }
        let (mut delivered, mut deferred, mut bounced) = (0, 0, 0);
        let mut last = None;
        for (addr, v) in pending.iter().zip(&verdicts) {
            let Some(r) = state
                .recipients
                .iter_mut()
                .find(|r| &r.address == addr && r.status == RcptStatus::Pending)
            else {
                continue;
            };
            let (status, reply) = match v {
                Verdict::Delivered(x) => {
                    delivered += 1;
                    (RcptStatus::Delivered, x)
                }
                Verdict::Defer(x) => {
                    deferred += 1;
                    (RcptStatus::Pending, x)
                }
                Verdict::Fail(x) => {
                    bounced += 1;
                    (RcptStatus::Failed, x)
                }
            };
            r.status = status;
            r.reply = Some(StoredReply::from(reply));
            if status != RcptStatus::Delivered || last.is_none() {
                last = Some(reply.to_string());
            }
        }
        if deferred > 0 {
            state.last_error = last.clone();
        }
        let to = pending.join(",");
        let reply = last.unwrap_or_default();
        if state.pending().next().is_none() {
            let any_failed = state
                .recipients
                .iter()
                .any(|r| r.status == RcptStatus::Failed);
            let (meta2, state2, data2) = (meta.clone(), state.clone(), data.clone());
            let seg = segment.to_owned();
            let r = self
                .blocking(move |s| {
                    if any_failed {
                        if let Err(e) = s.keep_failed(&meta2, &state2, &data2) {
                            warn!(id = %meta2.id, error = %e, "spool: cannot keep a copy of the bounced message in failed/");
                        }
                    }
                    s.mark_done(&seg, &meta2.id)
                })
                .await;
            if let Err(e) = r {
                warn!(%id, error = %e, "spool: cannot record the message as done; a restart may send it again");
            }
            info!(
                %id, attempt = state.attempts, to = %to, delivered, bounced,
                reply = %reply, next_retry = "none", note = %bounce_note,
                "delivery attempt: {}", if bounced > 0 { "finished with bounces" } else { "delivered" }
            );
            return Done {
                id,
                outcome: Outcome::Finished,
                upstream_ok,
            };
        }
        let retry_in = match &trouble {
            Some(_) => None,
            None => {
                let d = retry_delay(
                    state.attempts,
                    self.settings.min_retry,
                    self.settings.max_retry,
                );
                // The last try happens at expiry, not after it.
                let left = Duration::from_millis(expiry.saturating_sub(now));
                Some(d.min(left))
            }
        };
        state.next_attempt_ms = now + retry_in.map_or(0, |d| d.as_millis() as u64);
        {
            let (id2, st) = (id.clone(), state.clone());
            if let Err(e) = self.blocking(move |s| s.write_state(&id2, &st)).await {
                warn!(%id, error = %e, "spool: cannot save the delivery state; a restart may resend to delivered recipients");
            }
        }
        let next = match (&trouble, retry_in) {
            (Some(Trouble::Down(_)), _) => "when the upstream is back".to_owned(),
            (Some(Trouble::Quota(_)), _) => "when the sending quota allows".to_owned(),
            (None, Some(d)) => format!("in {:.1} s", d.as_secs_f64()),
            (None, None) => "now".to_owned(),
        };
        info!(
            %id, attempt = state.attempts, to = %to, delivered, deferred, bounced,
            reply = %reply, next_retry = %next, note = %bounce_note,
            "delivery attempt: deferred"
        );
        Done {
            id,
            outcome: Outcome::Deferred {
                state,
                retry_in,
                trouble,
            },
            upstream_ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{RecipientOutcome, SendReport, Stage};

    fn rcpts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i}@example.org")).collect()
    }

    #[test]
    fn per_recipient_verdicts() {
        let report = SendReport {
            recipients: vec![
                RecipientOutcome {
                    address: "r0@example.org".into(),
                    reply: Reply::new(250, [2, 1, 5], "OK"),
                    accepted: true,
                },
                RecipientOutcome {
                    address: "r1@example.org".into(),
                    reply: Reply::new(450, [4, 2, 1], "later"),
                    accepted: false,
                },
                RecipientOutcome {
                    address: "r2@example.org".into(),
                    reply: Reply::new(550, [5, 1, 1], "no such user"),
                    accepted: false,
                },
            ],
            data: Some(Reply::new(250, [2, 0, 0], "OK")),
        };
        let (v, t) = classify(&rcpts(3), Ok(report));
        assert!(matches!(v[0], Verdict::Delivered(_)));
        assert!(matches!(v[1], Verdict::Defer(_)));
        assert!(matches!(v[2], Verdict::Fail(_)));
        assert!(t.is_none());
    }

    #[test]
    fn quota_defers_and_upstream_failures_are_trouble() {
        let quota = UpstreamError::Rejected {
            addr: "x".into(),
            stage: Stage::Mail,
            reply: Reply::new(550, [5, 4, 5], "Daily user sending limit exceeded."),
        };
        let (v, t) = classify(&rcpts(2), Err(quota));
        assert!(v.iter().all(|v| matches!(v, Verdict::Defer(_))));
        assert!(matches!(t, Some(Trouble::Quota(_))));
        let down = UpstreamError::Connect {
            addr: "x".into(),
            cause: "refused".into(),
        };
        let (v, t) = classify(&rcpts(1), Err(down));
        assert!(matches!(v[0], Verdict::Defer(_)));
        assert!(matches!(t, Some(Trouble::Down(_))));
        let refused = UpstreamError::Rejected {
            addr: "x".into(),
            stage: Stage::Mail,
            reply: Reply::new(553, [5, 1, 8], "bad sender"),
        };
        let (v, t) = classify(&rcpts(1), Err(refused));
        assert!(matches!(v[0], Verdict::Fail(_)) && t.is_none());
        let lost = UpstreamError::Indeterminate {
            addr: "x".into(),
            cause: "EOF".into(),
        };
        let (v, t) = classify(&rcpts(1), Err(lost));
        assert!(matches!(v[0], Verdict::Defer(_)) && t.is_none());
        let closed_mid = UpstreamError::Closing {
            addr: "x".into(),
            stage: Stage::Rcpt,
            reply: Reply::new(421, [4, 7, 0], "Try again later, closing connection."),
        };
        let (v, t) = classify(&rcpts(1), Err(closed_mid));
        assert!(
            matches!(v[0], Verdict::Defer(_)) && t.is_none(),
            "a message deferral"
        );
        let lost_at_greeting = UpstreamError::ConnectionLost {
            addr: "x".into(),
            stage: Stage::Greeting,
            cause: "EOF".into(),
        };
        let (_, t) = classify(&rcpts(1), Err(lost_at_greeting));
        assert!(matches!(t, Some(Trouble::Down(_))), "an outage");
        let unrouted = UpstreamError::NoRoute {
            sender: "gone@example.com".into(),
        };
        let (v, t) = classify(&rcpts(1), Err(unrouted));
        assert!(t.is_none(), "not an upstream's outage");
        match &v[0] {
            Verdict::Defer(r) => {
                assert_eq!((r.code, r.esc), (451, Some([4, 7, 1])));
                assert!(r.text.contains("gone@example.com"), "{r}");
            }
            other => panic!("kept queued, not bounced: {other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        for _ in 0..50 {
            let d1 = retry_delay(1, min, max);
            assert!(
                d1 >= Duration::from_secs(45) && d1 < Duration::from_secs(75),
                "{d1:?}"
            );
            let d3 = retry_delay(3, min, max);
            assert!(
                d3 >= Duration::from_secs(180) && d3 < Duration::from_secs(300),
                "{d3:?}"
            );
            let d20 = retry_delay(20, min, max);
            assert!(
                d20 >= Duration::from_secs(2700) && d20 < Duration::from_secs(4500),
                "{d20:?}"
            );
        }
    }
}
