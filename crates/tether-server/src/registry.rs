//! Who is connected: user → devices → session, and each session's mailbox of signals.
//!
//! A session is small on purpose (DESIGN §10): no channel, no buffer. The commit path
//! and the registry talk to a connection by setting bits in [`Session::signals`],
//! storing the newest inbox head, or pushing a reply, then waking its task.

use atomic_waker::AtomicWaker;
use hashbrown::HashTable;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::task::Context;
use tether_proto::Frame;
use tether_transport::TransportKind;

/// Signal bit: the inbox head moved.
pub const SIG_HEAD: u8 = 1;
/// Signal bit: replies wait in [`Session::replies`].
pub const SIG_REPLIES: u8 = 2;
/// Signal bit: a newer login of this device replaced this session.
pub const SIG_REPLACED: u8 = 4;
/// Signal bit: the server is shutting down.
pub const SIG_SHUTDOWN: u8 = 8;
/// Signal bit: the session's liveness deadline passed (the connection re-checks it).
pub const SIG_DEADLINE: u8 = 16;
/// Signal bit: the server drains: send GOAWAY and close.
pub const SIG_GOAWAY: u8 = 32;
/// Signal bit: an operator kicked the device (admin API): KICK{OPERATOR} and close.
pub const SIG_KICKED: u8 = 64;
/// Signal bit: the device's tokens were revoked: KICK{TOKEN_REVOKED} and close.
pub const SIG_REVOKED: u8 = 128;

/// A logged-in connection as the rest of the server sees it.
#[derive(Debug)]
pub struct Session {
    /// User id.
    pub user: Arc<str>,
    /// Device id.
    pub device: Box<str>,
    /// Device epoch of this login.
    pub device_epoch: u64,
    head: AtomicU64,
    /// Liveness deadline, ms on the server's clock (0 = none yet).
    deadline_ms: AtomicU64,
    /// Queued once for replay budget (see `DeadlineWheel::wake_later`).
    replay_waiting: std::sync::atomic::AtomicBool,
    signals: AtomicU8,
    /// For the admin API and metrics, packed to fit beside `signals` (the struct stays
    /// 128 bytes): the transport (low 4 bits; 0xF = not yet admitted) and the HELLO's
    /// heartbeat mode (bits 4-5).
    link: AtomicU8,
    /// The heartbeat interval in force, in 100 ms (changes with PINGs asking another).
    interval_100ms: AtomicU16,
    /// The kernel's smoothed RTT at the last sample, in 100 µs (0 = none yet).
    rtt_100us: AtomicU16,
    waker: AtomicWaker,
    /// Answers to submitted operations, in submission order; `None` answers one that
    /// needs no frame (a receipt) but releases its in-flight slot. Boxed, and only
    /// while answers wait: an inline queue made every session 24 B larger.
    #[allow(clippy::box_collection)] // a pointer inline, not the queue's 32 B
    replies: Mutex<Option<Box<VecDeque<Option<Frame>>>>>,
}

impl Session {
    /// A session with no signals.
    pub fn new(user: Arc<str>, device: Box<str>, device_epoch: u64) -> Self {
        Self {
            user,
            device,
            device_epoch,
            head: AtomicU64::new(0),
            deadline_ms: AtomicU64::new(0),
            replay_waiting: std::sync::atomic::AtomicBool::new(false),
            signals: AtomicU8::new(0),
            link: AtomicU8::new(0x0F),
            interval_100ms: AtomicU16::new(0),
            rtt_100us: AtomicU16::new(0),
            waker: AtomicWaker::new(),
            replies: Mutex::new(None),
        }
    }

