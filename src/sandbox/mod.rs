//! The in-process sandbox provider: a faithful fake of Gmail's SMTP submission server
//! (`smtp.gmail.com:587`, STARTTLS + `AUTH XOAUTH2`) and of Google's OAuth token endpoint
//! (`https://oauth2.googleapis.com/token`), both on loopback.
//!
//! It backs `smtp-oauth-relay demo` and every integration test. It answers with Gmail's
//! and Google's own reply texts, enforces the same rules (STARTTLS first, authentication
//! first, token expiry, recipient and size limits) and can be steered through
//! [`SandboxControl`] to misbehave the way the real services do: revoked refresh tokens,
//! token endpoint outages, refused recipients, connections closed after N messages or when
//! idle. A fake kinder than Gmail hides bugs, so this one is not kinder.
//!
//! ```ignore
//! let sb = Sandbox::start(SandboxOptions::default()).await?;
//! // point the relay at sb.smtp_addr (STARTTLS, trust sb.ca_pem, name sb.tls_server_name)
//! // and at sb.token_url with sb.client_id / sb.client_secret / sb.refresh_token, then:
//! let msgs = sb.control.wait_for_messages(1, Duration::from_secs(5)).await;
//! sb.control.revoke_refresh_tokens(); // next refresh: 400 invalid_grant
//! ```
//!
//! Files: `ca.rs` (generated CA and server certificate), `smtp.rs` (fake Gmail),
//! `token.rs` (fake token endpoint), `authorize.rs` (fake authorization endpoint and the
//! code + PKCE exchange, for `authorize`; also as Microsoft's v2.0 endpoints under
//! `/{tenant}/oauth2/v2.0/`, see [`Sandbox::microsoft_url`]), `device.rs` (fake device
//! authorization endpoint, for `authorize --device`), `service.rs` (Google service-account
//! JWT bearer grant and Microsoft client credentials); this file holds the options, the
//! shared state and the
//! control handle.

mod authorize;
mod ca;
mod device;
mod service;
mod smtp;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::distr::Alphanumeric;
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::reply::Reply;

/// Gmail's `SIZE` limit (bytes), advertised in EHLO and enforced at MAIL and DATA.
pub const GMAIL_MAX_MESSAGE_SIZE: usize = 35_882_577;
/// Recipients per message Gmail accepts over SMTP; the next RCPT gets `452 4.5.3`.
pub const GMAIL_MAX_RECIPIENTS: usize = 100;
/// The only OAuth scope the fake token endpoint grants.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// Gmail's access token lifetime (`expires_in`).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3599);
/// How long a connection may stay silent before the fake Gmail closes it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How to start a [`Sandbox`]. `Default` gives Gmail's behaviour on ephemeral loopback ports.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// `expires_in` of issued access tokens; default 3599 s (Gmail's).
    pub token_lifetime: Duration,
    /// Issue a new refresh token on every refresh and invalidate the old one (Microsoft
    /// does this; Google does not). Default false.
    pub rotate_refresh_tokens: bool,
    /// If set, every accepted message is also written as `<dir>/<seq>-<id>.eml`.
    pub message_dir: Option<PathBuf>,
    /// Where the fake Gmail listens; default `127.0.0.1:0`.
    pub smtp_listen: SocketAddr,
    /// Where the fake token endpoint listens; default `127.0.0.1:0`.
    pub token_listen: SocketAddr,
    /// For benchmarks only: a password AUTH PLAIN accepts for the sandbox user, so a
    /// client without XOAUTH2 (Postfix) can be measured against the same fake. Default
    /// `None`: PLAIN always fails, as on Gmail.
    pub plain_password: Option<String>,
    /// The account's address (the XOAUTH2 user); default `relay@sandbox.test`.
    pub username: Option<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        SandboxOptions {
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            rotate_refresh_tokens: false,
            message_dir: None,
            smtp_listen: loopback,
            token_listen: loopback,
            plain_password: None,
            username: None,
        }
    }
}

