//! The DATA phase: reading the message text with `smtp-proto`'s `DataReceiver`, the size
//! limit, line-ending normalisation and our `Received:` trace header.
//!
//! `DataReceiver` ends the message only at `CRLF . CRLF` (a bare LF never ends it, so SMTP
//! smuggling with `\n.\n`, `\r\n.\n` or `\n.\r\n` cannot split one message in two) and undoes
//! dot-stuffing. Three gaps are closed here: it starts as if it were in the middle of a
//! line, so a message whose very first line is `.` (empty message) or `..x` would be
//! misread — we prime it with a CRLF; it also ends at `CRLF . CR CR LF` — we resume
//! instead; and it has no size limit — once the message grows past `max_message_size` we
//! keep only the last bytes and read on to the end of the data, so the session stays in
//! sync and the client gets its `552` as the reply to the final dot.
//!
//! What the three smuggling sequences become (tested): `a\n.\nb` and `a\n.\r\nb` keep the dot
//! (it does not follow CRLF) and are delivered as `a\r\n.\r\nb`; `a\r\n.\nb` is a line that
//! starts with a dot after CRLF and has more characters (a bare LF ends no line), so RFC
//! 5321 4.5.2 removes the dot and it is delivered as `a\r\n\r\nb`. None ends the message.
//! The message text always ends in CRLF (the CRLF of `CRLF.CRLF` belongs to the last line)
//! unless it is empty; it is never changed otherwise, 8-bit bytes included.

use std::net::IpAddr;
use std::slice::Iter;

use memchr::memchr2;

use smtp_proto::request::receiver::DataReceiver;

/// Reads one message's text, byte slice by byte slice, as it comes off the socket.
pub(crate) struct DataReader {
    receiver: DataReceiver,
    /// Set once the message is over the limit: the rest is read and thrown away.
    too_big: bool,
    /// Our `Received:` header, then the message as received (dot-stuffing undone). Once
    /// `too_big`, only the last bytes read (enough to recognise the end).
    buf: Vec<u8>,
    header_len: usize,
    max_size: usize,
}

/// What the client sent between `354` and the end of data.
pub(crate) enum DataOutcome {
    /// The complete message (header included), every line ending in CRLF.
    Complete(Vec<u8>),
    /// The message was larger than `max_message_size`; its text was discarded.
    TooBig,
}

/// A `DataReceiver` in the state "at the start of a line": a `.` next is either the end
/// of data or a stuffed dot.
fn receiver_at_line_start() -> DataReceiver {
    let mut receiver = DataReceiver::new();
    let mut scratch = Vec::with_capacity(2);
    let ended = receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
    debug_assert!(!ended);
    receiver
}

impl DataReader {
    /// `header` is the `Received:` field to put in front of the message.
    pub(crate) fn new(mut header: Vec<u8>, max_size: usize) -> Self {
        let header_len = header.len();
        header.reserve(8192);
        DataReader {
            receiver: receiver_at_line_start(),
            too_big: false,
            buf: header,
            header_len,
            max_size,
        }
    }

    /// Consumes bytes from `bytes`; returns true once the end of data (`CRLF.CRLF`) was read.
    /// Bytes after the end are left in `bytes` (pipelined commands).
    pub(crate) fn ingest(&mut self, bytes: &mut Iter<'_, u8>) -> bool {
        loop {
            let done = self.receiver.ingest(bytes, &mut self.buf);
            if !self.too_big && self.buf.len() - self.header_len > self.max_size {
                self.too_big = true;
            }
            if self.too_big && self.buf.len() > 2 {
                // Keep two bytes: the receiver may pop one, and the last one tells a
                // lenient end (below) from a real one.
                let keep = self.buf.len() - 2;
                self.buf.drain(..keep);
            }
            if !done {
                return false;
            }
            // smtp-proto also ends at `CRLF . CR+ CRLF`, leaving the extra CRs in the
            // buffer. That is not `CRLF.CRLF`: per RFC 5321 4.5.2 it is a line starting
            // with a dot (removed) followed by other characters. Put back the CRLF the
            // receiver took and carry on at the start of the next line.
            if self.buf.last() == Some(&b'\r') {
                self.buf.extend_from_slice(b"\r\n");
                self.receiver = receiver_at_line_start();
                continue;
            }
            return true;
        }
    }

    /// The result once `ingest` returned true.
    pub(crate) fn finish(self) -> DataOutcome {
        if self.too_big {
            return DataOutcome::TooBig;
        }
        DataOutcome::Complete(normalize_line_endings(self.buf, self.header_len))
    }
}

