//! The live clients: their cancel keys, and what the admin console shows of them.
//!
//! Each client gets a BackendKeyData made by tenantpool. While a server connection is
//! attached to the client, the client's slot holds that server's own key; a CancelRequest
//! with the client's key is then forwarded to PostgreSQL with the server's key over a
//! short new connection. Unknown keys and keys of idle clients are dropped silently, as
//! PostgreSQL does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::SystemTime;

use dashmap::DashMap;

use crate::placement::PlaceId;
use crate::tenant::TenantId;

/// What a client is doing, for SHOW CLIENTS.
pub const STATE_IDLE: u8 = 0;
pub const STATE_WAITING: u8 = 1;
pub const STATE_ACTIVE: u8 = 2;

/// One client: its cancel key, the server backend it is attached to now, and who it is.
#[derive(Debug)]
pub struct ClientSlot {
    pub pid: i32,
    pub secret: i32,
    /// The attached server's `(pid << 32) | secret`, or 0 when none.
    server_key: AtomicU64,
    pub tenant: TenantId,
    pub user: Arc<str>,
    pub addr: SocketAddr,
    pub connected_at: SystemTime,
    pub state: AtomicU8,
    /// Set by the admin console's KILL: the session ends at its next idle moment.
    pub killed: AtomicBool,
    /// Named prepared statements the client holds, and those on the server connection it
    /// uses (as of its last transaction), for SHOW CLIENTS/SERVERS.
    pub prepared: AtomicU32,
    pub server_prepared: AtomicU32,
    /// The id of the server connection it holds (while `server()` is some).
    pub server_conn: AtomicU64,
    /// The place (server and database) of that connection.
    pub server_place: AtomicU32,
    /// The session's task while it waits for the client: shutdown and KILL wake it here
    /// (a per-client waker, instead of a waiter on a proxy-wide `Notify` in every idle
    /// client's future: smaller, and no shared lock per transaction).
    waker: Mutex<Option<Waker>>,
}

impl ClientSlot {
    /// Records the server backend now running this client's queries.
    #[inline]
    pub fn attach(&self, pid: i32, secret: i32) {
        let v = ((pid as u32 as u64) << 32) | (secret as u32 as u64);
        self.server_key.store(v, Ordering::Release);
    }

    #[inline]
    pub fn detach(&self) {
        self.server_key.store(0, Ordering::Release);
    }

    /// Records the task to wake for shutdown or KILL. Set it before reading the flags that
    /// say whether to stop: whoever sets a flag wakes afterwards (see [`ClientSlot::wake`]),
    /// and the lock orders the two.
    pub fn set_waker(&self, waker: &Waker) {
        let mut w = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match &*w {
            Some(old) if old.will_wake(waker) => {}
            _ => *w = Some(waker.clone()),
        }
    }

    /// Wakes the session's task (it then reads the stop flags). A task not waiting on the
    /// client is woken for nothing, which is harmless.
    pub fn wake(&self) {
        let w = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Completes once `flag` is set, woken through this client's waker: whoever sets the
    /// flag wakes the client afterwards ([`ClientSlot::wake`], [`ClientRegistry::wake_all`]).
    /// Registering costs an uncontended lock of this client's own, where a waiter on a
    /// proxy-wide `Notify` took its shared lock twice.
    pub fn until<'a>(&'a self, flag: &'a AtomicBool) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            self.set_waker(cx.waker());
            if flag.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// The attached server backend's pid and secret, if any.
    pub fn server(&self) -> Option<(i32, i32)> {
        let v = self.server_key.load(Ordering::Acquire);
        (v != 0).then_some(((v >> 32) as u32 as i32, v as u32 as i32))
    }
}

/// All live clients, by cancel key.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    slots: DashMap<i32, Arc<ClientSlot>>,
    /// This instance's `peer_id`, part of every key it hands out (see [`crate::peers`]).
    peer_id: u16,
}

impl ClientRegistry {
    /// A registry whose keys carry `peer_id` (0: none).
    pub fn with_peer_id(peer_id: u16) -> ClientRegistry {
        ClientRegistry {
            slots: DashMap::new(),
            peer_id,
        }
    }

    /// Registers a new client under a fresh random key.
    pub fn register(&self, tenant: TenantId, user: Arc<str>, addr: SocketAddr) -> Arc<ClientSlot> {
        loop {
            let pid = crate::peers::new_pid(self.peer_id);
            let secret = rand::random::<i32>();
            if let dashmap::Entry::Vacant(v) = self.slots.entry(pid) {
                let slot = Arc::new(ClientSlot {
                    pid,
                    secret,
                    server_key: AtomicU64::new(0),
                    tenant,
                    user,
                    addr,
                    connected_at: SystemTime::now(),
                    state: AtomicU8::new(STATE_IDLE),
                    killed: AtomicBool::new(false),
                    prepared: AtomicU32::new(0),
                    server_prepared: AtomicU32::new(0),
                    server_conn: AtomicU64::new(0),
                    server_place: AtomicU32::new(0),
                    waker: Mutex::new(None),
                });
                v.insert(slot.clone());
                return slot;
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.slots.remove(&pid);
    }

    /// The server key to cancel for a client key, if the key is valid and a query runs,
    /// and the place of that server connection.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(i32, i32, PlaceId)> {
        let slot = self.slots.get(&pid)?;
        if slot.secret != secret {
            return None;
        }
        let place = slot.server_place.load(Ordering::Relaxed);
        slot.server().map(|(p, s)| (p, s, place))
    }

    /// Wakes every client's session (shutdown: idle ones then see `stopping`).
    pub fn wake_all(&self) {
        for e in self.slots.iter() {
            e.value().wake();
        }
    }

    /// Every live client (for the admin console).
    pub fn all(&self) -> Vec<Arc<ClientSlot>> {
        self.slots.iter().map(|e| e.value().clone()).collect()
    }
}