    /// Records the heartbeat mode the client announced (`pb::HeartbeatMode` as i32).
    pub fn set_mode(&self, mode: i32) {
        let bits = u8::try_from(mode).ok().filter(|m| *m <= 3).unwrap_or(0) << 4;
        let _ = self
            .link
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some((l & 0x0F) | bits)
            });
    }

    /// Records the session's transport and heartbeat interval (admin API).
    pub fn set_link(&self, transport: TransportKind, interval_ms: u32) {
        let _ = self
            .link
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some((l & 0xF0) | transport as u8)
            });
        self.set_interval(interval_ms);
    }

    /// Records a new heartbeat interval.
    pub fn set_interval(&self, interval_ms: u32) {
        let units = (interval_ms / 100).min(u32::from(u16::MAX)) as u16;
        self.interval_100ms.store(units, Ordering::Relaxed);
    }

    /// The session's transport, once admitted.
    pub fn transport(&self) -> Option<TransportKind> {
        TransportKind::ALL
            .get(usize::from(self.link.load(Ordering::Relaxed) & 0x0F))
            .copied()
    }

    /// The heartbeat mode the client announced: idle, fixed, smart or unspecified.
    pub fn mode(&self) -> &'static str {
        match self.link.load(Ordering::Relaxed) >> 4 {
            1 => "idle",
            2 => "fixed",
            3 => "smart",
            _ => "unspecified",
        }
    }

    /// The heartbeat interval in force, ms (to 100 ms).
    pub fn interval_ms(&self) -> u32 {
        u32::from(self.interval_100ms.load(Ordering::Relaxed)) * 100
    }

    /// Records an RTT sample, µs.
    pub fn set_rtt(&self, rtt_us: u32) {
        let units = (rtt_us / 100).clamp(1, u32::from(u16::MAX)) as u16;
        self.rtt_100us.store(units, Ordering::Relaxed);
    }

    /// The last RTT sample, µs (to 100 µs), if any.
    pub fn rtt_us(&self) -> Option<u32> {
        match self.rtt_100us.load(Ordering::Relaxed) {
            0 => None,
            units => Some(u32::from(units) * 100),
        }
    }

    /// Raises signal bits and wakes the connection.
    pub fn signal(&self, bits: u8) {
        self.signals.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Records a new inbox head (never moves back) and wakes the connection.
    pub fn notify_head(&self, head: u64) {
        self.head.fetch_max(head, Ordering::AcqRel);
        self.signal(SIG_HEAD);
    }

    /// Moves the liveness deadline (ms on the server's clock).
    pub fn set_deadline(&self, at_ms: u64) {
        self.deadline_ms.store(at_ms, Ordering::Relaxed);
    }

    /// The liveness deadline (ms on the server's clock; 0 = none).
    pub fn deadline(&self) -> u64 {
        self.deadline_ms.load(Ordering::Relaxed)
    }

    /// Marks the session as waiting for replay budget; false if it already was.
    pub fn mark_replay_waiting(&self) -> bool {
        !self.replay_waiting.swap(true, Ordering::AcqRel)
    }

    /// Clears the replay-waiting mark (it is being woken).
    pub fn clear_replay_waiting(&self) {
        self.replay_waiting.store(false, Ordering::Release);
    }

    /// The newest head notified.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Queues the answer to one submitted operation (a frame to send, or `None`) and
    /// wakes the connection.
    pub fn push_reply(&self, frame: Option<Frame>) {
        self.replies
            .lock()
            .get_or_insert_with(Default::default)
            .push_back(frame);
        self.signal(SIG_REPLIES);
    }

    /// Takes all queued replies, releasing the queue's memory.
    pub fn take_replies(&self) -> VecDeque<Option<Frame>> {
        self.replies
            .lock()
            .take()
            .map(|queue| *queue)
            .unwrap_or_default()
    }

    /// Takes one signal bit if it is raised (a plain load when it is not).
    pub fn take_signal(&self, bit: u8) -> bool {
        self.signals.load(Ordering::Acquire) & bit != 0
            && self.signals.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Takes the raised signals, registering the task's waker if there are none.
    pub fn poll_signals(&self, cx: &mut Context<'_>) -> u8 {
        let bits = self.signals.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return bits;
        }
        self.waker.register(cx.waker());
        self.signals.swap(0, Ordering::AcqRel)
    }
}

/// Outcome of registering a login.
#[derive(Debug)]
pub enum Registered {
    /// First login of this device.
    Fresh,
    /// An older login of the same device was replaced; it has been signalled.
    Replaced(Arc<Session>),
}

/// A login refused because a newer one of the same device is active.
#[derive(Debug)]
pub struct StaleEpoch {
    /// The active login's epoch.
    pub active: u64,
}

const SHARDS: usize = 64;

