//! Private channels: the user's row level security policies on `realtime.messages` decide who
//! may read (join, receive) and write (send, track) a topic, evaluated as the original does.
//!
//! - Read: in a transaction, walcast inserts probe rows for the topic (one per extension, as the
//!   table's owner), switches to the subscriber's role with its claims and `realtime.topic`,
//!   and selects them back; a row that comes back means read is allowed. Then rolls back.
//! - Write: as the subscriber, insert a probe row under a savepoint; `42501` (the policy's
//!   WITH CHECK failed) means write is denied. Then rolls back.
//!
//! Nothing is ever committed, and a policy that errors is treated as a denial.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio_postgres::types::{ToSql, Type};

use crate::auth::Claims;
use crate::db::{DbError, Pool};

/// Who is asking, about which topic.
#[derive(Clone, Debug)]
pub struct Context {
    /// The sub-topic (the topic without `realtime:`), what `realtime.topic()` returns.
    pub topic: String,
    pub role: String,
    pub claims: String,
    pub sub: String,
    /// `request.headers`: the socket's (or request's) `x-` headers as a JSON object.
    pub headers: String,
}

impl Context {
    pub fn new(topic: &str, claims: &Claims, headers: &Map<String, Value>) -> Self {
        Self {
            topic: topic.to_owned(),
            role: claims.role.clone(),
            claims: serde_json::to_string(&*claims.raw).unwrap_or_else(|_| "{}".into()),
            sub: claims.sub().unwrap_or_default().to_owned(),
            headers: Value::Object(headers.clone()).to_string(),
        }
    }
}

/// What a subscriber may do on a private topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub broadcast: bool,
    pub presence: bool,
}

impl Read {
    pub fn any(self) -> bool {
        self.broadcast || self.presence
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Write {
    pub broadcast: bool,
    pub presence: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("database unavailable for the policy check: {0}")]
    Database(#[from] DbError),
    #[error("RlsPolicyError: {0}")]
    Policy(String),
    /// `realtime.messages` is partitioned and has no partition for now: the probe row had
    /// nowhere to go. Not a denial, and not the user's policy.
    #[error("MissingPartition: Realtime was unable to find the expected messages partition")]
    MissingPartition,
}

/// The error for a failed probe statement: a missing partition is told apart (and the janitor
/// is asked to make it), anything else is the policy's.
fn probe_error(e: &tokio_postgres::Error, pool: &Arc<Pool>) -> PolicyError {
    let missing = e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::CHECK_VIOLATION
            && db.message().starts_with("no partition of relation")
    });
    if missing {
        static MAKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !MAKING.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let pool = pool.clone();
            tokio::spawn(async move {
                match crate::db::janitor::ensure_partitions(&pool).await {
                    Ok(made) => tracing::warn!(
                        ?made,
                        "MissingPartition: realtime.messages had no partition for now; made them"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "MissingPartition: could not make realtime.messages partitions")
                    }
                }
                MAKING.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
        return PolicyError::MissingPartition;
    }
    PolicyError::Policy(describe(e))
}

pub struct Checker {
    pool: Arc<Pool>,
}

const SET_CONFIG: &str =
    "SELECT set_config('role', $1, true), set_config('realtime.topic', $2, true), \
     set_config('request.jwt.claims', $3, true), set_config('request.jwt.claim.sub', $4, true), \
     set_config('request.jwt.claim.role', $1, true), set_config('request.headers', $5, true)";

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl Checker {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }

    fn set_params(ctx: &Context) -> [(&(dyn ToSql + Sync), Type); 5] {
        [
            (&ctx.role, Type::TEXT),
            (&ctx.topic, Type::TEXT),
            (&ctx.claims, Type::TEXT),
            (&ctx.sub, Type::TEXT),
            (&ctx.headers, Type::TEXT),
        ]
    }

