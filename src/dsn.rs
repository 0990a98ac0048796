//! Delivery status notifications (RFC 3464 `multipart/report`): how a sender learns of the
//! recipients the upstream refused when the rest of the message was delivered.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::{
    envelope::{BodyType, Envelope},
    reply::Reply,
};

/// One recipient the message could not be delivered to.
#[derive(Debug, Clone)]
pub struct FailedRecipient {
    pub address: String,
    /// The upstream's reply that refused it.
    pub reply: Reply,
}

/// What a DSN reports on.
pub struct DsnReport<'a> {
    /// Our host name (Reporting-MTA).
    pub reporting_mta: &'a str,
    /// The upstream host that refused (Remote-MTA).
    pub remote_mta: &'a str,
    /// The original message's queue ID.
    pub queue_id: &'a str,
    pub original_sender: &'a str,
    pub arrival: DateTime<Utc>,
    pub failed: &'a [FailedRecipient],
    /// How many delivery attempts were made.
    pub attempts: u32,
    /// The queue gave up: the recipients were only ever deferred, until the message
    /// outlived the queue lifetime (`Some(lifetime)`).
    pub expired_after: Option<std::time::Duration>,
    /// When the last attempt was made (spooled delivery), for `Last-Attempt-Date`.
    pub last_attempt: Option<DateTime<Utc>>,
    /// The original message; only its header section is returned.
    pub original: &'a [u8],
}

/// The status code for a refused recipient: the upstream's enhanced code, or one derived
/// from its reply class.
fn status_of(reply: &Reply) -> String {
    reply.esc_string().unwrap_or_else(|| {
        if reply.is_transient() {
            "4.0.0".into()
        } else {
            "5.0.0".into()
        }
    })
}

/// The header section of a message (up to and including the blank line, or all of it).
pub fn header_section(message: &[u8]) -> &[u8] {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message, |i| &message[..i + 2])
}

