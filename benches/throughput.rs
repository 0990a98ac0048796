//! Load benchmark: msgs/s, added latency, upstream connections and peak RSS of the relay.
//!
//! Starts the sandbox provider in this process and the real `smtp-oauth-relay` binary as a
//! child (so its RSS is its own), then drives client sessions over loopback:
//!   direct     — sessions talk straight to the sandbox over authenticated STARTTLS
//!                connections they reuse (the upstream's limit);
//!   pooled     — through the relay, pool on, one client connection per message
//!                (like Postfix's smtp-source);
//!   pooled-reuse — through the relay, clients reuse their connection;
//!   per-message — through the relay with pool_size = 0 (at most 4 connections at once),
//!                both client patterns;
//!   spool      — through the relay with `[spool]`: every 250 follows a durable (fsynced)
//!                write; the fsyncs per message come from the spool's own counter, read
//!                over its control socket.
//! Then 1,000 idle client connections for the RSS figure.
//!
//! Run: `cargo bench --bench throughput` (env BENCH_SECS, BENCH_SESSIONS, BENCH_SIZE;
//! BENCH_RUNS=direct,pooled,spool,idle to pick runs).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use smtp_oauth_relay::{
    demo::{write_relay_config, RelayConfigOptions},
    sandbox::{Sandbox, SandboxOptions},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads replies until `n` complete replies (last lines) have arrived; returns the codes.
async fn read_replies<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, n: usize) -> Vec<u16> {
    let mut codes = Vec::with_capacity(n);
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..pos + 2).collect();
            if line.len() >= 4 && line[3] == b' ' {
                let code = std::str::from_utf8(&line[..3]).unwrap().parse().unwrap();
                codes.push(code);
                if codes.len() == n {
                    return codes;
                }
            }
        }
        let k = s.read(&mut chunk).await.expect("read");
        assert!(k > 0, "connection closed while waiting for replies");
        buf.extend_from_slice(&chunk[..k]);
    }
}

