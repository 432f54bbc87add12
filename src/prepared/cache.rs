//! The statement cache (statements interned per tenant under proxy names) and a client's
//! own names for them.

use super::*;

/// A fast, non-cryptographic hasher for the maps the relay looks up on every Bind (statement
/// ids the proxy makes; a client's own statement names, which can only slow that client's
/// own map).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    #[inline]
    pub(super) fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// One interned statement: a query text with parameter types, for one tenant.
pub struct Stmt {
    pub id: u64,
    /// The Parse message under the server-side name.
    pub(super) parse: Bytes,
    /// End of the name (with its NUL) in `parse`.
    pub(super) name_end: usize,
    /// The cache key: tenant id then the Parse body after the name.
    pub(super) key: Bytes,
    pub(super) cache: Arc<StatementCache>,
    /// What running it may change on the server connection (its text sniffed once).
    pub touches: Touched,
    /// The cache's schema epoch when it was interned: a statement older than the current
    /// epoch may have a stale plan on the connections that prepared it, so a client's new
    /// Parse of its text gets a new statement (prepared afresh) instead.
    pub(super) epoch: u64,
}

impl Stmt {
    /// The server-side name with its terminating NUL.
    pub fn name(&self) -> &[u8] {
        &self.parse[HEADER_LEN..self.name_end]
    }

    /// The whole Parse message under the server-side name.
    pub fn parse_message(&self) -> &[u8] {
        &self.parse
    }

    /// Bytes this statement accounts for.
    pub(super) fn cost(&self) -> usize {
        self.parse.len() + 64
    }
}

impl std::fmt::Debug for Stmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stmt({})", self.id)
    }
}

impl Drop for Stmt {
    fn drop(&mut self) {
        // Nothing holds the statement any more: forget it (unless it was interned again
        // meanwhile, which left a live entry under the key).
        self.cache
            .map
            .remove_if(&self.key, |_, w| w.strong_count() == 0);
    }
}

/// Every statement some client or server connection holds, interned.
#[derive(Default)]
pub struct StatementCache {
    pub(super) map: DashMap<Bytes, Weak<Stmt>>,
    pub(super) next_id: AtomicU64,
    /// Bumped when the schema may have changed (DDL went through, or PostgreSQL said a
    /// statement's plan or types went stale).
    pub(super) epoch: AtomicU64,
}

impl StatementCache {
    /// The statement for `tail` (a Parse body after the name) in `tenant`'s namespace.
    pub fn intern(self: &Arc<Self>, tenant: TenantId, tail: &[u8]) -> Arc<Stmt> {
        let mut key = BytesMut::with_capacity(4 + tail.len());
        key.put_u32(tenant);
        key.extend_from_slice(tail);
        let key = key.freeze();
        let epoch = self.epoch.load(Ordering::Relaxed);
        if let Some(s) = self.map.get(&key).and_then(|w| w.upgrade())
            && s.epoch >= epoch
        {
            return s;
        }
        let entry = self.map.entry(key.clone());
        match entry {
            dashmap::Entry::Occupied(mut o) => {
                if let Some(s) = o.get().upgrade()
                    && s.epoch >= epoch
                {
                    return s;
                }
                let s = self.make(key, tail);
                o.insert(Arc::downgrade(&s));
                s
            }
            dashmap::Entry::Vacant(v) => {
                let s = self.make(key, tail);
                v.insert(Arc::downgrade(&s));
                s
            }
        }
    }

    pub(super) fn make(self: &Arc<Self>, key: Bytes, tail: &[u8]) -> Arc<Stmt> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.load(Ordering::Relaxed);
        let mut name = PREFIX.to_vec();
        name.extend_from_slice(id.to_string().as_bytes());
        name.push(0);
        let len = 4 + name.len() + tail.len();
        let mut parse = BytesMut::with_capacity(1 + len);
        parse.put_u8(b'P');
        parse.put_u32(len as u32);
        parse.extend_from_slice(&name);
        parse.extend_from_slice(tail);
        Arc::new(Stmt {
            id,
            parse: parse.freeze(),
            name_end: HEADER_LEN + name.len(),
            touches: crate::sniff::sniff(tail),
            epoch,
            key,
            cache: self.clone(),
        })
    }

    /// The statement for `tail` in `tenant`'s namespace, if some client or server
    /// connection holds it now.
    pub(super) fn get(&self, tenant: TenantId, tail: &[u8]) -> Option<Arc<Stmt>> {
        let mut key = BytesMut::with_capacity(4 + tail.len());
        key.put_u32(tenant);
        key.extend_from_slice(tail);
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.map
            .get(&key[..])
            .and_then(|w| w.upgrade())
            .filter(|s| s.epoch >= epoch)
    }

    /// The schema may have changed: statements interned so far are not handed to new
    /// Parses any more (each text is prepared afresh once, then shared again). Those that
    /// clients hold stay theirs, as on PostgreSQL, where a statement prepared before a
    /// schema change stays that statement.
    pub fn schema_changed(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Statements alive now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A client's statements, by the names it gave them. Boxed, and made at the first one:
/// most clients never name a statement, and every idle client's task holds this.
#[derive(Debug, Default)]
pub struct ClientStatements(Option<Box<Named>>);

#[derive(Debug, Default)]
struct Named {
    map: FastMap<Box<[u8]>, Arc<Stmt>>,
    /// Names and statement texts, for the bound.
    bytes: usize,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |n| n.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of names and texts held.
    pub(super) fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |n| n.bytes)
    }

    pub(super) fn get(&self, name: &[u8]) -> Option<&Arc<Stmt>> {
        self.0.as_ref()?.map.get(name)
    }

    /// Would one more statement of `cost` bytes stay within the client's bounds?
    pub(super) fn check(&self, cost: usize) -> Result<(), PgError> {
        if self.len() >= MAX_CLIENT_STATEMENTS {
            return Err(PgError::too_many_statements(&format!(
                "at most {MAX_CLIENT_STATEMENTS} (close some)"
            )));
        }
        if self.bytes() + cost > MAX_CLIENT_STATEMENT_BYTES {
            return Err(PgError::too_many_statements(&format!(
                "at most {} MiB of statement text (close some)",
                MAX_CLIENT_STATEMENT_BYTES >> 20
            )));
        }
        Ok(())
    }

    pub(super) fn insert(&mut self, name: Box<[u8]>, stmt: Arc<Stmt>) {
        let n = self.0.get_or_insert_with(Default::default);
        n.bytes += name.len() + stmt.cost();
        if let Some(old) = n.map.insert(name, stmt) {
            n.bytes -= old.cost();
        }
    }

    pub(super) fn remove(&mut self, name: &[u8]) -> Option<Arc<Stmt>> {
        let n = self.0.as_mut()?;
        let (k, s) = n.map.remove_entry(name)?;
        n.bytes -= k.len() + s.cost();
        Some(s)
    }

    /// Forgets every statement, handing them over.
    pub(super) fn take_all(&mut self) -> Vec<(Box<[u8]>, Arc<Stmt>)> {
        self.0
            .take()
            .map(|n| n.map.into_iter().collect())
            .unwrap_or_default()
    }
}
