//! Tests of the sandbox over real loopback sockets: a tiny raw SMTP client (plain, then
//! tokio-rustls trusting `ca_pem`) against the fake Gmail, and reqwest against the fake
//! token endpoint. They assert on what a client observes: reply codes and texts, bytes
//! delivered, files written, HTTP status and JSON.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::*;

/// A raw SMTP client: write bytes, read complete (multi-line) replies.
struct Client<S> {
    io: BufReader<S>,
}

/// One reply: its code and every line as received (without CRLF).
#[derive(Debug)]
struct Resp {
    code: u16,
    lines: Vec<String>,
}

impl Resp {
    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// Reads one reply; `None` if the server closed the connection.
    async fn try_read(&mut self) -> Option<Resp> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.io.read_line(&mut line).await.ok()?;
            if n == 0 {
                return None;
            }
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end_matches("\r\n").to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            let code = line[..3].parse().unwrap();
            lines.push(line);
            if last {
                return Some(Resp { code, lines });
            }
        }
    }

    async fn read(&mut self) -> Resp {
        tokio::time::timeout(Duration::from_secs(10), self.try_read())
            .await
            .expect("reply in time")
            .expect("connection open")
    }

    async fn cmd(&mut self, line: &str) -> Resp {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read().await
    }
}

async fn connect(sb: &Sandbox) -> Client<TcpStream> {
    let sock = TcpStream::connect(sb.smtp_addr).await.unwrap();
    let mut c = Client {
        io: BufReader::new(sock),
    };
    let greeting = c.read().await;
    assert_eq!(greeting.code, 220);
    assert!(greeting.text().starts_with("220 smtp.gmail.com ESMTP "));
    assert!(greeting.text().ends_with(" - gsmtp"));
    c
}

/// Connects, EHLO, STARTTLS, EHLO again.
async fn connect_tls(sb: &Sandbox) -> Client<TlsStream<TcpStream>> {
    let mut c = connect(sb).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.text().contains("250-STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.text().contains("AUTH"), "{ehlo:?}");
    let r = c.cmd("STARTTLS").await;
    assert_eq!(r.text(), "220 2.0.0 Ready to start TLS");
    let connector = TlsConnector::from(sb.client_tls_config());
    let name = rustls_pki_types::ServerName::try_from(sb.tls_server_name.clone()).unwrap();
    let tls = connector.connect(name, c.io.into_inner()).await.unwrap();
    let mut c = Client {
        io: BufReader::new(tls),
    };
    let ehlo = c.cmd("EHLO client.example").await;
    assert_eq!(ehlo.code, 250);
    assert!(
        ehlo.text()
            .contains("250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH"),
        "{ehlo:?}"
    );
    assert!(!ehlo.text().contains("STARTTLS"), "{ehlo:?}");
    c
}

async fn refresh(sb: &Sandbox, refresh_token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(&sb.token_url)
        .basic_auth(&sb.client_id, Some(&sb.client_secret))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .unwrap()
}

async fn access_token(sb: &Sandbox) -> String {
    let resp = refresh(sb, &sb.refresh_token).await;
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = resp.json().await.unwrap();
    json["access_token"].as_str().unwrap().to_string()
}

fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// A TLS connection authenticated as the sandbox user.
async fn authed(sb: &Sandbox) -> Client<TlsStream<TcpStream>> {
    let token = access_token(sb).await;
    let mut c = connect_tls(sb).await;
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(&sb.username, &token)))
        .await;
    assert_eq!(r.text(), "235 2.7.0 Accepted");
    c
}

async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default()).await.unwrap()
}