/// Turns every bare CR and bare LF at or after `from` into CRLF.
///
/// `DataReceiver` keeps bare CR/LF as they came, and Gmail (or a laxer next hop) might take
/// `\n.\n` for an end of data or a bare LF for a line break where we did not: normalising
/// means that nothing we forward can be read two ways. The result is still the *unstuffed*
/// text: a line that now consists of `.` alone (from a client's `a\n.\nb`) is content, and
/// the upstream writer dot-stuffs it again when sending, so it never ends the message.
///
/// Returns `buf` unchanged (no copy) when it has no bare CR or LF — the usual case.
pub(crate) fn normalize_line_endings(buf: Vec<u8>, from: usize) -> Vec<u8> {
    let Some(first) = next_bare(&buf, from) else {
        return buf;
    };
    let mut out = Vec::with_capacity(buf.len() + 64);
    out.extend_from_slice(&buf[..first]);
    let mut pos = first;
    loop {
        // `buf[pos]` is a bare CR or a bare LF: either way one line break.
        out.extend_from_slice(b"\r\n");
        pos += 1;
        match next_bare(&buf, pos) {
            Some(next) => {
                out.extend_from_slice(&buf[pos..next]);
                pos = next;
            }
            None => {
                out.extend_from_slice(&buf[pos..]);
                return out;
            }
        }
    }
}

/// The position of the next CR not followed by LF, or LF not preceded by CR, from `pos`.
fn next_bare(buf: &[u8], mut pos: usize) -> Option<usize> {
    while let Some(off) = memchr2(b'\r', b'\n', &buf[pos..]) {
        let at = pos + off;
        if buf[at] == b'\r' && buf.get(at + 1) == Some(&b'\n') {
            pos = at + 2;
        } else {
            return Some(at);
        }
    }
    None
}

/// The protocol keyword of the `with` clause (RFC 3848, RFC 6531).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Smtp,
    Esmtp,
    Utf8Smtp,
}

impl Protocol {
    fn keyword(self) -> &'static str {
        match self {
            Protocol::Smtp => "SMTP",
            Protocol::Esmtp => "ESMTP",
            Protocol::Utf8Smtp => "UTF8SMTP",
        }
    }
}

/// What goes into our `Received:` field.
pub(crate) struct TraceInfo<'a> {
    /// The HELO/EHLO name; the peer's address literal when the client gave none.
    pub helo: Option<&'a str>,
    pub peer: IpAddr,
    pub hostname: &'a str,
    pub protocol: Protocol,
    pub id: &'a str,
    /// Only given when the message has exactly one recipient (RFC 5321 4.4: privacy).
    pub recipient: Option<&'a str>,
    /// RFC 5322 date-time.
    pub date: &'a str,
}

