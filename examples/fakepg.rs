//! A minimal fake PostgreSQL server that answers every statement at once, for measuring a
//! pooler's own ceiling without PostgreSQL's cost (`benches/ceiling.sh`):
//! `cargo run --release --example fakepg -- 127.0.0.1:5999 [threads]`.
//!
//! It speaks enough of the protocol for tenantpool and PgBouncer in front of pgbench:
//! startup (trust: AuthenticationOk; SSLRequest refused; a CancelRequest is read and
//! dropped), ParameterStatus, BackendKeyData, ReadyForQuery; the simple protocol (a Query
//! may hold several statements: each gets its answer) and the extended one (Parse, Bind,
//! Describe, Execute, Close, Sync, Flush). A SELECT returns one row of `1`s, one column per
//! top-level comma of its select list (so `set_config(...)` lists and `current_setting`
//! read-backs get as many values as they ask for); other statements get the tag PostgreSQL
//! would send (`SET`, `DISCARD ALL`, `BEGIN`, `COMMIT`, `UPDATE 1`, ...), and a `SET` of a
//! reported parameter its ParameterStatus. BEGIN/COMMIT move the ReadyForQuery status.
//! Nothing is ever an error.

use std::collections::HashMap;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:5999".into());
    let threads: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(1);
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        println!("fakepg listening on {addr}");
        let mut pid = 1000;
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            pid += 1;
            tokio::spawn(async move {
                let _ = serve(sock, pid).await;
            });
        }
    });
}

