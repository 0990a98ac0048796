//! A small scripted SMTP server for the upstream tests: greeting, EHLO, STARTTLS with a
//! self-signed certificate (rcgen), Gmail-style XOAUTH2 (235, or 334 + multi-line 535),
//! MAIL/RCPT/DATA/RSET/NOOP/QUIT, and knobs to misbehave (vanish, 421, die after the dot).
//! It records what it saw so tests can assert on delivered bytes and command order.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

pub const SERVER_NAME: &str = "smtp.fake.test";
pub const GOOD_TOKEN: &str = "good-token";
/// What the 334 challenge decodes to.
pub const CHALLENGE: &str =
    r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#;

#[derive(Clone)]
pub struct FakeOptions {
    pub starttls: bool,
    pub pipelining: bool,
    pub size: Option<u64>,
    pub smtputf8: bool,
    /// Advertise CHUNKING. This fake does not implement BDAT, so it is off by default and
    /// these tests cover the DATA path; the BDAT path runs against the sandbox.
    pub chunking: bool,
    /// Recipients refused with 550 5.1.1.
    pub refuse: Vec<String>,
    /// Per connection: after this many messages, close silently on the next command.
    pub vanish_after: Option<usize>,
    /// Per connection: after this many messages, answer the next command with 421.
    pub say_421_after: Option<usize>,
    /// Per connection: after this many messages, answer the next command with Gmail's
    /// idle-timeout `451 4.4.2` and close (as if it had raced our command).
    pub say_451_after: Option<usize>,
    /// Read the whole message, then close without replying.
    pub vanish_after_dot: bool,
    /// Wait this long before the reply to the final dot.
    pub final_reply_delay: Duration,
    /// Reply to the final dot with this (CRLF added) instead of 250, for the first message.
    pub final_reply: Option<&'static str>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            starttls: true,
            pipelining: true,
            size: Some(35882577),
            smtputf8: true,
            chunking: false,
            refuse: Vec::new(),
            vanish_after: None,
            say_421_after: None,
            say_451_after: None,
            vanish_after_dot: false,
            final_reply_delay: Duration::ZERO,
            final_reply: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Received {
    pub conn: usize,
    pub from: String,
    pub rcpts: Vec<String>,
    /// The message with dot-stuffing undone, without the final dot line.
    pub data: Vec<u8>,
    /// Exactly what came after 354, final dot included.
    pub wire: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub connections: usize,
    pub live: usize,
    pub max_live: usize,
    pub messages: Vec<Received>,
    /// `"<conn> <command line>"`, AUTH payloads blanked.
    pub commands: Vec<String>,
    /// For each MAIL: the MAIL line plus whatever had already arrived with it.
    pub batches: Vec<String>,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub state: Arc<Mutex<FakeState>>,
}

impl Fake {
    pub async fn start(opts: FakeOptions) -> Fake {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client_tls = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                // Replies go out one small write each: Nagle + delayed ACK would add 40 ms.
                let _ = tcp.set_nodelay(true);
                let id = {
                    let mut s = st.lock().unwrap();
                    s.connections += 1;
                    s.live += 1;
                    s.max_live = s.max_live.max(s.live);
                    s.connections
                };
                let (acceptor, opts, st) = (acceptor.clone(), opts.clone(), st.clone());
                tokio::spawn(async move {
                    let _ = session(tcp, acceptor, &opts, &st, id).await;
                    st.lock().unwrap().live -= 1;
                });
            }
        });
        Fake {
            addr,
            client_tls,
            state,
        }
    }

    pub fn messages(&self) -> Vec<Received> {
        self.state.lock().unwrap().messages.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().commands.clone()
    }

    /// Waits (briefly) until `cond` holds for the state.
    pub async fn wait_for(&self, cond: impl Fn(&FakeState) -> bool) {
        for _ in 0..200 {
            if cond(&self.state.lock().unwrap()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fake server never reached the expected state");
    }
}

type Io = std::io::Result<()>;

async fn session(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    opts: &FakeOptions,
    st: &Mutex<FakeState>,
    id: usize,
) -> Io {
    let mut r = BufReader::new(tcp);
    r.get_mut()
        .write_all(b"220 smtp.fake.test ESMTP ready - gsmtp\r\n")
        .await?;
    loop {
        let Some(line) = read_line(&mut r).await? else {
            return Ok(());
        };
        st.lock().unwrap().commands.push(format!("{id} {line}"));
        let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let w = r.get_mut();
        match verb.as_str() {
            "EHLO" => {
                let mut out = String::from("250-smtp.fake.test at your service\r\n");
                if opts.starttls {
                    out.push_str("250-STARTTLS\r\n");
                }
                out.push_str("250 PIPELINING\r\n");
                w.write_all(out.as_bytes()).await?;
            }
            "STARTTLS" if opts.starttls => {
                w.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                break;
            }
            "QUIT" => {
                w.write_all(b"221 2.0.0 closing connection\r\n").await?;
                return Ok(());
            }
            "MAIL" => {
                w.write_all(b"530 5.7.0 Must issue a STARTTLS command first.\r\n")
                    .await?
            }
            _ => w.write_all(b"502 5.5.1 Unrecognized command.\r\n").await?,
        }
    }
    let tls = acceptor.accept(r.into_inner()).await?;
    secure_session(BufReader::new(tls), opts, st, id).await
}

async fn read_line<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if r.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string(),
    ))
}

