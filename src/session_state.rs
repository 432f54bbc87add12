//! The session state a server connection carries from one transaction to the next, and
//! what a checkout must send first so that the next transaction runs on its tenant's
//! search_path, as the server role, with its client's settings, and with nothing another
//! client left behind. Every tenant-switch decision is made here, in [`SessionState::begin`].
//!
//! The rules (docs/security.md says what they guarantee):
//!
//! * a fresh connection gets the tenant's search_path;
//! * a connection that carried another tenant is wiped with `DISCARD ALL` (its prepared
//!   statements go too: a client of one tenant could otherwise have replaced them) and gets
//!   the tenant's search_path;
//! * a connection on which a client may have left session state ([`sniff::STATE`]) is
//!   wiped before any *other* client uses it (keeping the statements the proxy tracks, which
//!   belong to the same tenant);
//! * a connection on which the search_path or the role may have changed ([`sniff::PATH`])
//!   gets them set again before its next transaction, whoever runs it; with
//!   `reset_path_and_role = "always"`, before every transaction;
//! * in session mode the client owns its session: its own `SET search_path` or `SET ROLE`
//!   hold, and only a reset (which sends the search_path to the empty-resolving value the
//!   proxy opens connections with) brings back the tenant's.

use std::sync::Arc;

use crate::settings::Settings;
use crate::sniff::{PATH, STATE, STATEMENTS, Touched};
use crate::tenant::TenantId;

/// The search_path every server connection is opened with, which RESET, DISCARD ALL and
/// `SET search_path TO DEFAULT` go back to. Schema names beginning with `pg_` are
/// reserved, so it can never resolve to a schema: unqualified names fail loudly after a
/// reset instead of landing in `public`.
pub const RESET_SEARCH_PATH: &str = "pg_tenantpool_reset";

/// What a checkout sends before the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// Nothing: the connection is as the client needs it.
    None,
    /// A fresh connection: the tenant's search_path.
    Fresh,
    /// The connection carried another tenant: DISCARD ALL and the search_path.
    Switch,
    /// Another client of the tenant may have left state: DISCARD ALL and the search_path.
    Discard,
    /// The same, but keeping the statements the proxy tracks: what DISCARD ALL does except
    /// DEALLOCATE ALL and DISCARD PLANS, and the search_path.
    Keep,
    /// Session authorization, role and search_path set again.
    Reassert,
    /// Session mode: the tenant's search_path again if a reset sent it to
    /// [`RESET_SEARCH_PATH`]; a client's own `SET search_path` stays.
    RestoreIfReset,
}

impl Reset {
    /// Does it drop the server's prepared statements?
    pub fn drops_statements(self) -> bool {
        matches!(self, Reset::Switch | Reset::Discard)
    }

    /// Does it put every setting back to the server's defaults?
    pub fn clears_settings(self) -> bool {
        matches!(
            self,
            Reset::Fresh | Reset::Switch | Reset::Discard | Reset::Keep
        )
    }
}

/// How the proxy is configured to reset.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub session_mode: bool,
    /// `reset_path_and_role = "always"`.
    pub always: bool,
    /// `max_prepared_statements` > 0: the proxy tracks named statements.
    pub tracking: bool,
}

/// What a server connection carries between transactions.
#[derive(Debug, Default)]
pub struct SessionState {
    /// The tenant whose search_path it carries; `None` when fresh.
    tenant: Option<TenantId>,
    /// The generation of that tenant's search_path and settings it carries (see
    /// [`crate::tenant::Spec::generation`]): another one is reset as a tenant switch.
    generation: u64,
    /// The client settings applied on it: `Some(empty)` for the server's defaults (fresh
    /// or just reset), `None` when unknown (a client ran RESET).
    pub settings: Option<Arc<Settings>>,
    /// The client that ran the last transaction on it.
    last_client: u64,
    /// A client may have left session state: another client gets a full reset first.
    dirty: bool,
    /// The search_path or role may differ from the tenant's: set again before the next
    /// transaction.
    unsure_path: bool,
    /// Statements the proxy does not track may be on it (SQL PREPARE), and running them
    /// may change anything: the search_path and role are set again before every
    /// transaction, and a reset is a full DISCARD ALL.
    untracked: bool,
}

impl SessionState {
    /// The tenant whose search_path the connection carries.
    pub fn tenant(&self) -> Option<TenantId> {
        self.tenant
    }

    /// May the connection hold SQL-level prepared statements (a client's `PREPARE`)?
    pub fn untracked(&self) -> bool {
        self.untracked
    }