async fn read_more(sock: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<bool> {
    buf.reserve(8192);
    Ok(sock.read_buf(buf).await? > 0)
}

async fn serve(mut sock: TcpStream, pid: i32) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    // Startup: SSLRequest/GSSENCRequest are refused, a CancelRequest ends the connection.
    loop {
        while buf.len() < 4 || buf.len() < u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize
        {
            if !read_more(&mut sock, &mut buf).await? {
                return Ok(());
            }
        }
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        let code = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        buf.advance(len);
        match code {
            80877103 | 80877104 => sock.write_all(b"N").await?,
            80877102 => return Ok(()),
            _ => break,
        }
    }
    let mut out = BytesMut::with_capacity(8192);
    put_msg(&mut out, b'R', |b| b.put_i32(0));
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("integer_datetimes", "on"),
        ("is_superuser", "off"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
        ("application_name", ""),
    ] {
        put_msg(&mut out, b'S', |b| {
            put_cstr(b, k);
            put_cstr(b, v);
        });
    }
    put_msg(&mut out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(0x5eed);
    });
    let mut status = b'I';
    put_msg(&mut out, b'Z', |b| b.put_u8(status));
    sock.write_all(&out).await?;
    out.clear();

    // Extended protocol: statement texts by name, portals by name.
    let mut statements: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut portals: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    // After an error nothing is skipped: there are none.
    loop {
        // Every whole message in the buffer, then one write.
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize + 1;
            if buf.len() < len {
                break;
            }
            let msg = buf.split_to(len);
            let tag = msg[0];
            let body = &msg[5..];
            match tag {
                b'Q' => {
                    let sql = cstr(body);
                    let mut any = false;
                    for stmt in split_statements(sql) {
                        any = true;
                        answer(&mut out, stmt, &mut status, true);
                    }
                    if !any {
                        put_msg(&mut out, b'I', |_| {});
                    }
                    put_msg(&mut out, b'Z', |b| b.put_u8(status));
                }
                b'P' => {
                    let name = cstr(body);
                    let sql = cstr(&body[name.len() + 1..]);
                    statements.insert(name.to_vec(), sql.to_vec());
                    put_msg(&mut out, b'1', |_| {});
                }
                b'B' => {
                    let portal = cstr(body);
                    let stmt = cstr(&body[portal.len() + 1..]);
                    let sql = statements.get(stmt).cloned().unwrap_or_default();
                    portals.insert(portal.to_vec(), sql);
                    put_msg(&mut out, b'2', |_| {});
                }
                b'D' => {
                    let name = cstr(&body[1..]);
                    let sql = if body[0] == b'S' {
                        put_msg(&mut out, b't', |b| b.put_i16(0));
                        statements.get(name)
                    } else {
                        portals.get(name)
                    };
                    let sql = sql.map(|s| s.as_slice()).unwrap_or(b"");
                    match select_columns(sql) {
                        Some(n) => put_row_description(&mut out, n),
                        None => put_msg(&mut out, b'n', |_| {}),
                    }
                }
                b'E' => {
                    let portal = cstr(body);
                    let sql = portals.get(portal).cloned().unwrap_or_default();
                    answer(&mut out, &sql, &mut status, false);
                }
                b'C' => {
                    let name = cstr(&body[1..]);
                    if body[0] == b'S' {
                        statements.remove(name);
                    } else {
                        portals.remove(name);
                    }
                    put_msg(&mut out, b'3', |_| {});
                }
                b'S' => {
                    portals.remove(&b""[..]);
                    put_msg(&mut out, b'Z', |b| b.put_u8(status));
                }
                b'H' => {}
                b'X' => {
                    sock.write_all(&out).await?;
                    return Ok(());
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        if !read_more(&mut sock, &mut buf).await? {
            return Ok(());
        }
    }
}

/// The answer to one statement: a row (SELECT), then its CommandComplete.
fn answer(out: &mut BytesMut, sql: &[u8], status: &mut u8, describe: bool) {
    let sql = trim(sql);
    if sql.is_empty() {
        put_msg(out, b'I', |_| {});
        return;
    }
    if let Some(n) = select_columns(sql) {
        if describe {
            put_row_description(out, n);
        }
        put_msg(out, b'D', |b| {
            b.put_i16(n as i16);
            for _ in 0..n {
                b.put_i32(1);
                b.put_u8(b'1');
            }
        });
        put_msg(out, b'C', |b| put_cstr(b, "SELECT 1"));
        return;
    }
    let word = first_word(sql);
    if word == "SET" {
        report_set(out, sql);
    }
    let tag: &str = match word.as_str() {
        "BEGIN" | "START" => {
            *status = b'T';
            "BEGIN"
        }
        "COMMIT" | "END" => {
            *status = b'I';
            "COMMIT"
        }
        "ROLLBACK" | "ABORT" => {
            *status = b'I';
            "ROLLBACK"
        }
        "UPDATE" => "UPDATE 1",
        "INSERT" => "INSERT 0 1",
        "DELETE" => "DELETE 1",
        "DISCARD" => "DISCARD ALL",
        "DEALLOCATE" => "DEALLOCATE ALL",
        "RESET" => "RESET",
        "SET" => "SET",
        "LISTEN" => "LISTEN",
        "UNLISTEN" => "UNLISTEN",
        "VACUUM" => "VACUUM",
        "TRUNCATE" => "TRUNCATE TABLE",
        _ => "SELECT 0",
    };
    put_msg(out, b'C', |b| put_cstr(b, tag));
}

/// `SET [SESSION] name = value` / `TO value` of a parameter PostgreSQL reports: its
/// ParameterStatus, as PostgreSQL sends it (PgBouncer keeps a server connection's values
/// from these, and would otherwise SET them again before every transaction).
fn report_set(out: &mut BytesMut, sql: &[u8]) {
    const REPORTED: [&str; 9] = [
        "application_name",
        "client_encoding",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "standard_conforming_strings",
        "integer_datetimes",
        "is_superuser",
        "server_version",
    ];
    let text = String::from_utf8_lossy(&sql[3..]);
    let mut rest = text.trim_start();
    if rest.len() >= 8 && rest[..8].eq_ignore_ascii_case("session ") {
        rest = rest[8..].trim_start();
    }
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let (name, mut value) = (&rest[..end], rest[end..].trim_start());
    if let Some(v) = value.strip_prefix('=') {
        value = v;
    } else if value.len() >= 3 && value[..3].eq_ignore_ascii_case("to ") {
        value = &value[3..];
    }
    let value = value.trim().trim_matches('\'');
    if let Some(name) = REPORTED.iter().find(|r| r.eq_ignore_ascii_case(name)) {
        put_msg(out, b'S', |b| {
            put_cstr(b, name);
            put_cstr(b, value);
        });
    }
}

/// For a SELECT (or VALUES/SHOW), the number of columns: top-level commas + 1.
fn select_columns(sql: &[u8]) -> Option<usize> {
    let sql = trim(sql);
    let w = first_word(sql);
    if w == "SHOW" {
        return Some(1);
    }
    if w != "SELECT" {
        return None;
    }
    let (mut depth, mut quote, mut n) = (0i32, false, 1);
    let mut i = 6;
    while i < sql.len() {
        let c = sql[i];
        if quote {
            if c == b'\'' {
                quote = false;
            }
        } else {
            match c {
                b'\'' => quote = true,
                b'(' => depth += 1,
                b')' => depth -= 1,
                b',' if depth == 0 => n += 1,
                _ if depth == 0
                    && sql.len() > i + 4
                    && sql[i - 1].is_ascii_whitespace()
                    && sql[i..i + 4].eq_ignore_ascii_case(b"from")
                    && sql[i + 4].is_ascii_whitespace() =>
                {
                    break;
                }
                _ => {}
            }
        }
        i += 1;
    }
    Some(n)
}

fn put_row_description(out: &mut BytesMut, n: usize) {
    put_msg(out, b'T', |b| {
        b.put_i16(n as i16);
        for _ in 0..n {
            put_cstr(b, "?column?");
            b.put_i32(0);
            b.put_i16(0);
            b.put_i32(23); // int4
            b.put_i16(4);
            b.put_i32(-1);
            b.put_i16(0);
        }
    });
}

/// Statements of a simple Query, split on `;` outside quotes.
fn split_statements(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut quote) = (0, false);
    for (i, &c) in sql.iter().enumerate() {
        match c {
            b'\'' => quote = !quote,
            b';' if !quote => {
                parts.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&sql[start..]);
    parts.into_iter().filter(|s| !trim(s).is_empty())
}

fn first_word(sql: &[u8]) -> String {
    let sql = trim(sql);
    let end = sql
        .iter()
        .position(|c| !c.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    String::from_utf8_lossy(&sql[..end]).to_ascii_uppercase()
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

fn cstr(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn put_msg(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}