/// One shard: every session of its users, one entry (a pointer, 8 B) per connected
/// device, filed under the hash of its user, so a user's devices are the entries of
/// that hash whose user matches. A map user → list of devices took 40 B per entry
/// (the key's `Arc<str>` and an inline list) and its load factor made that ~70 B.
type Shard = Mutex<HashTable<Arc<Session>>>;

/// Sharded table of sessions, looked up by user (and device).
#[derive(Debug)]
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: Default::default(),
        }
    }
}

impl Registry {
    fn hash(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    /// The shard of a user's hash. Its middle bits: the table uses the low bits for the
    /// bucket and the top 7 for its control bytes.
    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[((hash >> 32) as usize) % SHARDS]
    }

    /// Adds a login. A newer (or equal) device epoch replaces the active login of the
    /// device; an older one is refused and never evicts the newer. A replaced session
    /// is returned, not yet told: the caller signals it once the new login is admitted,
    /// or puts it back with [`Registry::restore`] if not.
    pub fn register(&self, session: &Arc<Session>) -> Result<Registered, StaleEpoch> {
        let hash = self.hash(&session.user);
        let mut shard = self.shard(hash).lock();
        let same_device = |s: &Arc<Session>| s.user == session.user && s.device == session.device;
        if let Some(slot) = shard.find_mut(hash, same_device) {
            if slot.device_epoch > session.device_epoch {
                return Err(StaleEpoch {
                    active: slot.device_epoch,
                });
            }
            let old = std::mem::replace(slot, session.clone());
            return Ok(Registered::Replaced(old));
        }
        shard.insert_unique(hash, session.clone(), |s| self.hash(&s.user));
        Ok(Registered::Fresh)
    }

    /// Undoes a registration that was refused after all: removes `session` and, if it
    /// had replaced `previous`, puts that one back.
    pub fn restore(&self, session: &Arc<Session>, previous: Option<Arc<Session>>) {
        let hash = self.hash(&session.user);
        let mut shard = self.shard(hash).lock();
        let Ok(entry) = shard.find_entry(hash, |s| Arc::ptr_eq(s, session)) else {
            return;
        };
        match previous {
            Some(previous) => *entry.into_mut() = previous,
            None => {
                entry.remove();
            }
        }
    }

    /// Removes `session` if it is still the registered one for its device.
    pub fn unregister(&self, session: &Arc<Session>) {
        let hash = self.hash(&session.user);
        let mut shard = self.shard(hash).lock();
        if let Ok(entry) = shard.find_entry(hash, |s| Arc::ptr_eq(s, session)) {
            entry.remove();
        }
    }

    /// Calls `f` with each session of `user` (one per connected device), under the
    /// shard's lock.
    fn each_of(&self, user: &str, mut f: impl FnMut(&Arc<Session>)) {
        let hash = self.hash(user);
        let shard = self.shard(hash).lock();
        for s in shard.iter_hash(hash) {
            if &*s.user == user {
                f(s);
            }
        }
    }

    /// The sessions of `user` now, one per connected device.
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<Session>> {
        let mut sessions = Vec::new();
        self.each_of(user, |s| sessions.push(s.clone()));
        sessions
    }

    /// The devices of `user` that have a session now.
    pub fn connected_devices(&self, user: &str) -> Vec<Box<str>> {
        let mut devices = Vec::new();
        self.each_of(user, |s| devices.push(s.device.clone()));
        devices
    }

    /// Tells every session of `user` that its inbox head is now `head`.
    pub fn notify_head(&self, user: &str, head: u64) {
        self.each_of(user, |s| s.notify_head(head));
    }

    /// Signals every session (e.g. shutdown).
    pub fn signal_all(&self, bits: u8) {
        for shard in self.shards.iter() {
            for s in shard.lock().iter() {
                s.signal(bits);
            }
        }
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when nobody is logged in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, device: &str, epoch: u64) -> Arc<Session> {
        Arc::new(Session::new(user.into(), device.into(), epoch))
    }

