//! The sandbox's fake of Gmail's SMTP submission server (`smtp.gmail.com:587`).
//!
//! One task per connection runs a [`Session`] over the plain TCP stream, then — after
//! STARTTLS — over the TLS stream: the same state machine, a different `IO` type.
//! Commands are parsed with `smtp-proto`'s `RequestReceiver`, DATA with its
//! `DataReceiver` (ends only at CRLF.CRLF), BDAT with its `BdatReceiver`. Every complete
//! command in a read is processed in order and all replies are written at once
//! (PIPELINING). Reply texts are Gmail's, each ending in `<session-id> - gsmtp`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::Rng;
use smtp_proto::request::receiver::{
    BdatReceiver, DataReceiver, DummyDataReceiver, LineReceiver, RequestReceiver,
};
use smtp_proto::{Error as ProtoError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::{lock, random_string, ReceivedMessage, Shared};
use super::{GMAIL_MAX_MESSAGE_SIZE, GMAIL_MAX_RECIPIENTS, GMAIL_SCOPE};
use crate::reply::Reply;

const READ_BUFFER: usize = 64 * 1024;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                tokio::spawn(handle_connection(
                    sock,
                    peer,
                    shared.clone(),
                    acceptor.clone(),
                ));
            }
            Err(e) => {
                tracing::debug!(error = %e, "sandbox: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Keeps the connection registry and the open-connections gauge right, however the
/// connection task ends.
struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.connections).remove(&self.id);
        self.shared
            .smtp_stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_connection(
    mut sock: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
) {
    let stats = &shared.smtp_stats;
    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed) + 1;
    stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let open = stats.connections_open.fetch_add(1, Ordering::Relaxed) + 1;
    stats.max_concurrent.fetch_max(open, Ordering::Relaxed);
    let kill = Arc::new(Notify::new());
    lock(&shared.connections).insert(id, kill.clone());
    let guard = ConnectionGuard {
        shared: shared.clone(),
        id,
    };
    let _ = sock.set_nodelay(true);

    let mut session = Session::new(shared.clone(), id, peer);
    let greeting = Reply::plain(220, format!("smtp.gmail.com ESMTP {} - gsmtp", session.sid));
    if sock.write_all(&greeting.to_bytes()).await.is_err() {
        return;
    }
    if session.run(&mut sock, &kill).await != Outcome::StartTls {
        return;
    }
    let mut tls = match acceptor.accept(sock).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::debug!(connection = id, error = %e, "sandbox: TLS handshake failed");
            return;
        }
    };
    stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    session.tls_started();
    if session.run(&mut tls, &kill).await == Outcome::Close {
        // Counted as open until the close starts, so a client that waits for it (as the
        // relay's pool does) finds the gauge already down.
        drop(guard);
        let _ = tls.shutdown().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Keep reading.
    Continue,
    /// Replies are written; close the connection.
    Close,
    /// Close at once, no reply (shutdown, idle kill, peer gone).
    Abort,
    /// `220 2.0.0 Ready to start TLS` is written; hand the socket to TLS.
    StartTls,
}

/// The envelope of the transaction in progress (after MAIL).
struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
    body_param: Option<String>,
    smtputf8: bool,
    /// BDAT chunks so far.
    data: Vec<u8>,
}

