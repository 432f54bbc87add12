//! Checks the server roles tenantpool logs in as for what weakens the isolation between
//! tenants (docs/security.md): a superuser or CREATEROLE role, roles it may `SET ROLE` to,
//! and tables reachable through a default search_path. `tenantpool check` prints the
//! findings; the proxy logs them at start-up. They are warnings: the proxy runs anyway.

use std::collections::BTreeSet;

use crate::config::Config;
use crate::server::{self, LoginId, ServerConn, ServerTarget};

/// One query for everything about the role itself: superuser or CREATEROLE, and the roles
/// it is a member of (it may `SET ROLE` to them), besides the implicit pg_database_owner.
const ROLE_SQL: &str = "SELECT r.rolsuper::text, r.rolcreaterole::text, \
     (SELECT string_agg(m.rolname, ', ' ORDER BY m.rolname) FROM pg_catalog.pg_roles m \
      WHERE m.oid <> r.oid AND m.rolname <> 'pg_database_owner' \
        AND pg_catalog.pg_has_role(r.oid, m.oid, 'MEMBER')) \
     FROM pg_catalog.pg_roles r WHERE r.rolname = current_user";

/// The schemas of the current search_path that exist, each with how many tables, views
/// and the like it holds.
const PATH_SQL: &str = "SELECT pg_catalog.current_setting('search_path'), n.nspname, \
     (SELECT count(*) FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid \
        AND c.relkind IN ('r', 'p', 'v', 'm', 'f'))::text \
     FROM unnest(pg_catalog.current_schemas(false)) AS s(name) \
     JOIN pg_catalog.pg_namespace n ON n.nspname = s.name";

/// The role's own rights: superuser, CREATEROLE, roles it may become.
async fn role_warnings(conn: &mut ServerConn, user: &str) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let rows = conn.query_rows(ROLE_SQL).await?;
    if let Some(row) = rows.first() {
        let yes = |i: usize| row.get(i).and_then(|v| v.as_deref()) == Some("true");
        if yes(0) {
            warnings.push(format!(
                "server role \"{user}\" is a superuser: within a transaction a client can SET SESSION AUTHORIZATION to any role and read every tenant's data; use a role without SUPERUSER"
            ));
        } else if yes(1) {
            warnings.push(format!(
                "server role \"{user}\" has CREATEROLE: a client can grant it other roles and SET ROLE to them; use a role without CREATEROLE"
            ));
        }
        if let Some(Some(roles)) = row.get(2) {
            warnings.push(format!(
                "server role \"{user}\" may SET ROLE to {roles}: within a transaction a client can take their rights (tenantpool resets the role before the next one); REVOKE them from \"{user}\" unless a tenant needs them"
            ));
        }
    }
    Ok(warnings)
}

/// Tables reachable through the role's default search_path (`conn` must start with the
/// role's defaults: [`server::connect_plain`]).
async fn default_path_warnings(conn: &mut ServerConn, user: &str) -> Result<Vec<String>, String> {
    let holding: Vec<String> = conn
        .query_rows(PATH_SQL)
        .await?
        .into_iter()
        .filter_map(|r| {
            let n: u64 = r.get(2)?.as_deref()?.parse().ok()?;
            let schema = r.get(1)?.as_deref()?;
            (n > 0).then(|| format!("{schema} ({n} tables)"))
        })
        .collect();
    if holding.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![format!(
        "server role \"{user}\"'s default search_path resolves to {}: tenantpool's own connections never use it (they start on search_path {}), but anything connecting as \"{user}\" directly does; keep tenant data out of those schemas",
        holding.join(", "),
        crate::session_state::RESET_SEARCH_PATH
    )])
}

