//! What one server connection has prepared (LRU), and the replies it owes.

use super::*;

/// What one server connection has prepared under proxy names, with use ticks for LRU.
#[derive(Debug, Default)]
pub struct ServerStatements {
    pub(super) map: FastMap<u64, (Arc<Stmt>, u64)>,
    pub(super) tick: u64,
    /// The replies the connection owes, in order (empty between transactions; kept here so
    /// its memory is reused rather than allocated per transaction).
    pub(super) expect: Replies,
}

/// The replies owed, in order: a byte-sized entry per message, and the actions of the few
/// that have one in a queue of their own (most messages are passed through as they are).
#[derive(Debug, Default)]
pub(super) struct Replies {
    pub(super) kinds: VecDeque<(Kind, bool)>,
    pub(super) acts: VecDeque<Act>,
}

impl Replies {
    pub(super) fn push(&mut self, e: Expect) {
        let has_act = !matches!(e.act, Act::Forward);
        self.kinds.push_back((e.kind, has_act));
        if has_act {
            self.acts.push_back(e.act);
        }
    }

    #[inline]
    pub(super) fn front_kind(&self) -> Option<Kind> {
        self.kinds.front().map(|&(k, _)| k)
    }

    /// The front entry's action (`None` for a plain pass-through, or when empty).
    #[inline]
    pub(super) fn front_act(&self) -> Option<&Act> {
        match self.kinds.front() {
            Some((_, true)) => self.acts.front(),
            _ => None,
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<Expect> {
        let (kind, has_act) = self.kinds.pop_front()?;
        let act = if has_act {
            self.acts.pop_front().unwrap_or(Act::Forward)
        } else {
            Act::Forward
        };
        Some(Expect { kind, act })
    }

    /// Drops the front entry (its reply came and it has nothing to do).
    #[inline]
    pub(super) fn discard_front(&mut self) {
        if let Some((_, true)) = self.kinds.pop_front() {
            self.acts.pop_front();
        }
    }

    pub(super) fn len(&self) -> usize {
        self.kinds.len()
    }
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Is the statement there? Marks it used.
    pub(super) fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.map.get_mut(&id) {
            Some(e) => {
                e.1 = self.tick;
                true
            }
            None => false,
        }
    }

    /// Adds a statement; returns the one evicted to stay within `max`.
    pub(super) fn insert(&mut self, stmt: Arc<Stmt>, max: usize) -> Option<Arc<Stmt>> {
        let evicted = if self.map.len() >= max {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(id, _)| *id);
            oldest.and_then(|id| self.map.remove(&id)).map(|(s, _)| s)
        } else {
            None
        };
        self.tick += 1;
        self.map.insert(stmt.id, (stmt, self.tick));
        evicted
    }

    /// Puts back a statement whose Close did not happen.
    pub(super) fn restore(&mut self, stmt: Arc<Stmt>) {
        self.map.entry(stmt.id).or_insert((stmt, 0));
    }

    pub(super) fn remove(&mut self, id: u64) {
        self.map.remove(&id);
    }

    /// The server dropped everything (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}
