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
//!
//! A hit costs a cheap re-assertion of the tenant's search_path and role (or a full reset
//! before another client); a miss can leak state, so the words are broad. What it cannot
//! see is a function that changes state when it is called: the `always` mode of
//! `reset_path_and_role` covers that for the search_path and the role (docs/security.md).
//!
//! Text arrives in pieces (a long query spans several reads): a word cut at the end of a
//! piece is carried over, so the result does not depend on how the bytes were split.

use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, Input, MatchKind};

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

/// Keywords, what a whole-word hit means, and whether a prefix suffices.
const WORDS: [(&str, Touched, bool); 13] = [
    ("search_path", PATH, false),
    ("role", PATH, false),
    ("authorization", PATH, false),
    ("schema", PATH, false),
    ("set_config", PATH | STATE, false),
    ("reset", PATH | STATE, false),
    ("discard", PATH | STATE, false),
    ("temp", STATE, false),
    ("temporary", STATE, false),
    ("listen", STATE, false),
    ("pg_advisory_", STATE, true),
    ("prepare", STATE | STATEMENTS, false),
    // A cursor declared WITH HOLD outlives its transaction.
    ("hold", STATE, false),
];

/// The longest keyword: a word longer than this is no keyword.
const MAX_WORD: usize = 13;

fn automaton() -> &'static AhoCorasick {
    static AC: OnceLock<AhoCorasick> = OnceLock::new();
    AC.get_or_init(|| {
        AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostLongest)
            .build(WORDS.iter().map(|w| w.0))
            .expect("keywords build")
    })
}

/// Bytes of an SQL identifier (non-ASCII too, as PostgreSQL's lexer has it). `$` is left
/// out, although an identifier may contain it, so that `$$reset` in a dollar-quoted body
/// still shows the word.
#[inline]
fn ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The bits of one whole identifier.
fn word_bits(word: &[u8]) -> Touched {
    WORDS
        .iter()
        .filter(|(w, _, prefix)| {
            if *prefix {
                word.len() >= w.len() && word[..w.len()].eq_ignore_ascii_case(w.as_bytes())
            } else {
                word.eq_ignore_ascii_case(w.as_bytes())
            }
        })
        .fold(0, |acc, (_, bits, _)| acc | bits)
}

/// Searches `s`, which starts at a word boundary and ends at one (or at the end of the
/// text), for whole keywords.
fn search(s: &[u8]) -> Touched {
    let ac = automaton();
    let mut bits = 0;
    let mut at = 0;
    while at < s.len() {
        let Some(m) = ac.find(Input::new(s).span(at..s.len())) else {
            break;
        };
        let (start, end) = (m.start(), m.end());
        let (_, b, prefix) = WORDS[m.pattern().as_usize()];
        let left = start == 0 || !ident(s[start - 1]);
        let right = prefix || end == s.len() || !ident(s[end]);
        if left && right {
            bits |= b;
            at = end;
        } else {
            // Inside a longer identifier: no keyword can start before its end.
            at = start + 1;
            while at < s.len() && ident(s[at]) {
                at += 1;
            }
        }
    }
    bits
}

/// The bits of a whole text.
pub fn sniff(text: &[u8]) -> Touched {
    search(text)
}

/// A text read in pieces: the state carried from one piece to the next.
#[derive(Debug, Default, Clone)]
pub struct Sniffer {
    /// The start of the identifier cut at the end of the last piece.
    carry: [u8; MAX_WORD],
    carry_len: u8,
    /// The identifier at the end of the last piece is longer than any keyword (and was
    /// checked for prefix keywords already).
    overflow: bool,
}

impl Sniffer {
    /// Feeds the next piece of a text; `last` says the text ends with it.
    pub fn feed(&mut self, piece: &[u8], last: bool) -> Touched {
        let mut bits = 0;
        let mut s = piece;
        if self.carry_len > 0 || self.overflow {
            // Finish the word the last piece ended in.
            let lead = s.iter().position(|&b| !ident(b)).unwrap_or(s.len());
            let word_ends = lead < s.len() || last;
            if !self.overflow {
                let n = self.carry_len as usize;
                let total = n + lead;
                let mut word = self.carry;
                let more = lead.min(MAX_WORD - n);
                word[n..n + more].copy_from_slice(&s[..more]);
                if total <= MAX_WORD {
                    if !word_ends {
                        self.carry = word;
                        self.carry_len = total as u8;
                        return bits;
                    }
                    bits |= word_bits(&word[..total]);
                } else {
                    bits |= prefix_bits(&word);
                    if !word_ends {
                        self.overflow = true;
                        self.carry_len = 0;
                        return bits;
                    }
                }
            } else if !word_ends {
                return bits;
            }
            self.carry_len = 0;
            self.overflow = false;
            s = &s[lead..];
        }
        if last {
            return bits | search(s);
        }
        // Keep a word cut at the end for the next piece.
        let cut = s.iter().rposition(|&b| !ident(b)).map_or(0, |i| i + 1);
        bits |= search(&s[..cut]);
        let tail = &s[cut..];
        if tail.len() <= MAX_WORD {
            self.carry[..tail.len()].copy_from_slice(tail);
            self.carry_len = tail.len() as u8;
        } else {
            bits |= prefix_bits(&tail[..MAX_WORD]);
            self.overflow = true;
        }
        bits
    }
}

/// The bits of the prefix keywords that begin `word` (the start of a longer identifier).
fn prefix_bits(word: &[u8]) -> Touched {
    WORDS
        .iter()
        .filter(|(w, _, prefix)| {
            *prefix && word.len() >= w.len() && word[..w.len()].eq_ignore_ascii_case(w.as_bytes())
        })
        .fold(0, |acc, (_, bits, _)| acc | bits)
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
        assert_eq!(sniff(b"DO $$BEGIN SET ROLE other; END$$"), PATH);
        assert_eq!(sniff(b"SELECT roles, user_role, parole FROM t"), 0);
        assert_eq!(sniff(b"SELECT attempts, temperature FROM t"), 0);
        assert_eq!(sniff(b"CREATE TEMP TABLE x (a int)"), STATE);
        assert_eq!(sniff(b"SELECT pg_advisory_lock(1)"), STATE);
        assert_eq!(sniff(b"SELECT xpg_advisory_lock(1)"), 0);
        assert_eq!(sniff(b"reset all"), PATH | STATE);
        assert_eq!(sniff(b"PREPARE p AS SELECT 1"), STATE | STATEMENTS);
        assert_eq!(sniff(b"SET SCHEMA 'x'"), PATH);
        assert_eq!(sniff(b"SELECT * FROM information_schema.tables"), 0);
        assert_eq!(sniff(b"\"role\""), PATH);
        assert_eq!(sniff(b""), 0);
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
