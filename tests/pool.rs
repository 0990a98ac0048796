//! The upstream pool seen end to end: clients talk to the relay, the relay talks to the
//! sandbox Gmail over its pool, and we count what the sandbox saw.

mod support;

use std::{collections::HashSet, time::Duration};

use smtp_oauth_relay::reply::Reply as SmtpReply;
use support::{message, Client, Harness, Setup};

fn message_ids(h: &Harness) -> Vec<String> {
    h.control()
        .messages()
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Message-ID: ").map(str::to_owned))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_over_four_sessions_use_at_most_pool_size_connections() {
    let h = Harness::start(Setup {
        pool_size: 3,
        // Not recycled after 100 messages here: the count of connections opened is the
        // point of this test.
        account_extra: "max_messages_per_connection = 1000".into(),
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut tasks = Vec::new();
    for s in 0..4 {
        let addr = h.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::ehlo(addr).await;
            for i in 0..50 {
                let r = c
                    .send_mail(
                        "app@example.com",
                        &["you@example.com"],
                        &message(&format!("s{s}m{i}"), "x\r\n"),
                    )
                    .await;
                assert_eq!(r.code, 250, "{r}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = h.control().smtp_stats();
    assert_eq!(stats.messages, 200);
    assert!(
        stats.connections_opened <= 3,
        "pool_size bounds upstream connections: {stats:?}"
    );
    assert!(stats.max_concurrent <= 3, "{stats:?}");
    let ids: HashSet<_> = message_ids(&h).into_iter().collect();
    assert_eq!(ids.len(), 200, "each message exactly once");
    h.stop().await;
}

/// 200 concurrent senders (the relay's default max_connections is 256); returns the
/// sandbox's counters afterwards.
async fn two_hundred_concurrent_clients(pool_size: usize) -> smtp_oauth_relay::sandbox::SmtpStats {
    let h = Harness::start(Setup {
        pool_size,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut tasks = Vec::new();
    for s in 0..200 {
        let addr = h.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::ehlo(addr).await;
            let r = c
                .send_mail(
                    "app@example.com",
                    &["you@example.com"],
                    &message(&format!("c{s}"), "x\r\n"),
                )
                .await;
            assert_eq!(r.code, 250, "{r}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = h.control().smtp_stats();
    h.stop().await;
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_share_pool_size_connections() {
    let stats = two_hundred_concurrent_clients(2).await;
    assert_eq!(stats.messages, 200);
    assert!(stats.max_concurrent <= 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pooling_concurrent_connections_are_still_bounded() {
    let stats = two_hundred_concurrent_clients(0).await;
    assert_eq!(stats.messages, 200);
    assert!(
        stats.connections_opened >= 200,
        "one connection per message: {stats:?}"
    );
    assert!(
        stats.max_concurrent <= smtp_oauth_relay::upstream::PER_MESSAGE_MAX_CONNECTIONS as u64,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dropping_idle_connections_loses_and_duplicates_nothing() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    for i in 0..5 {
        let r = c
            .send_mail(
                "app@example.com",
                &["you@example.com"],
                &message(&format!("d{i}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "{r}");
        // Gmail (or a NAT box) drops the pooled connections between messages.
        h.control().close_idle_connections();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids = message_ids(&h);
    assert_eq!(ids.len(), 5, "each message delivered once: {ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5);
    assert!(
        h.control().smtp_stats().connections_opened >= 2,
        "dead connections were replaced"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_421_mid_session_replaces_the_connection() {
    let h = Harness::start(Setup {
        pool_size: 1,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    h.control().close_after_messages(Some(3));
    let mut c = Client::ehlo(h.addr).await;
    for i in 0..10 {
        let r = c
            .send_mail(
                "app@example.com",
                &["you@example.com"],
                &message(&format!("q{i}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "message {i}: {r}");
    }
    let stats = h.control().smtp_stats();
    assert_eq!(stats.messages, 10);
    assert!(
        stats.connections_opened >= 4,
        "a new connection after every 421: {stats:?}"
    );
    assert_eq!(message_ids(&h).iter().collect::<HashSet<_>>().len(), 10);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rset_after_a_refused_recipient_before_the_next_message() {
    let h = Harness::start(Setup {
        pool_size: 1,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    h.control().refuse_recipient(
        "gone@example.com",
        SmtpReply::new(550, [5, 1, 1], "no such user"),
    );
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["gone@example.com"],
            &message("refused", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 550, "{r}");
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("after", "x\r\n"),
        )
        .await;
    assert_eq!(
        r.code, 250,
        "the pooled connection was reset and reused: {r}"
    );
    let stats = h.control().smtp_stats();
    assert!(
        stats.commands.get("RSET").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotation_while_connections_are_pooled() {
    // 4-second tokens that rotate the refresh token at every refresh: pooled connections
    // stay logged in with old tokens; new ones log in with the current token.
    let h = Harness::start(Setup {
        token_lifetime: Duration::from_secs(4),
        rotate_refresh_tokens: true,
        pool_size: 2,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(7);
    let mut i = 0;
    while tokio::time::Instant::now() < until {
        let mut c = Client::ehlo(h.addr).await;
        let r = c
            .send_mail(
                "app@example.com",
                &["you@example.com"],
                &message(&format!("r{i}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "{r}");
        i += 1;
        if i % 5 == 0 {
            // Force fresh logins now and then.
            h.control().close_idle_connections();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = h.control().smtp_stats();
    assert_eq!(stats.auth_failed, 0, "{stats:?}");
    assert!(h.control().token_stats().refresh_requests >= 3);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&h.token_file).unwrap()).unwrap();
    assert_eq!(
        file["refresh_token"],
        h.control().current_refresh_token().as_str()
    );
    assert_eq!(message_ids(&h).len(), i);
    h.stop().await;
}
