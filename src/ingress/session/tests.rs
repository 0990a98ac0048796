//! Session tests over `tokio::io::duplex`: what a client sees on the wire and what the
//! (recording) delivery receives.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{duplex, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};

use super::*;

/// Records every message and answers with a configurable reply.
struct Recorder {
    reply: Mutex<Reply>,
    messages: Mutex<Vec<Message>>,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            reply: Mutex::new(Reply::new(250, [2, 0, 0], "OK queued")),
            messages: Mutex::new(Vec::new()),
        }
    }

    fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }
}

impl Deliver for Recorder {
    async fn deliver(&self, message: Message) -> Reply {
        self.messages.lock().unwrap().push(message);
        self.reply.lock().unwrap().clone()
    }
}

/// The server half of a duplex pipe, recording each write (to check reply batching).
struct Recorded {
    inner: DuplexStream,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.writes.lock().unwrap().push(buf[..*n].to_vec());
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const HOST: &str = "relay.test";

fn settings() -> IngressSettings {
    IngressSettings::new(HOST.into())
}

fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

/// Runs a whole session: the client sends `input` in one go and closes its side.
/// Returns everything the server wrote, the individual writes, and the messages.
async fn converse_with(
    settings: &IngressSettings,
    deliver: &Recorder,
    input: &[u8],
) -> (String, Vec<Vec<u8>>) {
    let (client, server) = duplex(4 << 20);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let server = Recorded {
        inner: server,
        writes: writes.clone(),
    };
    let shutdown = CancellationToken::new();
    let (mut rx, mut tx) = tokio::io::split(client);
    let client = async {
        // The server may close before reading everything (QUIT, errors): ignore that.
        let _ = tx.write_all(input).await;
        let _ = tx.shutdown().await;
        let mut out = Vec::new();
        rx.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    };
    let (_, out) = tokio::join!(
        run_session(server, peer(), settings, deliver, &shutdown),
        client
    );
    let writes = writes.lock().unwrap().clone();
    (out, writes)
}

async fn converse(input: &str) -> (String, Vec<Message>) {
    let deliver = Recorder::new();
    let (out, _) = converse_with(&settings(), &deliver, input.as_bytes()).await;
    (out, deliver.messages())
}

/// The reply lines after the banner.
fn replies(out: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = out.split_terminator("\r\n").collect();
    assert_eq!(
        lines.remove(0),
        "220 relay.test ESMTP smtp-oauth-relay ready"
    );
    lines
}

/// The codes of single-line and last lines of replies, in order.
fn codes(out: &str) -> Vec<String> {
    replies(out)
        .into_iter()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

/// The message text after our Received: field (which is three lines).
fn body_after_received(data: &[u8]) -> &[u8] {
    let mut pos = 0;
    for _ in 0..3 {
        pos += data[pos..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    }
    &data[pos..]
}

fn body_after_received_2_lines(data: &[u8]) -> &[u8] {
    let mut pos = 0;
    for _ in 0..2 {
        pos += data[pos..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    }
    &data[pos..]
}

#[tokio::test]
async fn happy_path_delivers_byte_exact_with_received_header() {
    let (out, msgs) = converse(
        "EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
         DATA\r\nSubject: hi\r\n\r\nHello\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        replies(&out),
        [
            "250-relay.test Hello client.example",
            "250-PIPELINING",
            "250-SIZE 35882577",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250 ENHANCEDSTATUSCODES",
            "250 2.1.0 Sender OK",
            "250 2.1.5 Recipient OK",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 OK queued",
            "221 2.0.0 relay.test closing connection",
        ]
    );
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.envelope.sender, "a@example.org");
    assert_eq!(m.envelope.recipients, ["b@example.net"]);
    assert_eq!(m.envelope.body, BodyType::SevenBit);
    assert!(!m.envelope.smtputf8);
    assert_eq!(m.id.len(), 16);
    let data = std::str::from_utf8(&m.data).unwrap();
    let prefix = format!(
        "Received: from client.example ([127.0.0.1])\r\n\tby relay.test (smtp-oauth-relay) \
         with ESMTP id {}\r\n\tfor <b@example.net>; ",
        m.id
    );
    assert!(data.starts_with(&prefix), "{data:?}");
    let date_line = &data[prefix.len()..data.find("\r\nSubject").unwrap()];
    chrono::DateTime::parse_from_rfc2822(date_line).expect("RFC 5322 date");
    assert!(data.ends_with("\r\nSubject: hi\r\n\r\nHello\r\n"));
    assert_eq!(
        body_after_received(&m.data),
        b"Subject: hi\r\n\r\nHello\r\n"
    );
}

#[tokio::test]
async fn pipelined_batch_answered_in_order_in_one_write() {
    let deliver = Recorder::new();
    let input = b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nRCPT TO:<bad>\r\n\
                  RCPT TO:<c@y.org>\r\nDATA\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n";
    let (out, writes) = converse_with(&settings(), &deliver, input).await;
    assert_eq!(
        codes(&out),
        [
            "250 ENHANCEDSTATUSCODES",
            "250 2.1.0",
            "250 2.1.5",
            "501 5.1.3",
            "250 2.1.5",
            "354 End",
            "250 2.0.0",
            "250 2.0.0",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    // Banner; EHLO..354 in one write (flushed before reading/delivering); then the DATA
    // reply with RSET, NOOP and QUIT.
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(writes[1].ends_with(b"354 End data with <CR><LF>.<CR><LF>\r\n"));
    let msgs = deliver.messages();
    assert_eq!(msgs[0].envelope.recipients, ["b@y.org", "c@y.org"]);
    // Two recipients: no `for` clause.
    assert!(!std::str::from_utf8(&msgs[0].data)
        .unwrap()
        .contains("\tfor "));
    assert_eq!(body_after_received_2_lines(&msgs[0].data), b"body\r\n");
}

#[tokio::test]
async fn dot_stuffing_is_undone() {
    let (_, msgs) = converse(
        "HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n\
         ..foo\r\n..\r\nbar.\r\n...\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        body_after_received(&msgs[0].data),
        b".foo\r\n.\r\nbar.\r\n..\r\n"
    );
}

#[tokio::test]
async fn eight_bit_and_utf8_content_byte_exact() {
    let deliver = Recorder::new();
    let mut input = b"EHLO c\r\nMAIL FROM:<j\xc3\xb6rg@b\xc3\xbccher.example> SMTPUTF8 BODY=8BITMIME\r\n\
                      RCPT TO:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a>\r\nDATA\r\n"
        .to_vec();
    // UTF-8, Latin-1 (invalid UTF-8) and every byte value except CR, LF.
    let mut body =
        b"Subject: =?utf-8?q?x?= \xc3\xa4\xc3\xb6\r\n\r\nlatin1 \xe4\xf6\xfc\r\n".to_vec();
    body.extend((0u8..=255).filter(|b| *b != b'\r' && *b != b'\n'));
    body.extend_from_slice(b"\r\n");
    input.extend_from_slice(&body);
    input.extend_from_slice(b".\r\nQUIT\r\n");
    let (out, _) = converse_with(&settings(), &deliver, &input).await;
    assert!(codes(&out).contains(&"250 2.0.0".to_string()), "{out}");
    let m = &deliver.messages()[0];
    assert!(m.envelope.smtputf8);
    assert_eq!(m.envelope.body, BodyType::EightBitMime);
    assert_eq!(m.envelope.sender, "jörg@bücher.example");
    assert_eq!(m.envelope.recipients, ["用户@例子.广告"]);
    let text = String::from_utf8_lossy(&m.data);
    assert!(text.contains(" with UTF8SMTP id "), "{text}");
    assert!(text.contains("\tfor <用户@例子.广告>; "), "{text}");
    assert_eq!(body_after_received(&m.data), &body[..]);
}

#[tokio::test]
async fn smuggling_variants_give_one_message_normalised() {
    for (smuggle, expected) in [
        (&b"\n.\n"[..], &b"\r\n.\r\n"[..]),
        (b"\r\n.\n", b"\r\n\r\n"),
        (b"\n.\r\n", b"\r\n.\r\n"),
    ] {
        let deliver = Recorder::new();
        let mut input =
            b"HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\ntext".to_vec();
        input.extend_from_slice(smuggle);
        input.extend_from_slice(
            b"MAIL FROM:<evil@x.org>\r\nRCPT TO:<victim@y.org>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n",
        );
        let (out, _) = converse_with(&settings(), &deliver, &input).await;
        let msgs = deliver.messages();
        assert_eq!(msgs.len(), 1, "{smuggle:?}: {out}");
        assert_eq!(msgs[0].envelope.recipients, ["b@y.org"]);
        let mut want = b"text".to_vec();
        want.extend_from_slice(expected);
        want.extend_from_slice(
            b"MAIL FROM:<evil@x.org>\r\nRCPT TO:<victim@y.org>\r\nDATA\r\nforged\r\n",
        );
        assert_eq!(body_after_received(&msgs[0].data), &want[..], "{smuggle:?}");
        assert_eq!(
            codes(&out),
            [
                "250 relay.test",
                "250 2.1.0",
                "250 2.1.5",
                "354 End",
                "250 2.0.0",
                "221 2.0.0"
            ]
        );
    }
}

#[tokio::test]
async fn empty_message_is_just_the_received_field() {
    let (_, msgs) =
        converse("HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n.\r\nQUIT\r\n")
            .await;
    assert_eq!(body_after_received(&msgs[0].data), b"");
    assert!(msgs[0].data.ends_with(b"\r\n"));
}

#[tokio::test]
async fn oversize_message_read_to_end_552_not_delivered_session_usable() {
    let mut s = settings();
    s.max_message_size = 100;
    let deliver = Recorder::new();
    let mut input = b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n".to_vec();
    for _ in 0..1000 {
        input.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
    }
    input.extend_from_slice(
        b".\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nsmall\r\n.\r\nQUIT\r\n",
    );
    let (out, _) = converse_with(&s, &deliver, &input).await;
    assert!(out.contains("250-SIZE 100\r\n"));
    assert!(out
        .contains("\r\n552 5.3.4 Message size exceeds fixed maximum message size (100 bytes)\r\n"));
    let c = codes(&out);
    assert_eq!(
        &c[1..],
        [
            "250 2.1.0",
            "250 2.1.5",
            "354 End",
            "552 5.3.4",
            "250 2.1.0",
            "250 2.1.5",
            "354 End",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    let msgs = deliver.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(body_after_received(&msgs[0].data), b"small\r\n");
}

#[tokio::test]
async fn size_parameter_too_big_refused_at_mail() {
    let (out, _) =
        converse("EHLO c\r\nMAIL FROM:<a@x.org> SIZE=35882578\r\nMAIL FROM:<a@x.org> SIZE=35882577\r\nQUIT\r\n")
            .await;
    assert!(out.contains(
        "\r\n552 5.3.4 Message size exceeds fixed maximum message size (35882577 bytes)\r\n"
    ));
    assert_eq!(&codes(&out)[1..], ["552 5.3.4", "250 2.1.0", "221 2.0.0"]);
}

#[tokio::test]
async fn recipient_limit_452() {
    let mut input = String::from("EHLO c\r\nMAIL FROM:<a@x.org>\r\n");
    for i in 0..150 {
        input.push_str(&format!("RCPT TO:<r{i}@y.org>\r\n"));
    }
    input.push_str("DATA\r\nx\r\n.\r\nQUIT\r\n");
    let (out, msgs) = converse(&input).await;
    assert!(out.contains("\r\n452 4.5.3 Too many recipients (at most 100 per message)\r\n"));
    assert_eq!(
        codes(&out).iter().filter(|c| *c == "250 2.1.5").count(),
        100
    );
    assert_eq!(msgs[0].envelope.recipients.len(), 100);
    // 50 refusals in a row are not "too many errors": the message is delivered.
    assert_eq!(codes(&out).iter().filter(|c| *c == "452 4.5.3").count(), 50);
    assert!(out.ends_with("250 2.0.0 OK queued\r\n221 2.0.0 relay.test closing connection\r\n"));
}

#[tokio::test]
async fn sequence_errors() {
    let (out, msgs) = converse(
        "RCPT TO:<b@y.org>\r\nDATA\r\nMAIL FROM:<a@x.org>\r\nMAIL FROM:<a@x.org>\r\n\
         DATA\r\nRSET\r\nDATA\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        replies(&out),
        [
            "503 5.5.1 Need MAIL before RCPT",
            "503 5.5.1 Need MAIL and RCPT before DATA",
            "250 2.1.0 Sender OK",
            "503 5.5.1 Sender already given (nested MAIL)",
            "554 5.5.1 No valid recipients",
            "250 2.0.0 OK",
            "503 5.5.1 Need MAIL and RCPT before DATA",
            "221 2.0.0 relay.test closing connection",
        ]
    );
    assert!(msgs.is_empty());
}

#[tokio::test]
async fn mail_without_helo_is_accepted() {
    let (out, msgs) =
        converse("MAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n").await;
    assert_eq!(
        codes(&out),
        [
            "250 2.1.0",
            "250 2.1.5",
            "354 End",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    let data = String::from_utf8_lossy(&msgs[0].data);
    assert!(
        data.starts_with("Received: from [127.0.0.1] ([127.0.0.1])\r\n\tby relay.test (smtp-oauth-relay) with SMTP id "),
        "{data}"
    );
}

#[tokio::test]
async fn helo_gives_plain_250_and_smtp_protocol() {
    let (out, msgs) = converse(
        "HELO printer\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(replies(&out)[0], "250 relay.test Hello printer");
    assert!(String::from_utf8_lossy(&msgs[0].data).starts_with(
        "Received: from printer ([127.0.0.1])\r\n\tby relay.test (smtp-oauth-relay) with SMTP id "
    ));
}

#[tokio::test]
async fn ehlo_and_helo_reset_the_transaction() {
    let (out, msgs) = converse(
        "EHLO a\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nEHLO b\r\nDATA\r\n\
         MAIL FROM:<a@x.org>\r\nHELO c\r\nRCPT TO:<b@y.org>\r\nQUIT\r\n",
    )
    .await;
    let c = codes(&out);
    assert_eq!(c[4], "503 5.5.1");
    assert_eq!(c[7], "503 5.5.1");
    assert!(msgs.is_empty());
}

#[tokio::test]
async fn null_sender_accepted_postmaster_sender_refused() {
    let (out, msgs) = converse(
        "EHLO c\r\nMAIL FROM:<postmaster>\r\nMAIL FROM:<>\r\nRCPT TO:<b@y.org>\r\n\
         RCPT TO:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        &replies(&out)[6..11],
        [
            "553 5.1.7 Sender <postmaster> needs a domain",
            "250 2.1.0 Sender OK",
            "250 2.1.5 Recipient OK",
            "553 5.1.3 Recipient needs a full address (user@domain)",
            "553 5.1.3 Recipient needs a full address (user@domain)",
        ]
    );
    assert_eq!(msgs[0].envelope.sender, "");
}

#[tokio::test]
async fn mail_and_rcpt_parameters() {
    let (out, msgs) = converse(
        "EHLO c\r\nMAIL FROM:<a@x.org> BODY=BINARYMIME\r\nMAIL FROM:<a@x.org> RET=FULL\r\n\
         MAIL FROM:<a@x.org> FOO=BAR\r\nMAIL FROM:<a@x.org> BODY=WRONG\r\n\
         MAIL FROM:<a@x.org> BODY=7BIT\r\nRCPT TO:<b@y.org> NOTIFY=NEVER\r\n\
         RCPT TO:<b@y.org> XYZ\r\nRSET\r\nMAIL FROM:<a@x.org> BODY=8BITMIME SIZE=1000\r\n\
         RCPT TO:<b@y.org>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        &replies(&out)[6..14],
        [
            "555 5.5.4 BODY=BINARYMIME not supported (no CHUNKING): use 8BITMIME",
            "555 5.5.4 Unsupported MAIL parameter: only SIZE, BODY and SMTPUTF8 are supported",
            "555 5.5.4 Unsupported parameter FOO=BAR",
            "501 5.5.4 Invalid value for the BODY parameter",
            "250 2.1.0 Sender OK",
            "555 5.5.4 Unsupported RCPT parameter: none are supported",
            "555 5.5.4 Unsupported parameter XYZ",
            "250 2.0.0 OK",
        ]
    );
    assert_eq!(msgs[0].envelope.body, BodyType::EightBitMime);
}

#[tokio::test]
async fn address_errors() {
    let (out, _) = converse(
        "EHLO c\r\nMAIL FROM:<a@@x.org>\r\nMAIL <a@x.org>\r\nMAIL FROM:<j\u{f6}rg@x.org>\r\n\
         MAIL FROM:<a@x.org>\r\nRCPT TO:<no-at-sign>\r\nRCPT TO:<\u{fc}@y.org>\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        &replies(&out)[6..12],
        [
            "501 5.1.7 Bad sender address syntax",
            "501 5.5.4 Syntax error, expected: MAIL FROM:<reverse-path> [parameters]",
            "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM",
            "250 2.1.0 Sender OK",
            "501 5.1.3 Bad recipient address syntax",
            "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM",
        ]
    );
}

#[tokio::test]
async fn addresses_without_angle_brackets_accepted() {
    let (out, msgs) = converse(
        "HELO c\r\nmail from:a@x.org SIZE=10\r\nRCPT TO: b@y.org\r\nRCPT   to :c@y.org\r\n\
         RCPT TO:\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        codes(&out),
        [
            "250 relay.test",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "501 5.5.4",
            "354 End",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert_eq!(msgs[0].envelope.sender, "a@x.org");
    assert_eq!(msgs[0].envelope.recipients, ["b@y.org", "c@y.org"]);
    assert_eq!(add_angle_brackets(b"NOOP FROM:x\r\n"), None);
    assert_eq!(add_angle_brackets(b"MAILFROM:x\r\n"), None);
    assert_eq!(
        add_angle_brackets(b"MAIL FROM:a@b BODY=8BITMIME\r\n").unwrap(),
        b"MAIL FROM:<a@b> BODY=8BITMIME\r\n"
    );
}

#[tokio::test]
async fn helo_and_ehlo_need_a_domain() {
    let (out, _) = converse("EHLO\r\nHELO \r\nQUIT\r\n").await;
    assert_eq!(
        replies(&out),
        [
            "501 5.5.4 Syntax error, expected: EHLO domain",
            "501 5.5.4 Syntax error, expected: HELO domain",
            "221 2.0.0 relay.test closing connection",
        ]
    );
}

#[tokio::test]
async fn line_too_long_then_session_usable() {
    let deliver = Recorder::new();
    let mut input = b"EHLO c\r\nNOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 20_000));
    input.extend_from_slice(b"\r\nNOOP ");
    input.extend(std::iter::repeat_n(b'y', 4_090));
    input.extend_from_slice(b"\r\nNOOP\r\nQUIT\r\n");
    let (out, _) = converse_with(&settings(), &deliver, &input).await;
    assert_eq!(
        &replies(&out)[6..],
        [
            "500 5.5.2 Line too long",
            "500 5.5.2 Line too long",
            "250 2.0.0 OK",
            "221 2.0.0 relay.test closing connection"
        ]
    );
    // 4096 bytes with CRLF is still fine.
    let mut input = b"NOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'z', 4096 - 7));
    input.extend_from_slice(b"\r\nQUIT\r\n");
    let (out, _) = converse_with(&settings(), &deliver, &input).await;
    assert_eq!(codes(&out), ["250 2.0.0", "221 2.0.0"]);
}

#[tokio::test]
async fn endless_line_without_lf_is_cut_off() {
    let deliver = Recorder::new();
    let input = vec![b'x'; 2 << 20];
    let (out, _) = converse_with(&settings(), &deliver, &input).await;
    assert_eq!(
        replies(&out),
        [
            "500 5.5.2 Line too long",
            "421 4.7.0 relay.test Too many errors, closing connection"
        ]
    );
}

#[tokio::test]
async fn nul_and_unknown_commands() {
    let (out, _) =
        converse("NO\0OP\r\nFOO bar\r\n\r\nMAIL\0 FROM:<a@x.org>\r\nXCLIENT ADDR=1\r\nQUIT\r\n")
            .await;
    assert_eq!(
        replies(&out),
        [
            "500 5.5.2 NUL character not allowed in commands",
            "500 5.5.2 Command not recognised: FOO",
            "500 5.5.2 Command not recognised",
            "500 5.5.2 NUL character not allowed in commands",
            "500 5.5.2 Command not recognised: XCLIENT",
            "221 2.0.0 relay.test closing connection",
        ]
    );
}

#[tokio::test]
async fn help_vrfy_noop_rset_quit() {
    let (out, _) = converse(
        "HELP\r\nHELP MAIL\r\nVRFY someone\r\nNOOP\r\nNOOP hi there\r\nRSET\r\nquit\r\nNOOP\r\n",
    )
    .await;
    assert_eq!(
        replies(&out),
        [
            "214 2.0.0 smtp-oauth-relay: commands HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
            "214 2.0.0 smtp-oauth-relay: commands HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
            "250 2.0.0 OK",
            "250 2.0.0 OK",
            "250 2.0.0 OK",
            "221 2.0.0 relay.test closing connection",
        ],
        "nothing after QUIT is answered"
    );
}

#[tokio::test]
async fn refused_extensions() {
    let (out, _) = converse(
        "EHLO c\r\nAUTH PLAIN AGFAAGI=\r\nSTARTTLS\r\nEXPN list\r\nETRN x.org\r\nLHLO c\r\n\
         BDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        &replies(&out)[6..],
        [
            "502 5.5.1 AUTH not needed: this relay accepts mail from local clients without authentication",
            "502 5.5.1 STARTTLS not offered: this relay only accepts local connections",
            "502 5.5.1 EXPN not available",
            "502 5.5.1 ETRN not supported",
            "502 5.5.1 LHLO is LMTP; this is SMTP",
            "502 5.5.1 BDAT not supported (no CHUNKING): use DATA",
            "250 2.0.0 OK",
            "221 2.0.0 relay.test closing connection",
        ],
        "the 12-byte BDAT chunk `RSET\\r\\nQUIT\\r\\n` is skipped, not executed"
    );
}

#[tokio::test]
async fn bare_lf_command_lines_accepted() {
    let (out, msgs) =
        converse("HELO c\nMAIL FROM:<a@x.org>\nRCPT TO:<b@y.org>\nDATA\nx\r\n.\r\nQUIT\n").await;
    assert_eq!(
        codes(&out),
        [
            "250 relay.test",
            "250 2.1.0",
            "250 2.1.5",
            "354 End",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert_eq!(msgs.len(), 1);
}

#[tokio::test]
async fn delivery_reply_passed_verbatim_and_transaction_reset() {
    let deliver = Recorder::new();
    *deliver.reply.lock().unwrap() = Reply::new(
        451,
        [4, 7, 0],
        "Temporary upstream failure\nplease try again later",
    );
    let (out, _) = converse_with(
        &settings(),
        &deliver,
        b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nx\r\n.\r\nRCPT TO:<c@y.org>\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(
        &replies(&out)[9..],
        [
            "451-4.7.0 Temporary upstream failure",
            "451 4.7.0 please try again later",
            "503 5.5.1 Need MAIL before RCPT",
            "221 2.0.0 relay.test closing connection",
        ]
    );
}

#[tokio::test]
async fn too_many_errors_close_the_connection() {
    let input = "FOO\r\n".repeat(25);
    let (out, _) = converse(&input).await;
    let r = replies(&out);
    assert_eq!(r.len(), 21);
    assert_eq!(r[19], "500 5.5.2 Command not recognised: FOO");
    assert_eq!(
        r[20],
        "421 4.7.0 relay.test Too many errors, closing connection"
    );
    // A success in between resets the count.
    let input = "FOO\r\n".repeat(15) + "NOOP\r\n" + &"FOO\r\n".repeat(15) + "QUIT\r\n";
    let (out, _) = converse(&input).await;
    assert!(out.ends_with("221 2.0.0 relay.test closing connection\r\n"));
}

/// A client driven step by step.
struct Client {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
}

impl Client {
    async fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        line
    }

    async fn send(&mut self, s: &str) {
        self.writer.write_all(s.as_bytes()).await.unwrap();
    }
}

fn start(
    settings: IngressSettings,
    deliver: Arc<Recorder>,
    shutdown: CancellationToken,
) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, server) = duplex(1 << 16);
    let task = tokio::spawn(async move {
        run_session(server, peer(), &settings, &*deliver, &shutdown).await;
    });
    let (r, w) = tokio::io::split(client);
    (
        Client {
            reader: BufReader::new(r),
            writer: w,
        },
        task,
    )
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_421() {
    let (mut c, task) = start(
        settings(),
        Arc::new(Recorder::new()),
        CancellationToken::new(),
    );
    assert!(c.line().await.starts_with("220 "));
    c.send("EHLO c\r\n").await;
    for _ in 0..6 {
        c.line().await;
    }
    let before = tokio::time::Instant::now();
    assert_eq!(
        c.line().await,
        "421 4.4.2 relay.test Idle timeout, closing connection\r\n"
    );
    assert!(before.elapsed() >= Duration::from_secs(300));
    assert_eq!(c.line().await, "");
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn data_timeout_421() {
    let (mut c, task) = start(
        settings(),
        Arc::new(Recorder::new()),
        CancellationToken::new(),
    );
    c.line().await;
    c.send("HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\npartial")
        .await;
    for _ in 0..4 {
        c.line().await;
    }
    let before = tokio::time::Instant::now();
    assert_eq!(
        c.line().await,
        "421 4.4.2 relay.test Timeout while reading message data, closing connection\r\n"
    );
    let waited = before.elapsed();
    assert!(waited >= Duration::from_secs(180) && waited < Duration::from_secs(300));
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_tells_idle_session_421() {
    let shutdown = CancellationToken::new();
    let (mut c, task) = start(settings(), Arc::new(Recorder::new()), shutdown.clone());
    assert!(c.line().await.starts_with("220 "));
    shutdown.cancel();
    assert_eq!(
        c.line().await,
        "421 4.3.0 relay.test Service shutting down\r\n"
    );
    assert_eq!(c.line().await, "");
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_mid_transaction_finishes_the_message_first() {
    let shutdown = CancellationToken::new();
    let deliver = Arc::new(Recorder::new());
    let (mut c, task) = start(settings(), deliver.clone(), shutdown.clone());
    c.line().await;
    c.send("HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\n")
        .await;
    for _ in 0..3 {
        c.line().await;
    }
    shutdown.cancel();
    tokio::task::yield_now().await;
    c.send("DATA\r\nhello\r\n").await;
    assert_eq!(c.line().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
    c.send(".\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 OK queued\r\n");
    assert_eq!(
        c.line().await,
        "421 4.3.0 relay.test Service shutting down\r\n"
    );
    assert_eq!(c.line().await, "");
    task.await.unwrap();
    assert_eq!(deliver.messages().len(), 1);
}

#[tokio::test]
async fn client_eof_mid_data_delivers_nothing() {
    let (out, msgs) = converse(
        "HELO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nhalf a message\r\n",
    )
    .await;
    assert_eq!(codes(&out).last().unwrap(), "354 End");
    assert!(msgs.is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_grace_for_a_stalled_transaction_is_brief() {
    let shutdown = CancellationToken::new();
    let (mut c, task) = start(settings(), Arc::new(Recorder::new()), shutdown.clone());
    c.line().await;
    c.send("HELO c\r\nMAIL FROM:<a@x.org>\r\n").await;
    c.line().await;
    c.line().await;
    let before = tokio::time::Instant::now();
    shutdown.cancel();
    assert_eq!(
        c.line().await,
        "421 4.3.0 relay.test Service shutting down\r\n"
    );
    let waited = before.elapsed();
    assert!(
        waited >= SHUTDOWN_GRACE && waited < Duration::from_secs(60),
        "{waited:?}"
    );
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_before_the_banner_still_greets_then_421() {
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (mut c, task) = start(settings(), Arc::new(Recorder::new()), shutdown);
    assert!(c.line().await.starts_with("220 "));
    assert_eq!(
        c.line().await,
        "421 4.3.0 relay.test Service shutting down\r\n"
    );
    task.await.unwrap();
}

#[tokio::test]
async fn many_pipelined_messages_in_one_session() {
    let deliver = Recorder::new();
    let mut input = b"EHLO c\r\n".to_vec();
    let body = "x".repeat(70) + "\r\n";
    for i in 0..2000 {
        input.extend_from_slice(
            format!("MAIL FROM:<a@x.org>\r\nRCPT TO:<r{i}@y.org>\r\nDATA\r\nSubject: {i}\r\n\r\n")
                .as_bytes(),
        );
        for _ in 0..20 {
            input.extend_from_slice(body.as_bytes());
        }
        input.extend_from_slice(b".\r\n");
    }
    input.extend_from_slice(b"QUIT\r\n");
    let started = std::time::Instant::now();
    let (out, _) = converse_with(&settings(), &deliver, &input).await;
    eprintln!("2000 messages in {:?}", started.elapsed());
    assert!(out.ends_with("221 2.0.0 relay.test closing connection\r\n"));
    let msgs = deliver.messages();
    assert_eq!(msgs.len(), 2000);
    let ids: std::collections::HashSet<_> = msgs.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 2000);
    assert_eq!(msgs[1999].envelope.recipients, ["r1999@y.org"]);
    assert!(body_after_received(&msgs[1999].data).starts_with(b"Subject: 1999\r\n\r\nxxx"));
}
