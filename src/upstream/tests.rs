//! Behaviour of the upstream pool over real loopback sockets against the scripted fake
//! in `fake`: login, pipelining, recycling, retries, and the bytes that reach the server.

use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

use super::{
    fake::{Fake, FakeOptions, CHALLENGE, GOOD_TOKEN, SERVER_NAME},
    UpstreamError, UpstreamPool, UpstreamSettings,
};
use crate::{
    envelope::{BodyType, Envelope},
    oauth::{token_channel, AccessToken, TokenHandle, TokenState},
};

fn settings(fake: &Fake, pool_size: usize) -> UpstreamSettings {
    let mut s = UpstreamSettings::new(
        "127.0.0.1",
        fake.addr.port(),
        "relay.test",
        "user@example.com",
        fake.client_tls.clone(),
    );
    s.tls_server_name = SERVER_NAME.into();
    s.pool_size = pool_size;
    s.connect_timeout = Duration::from_secs(5);
    s.command_timeout = Duration::from_secs(5);
    s.checkout_timeout = Duration::from_secs(5);
    s
}

fn pool(fake: &Fake, pool_size: usize) -> UpstreamPool {
    UpstreamPool::new(
        settings(fake, pool_size),
        TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)),
    )
}

fn envelope(from: &str, to: &[&str]) -> Envelope {
    Envelope {
        sender: from.into(),
        recipients: to.iter().map(|s| s.to_string()).collect(),
        body: BodyType::SevenBit,
        smtputf8: false,
    }
}

const MSG: &[u8] = b"Subject: hi\r\n\r\nHello.\r\n";

#[tokio::test]
async fn xoauth2_login_and_send() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 1);
    let report = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    assert!(report.delivered());
    assert_eq!(report.data.as_ref().unwrap().esc, Some([2, 0, 0]));
    assert_eq!(report.recipients.len(), 1);
    assert!(report.recipients[0].accepted);
    let msgs = fake.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].from, "a@example.com");
    assert_eq!(msgs[0].rcpts, vec!["b@example.org"]);
    assert_eq!(msgs[0].data, MSG);
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.idle, s.messages_sent), (1, 1, 1));
    let cmds = fake.commands();
    let order: Vec<&str> = cmds.iter().map(|c| c.split(' ').nth(1).unwrap()).collect();
    assert_eq!(
        &order[..6],
        &["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT"]
    );
}

#[tokio::test]
async fn refused_token_keeps_the_decoded_challenge_and_no_secret() {
    let fake = Fake::start(FakeOptions::default()).await;
    let secret = "ya29.very-secret-token";
    let pool = UpstreamPool::new(
        settings(&fake, 1),
        TokenHandle::fixed(secret, Duration::from_secs(3600)),
    );
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let UpstreamError::AuthFailed {
        reply, challenge, ..
    } = &err
    else {
        panic!("expected AuthFailed, got {err:?}");
    };
    assert_eq!((reply.code, reply.esc), (535, Some([5, 7, 8])));
    assert!(reply.text.contains("Username and Password not accepted"));
    assert_eq!(challenge.as_deref(), Some(CHALLENGE));
    let shown = format!("{err} {err:?} {}", err.reply());
    assert!(shown.contains(r#""status":"400""#), "{shown}");
    assert!(!shown.contains(secret), "{shown}");
    assert!(!shown.contains("auth=Bearer"), "{shown}");
    assert!(!shown.contains("dXNlcj")); // base64 of "user="
    let r = err.reply();
    assert_eq!((r.code, r.esc), (454, Some([4, 7, 0])));
    assert!(r
        .text
        .starts_with("upstream refused our OAuth token (535 5.7.8"));
    assert!(err.is_transient());
    // The client sent an empty line after the 334, not the credentials again.
    assert!(fake
        .commands()
        .iter()
        .any(|c| c.ends_with("[after 334: 0 bytes]")));
    // The fixed handle has no fresher token to offer: no second login attempt.
    assert_eq!(pool.stats().auth_failures, 1);
    assert_eq!(fake.state.lock().unwrap().connections, 1);
    assert_eq!(pool.stats().connections_open, 0);
}

#[tokio::test]
async fn refused_token_is_refreshed_once_and_login_retried() {
    let fake = Fake::start(FakeOptions::default()).await;
    let (publisher, handle) = token_channel();
    let tok = |s: &str, g| {
        TokenState::Ready(AccessToken::new(
            SecretString::from(s.to_owned()),
            Instant::now() + Duration::from_secs(3600),
            g,
        ))
    };
    publisher.publish(tok("stale-token", 1));
    let manager = tokio::spawn(async move {
        publisher.refresh_requested().await;
        publisher.publish(tok(GOOD_TOKEN, 2));
        publisher
    });
    let pool = UpstreamPool::new(settings(&fake, 2), handle);
    let report = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    assert!(report.delivered());
    let s = pool.stats();
    assert_eq!((s.auth_failures, s.connections_opened), (1, 1));
    drop(manager.await.unwrap());
}

#[tokio::test]
async fn pipelined_mail_rcpt_data_leave_in_one_write() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 1);
    pool.send(
        &envelope(
            "a@example.com",
            &["b@example.org", "c@example.org", "d@example.org"],
        ),
        MSG,
    )
    .await
    .unwrap();
    let batches = fake.state.lock().unwrap().batches.clone();
    assert_eq!(
        batches,
        vec!["MAIL FROM:<a@example.com> SIZE=23\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n"]
    );
}