impl DsnReport<'_> {
    /// The envelope the DSN travels in: the null sender (a bounce is never bounced) to the
    /// original sender. `None` when the original sender was the null sender.
    pub fn envelope(&self, eight_bit: bool) -> Option<Envelope> {
        if self.original_sender.is_empty() {
            return None;
        }
        Some(Envelope {
            sender: String::new(),
            recipients: vec![self.original_sender.to_owned()],
            body: if eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: false,
        })
    }

    /// Builds the DSN message (CRLF line endings, ends with CRLF). The flag says whether
    /// it holds 8-bit bytes (from the original headers) and needs BODY=8BITMIME.
    pub fn build(&self, now: DateTime<Utc>) -> (Vec<u8>, bool) {
        let boundary = format!("{}.dsn/{}", self.queue_id, self.reporting_mta);
        let headers = header_section(self.original);
        let eight_bit = !headers.is_ascii();
        let mut m = String::with_capacity(2048 + headers.len());
        let _ = write!(
            m,
            "From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n\
             To: <{to}>\r\n\
             Subject: Undelivered Mail Returned to Sender\r\n\
             Date: {date}\r\n\
             Message-ID: <{id}.dsn@{mta}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Description: Notification\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             \r\n\
             This is the mail relay at {mta}.\r\n\
             \r\n\
             Your message (queue ID {id}) could not be delivered to the recipient(s)\r\n\
             below: {why}.\r\n\
             Recipients not listed here received the message or are still being tried.\r\n\
             \r\n",
            mta = self.reporting_mta,
            to = self.original_sender,
            date = now.to_rfc2822(),
            id = self.queue_id,
            why = match self.expired_after {
                Some(life) => format!(
                    "the mail server {} deferred them for {} hour(s), over\r\n{} attempt(s), and the relay gave up",
                    self.remote_mta,
                    life.as_secs().div_ceil(3600),
                    self.attempts
                ),
                None => format!(
                    "the mail server {} refused them after {} attempt(s)",
                    self.remote_mta, self.attempts
                ),
            },
        );
        for f in self.failed {
            let _ = write!(
                m,
                "<{}>: {} said: {}\r\n",
                f.address, self.remote_mta, f.reply
            );
        }
        let _ = write!(
            m,
            "\r\n--{boundary}\r\n\
             Content-Description: Delivery report\r\n\
             Content-Type: message/delivery-status\r\n\
             \r\n\
             Reporting-MTA: dns; {mta}\r\n\
             X-Queue-ID: {id}\r\n\
             Arrival-Date: {arrival}\r\n",
            mta = self.reporting_mta,
            id = self.queue_id,
            arrival = self.arrival.to_rfc2822(),
        );
        for f in self.failed {
            let _ = write!(
                m,
                "\r\nFinal-Recipient: rfc822; {addr}\r\n\
                 Original-Recipient: rfc822; {addr}\r\n\
                 Action: failed\r\n\
                 Status: {status}\r\n\
                 Remote-MTA: dns; {remote}\r\n\
                 Diagnostic-Code: smtp; {diag}\r\n",
                addr = f.address,
                status = status_of(&f.reply),
                remote = self.remote_mta,
                diag = f.reply,
            );
            if let Some(t) = self.last_attempt {
                let _ = write!(m, "Last-Attempt-Date: {}\r\n", t.to_rfc2822());
            }
        }
        let _ = write!(
            m,
            "\r\n--{boundary}\r\n\
             Content-Description: Undelivered Message Headers\r\n\
             Content-Type: text/rfc822-headers\r\n{cte}\
             \r\n",
            cte = if eight_bit {
                "Content-Transfer-Encoding: 8bit\r\n"
            } else {
                ""
            },
        );
        let mut out = m.into_bytes();
        out.extend_from_slice(headers);
        if !headers.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        (out, eight_bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report<'a>(failed: &'a [FailedRecipient], original: &'a [u8]) -> DsnReport<'a> {
        DsnReport {
            reporting_mta: "relay.example",
            remote_mta: "smtp.gmail.com",
            queue_id: "Q123",
            original_sender: "app@example.com",
            arrival: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            failed,
            attempts: 1,
            expired_after: None,
            last_attempt: None,
            original,
        }
    }

    #[test]
    fn names_recipient_reply_and_headers() {
        let failed = [FailedRecipient {
            address: "nobody@example.org".into(),
            reply: Reply::new(
                550,
                [5, 1, 1],
                "The email account that you tried to reach does not exist.",
            ),
        }];
        let original = b"Subject: hello\r\nFrom: app@example.com\r\n\r\nsecret body\r\n";
        let r = report(&failed, original);
        let (dsn, eight) = r.build(Utc::now());
        let text = String::from_utf8(dsn).unwrap();
        assert!(!eight);
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("Final-Recipient: rfc822; nobody@example.org\r\n"));
        assert!(text.contains("Action: failed\r\nStatus: 5.1.1\r\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 The email account"));
        assert!(text.contains("Subject: hello\r\n"));
        assert!(!text.contains("secret body"), "only headers are returned");
        assert!(text.ends_with("--\r\n"));
        let env = r.envelope(eight).unwrap();
        assert_eq!(env.sender, "");
        assert_eq!(env.recipients, vec!["app@example.com".to_string()]);
    }

    #[test]
    fn expired_names_attempts_and_last_attempt() {
        let failed = [FailedRecipient {
            address: "slow@example.org".into(),
            reply: Reply::new(451, [4, 3, 0], "Mail server temporarily rejected message."),
        }];
        let mut r = report(&failed, b"Subject: x\r\n\r\nbody\r\n");
        r.attempts = 7;
        r.expired_after = Some(std::time::Duration::from_secs(5 * 86400));
        r.last_attempt = Some(DateTime::from_timestamp(1_700_100_000, 0).unwrap());
        let text = String::from_utf8(r.build(Utc::now()).0).unwrap();
        assert!(text.contains("deferred them for 120 hour(s)"), "{text}");
        assert!(text.contains("7 attempt(s)"), "{text}");
        assert!(text.contains("Status: 4.3.0\r\n"), "{text}");
        assert!(text.contains("Last-Attempt-Date: "), "{text}");
    }

    #[test]
    fn never_to_the_null_sender() {
        let mut r = report(&[], b"");
        r.original_sender = "";
        assert!(r.envelope(false).is_none());
    }

    #[test]
    fn status_derived_without_esc() {
        assert_eq!(status_of(&Reply::plain(451, "later")), "4.0.0");
        assert_eq!(status_of(&Reply::plain(554, "no")), "5.0.0");
    }
}
