//! Spots, in the SQL text clients send, the words of commands that change session state
//! the proxy must put right before another transaction runs on the connection.
//!
//! PostgreSQL tells a pooler about a session-level `SET`, `RESET` or `DISCARD` through the
//! CommandComplete tag, but not about the same change made by `set_config(...)`, inside a
//! `DO` block or through `EXECUTE`. So the client scanner runs every Query and Parse text
//! it passes through this sniffer, which looks for whole words (case-insensitive,
//! wherever they are: comments and string literals included, so `DO $$ ... $$` bodies are
//! seen) and reports what they may have touched as [`Touched`] bits:
//!
//! * [`PATH`]: `search_path`, `role`, `authorization`, `schema`, `set_config`, `reset`,
//!   `discard` — the search_path or the current role may differ from the tenant's.
//! * [`STATE`]: `set_config`, `reset`, `discard`, `temp`, `temporary`, `listen`,
//!   `pg_advisory_*`, `hold` — other session state (settings, temp tables, notifications,
//!   locks, cursors WITH HOLD).
//! * [`STATEMENTS`]: `prepare` — SQL-level prepared statements the proxy does not track.
//! * [`COMMITS`]: `commit`, `end`, `prepare` — the statement may end (commit, or prepare)
//!   the transaction block it runs in: if the server connection is lost while it runs, its
//!   outcome is in doubt (08007) rather than a plain failure.
//!
//! A hit costs a cheap re-assertion of the tenant's search_path and role (or a full reset
//! before another client); a miss can leak state, so the words are broad. What it cannot
//! see is a function that changes state when it is called: the `always` mode of
//! `reset_path_and_role` covers that for the search_path and the role (docs/security.md).
//!
//! Text arrives in pieces (a long query spans several reads): a word cut at the end of a
//! piece is carried over, so the result does not depend on how the bytes were split.

/// What a client's transaction may have changed on its server connection (bits).
pub type Touched = u8;
/// The search_path or the current role / session authorization.
pub const PATH: Touched = 1;
/// Other session state: settings, temp tables, LISTEN, advisory locks, cursors.
pub const STATE: Touched = 2;
/// SQL-level prepared statements the proxy does not track.
pub const STATEMENTS: Touched = 4;
/// A hit inside a named Parse: when the proxy does not track named statements, the
/// statement may run again later, unseen.
pub const NAMED_PARSE: Touched = 8;
/// May commit the open transaction block (`COMMIT`, `END`, `PREPARE TRANSACTION`).
pub const COMMITS: Touched = 16;

/// Bytes of an SQL identifier (non-ASCII too, as PostgreSQL's lexer has it). `$` is left
/// out, although an identifier may contain it, so that `$$reset` in a dollar-quoted body
/// still shows the word.
static IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        b += 1;
    }
    t
};

/// The prefix keyword: `pg_advisory_lock`, `pg_advisory_unlock_all`, ...
const ADVISORY: &[u8] = b"pg_advisory_";

/// Bytes of a word kept: enough for the longest keyword and the prefix.
const KEPT: usize = 16;

/// The bits of one whole word of `len` bytes whose first bytes (up to [`KEPT`]) are
/// `head`. Most words are told apart by length, first and last letter without comparing
/// them: this runs on every word of every query.
#[inline]
fn word_bits(head: &[u8], len: usize) -> Touched {
    if len > KEPT {
        return advisory(head);
    }
    let first = head[0] | 0x20;
    let last = head[len - 1] | 0x20;
    let is = |w: &[u8]| head.eq_ignore_ascii_case(w);
    match (len, first, last) {
        (3, b'e', b'd') if is(b"end") => COMMITS,
        (4, b'r', b'e') if is(b"role") => PATH,
        (4, b't', b'p') if is(b"temp") => STATE,
        (4, b'h', b'd') if is(b"hold") => STATE,
        (5, b'r', b't') if is(b"reset") => PATH | STATE,
        (6, b's', b'a') if is(b"schema") => PATH,
        (6, b'l', b'n') if is(b"listen") => STATE,
        (6, b'c', b't') if is(b"commit") => COMMITS,
        (7, b'd', b'd') if is(b"discard") => PATH | STATE,
        (7, b'p', b'e') if is(b"prepare") => STATE | STATEMENTS | COMMITS,
        (9, b't', b'y') if is(b"temporary") => STATE,
        (10, b's', b'g') if is(b"set_config") => PATH | STATE,
        (11, b's', b'h') if is(b"search_path") => PATH,
        (13, b'a', b'n') if is(b"authorization") => PATH,
        (13.., b'p', _) => advisory(head),
        _ => 0,
    }
}

/// `pg_advisory_*` at the start of a longer word.
#[inline]
fn advisory(head: &[u8]) -> Touched {
    if head.len() >= ADVISORY.len()
        && head[2] == b'_'
        && head[..ADVISORY.len()].eq_ignore_ascii_case(ADVISORY)
    {
        STATE
    } else {
        0
    }
}

