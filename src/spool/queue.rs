//! The queue's one owner task, fed by typed events (`Event`): messages the committer made
//! durable, outcomes of delivery attempts (its own worker tasks, at most `workers` at a
//! time), and control requests (list, show, flush, delete, stats). Nothing else touches
//! the in-memory queue.
//!
//! Scheduling: messages are grouped in *lanes*, one per upstream (account) their sender
//! routes to (`Transport::route_key`); in its lane each message waits for its due time in
//! a `BTreeMap`, and the earliest due message of any lane that may send goes next. A
//! message deferred by the upstream's own reply backs off on its own (`min_retry`
//! doubling to `max_retry`, with jitter). A failure of the upstream itself (unreachable,
//! no token, login refused) or Gmail's daily quota closes that lane's *gate*: none of its
//! messages is sent, except one probe when the gate's backoff (doubling up to
//! `probe_max`; `quota_retry` for the quota) has run out; the first probe that reaches
//! the upstream opens the gate and the lane's held messages flow again, `workers` at a
//! time. Other lanes deliver meanwhile. Messages older than `max_queue_lifetime` are
//! bounced.
//!
//! Disk: the queue counts each segment's live and not-yet-tried messages; a segment down
//! to a quarter of its messages, all of them already tried (deferred), is compacted so a
//! few long-deferred messages do not pin whole batches on disk.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot},
    task::{JoinHandle, JoinSet},
    time::{sleep_until, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    attempt::{Ctx, Done, Job, Outcome, Trouble},
    commit::Committer,
    control::{Request, Response},
    store::{Location, MessageMeta, MessageState, RecipientState, Recovered, Store},
    RouteKey, SpoolSettings, Transport,
};

/// First probe delay after the upstream was found down; doubles up to `probe_max`.
const PROBE_MIN: Duration = Duration::from_secs(1);
/// Messages whose bytes stay in memory for their first attempt, in total.
const MAX_CACHED_BYTES: usize = 64 << 20;
/// How long attempts in flight may finish at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Wall-clock time derived from tokio's clock, so a paused clock moves it too.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            base_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            base: Instant::now(),
        }
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }

    /// The instant of a Unix time in milliseconds.
    fn instant(&self, ms: u64) -> Instant {
        let now_ms = self.now_ms();
        let now = Instant::now();
        if ms >= now_ms {
            // A far-future time (a damaged state file) must not overflow the clock.
            let ahead = Duration::from_millis((ms - now_ms).min(100 * 365 * 86_400_000));
            now.checked_add(ahead).unwrap_or(now)
        } else {
            now.checked_sub(Duration::from_millis(now_ms - ms))
                .unwrap_or(now)
        }
    }
}

/// A message the committer made durable.
pub struct NewMessage {
    pub meta: MessageMeta,
    pub loc: Location,
    pub data: Option<Bytes>,
}

/// Everything the owner task reacts to.
pub enum Event {
    Enqueued(Vec<NewMessage>),
    Control(Request, oneshot::Sender<Response>),
    /// Compaction wrote copies of `from`'s live messages (`moved`: ID and new place).
    Relocated {
        from: String,
        moved: Vec<(String, Location)>,
    },
}

/// One line of `queue list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueItem {
    pub id: String,
    /// Unix seconds.
    pub arrival: u64,
    pub age_secs: u64,
    pub size: u64,
    pub sender: String,
    /// Recipients still to be delivered.
    pub recipients: Vec<String>,
    pub attempts: u32,
    /// Unix seconds; `None` while an attempt is running.
    pub next_attempt: Option<u64>,
    pub last_error: Option<String>,
    /// `active` (being tried), `deferred`, or `held` (its account's upstream down or quota).
    pub status: String,
}

/// `queue show`: the item, every recipient's state and the message's header section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShowItem {
    pub item: QueueItem,
    pub recipients: Vec<RecipientState>,
    pub headers: String,
}

/// Counters (`queue stats`, shutdown log line, benchmark).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpoolStats {
    pub queued: usize,
    pub in_flight: usize,
    pub committed: u64,
    pub batches: u64,
    pub fsyncs: u64,
    pub fsyncs_per_message: f64,
    pub finished: u64,
    pub deferrals: u64,
    /// `up`, or why the upstream is held (with several accounts: which ones, and why).
    pub upstream: String,
}

struct Entry {
    meta: Arc<MessageMeta>,
    /// Its lane: the upstream its sender routes to (`None`: none any more).
    route: Option<RouteKey>,
    loc: Location,
    state: MessageState,
    data: Option<Bytes>,
    /// Its key in its lane's schedule, when waiting.
    key: Option<(Instant, u64)>,
    in_flight: bool,
    delete_requested: bool,
    /// Not attempted yet (counted in its segment's `fresh`).
    fresh: bool,
}

/// What the queue knows of one segment file.
#[derive(Debug, Default)]
struct Segment {
    /// Its messages still queued.
    live: usize,
    /// Its messages when the queue first saw it.
    total: usize,
    /// Its messages not attempted yet: while there are any, the file is about to empty
    /// by itself and is not worth compacting.
    fresh: usize,
    /// A compaction of it is under way.
    compacting: bool,
}

/// A segment down to this fraction of its messages (1/4)…
const COMPACT_BELOW: usize = 4;
/// …and holding at least this many at first is rewritten, so a few long-deferred
/// messages do not pin a whole batch on disk.
const COMPACT_MIN_TOTAL: usize = 8;

#[derive(Default)]
enum Gate {
    #[default]
    Open,
    Closed {
        until: Instant,
        backoff: Duration,
        why: Trouble,
        probe: Option<String>,
    },
}

/// The messages of one upstream, and whether that upstream is held.
#[derive(Default)]
struct Lane {
    /// Waiting messages by due time (the sequence number is global: FIFO across lanes).
    schedule: BTreeMap<(Instant, u64), String>,
    gate: Gate,
}

/// A lane's name in logs and stats.
fn lane_name(route: &Option<RouteKey>) -> &str {
    match route {
        Some(k) => k,
        None => "(no account)",
    }
}

