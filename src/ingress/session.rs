//! One SMTP server session (RFC 5321 + PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
//! ENHANCEDSTATUSCODES): reads commands, keeps the transaction state, writes replies.
//!
//! Framing is ours, parsing is `smtp-proto`'s: we cut the input at LF ourselves and hand
//! each complete line to `smtp_proto::Request::parse`. (`RequestReceiver` does the same
//! buffering but, after `ResponseTooLong`, parses the rest of the over-long line as a new
//! command, and a few of its error paths do not consume the line up to LF — with our own
//! framing a bad line can never desynchronise the session.)
//!
//! Decisions:
//! - HELO/EHLO is *not* required before MAIL: old printers and scripts skip it, and on a
//!   loopback relay it proves nothing. The `Received:` field then names the peer literal.
//! - Command lines may be up to 4096 bytes (smtp-proto's limit; RFC 5321's 512 is a minimum
//!   that extensions already exceed). Longer lines get `500 5.5.2 Line too long` once their
//!   LF arrives; the session stays usable.
//! - Lines may end in CRLF or a bare LF (as smtp-proto accepts), and MAIL/RCPT addresses
//!   may lack their angle brackets (`MAIL FROM:user@host`, as Postfix allows by default).
//! - Pipelining: every complete command already buffered is answered before we flush; the
//!   replies go out in one write when the input is drained or before any wait (RFC 2920).
//! - MAIL takes SIZE, BODY=7BIT/8BITMIME and SMTPUTF8 (after HELO too); every other
//!   parameter, and any RCPT parameter, gets `555 5.5.4` (nothing else is advertised).
//!   Non-ASCII addresses need SMTPUTF8 (`553 5.6.7`, RFC 6531 3.5).
//! - 20 failed commands in a row end the session with `421 4.7.0`; `452 4.5.3` for
//!   recipients over the limit is not counted (pipelining clients send them all at once).
//! - On shutdown an idle session gets `421 4.3.0` at once; one in a transaction may finish
//!   it within `SHUTDOWN_GRACE` (a DATA already started always finishes and is delivered).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use smtp_proto::request::receiver::MAX_LINE_LENGTH;
use smtp_proto::{Error as ParseError, MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Duration};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::data::{write_received, DataOutcome, DataReader, Protocol, TraceInfo};
use super::{new_message_id, IngressSettings};
use crate::envelope::{BodyType, Deliver, Envelope, Message};
use crate::reply::Reply;

/// After this many consecutive failed commands the client is disconnected.
const MAX_ERRORS: u32 = 20;
/// How long a session with an open transaction may still take after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Read size; the input buffer grows only for pipelined bursts.
const READ_SIZE: usize = 8192;
/// Reads inside DATA are larger: a 100 KiB message then takes 2 reads, not 13.
const DATA_READ_SIZE: usize = 65_536;
/// A "command line" longer than this without LF is junk, not a client: close.
const MAX_OVERLONG: usize = 64 * MAX_LINE_LENGTH;

/// Serves one SMTP connection until QUIT, EOF, a timeout, too many errors or shutdown.
pub async fn run_session<IO, D>(
    io: IO,
    peer: SocketAddr,
    settings: &IngressSettings,
    deliver: &D,
    shutdown: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    D: Deliver,
{
    let started = Instant::now();
    let session_id = new_message_id();
    debug!(%peer, session = %session_id, "SMTP session started");
    let mut session = Session {
        io,
        peer,
        settings,
        deliver,
        shutdown,
        input: BytesMut::with_capacity(READ_SIZE),
        out: Vec::with_capacity(512),
        helo: None,
        tx: None,
        errors: 0,
        messages: 0,
        overlong: 0,
        skip: 0,
    };
    let end = session.run().await;
    // Every reply was written (and awaited) by `run`; dropping the stream closes it, which
    // sends the FIN without a shutdown() syscall of its own (hot with one connection per
    // message).
    info!(
        %peer,
        session = %session_id,
        messages = session.messages,
        duration_ms = started.elapsed().as_millis() as u64,
        end = end.as_str(),
        "SMTP session ended"
    );
}

/// Why a session ended (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Quit,
    Eof,
    IoError,
    Timeout,
    TooManyErrors,
    Shutdown,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Quit => "quit",
            End::Eof => "client closed",
            End::IoError => "i/o error",
            End::Timeout => "timeout",
            End::TooManyErrors => "too many errors",
            End::Shutdown => "shutdown",
        }
    }
}

