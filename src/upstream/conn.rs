//! One authenticated upstream connection: TCP, greeting, EHLO, mandatory STARTTLS, EHLO
//! again, our own `AUTH XOAUTH2` exchange, then mail transactions — pipelined (RFC 2920)
//! when the server allows it, so MAIL, every RCPT and DATA leave in one write and the
//! message body plus the final dot in as few writes as possible. Where the server also
//! offers CHUNKING (RFC 3030; Gmail does), a message up to 256 KiB goes as MAIL, RCPT…,
//! `BDAT n LAST` and its bytes in a single write: one round trip, no dot-stuffing.
//!
//! Replies are read with `smtp-proto`'s parser over a buffer that keeps whatever follows
//! a reply (unlike `mail-send`'s `read`), so pipelined replies are never lost. The token
//! and the AUTH payload are never logged and never put in an error.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::{Buf, BytesMut};
use secrecy::zeroize::Zeroize;
use smtp_proto::{response::parser::ResponseReceiver, Response};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{
    error::{Stage, UpstreamError},
    RecipientOutcome, SendReport, UpstreamSettings,
};
use crate::{envelope::BodyType, envelope::Envelope, oauth::AccessToken, reply::Reply};

/// Body bytes are dot-stuffed into a buffer and written in pieces of about this size.
const WRITE_CHUNK: usize = 256 * 1024;

/// A byte stream with a reply parser and a read buffer that survives between replies.
struct Wire<S> {
    stream: S,
    rbuf: BytesMut,
    timeout: Duration,
    addr: Arc<str>,
    /// The peer reset the connection (RST): it closed with our bytes unread.
    reset: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(stream: S, timeout: Duration, addr: Arc<str>) -> Self {
        Wire {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            timeout,
            addr,
            reset: false,
        }
    }

    fn lost_io(&mut self, stage: Stage, e: std::io::Error) -> UpstreamError {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        self.reset |= matches!(e.kind(), ConnectionReset | BrokenPipe);
        self.lost(stage, e)
    }

    fn lost(&self, stage: Stage, cause: impl ToString) -> UpstreamError {
        UpstreamError::ConnectionLost {
            addr: self.addr.to_string(),
            stage,
            cause: cause.to_string(),
        }
    }

    fn timed_out(&self, stage: Stage) -> UpstreamError {
        UpstreamError::Timeout {
            addr: self.addr.to_string(),
            stage,
            after: self.timeout,
        }
    }

    /// Writes all of `bytes` and flushes, within the command timeout.
    async fn write(&mut self, bytes: &[u8], stage: Stage) -> Result<(), UpstreamError> {
        let io = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost_io(stage, e)),
            Err(_) => Err(self.timed_out(stage)),
        }
    }

    /// Reads one (possibly multi-line) reply; bytes after it stay buffered.
    async fn read_reply(&mut self, stage: Stage) -> Result<Response<String>, UpstreamError> {
        let deadline = Instant::now() + self.timeout;
        let mut parser = ResponseReceiver::default();
        loop {
            if !self.rbuf.is_empty() {
                let mut it = self.rbuf.iter();
                let parsed = parser.parse(&mut it);
                let consumed = self.rbuf.len() - it.as_slice().len();
                self.rbuf.advance(consumed);
                match parsed {
                    Ok(r) => return Ok(r),
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        return Err(UpstreamError::Protocol {
                            addr: self.addr.to_string(),
                            stage,
                            cause: format!("{e:?}"),
                        })
                    }
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < 1024 {
                self.rbuf.reserve(4096);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(Ok(0)) => return Err(self.lost(stage, "connection closed by upstream")),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(self.lost_io(stage, e)),
                Err(_) => return Err(self.timed_out(stage)),
            }
        }
    }

    async fn command(
        &mut self,
        line: &[u8],
        stage: Stage,
    ) -> Result<Response<String>, UpstreamError> {
        self.write(line, stage).await?;
        self.read_reply(stage).await
    }

    /// Without waiting: has the peer closed, failed, or said something unasked (a 421)?
    fn peer_gone(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 64];
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut self.stream).poll_read(&mut cx, &mut buf) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) | Poll::Ready(Err(_)) => true,
        }
    }
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Capabilities {
    pub starttls: bool,
    pub pipelining: bool,
    /// `SIZE n` with n > 0.
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// `CHUNKING` (RFC 3030): BDAT is accepted.
    pub chunking: bool,
    /// Upper-case mechanism names after `AUTH`.
    pub auth: Vec<String>,
}