struct Queue<T> {
    ctx: Arc<Ctx<T>>,
    entries: HashMap<String, Entry>,
    /// One per upstream seen so far; few (the accounts, and `None` for messages whose
    /// sender no account takes).
    lanes: HashMap<Option<RouteKey>, Lane>,
    seq: u64,
    /// Live messages per segment.
    segments: HashMap<String, Segment>,
    /// For compaction tasks to report back.
    events: mpsc::UnboundedSender<Event>,
    workers: JoinSet<Done>,
    running: HashMap<tokio::task::Id, String>,
    /// File work started by the queue (done marks, removals, compaction): waited for at
    /// stop, so a `queue delete` answered before shutdown is on disk after it.
    io: tokio_util::task::TaskTracker,
    cached_bytes: usize,
    finished: u64,
    deferrals: u64,
}

/// Starts the owner task with the recovered messages, all due now.
#[allow(clippy::too_many_arguments)]
pub fn start<T: Transport>(
    settings: SpoolSettings,
    store: Arc<Store>,
    transport: T,
    committer: Committer,
    events: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    recovered: Vec<Recovered>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let ctx = Arc::new(Ctx {
        settings,
        store,
        transport,
        committer,
        clock: Clock::new(),
    });
    let mut q = Queue {
        ctx,
        entries: HashMap::new(),
        lanes: HashMap::new(),
        seq: 0,
        segments: HashMap::new(),
        events,
        workers: JoinSet::new(),
        running: HashMap::new(),
        io: tokio_util::task::TaskTracker::new(),
        cached_bytes: 0,
        finished: 0,
        deferrals: 0,
    };
    for r in recovered {
        let mut state = r.state.unwrap_or_else(|| MessageState::new(&r.meta));
        state.next_attempt_ms = 0;
        q.add(r.meta, r.loc, state, None);
    }
    tokio::spawn(q.run(rx, stop))
}

impl<T: Transport> Queue<T> {
    fn add(&mut self, meta: MessageMeta, loc: Location, state: MessageState, data: Option<Bytes>) {
        if self.entries.contains_key(&meta.id) {
            warn!(id = %meta.id, "spool: queue ID seen twice; keeping the first");
            return;
        }
        let fresh = state.attempts == 0;
        let seg = self.segments.entry(loc.segment.clone()).or_default();
        seg.live += 1;
        seg.total += 1;
        seg.fresh += usize::from(fresh);
        let data = data.filter(|d| {
            let keep = self.cached_bytes + d.len() <= MAX_CACHED_BYTES;
            if keep {
                self.cached_bytes += d.len();
            }
            keep
        });
        let id = meta.id.clone();
        let due = self.ctx.clock.instant(state.next_attempt_ms);
        let route = self.ctx.transport.route_key(&meta.sender);
        if route.is_none() {
            warn!(%id, sender = %meta.sender, "spool: no [[account]] takes mail from this queued message's sender any more; it stays queued, retried with backoff, and bounces after max_queue_lifetime_secs unless an account for it is configured and the relay restarted");
        }
        self.entries.insert(
            id.clone(),
            Entry {
                meta: Arc::new(meta),
                route,
                loc,
                state,
                data,
                key: None,
                in_flight: false,
                delete_requested: false,
                fresh,
            },
        );
        self.schedule_at(&id, due);
    }