/// What the caller of `command` must do next.
enum Next {
    Continue,
    /// `354` was sent: read the message text.
    Data,
    Close(End),
}

struct Helo {
    name: String,
    extended: bool,
}

/// An open mail transaction (after a successful MAIL).
struct Transaction {
    id: String,
    envelope: Envelope,
}

struct Session<'a, IO, D> {
    io: IO,
    peer: SocketAddr,
    settings: &'a IngressSettings,
    deliver: &'a D,
    shutdown: &'a CancellationToken,
    /// Bytes read but not yet consumed.
    input: BytesMut,
    /// Replies not yet written.
    out: Vec<u8>,
    helo: Option<Helo>,
    tx: Option<Transaction>,
    /// Consecutive failed commands.
    errors: u32,
    /// Messages accepted by delivery.
    messages: u32,
    /// Bytes of an over-long command line discarded so far (0: not in one).
    overlong: usize,
    /// Bytes still to throw away (the payload of a refused BDAT).
    skip: usize,
}

/// How a read ended.
enum Read {
    Data,
    Eof,
    Failed,
    Timeout,
    Shutdown,
}

impl<IO, D> Session<'_, IO, D>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    D: Deliver,
{
    async fn run(&mut self) -> End {
        self.reply_plain(
            220,
            &format!("{} ESMTP smtp-oauth-relay ready", self.settings.hostname),
        );
        if self.shutdown.is_cancelled() {
            return self.shutting_down().await;
        }
        let mut shutdown_deadline = None;
        loop {
            // Answer every complete command already buffered (pipelining).
            while let Some(line) = self.next_line() {
                match self.command(&line) {
                    Next::Continue => {}
                    Next::Close(end) => {
                        self.flush().await;
                        return end;
                    }
                    Next::Data => {
                        if let Err(end) = self.data().await {
                            return end;
                        }
                    }
                }
            }
            if self.overlong > MAX_OVERLONG {
                self.reply(500, [5, 5, 2], "Line too long");
                let text = format!(
                    "{} Too many errors, closing connection",
                    self.settings.hostname
                );
                self.reply(421, [4, 7, 0], &text);
                self.flush().await;
                return End::TooManyErrors;
            }
            if !self.flush().await {
                return End::IoError;
            }
            if self.shutdown.is_cancelled() {
                if self.tx.is_none() {
                    return self.shutting_down().await;
                }
                // Let the open transaction finish, briefly.
                shutdown_deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            let idle = tokio::time::Instant::now() + self.settings.command_timeout;
            let deadline = shutdown_deadline.map_or(idle, |d: tokio::time::Instant| d.min(idle));
            match self
                .read(deadline, shutdown_deadline.is_none(), READ_SIZE)
                .await
            {
                Read::Data => {}
                Read::Eof => return End::Eof,
                Read::Failed => return End::IoError,
                // Back to the top: an idle session says goodbye there, one in a
                // transaction gets its grace period.
                Read::Shutdown => {}
                Read::Timeout if self.shutdown.is_cancelled() => return self.shutting_down().await,
                Read::Timeout => {
                    let text = format!(
                        "{} Idle timeout, closing connection",
                        self.settings.hostname
                    );
                    self.reply(421, [4, 4, 2], &text);
                    self.flush().await;
                    return End::Timeout;
                }
            }
        }
    }

    /// Says `421 4.3.0` and ends the session.
    async fn shutting_down(&mut self) -> End {
        let text = format!("{} Service shutting down", self.settings.hostname);
        self.reply(421, [4, 3, 0], &text);
        self.flush().await;
        End::Shutdown
    }

    /// Reads up to `size` more bytes, waiting until `deadline` (and for shutdown if
    /// `watch_shutdown`).
    async fn read(
        &mut self,
        deadline: tokio::time::Instant,
        watch_shutdown: bool,
        size: usize,
    ) -> Read {
        if size < self.input.capacity() / 2 && self.input.is_empty() {
            // Back to the small buffer after a message: idle sessions stay small.
            self.input = BytesMut::with_capacity(size);
        }
        self.input.reserve(size);
        let read = timeout_at(deadline, self.io.read_buf(&mut self.input));
        let result = if watch_shutdown {
            tokio::select! {
                r = read => r,
                _ = self.shutdown.cancelled() => return Read::Shutdown,
            }
        } else {
            read.await
        };
        match result {
            Err(_) => Read::Timeout,
            Ok(Ok(0)) => Read::Eof,
            Ok(Ok(_)) => Read::Data,
            Ok(Err(err)) => {
                debug!(peer = %self.peer, error = %err, "read failed");
                Read::Failed
            }
        }
    }

    /// Writes the pending replies in one write. False if the connection is gone, or the
    /// client has not read its replies for `command_timeout`.
    async fn flush(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let write = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        };
        let ok = matches!(
            tokio::time::timeout(self.settings.command_timeout, write).await,
            Ok(Ok(()))
        );
        self.out.clear();
        ok
    }