    /// Read policies for broadcast and presence on `ctx.topic`.
    pub async fn read(&self, ctx: &Context) -> Result<Read, PolicyError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        // The probe rows get ids chosen here, so the three statements can go out in one round
        // trip; they run in this order (futures first polled in order are sent in order).
        let ids = [
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        ];
        let ids_param: Vec<&str> = ids.iter().map(String::as_str).collect();
        let insert_params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&ctx.topic, Type::TEXT),
            (&ids_param[0], Type::TEXT),
            (&ids_param[1], Type::TEXT),
        ];
        let select_params: [(&(dyn ToSql + Sync), Type); 1] = [(&ids_param, Type::TEXT_ARRAY)];
        let set_params = Self::set_params(ctx);
        let (inserted, set, rows) = tokio::join!(
            tx.query_typed(
                "INSERT INTO realtime.messages (topic, extension, id)
                 VALUES ($1, 'broadcast', $2::text::uuid), ($1, 'presence', $3::text::uuid)",
                &insert_params,
            ),
            tx.query_typed(SET_CONFIG, &set_params),
            tx.query_typed(
                "SELECT extension FROM realtime.messages WHERE id = ANY($1::text[]::uuid[])",
                &select_params,
            ),
        );
        inserted.map_err(|e| probe_error(&e, &self.pool))?;
        set.map_err(|e| PolicyError::Policy(describe(&e)))?;
        let rows = rows.map_err(|e| PolicyError::Policy(describe(&e)))?;
        let mut read = Read::default();
        for r in rows {
            match r.get::<_, &str>(0) {
                "broadcast" => read.broadcast = true,
                "presence" => read.presence = true,
                _ => {}
            }
        }
        tx.rollback().await.map_err(DbError::from)?;
        Ok(read)
    }

    /// Write policies for broadcast and presence on `ctx.topic`.
    pub async fn write(&self, ctx: &Context) -> Result<Write, PolicyError> {
        let mut client = self.pool.get().await?;
        let mut tx = client.transaction().await.map_err(DbError::from)?;
        tx.query_typed(SET_CONFIG, &Self::set_params(ctx))
            .await
            .map_err(|e| PolicyError::Policy(describe(&e)))?;
        let mut write = Write::default();
        for extension in ["broadcast", "presence"] {
            let sp = tx
                .savepoint("walcast_write_probe")
                .await
                .map_err(DbError::from)?;
            let allowed = match sp
                .execute(
                    "INSERT INTO realtime.messages (topic, extension) VALUES ($1, $2)",
                    &[&ctx.topic, &extension],
                )
                .await
            {
                Ok(_) => true,
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
                {
                    false
                }
                Err(e) => return Err(probe_error(&e, &self.pool)),
            };
            sp.rollback().await.map_err(DbError::from)?;
            match extension {
                "broadcast" => write.broadcast = allowed,
                _ => write.presence = allowed,
            }
        }
        tx.rollback().await.map_err(DbError::from)?;
        Ok(write)
    }
}

/// A stored broadcast (a `realtime.messages` row), for replay.
#[derive(Clone, Debug)]
pub struct Stored {
    pub id: String,
    pub event: String,
    /// JSON text, for JSON messages.
    pub payload: Option<String>,
    /// Raw bytes, for `realtime.send_binary` messages.
    pub binary: Option<Vec<u8>>,
}

impl Stored {
    /// The frame a replayed message goes out as, with `meta: {id, replayed: true}`: JSON
    /// messages as a `broadcast` push from the channel, binary ones as a kind-4 frame (V2 only).
    pub fn replay_frame(
        &self,
        vsn: crate::protocol::Vsn,
        join_ref: &crate::protocol::Ref,
        topic: &str,
    ) -> Option<crate::protocol::Frame> {
        let meta = serde_json::json!({"id": self.id, "replayed": true});
        match (&self.payload, &self.binary) {
            (Some(json), _) => {
                let payload: Value = serde_json::from_str(json).ok()?;
                Some(crate::protocol::encode::push(
                    vsn,
                    join_ref,
                    topic,
                    "broadcast",
                    &serde_json::json!({"event": self.event, "payload": payload, "type": "broadcast", "meta": meta}),
                ))
            }
            (None, Some(bytes)) => crate::protocol::encode::user_broadcast(
                vsn,
                topic,
                &crate::protocol::UserBroadcast {
                    event: self.event.clone(),
                    encoding: crate::protocol::Encoding::Binary,
                    payload: bytes::Bytes::from(bytes.clone()),
                    metadata: Some(bytes::Bytes::from(meta.to_string())),
                },
            ),
            (None, None) => None,
        }
    }
}

impl Checker {
    /// Stored private broadcasts of `topic` since `since_ms`, oldest first, at most `limit`.
    /// Only called once the subscriber's broadcast read policy allowed the topic.
    pub async fn replay(
        &self,
        topic: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<Stored>, PolicyError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id::text, coalesce(event, ''), payload::text, binary_payload
                   FROM realtime.messages
                  WHERE topic = $1 AND private IS TRUE AND extension = 'broadcast'
                    AND inserted_at >= (to_timestamp($2::float8 / 1000) AT TIME ZONE 'UTC')
                    AND inserted_at < (now() AT TIME ZONE 'UTC') + interval '1 minute'
                  ORDER BY inserted_at DESC
                  LIMIT $3",
                &[&topic, &(since_ms as f64), &limit],
            )
            .await
            .map_err(|e| PolicyError::Policy(describe(&e)))?;
        let mut out: Vec<Stored> = rows
            .iter()
            .map(|r| Stored {
                id: r.get(0),
                event: r.get(1),
                payload: r.get(2),
                binary: r.get(3),
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}
