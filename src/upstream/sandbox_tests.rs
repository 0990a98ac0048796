//! The upstream pool against the shared fake Gmail (`crate::sandbox`): the same
//! behaviours as `tests`, checked against the fake the rest of the project uses.

use std::time::Duration;

use super::{UpstreamError, UpstreamPool, UpstreamSettings};
use crate::{
    envelope::{BodyType, Envelope},
    oauth::TokenHandle,
    reply::Reply,
    sandbox::{gmail_daily_quota_exceeded, gmail_no_such_user, Sandbox, SandboxOptions},
};

async fn access_token(sb: &Sandbox) -> String {
    let resp = reqwest::Client::new()
        .post(&sb.token_url)
        .basic_auth(&sb.client_id, Some(&sb.client_secret))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", sb.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = resp.json().await.unwrap();
    json["access_token"].as_str().unwrap().to_string()
}

fn settings(sb: &Sandbox, pool_size: usize) -> UpstreamSettings {
    let mut s = UpstreamSettings::new(
        sb.smtp_addr.ip().to_string(),
        sb.smtp_addr.port(),
        "relay.test",
        sb.username.clone(),
        sb.client_tls_config(),
    );
    s.tls_server_name = sb.tls_server_name.clone();
    s.pool_size = pool_size;
    s.connect_timeout = Duration::from_secs(5);
    s.command_timeout = Duration::from_secs(5);
    s
}

async fn setup(pool_size: usize) -> (Sandbox, UpstreamPool) {
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let token = access_token(&sb).await;
    let pool = UpstreamPool::new(
        settings(&sb, pool_size),
        TokenHandle::fixed(&token, Duration::from_secs(3000)),
    );
    (sb, pool)
}

fn envelope(to: &[&str]) -> Envelope {
    Envelope {
        sender: "relay@sandbox.test".into(),
        recipients: to.iter().map(|s| s.to_string()).collect(),
        body: BodyType::EightBitMime,
        smtputf8: false,
    }
}

const MSG: &[u8] = b"Subject: t\r\n\r\n.dot line\r\n..two\r\n8-bit \xe9\xff\r\nend\r\n";