/// What the next bytes on the wire are.
enum State {
    /// SMTP commands.
    Command,
    /// Message content after `354`, until CRLF.CRLF.
    Data {
        receiver: DataReceiver,
        buf: Vec<u8>,
    },
    /// Content after DATA that exceeded the size limit: read and drop until CRLF.CRLF.
    DataTooBig(DummyDataReceiver),
    /// A BDAT chunk to append to the transaction.
    Bdat(BdatReceiver),
    /// A BDAT chunk to read and drop, then answer with `reply`.
    BdatDiscard(DummyDataReceiver, Reply),
    /// A line answering an AUTH `334` challenge.
    AuthLine {
        mechanism: AuthMechanism,
        step: u8,
        line: LineReceiver<()>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMechanism {
    XOAuth2,
    OAuthBearer,
    Plain,
    Login,
    /// After a failed XOAUTH2/OAUTHBEARER: the `334 <json>` challenge waits for an empty
    /// line, then `535` whatever the line was.
    FailedBearer,
}

struct Session {
    shared: Arc<Shared>,
    connection_id: u64,
    /// Gmail's per-session id, repeated in every reply: `<id> - gsmtp`.
    sid: String,
    peer: SocketAddr,
    tls: bool,
    greeted: bool,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    messages: u32,
    receiver: RequestReceiver,
    state: State,
}

impl Session {
    fn new(shared: Arc<Shared>, connection_id: u64, peer: SocketAddr) -> Session {
        Session {
            shared,
            connection_id,
            sid: session_id(),
            peer,
            tls: false,
            greeted: false,
            auth_user: None,
            tx: None,
            messages: 0,
            receiver: RequestReceiver::default(),
            state: State::Command,
        }
    }

    /// STARTTLS resets the session (RFC 3207): the client must EHLO again.
    fn tls_started(&mut self) {
        self.tls = true;
        self.greeted = false;
        self.auth_user = None;
        self.tx = None;
        self.receiver = RequestReceiver::default();
        self.state = State::Command;
    }

    /// Between transactions: nothing a silent close would lose.
    fn is_idle(&self) -> bool {
        self.tx.is_none() && matches!(self.state, State::Command)
    }

    /// Reads, processes and answers until the connection ends or STARTTLS is accepted.
    async fn run<IO>(&mut self, io: &mut IO, kill: &Notify) -> Outcome
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut rbuf = vec![0u8; READ_BUFFER];
        let mut out = Vec::with_capacity(1024);
        let shared = self.shared.clone();
        let cancel = shared.cancel.clone();
        let mut last_activity = Instant::now();
        loop {
            // Enabled before reading the timeout, so a change in between is not missed.
            let idle_changed = shared.idle_timeout_changed.notified();
            tokio::pin!(idle_changed);
            idle_changed.as_mut().enable();
            let deadline = last_activity + shared.idle_timeout();
            let n = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Outcome::Abort,
                _ = kill.notified() => {
                    if self.is_idle() {
                        return Outcome::Abort;
                    }
                    continue;
                }
                _ = &mut idle_changed => continue,
                r = io.read(&mut rbuf) => match r {
                    Ok(0) | Err(_) => return Outcome::Abort,
                    Ok(n) => n,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let reply = Reply::new(
                        451,
                        [4, 4, 2],
                        format!("Timeout - closing connection. {} - gsmtp", self.sid),
                    );
                    let _ = io.write_all(&reply.to_bytes()).await;
                    let _ = io.flush().await;
                    return Outcome::Close;
                }
            };
            last_activity = Instant::now();
            let outcome = self.ingest(&rbuf[..n], &mut out).await;
            if !out.is_empty() {
                if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
                    return Outcome::Abort;
                }
                out.clear();
            }
            if outcome != Outcome::Continue {
                return outcome;
            }
        }
    }

    /// Processes every complete command (and content) in `bytes`, appending replies.
    async fn ingest(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Outcome {
        let mut iter = bytes.iter();
        loop {
            match &mut self.state {
                State::Command => {
                    let request = match self.receiver.ingest(&mut iter) {
                        Ok(request) => Ok(request.into_owned()),
                        Err(ProtoError::NeedsMoreData { .. }) => return Outcome::Continue,
                        Err(e) => Err(e),
                    };
                    let outcome = match request {
                        Ok(request) => {
                            let pipelined = !iter.as_slice().is_empty();
                            self.command(request, pipelined, out)
                        }
                        Err(e) => {
                            self.shared.smtp_stats.count_command("OTHER");
                            self.parse_error(e, out)
                        }
                    };
                    if outcome != Outcome::Continue {
                        return outcome;
                    }
                }
                State::Data { receiver, buf } => {
                    let done = receiver.ingest(&mut iter, buf);
                    if done && buf.len() > GMAIL_MAX_MESSAGE_SIZE {
                        self.state = State::Command;
                        self.tx = None;
                        self.reply(out, size_exceeded(&self.sid));
                    } else if done {
                        let data = std::mem::take(buf);
                        self.state = State::Command;
                        let outcome = self.finish_message(data, out).await;
                        if outcome != Outcome::Continue {
                            return outcome;
                        }
                    } else if buf.len() > GMAIL_MAX_MESSAGE_SIZE {
                        let discard = DummyDataReceiver::new_data(receiver);
                        self.state = State::DataTooBig(discard);
                    } else {
                        return Outcome::Continue;
                    }
                }
                State::DataTooBig(receiver) => {
                    if !receiver.ingest(&mut iter) {
                        return Outcome::Continue;
                    }
                    self.state = State::Command;
                    self.tx = None;
                    self.reply(out, size_exceeded(&self.sid));
                }
                State::Bdat(receiver) => {
                    let tx = match self.tx.as_mut() {
                        Some(tx) => tx,
                        None => return Outcome::Close, // unreachable: BDAT needs a tx
                    };
                    if !receiver.ingest(&mut iter, &mut tx.data) {
                        return Outcome::Continue;
                    }
                    let last = receiver.is_last;
                    self.state = State::Command;
                    if tx.data.len() > GMAIL_MAX_MESSAGE_SIZE {
                        self.tx = None;
                        self.reply(out, size_exceeded(&self.sid));
                    } else if last {
                        let data = std::mem::take(&mut tx.data);
                        let outcome = self.finish_message(data, out).await;
                        if outcome != Outcome::Continue {
                            return outcome;
                        }
                    } else {
                        let n = tx.data.len();
                        self.reply(
                            out,
                            Reply::new(
                                250,
                                [2, 0, 0],
                                format!("OK {n} bytes received {} - gsmtp", self.sid),
                            ),
                        );
                    }
                }
                State::BdatDiscard(receiver, reply) => {
                    if !receiver.ingest(&mut iter) {
                        return Outcome::Continue;
                    }
                    let reply = reply.clone();
                    self.state = State::Command;
                    self.reply(out, reply);
                }
                State::AuthLine {
                    mechanism,
                    step,
                    line,
                } => {
                    if !line.ingest(&mut iter) {
                        if line.buf.len() >= smtp_proto::request::receiver::MAX_LINE_LENGTH {
                            self.state = State::Command;
                            self.reply(out, self.r(500, [5, 5, 2], "Line too long."));
                            return Outcome::Close;
                        }
                        return Outcome::Continue;
                    }
                    let (mechanism, step) = (*mechanism, *step);
                    let text = String::from_utf8_lossy(&line.buf).into_owned();
                    self.state = State::Command;
                    self.auth_continue(mechanism, step, &text, out);
                }
            }
        }
    }

    fn reply(&self, out: &mut Vec<u8>, reply: Reply) {
        reply.write_to(out);
    }

    /// A one-line reply with Gmail's `<id> - gsmtp` tail.
    fn r(&self, code: u16, esc: [u8; 3], text: &str) -> Reply {
        Reply::new(code, esc, format!("{text} {} - gsmtp", self.sid))
    }

    fn parse_error(&mut self, e: ProtoError, out: &mut Vec<u8>) -> Outcome {
        let reply = match e {
            ProtoError::UnknownCommand => self.r(502, [5, 5, 1], "Unrecognized command."),
            ProtoError::SyntaxError {
                syntax: "EHLO domain" | "HELO domain",
            } => {
                let reply = self.r(
                    501,
                    [5, 5, 4],
                    "Empty HELO/EHLO argument not allowed, closing connection.",
                );
                self.reply(out, reply);
                return Outcome::Close;
            }
            ProtoError::SyntaxError {
                syntax: "AUTH mechanism [initial-response]",
            } => self.r(504, [5, 7, 4], "Unrecognized authentication type."),
            ProtoError::ResponseTooLong => self.r(500, [5, 5, 2], "Line too long."),
            _ => self.r(555, [5, 5, 2], "Syntax error."),
        };
        self.reply(out, reply);
        Outcome::Continue
    }

    fn command(&mut self, request: Request<String>, pipelined: bool, out: &mut Vec<u8>) -> Outcome {
        let verb = request.name();
        self.shared.smtp_stats.count_command(verb);

        // Gmail ends long-lived connections: after N messages, the next command gets 421.
        if !matches!(request, Request::Quit) {
            let (limit, injected) = {
                let mut settings = lock(&self.shared.smtp);
                (settings.close_after_messages, settings.take_injected(verb))
            };
            if limit.is_some_and(|n| self.messages >= n) {
                let reply = self.r(
                    421,
                    [4, 7, 0],
                    &format!("Try again later, closing connection. ({verb})"),
                );
                self.reply(out, reply);
                return Outcome::Close;
            }
            if let Some(reply) = injected {
                return self.injected_reply(request, reply, out);
            }
        }

        match request {
            Request::Ehlo { host: _ } => {
                self.greeted = true;
                self.tx = None;
                self.reply(out, self.ehlo_reply());
            }
            Request::Helo { host: _ } => {
                self.greeted = true;
                self.tx = None;
                self.reply(out, Reply::plain(250, "smtp.gmail.com at your service"));
            }
            Request::StartTls => {
                if self.tls {
                    self.reply(out, self.r(502, [5, 5, 1], "Unrecognized command."));
                } else if pipelined {
                    let reply = Reply::new(
                        454,
                        [4, 5, 0],
                        format!(
                            "SMTP protocol violation, no commands allowed to pipeline after \
                             STARTTLS, see RFC 3207. {} - gsmtp",
                            self.sid
                        ),
                    );
                    self.reply(out, reply);
                    return Outcome::Close;
                } else {
                    self.reply(out, Reply::new(220, [2, 0, 0], "Ready to start TLS"));
                    return Outcome::StartTls;
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response, out),
            Request::Mail { from } => self.mail(from, out),
            Request::Rcpt { to } => self.rcpt(to.address, out),
            Request::Data => {
                if let Some(reply) = self.transaction_precondition(true) {
                    self.reply(out, reply);
                } else {
                    self.state = State::Data {
                        receiver: data_receiver(),
                        buf: Vec::with_capacity(4096),
                    };
                    self.reply(
                        out,
                        Reply::plain(354, format!(" Go ahead {} - gsmtp", self.sid)),
                    );
                }
            }
            Request::Bdat {
                chunk_size,
                is_last,
            } => {
                if let Some(reply) = self.transaction_precondition(true) {
                    self.state = State::BdatDiscard(DummyDataReceiver::new_bdat(chunk_size), reply);
                } else if self.tx.as_ref().map_or(0, |tx| tx.data.len()) + chunk_size
                    > GMAIL_MAX_MESSAGE_SIZE
                {
                    self.tx = None;
                    self.state = State::BdatDiscard(
                        DummyDataReceiver::new_bdat(chunk_size),
                        size_exceeded(&self.sid),
                    );
                } else {
                    self.state = State::Bdat(BdatReceiver::new(chunk_size, is_last));
                }
            }
            Request::Rset => {
                self.tx = None;
                self.reply(out, self.r(250, [2, 1, 5], "Flushed"));
            }
            Request::Noop { value: _ } => self.reply(out, self.r(250, [2, 0, 0], "OK")),
            Request::Quit => {
                self.reply(out, self.r(221, [2, 0, 0], "closing connection"));
                return Outcome::Close;
            }
            Request::Vrfy { value: _ } => self.reply(
                out,
                self.r(252, [2, 1, 5], "Send some mail, I'll try my best"),
            ),
            Request::Help { value: _ } => self.reply(
                out,
                self.r(
                    214,
                    [2, 0, 0],
                    "https://www.google.com/search?btnI&q=RFC+5321",
                ),
            ),
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.reply(out, self.r(502, [5, 5, 1], "Unrecognized command."))
            }
        }
        Outcome::Continue
    }

    /// Answers `request` with a reply injected by `SandboxControl::inject_reply` instead
    /// of processing it. A BDAT chunk is still read (and dropped); 421 closes.
    fn injected_reply(
        &mut self,
        request: Request<String>,
        reply: Reply,
        out: &mut Vec<u8>,
    ) -> Outcome {
        if let Request::Bdat { chunk_size, .. } = request {
            self.tx = None;
            self.state = State::BdatDiscard(DummyDataReceiver::new_bdat(chunk_size), reply);
            return Outcome::Continue;
        }
        let close = reply.code == 421;
        self.reply(out, reply);
        if close {
            Outcome::Close
        } else {
            Outcome::Continue
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            format!("smtp.gmail.com at your service, [{}]", self.peer.ip()),
            format!("SIZE {GMAIL_MAX_MESSAGE_SIZE}"),
            "8BITMIME".to_string(),
        ];
        if self.tls {
            lines.push("AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH".to_string());
        } else {
            lines.push("STARTTLS".to_string());
        }
        for ext in ["ENHANCEDSTATUSCODES", "PIPELINING", "CHUNKING", "SMTPUTF8"] {
            lines.push(ext.to_string());
        }
        Reply::plain(250, lines.join("\n"))
    }

    /// Why no transaction may start now: STARTTLS, EHLO and AUTH come first.
    fn session_precondition(&self) -> Option<Reply> {
        if !self.tls {
            return Some(self.r(530, [5, 7, 0], "Must issue a STARTTLS command first."));
        }
        if !self.greeted {
            return Some(self.r(503, [5, 5, 1], "EHLO/HELO first."));
        }
        if self.auth_user.is_none() {
            return Some(Reply::new(
                530,
                [5, 7, 0],
                format!(
                    "Authentication Required. For more information, go to\n \
                     https://support.google.com/mail/?p=WantAuthError {} - gsmtp",
                    self.sid
                ),
            ));
        }
        None
    }

    /// Why RCPT (`need_rcpt` false) or DATA/BDAT (`need_rcpt` true) may not run now.
    fn transaction_precondition(&self, need_rcpt: bool) -> Option<Reply> {
        if let Some(reply) = self.session_precondition() {
            return Some(reply);
        }
        match &self.tx {
            None => Some(self.r(503, [5, 5, 1], "MAIL first.")),
            Some(tx) if need_rcpt && tx.rcpt_to.is_empty() => {
                Some(self.r(503, [5, 5, 1], "RCPT first."))
            }
            Some(_) => None,
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, out: &mut Vec<u8>) {
        if let Some(reply) = self.session_precondition() {
            self.reply(out, reply);
            return;
        }
        if self.tx.is_some() {
            self.reply(out, self.r(503, [5, 5, 1], "Nested MAIL command."));
            return;
        }
        if from.size > GMAIL_MAX_MESSAGE_SIZE {
            self.reply(out, size_exceeded(&self.sid));
            return;
        }
        let body_param = if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME")
        } else if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            Some("BINARYMIME")
        } else if from.flags & smtp_proto::MAIL_BODY_7BIT != 0 {
            Some("7BIT")
        } else {
            None
        };
        self.tx = Some(Transaction {
            mail_from: from.address,
            rcpt_to: Vec::new(),
            body_param: body_param.map(str::to_string),
            smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
            data: Vec::new(),
        });
        self.reply(out, self.r(250, [2, 1, 0], "OK"));
    }

    fn rcpt(&mut self, address: String, out: &mut Vec<u8>) {
        if let Some(reply) = self.transaction_precondition(false) {
            self.reply(out, reply);
            return;
        }
        let refused = lock(&self.shared.smtp)
            .refused
            .get(&address.to_ascii_lowercase())
            .cloned();
        if let Some(reply) = refused {
            self.reply(out, reply);
            return;
        }
        let sid = self.sid.clone();
        let Some(tx) = self.tx.as_mut() else { return };
        if tx.rcpt_to.len() >= GMAIL_MAX_RECIPIENTS {
            let reply = Reply::new(
                452,
                [4, 5, 3],
                format!(
                    "Your message has too many recipients. For more information regarding\n\
                     Google's sending limits, visit\n \
                     https://support.google.com/mail/?p=TooManyRecipientsError {sid} - gsmtp"
                ),
            );
            self.reply(out, reply);
            return;
        }
        tx.rcpt_to.push(address);
        self.reply(out, self.r(250, [2, 1, 5], "OK"));
    }

    async fn finish_message(&mut self, data: Vec<u8>, out: &mut Vec<u8>) -> Outcome {
        let Some(tx) = self.tx.take() else {
            return Outcome::Continue;
        };
        let injected = lock(&self.shared.smtp).take_injected("DATA-END");
        if let Some(reply) = injected {
            let close = reply.code == 421;
            self.reply(out, reply);
            return if close {
                Outcome::Close
            } else {
                Outcome::Continue
            };
        }
        let shared = &self.shared;
        let seq = shared.message_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = random_string(16).to_ascii_lowercase();
        let rcpts = tx.rcpt_to.join(",");
        if let Some(dir) = &shared.message_dir {
            let path = dir.join(format!("{seq:06}-{id}.eml"));
            if let Err(e) = tokio::fs::write(&path, &data).await {
                tracing::warn!(path = %path.display(), error = %e, "sandbox: cannot write message");
                self.reply(
                    out,
                    self.r(451, [4, 3, 0], "Mail server temporarily rejected message."),
                );
                return Outcome::Continue;
            }
            tracing::info!(
                %id,
                from = %tx.mail_from,
                %rcpts,
                bytes = data.len(),
                path = %path.display(),
                "sandbox: message received"
            );
        } else {
            tracing::debug!(%id, from = %tx.mail_from, %rcpts, bytes = data.len(), "sandbox: message received");
        }
        self.messages += 1;
        shared.record_message(ReceivedMessage {
            mail_from: tx.mail_from,
            rcpt_to: tx.rcpt_to,
            data,
            auth_user: self.auth_user.clone().unwrap_or_default(),
            connection_id: self.connection_id,
            body_param: tx.body_param,
            smtputf8: tx.smtputf8,
            seq,
            id,
        });
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.reply(out, self.r(250, [2, 0, 0], &format!("OK  {ts}")));
        Outcome::Continue
    }

    fn auth(&mut self, mechanism: u64, initial: String, out: &mut Vec<u8>) {
        if !self.tls {
            self.reply(
                out,
                self.r(530, [5, 7, 0], "Must issue a STARTTLS command first."),
            );
            return;
        }
        if !self.greeted {
            self.reply(out, self.r(503, [5, 5, 1], "EHLO/HELO first."));
            return;
        }
        if self.auth_user.is_some() {
            self.reply(out, self.r(503, [5, 5, 1], "Already authenticated."));
            return;
        }
        if self.tx.is_some() {
            self.reply(out, self.r(503, [5, 5, 1], "Bad sequence of commands."));
            return;
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_XOAUTH2 => AuthMechanism::XOAuth2,
            smtp_proto::AUTH_OAUTHBEARER => AuthMechanism::OAuthBearer,
            smtp_proto::AUTH_PLAIN => AuthMechanism::Plain,
            smtp_proto::AUTH_LOGIN => AuthMechanism::Login,
            _ => {
                self.reply(
                    out,
                    self.r(504, [5, 7, 4], "Unrecognized authentication type."),
                );
                return;
            }
        };
        if initial.is_empty() {
            // Two-step form: empty challenge, the response comes on its own line.
            let challenge = if mechanism == AuthMechanism::Login {
                "VXNlcm5hbWU6" // "Username:"
            } else {
                ""
            };
            self.challenge(out, challenge, mechanism, 0);
        } else {
            let initial = if initial == "=" {
                String::new()
            } else {
                initial
            };
            self.auth_continue(mechanism, 0, &initial, out);
        }
    }

    /// Is `line` a base64 PLAIN response (`authzid NUL user NUL password`) with the
    /// sandbox user and its benchmark password?
    fn plain_ok(&self, line: &str) -> bool {
        let Some(password) = &self.shared.plain_password else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(line.trim()) else {
            return false;
        };
        let mut parts = decoded.split(|&b| b == 0).skip(1);
        parts.next() == Some(self.shared.username.as_bytes())
            && parts.next() == Some(password.as_bytes())
    }

    fn challenge(&mut self, out: &mut Vec<u8>, text: &str, mechanism: AuthMechanism, step: u8) {
        self.reply(out, Reply::plain(334, text));
        self.state = State::AuthLine {
            mechanism,
            step,
            line: LineReceiver::new(()),
        };
    }

    /// Handles the client's AUTH response (initial or after a `334`).
    fn auth_continue(&mut self, mechanism: AuthMechanism, step: u8, line: &str, out: &mut Vec<u8>) {
        let stats = &self.shared.smtp_stats;
        if line.trim() == "*" && mechanism != AuthMechanism::FailedBearer {
            stats.auth_failed.fetch_add(1, Ordering::Relaxed);
            self.reply(
                out,
                self.r(501, [5, 7, 0], "Client cancelled authentication."),
            );
            return;
        }
        match mechanism {
            AuthMechanism::XOAuth2 | AuthMechanism::OAuthBearer => {
                let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(line.trim())
                else {
                    stats.auth_failed.fetch_add(1, Ordering::Relaxed);
                    self.reply(out, self.r(501, [5, 5, 2], "Cannot Decode response."));
                    return;
                };
                let parsed = if mechanism == AuthMechanism::XOAuth2 {
                    parse_xoauth2(&decoded)
                } else {
                    parse_oauthbearer(&decoded)
                };
                let accepted = parsed.as_ref().is_some_and(|(user, token)| {
                    *user == self.shared.username && self.shared.access_token_valid(token)
                });
                match parsed {
                    Some((user, _)) if accepted => {
                        stats.auth_ok.fetch_add(1, Ordering::Relaxed);
                        self.auth_user = Some(user.into_owned());
                        self.reply(out, Reply::new(235, [2, 7, 0], "Accepted"));
                    }
                    _ => {
                        let json = format!(
                            r#"{{"status":"400","schemes":"Bearer","scope":"{GMAIL_SCOPE}"}}"#
                        );
                        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
                        self.challenge(out, &b64, AuthMechanism::FailedBearer, 0);
                    }
                }
            }
            AuthMechanism::FailedBearer => {
                stats.auth_failed.fetch_add(1, Ordering::Relaxed);
                self.reply(out, bad_credentials(&self.sid));
            }
            AuthMechanism::Login if step == 0 => {
                self.challenge(out, "UGFzc3dvcmQ6", AuthMechanism::Login, 1); // "Password:"
            }
            // With a benchmark password set (`SandboxOptions::plain_password`), PLAIN
            // accepts it, so a password-only client (Postfix) can be measured against
            // the same fake.
            AuthMechanism::Plain if self.plain_ok(line) => {
                stats.auth_ok.fetch_add(1, Ordering::Relaxed);
                self.auth_user = Some(self.shared.username.clone());
                self.reply(out, Reply::new(235, [2, 7, 0], "Accepted"));
            }
            // Otherwise the account has no password: PLAIN and LOGIN always fail, as they
            // do on Gmail for accounts without an app password.
            AuthMechanism::Login | AuthMechanism::Plain => {
                stats.auth_failed.fetch_add(1, Ordering::Relaxed);
                self.reply(out, bad_credentials(&self.sid));
            }
        }
    }
}