    /// Takes the next complete command line off the input, handling over-long lines and
    /// refused BDAT payloads on the way. `None` when more input is needed.
    fn next_line(&mut self) -> Option<Bytes> {
        if self.skip > 0 {
            let n = self.skip.min(self.input.len());
            self.input.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return None;
            }
        }
        match memchr::memchr(b'\n', &self.input) {
            Some(pos) => Some(self.input.split_to(pos + 1).freeze()),
            None => {
                if self.input.len() > MAX_LINE_LENGTH {
                    // Keep nothing of an over-long line but the fact that it is one.
                    self.overlong += self.input.len();
                    self.input.clear();
                }
                None
            }
        }
    }

    /// Handles one command line (ending in LF).
    fn command(&mut self, line: &[u8]) -> Next {
        if self.overlong > 0 || line.len() > MAX_LINE_LENGTH {
            self.overlong = 0;
            debug!(peer = %self.peer, "command line too long");
            return self.error(500, [5, 5, 2], "Line too long");
        }
        if memchr::memchr(0, line).is_some() {
            debug!(peer = %self.peer, "NUL in command");
            return self.error(500, [5, 5, 2], "NUL character not allowed in commands");
        }
        let fixed = add_angle_brackets(line);
        let line = fixed.as_deref().unwrap_or(line);
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(err) => return self.parse_error(err, line),
        };
        debug!(peer = %self.peer, command = request.name(), "command");
        match request {
            Request::Ehlo { host } => self.hello(&host, true),
            Request::Helo { host } => self.hello(&host, false),
            Request::Mail { from } => self.mail(from, line),
            Request::Rcpt { to } => self.rcpt(to),
            Request::Data => self.data_command(),
            Request::Rset => {
                self.tx = None;
                self.ok(250, [2, 0, 0], "OK")
            }
            Request::Noop { .. } => self.ok(250, [2, 0, 0], "OK"),
            Request::Quit => {
                let text = format!("{} closing connection", self.settings.hostname);
                self.reply(221, [2, 0, 0], &text);
                Next::Close(End::Quit)
            }
            Request::Vrfy { .. } => self.ok(
                252,
                [2, 5, 0],
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => self.ok(
                214,
                [2, 0, 0],
                "smtp-oauth-relay: commands HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
            ),
            Request::Expn { .. } => self.error(502, [5, 5, 1], "EXPN not available"),
            Request::Auth { .. } => self.error(
                502,
                [5, 5, 1],
                "AUTH not needed: this relay accepts mail from local clients \
                 without authentication",
            ),
            Request::StartTls => self.error(
                502,
                [5, 5, 1],
                "STARTTLS not offered: this relay only accepts local connections",
            ),
            Request::Bdat { chunk_size, .. } => {
                // The chunk follows the command line whatever we answer: drop it so its
                // bytes are not taken for commands.
                self.skip = chunk_size;
                self.error(502, [5, 5, 1], "BDAT not supported (no CHUNKING): use DATA")
            }
            Request::Lhlo { .. } => self.error(502, [5, 5, 1], "LHLO is LMTP; this is SMTP"),
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                let text = format!("{} not supported", request.name());
                self.error(502, [5, 5, 1], &text)
            }
        }
    }

    fn parse_error(&mut self, err: ParseError, line: &[u8]) -> Next {
        debug!(peer = %self.peer, error = %err, "bad command");
        match err {
            ParseError::UnknownCommand => {
                let verb: String = line
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-')
                    .take(16)
                    .map(|&b| b.to_ascii_uppercase() as char)
                    .collect();
                let text = if verb.is_empty() {
                    "Command not recognised".to_string()
                } else {
                    format!("Command not recognised: {verb}")
                };
                self.error(500, [5, 5, 2], &text)
            }
            ParseError::InvalidSenderAddress => {
                self.error(501, [5, 1, 7], "Bad sender address syntax")
            }
            ParseError::InvalidRecipientAddress => {
                self.error(501, [5, 1, 3], "Bad recipient address syntax")
            }
            ParseError::SyntaxError { syntax } => {
                let text = format!("Syntax error, expected: {syntax}");
                self.error(501, [5, 5, 4], &text)
            }
            ParseError::InvalidParameter { param } => {
                let text = format!("Invalid value for the {param} parameter");
                self.error(501, [5, 5, 4], &text)
            }
            ParseError::UnsupportedParameter { param } => {
                let param: String = param
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(32)
                    .collect();
                let text = format!("Unsupported parameter {param}");
                self.error(555, [5, 5, 4], &text)
            }
            ParseError::NeedsMoreData { .. }
            | ParseError::ResponseTooLong
            | ParseError::InvalidResponse { .. } => self.error(501, [5, 5, 4], "Syntax error"),
        }
    }

    fn hello(&mut self, host: &str, extended: bool) -> Next {
        self.tx = None;
        self.helo = Some(Helo {
            name: host.to_string(),
            extended,
        });
        let me = &self.settings.hostname;
        let text = if extended {
            format!(
                "{me} Hello {host}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES",
                self.settings.max_message_size
            )
        } else {
            format!("{me} Hello {host}")
        };
        self.errors = 0;
        self.reply_plain(250, &text);
        Next::Continue
    }

    fn mail(&mut self, from: MailFrom<std::borrow::Cow<'_, str>>, line: &[u8]) -> Next {
        if self.tx.is_some() {
            return self.error(503, [5, 5, 1], "Sender already given (nested MAIL)");
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.error(
                555,
                [5, 5, 4],
                "BODY=BINARYMIME not supported (no CHUNKING): use 8BITMIME",
            );
        }
        const ACCEPTED: u64 =
            smtp_proto::MAIL_BODY_7BIT | smtp_proto::MAIL_BODY_8BITMIME | smtp_proto::MAIL_SMTPUTF8;
        let unsupported = from.flags & !ACCEPTED != 0
            || from.trans_id.is_some()
            || from.by != 0
            || from.env_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.auth.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0;
        if unsupported {
            return self.error(
                555,
                [5, 5, 4],
                "Unsupported MAIL parameter: only SIZE, BODY and SMTPUTF8 are supported",
            );
        }
        let max = self.settings.max_message_size;
        if from.size > max {
            let text = format!("Message size exceeds fixed maximum message size ({max} bytes)");
            return self.error(552, [5, 3, 4], &text);
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let address = from.address;
        // smtp-proto reports `<postmaster>` as an empty address too; only `<>` is null.
        if address.is_empty() && !is_null_path(line) {
            return self.error(553, [5, 1, 7], "Sender <postmaster> needs a domain");
        }
        if let Some(next) = self.check_address(&address, smtputf8, [5, 1, 7]) {
            return next;
        }
        if let Some(r) = self.deliver.check_sender(&address) {
            let esc = r.esc.unwrap_or([5, 7, 1]);
            return self.error(r.code, esc, &r.text);
        }
        let envelope = Envelope {
            sender: address.into_owned(),
            recipients: Vec::new(),
            body: if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8,
        };
        self.tx = Some(Transaction {
            id: new_message_id(),
            envelope,
        });
        self.ok(250, [2, 1, 0], "Sender OK")
    }

    fn rcpt(&mut self, to: RcptTo<std::borrow::Cow<'_, str>>) -> Next {
        let Some(tx) = &self.tx else {
            return self.error(503, [5, 5, 1], "Need MAIL before RCPT");
        };
        let smtputf8 = tx.envelope.smtputf8;
        let count = tx.envelope.recipients.len();
        if to.flags != 0 || to.orcpt.is_some() || to.rrvs != 0 {
            return self.error(
                555,
                [5, 5, 4],
                "Unsupported RCPT parameter: none are supported",
            );
        }
        if to.address.is_empty() {
            return self.error(
                553,
                [5, 1, 3],
                "Recipient needs a full address (user@domain)",
            );
        }
        if let Some(next) = self.check_address(&to.address, smtputf8, [5, 1, 3]) {
            return next;
        }
        if count >= self.settings.max_recipients {
            let text = format!(
                "Too many recipients (at most {} per message)",
                self.settings.max_recipients
            );
            // A limit, not a client error: pipelining clients send all their RCPTs at
            // once and retry the rest later, so these do not count towards MAX_ERRORS.
            self.reply(452, [4, 5, 3], &text);
            return Next::Continue;
        }
        if let Some(tx) = &mut self.tx {
            tx.envelope.recipients.push(to.address.into_owned());
        }
        self.ok(250, [2, 1, 5], "Recipient OK")
    }

    /// Rejects addresses that are not valid UTF-8 or need SMTPUTF8 without it (RFC 6531
    /// 3.5). `None` if the address is fine.
    fn check_address(&mut self, address: &str, smtputf8: bool, esc: [u8; 3]) -> Option<Next> {
        if address.contains('\u{FFFD}') {
            return Some(self.error(501, esc, "Address is not valid UTF-8"));
        }
        if !smtputf8 && !address.is_ascii() {
            return Some(self.error(
                553,
                [5, 6, 7],
                "Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM",
            ));
        }
        None
    }

    fn data_command(&mut self) -> Next {
        match &self.tx {
            None => self.error(503, [5, 5, 1], "Need MAIL and RCPT before DATA"),
            Some(tx) if tx.envelope.recipients.is_empty() => {
                self.error(554, [5, 5, 1], "No valid recipients")
            }
            Some(_) => {
                self.errors = 0;
                self.reply_plain(354, "End data with <CR><LF>.<CR><LF>");
                Next::Data
            }
        }
    }

    /// Reads the message after `354`, delivers it and answers. Err ends the session.
    async fn data(&mut self) -> Result<(), End> {
        let tx = self.tx.take().expect("DATA only with a transaction");
        let protocol = match &self.helo {
            Some(h) if h.extended && tx.envelope.smtputf8 => Protocol::Utf8Smtp,
            Some(h) if h.extended => Protocol::Esmtp,
            _ => Protocol::Smtp,
        };
        let date = chrono::Local::now().to_rfc2822();
        let mut header = Vec::with_capacity(256);
        write_received(
            &mut header,
            &TraceInfo {
                helo: self.helo.as_ref().map(|h| h.name.as_str()),
                peer: self.peer.ip(),
                hostname: &self.settings.hostname,
                protocol,
                id: &tx.id,
                recipient: match tx.envelope.recipients.as_slice() {
                    [one] => Some(one.as_str()),
                    _ => None,
                },
                date: &date,
            },
        );
        let mut reader = DataReader::new(header, self.settings.max_message_size);
        loop {
            let mut bytes = self.input.iter();
            let done = reader.ingest(&mut bytes);
            let consumed = self.input.len() - bytes.len();
            self.input.advance(consumed);
            if done {
                break;
            }
            if !self.flush().await {
                return Err(End::IoError);
            }
            let deadline = tokio::time::Instant::now() + self.settings.data_timeout;
            match self.read(deadline, false, DATA_READ_SIZE).await {
                Read::Data => {}
                Read::Eof => return Err(End::Eof),
                Read::Failed => return Err(End::IoError),
                Read::Shutdown | Read::Timeout => {
                    let text = format!(
                        "{} Timeout while reading message data, closing connection",
                        self.settings.hostname
                    );
                    self.reply(421, [4, 4, 2], &text);
                    self.flush().await;
                    return Err(End::Timeout);
                }
            }
        }
        let data = match reader.finish() {
            DataOutcome::TooBig => {
                let text = format!(
                    "Message size exceeds fixed maximum message size ({} bytes)",
                    self.settings.max_message_size
                );
                debug!(peer = %self.peer, id = %tx.id, "message too big");
                self.reply(552, [5, 3, 4], &text);
                return Ok(());
            }
            DataOutcome::Complete(data) => Bytes::from(data),
        };
        // Delivery can take a while: let the client see everything up to here first.
        if !self.flush().await {
            return Err(End::IoError);
        }
        let id = tx.id.clone();
        let size = data.len();
        let reply = self
            .deliver
            .deliver(Message {
                id: tx.id,
                envelope: tx.envelope,
                data,
            })
            .await;
        debug!(peer = %self.peer, %id, size, reply = %reply, "message handed to delivery");
        if reply.is_positive() {
            self.messages += 1;
        }
        reply.write_to(&mut self.out);
        Ok(())
    }

    /// Queues a successful reply and resets the error count.
    fn ok(&mut self, code: u16, esc: [u8; 3], text: &str) -> Next {
        self.errors = 0;
        self.reply(code, esc, text);
        Next::Continue
    }

    /// Queues an error reply; too many in a row close the session.
    fn error(&mut self, code: u16, esc: [u8; 3], text: &str) -> Next {
        self.reply(code, esc, text);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            let text = format!(
                "{} Too many errors, closing connection",
                self.settings.hostname
            );
            self.reply(421, [4, 7, 0], &text);
            return Next::Close(End::TooManyErrors);
        }
        Next::Continue
    }

    fn reply(&mut self, code: u16, esc: [u8; 3], text: &str) {
        Reply::new(code, esc, text).write_to(&mut self.out);
    }

    fn reply_plain(&mut self, code: u16, text: &str) {
        Reply::plain(code, text).write_to(&mut self.out);
    }
}