#[tokio::test]
async fn starttls_xoauth2_end_to_end() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    let r = c.cmd("MAIL FROM:<app@example.org> BODY=8BITMIME").await;
    assert_eq!(r.code, 250);
    assert!(r.text().starts_with("250 2.1.0 OK ") && r.text().ends_with(" - gsmtp"));
    let r = c.cmd("RCPT TO:<someone@example.com>").await;
    assert!(r.text().starts_with("250 2.1.5 OK "), "{r:?}");
    let r = c.cmd("DATA").await;
    assert!(r.text().starts_with("354  Go ahead "), "{r:?}");
    c.send(b"Subject: hi\r\n\r\n..leading dot\r\nbare\nlf\r\n.\r\n")
        .await;
    let r = c.read().await;
    assert!(r.text().starts_with("250 2.0.0 OK  "), "{r:?}");
    let r = c.cmd("QUIT").await;
    assert!(r.text().starts_with("221 2.0.0 closing connection "));
    assert!(c.try_read().await.is_none());

    let msgs = sb
        .control
        .wait_for_messages(1, Duration::from_secs(5))
        .await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.mail_from, "app@example.org");
    assert_eq!(m.rcpt_to, vec!["someone@example.com".to_string()]);
    assert_eq!(m.data, b"Subject: hi\r\n\r\n.leading dot\r\nbare\nlf\r\n");
    assert_eq!(m.auth_user, sb.username);
    assert_eq!(m.body_param.as_deref(), Some("8BITMIME"));
    assert!(!m.smtputf8);
    let stats = sb.control.smtp_stats();
    assert_eq!(stats.auth_ok, 1);
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.commands.get("EHLO"), Some(&2));
}

#[tokio::test]
async fn expired_token_gets_334_then_multiline_535() {
    let sb = sandbox().await;
    sb.control.set_token_lifetime(Duration::ZERO);
    let token = access_token(&sb).await;
    let mut c = connect_tls(&sb).await;
    let r = c
        .cmd(&format!("AUTH XOAUTH2 {}", xoauth2(&sb.username, &token)))
        .await;
    assert_eq!(r.code, 334);
    let json = base64::engine::general_purpose::STANDARD
        .decode(r.lines[0][4..].trim())
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["status"], "400");
    assert_eq!(json["schemes"], "Bearer");
    assert_eq!(json["scope"], "https://mail.google.com/");
    let r = c.cmd("").await;
    assert_eq!(r.code, 535);
    assert_eq!(r.lines.len(), 2);
    assert_eq!(
        r.lines[0],
        "535-5.7.8 Username and Password not accepted. For more information, go to"
    );
    assert!(r.lines[1].starts_with("535 5.7.8  https://support.google.com/mail/?p=BadCredentials "));
    // Still unauthenticated.
    let r = c.cmd("MAIL FROM:<a@b.c>").await;
    assert_eq!(r.code, 530);
    assert_eq!(
        r.lines[0],
        "530-5.7.0 Authentication Required. For more information, go to"
    );
    assert_eq!(sb.control.smtp_stats().auth_failed, 1);
}

#[tokio::test]
async fn wrong_user_and_unknown_token_are_refused_even_in_two_steps() {
    let sb = sandbox().await;
    let token = access_token(&sb).await;
    let mut c = connect_tls(&sb).await;
    // Two-step form, wrong user: 334 "" then 334 <json> then 535 after anything.
    let r = c.cmd("AUTH XOAUTH2").await;
    assert_eq!(r.lines, vec!["334 ".to_string()]);
    let r = c.cmd(&xoauth2("other@sandbox.test", &token)).await;
    assert_eq!(r.code, 334);
    let r = c.cmd("not-empty").await;
    assert_eq!(r.code, 535);
    // Unknown token.
    let r = c
        .cmd(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2(&sb.username, "ya29.forged")
        ))
        .await;
    assert_eq!(r.code, 334);
    assert_eq!(c.cmd("").await.code, 535);
    // The real one, two steps.
    assert_eq!(c.cmd("AUTH XOAUTH2").await.code, 334);
    let r = c.cmd(&xoauth2(&sb.username, &token)).await;
    assert_eq!(r.text(), "235 2.7.0 Accepted");
    let stats = sb.control.smtp_stats();
    assert_eq!((stats.auth_ok, stats.auth_failed), (1, 2));
}

