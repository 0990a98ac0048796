//! What travels from ingress to delivery: the envelope, the message bytes, and the
//! `Deliver` trait that turns them into the reply the client sees for DATA.

use std::future::Future;

use bytes::Bytes;

use crate::reply::Reply;

/// The `BODY=` parameter of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

/// The SMTP envelope of one message, as the client gave it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub sender: String,
    /// Forward paths without angle brackets, in the order the client gave them.
    pub recipients: Vec<String>,
    pub body: BodyType,
    /// `SMTPUTF8` was given on MAIL FROM (RFC 6531).
    pub smtputf8: bool,
}

/// One message ready for delivery.
#[derive(Debug, Clone)]
pub struct Message {
    /// Session/queue ID, also in the `Received:` header and in every log line.
    pub id: String,
    pub envelope: Envelope,
    /// The message as it must reach the upstream: our `Received:` header, then the
    /// client's message with dot-stuffing undone and every line ending CRLF. Ends with
    /// CRLF unless empty. No terminating `.` line.
    pub data: Bytes,
}

/// Hands a complete message to delivery and returns the reply for the client's DATA.
///
/// Implementations must never return a 2xx reply unless the message was delivered to
/// every recipient that did not get a bounce, or durably stored.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, message: Message) -> impl Future<Output = Reply> + Send;

    /// A refusal for MAIL FROM `sender` (e.g. no account takes its mail), or `None`.
    fn check_sender(&self, _sender: &str) -> Option<Reply> {
        None
    }
}

/// A `Deliver` that refuses, at MAIL FROM, the senders no configured account takes, and
/// hands everything else to `inner`.
pub struct Routed<D> {
    pub inner: D,
    pub upstreams: crate::route::Upstreams,
}

impl<D: Deliver> Deliver for Routed<D> {
    fn deliver(&self, message: Message) -> impl Future<Output = Reply> + Send {
        self.inner.deliver(message)
    }

    fn check_sender(&self, sender: &str) -> Option<Reply> {
        self.upstreams.refuse_sender(sender)
    }
}