    #[test]
    fn a_session_stays_104_bytes() {
        // Every idle session holds one (DESIGN §10); the admin API's fields are packed
        // into what alignment left over. With the `Arc`'s counts that is 120 B, in
        // mimalloc's 128 B size class (at 128 B it took a 160 B slot).
        assert!(
            std::mem::size_of::<Session>() <= 104,
            "{}",
            std::mem::size_of::<Session>()
        );
        let s = session("ann", "phone", 1);
        s.set_mode(tether_proto::pb::HeartbeatMode::Idle as i32);
        s.set_link(TransportKind::Ws, 45_000);
        s.set_rtt(1_234);
        assert_eq!(s.transport(), Some(TransportKind::Ws));
        assert_eq!(s.mode(), "idle");
        assert_eq!(s.interval_ms(), 45_000);
        assert_eq!(s.rtt_us(), Some(1_200));
        s.set_interval(1_800_000);
        assert_eq!(s.interval_ms(), 1_800_000);
        assert_eq!(s.transport(), Some(TransportKind::Ws));
        assert_eq!(s.mode(), "idle");
    }

    #[test]
    fn newer_device_epoch_replaces_and_signals_the_older() {
        let r = Registry::default();
        let old = session("alice", "phone", 1);
        let new = session("alice", "phone", 2);
        assert!(matches!(r.register(&old), Ok(Registered::Fresh)));
        assert!(matches!(r.register(&new), Ok(Registered::Replaced(_))));
        assert_eq!(
            old.signals.load(Ordering::Acquire),
            0,
            "told only once admitted"
        );
        // The replaced one leaving does not remove the newer.
        r.unregister(&old);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_refused_login_puts_the_session_it_replaced_back() {
        let r = Registry::default();
        let old = session("alice", "phone", 1);
        let new = session("alice", "phone", 2);
        r.register(&old).unwrap();
        let Ok(Registered::Replaced(previous)) = r.register(&new) else {
            panic!("expected a replacement")
        };
        r.restore(&new, Some(previous));
        r.notify_head("alice", 9);
        assert_eq!(
            (old.head(), new.head()),
            (9, 0),
            "the old session is registered again"
        );
    }

    #[test]
    fn older_device_epoch_never_evicts_a_newer() {
        let r = Registry::default();
        let new = session("alice", "phone", 5);
        r.register(&new).unwrap();
        let stale = session("alice", "phone", 4);
        assert!(matches!(r.register(&stale), Err(StaleEpoch { active: 5 })));
        assert_eq!(new.signals.load(Ordering::Acquire), 0);
    }

    #[test]
    fn devices_of_one_user_coexist_and_all_see_heads() {
        let r = Registry::default();
        let a = session("bob", "laptop", 1);
        let b = session("bob", "phone", 1);
        r.register(&a).unwrap();
        r.register(&b).unwrap();
        r.notify_head("bob", 7);
        assert_eq!((a.head(), b.head()), (7, 7));
        r.notify_head("bob", 3);
        assert_eq!(a.head(), 7, "heads never move back");
    }

    #[test]
    fn many_users_share_shards_and_each_lookup_finds_exactly_its_own_devices() {
        let r = Registry::default();
        let devices = ["phone", "laptop", "tablet"];
        let mut all = Vec::new();
        for u in 0..5_000 {
            for d in &devices[..1 + u % 3] {
                let s = session(&format!("u{u}"), d, 1);
                r.register(&s).unwrap();
                all.push(s);
            }
        }
        assert_eq!(r.len(), all.len());
        for u in [0, 1, 2, 4_999] {
            let mut got: Vec<_> = r
                .connected_devices(&format!("u{u}"))
                .into_iter()
                .map(String::from)
                .collect();
            got.sort();
            let mut want: Vec<_> = devices[..1 + u % 3].iter().map(|d| d.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "u{u}");
        }
        assert!(r.sessions_of("nobody").is_empty());
        // A head reaches only that user's sessions.
        r.notify_head("u2", 9);
        let heads: Vec<_> = all.iter().filter(|s| s.head() == 9).collect();
        assert_eq!(heads.len(), 3);
        assert!(heads.iter().all(|s| &*s.user == "u2"));
        // Unregistering one device leaves the user's others.
        let phone = all
            .iter()
            .find(|s| &*s.user == "u2" && &*s.device == "phone")
            .unwrap();
        r.unregister(phone);
        assert_eq!(r.sessions_of("u2").len(), 2);
        assert_eq!(r.len(), all.len() - 1);
        for s in &all {
            r.unregister(s);
        }
        assert!(r.is_empty());
    }
}