#[tokio::test]
async fn oauthbearer_works_and_plain_is_refused() {
    let sb = sandbox().await;
    let token = access_token(&sb).await;
    let mut c = connect_tls(&sb).await;
    let r = c
        .cmd("AUTH PLAIN AHJlbGF5QHNhbmRib3gudGVzdABwYXNzd29yZA==")
        .await;
    assert_eq!(r.code, 535);
    let payload = base64::engine::general_purpose::STANDARD.encode(format!(
        "n,a={},\x01host=localhost\x01port=587\x01auth=Bearer {token}\x01\x01",
        sb.username
    ));
    let r = c.cmd(&format!("AUTH OAUTHBEARER {payload}")).await;
    assert_eq!(r.text(), "235 2.7.0 Accepted");
    assert_eq!(c.cmd("AUTH XOAUTH2").await.code, 503);
}

#[tokio::test]
async fn helo_is_accepted_and_empty_ehlo_closes() {
    let sb = sandbox().await;
    let mut c = connect(&sb).await;
    assert_eq!(
        c.cmd("HELO client.example").await.text(),
        "250 smtp.gmail.com at your service"
    );
    let r = c.cmd("EHLO").await;
    assert!(r
        .text()
        .starts_with("501 5.5.4 Empty HELO/EHLO argument not allowed"));
    assert!(c.try_read().await.is_none());
}

#[tokio::test]
async fn mail_and_auth_before_starttls_get_530() {
    let sb = sandbox().await;
    let mut c = connect(&sb).await;
    assert_eq!(c.cmd("EHLO client.example").await.code, 250);
    let r = c.cmd("MAIL FROM:<a@example.org>").await;
    assert!(
        r.text()
            .starts_with("530 5.7.0 Must issue a STARTTLS command first. "),
        "{r:?}"
    );
    let r = c.cmd("AUTH XOAUTH2 dXNlcj0BAQ==").await;
    assert_eq!(r.code, 530);
    let r = c.cmd("FOO").await;
    assert!(r.text().starts_with("502 5.5.1 Unrecognized command. "));
}

#[tokio::test]
async fn pipelined_commands_get_all_replies_in_order() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
        .await;
    let codes = [
        c.read().await.code,
        c.read().await.code,
        c.read().await.code,
        c.read().await.code,
    ];
    assert_eq!(codes, [250, 250, 250, 354]);
    // Content, the end, and the next transaction in one write.
    c.send(b"x\r\n.\r\nRSET\r\nNOOP\r\n").await;
    assert!(c.read().await.text().starts_with("250 2.0.0 OK  "));
    assert!(c.read().await.text().starts_with("250 2.1.5 Flushed "));
    assert!(c.read().await.text().starts_with("250 2.0.0 OK "));
    let msgs = sb.control.messages();
    assert_eq!(msgs[0].rcpt_to.len(), 2);
    assert_eq!(msgs[0].data, b"x\r\n");
}

#[tokio::test]
async fn empty_message_and_dot_stuffed_first_line() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    for content in [&b".\r\n"[..], b"..first\r\n.\r\n"] {
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            .await;
        for _ in 0..3 {
            c.read().await;
        }
        c.send(content).await;
        assert_eq!(c.read().await.code, 250);
    }
    let msgs = sb.control.messages();
    assert_eq!(msgs[0].data, b"");
    assert_eq!(msgs[1].data, b".first\r\n");
}

#[tokio::test]
async fn pipelining_after_starttls_is_refused() {
    let sb = sandbox().await;
    let mut c = connect(&sb).await;
    c.cmd("EHLO x").await;
    c.send(b"STARTTLS\r\nEHLO x\r\n").await;
    let r = c.read().await;
    assert_eq!(r.code, 454);
    assert!(c.try_read().await.is_none());
}