/// Schemas other than the tenant's own that `tenant_defaults.search_path` names and that
/// hold tables: a name missing from a tenant's schema resolves there.
async fn fallback_warnings(conn: &mut ServerConn, config: &Config) -> Result<Vec<String>, String> {
    let others: BTreeSet<String> = config
        .tenant_defaults
        .search_path
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.contains("{schema}") && !s.is_empty() && !s.contains('$'))
        .map(|s| s.trim_matches('"').to_string())
        .collect();
    let mut warnings = Vec::new();
    for schema in others {
        let sql = format!(
            "SELECT count(*)::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            crate::protocol::escape_literal(&schema)
        );
        let n: u64 = conn
            .query_rows(&sql)
            .await?
            .first()
            .and_then(|r| r.first()?.as_deref()?.parse().ok())
            .unwrap_or(0);
        if n > 0 {
            warnings.push(format!(
                "tenant_defaults.search_path falls back to schema {schema}, which holds {n} tables: a name missing from a tenant's schema resolves there, for every tenant"
            ));
        }
    }
    Ok(warnings)
}

/// Every warning about the server roles of `config`, each checked on a connection of its
/// own that starts with the role's defaults (for `tenantpool check`, not the running
/// proxy: these connections are outside the pool). A role that cannot be checked (the
/// server is down, a password is wrong) is reported as such.
pub async fn server_roles(config: &Config) -> Vec<String> {
    let target = match ServerTarget::from_config(config) {
        Ok(t) => t,
        Err(e) => return vec![format!("could not check the server roles: {e}")],
    };
    let mut warnings = Vec::new();
    for login in 0..target.logins.len() as LoginId {
        let user = &target.login(login).user;
        let checked = async {
            let mut conn = server::connect_plain(&target, login).await?.conn;
            let mut w = role_warnings(&mut conn, user).await?;
            w.extend(default_path_warnings(&mut conn, user).await?);
            if login == server::SHARED_LOGIN {
                w.extend(fallback_warnings(&mut conn, config).await?);
            }
            conn.terminate();
            Ok::<_, String>(w)
        };
        match checked.await {
            Ok(w) => warnings.extend(w),
            Err(e) => warnings.push(format!("could not check server role \"{user}\": {e}")),
        }
    }
    // Each other server's own user, in its database (tenants' own logins there are the
    // same roles as above, checked on [server]).
    let (logins, _) = crate::placement::merge_logins(&[], config);
    for (name, s) in &config.servers {
        let place = crate::placement::Place {
            server: name.clone(),
            database: s.database.clone(),
        };
        let checked = async {
            let target = crate::placement::target_of(config, &place, &logins)?;
            let mut conn = server::connect_plain(&target, server::SHARED_LOGIN)
                .await?
                .conn;
            let mut w = role_warnings(&mut conn, &s.user).await?;
            w.extend(default_path_warnings(&mut conn, &s.user).await?);
            conn.terminate();
            Ok::<_, String>(w)
        };
        match checked.await {
            Ok(w) => warnings.extend(w.into_iter().map(|w| format!("servers.{name}: {w}"))),
            Err(e) => warnings.push(format!(
                "could not check server role \"{}\" on servers.{name}: {e}",
                s.user
            )),
        }
    }
    warnings
}

/// The running proxy's check: each login's rights and the search_path fallback, on a
/// connection taken from the pool (so `server.max_connections` holds), given back as it was.
pub async fn pool_roles(shared: &crate::Shared) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut seen = BTreeSet::new();
    for tenant in shared.tenants.iter() {
        // Once per login on each server and database (place).
        if !seen.insert((tenant.place(), tenant.login())) {
            continue;
        }
        let pool = shared.pools.of(tenant);
        let user = pool.target().login(tenant.login()).user.clone();
        let wait = shared.config.limits.query_wait_timeout.0;
        let checked = async {
            let mut conn = pool
                .checkout(tenant.id, wait)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let mut w = role_warnings(&mut conn, &user).await?;
            if tenant.login() == server::SHARED_LOGIN {
                w.extend(fallback_warnings(&mut conn, &shared.config).await?);
            }
            let clean = conn.buf.is_empty();
            conn.set_clean(clean);
            Ok::<_, String>(w)
        };
        match checked.await {
            Ok(w) => warnings.extend(w),
            Err(e) => warnings.push(format!("could not check server role \"{user}\": {e}")),
        }
    }
    warnings
}
