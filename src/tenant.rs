//! Tenants: who they are, what schema they live in, their caps, and the SQL that puts a
//! server connection on their `search_path`.
//!
//! A tenant is addressed by a dense id (its index in the sorted config), so the pool can
//! keep per-tenant state in plain vectors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

use crate::config::Config;
use crate::protocol::put_query;
use crate::server::LoginId;
use crate::session_state::{RESET_SEARCH_PATH, Reset};

pub type TenantId = u32;

/// One configured tenant.
#[derive(Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub schema: String,
    /// Server connections this tenant may use at once.
    pub max_server: u32,
    /// Client connections this tenant may hold.
    pub max_clients: u32,
    /// The server login its transactions run as ([`crate::server::SHARED_LOGIN`] unless it has a
    /// `server_user`).
    pub login: LoginId,
    /// The `search_path` value, e.g. `tenant_acme, public` (a schema name that needs it is
    /// double-quoted).
    pub search_path: String,
    /// What a checkout sends for each kind of [`Reset`].
    preludes: Preludes,
    /// Client connections open now.
    pub clients: AtomicU32,
    /// Running totals and current counts, for metrics and the admin console.
    pub stats: TenantStats,
}

/// Per-tenant counters, bumped once per transaction (never per message).
#[derive(Debug, Default)]
pub struct TenantStats {
    /// Clients inside a transaction now (holding a server connection).
    pub active: AtomicU32,
    /// Clients queued for a server connection now.
    pub waiting: AtomicU32,
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub transaction_us: AtomicU64,
    pub query_us: AtomicU64,
    pub wait_us: AtomicU64,
    pub wait_timeouts: AtomicU64,
}

/// DISCARD ALL without its DEALLOCATE ALL and DISCARD PLANS (PostgreSQL documents DISCARD ALL
/// as this sequence).
const RESET_KEEPING_STATEMENTS: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; \
     UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// The messages of each reset for one tenant, made once, with the number of
/// ReadyForQuery replies each brings (the server scanner swallows them).
#[derive(Debug)]
struct Preludes {
    fresh: Bytes,
    discard: Bytes,
    keep: Bytes,
    reassert: Bytes,
    restore: Bytes,
}

impl Preludes {
    /// The preludes of a tenant whose search_path value is `search_path`.
    ///
    /// The search_path is set with `set_config`, so that PostgreSQL shows it exactly as
    /// given (`SET` would print it in its own quoting), whichever reset set it. The value
    /// comes from the config, never from a client, and travels as an `E''` literal, which
    /// reads the same whatever standard_conforming_strings a client left on the connection.
    fn new(search_path: &str) -> Preludes {
        let set = format!(
            "SELECT pg_catalog.set_config('search_path', {}, false)",
            crate::protocol::escape_literal(search_path)
        );
        let query = |sql: &str| {
            let mut b = BytesMut::new();
            put_query(&mut b, sql);
            b
        };
        let fresh = query(&set);
        // DISCARD ALL may not run inside a multi-statement query string (an implicit
        // transaction block), hence two Query messages.
        let mut discard = query("DISCARD ALL");
        discard.extend_from_slice(&fresh);
        // Without DISCARD ALL, the reset and the search_path fit in one Query message.
        let keep = query(&format!("{RESET_KEEPING_STATEMENTS}; {set}"));
        // One statement: three statements in a Query cost PostgreSQL about twice as much
        // as one. A NULL value resets the session authorization, as SET SESSION
        // AUTHORIZATION DEFAULT does.
        let reassert = query(&format!(
            "SELECT pg_catalog.set_config('session_authorization', NULL, false), \
             pg_catalog.set_config('role', 'none', false), {}",
            set.trim_start_matches("SELECT ")
        ));
        let restore = query(&format!(
            "{set} WHERE pg_catalog.current_setting('search_path') = '{RESET_SEARCH_PATH}'"
        ));
        Preludes {
            fresh: fresh.freeze(),
            discard: discard.freeze(),
            keep: keep.freeze(),
            reassert: reassert.freeze(),
            restore: restore.freeze(),
        }
    }
}

/// A schema name as an element of a search_path value: as it is when PostgreSQL would
/// read it back unchanged (lowercase letters, digits, `_`), else double-quoted.
fn path_element(schema: &str) -> String {
    let plain = schema
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        schema.to_string()
    } else {
        crate::protocol::quote_ident(schema)
    }
}

/// All configured tenants.
#[derive(Debug)]
pub struct Tenants {
    list: Vec<Tenant>,
    by_name: HashMap<String, TenantId>,
}

impl Tenants {
    pub fn from_config(config: &Config) -> Tenants {
        let mut list = Vec::with_capacity(config.tenants.len());
        let mut by_name = HashMap::with_capacity(config.tenants.len());
        let logins = config.server_logins().of_tenant;
        for (i, (name, t)) in config.tenants.iter().enumerate() {
            let id = i as TenantId;
            let search_path = config
                .tenant_defaults
                .search_path
                .replace("{schema}", &path_element(&t.schema));
            list.push(Tenant {
                id,
                name: name.clone(),
                schema: t.schema.clone(),
                max_server: config.tenant_max_server(t),
                max_clients: config.tenant_max_clients(t),
                login: logins[i],
                preludes: Preludes::new(&search_path),
                search_path,
                clients: AtomicU32::new(0),
                stats: TenantStats::default(),
            });
            by_name.insert(name.clone(), id);
        }
        Tenants { list, by_name }
    }

    pub fn get(&self, id: TenantId) -> &Tenant {
        &self.list[id as usize]
    }

    pub fn lookup(&self, name: &str) -> Option<&Tenant> {
        self.by_name.get(name).map(|&id| self.get(id))
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.list.iter()
    }
}

impl Tenant {
    /// The messages a reset sends for this tenant and how many ReadyForQuery replies they
    /// bring.
    pub fn prelude(&self, reset: Reset) -> (&[u8], u8) {
        let p = &self.preludes;
        match reset {
            Reset::None => (&[], 0),
            Reset::Fresh => (&p.fresh, 1),
            Reset::Switch | Reset::Discard => (&p.discard, 2),
            Reset::Keep => (&p.keep, 1),
            Reset::Reassert => (&p.reassert, 1),
            Reset::RestoreIfReset => (&p.restore, 1),
        }
    }

    /// Takes a client slot under this tenant's `max_client_connections`, or `None` when full.
    pub fn try_add_client(&self) -> bool {
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn remove_client(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_values_and_literals() {
        assert_eq!(path_element("tenant_acme"), "tenant_acme");
        assert_eq!(path_element("Tenant Acme"), "\"Tenant Acme\"");
        assert_eq!(path_element("a\"b"), "\"a\"\"b\"");
        assert_eq!(path_element("1st"), "\"1st\"");
    }
}