#[tokio::test]
async fn refused_and_too_many_recipients() {
    let sb = sandbox().await;
    sb.control
        .refuse_recipient("Nobody@Example.com", gmail_no_such_user());
    let mut c = authed(&sb).await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    let r = c.cmd("RCPT TO:<nobody@example.com>").await;
    assert_eq!(r.code, 550);
    assert!(r.lines[0].starts_with("550-5.1.1 The email account that you tried to reach"));
    // DATA with no accepted recipient.
    let r = c.cmd("DATA").await;
    assert!(r.text().starts_with("503 5.5.1 RCPT first. "), "{r:?}");
    for i in 0..GMAIL_MAX_RECIPIENTS {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<r{i}@example.com>")).await.code,
            250
        );
    }
    let r = c.cmd("RCPT TO:<one-too-many@example.com>").await;
    assert_eq!(r.code, 452);
    assert!(r.lines[0].starts_with("452-4.5.3 Your message has too many recipients."));
}

#[tokio::test]
async fn size_limit_at_mail_and_in_data() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    let r = c
        .cmd(&format!(
            "MAIL FROM:<a@example.org> SIZE={}",
            GMAIL_MAX_MESSAGE_SIZE + 1
        ))
        .await;
    assert_eq!(r.code, 552);
    assert!(r.lines[0].starts_with("552-5.3.4 Your message exceeded Google's message size limits."));
    c.cmd("MAIL FROM:<a@example.org>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert_eq!(c.cmd("DATA").await.code, 354);
    let line = vec![b'a'; 1022];
    let mut chunk = Vec::new();
    while chunk.len() < 1 << 20 {
        chunk.extend_from_slice(&line);
        chunk.extend_from_slice(b"\r\n");
    }
    for _ in 0..35 {
        c.send(&chunk).await;
    }
    c.send(b".\r\n").await;
    assert_eq!(c.read().await.code, 552);
    // The connection is still usable.
    assert_eq!(c.cmd("NOOP").await.code, 250);
    // One byte over the limit, arriving in the same read as the final dot.
    c.cmd("MAIL FROM:<a@example.org>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    assert_eq!(c.cmd("DATA").await.code, 354);
    let mut big = vec![b'b'; GMAIL_MAX_MESSAGE_SIZE - 1];
    big.extend_from_slice(b"\r\n.\r\n");
    c.send(&big).await;
    assert_eq!(c.read().await.code, 552);
    assert!(sb.control.messages().is_empty());
}

#[tokio::test]
async fn bdat_chunks_are_joined() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    c.cmd("MAIL FROM:<a@example.org> SMTPUTF8").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.send(b"BDAT 5\r\nHello").await;
    assert_eq!(c.read().await.code, 250);
    c.send(b"BDAT 8 LAST\r\n, world\n").await;
    assert!(c.read().await.text().starts_with("250 2.0.0 OK  "));
    let m = &sb.control.messages()[0];
    assert_eq!(m.data, b"Hello, world\n");
    assert!(m.smtputf8);
}

#[tokio::test]
async fn close_after_messages_answers_421_and_closes() {
    let sb = sandbox().await;
    sb.control.close_after_messages(Some(1));
    let mut c = authed(&sb).await;
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.read().await;
    }
    c.send(b"m\r\n.\r\n").await;
    assert_eq!(c.read().await.code, 250);
    let r = c.cmd("MAIL FROM:<a@example.org>").await;
    assert!(r
        .text()
        .starts_with("421 4.7.0 Try again later, closing connection."));
    assert!(c.try_read().await.is_none());
}