#[tokio::test]
async fn without_pipelining_commands_go_one_by_one() {
    let fake = Fake::start(FakeOptions {
        pipelining: false,
        refuse: vec!["x@example.org".into()],
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let report = pool
        .send(
            &envelope("a@example.com", &["x@example.org", "b@example.org"]),
            MSG,
        )
        .await
        .unwrap();
    assert!(report.delivered());
    assert!(!report.recipients[0].accepted && report.recipients[1].accepted);
    let batches = fake.state.lock().unwrap().batches.clone();
    assert_eq!(batches, vec!["MAIL FROM:<a@example.com> SIZE=23\r\n"]);
    // All refused: no DATA at all, then RSET before the next transaction.
    let report = pool
        .send(&envelope("a@example.com", &["x@example.org"]), MSG)
        .await
        .unwrap();
    assert_eq!(report.data, None);
    pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    let cmds: Vec<String> = fake
        .commands()
        .into_iter()
        .skip_while(|c| !c.ends_with("DATA"))
        .skip(1)
        .collect();
    assert_eq!(
        cmds,
        vec![
            "1 MAIL FROM:<a@example.com> SIZE=23",
            "1 RCPT TO:<x@example.org>",
            "1 RSET",
            "1 MAIL FROM:<a@example.com> SIZE=23",
            "1 RCPT TO:<b@example.org>",
            "1 DATA",
        ]
    );
}

#[tokio::test]
async fn refused_recipient_is_reported_and_connection_reset_before_reuse() {
    let fake = Fake::start(FakeOptions {
        refuse: vec!["nobody@example.org".into()],
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    // Some refused: delivered to the rest, the refusal reported as the upstream said it.
    let report = pool
        .send(
            &envelope("a@example.com", &["nobody@example.org", "b@example.org"]),
            MSG,
        )
        .await
        .unwrap();
    assert!(report.delivered());
    let r0 = &report.recipients[0];
    assert_eq!(r0.address, "nobody@example.org");
    assert!(!r0.accepted);
    assert_eq!((r0.reply.code, r0.reply.esc), (550, Some([5, 1, 1])));
    assert!(r0.reply.text.contains("does not exist"));
    assert!(report.recipients[1].accepted);
    assert_eq!(fake.messages()[0].rcpts, vec!["b@example.org"]);

    // All refused: no DATA reply to report, and RSET before the next MAIL.
    let report = pool
        .send(&envelope("a@example.com", &["nobody@example.org"]), MSG)
        .await
        .unwrap();
    assert_eq!(report.data, None);
    assert!(!report.recipients[0].accepted);
    pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    let cmds = fake.commands();
    let tail: Vec<&str> = cmds
        .iter()
        .rev()
        .take(5)
        .rev()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(
        tail,
        vec![
            "1 DATA",
            "1 RSET",
            "1 MAIL FROM:<a@example.com> SIZE=23",
            "1 RCPT TO:<b@example.org>",
            "1 DATA",
        ]
    );
    assert_eq!(fake.messages().len(), 2);
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn many_concurrent_callers_never_exceed_pool_size() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 4);
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..64 {
        let pool = pool.clone();
        tasks.spawn(async move {
            for i in 0..5 {
                let to = format!("r{caller}-{i}@example.org");
                let r = pool
                    .send(&envelope("a@example.com", &[&to]), MSG)
                    .await
                    .unwrap();
                assert!(r.delivered());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let s = pool.stats();
    assert!(s.connections_opened <= 4, "{s:?}");
    assert!(s.connections_open <= 4, "{s:?}");
    assert_eq!(s.messages_sent, 320);
    assert_eq!(fake.messages().len(), 320);
    assert!(fake.state.lock().unwrap().max_live <= 4);
}

#[tokio::test]
async fn warm_opens_pool_size_connections() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 3);
    pool.warm().await;
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.idle), (3, 3));
    pool.warm().await;
    assert_eq!(pool.stats().connections_opened, 3);
    pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    assert_eq!(pool.stats().connections_opened, 3);
    pool.close().await;
    assert_eq!(pool.stats().idle, 0);
    fake.wait_for(|s| s.live == 0).await;
    assert_eq!(
        fake.commands()
            .iter()
            .filter(|c| c.ends_with("QUIT"))
            .count(),
        3
    );
}

#[tokio::test]
async fn dead_idle_connection_is_replaced_and_the_message_delivered_once() {
    let fake = Fake::start(FakeOptions {
        vanish_after: Some(1),
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    for to in ["first@example.org", "second@example.org"] {
        let r = pool
            .send(&envelope("a@example.com", &[to]), MSG)
            .await
            .unwrap();
        assert!(r.delivered());
    }
    let msgs = fake.messages();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1].rcpts, vec!["second@example.org"]);
    assert_eq!(msgs[1].conn, 2);
    let s = pool.stats();
    assert_eq!(
        (s.connections_opened, s.retries, s.connections_open),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn idle_connection_closed_by_server_is_not_used() {
    let fake = Fake::start(FakeOptions {
        say_421_after: Some(1),
        ..FakeOptions::default()
    })
    .await;
    let mut s = settings(&fake, 1);
    s.noop_after_idle = Duration::ZERO;
    let pool = UpstreamPool::new(s, TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)));
    for _ in 0..2 {
        assert!(pool
            .send(&envelope("a@example.com", &["b@example.org"]), MSG)
            .await
            .unwrap()
            .delivered());
    }
    // The NOOP before reuse got 421: the connection was dropped before MAIL, not retried.
    let on_first: Vec<String> = fake
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("1 MAIL"))
        .collect();
    assert_eq!(on_first.len(), 1);
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.retries), (2, 0));
    assert_eq!(fake.messages().len(), 2);
}

