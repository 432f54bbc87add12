//! The tenant directory: `[directory] query`, run by the proxy on a server connection of
//! its own (as `[server] user`, with the role's own defaults, outside the pool and its
//! `max_connections`), returns one row per tenant. It runs at start, every `refresh`, and
//! at once when a NOTIFY arrives on `listen_channel` (the connection LISTENs on it). When
//! the query or the connection fails, the last good set stays, the failure is logged and
//! counted, and the proxy connects and tries again on a backoff (250 ms doubling to 10 s);
//! the proxy serves its TOML tenants meanwhile.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;

use crate::Shared;
use crate::config::DirectoryConfig;
use crate::live::{DirRow, apply_directory};
use crate::server::{self, SHARED_LOGIN, ServerConn};

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest the query may run.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the directory until the proxy shuts down, following reloads (a new `[directory]`
/// section reconnects; none stops querying). `first` is told when the first attempt ended,
/// however it ended.
pub async fn run(shared: Arc<Shared>, first: tokio::sync::oneshot::Sender<()>) {
    let mut first = Some(first);
    let mut version = shared.live.version.subscribe();
    let mut shutdown = shared.shutdown_tx.subscribe();
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(dir) = shared.live.config().directory.clone() else {
            first.take().map(|f| f.send(()));
            tokio::select! {
                r = version.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let result = tokio::select! {
            r = session(&shared, &dir, &mut first, &mut version) => r,
            _ = shutdown.changed() => return,
        };
        match result {
            // The section changed: start again with the new one.
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                first.take().map(|f| f.send(()));
                shared.metrics.live.directory_error.increment(1);
                if e != last_error {
                    tracing::warn!(error = %e, retry_in = ?backoff, "directory query failed; the last good tenant set stays");
                    last_error = e;
                } else {
                    tracing::debug!(error = %e, retry_in = ?backoff, "directory query failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    r = version.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        last_error.clear();
    }
}

/// One connection's life: LISTEN, then query, apply and wait, until it fails (`Err`) or the
/// `[directory]` section changes (`Ok`).
async fn session(
    shared: &Shared,
    dir: &DirectoryConfig,
    first: &mut Option<tokio::sync::oneshot::Sender<()>>,
    version: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(), String> {
    let target = shared.pools.default().target();
    let mut conn = server::connect_plain(&target, SHARED_LOGIN).await?.conn;
    if let Some(channel) = &dir.listen_channel {
        let sql = format!("LISTEN {}", crate::protocol::quote_ident(channel));
        let mut out = BytesMut::new();
        crate::protocol::put_query(&mut out, &sql);
        conn.run_queries(&out, 1).await.map_err(|e| match e {
            Some((code, msg)) => format!("{sql}: {msg} ({code})"),
            None => format!("{sql}: connection lost"),
        })?;
    }
    version.borrow_and_update();
    let result = async {
        loop {
            let rows = query(&mut conn, &dir.query).await?;
            let n = rows.len();
            apply_directory(shared, rows);
            shared.metrics.live.directory_ok.increment(1);
            shared
                .metrics
                .live
                .directory_last
                .set(crate::metrics::unix_now());
            tracing::debug!(rows = n, "directory refreshed");
            first.take().map(|f| f.send(()));
            tokio::select! {
                () = tokio::time::sleep(dir.refresh.0) => {}
                r = notified(&mut conn) => r?,
                r = version.changed() => {
                    if r.is_err() || shared.live.config().directory.as_ref() != Some(dir) {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    conn.terminate();
    result
}

/// Waits for a NotificationResponse (any number of them count as one).
async fn notified(conn: &mut ServerConn) -> Result<(), String> {
    loop {
        let mut got = false;
        while let Some(msg) =
            Message::parse(&mut conn.buf).map_err(|e| format!("bad message from server: {e}"))?
        {
            match msg {
                Message::NotificationResponse(_) => got = true,
                Message::ErrorResponse(b) => return Err(error_text(&b)),
                _ => {}
            }
        }
        if got {
            return Ok(());
        }
        conn.buf.reserve(4096);
        match conn.read_more().await {
            Ok(0) => return Err("server closed the directory connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("directory connection: {e}")),
        }
    }
}

fn error_text(b: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    let (mut code, mut text) = (String::new(), String::new());
    let mut fields = b.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into(),
            b'M' => text = String::from_utf8_lossy(f.value_bytes()).into(),
            _ => {}
        }
    }
    format!("{text} ({code})")
}

/// Runs the directory query and reads its rows by column name.
async fn query(conn: &mut ServerConn, sql: &str) -> Result<Vec<DirRow>, String> {
    let mut out = BytesMut::new();
    crate::protocol::put_query(&mut out, sql);
    let work = async {
        use tokio::io::AsyncWriteExt;
        conn.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("directory connection: {e}"))?;
        // Column positions of tenant, schema, plan, domain, settings, server, database.
        let mut cols: [Option<usize>; 7] = [None; 7];
        let mut described = false;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = match Message::parse(&mut conn.buf)
                .map_err(|e| format!("bad message from server: {e}"))?
            {
                Some(m) => m,
                None => {
                    conn.buf.reserve(8192);
                    match conn.read_more().await {
                        Ok(0) => return Err("server closed the directory connection".into()),
                        Ok(_) => continue,
                        Err(e) => return Err(format!("directory connection: {e}")),
                    }
                }
            };
            match msg {
                Message::RowDescription(body) if !described => {
                    described = true;
                    let mut fields = body.fields();
                    let mut i = 0;
                    while let Some(f) = fallible_iterator::FallibleIterator::next(&mut fields)
                        .map_err(|e| e.to_string())?
                    {
                        let slot = match f.name() {
                            "tenant" => 0,
                            "schema" => 1,
                            "plan" => 2,
                            "domain" => 3,
                            "settings" => 4,
                            "server" => 5,
                            "database" => 6,
                            _ => 7,
                        };
                        if slot < 7 && cols[slot].is_none() {
                            cols[slot] = Some(i);
                        }
                        i += 1;
                    }
                    if cols[0].is_none() || cols[1].is_none() {
                        error = Some(
                            "directory.query must return columns named tenant and schema".into(),
                        );
                    }
                }
                Message::DataRow(body) if described && error.is_none() => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut values: Vec<Option<String>> = Vec::new();
                    while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)
                        .map_err(|e| e.to_string())?
                    {
                        values.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    let get = |slot: usize| cols[slot].and_then(|i| values.get(i).cloned()?);
                    rows.push(DirRow {
                        tenant: get(0),
                        schema: get(1),
                        plan: get(2),
                        domain: get(3),
                        settings: get(4),
                        server: get(5),
                        database: get(6),
                    });
                }
                Message::ErrorResponse(b) if error.is_none() => {
                    error = Some(format!("directory.query failed: {}", error_text(&b)));
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None if !described => {
                            Err("directory.query returned no rows description".into())
                        }
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "directory.query took longer than {QUERY_TIMEOUT:?}"
            ))
        })
}
