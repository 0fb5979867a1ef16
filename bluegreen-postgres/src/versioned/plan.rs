//! From a release's operations and the tables as they are to a plan: the physical steps of the
//! expand phase (each idempotent, each with its undo), the new release's views, and what the
//! contract phase will drop and rename. The plan is stored with the version's state, so a crash
//! at any point can be rolled back or completed from it.

use std::collections::BTreeMap;

use bluegreen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::ops::{ColumnDef, Operation};
use crate::shared::fnv64;

/// A physical column of an existing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PhysColumn {
    pub(crate) name: String,
    pub(crate) data_type: String,
    pub(crate) not_null: bool,
    pub(crate) has_default: bool,
}

/// The existing tables the operations touch, by name.
pub(crate) type Catalog = BTreeMap<String, Vec<PhysColumn>>;

/// One physical step of the expand phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub(crate) enum Step {
    CreateTable {
        table: String,
        columns: Vec<ColumnDef>,
        primary_key: Vec<String>,
    },
    AddColumn {
        table: String,
        column: ColumnDef,
        backfill: Option<String>,
        /// Trigger (and function) filling the column for the old release's writes.
        trigger: Option<String>,
        /// `CHECK (column IS NOT NULL) NOT VALID`, validated after the backfill.
        check: Option<String>,
    },
    Rewrite {
        table: String,
        /// The old physical column.
        column: String,
        /// The name `down` uses for the new value.
        name: String,
        /// The new physical column.
        tmp: String,
        data_type: String,
        up: String,
        down: String,
        trigger: String,
        check: Option<String>,
    },
    FillDropped {
        table: String,
        column: String,
        down: String,
        trigger: String,
    },
    AddIndex {
        table: String,
        name: String,
        columns: Vec<String>,
        unique: bool,
    },
    AddForeignKey {
        table: String,
        name: String,
        columns: Vec<String>,
        references_table: String,
        references_columns: Vec<String>,
    },
    Raw {
        sql: String,
    },
}

/// The new release's view of one table: (name it sees, physical column).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ViewPlan {
    pub(crate) table: String,
    pub(crate) columns: Vec<(String, String)>,
}

/// What the contract phase does to one table, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TableContract {
    pub(crate) table: String,
    pub(crate) triggers: Vec<String>,
    pub(crate) drop_columns: Vec<String>,
    /// (physical, final name).
    pub(crate) renames: Vec<(String, String)>,
    /// (final column, check constraint standing in for NOT NULL until now).
    pub(crate) not_null: Vec<(String, String)>,
}

impl TableContract {
    pub(crate) fn is_empty(&self) -> bool {
        self.triggers.is_empty()
            && self.drop_columns.is_empty()
            && self.renames.is_empty()
            && self.not_null.is_empty()
    }
}

/// Everything about one release's schema version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) version: String,
    /// The release whose schema this one expands from (its views are dropped at contract).
    pub(crate) base_version: Option<String>,
    pub(crate) base_schema: Option<String>,
    pub(crate) view_schema: String,
    /// The slot it was expanded for (`blue`/`green`), when known.
    #[serde(default)]
    pub(crate) slot: Option<String>,
    pub(crate) views: Vec<ViewPlan>,
    pub(crate) steps: Vec<Step>,
    pub(crate) contract: Vec<TableContract>,
}

impl Plan {
    /// True when a rollback cannot undo everything (raw SQL).
    pub(crate) fn irreversible(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Raw { .. }))
    }

    /// True when the contract phase changes no table.
    pub(crate) fn contract_is_noop(&self) -> bool {
        self.contract.iter().all(TableContract::is_empty)
    }
}

/// A short stable hex tag of `parts`.
fn tag(parts: &[&str]) -> String {
    format!("{:08x}", fnv64(&parts.join("\u{0}")) as u32)
}

/// The new physical column standing in for `column` of `table` until contract:
/// `_bg_<tag>_<column>`, at most 63 bytes.
pub(crate) fn tmp_column(table: &str, column: &str) -> String {
    let mut s = format!("_bg_{}_", tag(&[table, column]));
    for c in column.chars() {
        if s.len() + c.len_utf8() > 63 {
            break;
        }
        s.push(c);
    }
    s
}