#[tokio::test]
async fn sandbox_many_callers_share_pool_size_connections_and_bytes_arrive_exactly() {
    let (sb, pool) = setup(4).await;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..20 {
        let pool = pool.clone();
        tasks.spawn(async move {
            for i in 0..10 {
                let to = format!("r{c}-{i}@example.org");
                assert!(pool.send(&envelope(&[&to]), MSG).await.unwrap().delivered());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let stats = sb.control.smtp_stats();
    assert!(stats.max_concurrent <= 4, "{stats:?}");
    assert_eq!(stats.messages, 200);
    assert!(pool.stats().connections_opened <= 4);
    let msgs = sb.control.messages();
    assert!(msgs.iter().all(|m| m.data == MSG));
    assert_eq!(msgs[0].body_param.as_deref(), Some("8BITMIME"));
}

#[tokio::test]
async fn sandbox_refused_recipient_is_reported_and_the_connection_reused() {
    let (sb, pool) = setup(1).await;
    sb.control
        .refuse_recipient("nobody@example.org", gmail_no_such_user());
    let r = pool
        .send(&envelope(&["nobody@example.org"]), MSG)
        .await
        .unwrap();
    assert_eq!(r.data, None);
    assert_eq!(r.recipients[0].reply.code, 550);
    assert_eq!(r.recipients[0].reply.esc, Some([5, 1, 1]));
    let r = pool
        .send(&envelope(&["nobody@example.org", "b@example.org"]), MSG)
        .await
        .unwrap();
    assert!(r.delivered());
    assert!(!r.recipients[0].accepted && r.recipients[1].accepted);
    assert_eq!(pool.stats().connections_opened, 1);
    assert_eq!(sb.control.messages().len(), 1);
}

#[tokio::test]
async fn sandbox_closed_connections_are_replaced_without_duplicates() {
    let (sb, pool) = setup(2).await;
    sb.control.close_after_messages(Some(3));
    for i in 0..10 {
        let to = format!("r{i}@example.org");
        assert!(pool.send(&envelope(&[&to]), MSG).await.unwrap().delivered());
        if i == 5 {
            sb.control.close_idle_connections();
        }
    }
    let msgs = sb.control.messages();
    assert_eq!(msgs.len(), 10);
    let mut rcpts: Vec<String> = msgs.iter().map(|m| m.rcpt_to[0].clone()).collect();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 10);
}

#[tokio::test]
async fn sandbox_bad_token_is_refused_with_the_decoded_challenge() {
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let pool = UpstreamPool::new(
        settings(&sb, 1),
        TokenHandle::fixed("ya29.not-a-token", Duration::from_secs(3000)),
    );
    let err = pool
        .send(&envelope(&["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let UpstreamError::AuthFailed {
        reply, challenge, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!((reply.code, reply.esc), (535, Some([5, 7, 8])));
    assert!(challenge
        .as_deref()
        .unwrap_or("")
        .contains("\"status\":\"400\""));
    assert!(!format!("{err} {err:?}").contains("not-a-token"));
    assert_eq!(err.reply().code, 454);
}

#[tokio::test]
async fn sandbox_upstream_refusals_pass_through() {
    let (sb, pool) = setup(1).await;
    sb.control
        .inject_reply("MAIL", gmail_daily_quota_exceeded());
    let err = pool
        .send(&envelope(&["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (550, Some([5, 4, 5])));
    sb.control.inject_reply(
        "DATA-END",
        Reply::new(451, [4, 3, 0], "Mail server temporarily rejected message."),
    );
    let report = pool.send(&envelope(&["b@example.org"]), MSG).await.unwrap();
    let data = report.data.unwrap();
    assert_eq!((data.code, data.esc), (451, Some([4, 3, 0])));
    assert!(pool
        .send(&envelope(&["b@example.org"]), MSG)
        .await
        .unwrap()
        .delivered());
    assert_eq!(pool.stats().connections_opened, 1);
}

/// Not a pass/fail test: sends per second against the shared fake Gmail, pooled (4) and
/// one connection per message (0). `cargo test --lib upstream::sandbox_tests::sandbox_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn sandbox_throughput() {
    for (pool_size, total) in [(4usize, 5000usize), (0, 500)] {
        let (sb, pool) = setup(pool_size).await;
        sb.control.set_keep_messages(false);
        pool.warm().await;
        let callers = 32;
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let body: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(MSG.repeat(40));
        for _ in 0..callers {
            let (pool, body) = (pool.clone(), body.clone());
            tasks.spawn(async move {
                for _ in 0..total / callers {
                    let r = pool.send(&envelope(&["b@example.org"]), &body).await;
                    assert!(r.unwrap().delivered());
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let n = (total / callers) * callers;
        println!(
            "sandbox pool_size {pool_size}: {n} messages of {} bytes in {secs:.2} s = {:.0} msgs/s; {:?}",
            body.len(),
            n as f64 / secs,
            pool.stats()
        );
    }
}

#[tokio::test]
async fn sandbox_small_messages_go_as_one_bdat_batch_large_ones_with_data() {
    let (sb, pool) = setup(1).await;
    // Gmail offers CHUNKING + PIPELINING: a small message is MAIL, RCPT, BDAT LAST and
    // its bytes in one write, never dot-stuffed (a lone "." line stays as it is).
    let small = b"Subject: s\r\n\r\n.\r\n..x\r\n".to_vec();
    assert!(pool
        .send(&envelope(&["a@example.org"]), &small)
        .await
        .unwrap()
        .delivered());
    let stats = sb.control.smtp_stats();
    assert_eq!(stats.commands.get("BDAT").copied(), Some(1), "{stats:?}");
    assert_eq!(stats.commands.get("DATA").copied(), None, "{stats:?}");
    assert_eq!(sb.control.messages()[0].data, small);

    // Larger than one write: the DATA path, dot-stuffed, byte-exact at the other end.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 300 * 1024 {
        big.extend_from_slice(b".a line that starts with a dot, 0123456789\r\n");
    }
    assert!(pool
        .send(&envelope(&["b@example.org"]), &big)
        .await
        .unwrap()
        .delivered());
    let stats = sb.control.smtp_stats();
    assert_eq!(stats.commands.get("DATA").copied(), Some(1), "{stats:?}");
    assert_eq!(sb.control.messages()[1].data, big);
}

#[tokio::test]
async fn sandbox_bdat_with_every_recipient_refused_reports_them_and_resets() {
    let (sb, pool) = setup(1).await;
    sb.control
        .refuse_recipient("gone@example.org", gmail_no_such_user());
    let report = pool
        .send(&envelope(&["gone@example.org"]), b"Subject: x\r\n\r\nx\r\n")
        .await
        .unwrap();
    assert!(report.data.is_none(), "nobody accepted: {report:?}");
    assert_eq!(report.recipients[0].reply.code, 550);
    assert!(sb.control.messages().is_empty());
    // The same connection carries the next message.
    assert!(pool
        .send(&envelope(&["ok@example.org"]), b"Subject: y\r\n\r\ny\r\n")
        .await
        .unwrap()
        .delivered());
    let stats = sb.control.smtp_stats();
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert!(
        stats.commands.get("RSET").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
}

#[tokio::test]
async fn sandbox_535_5_7_3_says_enable_authenticated_smtp() {
    let (sb, pool) = setup(1).await;
    // Microsoft 365's answer when SMTP AUTH is disabled for the mailbox or tenant.
    sb.control.inject_reply(
        "AUTH",
        Reply::new(
            535,
            [5, 7, 3],
            "Authentication unsuccessful [SN4PR0501CA0054.namprd05.prod.outlook.com 2026-11-25T16:58:00.000Z]",
        ),
    );
    let err = pool
        .send(&envelope(&["b@example.org"]), MSG)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::AuthFailed { reply, .. } if reply.code == 535),
        "{err:?}"
    );
    let log = err.to_string();
    assert!(
        log.contains("Authenticated SMTP") && log.contains("Microsoft 365 admin center"),
        "{log}"
    );
    let r = err.reply();
    assert_eq!((r.code, r.esc), (454, Some([4, 7, 0])));
    assert!(
        r.text.contains("Authenticated SMTP") && r.text.is_ascii(),
        "{}",
        r.text
    );
}
