//! Several accounts: each message leaves through the account its envelope sender routes
//! to (two sandbox "providers" here), and a sender no account takes is refused at MAIL.
//! With the spool, one account's outage holds only that account's mail.

mod support;

use std::time::Duration;

use smtp_oauth_relay::{config::Config, daemon::Daemon};
use support::{init_logging, message, Client, Proxy, Sandbox, SandboxOptions};

/// An `[[account]]` table for `sb`, its token and CA files written into `dir`.
fn account(sb: &Sandbox, dir: &std::path::Path, name: &str, extra: &str) -> String {
    let token = dir.join(format!("{name}.json"));
    std::fs::write(
        &token,
        format!("{{\"refresh_token\":\"{}\"}}", sb.refresh_token),
    )
    .unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, &sb.ca_pem).unwrap();
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"custom\"\nusername = \"{user}\"\nclient_id = \"{id}\"\n\
         client_secret = \"{secret}\"\ntoken_file = \"{token}\"\nsmtp_host = \"{ip}\"\nsmtp_port = {port}\n\
         tls_server_name = \"{tls}\"\ntoken_url = \"{url}\"\nca_file = \"{ca}\"\npool_size = 1\n{extra}\n",
        user = sb.username,
        id = sb.client_id,
        secret = sb.client_secret,
        token = token.display(),
        ip = sb.smtp_addr.ip(),
        port = sb.smtp_addr.port(),
        tls = sb.tls_server_name,
        url = sb.token_url,
        ca = ca.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sender_leaves_through_its_own_account() {
    init_logging();
    let start = |user: &str| {
        Sandbox::start(SandboxOptions {
            username: Some(user.to_owned()),
            ..SandboxOptions::default()
        })
    };
    let sales = start("sales@corp.example").await.unwrap();
    let ops = start("ops@corp.example").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"relay.test\"\n\n{}{}",
        account(
            &sales,
            dir.path(),
            "sales",
            "senders = [\"erp@corp.example\"]"
        ),
        account(
            &ops,
            dir.path(),
            "ops",
            "senders = [\"@monitoring.example\"]"
        ),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    let addr = daemon.local_addrs[0];

    let mut c = Client::ehlo(addr).await;
    let r = c
        .send_mail(
            "erp@corp.example",
            &["a@example.org"],
            &message("erp", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    let r = c
        .send_mail(
            "nagios@monitoring.example",
            &["b@example.org"],
            &message("mon", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    // Nobody takes this sender, and there is no default: refused at MAIL, with the fix.
    let r = c.cmd("MAIL FROM:<stranger@elsewhere.example>").await;
    assert_eq!(r.code, 550, "{r}");
    assert!(
        r.text().starts_with("5.7.1") && r.text().contains("default = true"),
        "{r}"
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let s = sales
        .control
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    let o = ops
        .control
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].mail_from, "erp@corp.example");
    assert_eq!(s[0].auth_user, sales.username);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].mail_from, "nagios@monitoring.example");
    daemon.shutdown().await;
}

/// Message-ID (`<…@test>`) → how many times `sb` received it.
fn received_ids(sb: &Sandbox) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for msg in sb.control.messages() {
        let text = String::from_utf8_lossy(&msg.data);
        if let Some(id) = text
            .split("Message-ID: <")
            .nth(1)
            .and_then(|r| r.split('>').next())
        {
            *m.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    m
}

/// The spool's counters once `queued` messages are left (or after 2 s).
async fn spool_settled(daemon: &Daemon, queued: usize) -> smtp_oauth_relay::spool::SpoolStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let stats = daemon.spool_stats().await.unwrap();
        if stats.queued == queued || tokio::time::Instant::now() >= deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_spool_one_accounts_outage_holds_only_its_own_mail() {
    init_logging();
    let start = |user: &str| {
        Sandbox::start(SandboxOptions {
            username: Some(user.to_owned()),
            ..SandboxOptions::default()
        })
    };
    let sales = start("sales@corp.example").await.unwrap();
    let ops = start("ops@corp.example").await.unwrap();
    // Sales' Gmail is down: its connections are closed at once.
    let proxy = Proxy::start(sales.smtp_addr).await;
    proxy.set_up(false);
    let dir = tempfile::tempdir().unwrap();
    let sales_account = account(
        &sales,
        dir.path(),
        "sales",
        "senders = [\"erp@corp.example\"]",
    )
    .replace(
        &format!("smtp_port = {}\n", sales.smtp_addr.port()),
        &format!("smtp_port = {}\n", proxy.addr.port()),
    );
    // Probes 1 s, then 2 s apart: with one gate for the whole queue, ops' mail would
    // wait behind every one of sales' held messages being probed in turn (> 15 s).
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"relay.test\"\n\n{}{}\n[spool]\ndir = \"{}\"\n\
         min_retry_secs = 0.2\nmax_retry_secs = 1\nprobe_max_secs = 2\nworkers = 2\n",
        sales_account,
        account(
            &ops,
            dir.path(),
            "ops",
            "senders = [\"@monitoring.example\"]"
        ),
        dir.path().join("spool").display(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    let addr = daemon.local_addrs[0];

    let mut c = Client::ehlo(addr).await;
    for i in 0..12 {
        let r = c
            .send_mail(
                "erp@corp.example",
                &["a@example.org"],
                &message(&format!("sales-{i}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "queued while sales is down: {r}");
    }
    for i in 0..4 {
        let r = c
            .send_mail(
                "nagios@monitoring.example",
                &["b@example.org"],
                &message(&format!("ops-{i}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "{r}");
    }
    assert_eq!(c.cmd("QUIT").await.code, 221);

    // Ops' mail goes out promptly while sales is held.
    let t0 = tokio::time::Instant::now();
    let o = ops
        .control
        .wait_for_messages(4, Duration::from_secs(20))
        .await;
    assert_eq!(o.len(), 4, "ops' mail delivered");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "ops' mail was not held behind sales' outage: {:?}",
        t0.elapsed()
    );
    assert!(sales.control.messages().is_empty());
    // The last of ops' messages leaves the queue once the relay has its reply.
    let stats = spool_settled(&daemon, 12).await;
    assert_eq!(stats.queued, 12, "sales' mail stays queued: {stats:?}");
    assert!(
        stats.upstream.contains("sales") && !stats.upstream.contains("ops"),
        "only sales is held: {stats:?}"
    );

    // Sales comes back: its next probe releases its mail, each message once.
    proxy.set_up(true);
    sales
        .control
        .wait_for_messages(12, Duration::from_secs(20))
        .await;
    let stats = spool_settled(&daemon, 0).await;
    assert_eq!(
        (stats.queued, stats.upstream.as_str()),
        (0, "up"),
        "{stats:?}"
    );
    let s = received_ids(&sales);
    let o = received_ids(&ops);
    assert_eq!(s.len(), 12, "{s:?}");
    assert!(
        s.keys().all(|k| k.starts_with("sales-")) && s.values().all(|&n| n == 1),
        "sales' mail through sales, once each: {s:?}"
    );
    assert_eq!(o.len(), 4, "{o:?}");
    assert!(
        o.keys().all(|k| k.starts_with("ops-")) && o.values().all(|&n| n == 1),
        "ops' mail through ops, once each: {o:?}"
    );
    daemon.shutdown().await;
}
