//! Metric names and how they are recorded. Every name is a constant here and is listed, with its
//! labels and meaning, in METRICS.md; labels are low-cardinality (no topics, no users).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Open WebSocket connections (gauge).
pub const CONNECTIONS: &str = "walcast_connections";
/// Joined channels, by `kind` = public | private (gauge).
pub const CHANNELS: &str = "walcast_channels";
/// Joins, by `result` = ok | error (counter).
pub const JOINS: &str = "walcast_joins_total";
/// Refused joins, by `code` (the reason's code, e.g. `InvalidJWTToken`) (counter).
pub const JOIN_ERRORS: &str = "walcast_join_errors_total";
/// Client messages, by `kind` = heartbeat | join | leave | broadcast | presence | access_token | other | malformed (counter).
pub const MESSAGES_IN: &str = "walcast_messages_in_total";
/// Messages queued to sockets, by `kind` = broadcast | presence | postgres_changes (counter).
pub const MESSAGES_OUT: &str = "walcast_messages_out_total";
/// Frames written to sockets (counter).
pub const FRAMES_OUT: &str = "walcast_frames_out_total";
/// Bytes written to sockets (counter).
pub const BYTES_OUT: &str = "walcast_bytes_out_total";

/// The counters every socket's writer bumps, looked up in the registry once per process rather
/// than on every write (a lookup per write was 5% of a fan-out profile) and not held by each
/// socket's writer either (two handles there cost ~230 bytes per idle socket). The recorder is
/// installed at start-up, before the first socket.
pub fn frames_and_bytes_out() -> &'static (metrics::Counter, metrics::Counter) {
    static HANDLES: OnceLock<(metrics::Counter, metrics::Counter)> = OnceLock::new();
    HANDLES.get_or_init(|| (metrics::counter!(FRAMES_OUT), metrics::counter!(BYTES_OUT)))
}
/// Cluster mode: this node, by `node` = its NODE_NAME (gauge, always 1).
pub const CLUSTER_NODE: &str = "walcast_cluster_node";
/// Cluster mode: whether the connection to NATS is up (gauge, 0 or 1).
pub const CLUSTER_CONNECTED: &str = "walcast_cluster_connected";
/// Cluster mode: other nodes heard from within CLUSTER_NODE_TIMEOUT_MS (gauge).
pub const CLUSTER_PEERS: &str = "walcast_cluster_peers";
/// Cluster mode: topics this node follows on NATS (has local subscribers for) (gauge).
pub const CLUSTER_TOPICS: &str = "walcast_cluster_topics";
/// Cluster mode: messages sent to NATS, by `kind` = broadcast | presence | control | heartbeat | changes (counter).
pub const CLUSTER_MESSAGES_OUT: &str = "walcast_cluster_messages_out_total";
/// Cluster mode: messages received from other nodes, by `kind` = broadcast | presence | control | changes (counter).
pub const CLUSTER_MESSAGES_IN: &str = "walcast_cluster_messages_in_total";
/// Cluster mode: messages lost between nodes, by `reason` = publish_queue_full | changes_queue_full | publish_error | slow_consumer | malformed (counter).
pub const CLUSTER_DROPPED: &str = "walcast_cluster_dropped_total";
/// Cluster mode: connections to NATS lost (counter).
pub const CLUSTER_DISCONNECTS: &str = "walcast_cluster_disconnects_total";
/// Cluster mode: presence snapshots asked of other nodes (a topic newly followed, a gap, a reconnect) (counter).
pub const CLUSTER_RESYNCS: &str = "walcast_cluster_resyncs_total";
/// Cluster mode: whether this node streams the replication slot (holds its lock) (gauge, 0 or 1).
pub const SLOT_HOLDER: &str = "walcast_slot_holder";
/// Cluster mode: times this node took the replication slot over and started streaming it (counter).
pub const SLOT_TAKEOVERS: &str = "walcast_slot_takeovers_total";
/// Sockets closed for falling behind (counter).
pub const SLOW_CONSUMER_DISCONNECTS: &str = "walcast_slow_consumer_disconnects_total";
/// Requests refused by a rate or size limit, by `limit` (counter).
pub const RATE_LIMITED: &str = "walcast_rate_limited_total";
/// Refused WebSocket upgrades waiting out `CONNECT_ERROR_BACKOFF_MS` before their reply (gauge).
pub const REFUSED_UPGRADES_WAITING: &str = "walcast_refused_upgrades_waiting";
/// WAL received from PostgreSQL but not yet delivered, in bytes (gauge).
pub const REPLICATION_LAG_BYTES: &str = "walcast_replication_lag_bytes";
/// Age of the last delivered commit when it was delivered, in seconds (gauge).
pub const REPLICATION_LAG_SECONDS: &str = "walcast_replication_lag_seconds";
/// Whether the replication stream is connected (gauge, 0 or 1).
pub const REPLICATION_CONNECTED: &str = "walcast_replication_connected";
/// WAL the database keeps for walcast's slot (current WAL position minus the slot's
/// restart_lsn), in bytes (gauge).
pub const SLOT_RETAINED_WAL_BYTES: &str = "walcast_slot_retained_wal_bytes";
/// Gaps in the change stream told to channels, by `reason` = restart | slot_lost |
/// cluster_lost | catchup_history (counter).
pub const REPLICATION_GAPS: &str = "walcast_replication_gaps_total";
/// Row changes decoded from the stream (counter; its rate is changes per second).
pub const DECODED_CHANGES: &str = "walcast_decoded_changes_total";
/// Duration of one batched row-level-security check (histogram, seconds).
pub const AUTHZ_QUERY_SECONDS: &str = "walcast_authorization_query_seconds";
/// Claims cohorts checked per batch (histogram).
pub const AUTHZ_COHORTS: &str = "walcast_authorization_cohorts";
/// From commit to the change being queued for its subscribers (histogram, seconds).
pub const DELIVERY_LATENCY_SECONDS: &str = "walcast_delivery_latency_seconds";
/// Changes withheld from subscribers because they could not be authorized, by `reason` =
/// no_key | policy_error (counter; one per change and reason, not per subscriber).
pub const CHANGES_WITHHELD: &str = "walcast_changes_withheld_total";
/// Rows whose last change's row-check verdicts are remembered, for DELETEs and leaves (gauge).
pub const VISIBILITY_MEMORY_ROWS: &str = "walcast_visibility_memory_rows";
/// Bytes charged to the remembered verdicts (gauge; bounded by `VISIBILITY_MEMORY_BYTES`).
pub const VISIBILITY_MEMORY_BYTES: &str = "walcast_visibility_memory_bytes";
/// Remembered rows dropped to stay within `VISIBILITY_MEMORY_BYTES` (counter).
pub const VISIBILITY_MEMORY_EVICTED: &str = "walcast_visibility_memory_evicted_total";
/// DELETEs of rows under row level security, one per subscriber, by `by` = memory | exact |
/// rule and `result` = sent | withheld (counter).
pub const RLS_DELETE_DECISIONS: &str = "walcast_rls_delete_decisions_total";
/// Leave events sent: an UPDATE took a row out of an opted-in subscriber's view (counter).
pub const LEAVE_EVENTS: &str = "walcast_leave_events_total";
/// Decoded changes retained for catch-up on rejoin (gauge).
pub const CATCHUP_HISTORY_CHANGES: &str = "walcast_catchup_history_changes";
/// Bytes charged to the changes retained for catch-up (gauge).
pub const CATCHUP_HISTORY_BYTES: &str = "walcast_catchup_history_bytes";
/// Changes that left the catch-up history, by `reason` = bytes | age (counter).
pub const CATCHUP_HISTORY_EVICTED: &str = "walcast_catchup_history_evicted_total";
/// Positions of subscribers that went away without a leave, remembered now (gauge).
pub const CATCHUP_REMEMBERED: &str = "walcast_catchup_remembered";
/// Rejoins that resumed from a remembered position, by `result` = complete | gap (counter).
pub const CATCHUP_REJOINS: &str = "walcast_catchup_rejoins_total";
/// Changes replayed to rejoined channels, before their own row checks (counter).
pub const CATCHUP_REPLAYED_CHANGES: &str = "walcast_catchup_replayed_changes_total";
/// Batches whose row checks were answered, by `on` = primary | replica (counter).
pub const AUTHZ_BATCHES: &str = "walcast_authorization_batches_total";
/// Batches tried on a replica and answered by the primary instead, by `reason` = behind |
/// conflict | error | unavailable (counter).
pub const REPLICA_FALLBACKS: &str = "walcast_replica_fallbacks_total";
/// Read replicas (`DB_REPLICA_URLS`) usable for row checks now: reachable standbys of the
/// primary's system (gauge).
pub const REPLICAS_USABLE: &str = "walcast_replicas_usable";
/// Cluster mode: positions other nodes published, held here.
pub const CATCHUP_CLUSTER_POSITIONS: &str = "walcast_catchup_cluster_positions";
/// Cluster mode: rejoins resumed from a position another node published.
pub const CATCHUP_CLUSTER_RESUMES: &str = "walcast_catchup_cluster_resumes_total";

