//! The durable spool end to end, over loopback against the sandbox: `250 … queued as ID`,
//! retries (4xx, upstream down, daily quota), bounces (DSN content, `failed/`), damaged
//! queue files, a failing disk, the `queue` CLI, and kill -9 of the real binary under
//! load. Retry timings are shortened through the config; nothing asserts on speed.

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use smtp_oauth_relay::{
    reply::Reply as SmtpReply,
    sandbox::{gmail_daily_quota_exceeded, gmail_no_such_user, ReceivedMessage},
    spool::control::{self, Request, Response},
    spool::SpoolWriter,
};
use support::{logs, message, Client, Harness, Setup};

/// Short retries for tests.
const FAST: &str =
    "min_retry_secs = 0.2\nmax_retry_secs = 1\nprobe_max_secs = 0.5\nquota_retry_secs = 0.5\n";

fn spool_setup() -> Setup {
    Setup {
        spool: Some(FAST.into()),
        ..Setup::default()
    }
}

/// Message-ID → number of deliveries, for messages with a `<…@test>` Message-ID.
fn delivered_ids(msgs: &[ReceivedMessage]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for msg in msgs {
        let text = String::from_utf8_lossy(&msg.data);
        if let Some(i) = text.find("Message-ID: <") {
            let rest = &text[i + 13..];
            if let Some(j) = rest.find('>') {
                *m.entry(rest[..j].to_owned()).or_insert(0) += 1;
            }
        }
    }
    m
}

/// One message from app@example.com on a new session; the reply to its final dot.
async fn send(addr: SocketAddr, mid: &str, to: &[&str], body: &str) -> support::Reply {
    let mut c = Client::ehlo(addr).await;
    c.send_mail("app@example.com", to, &message(mid, body))
        .await
}

/// A relay whose upstream is down, with `n` messages `<prefix>-<i>` to `to` accepted
/// (one session and one commit each); returns their queue IDs.
async fn held(n: usize, prefix: &str, to: &[&str]) -> (Harness, Vec<String>) {
    let h = Harness::start(Setup {
        proxy: Some(false),
        ..spool_setup()
    })
    .await;
    h.token_ready().await;
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send(
            h.addr,
            &format!("{prefix}-{i}"),
            to,
            "queued while down\r\n",
        )
        .await;
        assert_eq!(r.code, 250, "accepted while the upstream is down: {r}");
        ids.push(queue_id(&r));
    }
    (h, ids)
}