/// A running sandbox: fake Gmail on `smtp_addr`, fake token endpoint at `token_url`.
///
/// The servers run as tokio tasks; [`Sandbox::shutdown`] or dropping the `Sandbox` stops
/// them (clones of `control` keep working for inspection).
pub struct Sandbox {
    pub smtp_addr: SocketAddr,
    /// `http://127.0.0.1:PORT/token`
    pub token_url: String,
    /// `http://127.0.0.1:PORT/auth`, the fake authorization endpoint (see `authorize.rs`).
    pub auth_url: String,
    /// `http://127.0.0.1:PORT/devicecode`, the fake device authorization endpoint (see
    /// `device.rs`).
    pub device_auth_url: String,
    /// PEM of the generated CA that signed the SMTP server certificate.
    pub ca_pem: String,
    /// `localhost`; the certificate's SANs are `localhost`, `127.0.0.1` and `::1`.
    pub tls_server_name: String,
    /// `relay@sandbox.test`, the only account; the XOAUTH2 user must match it.
    pub username: String,
    pub client_id: String,
    pub client_secret: String,
    /// The initial valid refresh token (`1//sandbox-…`).
    pub refresh_token: String,
    pub control: SandboxControl,
    _stop_on_drop: StopOnDrop,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Sandbox {
    /// Generates the CA and server certificate, binds both listeners and starts serving.
    pub async fn start(opts: SandboxOptions) -> std::io::Result<Sandbox> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let certs = ca::SandboxCa::generate()?;
        let smtp_listener = tokio::net::TcpListener::bind(opts.smtp_listen).await?;
        let token_listener = tokio::net::TcpListener::bind(opts.token_listen).await?;
        let smtp_addr = smtp_listener.local_addr()?;
        let token_addr = token_listener.local_addr()?;

        if let Some(dir) = &opts.message_dir {
            tokio::fs::create_dir_all(dir).await?;
        }

        let refresh_token = new_refresh_token();
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared {
            username: opts
                .username
                .clone()
                .unwrap_or_else(|| "relay@sandbox.test".to_string()),
            client_id: "000000000000-sandbox.apps.googleusercontent.com".to_string(),
            client_secret: format!("GOCSPX-sandbox-{}", random_string(24)),
            message_dir: opts.message_dir.clone(),
            plain_password: opts.plain_password.clone(),
            cancel: cancel.clone(),
            tokens: Mutex::new(TokenState {
                access: HashMap::new(),
                refresh: vec![refresh_token.clone()],
                newest_refresh: refresh_token.clone(),
                lifetime: opts.token_lifetime,
                rotate: opts.rotate_refresh_tokens,
                fail_next: 0,
                fail_status: 503,
            }),
            smtp: Mutex::new(SmtpSettings {
                refused: HashMap::new(),
                close_after_messages: None,
                injected: Vec::new(),
            }),
            idle_timeout_ms: AtomicU64::new(DEFAULT_IDLE_TIMEOUT.as_millis() as u64),
            idle_timeout_changed: Notify::new(),
            messages: Mutex::new(Vec::new()),
            keep_messages: AtomicBool::new(true),
            message_notify: Notify::new(),
            message_seq: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            next_connection_id: AtomicU64::new(0),
            smtp_stats: SmtpCounters::default(),
            token_stats: TokenCounters::default(),
            authz: Mutex::default(),
            device: Mutex::default(),
            service: Mutex::default(),
            token_url: format!("http://{token_addr}/token"),
        });

        let tls = ca::server_config(&certs)?;
        tokio::spawn(smtp::serve(smtp_listener, shared.clone(), tls));
        tokio::spawn(token::serve(token_listener, shared.clone()));

