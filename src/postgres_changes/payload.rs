//! The `data` object of a postgres_changes event, in the original's shape:
//! `{schema, table, commit_timestamp, type, columns, record?, old_record?, errors}`.

use std::collections::HashSet;

use bytes::Bytes;

use crate::replication::values::{self, push_json, push_json_string};

use super::binding::Action;
use super::catalog::TableInfo;

/// One column of a row image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowCell {
    /// Not part of this image: an unchanged TOAST value, or a non-key column of a key-only
    /// old row.
    Missing,
    Null,
    Text(Bytes),
}

impl RowCell {
    pub fn text(&self) -> Option<&str> {
        match self {
            RowCell::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
    fn len(&self) -> usize {
        match self {
            RowCell::Text(b) => b.len(),
            _ => 4,
        }
    }
}

pub type Row = Vec<RowCell>;

pub const ERROR_413: &str = "Error 413: Payload Too Large";
pub const ERROR_400: &str = "Error 400: Bad Request, no primary key";
pub const ERROR_401: &str = "Error 401: Unauthorized";

/// A committed change, decoded.
#[derive(Clone)]
pub struct Change {
    pub table: std::sync::Arc<TableInfo>,
    pub action: Action,
    pub new: Option<Row>,
    pub old: Option<Row>,
    /// Microseconds since 2000-01-01.
    pub commit_ts: i64,
    /// The transaction that made the change.
    pub xid: u32,
    /// A leave (a DELETE of the key only, sent for an UPDATE that took the row out of a
    /// subscriber's view): its payload says `"left_view":true`.
    pub left_view: bool,
    /// Where its transaction's commit record starts (pgoutput's BEGIN `final_lsn`): a replica
    /// has replayed the commit once its replay position is past this.
    pub commit_lsn: u64,
}

impl Change {
    /// The row the filters are evaluated on: the new row, or the old one for a DELETE.
    pub fn filter_row(&self) -> Option<&Row> {
        match self.action {
            Action::Delete => self.old.as_ref(),
            _ => self.new.as_ref(),
        }
    }

    /// Primary key values of the row as it now is (INSERT/UPDATE), for the RLS lookup. A key
    /// column the new row leaves out (an unchanged value stored out of line, "unchanged TOAST")
    /// comes from the old row: PostgreSQL logs the old key when its value is stored out of line,
    /// and in full under REPLICA IDENTITY FULL. `None` when some key column has no value in
    /// either image: such a row cannot be checked.
    pub fn pk_values(&self) -> Option<Vec<String>> {
        self.new.as_ref()?;
        self.table
            .pk
            .iter()
            .map(|(name, _)| {
                let i = self.table.column_index(name)?;
                self.current_cell(i)?.text().map(str::to_owned)
            })
            .collect()
    }

    /// Primary key values of the old row image (a DELETE's row, or an UPDATE's old key), when
    /// it has every key column.
    pub fn old_pk_values(&self) -> Option<Vec<String>> {
        let old = self.old.as_ref()?;
        self.table
            .pk
            .iter()
            .map(|(name, _)| {
                let i = self.table.column_index(name)?;
                old.get(i)?.text().map(str::to_owned)
            })
            .collect()
    }

    /// The old row as (column, text or NULL) pairs, for evaluating policies on it; `None`
    /// unless every column's value is in it (`REPLICA IDENTITY FULL`).
    pub fn old_row_texts(&self) -> Option<Vec<(String, Option<String>)>> {
        let old = self.old.as_ref()?;
        if old.len() != self.table.columns.len() {
            return None;
        }
        self.table
            .columns
            .iter()
            .zip(old)
            .map(|(c, cell)| match cell {
                RowCell::Missing => None,
                RowCell::Null => Some((c.name.clone(), None)),
                RowCell::Text(_) => Some((c.name.clone(), Some(cell.text()?.to_owned()))),
            })
            .collect()
    }

    /// The value of column `i` as the row now is: the new image's value, or for a value the new
    /// image leaves out (unchanged TOAST), the old image's when it has one.
    pub fn current_cell(&self, i: usize) -> Option<&RowCell> {
        let row = self.filter_row()?;
        match row.get(i) {
            Some(RowCell::Missing) | None if self.action != Action::Delete => self
                .old
                .as_ref()
                .and_then(|o| o.get(i))
                .filter(|c| **c != RowCell::Missing)
                .or(row.get(i)),
            cell => cell,
        }
    }

    fn size(&self) -> usize {
        let sum = |r: &Option<Row>| {
            r.as_ref()
                .map_or(0, |r| r.iter().map(RowCell::len).sum::<usize>())
        };
        sum(&self.new) + sum(&self.old)
    }
}

/// Builds the `data` JSON for one audience: the columns it may select, its `select` list, and
/// whether `old_record` of a DELETE must be cut to the primary key (RLS tables).
pub fn build_data(
    change: &Change,
    selectable: &HashSet<String>,
    select: Option<&[String]>,
    max_record_bytes: usize,
) -> String {
    let t = &change.table;
    let action = change.action;
    let mut out = String::with_capacity(256);
    out.push_str("{\"schema\":");
    push_json_string(&mut out, &t.schema);
    out.push_str(",\"table\":");
    push_json_string(&mut out, &t.name);

    let error = if action != Action::Delete && !t.has_pk {
        Some(ERROR_400)
    } else if action != Action::Delete && !t.pk.iter().all(|(n, _)| selectable.contains(n)) {
        Some(ERROR_401)
    } else {
        None
    };
    if let Some(error) = error {
        out.push_str(",\"commit_timestamp\":null,\"type\":");
        push_json_string(&mut out, action.as_str());
        out.push_str(",\"columns\":[]");
        if matches!(action, Action::Insert | Action::Update) {
            out.push_str(",\"record\":{}");
        }
        if action == Action::Update {
            out.push_str(",\"old_record\":{}");
        }
        out.push_str(",\"errors\":[");
        push_json_string(&mut out, error);
        out.push_str("]}");
        return out;
    }

    out.push_str(",\"commit_timestamp\":");
    push_json_string(&mut out, &values::commit_timestamp(change.commit_ts));
    out.push_str(",\"type\":");
    push_json_string(&mut out, action.as_str());

    let visible: Vec<bool> = t
        .columns
        .iter()
        .map(|c| {
            selectable.contains(&c.name)
                && select.is_none_or(|s| c.pk || s.iter().any(|x| x == &c.name))
        })
        .collect();
    out.push_str(",\"columns\":[");
    let mut first = true;
    for (c, _) in t.columns.iter().zip(&visible).filter(|(_, v)| **v) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str("{\"name\":");
        push_json_string(&mut out, &c.name);
        out.push_str(",\"type\":");
        push_json_string(&mut out, &c.typname);
        out.push('}');
    }
    out.push(']');

    let too_big = change.size() > max_record_bytes;
    if matches!(action, Action::Insert | Action::Update) {
        out.push_str(",\"record\":");
        // An unchanged TOAST value comes from the old row when the old row has it.
        push_record(&mut out, t, &visible, too_big, |i| change.current_cell(i));
    }
    match action {
        Action::Update => {
            out.push_str(",\"old_record\":");
            match change.old.as_deref() {
                Some(old) => push_record(&mut out, t, &visible, too_big, |i| {
                    old.get(i).filter(|c| **c != RowCell::Missing)
                }),
                // Default replica identity and an unchanged key: the identity is the key.
                None => {
                    let new = change.new.as_deref().unwrap_or_default();
                    push_record(&mut out, t, &visible, too_big, |i| {
                        if t.columns[i].pk {
                            new.get(i).filter(|c| **c != RowCell::Missing)
                        } else {
                            None
                        }
                    })
                }
            }
        }
        Action::Delete => {
            out.push_str(",\"old_record\":");
            let old = change.old.as_deref().unwrap_or_default();
            // With RLS on, a deleted row cannot be checked: only its key is sent.
            let key_only = t.rls;
            push_record(&mut out, t, &visible, too_big, |i| {
                if key_only && !t.columns[i].pk {
                    None
                } else {
                    old.get(i).filter(|c| **c != RowCell::Missing)
                }
            });
        }
        _ => {}
    }
    if too_big {
        out.push_str(",\"errors\":[");
        push_json_string(&mut out, ERROR_413);
        out.push(']');
    } else {
        out.push_str(",\"errors\":null");
    }
    if change.left_view {
        out.push_str(",\"left_view\":true");
    }
    out.push('}');
    out
}

fn push_record<'a>(
    out: &mut String,
    t: &TableInfo,
    visible: &[bool],
    too_big: bool,
    cell: impl Fn(usize) -> Option<&'a RowCell>,
) {
    out.push('{');
    let mut first = true;
    for (i, c) in t.columns.iter().enumerate() {
        if !visible[i] {
            continue;
        }
        let Some(cell) = cell(i) else { continue };
        let mut value = String::new();
        match cell {
            RowCell::Null => value.push_str("null"),
            RowCell::Text(b) => {
                let text = String::from_utf8_lossy(b);
                push_json(&mut value, &c.conv, &text);
            }
            RowCell::Missing => continue,
        }
        // Oversized records keep only values whose JSON text is at most 64 bytes.
        if too_big && value.len() > 64 {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        push_json_string(out, &c.name);
        out.push(':');
        out.push_str(&value);
    }
    out.push('}');
}