    fn schedule_at(&mut self, id: &str, due: Instant) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        let lane = self.lanes.entry(e.route.clone()).or_default();
        if let Some(k) = e.key.take() {
            lane.schedule.remove(&k);
        }
        self.seq += 1;
        let key = (due, self.seq);
        e.key = Some(key);
        lane.schedule.insert(key, id.to_owned());
    }

    /// Takes a message out of its lane's schedule (it is being tried or removed).
    fn unschedule(&mut self, id: &str) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        if let (Some(k), Some(lane)) = (e.key.take(), self.lanes.get_mut(&e.route)) {
            lane.schedule.remove(&k);
        }
    }

    fn expiry_ms(&self, meta: &MessageMeta) -> u64 {
        meta.arrival_ms
            .saturating_add(self.ctx.settings.max_queue_lifetime.as_millis() as u64)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>, stop: CancellationToken) {
        let sweep_every = (self.ctx.settings.max_queue_lifetime / 8)
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch();
            let wake = self.next_wake();
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = rx.recv() => match ev {
                    Some(Event::Enqueued(news)) => {
                        for n in news {
                            let state = MessageState::new(&n.meta);
                            self.add(n.meta, n.loc, state, n.data);
                        }
                    }
                    Some(Event::Control(req, reply)) => self.control(req, reply),
                    Some(Event::Relocated { from, moved }) => self.relocated(from, moved),
                    None => break,
                },
                Some(joined) = self.workers.join_next_with_id(), if !self.workers.is_empty() => {
                    match joined {
                        Ok((tid, done)) => {
                            self.running.remove(&tid);
                            self.finish(done);
                        }
                        Err(e) => {
                            // A worker panicked: put its message back.
                            if let Some(id) = self.running.remove(&e.id()) {
                                error!(%id, error = %e, "spool: delivery attempt crashed; message stays queued");
                                if let Some(en) = self.entries.get_mut(&id) {
                                    en.in_flight = false;
                                }
                                let due = Instant::now() + self.ctx.settings.max_retry;
                                self.schedule_at(&id, due);
                            }
                        }
                    }
                }
                _ = async { sleep_until(wake.unwrap_or_else(Instant::now)).await }, if wake.is_some() => {}
                _ = sweep.tick() => self.sweep_expired(),
            }
        }
        // Stop: let attempts in flight finish briefly; the rest stay queued on disk.
        let grace = tokio::time::timeout(STOP_GRACE, async {
            while let Some(j) = self.workers.join_next().await {
                if let Ok(done) = j {
                    self.finish(done);
                }
            }
        })
        .await;
        if grace.is_err() {
            warn!(in_flight = self.workers.len(), "spool: stopping with attempts still in flight; they will be retried at the next start");
            self.workers.abort_all();
        }
        self.io.close();
        self.io.wait().await;
    }

    /// The next time something is due, if anything can be dispatched then.
    fn next_wake(&self) -> Option<Instant> {
        if self.workers.len() >= self.ctx.settings.workers {
            return None;
        }
        self.lanes
            .values()
            .filter_map(|lane| {
                let first = lane.schedule.keys().next().map(|k| k.0)?;
                match &lane.gate {
                    Gate::Open => Some(first),
                    Gate::Closed { probe: Some(_), .. } => None,
                    Gate::Closed { until, .. } => Some(first.max(*until)),
                }
            })
            .min()
    }

    /// The first message of `lane` if it may be sent now: `(schedule key, ID, expired,
    /// probe)`. Past its lifetime it goes whatever the gate (to be bounced); behind a
    /// closed gate, only as the probe once the gate's backoff has run out.
    fn ready<'a>(
        &self,
        lane: &'a Lane,
        now: Instant,
        now_ms: u64,
    ) -> Option<((Instant, u64), &'a String, bool, bool)> {
        let (&key, id) = lane.schedule.iter().next()?;
        if key.0 > now {
            return None;
        }
        let expired = self
            .entries
            .get(id)
            .is_some_and(|e| now_ms >= self.expiry_ms(&e.meta));
        if expired {
            return Some((key, id, true, false));
        }
        match &lane.gate {
            Gate::Open => Some((key, id, false, false)),
            Gate::Closed { probe: Some(_), .. } => None,
            Gate::Closed { until, .. } => (now >= *until).then_some((key, id, false, true)),
        }
    }

    /// Starts attempts for due messages, earliest first across the lanes, within the
    /// worker bound and each lane's gate.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let now_ms = self.ctx.clock.now_ms();
        while self.workers.len() < self.ctx.settings.workers {
            let Some((route, id, expired, probe)) = self
                .lanes
                .iter()
                .filter_map(|(route, lane)| {
                    self.ready(lane, now, now_ms)
                        .map(|(key, id, expired, probe)| (route, key, id, expired, probe))
                })
                .min_by_key(|r| r.1)
                .map(|(route, _, id, expired, probe)| (route.clone(), id.clone(), expired, probe))
            else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&route) else {
                break;
            };
            if probe {
                if let Gate::Closed { probe, .. } = &mut lane.gate {
                    *probe = Some(id.clone());
                }
            }
            self.spawn(&id, expired);
        }
    }

    fn spawn(&mut self, id: &str, expire: bool) {
        self.unschedule(id);
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        e.in_flight = true;
        let data = e.data.take();
        if let Some(d) = &data {
            self.cached_bytes = self.cached_bytes.saturating_sub(d.len());
        }
        let job = Job {
            meta: e.meta.clone(),
            loc: e.loc.clone(),
            state: e.state.clone(),
            data,
            expire,
        };
        let h = self.workers.spawn(self.ctx.clone().run(job));
        self.running.insert(h.id(), id.to_owned());
    }

    /// Bounces messages past their lifetime that are waiting (e.g. behind a closed gate).
    fn sweep_expired(&mut self) {
        let now_ms = self.ctx.clock.now_ms();
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.in_flight && now_ms >= self.expiry_ms(&e.meta))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            // Expiring an attempt also runs as a worker; beyond the bound it waits.
            if self.workers.len() >= self.ctx.settings.workers {
                break;
            }
            self.spawn(&id, true);
        }
    }

    fn finish(&mut self, done: Done) {
        let Done {
            id,
            outcome,
            upstream_ok,
        } = done;
        let Some(route) = self.entries.get(&id).map(|e| e.route.clone()) else {
            return;
        };
        // The health of the message's upstream, from this attempt.
        let lane = self.lanes.entry(route.clone()).or_default();
        let was_probe = matches!(&lane.gate, Gate::Closed { probe: Some(p), .. } if *p == id);
        match (&outcome, upstream_ok) {
            (
                Outcome::Deferred {
                    trouble: Some(t), ..
                },
                _,
            ) => self.close_gate(&route, t.clone(), was_probe),
            (_, true) => {
                if !matches!(lane.gate, Gate::Open) {
                    info!(account = %lane_name(&route), "spool: upstream reachable again; releasing its held messages");
                }
                lane.gate = Gate::Open;
            }
            _ => {
                if was_probe {
                    if let Gate::Closed { probe, .. } = &mut lane.gate {
                        *probe = None;
                    }
                }
            }
        }
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.in_flight = false;
        if std::mem::take(&mut entry.fresh) {
            if let Some(s) = self.segments.get_mut(&entry.loc.segment) {
                s.fresh = s.fresh.saturating_sub(1);
            }
        }
        match outcome {
            Outcome::Finished => {
                self.finished += 1;
                self.remove(&id, false);
            }
            Outcome::Deferred {
                state, retry_in, ..
            } => {
                self.deferrals += 1;
                entry.state = state;
                if entry.delete_requested {
                    self.remove(&id, true);
                    return;
                }
                let due = Instant::now() + retry_in.unwrap_or(Duration::ZERO);
                let seg = entry.loc.segment.clone();
                self.schedule_at(&id, due);
                // A message that will wait should not pin a mostly finished file.
                self.maybe_compact(&seg);
            }
        }
    }

    /// Holds the lane of `route` after its upstream failed (or backs off its probe).
    fn close_gate(&mut self, route: &Option<RouteKey>, why: Trouble, was_probe: bool) {
        let quota = matches!(why, Trouble::Quota(_));
        let s = &self.ctx.settings;
        let now = Instant::now();
        let account = lane_name(route);
        let lane = self.lanes.entry(route.clone()).or_default();
        match &mut lane.gate {
            Gate::Open => {
                let backoff = if quota { s.quota_retry } else { PROBE_MIN };
                warn!(%account, reason = ?why, probe_in = ?backoff, "spool: upstream unavailable; holding its messages and probing");
                lane.gate = Gate::Closed {
                    until: now + backoff,
                    backoff,
                    why,
                    probe: None,
                };
            }
            Gate::Closed {
                until,
                backoff,
                why: w,
                probe,
            } => {
                if was_probe {
                    *backoff = if quota {
                        s.quota_retry
                    } else {
                        (*backoff * 2).min(s.probe_max)
                    };
                    *until = now + *backoff;
                    *probe = None;
                    *w = why;
                    info!(%account, reason = ?w, next_probe = ?*backoff, "spool: upstream probe failed");
                }
            }
        }
    }

    /// Drops a message from the queue; `mark` records it as done on disk (a delete; a
    /// finished attempt has done so already). Removes its segment when it was the last.
    fn remove(&mut self, id: &str, mark: bool) {
        self.unschedule(id);
        let Some(e) = self.entries.remove(id) else {
            return;
        };
        if let Some(d) = &e.data {
            self.cached_bytes = self.cached_bytes.saturating_sub(d.len());
        }
        let seg = e.loc.segment.clone();
        let last = match self.segments.get_mut(&seg) {
            Some(s) if s.live > 1 => {
                s.live -= 1;
                if e.fresh {
                    s.fresh = s.fresh.saturating_sub(1);
                }
                false
            }
            _ => {
                self.segments.remove(&seg);
                true
            }
        };
        if mark || last {
            let store = self.ctx.store.clone();
            let id = id.to_owned();
            let seg = seg.clone();
            // Ordered on one blocking thread: mark, then remove the segment.
            self.io.spawn_blocking(move || {
                if mark {
                    if let Err(e) = store.mark_done(&seg, &id) {
                        warn!(%id, error = %e, "spool: cannot record a deleted message as done");
                    }
                }
                if last {
                    store.remove_segment(&seg);
                }
            });
        }
        if !last {
            self.maybe_compact(&seg);
        }
    }

    /// Compacts `seg` if it is down to a small part of its messages.
    fn maybe_compact(&mut self, seg: &str) {
        let sparse = self.segments.get(seg).is_some_and(|s| {
            !s.compacting
                && s.fresh == 0
                && s.total >= COMPACT_MIN_TOTAL
                && s.live * COMPACT_BELOW <= s.total
        });
        if sparse {
            self.compact(seg);
        }
    }

    /// Copies the live messages of a mostly finished segment into a new one (through
    /// the committer: durable before anything refers to it), then `relocated` adopts
    /// the copies and the old file goes. Messages in flight stay where they are.
    fn compact(&mut self, seg: &str) {
        let movable: Vec<(Arc<MessageMeta>, Location)> = self
            .entries
            .values()
            .filter(|e| e.loc.segment == seg && !e.in_flight)
            .map(|e| (e.meta.clone(), e.loc.clone()))
            .collect();
        if movable.is_empty() {
            return;
        }
        if let Some(s) = self.segments.get_mut(seg) {
            s.compacting = true;
        }
        let (store, events) = (self.ctx.store.clone(), self.events.clone());
        let from = seg.to_owned();
        // Its own segment file, not the committer's: the copies never share a file with
        // new mail, so nothing else can finish (and delete) it before they are adopted.
        self.io.spawn_blocking(move || {
            let written = movable
                .iter()
                .map(|(m, loc)| Ok(((**m).clone(), store.read_data(loc)?)))
                .collect::<Result<Vec<_>, super::SpoolError>>()
                .and_then(|copies| {
                    let batch: Vec<(MessageMeta, &[u8])> =
                        copies.iter().map(|(m, d)| (m.clone(), &d[..])).collect();
                    store.write_segment(&batch)
                });
            let moved = match written {
                Ok((_, locs)) => movable
                    .iter()
                    .map(|(m, _)| m.id.clone())
                    .zip(locs)
                    .collect(),
                Err(e) => {
                    warn!(segment = %from, error = %e, "spool: compaction failed; the file stays as it is");
                    Vec::new()
                }
            };
            let _ = events.send(Event::Relocated { from, moved });
        });
    }

    /// Adopts compaction's copies of messages still waiting in `from`; copies of
    /// messages that finished or started an attempt meanwhile are marked done instead.
    fn relocated(&mut self, from: String, moved: Vec<(String, Location)>) {
        let mut adopted = Vec::new();
        let mut orphans = Vec::new();
        for (id, loc) in moved {
            match self.entries.get_mut(&id) {
                Some(e) if e.loc.segment == from && !e.in_flight => {
                    e.loc = loc.clone();
                    let s = self.segments.entry(loc.segment.clone()).or_default();
                    s.live += 1;
                    s.total += 1;
                    adopted.push(id);
                }
                _ => orphans.push((id, loc.segment)),
            }
        }
        let old_gone = match self.segments.get_mut(&from) {
            Some(s) => {
                s.compacting = false;
                s.live = s.live.saturating_sub(adopted.len());
                s.live == 0
            }
            None => true,
        };
        if old_gone {
            self.segments.remove(&from);
        }
        // Copies nobody adopted: done in their new segment (gone if nothing was adopted).
        let empty_new: Vec<String> = orphans
            .iter()
            .map(|(_, seg)| seg.clone())
            .filter(|seg| !self.segments.contains_key(seg))
            .collect();
        if !adopted.is_empty() {
            info!(segment = %from, moved = adopted.len(), "spool: compacted a mostly finished queue file");
        }
        let store = self.ctx.store.clone();
        self.io.spawn_blocking(move || {
            for id in &adopted {
                if let Err(e) = store.mark_done(&from, id) {
                    warn!(%id, error = %e, "spool: cannot record a moved message as done in its old file");
                }
            }
            if old_gone {
                store.remove_segment(&from);
            }
            for (id, seg) in &orphans {
                let _ = store.mark_done(seg, id);
            }
            for seg in empty_new {
                store.remove_segment(&seg);
            }
        });
    }

    fn item(&self, e: &Entry) -> QueueItem {
        let now_ms = self.ctx.clock.now_ms();
        let gate = self.lanes.get(&e.route).map(|l| &l.gate);
        // Behind a closed gate, nothing goes before the next probe.
        let (held, not_before) = match gate {
            Some(Gate::Closed { until, .. }) => (true, *until),
            _ => (false, Instant::now()),
        };
        let next_attempt = (!e.in_flight).then(|| {
            let due = e
                .key
                .map(|k| k.0)
                .unwrap_or_else(Instant::now)
                .max(not_before)
                .saturating_duration_since(Instant::now());
            (now_ms + due.as_millis() as u64) / 1000
        });
        let status = if e.in_flight {
            "active"
        } else if held && e.state.attempts > 0 {
            "held"
        } else {
            "deferred"
        };
        QueueItem::of(&e.meta, &e.loc, &e.state, now_ms, next_attempt, status)
    }

    fn stats(&self) -> SpoolStats {
        let c = &self.ctx.store.counters;
        let committed = c.committed.load(Ordering::Relaxed);
        let fsyncs = c.fsyncs.load(Ordering::Relaxed);
        SpoolStats {
            queued: self.entries.len(),
            in_flight: self.workers.len(),
            committed,
            batches: c.batches.load(Ordering::Relaxed),
            fsyncs,
            fsyncs_per_message: fsyncs as f64 / committed.max(1) as f64,
            finished: self.finished,
            deferrals: self.deferrals,
            upstream: self.upstream_status(),
        }
    }

    /// `up`, or why the upstream is held; with several, which ones are held and why.
    fn upstream_status(&self) -> String {
        let mut held: Vec<(&str, &Trouble)> = self
            .lanes
            .iter()
            .filter_map(|(route, lane)| match &lane.gate {
                Gate::Closed { why, .. } => Some((lane_name(route), why)),
                Gate::Open => None,
            })
            .collect();
        held.sort_by_key(|h| h.0);
        match held.as_slice() {
            [] => "up".into(),
            [(_, why)] if self.lanes.len() == 1 => format!("held: {why:?}"),
            _ => format!(
                "held: {}",
                held.iter()
                    .map(|(account, why)| format!("{account}: {why:?}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    fn control(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let resp = match req {
            Request::List => {
                let mut items: Vec<QueueItem> =
                    self.entries.values().map(|e| self.item(e)).collect();
                items.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id)));
                Response::Items { items }
            }
            Request::Stats => Response::Stats(self.stats()),
            Request::Flush => {
                let now = Instant::now();
                let ids: Vec<String> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.in_flight)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &ids {
                    self.schedule_at(id, now);
                }
                for lane in self.lanes.values_mut() {
                    lane.gate = Gate::Open;
                }
                info!(
                    messages = ids.len(),
                    "spool: flush requested; trying every message now"
                );
                Response::Flushed { count: ids.len() }
            }
            Request::Delete { ids } => {
                let (mut deleted, mut missing) = (Vec::new(), Vec::new());
                for id in ids {
                    match self.entries.get_mut(&id) {
                        Some(e) if e.in_flight => {
                            e.delete_requested = true;
                            deleted.push(id);
                        }
                        Some(_) => {
                            self.remove(&id, true);
                            deleted.push(id);
                        }
                        None => missing.push(id),
                    }
                }
                if !deleted.is_empty() {
                    info!(ids = ?deleted, "spool: messages deleted from the queue");
                }
                Response::Deleted { deleted, missing }
            }
            Request::Show { id } => {
                let Some(e) = self.entries.get(&id) else {
                    let _ = reply.send(Response::Error {
                        message: format!("no message {id} in the queue"),
                    });
                    return;
                };
                let item = self.item(e);
                let recipients = e.state.recipients.clone();
                let loc = e.loc.clone();
                let store = self.ctx.store.clone();
                self.io.spawn_blocking(move || {
                    let headers = store
                        .read_data(&loc)
                        .map(|d| {
                            String::from_utf8_lossy(crate::dsn::header_section(&d)).into_owned()
                        })
                        .unwrap_or_else(|e| format!("(cannot read the message: {e})"));
                    let _ = reply.send(Response::Show(Box::new(ShowItem {
                        item,
                        recipients,
                        headers,
                    })));
                });
                return;
            }
        };
        let _ = reply.send(resp);
    }
}