#[tokio::test]
async fn injected_replies_are_one_shot() {
    let sb = sandbox().await;
    sb.control
        .inject_reply("MAIL", gmail_daily_quota_exceeded());
    sb.control.inject_reply(
        "DATA-END",
        Reply::new(451, [4, 3, 0], "Mail server temporarily rejected message."),
    );
    let mut c = authed(&sb).await;
    let r = c.cmd("MAIL FROM:<a@example.org>").await;
    assert!(r.lines[0].starts_with("550-5.4.5 Daily user sending limit exceeded."));
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").await.code, 250);
    c.cmd("RCPT TO:<b@example.com>").await;
    assert_eq!(c.cmd("DATA").await.code, 354);
    c.send(b"x\r\n.\r\n").await;
    assert_eq!(c.read().await.code, 451);
    assert!(sb.control.messages().is_empty());
    // The transaction is over; the next one goes through.
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.read().await;
    }
    c.send(b"x\r\n.\r\n").await;
    assert_eq!(c.read().await.code, 250);
    sb.control.inject_reply(
        "NOOP",
        Reply::new(421, [4, 7, 0], "Temporary System Problem. Try again later."),
    );
    assert_eq!(c.cmd("NOOP").await.code, 421);
    assert!(c.try_read().await.is_none());
}

#[tokio::test]
async fn close_idle_connections_spares_transactions() {
    let sb = sandbox().await;
    let mut idle = authed(&sb).await;
    let mut busy = authed(&sb).await;
    busy.cmd("MAIL FROM:<a@example.org>").await;
    assert_eq!(sb.control.smtp_stats().connections_open, 2);
    sb.control.close_idle_connections();
    // The idle one is closed without a reply.
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.try_read())
        .await
        .unwrap();
    assert!(closed.is_none());
    assert_eq!(busy.cmd("RCPT TO:<b@example.com>").await.code, 250);
    let stats = sb.control.smtp_stats();
    assert_eq!(stats.connections_open, 1);
    assert_eq!(stats.max_concurrent, 2);
}

