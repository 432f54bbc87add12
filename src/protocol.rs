//! Protocol framing: where messages begin and end in a byte stream, without decoding them.
//!
//! After startup every PostgreSQL message is a tag byte and a big-endian i32 length that
//! counts itself but not the tag. The hot path only ever looks at these five bytes (and, for
//! a handful of small messages, at the body) and forwards everything else untouched.
//! The few messages the proxy writes itself are encoded here too.

use bytes::{BufMut, BytesMut};

/// Tag byte plus length.
pub const HEADER_LEN: usize = 5;

/// The largest message PostgreSQL itself accepts from a client (`PQ_LARGE_MESSAGE_LIMIT`).
pub const MAX_CLIENT_MESSAGE_LEN: usize = 0x3fff_ffff - 1;

/// The largest startup packet accepted (as PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Startup-phase request codes (the "protocol version" field).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Reads the header at the start of `buf`: the tag and the length of the whole message
/// including the tag. `None` while fewer than five bytes are there. The length is not
/// validated beyond being at least 4 (callers apply their own limits).
#[inline]
pub fn header(buf: &[u8]) -> Option<(u8, Result<usize, i32>)> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Some((buf[0], Err(len)));
    }
    Some((buf[0], Ok(len as usize + 1)))
}

/// Is this a message type a client may send after startup?
#[inline]
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// Appends a simple-protocol Query message.
pub fn put_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    buf.put_i32((4 + sql.len() + 1) as i32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// Appends Parse, Bind, Execute and Sync that run `sql` (the proxy's own text, `$n`
/// placeholders only) with `params` as text values (`None` is NULL) on the unnamed
/// statement and portal. Values never become SQL text, so no quoting can break out.
/// Values may not contain NUL (startup parameters cannot).
pub fn put_statement(buf: &mut BytesMut, sql: &str, params: &[Option<&str>]) {
    use postgres_protocol::IsNull;
    use postgres_protocol::message::frontend;
    const TEXT_OID: u32 = 25;
    // Encoding into a BytesMut fails only for NUL in names or text, or lengths over
    // i32::MAX; the proxy's SQL has no NUL and startup values are C strings.
    let _ = frontend::parse("", sql, params.iter().map(|_| TEXT_OID), buf);
    let _ = frontend::bind(
        "",
        "",
        [0i16],
        params.iter(),
        |v, b| match v {
            Some(v) => {
                b.put_slice(v.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        },
        [0i16],
        buf,
    );
    let _ = frontend::execute("", 0, buf);
    frontend::sync(buf);
}

/// Appends a ReadyForQuery message with the given transaction status.
pub fn put_ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_slice(&[b'Z', 0, 0, 0, 5, status]);
}

/// Appends a RowDescription of text columns.
pub fn put_row_description(buf: &mut BytesMut, columns: &[&str]) {
    let start = buf.len();
    buf.put_u8(b'T');
    buf.put_i32(0);
    buf.put_i16(columns.len() as i16);
    for c in columns {
        put_cstr(buf, c);
        buf.put_i32(0); // table oid
        buf.put_i16(0); // column number
        buf.put_i32(25); // type oid: text
        buf.put_i16(-1); // type size
        buf.put_i32(-1); // type modifier
        buf.put_i16(0); // text format
    }
    patch_len(buf, start);
}

/// Appends a DataRow of text values.
pub fn put_data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[S]) {
    let start = buf.len();
    buf.put_u8(b'D');
    buf.put_i32(0);
    buf.put_i16(values.len() as i16);
    for v in values {
        let v = v.as_ref().as_bytes();
        buf.put_i32(v.len() as i32);
        buf.put_slice(v);
    }
    patch_len(buf, start);
}

/// Appends a CommandComplete message.
pub fn put_command_complete(buf: &mut BytesMut, tag: &str) {
    buf.put_u8(b'C');
    buf.put_i32((4 + tag.len() + 1) as i32);
    put_cstr(buf, tag);
}

/// Writes the length of the message that starts at `start` (its tag byte).
fn patch_len(buf: &mut BytesMut, start: usize) {
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// Appends a ParameterStatus message.
pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    buf.put_u8(b'S');
    buf.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    put_cstr(buf, name);
    put_cstr(buf, value);
}

/// Appends a string with its NUL terminator (interior NULs are dropped).
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    if s.as_bytes().contains(&0) {
        for part in s.split('\0') {
            buf.put_slice(part.as_bytes());
        }
    } else {
        buf.put_slice(s.as_bytes());
    }
    buf.put_u8(0);
}

/// Quotes an SQL identifier: `tenant "a"` becomes `"tenant ""a"""`.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// An `E'...'` string literal: backslashes and quotes escaped, so it reads the same with
/// standard_conforming_strings on or off.
pub fn escape_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The messages at the front of `buf`, as (tag, body): the body of the last one may be
/// cut short. Stops at a partial header or a bad length.
pub fn frames(mut buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, Ok(len)) = header(buf)? else {
            return None;
        };
        let body = &buf[HEADER_LEN..len.min(buf.len())];
        buf = &buf[len.min(buf.len())..];
        Some((tag, body))
    })
}

/// The SQLSTATE and message of the first ErrorResponse in `buf`, if any (empty strings for
/// one cut short).
pub fn first_error(buf: &[u8]) -> Option<(String, String)> {
    let (_, body) = frames(buf).find(|(tag, _)| *tag == b'E')?;
    let field = |c| error_field(body, c).unwrap_or("").to_string();
    Some((field(b'C'), field(b'M')))
}

/// Finds the first field with `code` in an ErrorResponse/NoticeResponse body (after the
/// header). The body must be a complete, bounded message body.
pub fn error_field(body: &[u8], code: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&c, tail)) = rest.split_first() {
        if c == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if c == code {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_tag_and_total_length() {
        assert_eq!(header(b"Z\0\0\0\x05I"), Some((b'Z', Ok(6))));
        assert_eq!(header(b"Z\0\0"), None);
        assert_eq!(header(b"Q\0\0\0\x02"), Some((b'Q', Err(2))));
        assert_eq!(header(b"Q\x7f\xff\xff\xff"), Some((b'Q', Ok(0x8000_0000))));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("tenant_acme"), "\"tenant_acme\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(escape_literal("a'b\\c"), "E'a''b\\\\c'");
    }

    #[test]
    fn error_fields() {
        let body = b"SERROR\0C42P01\0Mno such table\0\0";
        assert_eq!(error_field(body, b'C'), Some("42P01"));
        assert_eq!(error_field(body, b'M'), Some("no such table"));
        assert_eq!(error_field(body, b'D'), None);
        assert_eq!(error_field(b"SERR", b'C'), None);
    }
}