/// `queue list` from the files, for when no daemon runs.
pub fn offline_items(store: &Store) -> Result<Vec<QueueItem>, super::SpoolError> {
    let now_ms = Clock::new().now_ms();
    let mut items: Vec<QueueItem> = store
        .scan_readonly()?
        .into_iter()
        .map(|r| offline_item(&r, now_ms))
        .collect();
    items.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id)));
    Ok(items)
}

pub fn offline_item(r: &Recovered, now_ms: u64) -> QueueItem {
    let fresh;
    let state = match &r.state {
        Some(s) => s,
        None => {
            fresh = MessageState::new(&r.meta);
            &fresh
        }
    };
    QueueItem::of(&r.meta, &r.loc, state, now_ms, None, "stopped")
}

impl QueueItem {
    fn of(
        meta: &MessageMeta,
        loc: &Location,
        state: &MessageState,
        now_ms: u64,
        next_attempt: Option<u64>,
        status: &str,
    ) -> QueueItem {
        QueueItem {
            id: meta.id.clone(),
            arrival: meta.arrival_ms / 1000,
            age_secs: now_ms.saturating_sub(meta.arrival_ms) / 1000,
            size: loc.len,
            sender: meta.sender.clone(),
            recipients: state.pending().map(|r| r.address.clone()).collect(),
            attempts: state.attempts,
            next_attempt,
            last_error: state.last_error.clone(),
            status: status.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        envelope::{Envelope, Message},
        reply::Reply,
        spool::{commit, store::DiskWriter},
        upstream::{RecipientOutcome, SendReport, UpstreamError},
    };

    /// A queue on a temporary spool, driven by `transport`.
    struct Rig {
        dir: tempfile::TempDir,
        committer: Committer,
        owner: JoinHandle<()>,
        stop: CancellationToken,
    }

    impl Rig {
        fn start<T: Transport>(
            transport: T,
            lifetime: Duration,
            workers: usize,
            probe_max: Duration,
        ) -> Rig {
            Rig::start_seeded(transport, lifetime, workers, probe_max, &[])
        }

        /// With one segment already on disk: a message `SEEDnnn` to each of `seed`.
        fn start_seeded<T: Transport>(
            transport: T,
            lifetime: Duration,
            workers: usize,
            probe_max: Duration,
            seed: &[&str],
        ) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::new(dir.path().to_owned(), Box::new(DiskWriter)));
            store.create_dirs().unwrap();
            let mut recovered = Vec::new();
            if !seed.is_empty() {
                let metas: Vec<MessageMeta> = seed
                    .iter()
                    .enumerate()
                    .map(|(i, to)| MessageMeta {
                        id: format!("SEED{i:03}"),
                        sender: "app@example.com".into(),
                        recipients: vec![(*to).to_owned()],
                        eight_bit: false,
                        smtputf8: false,
                        arrival_ms: Clock::new().now_ms(),
                    })
                    .collect();
                let batch: Vec<(MessageMeta, &[u8])> = metas
                    .iter()
                    .map(|m| (m.clone(), &b"Subject: seed\r\n\r\nx\r\n"[..]))
                    .collect();
                store.write_segment(&batch).unwrap();
                recovered = store.recover().unwrap().messages;
            }
            let settings = SpoolSettings::new(
                crate::config::SpoolConfig {
                    dir: dir.path().to_owned(),
                    max_queue_lifetime: lifetime,
                    min_retry: Duration::from_secs(60),
                    max_retry: Duration::from_secs(3600),
                    workers,
                    probe_max,
                    quota_retry: Duration::from_secs(3600),
                },
                "relay.test",
                "smtp.example",
            );
            let (events, rx) = mpsc::unbounded_channel();
            let (committer, _task) = commit::start(store.clone(), events.clone());
            let stop = CancellationToken::new();
            let owner = start(
                settings,
                store,
                transport,
                committer.clone(),
                events,
                rx,
                recovered,
                stop.clone(),
            );
            Rig {
                dir,
                committer,
                owner,
                stop,
            }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.owner.await.unwrap();
        }
    }

    fn message(id: &str) -> Message {
        Message {
            id: id.into(),
            envelope: Envelope {
                sender: "app@example.com".into(),
                recipients: vec!["slow@example.org".into()],
                ..Envelope::default()
            },
            data: Bytes::from_static(b"Subject: slow\r\n\r\nbody\r\n"),
        }
    }

    type Sent = Vec<(Envelope, Vec<u8>)>;

    /// Defers every message with 451, except bounces (null sender), which it accepts.
    #[derive(Clone, Default)]
    struct Deferring {
        seen: Arc<Mutex<Sent>>,
    }

    impl Transport for Deferring {
        async fn send(&self, env: &Envelope, data: &[u8]) -> Result<SendReport, UpstreamError> {
            self.seen.lock().unwrap().push((env.clone(), data.to_vec()));
            let ok = env.sender.is_empty();
            let reply = if ok {
                Reply::new(250, [2, 1, 5], "OK")
            } else {
                Reply::new(451, [4, 3, 0], "Mail server temporarily rejected message.")
            };
            Ok(SendReport {
                recipients: env
                    .recipients
                    .iter()
                    .map(|a| RecipientOutcome {
                        address: a.clone(),
                        reply: reply.clone(),
                        accepted: ok,
                    })
                    .collect(),
                data: ok.then(|| Reply::new(250, [2, 0, 0], "OK")),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deferred_message_expires_after_its_lifetime_with_a_dsn() {
        let fake = Deferring::default();
        let rig = Rig::start(
            fake.clone(),
            Duration::from_secs(3600),
            2,
            Duration::from_secs(60),
        );
        let t0 = Instant::now();
        rig.committer.commit(message("EXPIRE1")).await.unwrap();
        let dsn = loop {
            let found = fake
                .seen
                .lock()
                .unwrap()
                .iter()
                .find(|(e, _)| e.sender.is_empty())
                .cloned();
            if let Some(d) = found {
                break d;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(3 * 3600),
                "no DSN after 3 h"
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let elapsed = t0.elapsed();
        assert!(
            elapsed >= Duration::from_secs(3600),
            "not before the lifetime: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(3600 + 120),
            "soon after it: {elapsed:?}"
        );
        let attempts = fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| !e.sender.is_empty())
            .count();
        // 1 min doubling (±25 %): about 7 tries in an hour, the last one at expiry.
        assert!((5..=9).contains(&attempts), "{attempts} attempts");
        assert_eq!(dsn.0.recipients, vec!["app@example.com".to_string()]);
        let text = String::from_utf8_lossy(&dsn.1);
        assert!(text.contains("deferred them for 1 hour(s)"), "{text}");
        assert!(
            text.contains(&format!("over\r\n{attempts} attempt(s)")),
            "{text}"
        );
        assert!(text.contains("Final-Recipient: rfc822; slow@example.org"));
        assert!(text.contains("Status: 4.3.0"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(rig.dir.path().join("failed/EXPIRE1.eml").exists());
        rig.stop().await;
    }

    /// Refuses to connect while `down`; counts sends and the most in flight at once.
    #[derive(Clone, Default)]
    struct Flaky {
        down: Arc<std::sync::atomic::AtomicBool>,
        sends: Arc<std::sync::atomic::AtomicUsize>,
        delivered: Arc<std::sync::atomic::AtomicUsize>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Transport for Flaky {
        async fn send(&self, env: &Envelope, _data: &[u8]) -> Result<SendReport, UpstreamError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.sends.fetch_add(1, SeqCst);
            let n = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(n, SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, SeqCst);
            if self.down.load(SeqCst) {
                return Err(UpstreamError::Connect {
                    addr: "smtp.example:587".into(),
                    cause: "connection refused".into(),
                });
            }
            self.delivered.fetch_add(1, SeqCst);
            Ok(SendReport {
                recipients: env
                    .recipients
                    .iter()
                    .map(|a| RecipientOutcome {
                        address: a.clone(),
                        reply: Reply::new(250, [2, 1, 5], "OK"),
                        accepted: true,
                    })
                    .collect(),
                data: Some(Reply::new(250, [2, 0, 0], "OK")),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_down_holds_the_queue_probes_then_releases_it_bounded() {
        use std::sync::atomic::Ordering::SeqCst;
        let fake = Flaky::default();
        fake.down.store(true, SeqCst);
        let rig = Rig::start(
            fake.clone(),
            Duration::from_secs(86400),
            3,
            Duration::from_secs(8),
        );
        for i in 0..40 {
            rig.committer
                .commit(message(&format!("HOLD{i:03}")))
                .await
                .unwrap();
        }
        // Down for 60 s: probes 1, 2, 4, 8, 8, 8… s apart, not 40 messages backing off.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let while_down = fake.sends.load(SeqCst);
        assert!(
            (5..=15).contains(&while_down),
            "{while_down} sends while down"
        );
        assert_eq!(fake.delivered.load(SeqCst), 0);
        fake.down.store(false, SeqCst);
        // The next probe (within probe_max) gets through and releases everything.
        let t0 = Instant::now();
        while fake.delivered.load(SeqCst) < 40 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "released after the probe"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            t0.elapsed() <= Duration::from_secs(10),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(fake.delivered.load(SeqCst), 40, "each once");
        assert!(
            fake.max_in_flight.load(SeqCst) <= 3,
            "never more than `workers` in flight"
        );
        rig.stop().await;
    }

    /// Two upstreams, routed by the sender's domain: `one.example` and `two.example`
    /// (and the null sender: bounces). A sender of another domain routes nowhere. An
    /// upstream named in `down` refuses to connect. Counts deliveries per message.
    #[derive(Clone, Default)]
    struct TwoUpstreams {
        down: Arc<Mutex<Vec<&'static str>>>,
        /// Upstreams that refuse every recipient (550 5.1.1).
        refusing: Arc<Mutex<Vec<&'static str>>>,
        /// Sends per upstream (`""`: no route).
        sends: Arc<Mutex<HashMap<&'static str, usize>>>,
        /// Queue IDs (from the Subject) delivered, once per delivery.
        delivered: Arc<Mutex<Vec<(&'static str, String)>>>,
        bounces: Arc<Mutex<Vec<String>>>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl TwoUpstreams {
        fn upstream(sender: &str) -> Option<&'static str> {
            match sender.rsplit_once('@').map(|(_, d)| d) {
                Some("one.example") => Some("one"),
                Some("two.example") => Some("two"),
                None if sender.is_empty() => Some("two"),
                _ => None,
            }
        }

        fn delivered_via(&self, upstream: &str) -> Vec<String> {
            let d = self.delivered.lock().unwrap();
            d.iter()
                .filter(|(u, _)| *u == upstream)
                .map(|(_, id)| id.clone())
                .collect()
        }

        fn sends_via(&self, upstream: &'static str) -> usize {
            self.sends
                .lock()
                .unwrap()
                .get(upstream)
                .copied()
                .unwrap_or(0)
        }
    }

    impl Transport for TwoUpstreams {
        async fn send(&self, env: &Envelope, data: &[u8]) -> Result<SendReport, UpstreamError> {
            use std::sync::atomic::Ordering::SeqCst;
            let up = Self::upstream(&env.sender);
            *self
                .sends
                .lock()
                .unwrap()
                .entry(up.unwrap_or(""))
                .or_default() += 1;
            let Some(up) = up else {
                return Err(UpstreamError::NoRoute {
                    sender: env.sender.clone(),
                });
            };
            let n = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max_in_flight.fetch_max(n, SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, SeqCst);
            if self.down.lock().unwrap().contains(&up) {
                return Err(UpstreamError::Connect {
                    addr: format!("smtp.{up}.example:587"),
                    cause: "connection refused".into(),
                });
            }
            let text = String::from_utf8_lossy(data).into_owned();
            if env.sender.is_empty() {
                self.bounces.lock().unwrap().push(text);
            } else {
                let subject = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or_default()
                    .to_owned();
                self.delivered.lock().unwrap().push((up, subject));
            }
            let refused = self.refusing.lock().unwrap().contains(&up);
            Ok(SendReport {
                recipients: env
                    .recipients
                    .iter()
                    .map(|a| RecipientOutcome {
                        address: a.clone(),
                        reply: if refused {
                            Reply::new(550, [5, 1, 1], "No such user")
                        } else {
                            Reply::new(250, [2, 1, 5], "OK")
                        },
                        accepted: !refused,
                    })
                    .collect(),
                data: (!refused).then(|| Reply::new(250, [2, 0, 0], "OK")),
            })
        }

        fn route_key(&self, sender: &str) -> Option<RouteKey> {
            Self::upstream(sender).map(RouteKey::from)
        }

        fn upstream_host(&self, sender: &str) -> Option<String> {
            Self::upstream(sender).map(|up| format!("smtp.{up}.example"))
        }
    }

    /// A message from `sender` whose Subject is its queue ID.
    fn message_via(id: &str, sender: &str) -> Message {
        let mut m = message(id);
        m.envelope.sender = sender.into();
        m.data = Bytes::from(format!("Subject: {id}\r\n\r\nbody\r\n"));
        m
    }

    #[tokio::test(start_paused = true)]
    async fn one_upstream_down_holds_only_its_own_messages() {
        use std::sync::atomic::Ordering::SeqCst;
        let fake = TwoUpstreams::default();
        fake.down.lock().unwrap().push("one");
        let rig = Rig::start(
            fake.clone(),
            Duration::from_secs(86400),
            3,
            Duration::from_secs(8),
        );
        // One's messages first: on a queue with one gate they would all be probed, one
        // by one, before two's got a turn.
        for i in 0..20 {
            rig.committer
                .commit(message_via(&format!("ONE{i:03}"), "app@one.example"))
                .await
                .unwrap();
        }
        for i in 0..20 {
            rig.committer
                .commit(message_via(&format!("TWO{i:03}"), "app@two.example"))
                .await
                .unwrap();
        }
        let t0 = Instant::now();
        while fake.delivered_via("two").len() < 20 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "two's mail flows while one is held: {} of 20 delivered",
                fake.delivered_via("two").len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One stays held for a minute: probed (1, 2, 4, 8, 8… s apart), never bounced.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let while_down = fake.sends_via("one");
        assert!(
            (5..=15).contains(&while_down),
            "{while_down} sends to one while down"
        );
        assert!(fake.delivered_via("one").is_empty());
        assert!(fake.bounces.lock().unwrap().is_empty(), "nothing bounced");
        // Two still delivers at once while one is held.
        rig.committer
            .commit(message_via("TWO-LATE", "app@two.example"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(fake.delivered_via("two").contains(&"TWO-LATE".to_owned()));
        // One comes back: its next probe (within probe_max) releases its messages.
        fake.down.lock().unwrap().clear();
        let t1 = Instant::now();
        while fake.delivered_via("one").len() < 20 {
            assert!(
                t1.elapsed() < Duration::from_secs(20),
                "one released after its probe"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            t1.elapsed() <= Duration::from_secs(10),
            "{:?}",
            t1.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        for up in ["one", "two"] {
            let mut ids = fake.delivered_via(up);
            let n = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), n, "each of {up}'s delivered once: {ids:?}");
        }
        assert_eq!(fake.delivered_via("one").len(), 20);
        assert_eq!(fake.delivered_via("two").len(), 21);
        assert!(
            fake.max_in_flight.load(SeqCst) <= 3,
            "never more than `workers` in flight"
        );
        assert!(
            segments_in(rig.dir.path()).is_empty(),
            "queue/ is empty at the end"
        );
        rig.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_bounce_names_the_upstream_of_its_own_account() {
        let fake = TwoUpstreams::default();
        fake.refusing.lock().unwrap().push("one");
        let rig = Rig::start(
            fake.clone(),
            Duration::from_secs(3600),
            2,
            Duration::from_secs(8),
        );
        rig.committer
            .commit(message_via("ONE", "app@one.example"))
            .await
            .unwrap();
        for _ in 0..100 {
            if !fake.bounces.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bounces = fake.bounces.lock().unwrap().clone();
        assert_eq!(bounces.len(), 1, "one DSN for the refused recipient");
        assert!(
            bounces[0].contains("Remote-MTA: dns; smtp.one.example"),
            "{}",
            bounces[0]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_no_upstream_takes_waits_out_its_lifetime_without_holding_others() {
        let fake = TwoUpstreams::default();
        let rig = Rig::start(
            fake.clone(),
            Duration::from_secs(3600),
            2,
            Duration::from_secs(8),
        );
        rig.committer
            .commit(message_via("LOST", "app@gone.example"))
            .await
            .unwrap();
        for i in 0..5 {
            rig.committer
                .commit(message_via(&format!("TWO{i:03}"), "app@two.example"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fake.delivered_via("two").len(), 5, "others are not held");
        // Its own backoff (1 min doubling), not a probe every second; no early bounce.
        tokio::time::sleep(Duration::from_secs(30 * 60)).await;
        let tries = fake.sends_via("");
        assert!((2..=6).contains(&tries), "{tries} attempts in 30 min");
        assert!(fake.bounces.lock().unwrap().is_empty(), "not bounced early");
        // At the end of its lifetime: a DSN that says why.
        tokio::time::sleep(Duration::from_secs(31 * 60)).await;
        let bounces = fake.bounces.lock().unwrap().clone();
        assert_eq!(bounces.len(), 1, "one DSN");
        assert!(bounces[0].contains("Status: 4.7.1"), "{}", bounces[0]);
        assert!(
            bounces[0].contains("no [[account]] takes mail from sender"),
            "{}",
            bounces[0]
        );
        assert!(rig.dir.path().join("failed/LOST.eml").exists());
        rig.stop().await;
    }

    /// Accepts everything except recipients in `stuck` (451), until `stuck` is cleared.
    #[derive(Clone, Default)]
    struct Picky {
        stuck: Arc<Mutex<Vec<String>>>,
        delivered: Arc<Mutex<Vec<String>>>,
    }

    impl Transport for Picky {
        async fn send(&self, env: &Envelope, data: &[u8]) -> Result<SendReport, UpstreamError> {
            let refuse = self.stuck.lock().unwrap().contains(&env.recipients[0]);
            if !refuse {
                let text = String::from_utf8_lossy(data).into_owned();
                self.delivered
                    .lock()
                    .unwrap()
                    .push(format!("{} {text}", env.recipients[0]));
            }
            let reply = if refuse {
                Reply::new(451, [4, 2, 1], "later")
            } else {
                Reply::new(250, [2, 1, 5], "OK")
            };
            Ok(SendReport {
                recipients: vec![RecipientOutcome {
                    address: env.recipients[0].clone(),
                    reply,
                    accepted: !refuse,
                }],
                data: (!refuse).then(|| Reply::new(250, [2, 0, 0], "OK")),
            })
        }
    }

    fn segments_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.join("queue"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_mostly_finished_segment_is_compacted_and_nothing_is_lost() {
        let fake = Picky::default();
        *fake.stuck.lock().unwrap() = vec!["stuck@example.org".into()];
        let mut seed = vec!["ok@example.org"; 14];
        seed.insert(3, "stuck@example.org");
        seed.insert(9, "stuck@example.org");
        let rig = Rig::start_seeded(
            fake.clone(),
            Duration::from_secs(86400),
            2,
            Duration::from_secs(8),
            &seed,
        );
        let original = segments_in(rig.dir.path());
        assert_eq!(original.len(), 1);
        // 14 delivered, 2 deferred: the 16-message file is rewritten with the 2.
        let t0 = Instant::now();
        loop {
            let segs = segments_in(rig.dir.path());
            let ids: Vec<String> = segs
                .iter()
                .flat_map(|p| {
                    crate::spool::store::parse_segment(&std::fs::read(p).unwrap_or_default())
                        .records
                        .into_iter()
                        .map(|r| r.0.id)
                })
                .collect();
            if fake.delivered.lock().unwrap().len() == 14 && !original[0].exists() {
                // The two deferred ones (and any not yet tried when it ran) were copied
                // into smaller files; the 16-message file is gone.
                assert!(
                    ids.iter().any(|i| i == "SEED003") && ids.iter().any(|i| i == "SEED009"),
                    "{ids:?}"
                );
                assert!(ids.len() <= 4, "{ids:?}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "compacted within 30 s: {} delivered, {ids:?}",
                fake.delivered.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The moved messages are still delivered, once, with their bytes.
        fake.stuck.lock().unwrap().clear();
        while fake.delivered.lock().unwrap().len() < 16 {
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "retried within 10 min"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let delivered = fake.delivered.lock().unwrap().clone();
        assert_eq!(delivered.len(), 16);
        let stuck: Vec<_> = delivered
            .iter()
            .filter(|d| d.starts_with("stuck@"))
            .collect();
        assert_eq!(stuck.len(), 2);
        assert!(
            stuck.iter().all(|d| d.contains("Subject: seed")),
            "{stuck:?}"
        );
        assert!(
            segments_in(rig.dir.path()).is_empty(),
            "queue/ is empty at the end"
        );
        rig.stop().await;
    }
}
