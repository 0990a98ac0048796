//! The spool on disk: segment files written in one piece per commit batch, per-segment
//! "done" logs, per-message state files, and the `failed/` and `corrupt/` areas.
//!
//! ```text
//! <dir>/lock                  flock'ed by the running daemon (one daemon per spool)
//! <dir>/control.sock          the daemon's control socket (mode 0600)
//! <dir>/tmp/<SEG>.seg         a batch being written; never read, removed at start
//! <dir>/queue/<SEG>.seg       a durable batch: MAGIC, then records (below); immutable
//! <dir>/queue/<SEG>.done      append-only, one queue ID per line: finished messages
//! <dir>/queue/<ID>.state      JSON: attempts, next attempt, last error, per recipient
//! <dir>/failed/<ID>.eml|.json bounced messages (the message, and why) for inspection
//! <dir>/corrupt/<SEG>.seg     segments that failed their checks (moved aside at start)
//! ```
//!
//! A record is `u32 meta_len | u64 data_len | u32 crc32(meta ‖ data) | meta | data`
//! (little-endian), meta being the JSON [`MessageMeta`]. A segment is written to `tmp/`,
//! fsynced, renamed into `queue/`, and `queue/` is fsynced: once that returns, every
//! message in it is durable (two fsyncs per batch, whatever its size). A message is live
//! while its ID is not in its segment's done log; a segment whose messages are all done
//! is deleted. A segment down to a quarter of its messages, all of them deferred, is
//! compacted: its live messages are copied into a new segment (fsynced), then marked done
//! in the old one. A crash in between leaves two copies; recovery keeps one per ID. State files are rewritten atomically (tmp, fsync, rename) and only exist
//! for messages that were deferred or partly delivered.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

use super::SpoolError;
use crate::reply::Reply;

/// First bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"SORSEG01";
const RECORD_HEADER: usize = 16;
/// A meta JSON larger than this is not ours.
const MAX_META: u32 = 4 << 20;

/// Writes bytes to a file. The spool's only write path for segments, so tests can make
/// it fail like a full disk.
pub trait SpoolWriter: Send + Sync + 'static {
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()>;
}

/// The real writer.
#[derive(Debug, Default)]
pub struct DiskWriter;

impl SpoolWriter for DiskWriter {
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }
}

/// The envelope of one queued message, as stored in its segment record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageMeta {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    #[serde(default)]
    pub eight_bit: bool,
    #[serde(default)]
    pub smtputf8: bool,
    /// When the 250 was given, Unix milliseconds.
    pub arrival_ms: u64,
}

/// An SMTP reply as stored in state files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredReply {
    pub code: u16,
    #[serde(default)]
    pub esc: Option<[u8; 3]>,
    pub text: String,
}

impl From<&Reply> for StoredReply {
    fn from(r: &Reply) -> Self {
        StoredReply {
            code: r.code,
            esc: r.esc,
            text: r.text.clone(),
        }
    }
}