/// Every metric name, for the docs test.
pub const ALL: &[&str] = &[
    CONNECTIONS,
    CHANNELS,
    JOINS,
    JOIN_ERRORS,
    MESSAGES_IN,
    MESSAGES_OUT,
    FRAMES_OUT,
    BYTES_OUT,
    SLOW_CONSUMER_DISCONNECTS,
    RATE_LIMITED,
    REFUSED_UPGRADES_WAITING,
    REPLICATION_LAG_BYTES,
    REPLICATION_LAG_SECONDS,
    REPLICATION_CONNECTED,
    SLOT_RETAINED_WAL_BYTES,
    SLOT_HOLDER,
    SLOT_TAKEOVERS,
    REPLICATION_GAPS,
    DECODED_CHANGES,
    AUTHZ_QUERY_SECONDS,
    AUTHZ_COHORTS,
    DELIVERY_LATENCY_SECONDS,
    CHANGES_WITHHELD,
    VISIBILITY_MEMORY_ROWS,
    VISIBILITY_MEMORY_BYTES,
    VISIBILITY_MEMORY_EVICTED,
    RLS_DELETE_DECISIONS,
    LEAVE_EVENTS,
    CATCHUP_HISTORY_CHANGES,
    CATCHUP_HISTORY_BYTES,
    CATCHUP_HISTORY_EVICTED,
    CATCHUP_REMEMBERED,
    CATCHUP_REJOINS,
    CATCHUP_REPLAYED_CHANGES,
    AUTHZ_BATCHES,
    REPLICA_FALLBACKS,
    REPLICAS_USABLE,
    CATCHUP_CLUSTER_POSITIONS,
    CATCHUP_CLUSTER_RESUMES,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(AUTHZ_COHORTS.into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0],
                    )
                });
            match builder.map(|b| b.install_recorder()) {
                Ok(Ok(handle)) => {
                    describe();
                    Some(handle)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics buckets invalid");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "Open WebSocket connections");
    describe_gauge!(CHANNELS, "Joined channels by kind");
    describe_counter!(JOINS, "Channel joins by result");
    describe_counter!(JOIN_ERRORS, "Refused joins by reason code");
    describe_counter!(MESSAGES_IN, "Client messages by kind");
    describe_counter!(MESSAGES_OUT, "Messages queued to sockets by kind");
    describe_counter!(FRAMES_OUT, "Frames written to sockets");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes written to sockets");
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Sockets closed for falling behind"
    );
    describe_counter!(RATE_LIMITED, "Requests refused by a limit");
    describe_gauge!(
        REFUSED_UPGRADES_WAITING,
        "Refused upgrades waiting out the back-off"
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL received but not yet delivered"
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the last delivered commit at delivery"
    );
    describe_gauge!(REPLICATION_CONNECTED, "Replication stream connected (0/1)");
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the database keeps for the slot"
    );
    describe_gauge!(SLOT_HOLDER, "This node streams the replication slot (0/1)");
    describe_counter!(SLOT_TAKEOVERS, "Replication slot takeovers by this node");
    describe_counter!(REPLICATION_GAPS, "Gaps in the change stream by reason");
    describe_counter!(DECODED_CHANGES, "Row changes decoded from the stream");
    describe_histogram!(
        AUTHZ_QUERY_SECONDS,
        Unit::Seconds,
        "Batched RLS check duration"
    );
    describe_histogram!(AUTHZ_COHORTS, "Claims cohorts per batched RLS check");
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Commit to queued for subscribers"
    );
    describe_gauge!(CATCHUP_HISTORY_CHANGES, "Changes retained for catch-up");
    describe_gauge!(
        CATCHUP_HISTORY_BYTES,
        Unit::Bytes,
        "Bytes charged to the catch-up history"
    );
    describe_counter!(
        CATCHUP_HISTORY_EVICTED,
        "Changes evicted from the catch-up history"
    );
    describe_gauge!(CATCHUP_REMEMBERED, "Remembered subscriber positions");
    describe_gauge!(
        CATCHUP_CLUSTER_POSITIONS,
        "Catch-up positions other cluster nodes published"
    );
    describe_counter!(
        CATCHUP_CLUSTER_RESUMES,
        "Rejoins resumed from another node's position"
    );
    describe_counter!(
        CATCHUP_REJOINS,
        "Rejoins resumed from a remembered position"
    );
    describe_counter!(
        CATCHUP_REPLAYED_CHANGES,
        "Changes replayed to rejoined channels"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_doc_lists_every_metric() {
        let doc = include_str!("../METRICS.md");
        for name in super::ALL {
            assert!(
                doc.contains(&format!("`{name}`")),
                "METRICS.md does not list {name}"
            );
        }
    }
}