#[tokio::test]
async fn reply_421_mid_session_replaces_the_connection() {
    let fake = Fake::start(FakeOptions {
        say_421_after: Some(2),
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    for i in 0..3 {
        let to = format!("r{i}@example.org");
        let r = pool
            .send(&envelope("a@example.com", &[&to]), MSG)
            .await
            .unwrap();
        assert!(r.delivered());
    }
    assert_eq!(fake.messages().len(), 3);
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.retries), (2, 1));
}

#[tokio::test]
async fn connection_lost_after_the_final_dot_is_indeterminate_and_not_resent() {
    let fake = Fake::start(FakeOptions {
        vanish_after_dot: true,
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Indeterminate { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.reply().to_string(),
        "451 4.4.2 connection lost after the message was sent; delivery status unknown"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.messages().len(), 1);
    assert_eq!(fake.state.lock().unwrap().connections, 1);
    let s = pool.stats();
    assert_eq!((s.indeterminate, s.connections_open, s.retries), (1, 0, 0));
}

#[tokio::test]
async fn no_starttls_means_no_credentials() {
    let fake = Fake::start(FakeOptions {
        starttls: false,
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::NoStartTls { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("does not offer STARTTLS; refusing to send credentials in clear"));
    assert!(err.is_transient());
    assert!(fake.commands().iter().all(|c| !c.contains("AUTH")));
    assert_eq!(pool.stats().connect_failures, 1);
}

#[tokio::test]
async fn body_bytes_arrive_exactly() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 1);
    let cases: Vec<Vec<u8>> = vec![
        b".starts with a dot\r\n.\r\n..\r\nmid.dle\r\n\r\nlast\r\n".to_vec(),
        b"Subject: caf\xc3\xa9\r\n\r\n8-bit \xe9\xff\x80 bytes\r\n".to_vec(),
        b"no blank line added\r\n".to_vec(),
        {
            // Larger than one write chunk, with dots at line starts throughout.
            let mut big = Vec::new();
            while big.len() < 600_000 {
                big.extend_from_slice(b".line of text that starts with a dot\r\n");
            }
            big
        },
    ];
    for data in &cases {
        let mut env = envelope("", &["b@example.org"]);
        env.body = BodyType::EightBitMime;
        let r = pool.send(&env, data).await.unwrap();
        assert!(r.delivered());
    }
    let msgs = fake.messages();
    for (data, got) in cases.iter().zip(&msgs) {
        assert_eq!(&got.data, data);
        assert_eq!(got.wire, super::conn::wire_form(data));
        assert!(got.wire.ends_with(b"\r\n.\r\n") && !got.wire.ends_with(b"\r\n\r\n.\r\n"));
    }
    assert_eq!(
        msgs[0].wire,
        b"..starts with a dot\r\n..\r\n...\r\nmid.dle\r\n\r\nlast\r\n.\r\n"
    );
    // Null sender and BODY=8BITMIME went out as such.
    assert!(fake
        .state
        .lock()
        .unwrap()
        .batches
        .iter()
        .all(|b| b.starts_with("MAIL FROM:<> SIZE=") && b.contains(" BODY=8BITMIME\r\n")));
}

#[tokio::test]
async fn too_big_or_unsupported_is_refused_without_sending() {
    let fake = Fake::start(FakeOptions {
        size: Some(10),
        smtputf8: false,
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (552, Some([5, 3, 4])));
    let mut env = envelope("a@example.com", &["b@example.org"]);
    env.smtputf8 = true;
    let err = pool.send(&env, b"x\r\n").await.unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (553, Some([5, 6, 7])));
    assert!(!err.is_transient());
    assert!(fake.commands().iter().all(|c| !c.contains("MAIL")));
    // The connection was not harmed.
    pool.send(&envelope("a@example.com", &["b@example.org"]), b"ok\r\n")
        .await
        .unwrap();
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn pool_size_zero_opens_and_quits_a_connection_per_message() {
    let fake = Fake::start(FakeOptions::default()).await;
    let pool = pool(&fake, 0);
    for _ in 0..3 {
        pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
            .await
            .unwrap();
    }
    fake.wait_for(|s| s.live == 0).await;
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.idle), (3, 0));
    assert_eq!(
        fake.commands()
            .iter()
            .filter(|c| c.ends_with("QUIT"))
            .count(),
        3
    );
}

#[tokio::test]
async fn connections_are_retired_after_max_messages() {
    let fake = Fake::start(FakeOptions::default()).await;
    let mut s = settings(&fake, 1);
    s.max_messages_per_connection = 2;
    let pool = UpstreamPool::new(s, TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)));
    for _ in 0..5 {
        pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
            .await
            .unwrap();
    }
    assert_eq!(pool.stats().connections_opened, 3);
    fake.wait_for(|s| s.live == 1).await;
    assert!(fake.commands().contains(&"1 QUIT".to_string()));
}