        tracing::debug!(%smtp_addr, %token_addr, "sandbox: started");
        Ok(Sandbox {
            smtp_addr,
            token_url: shared.token_url.clone(),
            auth_url: format!("http://{token_addr}/auth"),
            device_auth_url: format!("http://{token_addr}/devicecode"),
            ca_pem: certs.ca_pem.clone(),
            tls_server_name: "localhost".to_string(),
            username: shared.username.clone(),
            client_id: shared.client_id.clone(),
            client_secret: shared.client_secret.clone(),
            refresh_token,
            control: SandboxControl { shared },
            _stop_on_drop: StopOnDrop(cancel),
        })
    }

    /// Stops both servers and closes every open SMTP connection (without a reply).
    pub fn shutdown(&self) {
        self.control.shared.cancel.cancel();
    }

    /// The OAuth client as Google's console downloads it (`client_secret_*.json`, the
    /// `installed` shape), pointing at the sandbox's authorization and token endpoints
    /// (the consent is given at once, see `authorize.rs`).
    pub fn client_secret_json(&self) -> String {
        let base = self.token_url.trim_end_matches("/token");
        let json = serde_json::json!({
            "installed": {
                "client_id": self.client_id,
                "project_id": "smtp-oauth-relay-sandbox",
                "auth_uri": format!("{base}/auth"),
                "token_uri": self.token_url,
                "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                "client_secret": self.client_secret,
                "redirect_uris": ["http://localhost"],
            }
        });
        serde_json::to_string_pretty(&json).unwrap_or_default()
    }

    /// A rustls client configuration that trusts only the sandbox CA (for tests and the
    /// demo); use it with `tokio_rustls::TlsConnector` and [`Sandbox::tls_server_name`].
    pub fn client_tls_config(&self) -> Arc<rustls::ClientConfig> {
        ca::client_config(&self.ca_pem)
    }
}

/// One message the fake Gmail accepted (answered `250 2.0.0 OK` to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Exactly what arrived between DATA and the final dot (dot-stuffing undone, without
    /// the terminating `.\r\n`), or the concatenated BDAT chunks.
    pub data: Vec<u8>,
    /// The XOAUTH2 user the connection authenticated as.
    pub auth_user: String,
    /// Which connection it came on (1, 2, … in accept order).
    pub connection_id: u64,
    /// `BODY=` parameter of MAIL FROM (`7BIT`, `8BITMIME`, `BINARYMIME`), if given.
    pub body_param: Option<String>,
    /// MAIL FROM carried `SMTPUTF8`.
    pub smtputf8: bool,
    /// Sequence number across the sandbox (1, 2, …), as in the `.eml` file name.
    pub seq: u64,
    /// Random message id, as in the `.eml` file name.
    pub id: String,
}

/// Counters of the fake Gmail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmtpStats {
    pub connections_opened: u64,
    /// Connections open right now.
    pub connections_open: u64,
    /// Highest number of simultaneously open connections seen.
    pub max_concurrent: u64,
    pub tls_handshakes: u64,
    pub auth_ok: u64,
    pub auth_failed: u64,
    /// Messages accepted (250 after DATA / BDAT LAST).
    pub messages: u64,
    /// Commands received per verb (`"MAIL"`, `"RCPT"`, `"NOOP"`, …; `"OTHER"` for the rest).
    pub commands: BTreeMap<String, u64>,
}

/// Counters of the fake token endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenStats {
    /// Every POST to `/token`, whatever its outcome.
    pub refresh_requests: u64,
    /// Access tokens issued (successful refreshes).
    pub tokens_issued: u64,
    /// Requests answered with an injected failure ([`SandboxControl::fail_next_token_requests`]).
    pub failures_injected: u64,
    /// Requests answered `invalid_grant`.
    pub invalid_grant: u64,
    /// Requests answered `invalid_client`.
    pub invalid_client: u64,
}

/// Handle to inspect and steer a running sandbox. Cheap to clone.
#[derive(Clone)]
pub struct SandboxControl {
    shared: Arc<Shared>,
}