/// Computes the plan of `version`'s `ops` against `catalog` (the tables as they are).
///
/// # Errors
/// [`Error::InvalidInput`] naming the operation when it cannot apply (unknown table or column,
/// a name already in use, a dropped NOT NULL column without `down`).
pub(crate) fn plan(
    version: &str,
    base_version: Option<String>,
    base_schema: Option<String>,
    view_schema: String,
    ops: &[Operation],
    catalog: &Catalog,
) -> Result<Plan> {
    // The new release's names, per table: (name, physical).
    let mut logical: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut touched: Vec<String> = Vec::new();
    let mut created: Vec<String> = Vec::new();
    let mut contract: BTreeMap<String, TableContract> = BTreeMap::new();
    let mut steps = Vec::new();
    let bad = |what: &'static str, value: &str, why: String| Err(Error::invalid(what, value, why));

    for (i, op) in ops.iter().enumerate() {
        let idx = i.to_string();
        let trigger_name = |table: &str| format!("bg_{}_{}", tag(&[version, table, &idx]), i);
        if let Some(t) = op.table() {
            if !logical.contains_key(t) {
                if let Some(cols) = catalog.get(t) {
                    logical.insert(
                        t.to_string(),
                        cols.iter()
                            .map(|c| (c.name.clone(), c.name.clone()))
                            .collect(),
                    );
                    touched.push(t.to_string());
                } else if !matches!(op, Operation::CreateTable { .. }) {
                    return bad(
                        "table",
                        t,
                        format!(
                            "operation {} ({}) names a table that does not exist",
                            i + 1,
                            kind(op)
                        ),
                    );
                }
            }
        }
        let phys = |logical: &BTreeMap<String, Vec<(String, String)>>, t: &str, col: &str| {
            logical
                .get(t)
                .and_then(|cols| cols.iter().find(|(l, _)| l == col))
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    Error::invalid(
                        "column",
                        col,
                        format!(
                            "operation {} ({}): table {t} has no column {col} in this release's schema",
                            i + 1,
                            kind(op)
                        ),
                    )
                })
        };
        let base_col = |t: &str, p: &str| {
            catalog
                .get(t)
                .and_then(|cols| cols.iter().find(|c| c.name == p))
                .cloned()
        };
        match op {
            Operation::CreateTable {
                table,
                columns,
                primary_key,
            } => {
                if catalog.contains_key(table) || logical.contains_key(table) {
                    return bad("table", table, "already exists".into());
                }
                logical.insert(
                    table.clone(),
                    columns
                        .iter()
                        .map(|c| (c.name.clone(), c.name.clone()))
                        .collect(),
                );
                created.push(table.clone());
                steps.push(Step::CreateTable {
                    table: table.clone(),
                    columns: columns.clone(),
                    primary_key: primary_key.clone(),
                });
            }
            Operation::AddColumn {
                table,
                column,
                backfill,
            } => {
                let cols = logical.get_mut(table).expect("loaded above");
                let physically_used = catalog
                    .get(table)
                    .is_some_and(|c| c.iter().any(|c| c.name == column.name));
                if cols.iter().any(|(l, _)| *l == column.name) || physically_used {
                    return bad(
                        "column",
                        &column.name,
                        format!(
                            "table {table} already has a column {} (a renamed or dropped one \
                             keeps its name until contract: add it in a later release)",
                            column.name
                        ),
                    );
                }
                cols.push((column.name.clone(), column.name.clone()));
                let is_new_table = created.contains(table);
                let trigger = (backfill.is_some() && !is_new_table).then(|| trigger_name(table));
                let check = (!column.nullable && !is_new_table)
                    .then(|| format!("bg_nn_{}", tag(&[table, &column.name])));
                let c = contract.entry(table.clone()).or_default();
                if let Some(t) = &trigger {
                    c.triggers.push(t.clone());
                }
                if let Some(k) = &check {
                    c.not_null.push((column.name.clone(), k.clone()));
                }
                if is_new_table {
                    // A table of this release: the column goes in as declared.
                    if let Some(Step::CreateTable { columns, .. }) = steps
                        .iter_mut()
                        .find(|s| matches!(s, Step::CreateTable { table: t, .. } if t == table))
                    {
                        columns.push(column.clone());
                    }
                } else {
                    steps.push(Step::AddColumn {
                        table: table.clone(),
                        column: column.clone(),
                        backfill: backfill.clone(),
                        trigger,
                        check,
                    });
                }
            }
            Operation::RenameColumn { table, from, to } => {
                phys(&logical, table, from)?;
                let cols = logical.get_mut(table).expect("loaded above");
                if cols.iter().any(|(l, _)| l == to) {
                    return bad(
                        "column",
                        to,
                        format!("table {table} already has a column {to}"),
                    );
                }
                for (l, _) in cols.iter_mut() {
                    if l == from {
                        *l = to.clone();
                    }
                }
            }
            Operation::ChangeType { table, column, .. }
            | Operation::SetNotNull { table, column, .. } => {
                let p = phys(&logical, table, column)?;
                let Some(base) = base_col(table, &p) else {
                    return bad(
                        "column",
                        column,
                        format!(
                            "operation {} ({}): {table}.{column} is new or already changed in \
                             this release; declare it as it should be",
                            i + 1,
                            kind(op)
                        ),
                    );
                };
                let tmp = tmp_column(table, &p);
                let (data_type, up, down, not_null) = match op {
                    Operation::ChangeType {
                        data_type,
                        up,
                        down,
                        ..
                    } => (data_type.clone(), up.clone(), down.clone(), base.not_null),
                    Operation::SetNotNull { up, .. } => (
                        base.data_type.clone(),
                        up.clone(),
                        crate::ident::quote_ident(column),
                        true,
                    ),
                    _ => unreachable!("matched above"),
                };
                let cols = logical.get_mut(table).expect("loaded above");
                for (_, ph) in cols.iter_mut() {
                    if *ph == p {
                        *ph = tmp.clone();
                    }
                }
                let trigger = trigger_name(table);
                let check = not_null.then(|| format!("bg_nn_{}", tag(&[table, &tmp])));
                let c = contract.entry(table.clone()).or_default();
                c.triggers.push(trigger.clone());
                c.drop_columns.push(p.clone());
                if let Some(k) = &check {
                    c.not_null.push((tmp.clone(), k.clone()));
                }
                steps.push(Step::Rewrite {
                    table: table.clone(),
                    column: p,
                    name: column.clone(),
                    tmp,
                    data_type,
                    up,
                    down,
                    trigger,
                    check,
                });
            }
            Operation::DropColumn {
                table,
                column,
                down,
            } => {
                let p = phys(&logical, table, column)?;
                if let Some(base) = base_col(table, &p) {
                    if base.not_null && !base.has_default && down.is_none() {
                        return bad(
                            "column",
                            column,
                            format!(
                                "{table}.{column} is NOT NULL without a default: the old release \
                                 needs it filled in rows the new release inserts; give `down`"
                            ),
                        );
                    }
                    let c = contract.entry(table.clone()).or_default();
                    c.drop_columns.push(p.clone());
                    if let Some(d) = down {
                        let trigger = trigger_name(table);
                        c.triggers.push(trigger.clone());
                        steps.push(Step::FillDropped {
                            table: table.clone(),
                            column: p.clone(),
                            down: d.clone(),
                            trigger,
                        });
                    }
                } else {
                    return bad(
                        "column",
                        column,
                        format!("{table}.{column} is new in this release: do not add it"),
                    );
                }
                logical
                    .get_mut(table)
                    .expect("loaded above")
                    .retain(|(l, _)| l != column);
            }
            Operation::AddIndex {
                table,
                name,
                columns,
                unique,
            } => {
                let columns = columns
                    .iter()
                    .map(|c| phys(&logical, table, c))
                    .collect::<Result<Vec<_>>>()?;
                steps.push(Step::AddIndex {
                    table: table.clone(),
                    name: name.clone(),
                    columns,
                    unique: *unique,
                });
            }
            Operation::AddForeignKey {
                table,
                name,
                columns,
                references_table,
                references_columns,
            } => {
                let columns = columns
                    .iter()
                    .map(|c| phys(&logical, table, c))
                    .collect::<Result<Vec<_>>>()?;
                let references_columns = if logical.contains_key(references_table) {
                    references_columns
                        .iter()
                        .map(|c| phys(&logical, references_table, c))
                        .collect::<Result<Vec<_>>>()?
                } else {
                    references_columns.clone()
                };
                steps.push(Step::AddForeignKey {
                    table: table.clone(),
                    name: name.clone(),
                    columns,
                    references_table: references_table.clone(),
                    references_columns,
                });
            }
            Operation::RawSql { sql } => steps.push(Step::Raw { sql: sql.clone() }),
        }
    }

    let mut views = Vec::new();
    for t in &touched {
        let cols = logical[t].clone();
        let c = contract.entry(t.clone()).or_default();
        for (l, p) in &cols {
            if l != p {
                c.renames.push((p.clone(), l.clone()));
            }
        }
        // A final name still held by a column that stays would make contract fail.
        for (_, l) in &c.renames {
            let held = catalog[t].iter().any(|pc| &pc.name == l)
                && !c.drop_columns.contains(l)
                && !c.renames.iter().any(|(p, _)| p == l);
            if held {
                return bad(
                    "column",
                    l,
                    format!("{t}.{l}: the name is still held by a column this release keeps"),
                );
            }
        }
        for (col, _) in c.not_null.iter_mut() {
            if let Some((l, _)) = cols.iter().find(|(_, p)| p == col) {
                *col = l.clone();
            }
        }
        views.push(ViewPlan {
            table: t.clone(),
            columns: cols,
        });
    }
    let contract = contract
        .into_iter()
        .filter(|(t, _)| !created.contains(t))
        .map(|(t, mut c)| {
            c.table = t;
            c
        })
        .collect();
    Ok(Plan {
        version: version.to_string(),
        base_version,
        base_schema,
        view_schema,
        slot: None,
        views,
        steps,
        contract,
    })
}