/// Appends `Received: from <helo> (<peer literal>)\r\n\tby <host> (smtp-oauth-relay) with
/// <proto> id <id>\r\n\tfor <rcpt>; <date>\r\n` to `out`.
pub(crate) fn write_received(out: &mut Vec<u8>, t: &TraceInfo<'_>) {
    let literal = address_literal(t.peer);
    out.extend_from_slice(b"Received: from ");
    match t.helo {
        Some(helo) => push_sanitized(out, helo),
        None => out.extend_from_slice(literal.as_bytes()),
    }
    out.extend_from_slice(b" (");
    out.extend_from_slice(literal.as_bytes());
    out.extend_from_slice(b")\r\n\tby ");
    push_sanitized(out, t.hostname);
    out.extend_from_slice(b" (smtp-oauth-relay) with ");
    out.extend_from_slice(t.protocol.keyword().as_bytes());
    out.extend_from_slice(b" id ");
    out.extend_from_slice(t.id.as_bytes());
    if let Some(rcpt) = t.recipient {
        out.extend_from_slice(b"\r\n\tfor <");
        push_sanitized(out, rcpt);
        out.push(b'>');
    }
    out.extend_from_slice(b"; ");
    out.extend_from_slice(t.date.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3).
pub(crate) fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

/// Client-supplied text in a header: no controls, no comment delimiters. UTF-8 is kept
/// (only reachable with SMTPUTF8 addresses, where RFC 6532 allows it).
fn push_sanitized(out: &mut Vec<u8>, s: &str) {
    for ch in s.chars() {
        match ch {
            '(' | ')' | '\\' | '<' | '>' | ';' => out.push(b'_'),
            c if c.is_control() || c == ' ' || c == '\u{FFFD}' => out.push(b'_'),
            c => {
                let mut tmp = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one by one; returns the message text (without header) and what was
    /// left over after the end of data.
    fn read(chunks: &[&[u8]], max: usize) -> (Option<Vec<u8>>, Vec<u8>) {
        let mut reader = DataReader::new(b"H: x\r\n".to_vec(), max);
        for (i, chunk) in chunks.iter().enumerate() {
            let mut it = chunk.iter();
            if reader.ingest(&mut it) {
                let mut rest = it.as_slice().to_vec();
                for later in &chunks[i + 1..] {
                    rest.extend_from_slice(later);
                }
                return match reader.finish() {
                    DataOutcome::Complete(v) => {
                        assert!(v.starts_with(b"H: x\r\n"));
                        (Some(v[6..].to_vec()), rest)
                    }
                    DataOutcome::TooBig => (None, rest),
                };
            }
        }
        panic!("no end of data in {chunks:?}");
    }

    #[test]
    fn plain_message_ends_with_crlf() {
        let (msg, rest) = read(&[b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n"], 1000);
        assert_eq!(msg.unwrap(), b"Subject: a\r\n\r\nbody\r\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[test]
    fn empty_message_and_leading_dot_lines() {
        assert_eq!(read(&[b".\r\n"], 10).0.unwrap(), b"");
        assert_eq!(read(&[b"..x\r\n.\r\n"], 10).0.unwrap(), b".x\r\n");
        assert_eq!(read(&[b"\r\n.\r\n"], 10).0.unwrap(), b"\r\n");
    }

    #[test]
    fn dot_unstuffing_across_chunks() {
        let (msg, _) = read(&[b"a\r", b"\n.", b".b\r\n", b"..\r\n.", b"\r", b"\n"], 1000);
        assert_eq!(msg.unwrap(), b"a\r\n.b\r\n.\r\n");
    }

    #[test]
    fn bare_lf_dot_never_ends_data_and_is_normalised() {
        // `\n.\n` and `\n.\r\n`: the dot is not after CRLF, so it is content.
        let (msg, _) = read(&[b"a\n.\nb\r\n.\r\n"], 1000);
        assert_eq!(msg.unwrap(), b"a\r\n.\r\nb\r\n");
        let (msg, _) = read(&[b"a\n.\r\nb\r\n.\r\n"], 1000);
        assert_eq!(msg.unwrap(), b"a\r\n.\r\nb\r\n");
        // `\r\n.\n`: the line starts with a dot after CRLF and has more characters (the
        // bare LF is not a line end), so RFC 5321 4.5.2 removes the dot.
        let (msg, _) = read(&[b"a\r\n.\nb\r\n.\r\n"], 1000);
        assert_eq!(msg.unwrap(), b"a\r\n\r\nb\r\n");
    }

    #[test]
    fn dot_cr_cr_lf_is_not_an_end_of_data() {
        let (msg, rest) = read(&[b"a\r\n.\r\r\nb\r\n.\r\nX"], 1000);
        // The line `.\r\r\n` is `\r` after dot removal, then normalised.
        assert_eq!(msg.unwrap(), b"a\r\n\r\n\r\nb\r\n");
        assert_eq!(rest, b"X");
        let (msg, rest) = read(&[b"0123456789\r\n.\r", b"\r\nmore\r\n.\r\nX"], 5);
        assert!(msg.is_none());
        assert_eq!(rest, b"X");
    }

    #[test]
    fn bare_cr_normalised() {
        let (msg, _) = read(&[b"a\rb\r\r\n.\r\n"], 1000);
        assert_eq!(msg.unwrap(), b"a\r\nb\r\n\r\n");
    }

    #[test]
    fn normalise_keeps_header_and_crlf_untouched() {
        let v = b"X\nY\r\nZ\n".to_vec();
        assert_eq!(normalize_line_endings(v.clone(), 0), b"X\r\nY\r\nZ\r\n");
        assert_eq!(normalize_line_endings(v, 2), b"X\nY\r\nZ\r\n");
        let clean = b"a\r\nb\r\n".to_vec();
        let ptr = clean.as_ptr();
        let same = normalize_line_endings(clean, 0);
        assert_eq!(same.as_ptr(), ptr, "no copy without bare CR/LF");
    }

    #[test]
    fn oversize_is_read_to_the_end_and_discarded() {
        let (msg, rest) = read(&[b"0123456789", b"abc\r\n", b"more\r\n.\r\nNOOP\r\n"], 8);
        assert!(msg.is_none());
        assert_eq!(rest, b"NOOP\r\n");
        // Exactly at the limit is fine.
        let (msg, _) = read(&[b"123456\r\n.\r\n"], 8);
        assert_eq!(msg.unwrap(), b"123456\r\n");
    }

    #[test]
    fn received_header_shape() {
        let mut out = Vec::new();
        write_received(
            &mut out,
            &TraceInfo {
                helo: Some("printer (lobby)"),
                peer: "::1".parse().unwrap(),
                hostname: "relay.example",
                protocol: Protocol::Esmtp,
                id: "ABCDEFGHJKMN0123",
                recipient: Some("a@b.example"),
                date: "Wed, 25 Nov 2026 15:00:00 +0000",
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from printer__lobby_ ([IPv6:::1])\r\n\tby relay.example \
             (smtp-oauth-relay) with ESMTP id ABCDEFGHJKMN0123\r\n\tfor <a@b.example>; \
             Wed, 25 Nov 2026 15:00:00 +0000\r\n"
        );
        assert_eq!(address_literal("127.0.0.1".parse().unwrap()), "[127.0.0.1]");
        assert_eq!(
            address_literal("::ffff:127.0.0.1".parse().unwrap()),
            "[127.0.0.1]"
        );
    }
}
