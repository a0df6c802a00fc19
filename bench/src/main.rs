//! `walcast-bench`: benchmark scenarios. Each starts its own PostgreSQL (walcast's dev cluster
//! code) and a release walcast, runs the scenario and its reference side by side in the same
//! run, prints a table and writes JSON under `bench/results/`.
//!
//! Loader, walcast and PostgreSQL share this machine: every figure says so.
//!
//! This file is the command line and the dispatch; each scenario has its own module, and
//! `harness` holds what they share.

use clap::{Parser, Subcommand};

mod catchup;
mod chart;
mod chat;
mod drain;
mod failover;
mod fanout;
mod harness;
mod idle;
mod joins;
mod rls;
mod stall;

#[derive(Parser)]
#[command(about = "walcast benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Change-stream drain: N single-row transactions wait in the slot; time for walcast to
    /// deliver them all to a subscriber, against `pg_recvlogical` streaming the same changes from
    /// its own slot (the decode limit).
    Drain {
        /// Transactions to commit.
        #[arg(long, default_value_t = 20_000)]
        transactions: usize,
    },
    /// Memory per joined idle socket: the server's RSS before and after N sockets each join a
    /// channel (raise `ulimit -n` above N first).
    Idle {
        /// Sockets to open, each joined to one of 100 channels.
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
    },
    /// Live chat load: S subscribers over C conversations (`conversation_id=eq.X`), writers
    /// committing at fixed rates; latency from the writer's send to the subscriber's receipt
    /// (one clock), deliveries per second, and a check that nothing was lost or duplicated.
    Chat {
        /// Subscriber sockets, spread evenly over the conversations.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Conversations; each subscriber filters on one (`conversation_id=eq.X`).
        #[arg(long, default_value_t = 100)]
        conversations: usize,
        /// Commit rates to run, one after the other (commits per second).
        #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Writer connections.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Row level security on, one distinct user per subscriber; the same load without RLS
        /// runs first, and each policy is followed by its two references (PostgreSQL's own
        /// capacity for the same checks, and the original's per-change method).
        #[arg(long)]
        rls: bool,
        /// The read policy (or several, comma-separated, run one after the other) with --rls.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            requires = "rls",
            default_value = "participants"
        )]
        policy: Vec<rls::Policy>,
        /// Seconds each reference runs (with --rls).
        #[arg(long, default_value_t = 3.0)]
        reference_seconds: f64,
        /// With --rls: each policy also runs with a streaming replica of the database
        /// (`pg_basebackup -R` on this machine) in DB_REPLICA_URLS, with DB_CHECKS_IN_FLIGHT 1
        /// (checks on the replica) and 2 (spread over primary and replica), printed side by side
        /// with the primary alone.
        #[arg(long, requires = "rls")]
        replica: bool,
    },
    /// Broadcast fan-out against nats-server (Debian package), same subscribers, payloads and
    /// publish rates: one topic with S subscribers, and many topics with a few each.
    Fanout {
        /// Subscriber sockets (and NATS subscribers in the reference).
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Topics in the "many topics" shape (subscribers are spread over them).
        #[arg(long, default_value_t = 250)]
        topics: usize,
        /// Publish rates for the one-topic shape (messages per second).
        #[arg(long, value_delimiter = ',', default_value = "400,800,1600,2400,3200")]
        rates: Vec<u64>,
        /// Publish rates for the many-topics shape (messages per second over all topics).
        #[arg(long, value_delimiter = ',', default_value = "2000,8000,16000")]
        many_rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The p99 latency a rate must stay within to count as sustained, in ms.
        #[arg(long, default_value_t = 50.0)]
        p99_bound_ms: f64,
    },
    /// Cluster hop: one topic with S subscribers, and many topics with a few each, on 1 walcast
    /// and then spread over N walcast nodes behind nats-server (publisher on the first node);
    /// latency and sustained deliveries/s with and without the hop.
    Cluster {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Publish rates for the one-topic shape (messages per second).
        #[arg(long, value_delimiter = ',', default_value = "100,400,800")]
        rates: Vec<u64>,
        /// Topics in the many-topics shape (subscribers are spread over them).
        #[arg(long, default_value_t = 250)]
        topics: usize,
        /// Publish rates for the many-topics shape (messages per second over all topics).
        #[arg(long, value_delimiter = ',', default_value = "2000,8000,16000")]
        many_rates: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 50.0)]
        p99_bound_ms: f64,
    },
    /// Slot failover (cluster mode): N nodes with one database behind nats-server, a row
    /// committed every 10 ms, the slot holder killed (SIGKILL); time until a subscriber on a
    /// surviving node gets the first row committed after the kill, and every row checked.
    SlotFailover {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Stalled readers: S sockets on a busy topic stop reading, next to healthy readers; the
    /// server's memory, the sockets cut off, and the healthy readers' latency, against a run
    /// without stalled readers.
    Stall {
        /// Sockets that join the busy topic and then stop reading.
        #[arg(long, default_value_t = 1000)]
        stalled: usize,
        /// Sockets on the same topic that keep reading (their latency is measured).
        #[arg(long, default_value_t = 10)]
        healthy: usize,
        /// Broadcasts per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds the broadcasts run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Padding per broadcast, in bytes.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// CLIENT_OUTBOUND_QUEUE_BYTES for the run.
        #[arg(long, default_value_t = 1024 * 1024)]
        queue_bytes: usize,
    },
    /// Catch-up on rejoin: server memory per 10,000 changes retained in the history (against
    /// catch-up off), and R clients that went away rejoining at once and receiving what they
    /// missed (against a plain join).
    Catchup {
        #[arg(long, default_value_t = 10_000)]
        retained: usize,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Changes each client misses.
        #[arg(long, default_value_t = 10)]
        missed: usize,
    },
    /// Joins per second: private channels whose read policy queries a membership table, against
    /// public channels (no policy) in the same run.
    Joins {
        /// Concurrent sockets.
        #[arg(long, default_value_t = 50)]
        sockets: usize,
        /// Channels each socket joins, one after the other.
        #[arg(long, default_value_t = 20)]
        joins_per_socket: usize,
        /// Rows in the membership table the policy reads.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Drain { transactions } => drain::drain(transactions).await,
        Scenario::Chat {
            subscribers,
            conversations,
            rates,
            seconds,
            writers,
            rls,
            policy,
            reference_seconds,
            replica,
        } => {
            chat::chat(chat::ChatArgs {
                replica,
                subscribers,
                conversations,
                rates,
                seconds,
                writers,
                policies: if rls { policy } else { Vec::new() },
                reference_seconds,
            })
            .await
        }
        Scenario::Idle { sockets } => idle::idle(sockets).await,
        Scenario::Fanout {
            subscribers,
            topics,
            rates,
            many_rates,
            seconds,
            p99_bound_ms,
        } => {
            fanout::fanout(fanout::FanoutArgs {
                subscribers,
                topics_for_many: topics,
                rates,
                many_rates,
                seconds,
                p99_bound_ms,
            })
            .await
        }
        Scenario::Cluster {
            subscribers,
            nodes,
            rates,
            topics,
            many_rates,
            seconds,
            p99_bound_ms,
        } => {
            fanout::cluster(fanout::ClusterArgs {
                subscribers,
                nodes: nodes.max(1),
                rates,
                topics_for_many: topics,
                many_rates,
                seconds,
                p99_bound_ms,
            })
            .await
        }
        Scenario::SlotFailover { nodes, rounds } => {
            failover::slot_failover(failover::FailoverArgs { nodes, rounds }).await
        }
        Scenario::Stall {
            stalled,
            healthy,
            rate,
            seconds,
            payload,
            queue_bytes,
        } => {
            stall::stall(stall::StallArgs {
                stalled,
                healthy,
                rate,
                seconds,
                payload,
                queue_bytes,
            })
            .await
        }
        Scenario::Catchup {
            retained,
            clients,
            rooms,
            missed,
        } => {
            catchup::catchup(catchup::CatchupArgs {
                retained,
                clients,
                rooms,
                missed,
            })
            .await
        }
        Scenario::Joins {
            sockets,
            joins_per_socket,
            members,
        } => joins::joins(sockets, joins_per_socket, members).await,
    }
}