/// A `DataReceiver` positioned at the start of a line. `DataReceiver::new()` does not
/// treat the very first byte as a line start, so an empty message (`.` right after 354)
/// or a dot-stuffed first line would be misread; feeding it the CRLF that ended the
/// DATA command fixes that.
fn data_receiver() -> DataReceiver {
    let mut receiver = DataReceiver::new();
    let mut scratch = Vec::new();
    receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
    receiver
}

/// `535 5.7.8`, Gmail's multi-line reply to bad credentials.
fn bad_credentials(sid: &str) -> Reply {
    Reply::new(
        535,
        [5, 7, 8],
        format!(
            "Username and Password not accepted. For more information, go to\n \
             https://support.google.com/mail/?p=BadCredentials {sid} - gsmtp"
        ),
    )
}

/// `552 5.3.4`, Gmail's multi-line reply to a message over the size limit.
fn size_exceeded(sid: &str) -> Reply {
    Reply::new(
        552,
        [5, 3, 4],
        format!(
            "Your message exceeded Google's message size limits. Please visit\n \
             https://support.google.com/mail/?p=MaxSizeError to view our size\n\
             guidelines. {sid} - gsmtp"
        ),
    )
}

/// `user=<u>\x01auth=Bearer <token>\x01\x01` -> (user, token).
fn parse_xoauth2(payload: &[u8]) -> Option<(Cow<'_, str>, String)> {
    let text = std::str::from_utf8(payload).ok()?;
    let body = text.strip_suffix("\x01\x01")?;
    let mut user = None;
    let mut token = None;
    for field in body.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u);
        } else if let Some(a) = field.strip_prefix("auth=") {
            let (scheme, t) = a.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("Bearer") {
                token = Some(t.to_string());
            }
        }
    }
    Some((Cow::Borrowed(user?), token?))
}