#[tokio::test]
async fn idle_timeout_says_451_and_closes() {
    let sb = sandbox().await;
    let mut c = connect(&sb).await;
    // Applies to connections already waiting.
    sb.control.set_idle_timeout(Duration::from_millis(200));
    let r = c.read().await;
    assert!(r
        .text()
        .starts_with("451 4.4.2 Timeout - closing connection. "));
    assert!(c.try_read().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_follows_the_paused_clock() {
    let sb = sandbox().await;
    let mut c = authed(&sb).await;
    let start = tokio::time::Instant::now();
    // 300 s of (auto-advanced) silence, then Gmail's 451.
    let r = tokio::time::timeout(Duration::from_secs(400), c.try_read())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.code, 451);
    assert!(start.elapsed() >= DEFAULT_IDLE_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn access_tokens_expire_on_the_sandbox_clock() {
    let sb = sandbox().await;
    sb.control.set_idle_timeout(Duration::MAX);
    let token = access_token(&sb).await;
    let auth = format!("AUTH XOAUTH2 {}", xoauth2(&sb.username, &token));
    tokio::time::advance(Duration::from_secs(3598)).await;
    let mut c = connect_tls(&sb).await;
    assert_eq!(c.cmd(&auth).await.code, 235);
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut c = connect_tls(&sb).await;
    assert_eq!(c.cmd(&auth).await.code, 334);
    assert_eq!(c.cmd("").await.code, 535);
}

#[tokio::test]
async fn message_dir_gets_eml_files() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Sandbox::start(SandboxOptions {
        message_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = authed(&sb).await;
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    for _ in 0..3 {
        c.read().await;
    }
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.read().await.code, 250);
    let m = &sb.control.messages()[0];
    let path = dir.path().join(format!("{:06}-{}.eml", m.seq, m.id));
    assert_eq!(std::fs::read(path).unwrap(), b"Subject: x\r\n\r\nbody\r\n");
}

#[tokio::test]
async fn shutdown_closes_connections() {
    let sb = sandbox().await;
    let mut c = connect(&sb).await;
    sb.shutdown();
    let r = tokio::time::timeout(Duration::from_secs(5), c.try_read())
        .await
        .unwrap();
    assert!(r.is_none());
}

// ---------------------------------------------------------------------------------------
// Token endpoint

async fn json_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn token_refresh_with_form_credentials() {
    let sb = sandbox().await;
    let resp = reqwest::Client::new()
        .post(&sb.token_url)
        .form(&[
            ("client_id", sb.client_id.as_str()),
            ("client_secret", sb.client_secret.as_str()),
            ("grant_type", "refresh_token"),
            ("refresh_token", sb.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let (status, json) = json_of(resp).await;
    assert_eq!(status, 200);
    assert!(json["access_token"].as_str().unwrap().starts_with("ya29."));
    assert_eq!(json["expires_in"], 3599);
    assert_eq!(json["scope"], "https://mail.google.com/");
    assert_eq!(json["token_type"], "Bearer");
    assert!(json.get("refresh_token").is_none());
    assert_eq!(sb.control.token_stats().tokens_issued, 1);
}

#[tokio::test]
async fn token_invalid_grant_after_revoke_and_new_token_works() {
    let sb = sandbox().await;
    sb.control.revoke_refresh_tokens();
    let (status, json) = json_of(refresh(&sb, &sb.refresh_token).await).await;
    assert_eq!(status, 400);
    assert_eq!(json["error"], "invalid_grant");
    assert_eq!(
        json["error_description"],
        "Token has been expired or revoked."
    );
    let fresh = sb.control.issue_refresh_token();
    assert_eq!(sb.control.current_refresh_token(), fresh);
    assert_eq!(refresh(&sb, &fresh).await.status(), 200);
    assert_eq!(sb.control.token_stats().invalid_grant, 1);
}

#[tokio::test]
async fn token_rotation_invalidates_the_old_refresh_token() {
    let sb = Sandbox::start(SandboxOptions {
        rotate_refresh_tokens: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, json) = json_of(refresh(&sb, &sb.refresh_token).await).await;
    assert_eq!(status, 200);
    let new = json["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(new, sb.refresh_token);
    assert_eq!(sb.control.current_refresh_token(), new);
    let (status, json) = json_of(refresh(&sb, &sb.refresh_token).await).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(refresh(&sb, &new).await.status(), 200);
}

#[tokio::test]
async fn token_injected_failures_then_recovery() {
    let sb = sandbox().await;
    sb.control.fail_next_token_requests(2, 503);
    for _ in 0..2 {
        let resp = refresh(&sb, &sb.refresh_token).await;
        assert_eq!(resp.status(), 503);
        assert!(resp.text().await.unwrap().contains("Error 503"));
    }
    assert_eq!(refresh(&sb, &sb.refresh_token).await.status(), 200);
    let stats = sb.control.token_stats();
    assert_eq!(
        (
            stats.refresh_requests,
            stats.failures_injected,
            stats.tokens_issued
        ),
        (3, 2, 1)
    );
}

#[tokio::test]
async fn token_client_and_request_errors() {
    let sb = sandbox().await;
    let http = reqwest::Client::new();
    let post = |form: Vec<(&'static str, String)>| http.post(&sb.token_url).form(&form).send();

    let rt = sb.refresh_token.clone();
    let (status, json) = json_of(
        http.post(&sb.token_url)
            .basic_auth(&sb.client_id, Some("wrong"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(json["error"], "invalid_client");
    assert_eq!(json["error_description"], "Unauthorized");

    let (status, json) = json_of(
        post(vec![
            ("client_id", "nope.apps.googleusercontent.com".into()),
            ("client_secret", "x".into()),
            ("grant_type", "refresh_token".into()),
            ("refresh_token", rt.clone()),
        ])
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert_eq!(json["error_description"], "The OAuth client was not found.");

    let (status, json) = json_of(
        post(vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", rt),
        ])
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("invalid_request"))
    );

    let creds = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("client_id", sb.client_id.clone()),
            ("client_secret", sb.client_secret.clone()),
        ];
        v.extend(extra);
        v
    };
    let (status, json) = json_of(
        post(creds(vec![("grant_type", "refresh_token".into())]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, json) = json_of(
        post(creds(vec![("grant_type", "password".into())]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
}

#[tokio::test]
async fn client_secret_json_has_the_console_shape() {
    let sb = sandbox().await;
    let json: serde_json::Value = serde_json::from_str(&sb.client_secret_json()).unwrap();
    let installed = &json["installed"];
    assert_eq!(installed["client_id"], sb.client_id.as_str());
    assert_eq!(installed["client_secret"], sb.client_secret.as_str());
    assert_eq!(installed["token_uri"], sb.token_url.as_str());
}

#[test]
fn percent_and_basic_decoding() {
    assert_eq!(token::percent_decode("a%2Bb+c%3D"), "a+b c=");
    assert_eq!(token::percent_decode("100%"), "100%");
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("id%3A1:s%2Fx")
    );
    assert_eq!(
        token::parse_basic(&header),
        Some(("id:1".to_string(), "s/x".to_string()))
    );
}

// ---------------------------------------------------------------------------------------
// Interop with the crates the relay uses upstream: mail-send and oauth2.

#[tokio::test]
async fn mail_send_client_and_oauth2_crate_interoperate() {
    use oauth2::basic::BasicClient;
    use oauth2::{ClientId, ClientSecret, RefreshToken, TokenResponse, TokenUrl};

    let sb = sandbox().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let client = BasicClient::new(ClientId::new(sb.client_id.clone()))
        .set_client_secret(ClientSecret::new(sb.client_secret.clone()))
        .set_token_uri(TokenUrl::new(sb.token_url.clone()).unwrap());
    let token = client
        .exchange_refresh_token(&RefreshToken::new(sb.refresh_token.clone()))
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(token.expires_in(), Some(Duration::from_secs(3599)));
    assert!(token.refresh_token().is_none());

    let connector = TlsConnector::from(sb.client_tls_config());
    let mut smtp = mail_send::SmtpClientBuilder::new_with_tls_connector(
        "127.0.0.1".to_string(),
        sb.smtp_addr.port(),
        connector,
    )
    .implicit_tls(false)
    .timeout(Duration::from_secs(10))
    .connect()
    .await
    .unwrap();
    let access = token.access_token().secret();
    let r = smtp
        .cmd(format!(
            "AUTH XOAUTH2 {}\r\n",
            xoauth2(&sb.username, access)
        ))
        .await
        .unwrap();
    assert_eq!((r.code, r.esc), (235, [2, 7, 0]));
    let r = smtp
        .send(mail_send::smtp::message::Message::new(
            "app@example.org",
            ["to@example.com"],
            &b"Subject: s\r\n\r\nbody\r\n"[..],
        ))
        .await
        .unwrap();
    assert_eq!(r.code, 250);
    // mail-send appends CRLF.CRLF itself: the body gains one CRLF (see CRATES.md).
    assert_eq!(
        sb.control.messages()[0].data,
        b"Subject: s\r\n\r\nbody\r\n\r\n"
    );

    sb.control.revoke_refresh_tokens();
    let err = client
        .exchange_refresh_token(&RefreshToken::new(sb.refresh_token.clone()))
        .request_async(&http)
        .await
        .unwrap_err();
    match err {
        oauth2::RequestTokenError::ServerResponse(e) => {
            assert_eq!(
                e.error(),
                &oauth2::basic::BasicErrorResponseType::InvalidGrant
            );
            assert_eq!(
                e.error_description().map(String::as_str),
                Some("Token has been expired or revoked.")
            );
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }
}

/// Not a benchmark, a guard: the relay's throughput benchmark runs against this fake, so
/// a few thousand pipelined messages over four connections must take well under seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_messages_are_fast() {
    let sb = sandbox().await;
    sb.control.set_keep_messages(false);
    let per_conn = 500;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = authed(&sb).await;
        tasks.push(tokio::spawn(async move {
            let msg = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: x\r\n\r\nhello\r\n.\r\n";
            for _ in 0..per_conn {
                c.send(msg).await;
                for _ in 0..4 {
                    assert!(c.read().await.code < 400);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(sb.control.smtp_stats().messages, 4 * per_conn);
    assert!(sb.control.messages().is_empty());
    eprintln!("{} messages in {elapsed:?}", 4 * per_conn);
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}
