//! Query cancellation: the proxy-made keys clients get, and where a cancel goes.
//!
//! Each client gets a BackendKeyData made by tenantpool. While a server connection is
//! attached to the client, the client's slot holds that server's own key; a CancelRequest
//! with the client's key is then forwarded to PostgreSQL with the server's key over a
//! short new connection. Unknown keys and keys of idle clients are dropped silently, as
//! PostgreSQL does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

/// One client's cancel key and the server backend it is attached to now.
#[derive(Debug)]
pub struct CancelSlot {
    pub pid: i32,
    pub secret: i32,
    /// The attached server's `(pid << 32) | secret`, or 0 when none.
    server_key: AtomicU64,
}

impl CancelSlot {
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

    fn server(&self) -> Option<(i32, i32)> {
        let v = self.server_key.load(Ordering::Acquire);
        (v != 0).then_some(((v >> 32) as u32 as i32, v as u32 as i32))
    }
}

/// All live client keys.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    slots: DashMap<i32, Arc<CancelSlot>>,
}

impl CancelRegistry {
    /// Makes a fresh random key for a new client.
    pub fn register(&self) -> Arc<CancelSlot> {
        loop {
            let pid = (rand::random::<u32>() >> 1) as i32;
            if pid == 0 {
                continue;
            }
            let secret = rand::random::<i32>();
            if let dashmap::Entry::Vacant(v) = self.slots.entry(pid) {
                let slot = Arc::new(CancelSlot {
                    pid,
                    secret,
                    server_key: AtomicU64::new(0),
                });
                v.insert(slot.clone());
                return slot;
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.slots.remove(&pid);
    }

    /// The server key to cancel for a client key, if the key is valid and a query runs.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<(i32, i32)> {
        let slot = self.slots.get(&pid)?;
        if slot.secret != secret {
            return None;
        }
        slot.server()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
