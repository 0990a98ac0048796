//! Test support: the sandbox provider (the same fake the demo uses, from
//! `smtp_oauth_relay::sandbox`), a relay started against it, a raw SMTP client for
//! byte-exact conversations, and a log capture to check what operators would see.
#![allow(dead_code)]

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

pub use smtp_oauth_relay::sandbox::{Sandbox, SandboxControl, SandboxOptions};
use smtp_oauth_relay::{
    config::Config,
    daemon::{Daemon, DaemonHooks},
    demo::{write_relay_config, RelayConfigOptions},
    spool::SpoolWriter,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Everything tracing logs in this test binary, for assertions on log lines.
pub fn logs() -> String {
    let buf = log_buffer().lock().unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per test binary (debug level, no colours).
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let buf = log_buffer().clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,reqwest=info,rustls=info,h2=info")
            .with_ansi(false)
            .with_writer(move || Capture(buf.clone()))
            .try_init();
        smtp_oauth_relay::tls::install_crypto_provider();
    });
}

/// Something done to the sandbox before the relay starts.
pub type BeforeStart = Box<dyn FnOnce(&Sandbox) + Send>;

/// How to set up a relay + sandbox pair.
pub struct Setup {
    pub token_lifetime: Duration,
    pub rotate_refresh_tokens: bool,
    pub pool_size: usize,
    pub max_message_size: usize,
    pub refresh_margin_secs: u64,
    /// The account's `provider` (its hints and defaults; endpoints are the sandbox's).
    pub provider: &'static str,
    /// Extra lines appended to the [[account]] table.
    pub account_extra: String,
    /// Run this on the sandbox before the relay starts (revoke, inject failures…).
    pub before_start: Option<BeforeStart>,
    /// `Some(extra keys)`: a `[spool]` table with `dir = <tempdir>/spool` and these lines.
    pub spool: Option<String>,
    /// The spool's writer (e.g. one that fails like a full disk).
    pub spool_writer: Option<Box<dyn SpoolWriter>>,
    /// `Some(up)`: put a switchable TCP proxy between the relay and the fake Gmail,
    /// initially up or down.
    pub proxy: Option<bool>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            token_lifetime: Duration::from_secs(3599),
            rotate_refresh_tokens: false,
            pool_size: 2,
            max_message_size: 35_882_577,
            refresh_margin_secs: 300,
            provider: "gmail",
            account_extra: String::new(),
            before_start: None,
            spool: None,
            spool_writer: None,
            proxy: None,
        }
    }
}

/// A relay started against a sandbox, over real loopback sockets.
pub struct Harness {
    pub sandbox: Sandbox,
    pub daemon: Option<Daemon>,
    pub addr: SocketAddr,
    pub token_file: PathBuf,
    pub config_text: String,
    pub dir: tempfile::TempDir,
    /// The proxy in front of the fake Gmail, with `Setup::proxy`.
    pub proxy: Option<Proxy>,
}

impl Harness {
    pub async fn start(setup: Setup) -> Harness {
        init_logging();
        let sandbox = Sandbox::start(SandboxOptions {
            token_lifetime: setup.token_lifetime,
            rotate_refresh_tokens: setup.rotate_refresh_tokens,
            ..SandboxOptions::default()
        })
        .await
        .expect("sandbox starts");
        if let Some(f) = setup.before_start {
            f(&sandbox);
        }
        let dir = tempfile::tempdir().unwrap();
        let proxy = match setup.proxy {
            Some(up) => {
                let p = Proxy::start(sandbox.smtp_addr).await;
                p.set_up(up);
                Some(p)
            }
            None => None,
        };
        let spool = setup
            .spool
            .as_ref()
            .map(|extra| {
                format!(
                    "\n[spool]\ndir = \"{}\"\n{extra}\n",
                    dir.path().join("spool").display()
                )
            })
            .unwrap_or_default();
        let server_extra = format!("max_message_size = {}", setup.max_message_size);
        let account_extra = format!(
            "refresh_margin_secs = {}\n{}\n{spool}",
            setup.refresh_margin_secs, setup.account_extra
        );
        let config_path = write_relay_config(
            &sandbox,
            dir.path(),
            &RelayConfigOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                hostname: "relay.test",
                // Gmail's hints (invalid_grant text) with the sandbox's endpoints, unless
                // the test asks for another provider.
                provider: setup.provider,
                pool_size: setup.pool_size,
                server_extra: &server_extra,
                account_extra: &account_extra,
            },
        )
        .expect("test config written");
        let mut config_text = std::fs::read_to_string(&config_path).unwrap();
        if let Some(p) = &proxy {
            // The relay talks to the fake Gmail through the proxy.
            config_text = config_text.replace(
                &format!("smtp_port = {}\n", sandbox.smtp_addr.port()),
                &format!("smtp_port = {}\n", p.addr.port()),
            );
            std::fs::write(&config_path, &config_text).unwrap();
        }
        let token_file = dir.path().join("sandbox-token.json");
        let config = Config::load(&config_path).expect("test config is valid");
        let daemon = Daemon::start_with(
            config,
            DaemonHooks {
                spool_writer: setup.spool_writer,
            },
        )
        .await
        .expect("relay starts");
        let addr = daemon.local_addrs[0];
        Harness {
            sandbox,
            daemon: Some(daemon),
            addr,
            token_file,
            config_text,
            dir,
            proxy,
        }
    }

    /// The config file the relay runs on.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The `[spool]` directory (with `Setup::spool`).
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Stops the relay (as SIGTERM would) and starts it again on the same config; the
    /// listening address changes.
    pub async fn restart(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
        let config = Config::load(&self.config_path()).expect("test config is valid");
        let daemon = Daemon::start(config).await.expect("relay restarts");
        self.addr = daemon.local_addrs[0];
        self.daemon = Some(daemon);
    }

    pub fn control(&self) -> &SandboxControl {
        &self.sandbox.control
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// Waits until the relay holds a valid access token.
    pub async fn token_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match self.daemon().tokens.ready(Duration::from_secs(20)).await {
                Ok(_) => return,
                // A published failure (e.g. an injected 503) while the manager retries.
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("relay obtains a token: {e}"),
            }
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Stops the relay; it must be done within 30 s (systemd's stop timeout is 90 s).
    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            tokio::time::timeout(Duration::from_secs(30), d.shutdown())
                .await
                .expect("the relay stops within 30 s of shutdown");
        }
        self.sandbox.shutdown();
    }
}