/// Old clients send `MAIL FROM:user@host` or `RCPT TO: user@host` without angle brackets;
/// Postfix accepts that by default (`strict_rfc821_envelopes = no`) and so do we, by adding
/// the brackets around the first word before smtp-proto parses the line. `None` for any
/// other line (the usual case: a few byte comparisons).
fn add_angle_brackets(line: &[u8]) -> Option<Vec<u8>> {
    let verb = line.get(..4)?;
    let keyword: &[u8] = if verb.eq_ignore_ascii_case(b"MAIL") {
        b"FROM"
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        b"TO"
    } else {
        return None;
    };
    let colon = memchr::memchr(b':', line)?;
    let between = line[4..colon].trim_ascii();
    if !between.eq_ignore_ascii_case(keyword) || !line[4].is_ascii_whitespace() {
        return None;
    }
    let rest = &line[colon + 1..];
    let start = rest.iter().position(|b| *b != b' ' && *b != b'\t')?;
    let rest = &rest[start..];
    if rest[0] == b'<' {
        return None;
    }
    let end = rest
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(rest.len());
    if end == 0 {
        return None;
    }
    let mut fixed = Vec::with_capacity(line.len() + 2);
    fixed.extend_from_slice(&line[..=colon]);
    fixed.push(b'<');
    fixed.extend_from_slice(&rest[..end]);
    fixed.push(b'>');
    fixed.extend_from_slice(&rest[end..]);
    Some(fixed)
}

/// True if the reverse-path on this MAIL line is `<>` (not `<postmaster>`, which
/// smtp-proto also reports as an empty address).
fn is_null_path(line: &[u8]) -> bool {
    match memchr::memchr(b'<', line) {
        Some(pos) => line.get(pos + 1) == Some(&b'>'),
        None => false,
    }
}

#[cfg(test)]
mod tests;