async fn secure_session<S: AsyncRead + AsyncWrite + Unpin>(
    mut r: BufReader<S>,
    opts: &FakeOptions,
    st: &Mutex<FakeState>,
    id: usize,
) -> Io {
    let mut authed = false;
    let mut delivered = 0usize;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let Some(line) = read_line(&mut r).await? else {
            return Ok(());
        };
        if opts.vanish_after.is_some_and(|n| delivered >= n) {
            return Ok(());
        }
        if opts.say_421_after.is_some_and(|n| delivered >= n) {
            r.get_mut()
                .write_all(b"421 4.7.0 Try again later, closing connection. - gsmtp\r\n")
                .await?;
            return Ok(());
        }
        if opts.say_451_after.is_some_and(|n| delivered >= n) {
            r.get_mut()
                .write_all(b"451 4.4.2 Timeout - closing connection. - gsmtp\r\n")
                .await?;
            return Ok(());
        }
        let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
        let logged = if verb == "AUTH" {
            "AUTH XOAUTH2 [payload]".to_string()
        } else {
            line.clone()
        };
        st.lock().unwrap().commands.push(format!("{id} {logged}"));
        let reply: String = match verb.as_str() {
            "EHLO" => {
                let mut out = String::from("250-smtp.fake.test at your service\r\n");
                if let Some(n) = opts.size {
                    out.push_str(&format!("250-SIZE {n}\r\n"));
                }
                out.push_str("250-8BITMIME\r\n");
                out.push_str(
                    "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n",
                );
                out.push_str("250-ENHANCEDSTATUSCODES\r\n");
                if opts.pipelining {
                    out.push_str("250-PIPELINING\r\n");
                }
                if opts.smtputf8 {
                    out.push_str("250-SMTPUTF8\r\n");
                }
                if opts.chunking {
                    out.push_str("250-CHUNKING\r\n");
                }
                out.push_str("250 HELP\r\n");
                out
            }
            "AUTH" => {
                let payload = line.split(' ').nth(2).unwrap_or("");
                let decoded = STANDARD.decode(payload).unwrap_or_default();
                let want = format!("auth=Bearer {GOOD_TOKEN}\x01\x01");
                if decoded.starts_with(b"user=") && decoded.ends_with(want.as_bytes()) {
                    authed = true;
                    "235 2.7.0 Accepted\r\n".into()
                } else {
                    let challenge = STANDARD.encode(CHALLENGE);
                    r.get_mut()
                        .write_all(format!("334 {challenge}\r\n").as_bytes())
                        .await?;
                    let empty = read_line(&mut r).await?.unwrap_or_default();
                    st.lock()
                        .unwrap()
                        .commands
                        .push(format!("{id} [after 334: {} bytes]", empty.len()));
                    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials x - gsmtp\r\n".into()
                }
            }
            "MAIL" if !authed => {
                "530-5.7.0 Authentication Required.\r\n530 5.7.0 Learn more - gsmtp\r\n".into()
            }
            "MAIL" => {
                let ahead = String::from_utf8_lossy(r.buffer()).to_string();
                st.lock()
                    .unwrap()
                    .batches
                    .push(format!("{line}\r\n{ahead}"));
                from = Some(between_brackets(&line));
                rcpts.clear();
                "250 2.1.0 OK - gsmtp\r\n".into()
            }
            "RCPT" if from.is_none() => "503 5.5.1 MAIL first.\r\n".into(),
            "RCPT" => {
                let to = between_brackets(&line);
                if opts.refuse.contains(&to) {
                    "550-5.1.1 The email account that you tried to reach does not exist.\r\n550 5.1.1 Please try again. - gsmtp\r\n".into()
                } else {
                    rcpts.push(to);
                    "250 2.1.5 OK - gsmtp\r\n".into()
                }
            }
            "DATA" if rcpts.is_empty() => "554 5.5.1 Error: no valid recipients\r\n".into(),
            "DATA" => {
                r.get_mut().write_all(b"354 Go ahead - gsmtp\r\n").await?;
                let mut wire = Vec::new();
                let mut data = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(());
                    }
                    wire.extend_from_slice(&l);
                    if l == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
                }
                st.lock().unwrap().messages.push(Received {
                    conn: id,
                    from: from.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                    wire,
                });
                if opts.vanish_after_dot {
                    return Ok(());
                }
                tokio::time::sleep(opts.final_reply_delay).await;
                let first = st.lock().unwrap().messages.len() == 1;
                match opts.final_reply.filter(|_| first) {
                    Some(text) if text.starts_with("421") => {
                        r.get_mut()
                            .write_all(format!("{text}\r\n").as_bytes())
                            .await?;
                        return Ok(());
                    }
                    Some(text) => format!("{text}\r\n"),
                    None => {
                        delivered += 1;
                        "250 2.0.0 OK 1700000000 x - gsmtp\r\n".into()
                    }
                }
            }
            "RSET" => {
                from = None;
                rcpts.clear();
                "250 2.1.5 Flushed - gsmtp\r\n".into()
            }
            "NOOP" => "250 2.0.0 OK - gsmtp\r\n".into(),
            "QUIT" => {
                r.get_mut()
                    .write_all(b"221 2.0.0 closing connection - gsmtp\r\n")
                    .await?;
                return Ok(());
            }
            _ => "502 5.5.1 Unrecognized command. - gsmtp\r\n".into(),
        };
        r.get_mut().write_all(reply.as_bytes()).await?;
        r.get_mut().flush().await?;
    }
}

fn between_brackets(line: &str) -> String {
    let start = line.find('<').map(|i| i + 1).unwrap_or(0);
    let end = line[start..]
        .find('>')
        .map(|i| i + start)
        .unwrap_or(line.len());
    line[start..end].to_string()
}