/// RFC 7628: `n,a=<user>,\x01host=…\x01port=…\x01auth=Bearer <token>\x01\x01`.
fn parse_oauthbearer(payload: &[u8]) -> Option<(Cow<'_, str>, String)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (gs2, rest) = text.split_once('\x01')?;
    let user = gs2
        .split(',')
        .find_map(|p| p.strip_prefix("a="))?
        .replace("=2C", ",")
        .replace("=3D", "=");
    let body = rest
        .strip_suffix("\x01\x01")
        .or(rest.strip_suffix('\x01'))?;
    let token = body
        .split('\x01')
        .find_map(|f| f.strip_prefix("auth="))
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, t)| t.to_string())?;
    Some((Cow::Owned(user), token))
}

/// A Gmail-looking session id, e.g. `5b1f17b1804b1-2a3b4c5d6esm12345678ab.41`.
fn session_id() -> String {
    let mut rng = rand::rng();
    let hex = |rng: &mut rand::rngs::ThreadRng, n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
            .collect()
    };
    let a = hex(&mut rng, 13);
    let b = hex(&mut rng, 10);
    let digits: u32 = rng.random_range(10_000_000..100_000_000);
    let letters: String = (0..2)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect();
    let n: u32 = rng.random_range(1..100);
    format!("{a}-{b}sm{digits}{letters}.{n}")
}
