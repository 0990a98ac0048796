//! SMTP replies as values: a code, an optional enhanced status code (RFC 3463) and text.
//! Every layer (ingress, upstream, relay) speaks `Reply`, and it is written to the wire in
//! one place, so multi-line replies and enhanced codes are always formatted the same way.

use std::fmt;

/// One SMTP reply. `text` may hold several lines separated by `\n`; each becomes a line
/// of a multi-line reply (`250-…` continuation lines, `250 …` last line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub esc: Option<[u8; 3]>,
    pub text: String,
}

impl Reply {
    /// A reply with an enhanced status code, e.g. `Reply::new(250, [2, 0, 0], "OK")`.
    pub fn new(code: u16, esc: [u8; 3], text: impl Into<String>) -> Self {
        Reply {
            code,
            esc: Some(esc),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code (greeting, 221, 354).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            esc: None,
            text: text.into(),
        }
    }

    /// Builds a reply from what an upstream server said, keeping its code, enhanced code
    /// and text (smtp-proto reports a missing enhanced code as `[0, 0, 0]`).
    pub fn from_response(r: &smtp_proto::Response<String>) -> Self {
        Reply {
            code: r.code,
            esc: (r.esc[0] != 0).then_some(r.esc),
            text: r.message.clone(),
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (CRLF line endings) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let mut lines = self
            .text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .peekable();
        if lines.peek().is_none() {
            let _ = write!(out, "{}", self.code);
        }
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            let _ = match self.esc {
                Some([a, b, c]) => write!(out, "{}{sep}{a}.{b}.{c} {line}\r\n", self.code),
                None => write!(out, "{}{sep}{line}\r\n", self.code),
            };
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16);
        self.write_to(&mut out);
        out
    }

    /// The enhanced status code as text (`"5.7.8"`), if there is one.
    pub fn esc_string(&self) -> Option<String> {
        self.esc.map(|[a, b, c]| format!("{a}.{b}.{c}"))
    }
}

impl fmt::Display for Reply {
    /// One line, for logs: `550 5.1.1 The email account … does not exist.`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(esc) = self.esc_string() {
            write!(f, " {esc}")?;
        }
        let text = self.text.replace(['\r', '\n'], " ");
        if !text.is_empty() {
            write!(f, " {text}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_esc() {
        let r = Reply::new(250, [2, 1, 0], "OK");
        assert_eq!(r.to_bytes(), b"250 2.1.0 OK\r\n");
    }

    #[test]
    fn multi_line() {
        let r = Reply::new(
            535,
            [5, 7, 8],
            "Username and Password not accepted.\nLearn more",
        );
        assert_eq!(
            r.to_bytes(),
            b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n"
        );
        assert_eq!(
            r.to_string(),
            "535 5.7.8 Username and Password not accepted. Learn more"
        );
    }

    #[test]
    fn plain_reply() {
        assert_eq!(
            Reply::plain(354, "Go ahead").to_bytes(),
            b"354 Go ahead\r\n"
        );
    }
}