impl SandboxControl {
    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Waits until at least `n` messages have been accepted or `timeout` passes, then
    /// returns what there is.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.message_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let msgs = lock(&self.shared.messages);
                if msgs.len() >= n {
                    return msgs.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages();
            }
        }
    }

    /// Forgets the recorded messages (counters are kept).
    pub fn clear_messages(&self) {
        lock(&self.shared.messages).clear();
    }

    /// Whether to keep accepted messages in memory (default true). Benchmarks sending
    /// millions of messages turn it off; counters and `message_dir` still work.
    pub fn set_keep_messages(&self, keep: bool) {
        self.shared.keep_messages.store(keep, Ordering::Relaxed);
    }

    pub fn smtp_stats(&self) -> SmtpStats {
        self.shared.smtp_stats.snapshot()
    }

    pub fn token_stats(&self) -> TokenStats {
        self.shared.token_stats.snapshot()
    }

    /// `RCPT TO:<addr>` (case-insensitive) gets `reply` from now on, e.g.
    /// [`gmail_no_such_user`]. The `<session-id> - gsmtp` tail is not added.
    pub fn refuse_recipient(&self, addr: &str, reply: Reply) {
        lock(&self.shared.smtp)
            .refused
            .insert(addr.to_ascii_lowercase(), reply);
    }

    /// Accept `addr` again after [`SandboxControl::refuse_recipient`].
    pub fn accept_recipient(&self, addr: &str) {
        lock(&self.shared.smtp)
            .refused
            .remove(&addr.to_ascii_lowercase());
    }

    /// The next `n` token requests get HTTP `status` (5xx: Google's HTML error page,
    /// otherwise a JSON error) instead of being processed.
    pub fn fail_next_token_requests(&self, n: u32, status: u16) {
        let mut t = lock(&self.shared.tokens);
        t.fail_next = n;
        t.fail_status = status;
    }

    /// Every refresh token issued so far now gets `400 invalid_grant` "Token has been
    /// expired or revoked." Access tokens already issued keep working until they expire.
    pub fn revoke_refresh_tokens(&self) {
        lock(&self.shared.tokens).refresh.clear();
    }

    /// Access tokens already issued stop working at once (the user revoked the app's
    /// access); the SMTP side answers them like expired ones.
    pub fn revoke_access_tokens(&self) {
        lock(&self.shared.tokens).access.clear();
    }

    /// Mints a new valid refresh token, as a new `authorize` would. Older ones stay valid.
    pub fn issue_refresh_token(&self) -> String {
        let token = new_refresh_token();
        let mut t = lock(&self.shared.tokens);
        t.refresh.push(token.clone());
        t.newest_refresh = token.clone();
        token
    }

    /// The newest refresh token (after rotation, the one that works). After
    /// [`SandboxControl::revoke_refresh_tokens`] it is the newest one, now invalid.
    pub fn current_refresh_token(&self) -> String {
        lock(&self.shared.tokens).newest_refresh.clone()
    }

    /// The key file of the sandbox's Google service account (`service_account_json`),
    /// allowed domain-wide delegation of the Gmail scope for the sandbox user. The
    /// account and its RSA key are created on the first call; later calls return the
    /// same key until [`SandboxControl::delete_service_account_key`].
    pub fn service_account_json(&self) -> std::io::Result<String> {
        service::key_file_json(&self.shared, &self.shared.token_url)
    }

    /// The service account's key is deleted in the console: its assertions get
    /// `invalid_grant` "Invalid JWT Signature."; the next `service_account_json` is a new key.
    pub fn delete_service_account_key(&self) {
        service::delete_key(&self.shared);
    }

    /// A Workspace admin allows (`true`, the default) or removes the service account's
    /// domain-wide delegation; without it assertions get `401 unauthorized_client`.
    pub fn set_domain_wide_delegation(&self, allowed: bool) {
        service::set_delegation(&self.shared, allowed);
    }

    /// `expires_in` of access tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        lock(&self.shared.tokens).lifetime = d;
    }

    /// After `n` messages on one connection, the next command (other than QUIT) gets
    /// `421 4.7.0 Try again later, closing connection.` and the connection is closed, as
    /// Gmail does. `None` (the default) turns it off.
    pub fn close_after_messages(&self, n: Option<u32>) {
        lock(&self.shared.smtp).close_after_messages = n;
    }

    /// The next `verb` command, on any connection, gets `reply` instead of being processed
    /// (one shot; call again to queue more). `verb` is `"EHLO"`, `"AUTH"`, `"MAIL"`,
    /// `"RCPT"`, `"DATA"` (the command, before 354), `"BDAT"`, `"RSET"`, `"NOOP"`, … or
    /// `"DATA-END"`: the reply after the final dot, the message then not being accepted.
    /// A 421 reply also closes the connection. E.g. `451 4.3.0 Mail server temporarily
    /// rejected message.` at DATA-END, or [`gmail_daily_quota_exceeded`] at MAIL.
    pub fn inject_reply(&self, verb: &str, reply: Reply) {
        lock(&self.shared.smtp)
            .injected
            .push((verb.to_ascii_uppercase(), reply));
    }

    /// Closes at once, without a reply, every connection that is between transactions
    /// (no MAIL pending, not in DATA or an AUTH exchange) — as a NAT timeout or Gmail's
    /// silent drop would. Connections inside a transaction are left alone.
    pub fn close_idle_connections(&self) {
        for kill in lock(&self.shared.connections).values() {
            kill.notify_one();
        }
    }

    /// Silence after which the server says `451 4.4.2 Timeout - closing connection.` and
    /// closes (Gmail's text). Default 300 s. Applies at once to open connections, counted
    /// from their last read. Tests that pause tokio's clock and let it auto-advance should
    /// raise it (e.g. `Duration::MAX`), or idle pooled connections get closed.
    pub fn set_idle_timeout(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.shared.idle_timeout_ms.store(ms, Ordering::Relaxed);
        self.shared.idle_timeout_changed.notify_waiters();
    }
}