#[tokio::test]
async fn waiting_too_long_for_a_connection_is_a_pool_timeout() {
    let fake = Fake::start(FakeOptions {
        final_reply_delay: Duration::from_millis(500),
        ..FakeOptions::default()
    })
    .await;
    let mut s = settings(&fake, 1);
    s.checkout_timeout = Duration::from_millis(100);
    let pool = UpstreamPool::new(s, TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)));
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.send(&envelope("a@example.com", &["b@example.org"]), MSG)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = pool
        .send(&envelope("a@example.com", &["c@example.org"]), MSG)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::PoolTimeout { .. }), "{err:?}");
    let r = err.reply();
    assert_eq!((r.code, r.esc), (451, Some([4, 4, 1])));
    assert!(slow.await.unwrap().unwrap().delivered());
}

#[tokio::test]
async fn unreachable_upstream_names_host_and_cause() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let tls = std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    );
    let pool = UpstreamPool::new(
        UpstreamSettings::new("127.0.0.1", port, "relay.test", "u@example.com", tls),
        TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)),
    );
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (451, Some([4, 4, 1])));
    assert!(r.text.contains(&format!("127.0.0.1:{port}")), "{r}");
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_failure() {
    let fake = Fake::start(FakeOptions::default()).await;
    let other = Fake::start(FakeOptions::default()).await; // a different self-signed CA
    let mut s = settings(&fake, 1);
    s.tls = other.client_tls.clone();
    let pool = UpstreamPool::new(s, TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)));
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err:?}");
    assert_eq!(err.reply().esc, Some([4, 4, 1]));
}