impl From<&StoredReply> for Reply {
    fn from(r: &StoredReply) -> Self {
        Reply {
            code: r.code,
            esc: r.esc,
            text: r.text.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    Pending,
    Delivered,
    /// Refused for good (or expired); a DSN was queued for it.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientState {
    pub address: String,
    pub status: RcptStatus,
    /// The last reply concerning this recipient.
    #[serde(default)]
    pub reply: Option<StoredReply>,
}

/// Delivery progress of one message (`<ID>.state`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageState {
    pub attempts: u32,
    /// Unix milliseconds; 0 = as soon as possible.
    #[serde(default)]
    pub next_attempt_ms: u64,
    #[serde(default)]
    pub last_attempt_ms: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    pub recipients: Vec<RecipientState>,
}

impl MessageState {
    pub fn new(meta: &MessageMeta) -> Self {
        MessageState {
            attempts: 0,
            next_attempt_ms: 0,
            last_attempt_ms: 0,
            last_error: None,
            recipients: meta
                .recipients
                .iter()
                .map(|a| RecipientState {
                    address: a.clone(),
                    status: RcptStatus::Pending,
                    reply: None,
                })
                .collect(),
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = &RecipientState> {
        self.recipients
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
    }
}

/// Where a message's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub segment: String,
    pub offset: u64,
    pub len: u64,
}

/// One message found in the queue at start.
#[derive(Debug)]
pub struct Recovered {
    pub meta: MessageMeta,
    pub loc: Location,
    pub state: Option<MessageState>,
}

/// What the start-up scan found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub messages: Vec<Recovered>,
    /// Temp files of unfinished batches, removed.
    pub temp_removed: usize,
    /// Segments moved to `corrupt/` (their good records were saved first).
    pub corrupt: Vec<String>,
    /// Segments whose messages were all done, removed.
    pub finished_removed: usize,
}

/// Counters shared by the committer and the queue (reported at shutdown and by `stats`).
#[derive(Debug, Default)]
pub struct Counters {
    pub fsyncs: AtomicU64,
    pub batches: AtomicU64,
    pub committed: AtomicU64,
}

/// The spool directory and its layout.
pub struct Store {
    pub dir: PathBuf,
    writer: Box<dyn SpoolWriter>,
    pub counters: Counters,
    seq: AtomicU64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A queue ID or segment name is safe as a file name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// CRC-32 (IEEE), bitwise-table-free; fast enough for a check on read and write.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for p in parts {
        for &b in *p {
            crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

/// Encodes one record.
pub fn encode_record(meta: &MessageMeta, data: &[u8], out: &mut Vec<u8>) {
    let m = serde_json::to_vec(meta).unwrap_or_default();
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(&[&m, data]).to_le_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(data);
}

/// A parsed segment: the good records, and why parsing stopped early, if it did.
pub struct ParsedSegment {
    /// (meta, data offset, data length)
    pub records: Vec<(MessageMeta, u64, u64)>,
    pub error: Option<String>,
}

/// Parses a whole segment file's bytes.
pub fn parse_segment(bytes: &[u8]) -> ParsedSegment {
    let mut records = Vec::new();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return ParsedSegment {
            records,
            error: Some("not a spool segment (bad magic)".into()),
        };
    }
    let mut pos = MAGIC.len();
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < RECORD_HEADER {
            return ParsedSegment {
                records,
                error: Some(format!("truncated record header at offset {pos}")),
            };
        }
        let meta_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let mut dl = [0u8; 8];
        dl.copy_from_slice(&rest[4..12]);
        let data_len = u64::from_le_bytes(dl);
        let crc = u32::from_le_bytes([rest[12], rest[13], rest[14], rest[15]]);
        let body = &rest[RECORD_HEADER..];
        if meta_len > MAX_META || (meta_len as u64).saturating_add(data_len) > body.len() as u64 {
            return ParsedSegment {
                records,
                error: Some(format!("truncated or damaged record at offset {pos}")),
            };
        }
        let (m, d) = body[..meta_len as usize + data_len as usize].split_at(meta_len as usize);
        if crc32(&[m, d]) != crc {
            return ParsedSegment {
                records,
                error: Some(format!("checksum mismatch in record at offset {pos}")),
            };
        }
        let meta: MessageMeta = match serde_json::from_slice::<MessageMeta>(m) {
            Ok(meta) if valid_name(&meta.id) => meta,
            _ => {
                return ParsedSegment {
                    records,
                    error: Some(format!("bad envelope in record at offset {pos}")),
                }
            }
        };
        let data_off = (pos + RECORD_HEADER + meta_len as usize) as u64;
        records.push((meta, data_off, data_len));
        pos += RECORD_HEADER + meta_len as usize + data_len as usize;
    }
    ParsedSegment {
        records,
        error: None,
    }
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl Store {
    /// The layout under `dir` (nothing is created yet).
    pub fn new(dir: PathBuf, writer: Box<dyn SpoolWriter>) -> Store {
        Store {
            dir,
            writer,
            counters: Counters::default(),
            seq: AtomicU64::new(0),
        }
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.dir.join("queue")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
    pub fn failed_dir(&self) -> PathBuf {
        self.dir.join("failed")
    }
    pub fn corrupt_dir(&self) -> PathBuf {
        self.dir.join("corrupt")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn segment_path(&self, seg: &str) -> PathBuf {
        self.queue_dir().join(format!("{seg}.seg"))
    }
    fn done_path(&self, seg: &str) -> PathBuf {
        self.queue_dir().join(format!("{seg}.done"))
    }
    fn state_path(&self, id: &str) -> PathBuf {
        self.queue_dir().join(format!("{id}.state"))
    }

    /// Creates the directories (mode 0700) if missing.
    pub fn create_dirs(&self) -> Result<(), SpoolError> {
        for d in [
            self.dir.clone(),
            self.queue_dir(),
            self.tmp_dir(),
            self.failed_dir(),
            self.corrupt_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(io_err("create directory", &d))?;
        }
        Ok(())
    }

    /// Takes the spool's lock (an exclusive `flock` on `<dir>/lock`), without waiting.
    /// The returned file holds it until dropped.
    pub fn lock(&self) -> Result<File, SpoolError> {
        let path = self.lock_path();
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("open", &path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(SpoolError::Locked {
                dir: self.dir.clone(),
            });
        }
        Ok(f)
    }

    fn new_segment_name(&self) -> String {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{millis:012x}-{n:06x}-{:04x}", rand::random::<u16>())
    }

    /// Writes one batch durably: `tmp/<SEG>.seg`, fsync, rename into `queue/`, fsync
    /// `queue/`. Returns the segment name and each message's location. On failure the
    /// temp file is removed and nothing is in the queue.
    pub fn write_segment(
        &self,
        batch: &[(MessageMeta, &[u8])],
    ) -> Result<(String, Vec<Location>), SpoolError> {
        let seg = self.new_segment_name();
        let tmp = self.tmp_dir().join(format!("{seg}.seg"));
        let mut buf = Vec::with_capacity(
            MAGIC.len() + batch.iter().map(|(_, d)| d.len() + 256).sum::<usize>(),
        );
        buf.extend_from_slice(MAGIC);
        let mut locs = Vec::with_capacity(batch.len());
        for (meta, data) in batch {
            let start = buf.len();
            encode_record(meta, data, &mut buf);
            let data_off = (buf.len() - data.len()) as u64;
            debug_assert!(data_off as usize > start);
            locs.push(Location {
                segment: seg.clone(),
                offset: data_off,
                len: data.len() as u64,
            });
        }
        let result = (|| -> Result<(), SpoolError> {
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            self.writer
                .write_all(&mut f, &buf)
                .map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("fsync", &tmp))?;
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            let dest = self.segment_path(&seg);
            fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
            let q = self.queue_dir();
            fsync_dir(&q).map_err(io_err("fsync", &q))?;
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .committed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok((seg, locs))
    }

    /// Reads one message's bytes.
    pub fn read_data(&self, loc: &Location) -> Result<Vec<u8>, SpoolError> {
        let path = self.segment_path(&loc.segment);
        let mut f = File::open(&path).map_err(io_err("open", &path))?;
        f.seek(SeekFrom::Start(loc.offset))
            .map_err(io_err("seek", &path))?;
        let mut data = vec![0u8; loc.len as usize];
        f.read_exact(&mut data).map_err(io_err("read", &path))?;
        Ok(data)
    }

    /// Records that `id` (in `seg`) is finished, and removes its state file.
    pub fn mark_done(&self, seg: &str, id: &str) -> Result<(), SpoolError> {
        let path = self.done_path(seg);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("open", &path))?;
        f.write_all(format!("{id}\n").as_bytes())
            .map_err(io_err("write", &path))?;
        let _ = fs::remove_file(self.state_path(id));
        Ok(())
    }

    /// Removes a segment whose messages are all done, with its done log.
    pub fn remove_segment(&self, seg: &str) {
        let _ = fs::remove_file(self.segment_path(seg));
        let _ = fs::remove_file(self.done_path(seg));
    }

    /// Atomically replaces `<ID>.state`.
    pub fn write_state(&self, id: &str, state: &MessageState) -> Result<(), SpoolError> {
        let path = self.state_path(id);
        let tmp = self.queue_dir().join(format!("{id}.state.tmp"));
        let json = serde_json::to_vec_pretty(state).unwrap_or_default();
        (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })()
        .map_err(io_err("write", &path))
    }

    /// Keeps a bounced message in `failed/<ID>.eml` and `failed/<ID>.json`.
    pub fn keep_failed(
        &self,
        meta: &MessageMeta,
        state: &MessageState,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        let eml = self.failed_dir().join(format!("{}.eml", meta.id));
        let json = self.failed_dir().join(format!("{}.json", meta.id));
        let info = serde_json::json!({ "envelope": meta, "state": state });
        let body = serde_json::to_vec_pretty(&info).unwrap_or_default();
        for (path, bytes) in [(&eml, data), (&json, &body[..])] {
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(bytes))
                .map_err(io_err("write", path))?;
        }
        Ok(())
    }

    fn read_done(&self, seg: &str) -> HashSet<String> {
        // Lossy: a damaged line must not hide the others (that would resend them).
        fs::read(self.done_path(seg))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .filter(|l| valid_name(l))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn read_state(&self, meta: &MessageMeta) -> Option<MessageState> {
        let bytes = fs::read(self.state_path(&meta.id)).ok()?;
        match serde_json::from_slice::<MessageState>(&bytes) {
            Ok(s)
                if s.recipients.len() == meta.recipients.len()
                    && s.recipients
                        .iter()
                        .zip(&meta.recipients)
                        .all(|(r, a)| &r.address == a) =>
            {
                Some(s)
            }
            _ => {
                tracing::warn!(id = %meta.id, "spool: state file unreadable; retrying every recipient");
                None
            }
        }
    }

    /// Lists segments in `queue/`, oldest first.
    fn segments(&self) -> Result<Vec<String>, SpoolError> {
        let q = self.queue_dir();
        let mut segs: Vec<String> = fs::read_dir(&q)
            .map_err(io_err("read directory", &q))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".seg"))
                    .filter(|n| valid_name(n))
                    .map(str::to_owned)
            })
            .collect();
        segs.sort();
        Ok(segs)
    }

    /// Reads the queue without changing anything (for the CLI with no daemon): the live
    /// messages of every readable segment.
    pub fn scan_readonly(&self) -> Result<Vec<Recovered>, SpoolError> {
        let mut out = Vec::new();
        for seg in self.segments()? {
            let Ok(bytes) = fs::read(self.segment_path(&seg)) else {
                continue;
            };
            let done = self.read_done(&seg);
            for (meta, off, len) in parse_segment(&bytes).records {
                if done.contains(&meta.id) {
                    continue;
                }
                let state = self.read_state(&meta);
                out.push(Recovered {
                    loc: Location {
                        segment: seg.clone(),
                        offset: off,
                        len,
                    },
                    meta,
                    state,
                });
            }
        }
        Ok(out)
    }

    fn keep_live(
        &self,
        meta: MessageMeta,
        loc: Location,
        live_ids: &mut HashSet<String>,
        r: &mut Recovery,
    ) {
        let state = self.read_state(&meta);
        live_ids.insert(meta.id.clone());
        r.messages.push(Recovered { meta, loc, state });
    }

    /// The start-up pass (the daemon holds the lock): removes temp files, removes
    /// finished segments, moves damaged segments to `corrupt/` after saving their good
    /// records in a new segment, removes orphaned state files, and returns every live
    /// message.
    pub fn recover(&self) -> Result<Recovery, SpoolError> {
        let mut r = Recovery::default();
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp)
            .map_err(io_err("read directory", &tmp))?
            .flatten()
        {
            if fs::remove_file(e.path()).is_ok() {
                r.temp_removed += 1;
            }
        }
        let mut live_ids = HashSet::new();
        let mut live_segs = HashSet::new();
        for seg in self.segments()? {
            let path = self.segment_path(&seg);
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            let done = self.read_done(&seg);
            let parsed = parse_segment(&bytes);
            let live: Vec<(MessageMeta, u64, u64)> = parsed
                .records
                .into_iter()
                .filter(|(m, _, _)| !done.contains(&m.id) && !live_ids.contains(&m.id))
                .collect();
            if let Some(why) = parsed.error {
                // Save what is good, then move the file aside.
                let batch: Vec<(MessageMeta, &[u8])> = live
                    .iter()
                    .map(|(m, off, len)| (m.clone(), &bytes[*off as usize..(*off + *len) as usize]))
                    .collect();
                if !batch.is_empty() {
                    let (new_seg, locs) = self.write_segment(&batch)?;
                    live_segs.insert(new_seg);
                    for ((meta, _), loc) in batch.into_iter().zip(locs) {
                        self.keep_live(meta, loc, &mut live_ids, &mut r);
                    }
                }
                let dest = self.corrupt_dir().join(format!("{seg}.seg"));
                fs::rename(&path, &dest).map_err(io_err("rename", &dest))?;
                let _ = fs::remove_file(self.done_path(&seg));
                tracing::error!(
                    segment = %seg,
                    problem = %why,
                    saved = live.len(),
                    moved_to = %dest.display(),
                    "spool: damaged queue file moved aside; its readable messages stay queued"
                );
                r.corrupt.push(seg);
                continue;
            }
            if live.is_empty() {
                self.remove_segment(&seg);
                r.finished_removed += 1;
                continue;
            }
            live_segs.insert(seg.clone());
            for (meta, offset, len) in live {
                let loc = Location {
                    segment: seg.clone(),
                    offset,
                    len,
                };
                self.keep_live(meta, loc, &mut live_ids, &mut r);
            }
        }
        // Orphans: state files of finished messages, done logs without a segment.
        let q = self.queue_dir();
        for e in fs::read_dir(&q)
            .map_err(io_err("read directory", &q))?
            .flatten()
        {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = if let Some(id) = name.strip_suffix(".state") {
                !live_ids.contains(id)
            } else if let Some(seg) = name.strip_suffix(".done") {
                !live_segs.contains(seg)
            } else {
                name.ends_with(".tmp")
            };
            if orphan {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> MessageMeta {
        MessageMeta {
            id: id.into(),
            sender: "a@example.com".into(),
            recipients: vec!["b@example.com".into()],
            eight_bit: false,
            smtputf8: false,
            arrival_ms: 1,
        }
    }

    #[test]
    fn crc_known_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    }

    #[test]
    fn write_read_recover_and_salvage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_owned(), Box::new(DiskWriter));
        store.create_dirs().unwrap();
        let (seg, locs) = store
            .write_segment(&[(meta("A1"), b"one\r\n"), (meta("A2"), b"two\r\n")])
            .unwrap();
        assert_eq!(store.read_data(&locs[1]).unwrap(), b"two\r\n");
        assert_eq!(store.counters.fsyncs.load(Ordering::Relaxed), 2);
        store.mark_done(&seg, "A1").unwrap();
        std::fs::write(store.tmp_dir().join("x.seg"), b"half").unwrap();
        let r = store.recover().unwrap();
        assert_eq!(r.temp_removed, 1);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].meta.id, "A2");

        // Cut the segment inside its second record: A2 is lost, nothing else.
        let (seg2, _) = store
            .write_segment(&[(meta("B1"), b"b1\r\n"), (meta("B2"), b"b2\r\n")])
            .unwrap();
        let p = store.segment_path(&seg2);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 3).unwrap();
        let r = store.recover().unwrap();
        let ids: Vec<_> = r.messages.iter().map(|m| m.meta.id.as_str()).collect();
        assert_eq!(ids, vec!["A2", "B1"]);
        assert_eq!(r.corrupt, vec![seg2.clone()]);
        assert!(store.corrupt_dir().join(format!("{seg2}.seg")).exists());
        let b1 = r.messages.iter().find(|m| m.meta.id == "B1").unwrap();
        assert_eq!(store.read_data(&b1.loc).unwrap(), b"b1\r\n");
    }

    #[test]
    fn state_files_round_trip_and_damaged_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_owned(), Box::new(DiskWriter));
        store.create_dirs().unwrap();
        let (_, _) = store
            .write_segment(&[(meta("S1"), b"x\r\n"), (meta("S2"), b"y\r\n")])
            .unwrap();
        let mut st = MessageState::new(&meta("S1"));
        st.attempts = 3;
        st.last_error = Some("451 4.3.0 later".into());
        store.write_state("S1", &st).unwrap();
        std::fs::write(store.state_path("S2"), b"{not json").unwrap();
        std::fs::write(store.state_path("GONE"), b"{}").unwrap();
        let r = store.recover().unwrap();
        let s1 = r.messages.iter().find(|m| m.meta.id == "S1").unwrap();
        assert_eq!(s1.state.as_ref(), Some(&st));
        let s2 = r.messages.iter().find(|m| m.meta.id == "S2").unwrap();
        assert!(
            s2.state.is_none(),
            "a damaged state means: try every recipient"
        );
        assert!(!store.state_path("GONE").exists(), "orphaned state removed");
    }

    #[test]
    fn garbage_is_never_a_message() {
        assert!(parse_segment(b"").error.is_some());
        let mut bytes = MAGIC.to_vec();
        encode_record(&meta("C1"), b"data", &mut bytes);
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        let p = parse_segment(&bytes);
        assert!(p.records.is_empty() && p.error.unwrap().contains("checksum"));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0xFF; 12]);
        assert!(parse_segment(&huge).error.is_some());
    }
}