/// Gmail's reply to RCPT for an address that does not exist (`550 5.1.1`).
pub fn gmail_no_such_user() -> Reply {
    Reply::new(
        550,
        [5, 1, 1],
        "The email account that you tried to reach does not exist. Please try\n\
         double-checking the recipient's email address for typos or\n\
         unnecessary spaces. For more information, go to\n \
         https://support.google.com/mail/?p=NoSuchUser - gsmtp",
    )
}

/// Gmail's reply when the account's daily sending quota is used up (`550 5.4.5`).
pub fn gmail_daily_quota_exceeded() -> Reply {
    Reply::new(
        550,
        [5, 4, 5],
        "Daily user sending limit exceeded. For more information on Gmail's\n\
         sending limits go to\n \
         https://support.google.com/a/answer/166852 - gsmtp",
    )
}

// ---------------------------------------------------------------------------------------
// Shared state (crate-private): read by the SMTP and token servers, written by the control.

pub(crate) struct Shared {
    pub(crate) username: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) message_dir: Option<PathBuf>,
    pub(crate) plain_password: Option<String>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tokens: Mutex<TokenState>,
    pub(crate) smtp: Mutex<SmtpSettings>,
    pub(crate) idle_timeout_ms: AtomicU64,
    /// Wakes waiting connections so a new idle timeout applies at once.
    pub(crate) idle_timeout_changed: Notify,
    pub(crate) messages: Mutex<Vec<ReceivedMessage>>,
    pub(crate) keep_messages: AtomicBool,
    pub(crate) message_notify: Notify,
    pub(crate) message_seq: AtomicU64,
    /// Per open connection: a permit to close if idle (see `close_idle_connections`).
    pub(crate) connections: Mutex<HashMap<u64, Arc<Notify>>>,
    pub(crate) next_connection_id: AtomicU64,
    pub(crate) smtp_stats: SmtpCounters,
    pub(crate) token_stats: TokenCounters,
    /// The fake authorization server (`authorize.rs`).
    pub(crate) authz: Mutex<authorize::AuthzState>,
    /// The fake device authorization server (`device.rs`).
    pub(crate) device: Mutex<device::DeviceState>,
    /// The service account and app-only grants (`service.rs`).
    pub(crate) service: Mutex<service::ServiceState>,
    /// `http://127.0.0.1:PORT/token`.
    pub(crate) token_url: String,
}