    /// Decides what the connection needs before a transaction of `client` of `tenant`
    /// (`tracked`: it holds statements the proxy tracks), and records that it will have
    /// it once the returned reset has run. Settings are left to the caller.
    pub fn begin(
        &mut self,
        tenant: TenantId,
        generation: u64,
        client: u64,
        policy: Policy,
        tracked: bool,
    ) -> Reset {
        let reset = match self.tenant {
            None => Reset::Fresh,
            Some(t) if t != tenant => Reset::Switch,
            // The tenant's search_path or settings changed (a reload, the directory): as a
            // switch; in session mode the client's session stays, and gets the tenant's
            // settings (and its search_path after a reset).
            Some(_) if self.generation != generation && !policy.session_mode => Reset::Switch,
            Some(_) if self.generation != generation => {
                self.generation = generation;
                Reset::RestoreIfReset
            }
            Some(_) if self.dirty && self.last_client != client => {
                if policy.tracking && tracked && !self.untracked {
                    Reset::Keep
                } else {
                    Reset::Discard
                }
            }
            Some(_) if policy.session_mode => {
                if self.unsure_path {
                    Reset::RestoreIfReset
                } else {
                    Reset::None
                }
            }
            Some(_) if self.unsure_path || self.untracked || policy.always => Reset::Reassert,
            Some(_) => Reset::None,
        };
        if reset != Reset::None {
            self.unsure_path = false;
        }
        if reset.clears_settings() {
            self.tenant = Some(tenant);
            self.generation = generation;
            self.dirty = false;
        }
        if reset.drops_statements() || reset == Reset::Fresh {
            self.untracked = false;
        }
        self.last_client = client;
        reset
    }

    /// Records what a transaction may have touched (see [`crate::sniff`]). In session mode
    /// the next client always gets a full reset.
    pub fn end(&mut self, touched: Touched, session_mode: bool) {
        self.dirty |= touched & (STATE | STATEMENTS) != 0 || session_mode;
        self.unsure_path |= touched & PATH != 0;
        self.untracked |= touched & STATEMENTS != 0;
    }

    /// A failed reset: nothing about the connection is known.
    pub fn forget(&mut self) {
        *self = SessionState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX: Policy = Policy {
        session_mode: false,
        always: false,
        tracking: true,
    };

    #[test]
    fn switches_wipe_and_same_client_state_is_reasserted() {
        let mut s = SessionState::default();
        assert_eq!(s.begin(0, 1, 1, TX, false), Reset::Fresh);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 2, TX, false), Reset::None);
        s.end(PATH, false);
        // The search_path may have moved: set again, whoever comes next.
        assert_eq!(s.begin(0, 1, 2, TX, false), Reset::Reassert);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 3, TX, false), Reset::None);
        s.end(STATE | PATH, false);
        assert_eq!(s.begin(0, 1, 3, TX, false), Reset::Reassert);
        s.end(0, false);
        // Another client gets the full reset; with tracked statements they are kept.
        assert_eq!(s.begin(0, 1, 4, TX, true), Reset::Keep);
        s.end(0, false);
        assert_eq!(s.begin(1, 1, 4, TX, true), Reset::Switch);
        s.end(0, false);
        assert_eq!(s.begin(1, 1, 4, TX, true), Reset::None);
        // The tenant's search_path or settings changed (a reload): reset as a switch.
        assert_eq!(s.begin(1, 2, 4, TX, true), Reset::Switch);
        s.end(0, false);
        assert_eq!(s.begin(1, 2, 4, TX, true), Reset::None);
    }

    #[test]
    fn untracked_statements_reassert_every_time_until_discarded() {
        let mut s = SessionState::default();
        s.begin(0, 1, 1, TX, false);
        s.end(STATE | STATEMENTS, false);
        assert_eq!(s.begin(0, 1, 1, TX, true), Reset::Reassert);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 1, TX, true), Reset::Reassert);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 2, TX, true), Reset::Discard);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 2, TX, true), Reset::None);
    }

    #[test]
    fn always_reasserts_and_session_mode_restores_only_after_a_reset() {
        let always = Policy { always: true, ..TX };
        let mut s = SessionState::default();
        s.begin(0, 1, 1, always, false);
        s.end(0, false);
        assert_eq!(s.begin(0, 1, 1, always, false), Reset::Reassert);
        let session = Policy {
            session_mode: true,
            ..TX
        };
        let mut s = SessionState::default();
        assert_eq!(s.begin(0, 1, 1, session, false), Reset::Fresh);
        s.end(0, true);
        assert_eq!(s.begin(0, 1, 1, session, false), Reset::None);
        s.end(PATH | STATE, true);
        assert_eq!(s.begin(0, 1, 1, session, false), Reset::RestoreIfReset);
        s.end(0, true);
        assert_eq!(s.begin(0, 1, 2, session, false), Reset::Discard);
    }
}
