//! postgres_changes: subscriptions from join payloads, matched against the change stream,
//! authorized per subscriber, delivered to channels. This file holds [`PgChanges`] (the state
//! the pipeline shares); each stage lives in its own module:
//!
//! - [`binding`] and [`filter`] parse what the client asked for (with the original's errors);
//! - [`prepare`] ([`PgChanges::prepare`]) checks it against the database (tables in the
//!   publication, columns the role may read, filter values cast to the column type) before it
//!   goes live;
//! - [`registry`] holds live subscriptions, indexed by equality-filter value;
//! - [`dispatch`] ([`PgChanges::dispatch`]) runs the stream: transaction state, batching,
//!   decoding rows and matching them; [`deliver`] authorizes a batch in one transaction
//!   ([`authorize`], its lookups planned as `plans` chooses), several consecutive batches at
//!   once on the delivery pool's connections, then builds each payload once per audience
//!   ([`payload`]) and sends batch after batch in commit order, then the commit is
//!   acknowledged so the slot can advance;
//! - [`visibility`] remembers who could see each row under RLS at its last change: a DELETE
//!   goes only to them (or, with `REPLICA IDENTITY FULL`, to those whose policies admit the
//!   old row; `DELETE_VISIBILITY` for the rest), and an UPDATE that takes a row out of an
//!   opted-in subscriber's view is a leave for it (see [`deliver`]);
//! - [`history`] keeps recent changes and the positions of subscribers that went away, for
//!   catch-up on rejoin;
//! - [`db_broadcast`] fans rows inserted into `realtime.messages` out as broadcasts.

pub mod authorize;
pub mod binding;
pub mod catalog;
pub mod catchup_store;
pub mod db_broadcast;
pub mod deliver;
pub mod dispatch;
pub mod filter;
pub mod history;
pub mod payload;
mod plans;
pub mod prepare;
pub mod registry;
pub mod visibility;

use std::sync::Arc;

pub use binding::BindingError;
pub use filter::FilterError;
pub use prepare::{PrepareError, SubscribeError};

use crate::db::Pool;

use authorize::Authorizer;
use catalog::Catalog;
use registry::{Cohort, Registry};

pub struct PgChanges {
    /// For work clients start (subscription checks at join and after a new token).
    pub pool: Arc<Pool>,
    /// For delivery only (the dispatcher's table descriptions, privilege and row checks): no
    /// storm of joins or token pushes can make a change wait for a connection.
    pub delivery: Arc<Pool>,
    pub catalog: Catalog,
    pub registry: Registry,
    pub authorizer: Authorizer,
    pub publication: String,
    pub max_record_bytes: usize,
    /// Recent changes and remembered positions, for catch-up on rejoin.
    pub history: history::History,
    /// `DB_CHECKS_IN_FLIGHT`: batches whose row checks run at the same time.
    pub checks_in_flight: usize,
    /// Who could see each row at its last change (for RLS DELETEs and leaves).
    pub visibility: visibility::VisibilityMemory,
    /// `DELETE_VISIBILITY`.
    pub delete_visibility: crate::config::DeleteVisibility,
}

impl PgChanges {
    pub fn new(
        pool: Arc<Pool>,
        delivery: Arc<Pool>,
        publication: String,
        max_record_bytes: usize,
        checks_in_flight: usize,
    ) -> Self {
        Self {
            catalog: Catalog::new(delivery.clone()),
            authorizer: Authorizer::new(delivery.clone()),
            registry: Registry::new(),
            pool,
            delivery,
            publication,
            max_record_bytes,
            history: history::History::new(crate::config::CatchupConfig::default()),
            checks_in_flight: checks_in_flight.max(1),
            visibility: visibility::VisibilityMemory::new(
                crate::config::DEFAULT_VISIBILITY_MEMORY_BYTES,
            ),
            delete_visibility: crate::config::DeleteVisibility::default(),
        }
    }

    /// With these `DELETE_VISIBILITY` and `VISIBILITY_MEMORY_BYTES` settings.
    pub fn with_visibility(
        mut self,
        rule: crate::config::DeleteVisibility,
        memory_bytes: usize,
    ) -> Self {
        self.visibility = visibility::VisibilityMemory::new(memory_bytes);
        self.delete_visibility = rule;
        self
    }

    /// Row checks may also run on these read replicas (`DB_REPLICA_URLS`).
    pub fn with_replicas(mut self, replicas: Arc<crate::db::replicas::Replicas>) -> Self {
        self.authorizer.set_replicas(replicas);
        self
    }

    /// With these catch-up settings.
    pub fn with_catchup(mut self, cfg: crate::config::CatchupConfig) -> Self {
        self.history = history::History::new(cfg);
        self
    }
}

/// Channels whose tokens' claims differ need separate checks; this is the key the dispatcher
/// uses, exposed for tests.
pub fn cohort_key(c: &Cohort) -> (String, String) {
    (c.role.clone(), c.claims.clone())
}

/// The cluster shares and receives catch-up positions through this (it sits below
/// postgres_changes and knows it only as this trait).
impl crate::channels::cluster::positions::SharedPositions for PgChanges {
    fn share(&self) -> std::collections::HashMap<history::Key, history::Shared> {
        self.history.share()
    }

    fn cluster_update(
        &self,
        node: u64,
        reset: bool,
        bye: bool,
        entries: Vec<(history::Key, Option<history::Shared>)>,
    ) {
        self.history.cluster_update(node, reset, bye, entries);
    }

    fn cluster_node_gone(&self, node: u64) {
        self.history.cluster_node_gone(node);
    }

    fn none_live(&self) -> bool {
        self.history.none_live()
    }
}
