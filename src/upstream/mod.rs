//! Upstream delivery: one STARTTLS + `AUTH XOAUTH2` connection to the provider (`conn`),
//! and the per-account pool of such connections that the relay sends every message
//! through (`pool`). Errors and their SMTP replies live in `error`.
//!
//! The wire protocol is ours, not `mail-send`'s client: `mail-send` 0.7 drops bytes that
//! follow a reply in the same read, does not dot-stuff a message that starts with `.`,
//! writes a message in many small pieces and has no pipelining. We keep its model
//! (`smtp-proto` for parsing replies) and do the rest in `conn`.

mod conn;
mod error;
mod pool;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod sandbox_tests;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use crate::reply::Reply;

pub use error::{Stage, UpstreamError};
pub use pool::{PoolStats, UpstreamPool, PER_MESSAGE_MAX_CONNECTIONS};

/// How to reach and use one upstream account.
#[derive(Clone)]
pub struct UpstreamSettings {
    pub host: String,
    pub port: u16,
    /// The name the server certificate must carry; usually the same as `host`.
    pub tls_server_name: String,
    /// Our EHLO name.
    pub helo_name: String,
    /// The account, sent as `user=` in XOAUTH2.
    pub username: String,
    /// Built by the caller (webpki roots plus the configured CA file).
    pub tls: Arc<rustls::ClientConfig>,
    /// TCP connect, greeting, TLS handshake and login, together.
    pub connect_timeout: Duration,
    /// Each command's reply, and each write.
    pub command_timeout: Duration,
    /// Connections per account; 0 = no pooling: one connection per message, closed after.
    pub pool_size: usize,
    /// Longest a send waits for a pooled connection.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub max_idle: Duration,
    /// Idle connections older than this get a NOOP before reuse.
    pub noop_after_idle: Duration,
    /// A connection is closed (QUIT) after this many messages.
    pub max_messages_per_connection: u32,
}

impl UpstreamSettings {
    /// Settings with the defaults: 30 s connect, 60 s per command, 4 connections, 30 s
    /// checkout wait, 240 s max idle, NOOP after 5 s idle, 100 messages per connection.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        helo_name: impl Into<String>,
        username: impl Into<String>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        let host = host.into();
        UpstreamSettings {
            tls_server_name: host.clone(),
            host,
            port,
            helo_name: helo_name.into(),
            username: username.into(),
            tls,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(60),
            pool_size: 4,
            checkout_timeout: Duration::from_secs(30),
            max_idle: Duration::from_secs(240),
            noop_after_idle: Duration::from_secs(5),
            max_messages_per_connection: 100,
        }
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl std::fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls_server_name", &self.tls_server_name)
            .field("helo_name", &self.helo_name)
            .field("username", &self.username)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("pool_size", &self.pool_size)
            .field("checkout_timeout", &self.checkout_timeout)
            .field("max_idle", &self.max_idle)
            .field("noop_after_idle", &self.noop_after_idle)
            .field(
                "max_messages_per_connection",
                &self.max_messages_per_connection,
            )
            .finish_non_exhaustive()
    }
}

/// What the upstream said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    /// One per envelope recipient, in envelope order.
    pub recipients: Vec<RecipientOutcome>,
    /// The reply to the final dot; `None` if no recipient was accepted (DATA was then
    /// refused or never sent, and the transaction was reset).
    pub data: Option<Reply>,
}

impl SendReport {
    /// Delivered to at least one recipient (the final dot got a 2xx).
    pub fn delivered(&self) -> bool {
        self.data.as_ref().is_some_and(|r| r.is_positive())
    }
}

/// The upstream's answer to one `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    pub address: String,
    /// The RCPT reply, as the upstream gave it.
    pub reply: Reply,
    pub accepted: bool,
}
