//! Why a send to the upstream failed, and the one place that turns each failure into the
//! SMTP reply our client sees. Nothing in here ever holds a token or an AUTH payload.

use std::{fmt, time::Duration};

use crate::{oauth::TokenUnavailable, reply::Reply};

/// Where in the SMTP dialogue something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Rset,
    Noop,
    Mail,
    Rcpt,
    Data,
    /// The message body and the final dot.
    Body,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connect",
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "EHLO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH XOAUTH2",
            Stage::Rset => "RSET",
            Stage::Noop => "NOOP",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::Body => "the message body",
            Stage::Quit => "QUIT",
        })
    }
}

/// A failed upstream send or connection attempt.
#[derive(thiserror::Error, Debug)]
pub enum UpstreamError {
    /// TCP connect failed or timed out.
    #[error("cannot reach upstream {addr}: {cause}")]
    Connect { addr: String, cause: String },
    /// The TLS handshake after STARTTLS failed (certificate, protocol).
    #[error("TLS handshake with upstream {addr} ({server_name}) failed: {cause}")]
    Tls {
        addr: String,
        server_name: String,
        cause: String,
    },
    /// The upstream greeted us with something other than 220.
    #[error("upstream {addr} refused the session: {reply}")]
    Greeting { addr: String, reply: Reply },
    #[error("upstream {addr} does not offer STARTTLS; refusing to send credentials in clear")]
    NoStartTls { addr: String },
    #[error("upstream {addr} refused STARTTLS: {reply}")]
    StartTlsRefused { addr: String, reply: Reply },
    /// No usable access token (the token manager says why).
    #[error("no valid OAuth access token: {}", .0.reason)]
    NoToken(#[from] TokenUnavailable),
    /// The upstream rejected our token. `challenge` is the decoded JSON of its 334 reply.
    #[error("upstream {addr} refused our OAuth token for {username} ({reply}){}{}",
        challenge.as_deref().map(|c| format!("; server said {c}")).unwrap_or_default(),
        auth_failure_hint(reply).map(|h| format!(" — {}", h.full)).unwrap_or_default())]
    AuthFailed {
        addr: String,
        username: String,
        reply: Reply,
        challenge: Option<String>,
    },
    /// The upstream refused the transaction (MAIL, DATA or the final dot), or we refused
    /// it locally for the upstream (SIZE, SMTPUTF8). The reply is passed on as is.
    #[error("upstream {addr} rejected {stage}: {reply}")]
    Rejected {
        addr: String,
        stage: Stage,
        reply: Reply,
    },
    /// No configured account takes mail from this envelope sender.
    #[error("no [[account]] takes mail from sender <{sender}>")]
    NoRoute { sender: String },
    /// No pooled connection became free in time.
    #[error("no connection to upstream {addr} became free within {waited:?}")]
    PoolTimeout { addr: String, waited: Duration },
    /// The upstream did not answer in time.
    #[error("upstream {addr} did not answer {stage} within {after:?}")]
    Timeout {
        addr: String,
        stage: Stage,
        after: Duration,
    },
    /// The upstream said 421: it is closing the connection.
    #[error("upstream {addr} closed the connection at {stage}: {reply}")]
    Closing {
        addr: String,
        stage: Stage,
        reply: Reply,
    },
    /// I/O error or EOF before the message could have been delivered.
    #[error("connection to upstream {addr} lost at {stage}: {cause}")]
    ConnectionLost {
        addr: String,
        stage: Stage,
        cause: String,
    },
    /// The upstream sent something that is not an SMTP reply.
    #[error("upstream {addr} broke the protocol at {stage}: {cause}")]
    Protocol {
        addr: String,
        stage: Stage,
        cause: String,
    },
    /// The connection failed after the final dot was written: the message may or may not
    /// have been delivered. Never resent (no duplicates).
    #[error("connection to upstream {addr} lost after the message was sent ({cause}); delivery status unknown")]
    Indeterminate { addr: String, cause: String },
}

