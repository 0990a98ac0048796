//! End to end: a client speaks plain SMTP to the relay, which delivers through the
//! sandbox's fake Gmail (STARTTLS + XOAUTH2) with tokens from its fake token endpoint.

mod support;

use std::time::Duration;

use smtp_oauth_relay::reply::Reply as SmtpReply;
use support::{message, strip_received, Client, Harness, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_byte_exact_with_received_header() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let data = message("plain-1", "Hello,\r\n\r\nthis is a test.\r\n");
    let r = c
        .send_mail("app@example.com", &["you@example.com"], &data)
        .await;
    assert_eq!(r.code, 250, "{r}");
    assert!(
        r.text().starts_with("2.0.0 "),
        "enhanced code passed through: {r}"
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.mail_from, "app@example.com");
    assert_eq!(m.rcpt_to, vec!["you@example.com".to_string()]);
    assert_eq!(m.auth_user, h.sandbox.username);
    assert_eq!(
        strip_received(&m.data),
        &data[..],
        "message reaches upstream byte for byte"
    );
    let received = String::from_utf8_lossy(&m.data[..m.data.len() - data.len()]).into_owned();
    assert!(received.contains("by relay.test"), "{received}");
    assert!(received.contains("client.test"), "{received}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_client() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let data = message("pipe-1", "pipelined\r\n");
    let mut batch = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n".to_vec();
    c.send(&batch).await;
    for expect in [250, 250, 250, 354] {
        let r = c.reply().await;
        assert_eq!(r.code, expect, "{r}");
    }
    batch = data.clone();
    batch.extend_from_slice(b".\r\nQUIT\r\n");
    c.send(&batch).await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 221);
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs[0].rcpt_to.len(), 2);
    assert_eq!(strip_received(&msgs[0].data), &data[..]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_utf8_and_dot_lines_are_byte_exact() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .cmd("MAIL FROM:<jörg@exämple.com> BODY=8BITMIME SMTPUTF8")
        .await;
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(c.cmd("RCPT TO:<ünïcode@example.com>").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 354);
    // As the client puts it on the wire (dot-stuffed), and as it must arrive; the last
    // line is not valid UTF-8 (8-bit bytes pass through untouched).
    let mut wire = "Subject: Grüße\r\n\r\n..leading dot\r\n..\r\nÀ bientôt \u{1F600}\r\n"
        .as_bytes()
        .to_vec();
    let mut content = "Subject: Grüße\r\n\r\n.leading dot\r\n.\r\nÀ bientôt \u{1F600}\r\n"
        .as_bytes()
        .to_vec();
    wire.extend_from_slice(b"\xC3\xA9 raw \xFF\r\n");
    content.extend_from_slice(b"\xC3\xA9 raw \xFF\r\n");
    c.send(&wire).await;
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r}");
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs[0].mail_from, "jörg@exämple.com");
    assert!(msgs[0].smtputf8);
    assert_eq!(
        strip_received(&msgs[0].data),
        &content[..],
        "dot-stuffing undone on input, redone on output, 8-bit untouched"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_give_exactly_one_message() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    for (i, sep) in ["\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r"].iter().enumerate() {
        let mut c = Client::ehlo(h.addr).await;
        assert_eq!(c.cmd("MAIL FROM:<app@example.com>").await.code, 250);
        assert_eq!(c.cmd("RCPT TO:<you@example.com>").await.code, 250);
        assert_eq!(c.cmd("DATA").await.code, 354);
        let smuggled = format!(
            "Subject: s{i}\r\n\r\nbefore{sep}MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nowned\r\n.\r\n"
        );
        c.send(smuggled.as_bytes()).await;
        let r = c.reply().await;
        assert_eq!(r.code, 250, "variant {sep:?}: {r}");
        assert_eq!(
            c.cmd("QUIT").await.code,
            221,
            "no stray replies for variant {sep:?}"
        );
    }
    let msgs = h
        .control()
        .wait_for_messages(4, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 4, "one message per session, never two");
    for m in &msgs {
        assert_eq!(m.rcpt_to, vec!["you@example.com".to_string()]);
        let body = strip_received(&m.data);
        assert!(
            !body.windows(3).any(|w| w == b"\n.\n") && !body.windows(4).any(|w| w == b"\r\n.\n"),
            "bare line endings normalised: {:?}",
            String::from_utf8_lossy(body)
        );
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, &b)| (b != b'\n' || (i > 0 && body[i - 1] == b'\r'))
                    && (b != b'\r' || body.get(i + 1) == Some(&b'\n'))),
            "every CR and LF is part of a CRLF: {:?}",
            String::from_utf8_lossy(body)
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_is_refused_and_not_forwarded() {
    let h = Harness::start(Setup {
        max_message_size: 4096,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let r = c.cmd("MAIL FROM:<app@example.com> SIZE=100000").await;
    assert_eq!(r.code, 552, "declared SIZE over the limit: {r}");
    let big = message("big", &"x".repeat(78).repeat(100).replace("xx", "x\r\n"));
    let r = c
        .send_mail("app@example.com", &["you@example.com"], &big)
        .await;
    assert_eq!(r.code, 552, "{r}");
    assert!(r.text().starts_with("5.3.4"), "{r}");
    // The session is still usable, and a small message goes through.
    let small = message("small", "ok\r\n");
    let r = c
        .send_mail("app@example.com", &["you@example.com"], &small)
        .await;
    assert_eq!(r.code, 250, "{r}");
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.control().messages().len(),
        1,
        "the oversize message never left"
    );
    assert_eq!(strip_received(&msgs[0].data), &small[..]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_precise_replies() {
    let h = Harness::start(Setup::default()).await;
    let mut c = Client::ehlo(h.addr).await;
    let cases: &[(&str, u16, &str)] = &[
        ("FROBNICATE", 500, "5.5."),
        ("RCPT TO:<you@example.com>", 503, "5.5.1"),
        ("DATA", 503, "5.5.1"),
        ("MAIL FROM:<app@example.com", 501, "5.5."),
        ("MAIL FROM:<app@example.com> FOO=BAR", 555, "5.5.4"),
        ("VRFY someone", 252, ""),
        ("NOOP", 250, ""),
        ("RSET", 250, ""),
    ];
    for (cmd, code, esc) in cases {
        let r = c.cmd(cmd).await;
        assert_eq!(r.code, *code, "{cmd}: {r}");
        assert!(r.text().starts_with(esc), "{cmd}: {r}");
    }
    let long = format!("MAIL FROM:<{}@example.com>", "a".repeat(5000));
    let r = c.cmd(&long).await;
    assert_eq!(r.code, 500, "line too long: {r}");
    let r = c.cmd("NO\0OP").await;
    assert!(r.code >= 500, "NUL refused: {r}");
    assert_eq!(c.cmd("NOOP").await.code, 250, "session survives bad input");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_recipient_gets_a_bounce_and_the_others_the_message_once() {
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    h.control().refuse_recipient(
        "gone@example.com",
        SmtpReply::new(
            550,
            [5, 1, 1],
            "The email account that you tried to reach does not exist.",
        ),
    );
    let mut c = Client::ehlo(h.addr).await;
    let data = message("partial", "to two\r\n");
    let r = c
        .send_mail(
            "app@example.com",
            &["ok@example.com", "gone@example.com"],
            &data,
        )
        .await;
    assert_eq!(
        r.code, 250,
        "some recipients got it: never a 5xx for DATA: {r}"
    );
    assert!(r.text().contains("1 of 2"), "{r}");
    let msgs = h
        .control()
        .wait_for_messages(2, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 2, "the message and one bounce");
    let orig: Vec<_> = msgs
        .iter()
        .filter(|m| m.mail_from == "app@example.com")
        .collect();
    assert_eq!(orig.len(), 1, "delivered exactly once");
    assert_eq!(orig[0].rcpt_to, vec!["ok@example.com".to_string()]);
    let dsn = msgs
        .iter()
        .find(|m| m.mail_from.is_empty())
        .expect("bounce with null sender");
    assert_eq!(dsn.rcpt_to, vec!["app@example.com".to_string()]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; gone@example.com"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.1"), "{text}");
    assert!(text.contains("does not exist"), "{text}");

    // All recipients refused: the client gets the upstream's own refusal.
    let r = c
        .send_mail(
            "app@example.com",
            &["gone@example.com"],
            &message("allgone", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 550, "{r}");
    assert!(r.text().starts_with("5.1.1"), "{r}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_refresh_ahead_with_zero_auth_failures() {
    // 4-second tokens, one upstream connection per message: every message authenticates
    // with whatever token the relay holds at that moment.
    let h = Harness::start(Setup {
        token_lifetime: Duration::from_secs(4),
        pool_size: 0,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut sent = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(9);
    while tokio::time::Instant::now() < until {
        let mut c = Client::ehlo(h.addr).await;
        let r = c
            .send_mail(
                "app@example.com",
                &["you@example.com"],
                &message(&format!("t{sent}"), "x\r\n"),
            )
            .await;
        assert_eq!(r.code, 250, "message {sent}: {r}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let stats = h.control().smtp_stats();
    assert_eq!(stats.auth_failed, 0, "no message ever met an expired token");
    assert!(stats.auth_ok >= sent as u64, "{stats:?}");
    let tokens = h.control().token_stats();
    assert!(
        tokens.refresh_requests >= 4,
        "refreshed ahead every ~2 s: {tokens:?}"
    );
    assert_eq!(h.control().messages().len(), sent);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_account_delivers_and_persists_rotated_tokens() {
    // Provider "microsoft" (its defaults overridden by the sandbox's endpoints): rotating
    // refresh tokens, refreshed at least 600 s ahead.
    let h = Harness::start(Setup {
        provider: "microsoft",
        rotate_refresh_tokens: true,
        refresh_margin_secs: 600,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let data = message("m365-1", "via Microsoft 365\r\n");
    let r = c
        .send_mail("app@example.com", &["you@example.com"], &data)
        .await;
    assert_eq!(r.code, 250, "{r}");
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 1);
    let rotated = h.control().current_refresh_token();
    assert_ne!(rotated, h.sandbox.refresh_token);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&h.token_file).unwrap()).unwrap();
    assert_eq!(file["refresh_token"], rotated.as_str());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_token_is_persisted() {
    let h = Harness::start(Setup {
        rotate_refresh_tokens: true,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let rotated = h.control().current_refresh_token();
    assert_ne!(
        rotated, h.sandbox.refresh_token,
        "sandbox rotated the token"
    );
    // The file is written before the access token is used, so it is there now.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&h.token_file).unwrap()).unwrap();
    assert_eq!(file["refresh_token"], rotated.as_str());
    assert!(file["expires_at"].as_u64().is_some());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&h.token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_gives_a_temporary_failure_and_a_log_hint() {
    let h = Harness::start(Setup {
        before_start: Some(Box::new(|s| s.control.revoke_refresh_tokens())),
        ..Setup::default()
    })
    .await;
    // Let the first refresh fail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("nogrant", "x\r\n"),
        )
        .await;
    assert!(
        (400..500).contains(&r.code),
        "never 250, never 5xx for a fixable token problem: {r}"
    );
    assert!(r.text().starts_with("4.7.0"), "{r}");
    assert!(h.control().messages().is_empty());
    let logs = support::logs();
    let line = logs
        .lines()
        .find(|l| l.contains("invalid_grant"))
        .unwrap_or_else(|| panic!("an invalid_grant log line: {logs}"));
    assert!(line.contains("authorize"), "names the fix: {line}");
    assert!(
        line.contains("7 days"),
        "mentions the Testing-mode expiry: {line}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_503_twice_then_ok() {
    let h = Harness::start(Setup {
        before_start: Some(Box::new(|s| s.control.fail_next_token_requests(2, 503))),
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    assert_eq!(h.control().token_stats().refresh_requests, 3);
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("after503", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_temporary_failure() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = Harness::start(Setup::default()).await;
    h.token_ready().await;
    let text = h.config_text.replace(
        &format!("smtp_port = {}", h.sandbox.smtp_addr.port()),
        &format!("smtp_port = {port}"),
    );
    let path = h.dir.path().join("dead.toml");
    std::fs::write(&path, text).unwrap();
    let dead = smtp_oauth_relay::daemon::Daemon::start(
        smtp_oauth_relay::config::Config::load(&path).unwrap(),
    )
    .await
    .unwrap();
    dead.tokens.ready(Duration::from_secs(10)).await.unwrap();
    let mut c = Client::ehlo(dead.local_addrs[0]).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("dead", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 451, "{r}");
    assert!(r.text().starts_with("4.4.1"), "{r}");
    dead.shutdown().await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log() {
    let h = Harness::start(Setup {
        token_lifetime: Duration::from_secs(6),
        rotate_refresh_tokens: true,
        ..Setup::default()
    })
    .await;
    h.token_ready().await;
    let mut c = Client::ehlo(h.addr).await;
    let r = c
        .send_mail(
            "app@example.com",
            &["you@example.com"],
            &message("secret", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250);
    // One more refresh cycle.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&h.token_file).unwrap()).unwrap();
    let logs = support::logs();
    assert!(!logs.is_empty());
    for secret in [
        h.sandbox.refresh_token.as_str(),
        h.sandbox.client_secret.as_str(),
        file["refresh_token"].as_str().unwrap(),
        file["access_token"].as_str().unwrap(),
    ] {
        assert!(!logs.contains(secret), "a secret reached the log");
    }
    h.stop().await;
}