impl Shared {
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// Records an accepted message and wakes `wait_for_messages`.
    pub(crate) fn record_message(&self, msg: ReceivedMessage) {
        self.smtp_stats.messages.fetch_add(1, Ordering::Relaxed);
        if self.keep_messages.load(Ordering::Relaxed) {
            lock(&self.messages).push(msg);
        }
        self.message_notify.notify_waiters();
    }

    /// Whether `token` is a live access token (issued here, not expired, not revoked).
    pub(crate) fn access_token_valid(&self, token: &str) -> bool {
        lock(&self.tokens)
            .access
            .get(token)
            .is_some_and(|expiry| Instant::now() < *expiry)
    }
}

pub(crate) struct TokenState {
    /// Access token -> expiry (sandbox clock: `tokio::time::Instant`).
    pub(crate) access: HashMap<String, Instant>,
    /// Valid refresh tokens, oldest first.
    pub(crate) refresh: Vec<String>,
    pub(crate) newest_refresh: String,
    pub(crate) lifetime: Duration,
    pub(crate) rotate: bool,
    pub(crate) fail_next: u32,
    pub(crate) fail_status: u16,
}

pub(crate) struct SmtpSettings {
    /// Lower-cased address -> reply to its RCPT.
    pub(crate) refused: HashMap<String, Reply>,
    pub(crate) close_after_messages: Option<u32>,
    /// One-shot replies by verb (`"MAIL"`, …, `"DATA-END"`), oldest first.
    pub(crate) injected: Vec<(String, Reply)>,
}

impl SmtpSettings {
    pub(crate) fn take_injected(&mut self, verb: &str) -> Option<Reply> {
        if self.injected.is_empty() {
            return None;
        }
        let i = self.injected.iter().position(|(v, _)| v == verb)?;
        Some(self.injected.remove(i).1)
    }
}

/// Verbs counted separately in [`SmtpStats::commands`]; the last slot is "OTHER".
pub(crate) const COUNTED_VERBS: [&str; 14] = [
    "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
    "VRFY", "HELP", "OTHER",
];

#[derive(Default)]
pub(crate) struct SmtpCounters {
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connections_open: AtomicU64,
    pub(crate) max_concurrent: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) auth_ok: AtomicU64,
    pub(crate) auth_failed: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) commands: [AtomicU64; COUNTED_VERBS.len()],
}

impl SmtpCounters {
    pub(crate) fn count_command(&self, verb: &str) {
        let i = COUNTED_VERBS
            .iter()
            .position(|v| *v == verb)
            .unwrap_or(COUNTED_VERBS.len() - 1);
        self.commands[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> SmtpStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SmtpStats {
            connections_opened: get(&self.connections_opened),
            connections_open: get(&self.connections_open),
            max_concurrent: get(&self.max_concurrent),
            tls_handshakes: get(&self.tls_handshakes),
            auth_ok: get(&self.auth_ok),
            auth_failed: get(&self.auth_failed),
            messages: get(&self.messages),
            commands: COUNTED_VERBS
                .iter()
                .zip(&self.commands)
                .filter(|(_, n)| get(n) > 0)
                .map(|(v, n)| (v.to_string(), get(n)))
                .collect(),
        }
    }
}

#[derive(Default)]
pub(crate) struct TokenCounters {
    pub(crate) refresh_requests: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
    pub(crate) failures_injected: AtomicU64,
    pub(crate) invalid_grant: AtomicU64,
    pub(crate) invalid_client: AtomicU64,
}

impl TokenCounters {
    fn snapshot(&self) -> TokenStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TokenStats {
            refresh_requests: get(&self.refresh_requests),
            tokens_issued: get(&self.tokens_issued),
            failures_injected: get(&self.failures_injected),
            invalid_grant: get(&self.invalid_grant),
            invalid_client: get(&self.invalid_client),
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must not cascade).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn random_string(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

pub(crate) fn new_refresh_token() -> String {
    format!("1//sandbox-{}", random_string(40))
}

#[cfg(test)]
mod tests;