impl Capabilities {
    fn parse(ehlo_text: &str) -> Self {
        let mut caps = Capabilities::default();
        for line in ehlo_text.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "SIZE" => caps.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0),
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// A failed transaction, and whether resending on a fresh connection is safe and useful
/// (the connection was found dead before the MAIL reply was read).
#[derive(Debug)]
pub(crate) struct TxError {
    pub error: UpstreamError,
    pub retry_on_fresh: bool,
}

impl TxError {
    fn fatal(error: UpstreamError) -> Self {
        TxError {
            error,
            retry_on_fresh: false,
        }
    }
}

/// Is this the error of a connection that died (rather than one that answered)?
pub(crate) fn is_dead(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::ConnectionLost { .. } | UpstreamError::Closing { .. }
    )
}

/// An authenticated connection, ready for mail transactions.
pub(crate) struct Connection {
    wire: Wire<TlsStream<TcpStream>>,
    pub caps: Capabilities,
    /// The token generation this connection logged in with.
    pub generation: u64,
    pub last_used: Instant,
    /// Messages accepted (final 2xx) on this connection.
    pub messages: u32,
    /// The last transaction failed part way: RSET before the next MAIL.
    pub needs_rset: bool,
    /// Unusable (I/O or protocol error, timeout, 421, unknown state): drop, don't reuse.
    pub broken: bool,
}

impl Connection {
    /// Connects, secures, and logs in with `token`.
    pub async fn open(
        settings: &UpstreamSettings,
        connector: &TlsConnector,
        token: &AccessToken,
    ) -> Result<Connection, UpstreamError> {
        let addr: Arc<str> = settings.addr().into();
        let tcp = match tokio::time::timeout(
            settings.connect_timeout,
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(UpstreamError::Connect {
                    addr: addr.to_string(),
                    cause: e.to_string(),
                })
            }
            Err(_) => {
                return Err(UpstreamError::Connect {
                    addr: addr.to_string(),
                    cause: format!(
                        "timed out after {} s",
                        settings.connect_timeout.as_secs_f32()
                    ),
                })
            }
        };
        // Request/response traffic: Nagle would stall every pipelined batch.
        let _ = tcp.set_nodelay(true);
        let mut plain = Wire::new(tcp, settings.command_timeout, addr.clone());

