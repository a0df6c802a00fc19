//! What walcast knows about types and tables: type names and conversions by OID (the whole of
//! `pg_type`, reloaded when an unknown OID shows up), and per-relation column layouts from
//! pgoutput Relation messages completed with the primary key and the RLS flag.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::db::{DbError, Pool};
use crate::replication::pgoutput::Relation;
use crate::replication::values::Conv;

use super::filter::Kind;

#[derive(Clone, Debug)]
struct PgType {
    name: String,
    typtype: u8,
    category: u8,
    elem: u32,
    base: u32,
    delim: u8,
}

pub struct Catalog {
    pool: Arc<Pool>,
    types: RwLock<HashMap<u32, PgType>>,
}

/// A table as the change stream describes it.
#[derive(Debug)]
pub struct TableInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `f` full, `n` nothing, `i` index.
    pub replica_identity: u8,
    /// The columns pgoutput sends, in its order (attnum order).
    pub columns: Vec<ColumnInfo>,
    pub rls: bool,
    pub has_pk: bool,
    /// Primary key columns with their SQL type (as `format_type` prints it), in key order.
    pub pk: Vec<(String, String)>,
    /// `realtime.messages` or one of its partitions: its inserts are broadcasts from the
    /// database.
    pub stored_broadcasts: bool,
}

