//! SQL identifier and literal quoting, and validation of the names this crate puts in SQL.

use bluegreen_core::{Error, Name, Result};

/// Quotes `ident` as an SQL identifier: wrapped in double quotes, inner double quotes doubled.
///
/// ```
/// use bluegreen_postgres::quote_ident;
/// assert_eq!(quote_ident("app"), "\"app\"");
/// assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
/// ```
pub fn quote_ident(ident: &str) -> String {
    let mut s = String::with_capacity(ident.len() + 2);
    s.push('"');
    for c in ident.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Quotes `value` as an SQL string literal (standard_conforming_strings: single quotes doubled).
///
/// ```
/// use bluegreen_postgres::quote_literal;
/// assert_eq!(quote_literal("it's"), "'it''s'");
/// ```
pub fn quote_literal(value: &str) -> String {
    let mut s = String::with_capacity(value.len() + 2);
    s.push('\'');
    for c in value.chars() {
        if c == '\'' {
            s.push('\'');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// Validates a database, schema, table or role name this crate will create or address
/// (the [`Name`] grammar: 1 to 63 characters of `[A-Za-z0-9._+-]`, starting alphanumeric).
pub fn validate_ident(what: &'static str, ident: &str) -> Result<()> {
    Name::new(ident).map_err(|e| match e {
        Error::InvalidInput { value, reason, .. } => Error::invalid(what, value, reason),
        e => e,
    })?;
    Ok(())
}

/// A name safe for replication slots (`[a-z0-9_]`, at most 63 bytes): lower-cased, other
/// characters mapped to `_`.
pub(crate) fn slot_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(63);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_validation() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("Mixed.Case-1"), "\"Mixed.Case-1\"");
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert!(validate_ident("database", "app_blue").is_ok());
        assert!(validate_ident("database", "app-v2.1").is_ok());
        for bad in [
            "",
            "a b",
            "x\";drop table t;--",
            "a'b",
            "_x",
            &"x".repeat(64),
        ] {
            let err = validate_ident("database", bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidInput {
                        what: "database",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
        assert_eq!(slot_safe("App-v2.Green"), "app_v2_green");
    }
}