fn queue_id(reply: &support::Reply) -> String {
    let t = reply.text();
    t.rsplit(' ').next().unwrap().to_owned()
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn query(dir: &Path, req: Request) -> Response {
    let dir = dir.to_owned();
    control::query(&dir, &req).expect("control request")
}

async fn list(dir: &Path) -> Vec<smtp_oauth_relay::spool::QueueItem> {
    let dir = dir.to_owned();
    match tokio::task::spawn_blocking(move || query(&dir, Request::List))
        .await
        .unwrap()
    {
        Response::Items { items } => items,
        other => panic!("list: {other:?}"),
    }
}

fn queue_files(dir: &Path, sub: &str, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(sub))
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_then_delivered_once() {
    let h = Harness::start(spool_setup()).await;
    h.token_ready().await;
    let r = send(h.addr, "q-1", &["you@example.com"], "hi\r\n").await;
    assert_eq!(r.code, 250, "{r}");
    assert!(r.text().starts_with("2.0.0 Ok: queued as "), "{r}");
    let id = queue_id(&r);
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(delivered_ids(&msgs).get("q-1@test"), Some(&1));
    wait_until("queue empties", 10, || {
        queue_files(&h.spool_dir(), "queue", "seg").is_empty()
    })
    .await;
    assert!(
        logs().contains(&format!("id={id}")),
        "attempt logged with the queue id"
    );
    assert!(logs().contains("delivery attempt: delivered"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_up_delivers_all_once() {
    let (h, _ids) = held(6, "down", &["you@example.com"]).await;
    let dir = h.spool_dir();
    let mut items = Vec::new();
    for _ in 0..100 {
        items = list(&dir).await;
        if items.len() == 6
            && items
                .iter()
                .any(|i| i.attempts > 0 && i.last_error.is_some())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(items.len(), 6, "{items:?}");
    assert!(
        items
            .iter()
            .any(|i| i.last_error.as_deref().is_some_and(|e| e.contains("4."))),
        "the upstream's failure is shown: {items:?}"
    );
    assert!(h.control().messages().is_empty());
    h.proxy.as_ref().unwrap().set_up(true);
    let msgs = h
        .control()
        .wait_for_messages(6, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = delivered_ids(&h.control().messages());
    assert_eq!(got.len(), 6, "{got:?} from {}", msgs.len());
    assert!(
        got.values().all(|&n| n == 1),
        "each delivered once: {got:?}"
    );
    wait_until("queue empties", 10, || {
        queue_files(&dir, "queue", "seg").is_empty()
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_refusal_is_retried() {
    let h = Harness::start(spool_setup()).await;
    h.token_ready().await;
    h.control().inject_reply(
        "DATA-END",
        SmtpReply::new(451, [4, 3, 0], "Mail server temporarily rejected message."),
    );
    let r = send(h.addr, "t-1", &["you@example.com"], "x\r\n").await;
    assert_eq!(r.code, 250, "{r}");
    let id = queue_id(&r);
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(delivered_ids(&msgs).get("t-1@test"), Some(&1));
    wait_until("second attempt logged", 10, || {
        logs()
            .lines()
            .any(|x| x.contains(&id) && x.contains("attempt=2") && x.contains("delivered"))
    })
    .await;
    assert!(
        logs().lines().any(|x| x.contains(&id)
            && x.contains("attempt=1")
            && x.contains("deferred")
            && x.contains("451 4.3.0")),
        "the deferral is logged with the reply and the next retry"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_refusal_bounces_with_a_dsn() {
    let h = Harness::start(spool_setup()).await;
    h.token_ready().await;
    h.control()
        .refuse_recipient("nobody@example.org", gmail_no_such_user());
    let r = send(
        h.addr,
        "b-1",
        &["you@example.com", "nobody@example.org"],
        "secret body\r\n",
    )
    .await;
    assert_eq!(r.code, 250, "{r}");
    let id = queue_id(&r);
    let msgs = h
        .control()
        .wait_for_messages(2, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 2, "the message and the bounce");
    let orig = msgs
        .iter()
        .find(|m| m.mail_from == "app@example.com")
        .unwrap();
    assert_eq!(orig.rcpt_to, vec!["you@example.com".to_string()]);
    let dsn = msgs
        .iter()
        .find(|m| m.mail_from.is_empty())
        .expect("a DSN from <>");
    assert_eq!(dsn.rcpt_to, vec!["app@example.com".to_string()]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("multipart/report; report-type=delivery-status"));
    assert!(text.contains("Final-Recipient: rfc822; nobody@example.org"));
    assert!(text.contains("Status: 5.1.1"));
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1"));
    assert!(text.contains(&format!("queue ID {id}")));
    assert!(
        text.contains("Message-ID: <b-1@test>"),
        "original headers returned"
    );
    assert!(!text.contains("secret body"));
    assert!(!text.contains("Final-Recipient: rfc822; you@example.com"));
    let failed = h.spool_dir().join("failed");
    wait_until("kept in failed/", 10, || {
        failed.join(format!("{id}.eml")).exists()
    })
    .await;
    let why = std::fs::read_to_string(failed.join(format!("{id}.json"))).unwrap();
    assert!(
        why.contains("nobody@example.org") && why.contains("\"failed\""),
        "{why}"
    );
    // A bounce is never bounced: a refused null-sender message only goes to failed/.
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail("", &["nobody@example.org"], &message("b-2", "x\r\n"))
        .await;
    assert_eq!(r.code, 250, "{r}");
    let id2 = queue_id(&r);
    wait_until("null-sender message kept in failed/", 10, || {
        failed.join(format!("{id2}.eml")).exists()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.control().messages().len(), 2, "no bounce for <>");
    assert!(logs().contains("no bounce to the null sender"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota_defers_instead_of_bouncing() {
    let h = Harness::start(spool_setup()).await;
    h.token_ready().await;
    h.control()
        .inject_reply("MAIL", gmail_daily_quota_exceeded());
    let r = send(h.addr, "quota-1", &["you@example.com"], "x\r\n").await;
    assert_eq!(r.code, 250, "{r}");
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs2 = h.control().messages();
    assert_eq!(
        msgs2.len(),
        1,
        "delivered, no bounce: {:?}",
        msgs2.iter().map(|m| &m.mail_from).collect::<Vec<_>>()
    );
    assert_eq!(msgs[0].mail_from, "app@example.com");
    assert!(logs().contains("5.4.5"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_queue_file_is_moved_aside_and_others_delivered() {
    let (mut h, _ids) = held(3, "c", &["you@example.com"]).await;
    let dir = h.spool_dir();
    if let Some(d) = h.daemon.take() {
        d.shutdown().await;
    }
    let mut segs = queue_files(&dir, "queue", "seg");
    segs.sort();
    assert_eq!(segs.len(), 3, "one batch per message sent one at a time");
    // Cut the middle one short, as a damaged disk would.
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segs[1])
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    // A half-written batch from a crash: never delivered, removed.
    std::fs::write(
        dir.join("tmp").join("000000000000-000000-0000.seg"),
        b"SORSEG01garbage",
    )
    .unwrap();
    h.proxy.as_ref().unwrap().set_up(true);
    h.restart().await;
    let msgs = h
        .control()
        .wait_for_messages(2, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = delivered_ids(&h.control().messages());
    assert_eq!(got.len(), 2, "{got:?} ({} msgs)", msgs.len());
    assert!(!got.contains_key("c-1@test"));
    assert_eq!(queue_files(&dir, "corrupt", "seg").len(), 1);
    assert!(std::fs::read_dir(dir.join("tmp")).unwrap().next().is_none());
    assert!(logs().contains("damaged queue file moved aside"));
    h.stop().await;
}

/// Fails every write while `full` is set, like a full disk.
struct FullDisk(Arc<AtomicBool>);

impl SpoolWriter for FullDisk {
    fn write_all(&self, file: &mut std::fs::File, buf: &[u8]) -> std::io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        std::io::Write::write_all(file, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gets_452_and_nothing_is_damaged() {
    let full = Arc::new(AtomicBool::new(false));
    let h = Harness::start(Setup {
        proxy: Some(false),
        spool_writer: Some(Box::new(FullDisk(full.clone()))),
        ..spool_setup()
    })
    .await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("f-0", "before\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    full.store(true, Ordering::SeqCst);
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("f-1", "full\r\n"),
        )
        .await;
    assert_eq!(r.code, 452, "{r}");
    assert!(r.text().starts_with("4.3.1"), "{r}");
    assert!(
        std::fs::read_dir(h.spool_dir().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "no half-written file left"
    );
    full.store(false, Ordering::SeqCst);
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("f-2", "after\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "the same session goes on: {r}");
    h.proxy.as_ref().unwrap().set_up(true);
    h.control()
        .wait_for_messages(2, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = delivered_ids(&h.control().messages());
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains_key("f-0@test") && got.contains_key("f-2@test"));
    h.stop().await;
}

fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-relay"))
        .arg("--config")
        .arg(config)
        .arg("queue")
        .args(args)
        .output()
        .expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_cli_through_the_daemon_and_without_it() {
    let (h, ids) = held(3, "cli", &["you@example.com", "other@example.com"]).await;
    let config = h.config_path();
    let c2 = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["list"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    for id in &ids {
        assert!(out.contains(id.as_str()), "{out}");
    }
    assert!(
        out.contains("<app@example.com>") && out.contains("-> <other@example.com>"),
        "{out}"
    );
    let c2 = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["list", "--json"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "items");
    assert_eq!(v["items"].as_array().map(|a| a.len()), Some(3), "{v}");
    assert!(
        v["items"][0]["attempts"].is_u64() && v["items"][0]["recipients"].is_array(),
        "{v}"
    );
    let (c2, id0) = (config.clone(), ids[0].clone());
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["show", &id0]))
        .await
        .unwrap();
    assert!(ok && out.contains("Message-ID: <cli-0@test>"), "{out}");
    let (c2, id1) = (config.clone(), ids[1].clone());
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["delete", &id1, "NOSUCHID"]))
        .await
        .unwrap();
    assert!(!ok, "a missing ID fails the command: {out}");
    assert!(
        out.contains(&format!("{}: deleted", ids[1])) && out.contains("NOSUCHID: not in the queue"),
        "{out}"
    );
    let c2 = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["flush"]))
        .await
        .unwrap();
    // Two left after the delete; one may be out as a probe of the down upstream.
    assert!(
        ok && (out.contains("flushed: 2") || out.contains("flushed: 1")),
        "{out}"
    );
    // Without the daemon, the files answer.
    let Harness {
        daemon,
        sandbox,
        proxy,
        dir: _dir,
        ..
    } = h;
    daemon.unwrap().shutdown().await;
    let c2 = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["list"]))
        .await
        .unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains(&ids[0]) && out.contains(&ids[2]) && !out.contains(&ids[1]),
        "{out}"
    );
    let c2 = config.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&c2, &["flush"]))
        .await
        .unwrap();
    assert!(!ok && out.contains("no relay is running"), "{out}");
    drop(proxy);
    sandbox.shutdown();
}

/// The relay binary as a child process on a spool, for kill -9.
struct Child9 {
    child: Child,
    addr: SocketAddr,
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Child9 {
    async fn start(config: &Path, addr: SocketAddr) -> Child9 {
        let child = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-relay"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start relay binary");
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Child9 { child, addr }
    }

    fn kill9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

/// Sends messages on `sessions` connections until stopped or the relay dies; records
/// every Message-ID that got a 250.
async fn load(
    addr: SocketAddr,
    tag: String,
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), raw_session(addr)).await
        else {
            return;
        };
        for _ in 0..5 {
            n += 1;
            let mid = format!("k-{tag}-{n}");
            match c.send(&mid).await {
                Some(true) => acked.lock().unwrap().push(format!("{mid}@test")),
                Some(false) => {}
                None => return,
            }
        }
    }
}

/// A minimal pipelining client that tolerates the server dying at any byte.
struct Raw {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

async fn raw_session(addr: SocketAddr) -> std::io::Result<Raw> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    let mut r = Raw { s, buf: Vec::new() };
    r.codes(1).await.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    use tokio::io::AsyncWriteExt;
    r.s.write_all(b"EHLO load\r\n").await?;
    r.codes(1).await.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    Ok(r)
}

impl Raw {
    async fn codes(&mut self, n: usize) -> Option<Vec<u16>> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        loop {
            while let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).collect();
                if line.len() >= 4 && line[3] == b' ' {
                    out.push(std::str::from_utf8(&line[..3]).ok()?.parse().ok()?);
                    if out.len() == n {
                        return Some(out);
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            let k = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if k == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..k]);
        }
    }

    /// One transaction; `Some(true)` on 250 for the final dot.
    async fn send(&mut self, mid: &str) -> Option<bool> {
        use tokio::io::AsyncWriteExt;
        let mut out =
            b"MAIL FROM:<app@example.com>\r\nRCPT TO:<you@example.com>\r\nDATA\r\n".to_vec();
        self.s.write_all(&out).await.ok()?;
        if self.codes(3).await? != [250, 250, 354] {
            return Some(false);
        }
        out = message(mid, &"load line\r\n".repeat(20));
        out.extend_from_slice(b".\r\n");
        self.s.write_all(&out).await.ok()?;
        Some(self.codes(1).await?[0] == 250)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_acknowledged_message() {
    let h = Harness::start(spool_setup()).await;
    h.token_ready().await;
    // The child relay: same sandbox, its own port, its own spool.
    let addr = free_addr();
    let config = h.dir.path().join("child.toml");
    let text = h
        .config_text
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"{addr}\"]"),
        )
        .replace(
            &format!("dir = \"{}\"", h.spool_dir().display()),
            &format!("dir = \"{}\"", h.dir.path().join("child-spool").display()),
        );
    assert!(text.contains("child-spool"));
    std::fs::write(&config, text).unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    for round in 0..5 {
        let child = Child9::start(&config, addr).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for s in 0..6 {
            tasks.push(tokio::spawn(load(
                child.addr,
                format!("{round}-{s}"),
                acked.clone(),
                stop.clone(),
            )));
        }
        let wait = 150 + rand::random::<u64>() % 500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill9();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            let _ = t.await;
        }
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load got messages through: {}",
        acked.len()
    );
    // A last run, left alone, delivers whatever is queued.
    let child = Child9::start(&config, addr).await;
    let mut missing = Vec::new();
    for _ in 0..300 {
        let got = delivered_ids(&h.control().messages());
        missing = acked
            .iter()
            .filter(|m| !got.contains_key(*m))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill9();
    let got = delivered_ids(&h.control().messages());
    let dups = acked
        .iter()
        .filter(|m| got.get(*m).is_some_and(|&n| n > 1))
        .count();
    eprintln!(
        "kill -9 loop: {} acknowledged, {} delivered (unique), {dups} delivered twice",
        acked.len(),
        got.len()
    );
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_with_the_recipients_still_pending() {
    let mut h = Harness::start(Setup {
        spool: Some("min_retry_secs = 600\n".into()),
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    h.control().refuse_recipient(
        "later@example.org",
        SmtpReply::new(
            450,
            [4, 2, 1],
            "The user you are trying to contact is receiving mail too quickly.",
        ),
    );
    let r = send(
        h.addr,
        "r-1",
        &["now@example.org", "later@example.org"],
        "x\r\n",
    )
    .await;
    assert_eq!(r.code, 250, "{r}");
    let id = queue_id(&r);
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs[0].rcpt_to, vec!["now@example.org".to_string()]);
    let dir = h.spool_dir();
    wait_until("state saved", 10, || {
        dir.join("queue").join(format!("{id}.state")).exists()
    })
    .await;
    // The queue hears of the attempt's outcome just after the state file is written.
    let mut items = list(&dir).await;
    for _ in 0..100 {
        if items.len() == 1 && items[0].status != "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        items = list(&dir).await;
    }
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].recipients, vec!["later@example.org".to_string()]);
    assert_eq!(items[0].attempts, 1);
    assert!(
        items[0]
            .next_attempt
            .is_some_and(|t| t > items[0].arrival + 300),
        "{items:?}"
    );
    assert!(
        items[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("450 4.2.1")),
        "{items:?}"
    );
    // The next try is 10 minutes away; a restart tries at once, only the pending one.
    h.control().accept_recipient("later@example.org");
    h.restart().await;
    let msgs = h
        .control()
        .wait_for_messages(2, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1].rcpt_to, vec!["later@example.org".to_string()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.control().messages().len(), 2, "now@ is not sent again");
    wait_until("queue empties", 10, || {
        queue_files(&dir, "queue", "seg").is_empty()
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_queues_then_flows_after_a_new_refresh_token() {
    let h = Harness::start(Setup {
        before_start: Some(Box::new(|sb: &support::Sandbox| {
            sb.control.revoke_refresh_tokens()
        })),
        ..spool_setup()
    })
    .await;
    for i in 0..3 {
        let r = send(h.addr, &format!("tok-{i}"), &["you@example.com"], "x\r\n").await;
        assert_eq!(r.code, 250, "queued without a token: {r}");
    }
    let dir = h.spool_dir();
    let mut items = Vec::new();
    for _ in 0..100 {
        items = list(&dir).await;
        if items.iter().any(|i| i.last_error.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        items
            .iter()
            .any(|i| i.last_error.as_deref().is_some_and(|e| e.contains("token"))),
        "{items:?}"
    );
    // What `authorize` does: a new refresh token in the token file. No restart.
    let fresh = h.control().issue_refresh_token();
    std::fs::write(&h.token_file, format!("{{\"refresh_token\": \"{fresh}\"}}")).unwrap();
    h.control()
        .wait_for_messages(3, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = delivered_ids(&h.control().messages());
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.values().all(|&n| n == 1), "{got:?}");
    h.stop().await;
}
