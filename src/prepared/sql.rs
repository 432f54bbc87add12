//! The SQL-level statement commands (PREPARE, EXECUTE, DEALLOCATE, DISCARD) in query text.

/// The few SQL commands about prepared statements the proxy must see.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum SqlCommand {
    DeallocateAll,
    Deallocate(Vec<u8>),
    DiscardAll,
    Other,
}

/// Recognises `DEALLOCATE [PREPARE] name|ALL` and `DISCARD ALL` as a whole query string
/// (one statement, an optional `;`, no comments). Public for the fuzz targets' model server.
#[doc(hidden)]
pub fn sql_command(text: &[u8]) -> SqlCommand {
    // Most queries: not a D word.
    if !matches!(text.trim_ascii_start().first(), Some(b'd' | b'D')) {
        return SqlCommand::Other;
    }
    let mut words = SqlWords { s: text };
    let Some(first) = words.next() else {
        return SqlCommand::Other;
    };
    let cmd = if first.eq_ignore_ascii_case(b"discard") {
        match words.next() {
            Some(w) if w.eq_ignore_ascii_case(b"all") => SqlCommand::DiscardAll,
            _ => return SqlCommand::Other,
        }
    } else if first.eq_ignore_ascii_case(b"deallocate") {
        let mut w = words.next();
        if w.as_deref()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"prepare"))
        {
            w = words.next();
        }
        match w {
            Some(w) if w.eq_ignore_ascii_case(b"all") => SqlCommand::DeallocateAll,
            Some(name) => SqlCommand::Deallocate(name),
            None => return SqlCommand::Other,
        }
    } else {
        return SqlCommand::Other;
    };
    match words.next() {
        None => cmd,
        Some(_) => SqlCommand::Other,
    }
}

/// Words of a simple SQL command: identifiers (unquoted ones lower-cased, as PostgreSQL
/// folds them), quoted identifiers, and a trailing `;`. Anything else ends the command
/// as "not recognised" (an empty word).
pub(super) struct SqlWords<'a> {
    pub(super) s: &'a [u8],
}

impl Iterator for SqlWords<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let s = self.s.trim_ascii_start();
        let s = match s.strip_prefix(b";") {
            Some(rest) if rest.trim_ascii().is_empty() => &[][..],
            _ => s,
        };
        if s.is_empty() {
            self.s = s;
            return None;
        }
        if s[0] == b'"' {
            let mut word = Vec::new();
            let mut i = 1;
            while i < s.len() {
                if s[i] == b'"' {
                    if s.get(i + 1) == Some(&b'"') {
                        word.push(b'"');
                        i += 2;
                        continue;
                    }
                    self.s = &s[i + 1..];
                    return Some(word);
                }
                word.push(s[i]);
                i += 1;
            }
            self.s = &[];
            return Some(Vec::new());
        }
        let end = s
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80))
            .unwrap_or(s.len());
        if end == 0 {
            // Not a word: the command is something else.
            self.s = &[];
            return Some(Vec::new());
        }
        self.s = &s[end..];
        Some(s[..end].to_ascii_lowercase())
    }
}