fn kind(op: &Operation) -> &'static str {
    match op {
        Operation::CreateTable { .. } => "create_table",
        Operation::AddColumn { .. } => "add_column",
        Operation::RenameColumn { .. } => "rename_column",
        Operation::ChangeType { .. } => "change_type",
        Operation::SetNotNull { .. } => "set_not_null",
        Operation::DropColumn { .. } => "drop_column",
        Operation::AddIndex { .. } => "add_index",
        Operation::AddForeignKey { .. } => "add_foreign_key",
        Operation::RawSql { .. } => "raw_sql",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, t: &str, not_null: bool) -> PhysColumn {
        PhysColumn {
            name: name.into(),
            data_type: t.into(),
            not_null,
            has_default: false,
        }
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::new();
        c.insert(
            "orders".into(),
            vec![
                col("id", "bigint", true),
                col("amount", "bigint", true),
                col("note", "text", false),
            ],
        );
        c
    }

    #[test]
    fn rename_and_retype_map_views_and_contract() {
        let ops = vec![
            Operation::RenameColumn {
                table: "orders".into(),
                from: "note".into(),
                to: "memo".into(),
            },
            Operation::ChangeType {
                table: "orders".into(),
                column: "amount".into(),
                data_type: "numeric".into(),
                up: "amount / 100.0".into(),
                down: "(amount * 100)::bigint".into(),
            },
        ];
        let p = plan("v2", None, None, "public_v2".into(), &ops, &catalog()).unwrap();
        let tmp = tmp_column("orders", "amount");
        assert!(tmp.starts_with("_bg_") && tmp.ends_with("_amount") && tmp.len() <= 63);
        assert_eq!(
            p.views,
            vec![ViewPlan {
                table: "orders".into(),
                columns: vec![
                    ("id".into(), "id".into()),
                    ("amount".into(), tmp.clone()),
                    ("memo".into(), "note".into())
                ]
            }]
        );
        let c = &p.contract[0];
        assert_eq!(c.drop_columns, vec!["amount".to_string()]);
        assert_eq!(
            c.renames,
            vec![
                (tmp.clone(), "amount".to_string()),
                ("note".into(), "memo".into())
            ]
        );
        assert_eq!(c.not_null.len(), 1);
        assert_eq!(c.not_null[0].0, "amount");
        assert!(!p.irreversible() && !p.contract_is_noop());
        assert_eq!(tmp_column("t", &"x".repeat(63)).len(), 63);
    }

    #[test]
    fn impossible_operations_are_refused_naming_them() {
        let c = catalog();
        let cases = [
            Operation::RenameColumn {
                table: "nope".into(),
                from: "a".into(),
                to: "b".into(),
            },
            Operation::RenameColumn {
                table: "orders".into(),
                from: "missing".into(),
                to: "b".into(),
            },
            Operation::DropColumn {
                table: "orders".into(),
                column: "amount".into(),
                down: None,
            },
            Operation::AddColumn {
                table: "orders".into(),
                column: ColumnDef::new("note", "text"),
                backfill: None,
            },
            Operation::RenameColumn {
                table: "orders".into(),
                from: "note".into(),
                to: "amount".into(),
            },
        ];
        for op in cases {
            let err = plan(
                "v2",
                None,
                None,
                "public_v2".into(),
                std::slice::from_ref(&op),
                &c,
            )
            .unwrap_err();
            assert!(matches!(err, Error::InvalidInput { .. }), "{op:?}: {err}");
        }
    }
}