/// A raw SMTP client: sends exactly the bytes it is given, reads whole replies.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One reply: its code and its lines (without the code and separator).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" | "))
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect to relay");
        let mut c = Client {
            stream,
            buf: Vec::new(),
        };
        let greeting = c.reply().await;
        assert_eq!(greeting.code, 220, "greeting: {greeting}");
        c
    }

    /// Connects and says EHLO.
    pub async fn ehlo(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        let r = c.cmd("EHLO client.test").await;
        assert_eq!(r.code, 250, "EHLO: {r}");
        c
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends `line` + CRLF and reads one reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Reads one (possibly multi-line) reply; panics after 30 s or on EOF.
    pub async fn reply(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(30), self.reply_inner())
            .await
            .expect("reply within 30 s")
            .expect("connection open")
    }

    /// Reads one reply, or None at EOF.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        tokio::time::timeout(Duration::from_secs(30), self.reply_inner())
            .await
            .expect("reply within 30 s")
    }

    async fn reply_inner(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let line = String::from_utf8_lossy(&line[..pos]).into_owned();
                let code: u16 = line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .expect("reply code");
                let last = line.as_bytes().get(3) != Some(&b'-');
                lines.push(line.get(4..).unwrap_or("").to_owned());
                if last {
                    return Some(Reply { code, lines });
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A whole transaction; returns the reply to the final dot. `data` is sent as is
    /// followed by `.\r\n` (so it must end with CRLF).
    pub async fn send_mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(r.code, 250, "MAIL: {r}");
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert_eq!(r.code, 250, "RCPT: {r}");
        }
        let r = self.cmd("DATA").await;
        assert_eq!(r.code, 354, "DATA: {r}");
        self.send(data).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

/// A small message with a unique Message-ID.
pub fn message(id: &str, body: &str) -> Vec<u8> {
    format!(
        "From: app@example.com\r\nTo: you@example.com\r\nSubject: test {id}\r\nMessage-ID: <{id}@test>\r\n\r\n{body}"
    )
    .into_bytes()
}

/// The part of a delivered message after our Received: header.
pub fn strip_received(data: &[u8]) -> &[u8] {
    assert!(data.starts_with(b"Received: "), "relay prepends Received:");
    // The header ends at the first CRLF not followed by folding whitespace.
    let mut i = 0;
    while let Some(p) = data[i..].windows(2).position(|w| w == b"\r\n") {
        let end = i + p + 2;
        match data.get(end) {
            Some(b' ') | Some(b'\t') => i = end,
            _ => return &data[end..],
        }
    }
    panic!("unterminated Received header");
}

/// A TCP proxy that can be switched off: then it closes every connection it carries and
/// closes new ones at once (the upstream is "down").
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<Mutex<tokio_util::sync::CancellationToken>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(Mutex::new(tokio_util::sync::CancellationToken::new()));
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cancel = gen2.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cancel.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
        }
    }

    /// Up: connections pass. Down: existing ones are cut, new ones closed at once.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            let mut g = self.generation.lock().unwrap();
            g.cancel();
            *g = tokio_util::sync::CancellationToken::new();
        }
    }
}