fn message(size: usize, seq: u64) -> Vec<u8> {
    let mut m = format!(
        "From: bench@example.com\r\nTo: sink@example.com\r\nSubject: bench {seq}\r\nMessage-ID: <{seq}.bench@example.com>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstu\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m
}

/// One transaction on an open, greeted, EHLO'd connection (pipelined).
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut Vec<u8>, body: &[u8]) {
    s.write_all(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n")
        .await
        .unwrap();
    let codes = read_replies(s, buf, 3).await;
    assert_eq!(codes, vec![250, 250, 354]);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend_from_slice(body);
    out.extend_from_slice(b".\r\n");
    s.write_all(&out).await.unwrap();
    let codes = read_replies(s, buf, 1).await;
    assert_eq!(codes[0], 250, "message accepted");
}

struct Stats {
    delivered: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    /// One connection per message to the relay.
    PerMessageClient,
    /// Clients keep their connection to the relay.
    ReuseClient,
}

/// Drives `sessions` client sessions against the relay for `secs`; returns msgs/s.
async fn drive_relay(
    addr: SocketAddr,
    sessions: usize,
    secs: u64,
    size: usize,
    mode: Mode,
    rate: Option<f64>,
) -> (f64, Vec<Duration>) {
    let stats = Arc::new(Stats {
        delivered: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let body = Arc::new(message(size, 0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (stats, stop, body) = (stats.clone(), stop.clone(), body.clone());
        let per_session_interval = rate.map(|r| Duration::from_secs_f64(sessions as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<(TcpStream, Vec<u8>)> = None;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(iv) = per_session_interval {
                    next += iv;
                    tokio::time::sleep_until(next.into()).await;
                }
                let t0 = Instant::now();
                if conn.is_none() {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut buf = Vec::new();
                    read_replies(&mut s, &mut buf, 1).await;
                    s.write_all(b"EHLO bench.client\r\n").await.unwrap();
                    read_replies(&mut s, &mut buf, 1).await;
                    conn = Some((s, buf));
                }
                let (s, buf) = conn.as_mut().unwrap();
                transaction(s, buf, &body).await;
                if mode == Mode::PerMessageClient {
                    let (mut s, mut buf) = conn.take().unwrap();
                    s.write_all(b"QUIT\r\n").await.unwrap();
                    read_replies(&mut s, &mut buf, 1).await;
                }
                let dt = t0.elapsed();
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                stats.latencies.lock().unwrap().push(dt);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = stats.delivered.load(Ordering::Relaxed);
    let lat = std::mem::take(&mut *stats.latencies.lock().unwrap());
    (n as f64 / elapsed, lat)
}

/// Straight to the sandbox, as a client that speaks STARTTLS + XOAUTH2 itself would:
/// with `per_message`, a new connection (TCP, STARTTLS, EHLO, AUTH) per message, as the
/// relay's clients do; otherwise one authenticated connection per session, reused for
/// every message (the upstream's limit).
async fn drive_direct(
    sandbox: &Sandbox,
    sessions: usize,
    secs: u64,
    size: usize,
    per_message: bool,
) -> f64 {
    let tls = smtp_oauth_relay::tls::client_config_from_pem(&sandbox.ca_pem).unwrap();
    let token = Arc::new(fetch_token(sandbox).await);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let body = Arc::new(message(size, 0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (stop, count, body, tls, token) = (
            stop.clone(),
            count.clone(),
            body.clone(),
            tls.clone(),
            token.clone(),
        );
        let addr = sandbox.smtp_addr;
        let user = sandbox.username.clone();
        let name = sandbox.tls_server_name.clone();
        tasks.push(tokio::spawn(async move {
            let open = || async {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let mut buf = Vec::new();
                read_replies(&mut s, &mut buf, 1).await;
                s.write_all(b"EHLO bench\r\nSTARTTLS\r\n").await.unwrap();
                read_replies(&mut s, &mut buf, 2).await;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let server_name = rustls_pki_types::ServerName::try_from(name.clone()).unwrap();
                let mut t = connector.connect(server_name, s).await.unwrap();
                let mut buf = Vec::new();
                use base64::Engine;
                let auth = base64::engine::general_purpose::STANDARD
                    .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
                t.write_all(format!("EHLO bench\r\nAUTH XOAUTH2 {auth}\r\n").as_bytes())
                    .await
                    .unwrap();
                let codes = read_replies(&mut t, &mut buf, 2).await;
                assert_eq!(codes[1], 235, "direct session authenticated");
                (t, buf)
            };
            let mut conn = None;
            while !stop.load(Ordering::Relaxed) {
                if conn.is_none() {
                    conn = Some(open().await);
                }
                let (t, buf) = conn.as_mut().unwrap();
                transaction(t, buf, &body).await;
                count.fetch_add(1, Ordering::Relaxed);
                if per_message {
                    let (mut t, mut buf) = conn.take().unwrap();
                    t.write_all(b"QUIT\r\n").await.unwrap();
                    read_replies(&mut t, &mut buf, 1).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn fetch_token(sandbox: &Sandbox) -> String {
    let client = reqwest::Client::new();
    let v: serde_json::Value = client
        .post(&sandbox.token_url)
        .basic_auth(&sandbox.client_id, Some(&sandbox.client_secret))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", sandbox.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// The relay binary as a child process, configured for the sandbox.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    /// The spool directory, when started with one.
    spool: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    async fn start(sandbox: &Sandbox, pool_size: usize) -> RelayProcess {
        RelayProcess::start_with(sandbox, pool_size, false).await
    }

    async fn start_with(sandbox: &Sandbox, pool_size: usize, spool: bool) -> RelayProcess {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = spool.then(|| dir.path().join("spool"));
        let spool_table = spool_dir
            .as_ref()
            .map(|d| format!("\n[spool]\ndir = \"{}\"\n", d.display()))
            .unwrap_or_default();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let path = write_relay_config(
            sandbox,
            dir.path(),
            &RelayConfigOptions {
                listen: addr,
                hostname: "relay.bench",
                pool_size,
                server_extra: "max_connections = 2000",
                account_extra: &spool_table,
                ..RelayConfigOptions::default()
            },
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-relay"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start relay binary");
        // Wait for the listener and for a warm pool.
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        RelayProcess {
            child,
            addr,
            spool: spool_dir,
            _dir: dir,
        }
    }

    /// CPU time (user + system) the relay process has used so far.
    fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(11) + field(12);
        Duration::from_secs_f64(ticks as f64 / 100.0)
    }

    fn peak_rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(
            Path::new("/proc")
                .join(self.child.id().to_string())
                .join("status"),
        )
        .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(lat: &mut [Duration], p: f64) -> Duration {
    if lat.is_empty() {
        return Duration::ZERO;
    }
    lat.sort_unstable();
    lat[((lat.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent; keep that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: skipped (run with `cargo bench --bench throughput`)");
        return;
    }
    smtp_oauth_relay::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let secs = env_u64("BENCH_SECS", 5);
    let sessions = env_u64("BENCH_SESSIONS", 20) as usize;
    let size = env_u64("BENCH_SIZE", 2048) as usize;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    println!(
        "# throughput: {sessions} sessions, {size}-byte messages, {secs} s per run, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| run | msgs/s | p50 ms | p99 ms | upstream conns opened | relay CPU µs/msg | relay peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|");

    let runs = std::env::var("BENCH_RUNS").unwrap_or_else(|_| "direct,pooled,spool,idle".into());
    let want = |r: &str| runs.split(',').any(|x| x.trim() == r);

    let (mut direct, mut direct_pm) = (0.0, 0.0);
    if want("direct") {
        direct = drive_direct(&sandbox, sessions, secs, size, false).await;
        println!("| direct to sandbox, sessions reuse authenticated conns (limit) | {direct:.0} | | | {sessions} | | |");
        let before = sandbox.control.smtp_stats().connections_opened;
        direct_pm = drive_direct(&sandbox, sessions, secs, size, true).await;
        let opened = sandbox.control.smtp_stats().connections_opened - before;
        println!(
            "| direct to sandbox, conn + STARTTLS + AUTH per msg | {direct_pm:.0} | | | {opened} | | |"
        );
    }

    let spool_note = if want("spool") {
        spool_run(&sandbox, sessions, secs, size).await
    } else {
        None
    };

    // Rates by (pool size, client mode).
    let mut rates = std::collections::HashMap::new();
    let pooled_runs = if want("pooled") {
        vec![
            ("relay, pool 4, conn per msg", 4, Mode::PerMessageClient),
            ("relay, pool 4, client reuses conn", 4, Mode::ReuseClient),
            (
                "relay, pool 0 (per-message upstream), conn per msg",
                0,
                Mode::PerMessageClient,
            ),
            (
                "relay, pool 0 (per-message upstream), client reuses conn",
                0,
                Mode::ReuseClient,
            ),
        ]
    } else {
        Vec::new()
    };
    for (label, pool, mode) in pooled_runs {
        let before = sandbox.control.smtp_stats().connections_opened;
        let relay = RelayProcess::start(&sandbox, pool).await;
        let cpu0 = relay.cpu_time();
        let (rate, mut lat) = drive_relay(relay.addr, sessions, secs, size, mode, None).await;
        let cpu = relay.cpu_time() - cpu0;
        let opened = sandbox.control.smtp_stats().connections_opened - before;
        let (_, hwm) = relay.peak_rss_kib();
        println!(
            "| {label} | {rate:.0} | {:.2} | {:.2} | {opened} | {:.0} | {:.1} |",
            percentile(&mut lat, 0.5).as_secs_f64() * 1e3,
            percentile(&mut lat, 0.99).as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6 / (rate * secs as f64).max(1.0),
            hwm as f64 / 1024.0
        );
        rates.insert((pool, mode), rate);
        if pool == 4 && mode == Mode::PerMessageClient {
            // Latency at half the peak rate.
            let (r2, mut lat2) =
                drive_relay(relay.addr, sessions, secs, size, mode, Some(rate / 2.0)).await;
            println!(
                "| {label}, paced at {:.0}/s | {r2:.0} | {:.2} | {:.2} | | | |",
                rate / 2.0,
                percentile(&mut lat2, 0.5).as_secs_f64() * 1e3,
                percentile(&mut lat2, 0.99).as_secs_f64() * 1e3
            );
        }
    }
    let rate = |pool: usize, mode: Mode| rates.get(&(pool, mode)).copied().unwrap_or(0.0);
    if want("pooled") {
        let pooled = rate(4, Mode::PerMessageClient);
        if want("direct") {
            println!(
                "\npooled (conn per msg) / direct limit = {:.2}; / direct conn per msg (the same load straight to the sandbox) = {:.2}",
                pooled / direct.max(1.0),
                pooled / direct_pm.max(1.0),
            );
        }
        println!(
            "pooled / per-message upstream: clients with a conn per msg {:.2}; clients reusing conns {:.2}",
            pooled / rate(0, Mode::PerMessageClient).max(1.0),
            rate(4, Mode::ReuseClient) / rate(0, Mode::ReuseClient).max(1.0),
        );
    }
    if let Some(n) = spool_note {
        println!("\n{n}");
    }
    if !want("idle") {
        return;
    }

    // 1,000 idle client connections.
    let relay = RelayProcess::start(&sandbox, 4).await;
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let mut buf = Vec::new();
        read_replies(&mut s, &mut buf, 1).await;
        s.write_all(b"EHLO idle\r\n").await.unwrap();
        read_replies(&mut s, &mut buf, 1).await;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = relay.peak_rss_kib();
    println!(
        "1000 idle client connections: relay RSS {:.1} MiB, peak {:.1} MiB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(conns);
}

/// The spool run: through a relay with `[spool]`, one client connection per message.
/// Prints its table row; returns the group-commit figures from the spool's counters.
async fn spool_run(sandbox: &Sandbox, sessions: usize, secs: u64, size: usize) -> Option<String> {
    use smtp_oauth_relay::spool::control::{request, Request, Response};
    sandbox.control.set_keep_messages(false);
    let before = sandbox.control.smtp_stats();
    let relay = RelayProcess::start_with(sandbox, 4, true).await;
    let cpu0 = relay.cpu_time();
    let (rate, mut lat) = drive_relay(
        relay.addr,
        sessions,
        secs,
        size,
        Mode::PerMessageClient,
        None,
    )
    .await;
    let cpu = relay.cpu_time() - cpu0;
    let (_, hwm) = relay.peak_rss_kib();
    println!(
        "| relay + spool (fsync before 250), pool 4, conn per msg | {rate:.0} | {:.2} | {:.2} | {} | {:.0} | {:.1} |",
        percentile(&mut lat, 0.5).as_secs_f64() * 1e3,
        percentile(&mut lat, 0.99).as_secs_f64() * 1e3,
        sandbox.control.smtp_stats().connections_opened - before.connections_opened,
        cpu.as_secs_f64() * 1e6 / (rate * secs as f64).max(1.0),
        hwm as f64 / 1024.0
    );
    let dir = relay.spool.clone()?;
    let stats = tokio::task::spawn_blocking(move || request(&dir, &Request::Stats))
        .await
        .ok()?;
    sandbox.control.set_keep_messages(true);
    match stats {
        Ok(Some(Response::Stats(s))) => Some(format!(
            "spool: {} messages committed in {} batches, {} fsyncs = {:.3} fsyncs per message ({:.1} messages per batch); delivered upstream during the run: {}, still queued: {}",
            s.committed,
            s.batches,
            s.fsyncs,
            s.fsyncs_per_message,
            s.committed as f64 / s.batches.max(1) as f64,
            sandbox.control.smtp_stats().messages - before.messages,
            s.queued
        )),
        _ => None,
    }
}
