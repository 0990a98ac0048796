//! Synchronous delivery (no spool): each message goes through the upstream pool while the
//! client waits, and the client's DATA reply is the upstream's own. Recipients the
//! upstream refused, when others received the message, are reported to the sender with
//! a DSN, so a 250 never hides a lost recipient.

use std::time::Instant;

use chrono::Utc;
use tracing::{error, info, warn};

use crate::{
    dsn::{DsnReport, FailedRecipient},
    envelope::{Deliver, Message},
    reply::Reply,
    route::Upstreams,
    spool::Transport,
    upstream::{SendReport, UpstreamError},
};

/// The `Deliver` implementation of the daemon without a spool.
pub struct Relay {
    /// Every account's pool, chosen per message by envelope sender.
    upstreams: Upstreams,
    /// Our host name, for DSNs.
    hostname: String,
}

impl Relay {
    pub fn new(upstreams: Upstreams, hostname: String) -> Self {
        Relay {
            upstreams,
            hostname,
        }
    }

    /// The upstream host a sender's mail goes to (logs, DSN Remote-MTA).
    fn upstream_host(&self, sender: &str) -> &str {
        self.upstreams
            .route(sender)
            .map_or("upstream", |r| r.host.as_str())
    }

    /// Turns the upstream's answers into the one reply the client gets, sending a DSN
    /// for refused recipients when others were delivered.
    async fn conclude(&self, msg: &Message, result: Result<SendReport, UpstreamError>) -> Reply {
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                let reply = e.reply();
                if reply.is_permanent() {
                    warn!(id = %msg.id, error = %e, "upstream refused the message");
                } else {
                    warn!(id = %msg.id, error = %e, "upstream delivery failed; client told to retry");
                }
                return reply;
            }
        };
        let refused: Vec<FailedRecipient> = report
            .recipients
            .iter()
            .filter(|r| !r.accepted)
            .map(|r| FailedRecipient {
                address: r.address.clone(),
                reply: r.reply.clone(),
            })
            .collect();
        let data_reply = match report.data {
            Some(d) => d,
            None => {
                // Nobody accepted: the client gets a refusal it can act on. If any refusal
                // was temporary, a retry may succeed, so the reply is temporary.
                return refused
                    .iter()
                    .find(|f| f.reply.is_transient())
                    .or_else(|| refused.first())
                    .map(|f| f.reply.clone())
                    .unwrap_or_else(|| {
                        Reply::new(
                            451,
                            [4, 3, 0],
                            "upstream accepted no recipient; try again later",
                        )
                    });
            }
        };
        if !data_reply.is_positive() || refused.is_empty() {
            return Reply {
                text: format!(
                    "{} [relay id {}]",
                    data_reply.text.replace('\n', " "),
                    msg.id
                ),
                ..data_reply
            };
        }

        // Delivered to some, refused for others: tell the sender about the others.
        let delivered = report.recipients.len() - refused.len();
        let note = self.bounce(msg, &refused).await;
        Reply::new(
            250,
            [2, 0, 0],
            format!(
                "delivered to {delivered} of {} recipients; {} refused by {}, {note} [relay id {}]",
                report.recipients.len(),
                refused.len(),
                self.upstream_host(&msg.envelope.sender),
                msg.id
            ),
        )
    }

    /// Sends a DSN for `refused` to the envelope sender; returns a note for the reply.
    async fn bounce(&self, msg: &Message, refused: &[FailedRecipient]) -> &'static str {
        let dsn = DsnReport {
            reporting_mta: &self.hostname,
            remote_mta: self.upstream_host(&msg.envelope.sender),
            queue_id: &msg.id,
            original_sender: &msg.envelope.sender,
            arrival: Utc::now(),
            failed: refused,
            attempts: 1,
            expired_after: None,
            last_attempt: None,
            original: &msg.data,
        };
        let (body, eight_bit) = dsn.build(Utc::now());
        let Some(envelope) = dsn.envelope(eight_bit) else {
            warn!(id = %msg.id, refused = refused.len(), "recipients refused; no bounce to the null sender");
            return "no bounce for the null sender";
        };
        match self.upstreams.send(&envelope, &body).await {
            Ok(r) if r.data.as_ref().is_some_and(Reply::is_positive) => {
                info!(id = %msg.id, to = %msg.envelope.sender, refused = refused.len(), "bounce sent for refused recipients");
                "bounce sent to the sender"
            }
            Ok(r) => {
                let why = r
                    .data
                    .or_else(|| r.recipients.first().map(|x| x.reply.clone()))
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                error!(id = %msg.id, to = %msg.envelope.sender, reply = %why, "bounce for refused recipients was refused");
                "bounce could not be sent (see the relay log)"
            }
            Err(e) => {
                error!(id = %msg.id, to = %msg.envelope.sender, error = %e, "bounce for refused recipients failed");
                "bounce could not be sent (see the relay log)"
            }
        }
    }
}

impl Deliver for Relay {
    async fn deliver(&self, msg: Message) -> Reply {
        let started = Instant::now();
        let result = self.upstreams.send(&msg.envelope, &msg.data).await;
        let reply = self.conclude(&msg, result).await;
        info!(
            id = %msg.id,
            from = %msg.envelope.sender,
            rcpts = msg.envelope.recipients.len(),
            size = msg.data.len(),
            upstream = %self.upstream_host(&msg.envelope.sender),
            reply = %reply,
            ms = started.elapsed().as_millis() as u64,
            "message"
        );
        reply
    }
}