/// The bits of a whole text.
pub fn sniff(text: &[u8]) -> Touched {
    Sniffer::default().feed(text, true)
}

/// A text read in pieces: the word cut at the end of one piece, carried to the next.
#[derive(Debug, Default, Clone)]
pub struct Sniffer {
    /// The first bytes of the word cut at the end of the last piece.
    head: [u8; KEPT],
    /// Its length so far (saturating); 0 when the last piece ended between words.
    len: u8,
}

impl Sniffer {
    /// Feeds the next piece of a text; `last` says the text ends with it.
    pub fn feed(&mut self, piece: &[u8], last: bool) -> Touched {
        let mut bits = 0;
        let n = piece.len();
        let mut i = 0;
        if self.len > 0 {
            // Finish the word the last piece ended in.
            while i < n && IDENT[piece[i] as usize] {
                let l = self.len as usize;
                if l < KEPT {
                    self.head[l] = piece[i];
                }
                self.len = self.len.saturating_add(1);
                i += 1;
            }
            if i == n && !last {
                return 0;
            }
            let l = self.len as usize;
            bits |= word_bits(&self.head[..l.min(KEPT)], l);
            self.len = 0;
        }
        loop {
            while i < n && !IDENT[piece[i] as usize] {
                i += 1;
            }
            if i == n {
                return bits;
            }
            let start = i;
            while i < n && IDENT[piece[i] as usize] {
                i += 1;
            }
            let len = i - start;
            if i == n && !last {
                // Cut: keep its start for the next piece.
                let k = len.min(KEPT);
                self.head[..k].copy_from_slice(&piece[start..start + k]);
                self.len = len.min(255) as u8;
                return bits;
            }
            if len >= 3 {
                bits |= word_bits(&piece[start..start + len.min(KEPT)], len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_only() {
        assert_eq!(
            sniff(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
            0
        );
        assert_eq!(
            sniff(b"SELECT set_config('search_path', 'x', false)"),
            PATH | STATE
        );
        assert_eq!(
            sniff(b"select PG_CATALOG.SET_CONFIG('a','b',false)"),
            PATH | STATE
        );
        // A false positive for COMMITS (the block's END): costs nothing unless the server
        // connection is lost while it runs inside a transaction block.
        assert_eq!(sniff(b"DO $$BEGIN SET ROLE other; END$$"), PATH | COMMITS);
        assert_eq!(sniff(b"SELECT roles, user_role, parole FROM t"), 0);
        assert_eq!(sniff(b"SELECT attempts, temperature FROM t"), 0);
        assert_eq!(sniff(b"CREATE TEMP TABLE x (a int)"), STATE);
        assert_eq!(sniff(b"SELECT pg_advisory_lock(1)"), STATE);
        assert_eq!(sniff(b"SELECT xpg_advisory_lock(1)"), 0);
        assert_eq!(sniff(b"reset all"), PATH | STATE);
        assert_eq!(
            sniff(b"PREPARE p AS SELECT 1"),
            STATE | STATEMENTS | COMMITS
        );
        assert_eq!(sniff(b"COMMIT"), COMMITS);
        assert_eq!(sniff(b"end;"), COMMITS);
        assert_eq!(sniff(b"SELECT ended, commits, endx FROM t"), 0);
        assert_eq!(sniff(b"SET SCHEMA 'x'"), PATH);
        assert_eq!(sniff(b"SELECT * FROM information_schema.tables"), 0);
        assert_eq!(sniff(b"\"role\""), PATH);
        assert_eq!(sniff(b""), 0);
        assert_eq!(sniff(b"EXECUTE $x$reset all$x$"), PATH | STATE);
        assert_eq!(sniff(b"SELECT pg_advisory_"), 0);
        assert_eq!(sniff(b"SELECT a_role_longer_than_sixteen_bytes_role"), 0);
    }

    #[test]
    fn pieces_give_the_same_answer_as_the_whole() {
        let texts: [&[u8]; 6] = [
            b"SELECT 1; select set_config('role', 'x', false); SELECT 2",
            b"UPDATE t SET a = 1 WHERE aid = 7",
            b"SELECT a_very_long_identifier_name_that_goes_on, pg_advisory_unlock_all_sessions()",
            b"DO $$ BEGIN EXECUTE 'SET search_path TO x'; END $$",
            b"select temp from attempts; listen",
            b"SELECT averyveryverylongidentifierxrole",
        ];
        for t in texts {
            let whole = sniff(t);
            for a in 0..=t.len() {
                for b in a..=t.len() {
                    let mut s = Sniffer::default();
                    let got =
                        s.feed(&t[..a], false) | s.feed(&t[a..b], false) | s.feed(&t[b..], true);
                    assert_eq!(
                        got,
                        whole,
                        "{:?} split at {a},{b}",
                        String::from_utf8_lossy(t)
                    );
                }
            }
        }
    }
}
