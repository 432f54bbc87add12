//! Named prepared statements in transaction mode, safe across tenants.
//!
//! A client's named statements live on whichever server connection it used when it
//! prepared them; its next transaction may land elsewhere. So the proxy keeps them:
//!
//! - A [`StatementCache`] interns every statement by (tenant, query text, parameter types)
//!   and gives it a proxy-owned server name `_tp<id>`. Clients of one tenant sending the
//!   same statement share it; two tenants never do (their `search_path` differs, and a
//!   shared plan would be re-analysed on every switch or fail when their tables differ).
//! - [`ClientStatements`] maps a client's own names to interned statements (bounded).
//! - [`ServerStatements`] is what one server connection has prepared: at most
//!   `max_prepared_statements`, least recently used evicted with a Close.
//! - A [`Tracker`] runs inside the relay. On the way to the server it renames statements
//!   in Parse, Bind, Describe and Close by splicing frames (header and name are rewritten,
//!   the rest is forwarded from the client's buffer), prepares a statement the server
//!   connection lacks by injecting a Parse, and answers what the server need not see (a
//!   Parse of a statement the connection has, a Close, DEALLOCATE) itself. It queues one
//!   [`Expect`] per message the server will answer, so that on the way back it can drop
//!   replies to injected messages and put its own answers in their place in the stream.
//!   An error skips the rest of the batch, exactly as the server does, and undoes what
//!   the skipped messages would have done.
//!
//! Files: `cache.rs` (the cache and a client's names), `server_set.rs` (a connection's set
//! and the replies it owes), `tracker.rs` (the rewriter and the reply queue's verdicts),
//! `local.rs` (answers without a server), `sql.rs` (PREPARE/DEALLOCATE/DISCARD in SQL text).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;

use crate::error::PgError;
use crate::protocol::{HEADER_LEN, header, put_command_complete, put_ready_for_query};
use crate::sniff::Touched;
use crate::splice::Out;
use crate::tenant::TenantId;

/// Server-side names are this prefix and a number.
pub const PREFIX: &[u8] = b"_tp";
/// Statements one client may hold at once.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
/// Bytes of statement text (and names) one client may hold at once.
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 16 << 20;
/// Longest statement or portal name the proxy reads.
const MAX_NAME: usize = 1024;
/// Query messages up to this size are read whole to spot DEALLOCATE and DISCARD ALL.
pub const MAX_INSPECTED_QUERY: usize = 512;

mod cache;
mod local;
mod server_set;
mod sql;
mod tracker;

pub use cache::*;
pub use local::*;
pub use server_set::*;
pub use sql::*;
pub use tracker::*;

#[cfg(test)]
mod tests;