impl TableInfo {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[derive(Debug)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
    /// `pg_type.typname`, as the `columns` list of an event shows it.
    pub typname: String,
    pub conv: Conv,
    /// Part of the replica identity key (pgoutput's flag).
    pub key: bool,
    pub pk: bool,
}

impl Catalog {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            types: RwLock::new(HashMap::new()),
        }
    }

    pub async fn load_types(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT oid, typname::text, typtype, typcategory, typelem, typbasetype, typdelim FROM pg_type",
                &[],
            )
            .await?;
        let mut map = HashMap::with_capacity(rows.len());
        for r in rows {
            let oid: u32 = r.get(0);
            map.insert(
                oid,
                PgType {
                    name: r.get(1),
                    typtype: r.get::<_, i8>(2) as u8,
                    category: r.get::<_, i8>(3) as u8,
                    elem: r.get(4),
                    base: r.get(5),
                    delim: r.get::<_, i8>(6) as u8,
                },
            );
        }
        *self.types.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    fn get(&self, oid: u32) -> Option<PgType> {
        self.types
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&oid)
            .cloned()
    }

    /// Makes sure `oids` are known, reloading `pg_type` once if one is not.
    pub async fn ensure_types(&self, oids: impl IntoIterator<Item = u32>) -> Result<(), DbError> {
        let missing = {
            let types = self.types.read().unwrap_or_else(|p| p.into_inner());
            oids.into_iter().any(|o| !types.contains_key(&o))
        };
        if missing {
            self.load_types().await?;
        }
        Ok(())
    }

    pub fn type_name(&self, oid: u32) -> String {
        self.get(oid)
            .map(|t| t.name)
            .unwrap_or_else(|| oid.to_string())
    }

    /// How values of this type become JSON (domains resolve to their base type).
    pub fn conv(&self, oid: u32) -> Conv {
        self.conv_depth(oid, 0)
    }

    fn conv_depth(&self, oid: u32, depth: u8) -> Conv {
        match oid {
            16 => return Conv::Bool,
            20 | 21 | 23 => return Conv::Integer,
            700 | 701 | 1700 => return Conv::Number,
            114 => return Conv::Json,
            3802 => return Conv::Jsonb,
            17 => return Conv::Bytea,
            1082 => return Conv::Date,
            1114 => return Conv::Timestamp,
            1184 => return Conv::Timestamptz,
            _ => {}
        }
        let Some(t) = self.get(oid) else {
            return Conv::Text;
        };
        if depth > 8 {
            return Conv::Text;
        }
        if t.typtype == b'd' && t.base != 0 {
            return self.conv_depth(t.base, depth + 1);
        }
        if t.category == b'A' && t.elem != 0 && t.name.starts_with('_') {
            let delim = self.get(t.elem).map(|e| e.delim).unwrap_or(b',');
            return Conv::Array(Box::new(self.conv_depth(t.elem, depth + 1)), delim);
        }
        Conv::Text
    }

    /// How values of this type compare in filters. `client` looks up enum labels: it is the
    /// connection of the subscription check asking, so that checks never use delivery's pool.
    pub async fn kind(&self, client: &tokio_postgres::Client, oid: u32) -> Result<Kind, DbError> {
        let mut oid = oid;
        for _ in 0..8 {
            let kind = match oid {
                20 | 21 | 23 | 26 => Kind::Int,
                1700 => Kind::Numeric,
                700 | 701 => Kind::Float,
                16 => Kind::Bool,
                25 | 1043 | 19 => Kind::Text,
                1042 => Kind::BpChar,
                1114 | 1184 => Kind::Timestamp,
                1082 => Kind::Date,
                1083 => Kind::Time,
                _ => {
                    let Some(t) = self.get(oid) else {
                        return Ok(Kind::Canonical);
                    };
                    if t.typtype == b'd' && t.base != 0 {
                        oid = t.base;
                        continue;
                    }
                    if t.typtype == b'e' {
                        let rows = client
                            .query(
                                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                                &[&oid],
                            )
                            .await?;
                        return Ok(Kind::Enum(rows.iter().map(|r| r.get(0)).collect()));
                    }
                    if t.name == "citext" {
                        Kind::CiText
                    } else {
                        Kind::Canonical
                    }
                }
            };
            return Ok(kind);
        }
        Ok(Kind::Canonical)
    }

    /// Builds a table's description from a Relation message.
    pub async fn table_from_relation(&self, rel: &Relation) -> Result<TableInfo, DbError> {
        self.ensure_types(rel.columns.iter().map(|c| c.type_oid))
            .await?;
        let client = self.pool.get().await?;
        let pk_rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL)
                   FROM pg_index i
                   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                  WHERE i.indrelid = $1 AND i.indisprimary
                  ORDER BY k.ord",
                &[&rel.oid],
            )
            .await?;
        let pk_typed: Vec<(String, String)> =
            pk_rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let pk: Vec<String> = pk_typed.iter().map(|(n, _)| n.clone()).collect();
        let class = client
            .query_opt(
                "SELECT c.relrowsecurity,
                        coalesce((SELECT n.nspname = 'realtime' AND r.relname = 'messages'
                                    FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                                   WHERE r.oid = pg_partition_root(c.oid)), false)
                   FROM pg_class c WHERE c.oid = $1",
                &[&rel.oid],
            )
            .await?;
        let rls = class.as_ref().is_none_or(|r| r.get::<_, bool>(0));
        // A relation gone since (a dropped partition) is known by its name.
        let stored_broadcasts = rel.namespace == "realtime"
            && (rel.name == "messages"
                || class.as_ref().map_or_else(
                    || is_daily_partition_name(&rel.name),
                    |r| r.get::<_, bool>(1),
                ));
        let columns: Vec<ColumnInfo> = rel
            .columns
            .iter()
            .map(|c| ColumnInfo {
                name: c.name.clone(),
                type_oid: c.type_oid,
                typname: self.type_name(c.type_oid),
                conv: self.conv(c.type_oid),
                key: c.key,
                pk: pk.contains(&c.name),
            })
            .collect();
        Ok(TableInfo {
            oid: rel.oid,
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
            replica_identity: rel.replica_identity,
            has_pk: !pk.is_empty() && pk.iter().all(|p| columns.iter().any(|c| &c.name == p)),
            columns,
            rls,
            pk: pk_typed,
            stored_broadcasts,
        })
    }
}

/// `messages_YYYY_MM_DD`: the original's name for a daily partition of `realtime.messages`.
fn is_daily_partition_name(name: &str) -> bool {
    let Some(date) = name.strip_prefix("messages_") else {
        return false;
    };
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'_',
            _ => c.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn daily_partition_names() {
        assert!(super::is_daily_partition_name("messages_2026_11_29"));
        for n in [
            "messages",
            "messages_2026_11_2",
            "messages_2026-11-29",
            "other_2026_11_29",
        ] {
            assert!(!super::is_daily_partition_name(n), "{n}");
        }
    }
}