        let greeting = plain.read_reply(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Greeting {
                addr: addr.to_string(),
                reply: Reply::from_response(&greeting),
            });
        }
        let ehlo = format!("EHLO {}\r\n", settings.helo_name);
        let reply = plain.command(ehlo.as_bytes(), Stage::Ehlo).await?;
        if reply.code != 250 {
            return Err(UpstreamError::Greeting {
                addr: addr.to_string(),
                reply: Reply::from_response(&reply),
            });
        }
        if !Capabilities::parse(&reply.message).starttls {
            let _ = plain.write(b"QUIT\r\n", Stage::Quit).await;
            return Err(UpstreamError::NoStartTls {
                addr: addr.to_string(),
            });
        }
        let reply = plain.command(b"STARTTLS\r\n", Stage::StartTls).await?;
        if reply.code != 220 {
            return Err(UpstreamError::StartTlsRefused {
                addr: addr.to_string(),
                reply: Reply::from_response(&reply),
            });
        }
        if !plain.rbuf.is_empty() {
            // Bytes sent in clear after 220 would be read as if they came over TLS.
            return Err(UpstreamError::Protocol {
                addr: addr.to_string(),
                stage: Stage::StartTls,
                cause: "data after the STARTTLS reply (possible injection)".into(),
            });
        }

        let tls_err = |cause: String| UpstreamError::Tls {
            addr: addr.to_string(),
            server_name: settings.tls_server_name.clone(),
            cause,
        };
        let name = rustls::pki_types::ServerName::try_from(settings.tls_server_name.clone())
            .map_err(|e| tls_err(format!("invalid TLS server name: {e}")))?;
        let tls = match tokio::time::timeout(
            settings.connect_timeout,
            connector.connect(name, plain.stream),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(tls_err(e.to_string())),
            Err(_) => return Err(tls_err("handshake timed out".into())),
        };
        let mut wire = Wire::new(tls, settings.command_timeout, addr.clone());
        let reply = wire.command(ehlo.as_bytes(), Stage::Ehlo).await?;
        if reply.code != 250 {
            return Err(UpstreamError::Greeting {
                addr: addr.to_string(),
                reply: Reply::from_response(&reply),
            });
        }
        let caps = Capabilities::parse(&reply.message);
        let mut conn = Connection {
            wire,
            caps,
            generation: token.generation,
            last_used: Instant::now(),
            messages: 0,
            needs_rset: false,
            broken: false,
        };
        conn.authenticate(&settings.username, token).await?;
        tracing::debug!(upstream = %addr, generation = token.generation, caps = ?conn.caps, "upstream connection ready");
        Ok(conn)
    }

    /// `AUTH XOAUTH2`, done by hand: on Gmail's `334 <base64 JSON>` challenge the client
    /// must send an empty line, then read the final (multi-line) 535.
    async fn authenticate(
        &mut self,
        username: &str,
        token: &AccessToken,
    ) -> Result<(), UpstreamError> {
        let mut raw = format!("user={username}\x01auth=Bearer {}\x01\x01", token.secret());
        let mut line = String::with_capacity(16 + raw.len() * 4 / 3 + 4);
        line.push_str("AUTH XOAUTH2 ");
        STANDARD.encode_string(raw.as_bytes(), &mut line);
        line.push_str("\r\n");
        raw.zeroize();
        let written = self.wire.write(line.as_bytes(), Stage::Auth).await;
        line.zeroize();
        written?;
        let reply = self.wire.read_reply(Stage::Auth).await?;
        let (reply, challenge) = match reply.code {
            235 => return Ok(()),
            334 => {
                let challenge = STANDARD
                    .decode(reply.message.trim())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|_| reply.message.clone());
                let last = self.wire.command(b"\r\n", Stage::Auth).await?;
                if (200..300).contains(&last.code) {
                    return Ok(());
                }
                (last, Some(challenge))
            }
            _ => (reply, None),
        };
        self.broken = true;
        Err(UpstreamError::AuthFailed {
            addr: self.wire.addr.to_string(),
            username: username.to_owned(),
            reply: Reply::from_response(&reply),
            challenge,
        })
    }

    /// Without waiting: did the server close or speak up (421) while we were idle?
    pub fn peer_gone(&mut self) -> bool {
        self.wire.peer_gone()
    }

    /// Makes an idle connection ready for MAIL: RSET after a failed transaction, NOOP if
    /// idle longer than `noop_after`. Any failure marks it broken.
    pub async fn prepare(&mut self, noop_after: Duration) -> Result<(), UpstreamError> {
        let (line, stage): (&[u8], _) = if self.needs_rset {
            (b"RSET\r\n", Stage::Rset)
        } else if self.last_used.elapsed() > noop_after {
            (b"NOOP\r\n", Stage::Noop)
        } else {
            return Ok(());
        };
        let reply = match self.wire.command(line, stage).await {
            Ok(r) => r,
            Err(e) => {
                self.broken = true;
                return Err(e);
            }
        };
        if reply.code != 250 {
            self.broken = true;
            let addr = self.wire.addr.to_string();
            return Err(if reply.code == 421 {
                UpstreamError::Closing {
                    addr,
                    stage,
                    reply: Reply::from_response(&reply),
                }
            } else {
                UpstreamError::Protocol {
                    addr,
                    stage,
                    cause: format!("unexpected reply {}", Reply::from_response(&reply)),
                }
            });
        }
        self.needs_rset = false;
        Ok(())
    }

    /// Refusals we can make without asking the server (SIZE, SMTPUTF8, bad addresses).
    pub fn check(&self, envelope: &Envelope, data: &[u8]) -> Result<(), UpstreamError> {
        let reject = |stage, reply| UpstreamError::Rejected {
            addr: self.wire.addr.to_string(),
            stage,
            reply,
        };
        if let Some(max) = self.caps.size {
            if data.len() as u64 > max {
                return Err(reject(
                    Stage::Mail,
                    Reply::new(
                        552,
                        [5, 3, 4],
                        format!(
                            "message size {} exceeds the upstream's limit of {max} bytes",
                            data.len()
                        ),
                    ),
                ));
            }
        }
        if envelope.smtputf8 && !self.caps.smtputf8 {
            return Err(reject(
                Stage::Mail,
                Reply::new(
                    553,
                    [5, 6, 7],
                    "SMTPUTF8 was requested but the upstream does not support it",
                ),
            ));
        }
        let bad = |a: &str| {
            a.bytes()
                .any(|b| matches!(b, b'\r' | b'\n' | b'\0' | b'<' | b'>'))
        };
        if bad(&envelope.sender) {
            return Err(reject(
                Stage::Mail,
                Reply::new(553, [5, 1, 7], "invalid sender address"),
            ));
        }
        if let Some(r) = envelope.recipients.iter().find(|r| bad(r) || r.is_empty()) {
            return Err(reject(
                Stage::Rcpt,
                Reply::new(553, [5, 1, 3], format!("invalid recipient address {r:?}")),
            ));
        }
        if envelope.recipients.is_empty() {
            return Err(reject(
                Stage::Rcpt,
                Reply::new(554, [5, 5, 1], "no valid recipients"),
            ));
        }
        Ok(())
    }

    fn mail_command(&self, envelope: &Envelope, data: &[u8], out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(out, "MAIL FROM:<{}>", envelope.sender);
        if self.caps.size.is_some() {
            let _ = write!(out, " SIZE={}", data.len());
        }
        if envelope.body == BodyType::EightBitMime && self.caps.eightbitmime {
            out.extend_from_slice(b" BODY=8BITMIME");
        }
        if envelope.smtputf8 {
            out.extend_from_slice(b" SMTPUTF8");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// One mail transaction. `check` must have passed. Marks the connection broken or
    /// in need of RSET as the outcome requires.
    pub async fn send(&mut self, envelope: &Envelope, data: &[u8]) -> Result<SendReport, TxError> {
        let result = self.transaction(envelope, data).await;
        self.last_used = Instant::now();
        if let Err(e) = &result {
            if is_dead(&e.error)
                || matches!(
                    e.error,
                    UpstreamError::Timeout { .. }
                        | UpstreamError::Protocol { .. }
                        | UpstreamError::Indeterminate { .. }
                )
            {
                self.broken = true;
            }
        }
        result
    }

    fn closing(&self, stage: Stage, r: &Response<String>) -> UpstreamError {
        UpstreamError::Closing {
            addr: self.wire.addr.to_string(),
            stage,
            reply: Reply::from_response(r),
        }
    }

    async fn transaction(
        &mut self,
        envelope: &Envelope,
        data: &[u8],
    ) -> Result<SendReport, TxError> {
        if self.caps.pipelining && self.caps.chunking && data.len() <= WRITE_CHUNK {
            return self.transaction_bdat(envelope, data).await;
        }
        let n = envelope.recipients.len();
        let mut out = Vec::with_capacity(64 + 48 * (n + 1));
        self.mail_command(envelope, data, &mut out);
        let pipelining = self.caps.pipelining;
        let before_mail = |e: UpstreamError| TxError {
            retry_on_fresh: is_dead(&e),
            error: e,
        };

        // MAIL (and, pipelined, every RCPT and DATA in the same write).
        if pipelining {
            for r in &envelope.recipients {
                out.extend_from_slice(b"RCPT TO:<");
                out.extend_from_slice(r.as_bytes());
                out.extend_from_slice(b">\r\n");
            }
            out.extend_from_slice(b"DATA\r\n");
        }
        self.wire
            .write(&out, Stage::Mail)
            .await
            .map_err(before_mail)?;
        let mail = self
            .wire
            .read_reply(Stage::Mail)
            .await
            .map_err(before_mail)?;
        if mail.code == 421 {
            self.broken = true;
            return Err(before_mail(self.closing(Stage::Mail, &mail)));
        }
        let mail_ok = (200..300).contains(&mail.code);
        if !mail_ok && !pipelining {
            self.needs_rset = true;
            return Err(TxError::fatal(UpstreamError::Rejected {
                addr: self.wire.addr.to_string(),
                stage: Stage::Mail,
                reply: Reply::from_response(&mail),
            }));
        }

        // A pipelined MAIL answered 4xx by a server that then hangs up was most likely an
        // unsolicited "451 4.4.2 Timeout - closing connection" racing our batch: nothing
        // was started, so it is as safe to resend as a connection found dead.
        let mail_4xx = (400..500).contains(&mail.code);
        let after_mail = |e: UpstreamError| TxError {
            retry_on_fresh: pipelining && mail_4xx && is_dead(&e),
            error: e,
        };

        // RCPT replies.
        let mut recipients = Vec::with_capacity(n);
        for r in &envelope.recipients {
            let reply = if pipelining {
                self.wire.read_reply(Stage::Rcpt).await
            } else {
                let line = format!("RCPT TO:<{r}>\r\n");
                self.wire.command(line.as_bytes(), Stage::Rcpt).await
            }
            .map_err(after_mail)?;
            if reply.code == 421 {
                self.broken = true;
                return Err(after_mail(self.closing(Stage::Rcpt, &reply)));
            }
            recipients.push(RecipientOutcome {
                address: r.clone(),
                accepted: (200..300).contains(&reply.code),
                reply: Reply::from_response(&reply),
            });
        }
        let any_accepted = recipients.iter().any(|r| r.accepted);

        // DATA reply (pipelined: always sent; otherwise only if someone was accepted).
        let data_reply = if pipelining {
            Some(
                self.wire
                    .read_reply(Stage::Data)
                    .await
                    .map_err(after_mail)?,
            )
        } else if any_accepted {
            Some(
                self.wire
                    .command(b"DATA\r\n", Stage::Data)
                    .await
                    .map_err(TxError::fatal)?,
            )
        } else {
            None
        };
        let go_ahead = data_reply.as_ref().is_some_and(|r| r.code == 354);
        if let Some(r) = data_reply.as_ref().filter(|r| r.code == 421) {
            self.broken = true;
            return Err(after_mail(self.closing(Stage::Data, r)));
        }
        if !mail_ok || !any_accepted {
            if go_ahead {
                // The server opened DATA with nobody to deliver to: we cannot end it
                // safely without sending a message, so give up the connection.
                self.broken = true;
            }
            self.needs_rset = true;
            if !mail_ok {
                return Err(TxError::fatal(UpstreamError::Rejected {
                    addr: self.wire.addr.to_string(),
                    stage: Stage::Mail,
                    reply: Reply::from_response(&mail),
                }));
            }
            return Ok(SendReport {
                recipients,
                data: None,
            });
        }
        if !go_ahead {
            self.needs_rset = true;
            let r = data_reply.expect("DATA was sent");
            return Err(TxError::fatal(UpstreamError::Rejected {
                addr: self.wire.addr.to_string(),
                stage: Stage::Data,
                reply: Reply::from_response(&r),
            }));
        }

        // The body: dot-stuffed, in large writes; errors once the final dot may have left
        // are indeterminate (never resent).
        let final_reply = self.write_body(data).await.map_err(TxError::fatal)?;
        self.conclude(recipients, &final_reply)
    }

    /// The report for the reply to the end of the message (final dot or BDAT LAST).
    fn conclude(
        &mut self,
        recipients: Vec<RecipientOutcome>,
        last: &Response<String>,
    ) -> Result<SendReport, TxError> {
        if last.code == 421 {
            // Not delivered, and the server is going away. Reported as an error so our
            // client does not get a 421 (which would tell it *we* are closing).
            self.broken = true;
            return Err(TxError::fatal(self.closing(Stage::Body, last)));
        }
        let reply = Reply::from_response(last);
        if reply.is_positive() {
            self.messages += 1;
        } else {
            self.needs_rset = true;
        }
        Ok(SendReport {
            recipients,
            data: Some(reply),
        })
    }

    /// One transaction in one write and one round trip (RFC 3030 CHUNKING with RFC 2920
    /// PIPELINING, as Gmail offers): `MAIL`, every `RCPT`, `BDAT <n> LAST` and the
    /// message itself (no dot-stuffing), then the replies together.
    ///
    /// Since the message leaves with the MAIL command, a connection that dies before
    /// answering is only safe to retry when our write itself failed (the server had
    /// closed before the bytes arrived) or it first answered with a 4xx/421 (it refused
    /// or was closing, so it took nothing); any other loss is indeterminate.
    async fn transaction_bdat(
        &mut self,
        envelope: &Envelope,
        data: &[u8],
    ) -> Result<SendReport, TxError> {
        use std::io::Write;
        let n = envelope.recipients.len();
        let mut out = Vec::with_capacity(96 + 48 * n + data.len());
        self.mail_command(envelope, data, &mut out);
        for r in &envelope.recipients {
            out.extend_from_slice(b"RCPT TO:<");
            out.extend_from_slice(r.as_bytes());
            out.extend_from_slice(b">\r\n");
        }
        let _ = write!(out, "BDAT {} LAST\r\n", data.len());
        out.extend_from_slice(data);

        if let Err(e) = self.wire.write(&out, Stage::Mail).await {
            return Err(TxError {
                retry_on_fresh: is_dead(&e),
                error: e,
            });
        }
        let mail = match self.wire.read_reply(Stage::Mail).await {
            Ok(r) => r,
            Err(e) => return Err(self.bdat_lost(e)),
        };
        let mail_ok = (200..300).contains(&mail.code);
        if mail.code == 421 || (400..500).contains(&mail.code) {
            // Refused or closing at MAIL: nothing that follows was taken. If the server
            // also hangs up, a fresh connection may retry.
            let refused_mail = |e: UpstreamError| TxError {
                retry_on_fresh: is_dead(&e),
                error: e,
            };
            if mail.code == 421 {
                self.broken = true;
                return Err(refused_mail(self.closing(Stage::Mail, &mail)));
            }
            // Read the rest so the connection stays in step; a hang-up here was most
            // likely an idle timeout racing our batch.
            for _ in 0..=n {
                if let Err(e) = self.wire.read_reply(Stage::Rcpt).await {
                    self.broken = true;
                    return Err(refused_mail(e));
                }
            }
            self.needs_rset = true;
            return Err(TxError::fatal(UpstreamError::Rejected {
                addr: self.wire.addr.to_string(),
                stage: Stage::Mail,
                reply: Reply::from_response(&mail),
            }));
        }
        let mut recipients = Vec::with_capacity(n);
        for r in &envelope.recipients {
            let reply = self
                .wire
                .read_reply(Stage::Rcpt)
                .await
                .map_err(|e| self.bdat_lost(e))?;
            if reply.code == 421 {
                // Closing before the message was taken: not delivered, not resent.
                self.broken = true;
                return Err(TxError::fatal(self.closing(Stage::Rcpt, &reply)));
            }
            recipients.push(RecipientOutcome {
                address: r.clone(),
                accepted: (200..300).contains(&reply.code),
                reply: Reply::from_response(&reply),
            });
        }
        let last = self
            .wire
            .read_reply(Stage::Body)
            .await
            .map_err(|e| self.bdat_lost(e))?;
        if last.code == 421 {
            self.broken = true;
            return Err(TxError::fatal(self.closing(Stage::Body, &last)));
        }
        if !mail_ok {
            self.needs_rset = true;
            return Err(TxError::fatal(UpstreamError::Rejected {
                addr: self.wire.addr.to_string(),
                stage: Stage::Mail,
                reply: Reply::from_response(&mail),
            }));
        }
        if !recipients.iter().any(|r| r.accepted) {
            // The BDAT was refused for want of recipients; the message went nowhere.
            self.needs_rset = true;
            return Ok(SendReport {
                recipients,
                data: None,
            });
        }
        self.conclude(recipients, &last)
    }

    /// A BDAT batch's connection died before its last reply. A reset (RST) means the
    /// server closed with our bytes unread, so the chunk was not taken whole and nothing
    /// was delivered: safe to retry. A clean close is indeterminate: the message may
    /// have been taken, and it is never resent.
    fn bdat_lost(&self, e: UpstreamError) -> TxError {
        match e {
            UpstreamError::ConnectionLost { .. } if self.wire.reset => TxError {
                retry_on_fresh: true,
                error: e,
            },
            UpstreamError::ConnectionLost { addr, cause, .. } => {
                TxError::fatal(UpstreamError::Indeterminate { addr, cause })
            }
            other => TxError::fatal(other),
        }
    }

    async fn write_body(&mut self, data: &[u8]) -> Result<Response<String>, UpstreamError> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::with_capacity(data.len().min(WRITE_CHUNK) + data.len() / 64 + 8);
        let mut rest = data;
        while rest.len() > WRITE_CHUNK {
            let (chunk, tail) = rest.split_at(WRITE_CHUNK);
            stuffer.push(chunk, &mut out);
            // Nothing that ends the DATA has left yet: a failure here is plain loss.
            self.wire.write(&out, Stage::Body).await?;
            out.clear();
            rest = tail;
        }
        stuffer.push(rest, &mut out);
        out.extend_from_slice(terminator(data));
        let addr = self.wire.addr.clone();
        let indeterminate = |e: UpstreamError| UpstreamError::Indeterminate {
            addr: addr.to_string(),
            cause: e.to_string(),
        };
        if let Err(e) = self.wire.write(&out, Stage::Body).await {
            return Err(indeterminate(e));
        }
        match self.wire.read_reply(Stage::Body).await {
            Ok(r) => Ok(r),
            Err(e) => Err(indeterminate(e)),
        }
    }

    /// Says QUIT (briefly waiting for 221) and closes. Errors do not matter here.
    pub async fn quit(mut self) {
        self.wire.timeout = self.wire.timeout.min(Duration::from_secs(5));
        if !self.broken {
            let _ = self.wire.command(b"QUIT\r\n", Stage::Quit).await;
        }
        let _ = tokio::time::timeout(self.wire.timeout, self.wire.stream.shutdown()).await;
        // The connection counts against the upstream's limit until the server has closed
        // it too: wait for that (bounded), so a new one is not opened while it lingers.
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(self.wire.timeout, async {
            while matches!(self.wire.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// RFC 5321 §4.5.2 transparency: a `.` at the start of a line (after CR or LF, or at the
/// very start) gets another `.` in front. Streams: state carries across `push` calls.
struct DotStuffer {
    line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { line_start: true }
    }
}

impl DotStuffer {
    fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut from = 0;
        for (i, &b) in data.iter().enumerate() {
            if b == b'.' && self.line_start {
                out.extend_from_slice(&data[from..i]);
                out.push(b'.');
                from = i;
            }
            self.line_start = b == b'\n' || b == b'\r';
        }
        out.extend_from_slice(&data[from..]);
    }
}

/// What ends the DATA after `data`: the message already ends with CRLF (or is empty), so
/// only `.CRLF` follows; otherwise its last line is closed first.
fn terminator(data: &[u8]) -> &'static [u8] {
    if data.is_empty() || data.ends_with(b"\r\n") {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    }
}

/// The stuffed wire form of a whole message, final dot included (tests, benches).
#[cfg(test)]
pub(crate) fn wire_form(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    DotStuffer::default().push(data, &mut out);
    out.extend_from_slice(terminator(data));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_terminator() {
        assert_eq!(wire_form(b""), b".\r\n");
        assert_eq!(wire_form(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(wire_form(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(wire_form(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n.\r\n");
        assert_eq!(wire_form(b"a\r\nno end"), b"a\r\nno end\r\n.\r\n");
        assert_eq!(wire_form(b"x.y\r\n"), b"x.y\r\n.\r\n");
        // Across chunk boundaries.
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        s.push(b"a\r\n", &mut out);
        s.push(b".b\r\n", &mut out);
        assert_eq!(out, b"a\r\n..b\r\n");
    }

    #[test]
    fn capabilities_from_gmail_ehlo() {
        let text = "smtp.gmail.com at your service, [127.0.0.1]\nSIZE 35882577\n8BITMIME\nAUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\nENHANCEDSTATUSCODES\nPIPELINING\nCHUNKING\nSMTPUTF8";
        let c = Capabilities::parse(text);
        assert!(c.pipelining && c.eightbitmime && c.smtputf8 && !c.starttls);
        assert_eq!(c.size, Some(35882577));
        assert!(c.auth.iter().any(|m| m == "XOAUTH2"));
    }
}