#[tokio::test]
async fn no_token_is_454() {
    let fake = Fake::start(FakeOptions::default()).await;
    let (_publisher, handle) = token_channel();
    let mut s = settings(&fake, 1);
    s.connect_timeout = Duration::from_millis(50);
    let pool = UpstreamPool::new(s, handle);
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (454, Some([4, 7, 0])));
    assert!(r.text.contains("no valid OAuth access token"), "{r}");
}

/// Not a pass/fail test: prints sends per second through the pool (pool_size 4) and
/// with a connection per message (pool_size 0). Run with
/// `cargo test --lib upstream::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let fake = Fake::start(FakeOptions::default()).await;
    let body = {
        let mut b = b"Subject: load\r\n\r\n".to_vec();
        while b.len() < 2000 {
            b.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n");
        }
        std::sync::Arc::new(b)
    };
    for (pool_size, total) in [(4usize, 5000usize), (0, 500)] {
        let mut s = settings(&fake, pool_size);
        s.max_messages_per_connection = u32::MAX;
        let pool = UpstreamPool::new(s, TokenHandle::fixed(GOOD_TOKEN, Duration::from_secs(3600)));
        pool.warm().await;
        let callers = 32;
        let start = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let (pool, body) = (pool.clone(), body.clone());
            tasks.spawn(async move {
                for _ in 0..total / callers {
                    let r = pool
                        .send(&envelope("a@example.com", &["b@example.org"]), &body)
                        .await
                        .unwrap();
                    assert!(r.delivered());
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let n = (total / callers) * callers;
        println!(
            "pool_size {pool_size}: {n} messages of {} bytes in {secs:.2} s = {:.0} msgs/s ({:?})",
            body.len(),
            n as f64 / secs,
            pool.stats()
        );
    }
}

#[tokio::test]
async fn refused_message_is_reported_and_reset_before_reuse() {
    let fake = Fake::start(FakeOptions {
        final_reply: Some("550 5.7.1 Our system has detected an unusual rate of mail - gsmtp"),
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let report = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap();
    assert!(!report.delivered());
    let data = report.data.unwrap();
    assert_eq!((data.code, data.esc), (550, Some([5, 7, 1])));
    assert!(report.recipients[0].accepted);
    pool.send(&envelope("a@example.com", &["c@example.org"]), MSG)
        .await
        .unwrap();
    let cmds = fake.commands();
    let after_first_data = cmds.iter().skip_while(|c| !c.ends_with("DATA")).nth(1);
    assert_eq!(after_first_data.map(String::as_str), Some("1 RSET"));
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn reply_421_to_the_final_dot_is_transient_and_not_resent() {
    let fake = Fake::start(FakeOptions {
        final_reply: Some("421 4.7.0 Try again later, closing connection. - gsmtp"),
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    let err = pool
        .send(&envelope("a@example.com", &["b@example.org"]), MSG)
        .await
        .unwrap_err();
    let r = err.reply();
    assert_eq!((r.code, r.esc), (451, Some([4, 7, 0])), "{r}");
    assert_eq!(fake.state.lock().unwrap().connections, 1);
    // The next message gets a new connection.
    assert!(pool
        .send(&envelope("a@example.com", &["c@example.org"]), MSG)
        .await
        .unwrap()
        .delivered());
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.retries), (2, 0));
}

#[tokio::test]
async fn idle_timeout_racing_our_batch_is_retried_on_a_fresh_connection() {
    let fake = Fake::start(FakeOptions {
        say_451_after: Some(1),
        ..FakeOptions::default()
    })
    .await;
    let pool = pool(&fake, 1);
    for i in 0..2 {
        let to = format!("r{i}@example.org");
        assert!(pool
            .send(&envelope("a@example.com", &[&to]), MSG)
            .await
            .unwrap()
            .delivered());
    }
    assert_eq!(fake.messages().len(), 2);
    let s = pool.stats();
    assert_eq!((s.connections_opened, s.retries), (2, 1));
}