impl UpstreamError {
    /// The reply for our client.
    pub fn reply(&self) -> Reply {
        match self {
            UpstreamError::Connect { addr, cause } => Reply::new(
                451,
                [4, 4, 1],
                format!("cannot reach upstream {addr}: {cause}"),
            ),
            UpstreamError::Tls {
                addr,
                server_name,
                cause,
            } => Reply::new(
                451,
                [4, 4, 1],
                format!("TLS with upstream {addr} ({server_name}) failed: {cause}"),
            ),
            UpstreamError::Greeting { addr, reply } => Reply::new(
                451,
                [4, 4, 1],
                format!("upstream {addr} refused the session ({reply})"),
            ),
            UpstreamError::NoStartTls { addr } => Reply::new(
                454,
                [4, 7, 0],
                format!(
                    "upstream {addr} does not offer STARTTLS; refusing to send credentials in clear"
                ),
            ),
            UpstreamError::StartTlsRefused { addr, reply } => Reply::new(
                454,
                [4, 7, 0],
                format!("upstream {addr} refused STARTTLS ({reply})"),
            ),
            UpstreamError::NoToken(e) => Reply::new(
                454,
                [4, 7, 0],
                format!(
                    "cannot log in upstream: no valid OAuth access token: {}",
                    e.reason
                ),
            ),
            UpstreamError::AuthFailed { reply, .. } => Reply::new(
                454,
                [4, 7, 0],
                format!(
                    "upstream refused our OAuth token ({reply}){}",
                    auth_failure_hint(reply)
                        .map(|h| format!(" - {}", h.short))
                        .unwrap_or_default()
                ),
            ),
            UpstreamError::Rejected { reply, .. } => reply.clone(),
            UpstreamError::NoRoute { sender } => Reply::new(
                550,
                [5, 7, 1],
                format!(
                    "sender <{sender}> may not send through this relay: no account is configured for it (add it to an account's `senders`, or mark one account `default = true`)"
                ),
            ),
            UpstreamError::PoolTimeout { addr, waited } => Reply::new(
                451,
                [4, 4, 1],
                format!(
                    "no connection to upstream {addr} became free within {} s; try again later",
                    waited.as_secs()
                ),
            ),
            UpstreamError::Timeout { addr, stage, after } => Reply::new(
                451,
                [4, 4, 2],
                format!(
                    "upstream {addr} did not answer {stage} within {} s",
                    after.as_secs()
                ),
            ),
            UpstreamError::Closing { addr, reply, .. } => Reply::new(
                451,
                reply.esc.filter(|e| e[0] == 4).unwrap_or([4, 4, 2]),
                format!("upstream {addr} closed the connection ({reply})"),
            ),
            UpstreamError::ConnectionLost { addr, stage, cause } => Reply::new(
                451,
                [4, 4, 2],
                format!("connection to upstream {addr} lost at {stage}: {cause}"),
            ),
            UpstreamError::Protocol { addr, stage, cause } => Reply::new(
                451,
                [4, 5, 0],
                format!("upstream {addr} sent an invalid reply to {stage}: {cause}"),
            ),
            UpstreamError::Indeterminate { .. } => Reply::new(
                451,
                [4, 4, 2],
                "connection lost after the message was sent; delivery status unknown",
            ),
        }
    }

    /// Worth trying again later (the reply is 4xx).
    pub fn is_transient(&self) -> bool {
        self.reply().is_transient()
    }
}

/// Advice for an AUTH failure reply whose meaning is known: `full` for the log, `short`
/// (ASCII, one line) for the SMTP reply our client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthHint {
    pub full: &'static str,
    pub short: &'static str,
}

/// The advice for an AUTH failure, keyed on the reply itself (not on the provider):
/// `535 5.7.3` is what Microsoft 365 answers when SMTP AUTH is disabled for the mailbox or
/// the whole tenant, however good the token.
pub fn auth_failure_hint(reply: &Reply) -> Option<AuthHint> {
    match (reply.code, reply.esc) {
        (535, Some([5, 7, 3])) => Some(AuthHint {
            full: "535 5.7.3 usually means SMTP AUTH is disabled for this mailbox or tenant: enable \"Authenticated SMTP\" for the mailbox (Microsoft 365 admin center > Users > Active users > the user > Mail > Manage email apps), and check that the tenant does not disable it (Exchange Online PowerShell: Set-TransportConfig -SmtpClientAuthenticationDisabled $false) and that Security defaults do not block it; the token also needs the SMTP.Send permission (app-only tokens: SMTP.SendAsApp, and the app's service principal registered in Exchange Online with New-ServicePrincipal and given the mailbox with Add-MailboxPermission)",
            short: "SMTP AUTH may be disabled for the mailbox or tenant: enable Authenticated SMTP in the Microsoft 365 admin center",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failed_535_5_7_3_names_authenticated_smtp() {
        let e = UpstreamError::AuthFailed {
            addr: "smtp.office365.com:587".into(),
            username: "me@example.com".into(),
            reply: Reply::new(
                535,
                [5, 7, 3],
                "Authentication unsuccessful [SN4PR0501CA0054.namprd05.prod.outlook.com]",
            ),
            challenge: None,
        };
        let text = e.to_string();
        assert!(
            text.contains("Authenticated SMTP") && text.contains("admin center"),
            "{text}"
        );
        let r = e.reply();
        assert_eq!((r.code, r.esc), (454, Some([4, 7, 0])));
        assert!(r.text.contains("Authenticated SMTP"), "{}", r.text);
        let gmail = UpstreamError::AuthFailed {
            addr: "smtp.gmail.com:587".into(),
            username: "me@example.com".into(),
            reply: Reply::new(535, [5, 7, 8], "Username and Password not accepted."),
            challenge: None,
        };
        assert!(!gmail.to_string().contains("Authenticated SMTP"));
        assert!(!gmail.reply().text.contains("Authenticated SMTP"));
    }

    #[test]
    fn replies_keep_upstream_codes_and_map_ours() {
        let addr = "smtp.example:587".to_string();
        let rejected = UpstreamError::Rejected {
            addr: addr.clone(),
            stage: Stage::Mail,
            reply: Reply::new(550, [5, 4, 5], "Daily user sending limit exceeded."),
        };
        assert_eq!(rejected.reply().code, 550);
        assert_eq!(rejected.reply().esc, Some([5, 4, 5]));
        assert!(!rejected.is_transient());
        let lost = UpstreamError::Indeterminate {
            addr: addr.clone(),
            cause: "EOF".into(),
        };
        assert_eq!(
            lost.reply().to_string(),
            "451 4.4.2 connection lost after the message was sent; delivery status unknown"
        );
        let t = UpstreamError::PoolTimeout {
            addr: addr.clone(),
            waited: Duration::from_secs(30),
        };
        assert_eq!(t.reply().esc_string().as_deref(), Some("4.4.1"));
        let c = UpstreamError::Connect {
            addr,
            cause: "connection refused".into(),
        };
        assert!(c.reply().text.contains("smtp.example:587"));
        assert!(c.is_transient());
    }
}
