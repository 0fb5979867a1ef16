//! A small SQL tokenizer: splits a script into statements and finds the ones that would break the
//! release still running on the old slot (expand-phase rules).

/// A token of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A keyword or bare identifier, upper-cased.
    Word(String),
    /// A quoted identifier.
    Quoted,
    /// A string literal, dollar-quoted body or number.
    Literal,
    /// Any other character.
    Punct(char),
}

/// One statement: its source text and tokens.
#[derive(Debug, Clone)]
pub(crate) struct Statement {
    pub(crate) text: String,
    toks: Vec<Tok>,
}

/// Splits `sql` into statements (on `;` outside quotes, comments and dollar quotes).
pub(crate) fn split(sql: &str) -> Vec<Statement> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut toks = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let push = |out: &mut Vec<Statement>, toks: &mut Vec<Tok>, from: usize, to: usize| {
        let text: String = chars[from..to].iter().collect();
        if !toks.is_empty() {
            out.push(Statement {
                text: text.trim().to_string(),
                toks: std::mem::take(toks),
            });
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && next == Some('-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '\'' || ((c == 'E' || c == 'e') && next == Some('\'')) {
            let backslash = c != '\'';
            i += if backslash { 2 } else { 1 };
            while i < chars.len() {
                if backslash && chars[i] == '\\' {
                    i += 2;
                } else if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                    } else {
                        i += 1;
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            toks.push(Tok::Literal);
        } else if c == '"' {
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' {
                    if chars.get(i + 1) == Some(&'"') {
                        i += 2;
                    } else {
                        i += 1;
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            toks.push(Tok::Quoted);
        } else if c == '$' && dollar_tag(&chars, i).is_some() {
            let tag = dollar_tag(&chars, i).expect("checked");
            i += tag.len();
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i..].starts_with(&tag) {
                    i += tag.len();
                    break;
                }
                i += 1;
            }
            toks.push(Tok::Literal);
        } else if c.is_alphabetic() || c == '_' {
            let from = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                i += 1;
            }
            toks.push(Tok::Word(
                chars[from..i].iter().collect::<String>().to_uppercase(),
            ));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            toks.push(Tok::Literal);
        } else if c == ';' {
            push(&mut out, &mut toks, start, i);
            i += 1;
            start = i;
        } else {
            toks.push(Tok::Punct(c));
            i += 1;
        }
    }
    push(&mut out, &mut toks, start, chars.len());
    out
}

/// `$tag$` starting at `i`, if any.
fn dollar_tag(chars: &[char], i: usize) -> Option<Vec<char>> {
    let mut j = i + 1;
    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
        if j == i + 1 && chars[j].is_ascii_digit() {
            return None; // $1 is a parameter
        }
        j += 1;
    }
    (j < chars.len() && chars[j] == '$').then(|| chars[i..=j].to_vec())
}

fn is_word(t: Option<&Tok>, w: &str) -> bool {
    matches!(t, Some(Tok::Word(x)) if x == w)
}

/// Why `stmt` would break the release still running on the old slot, if it would.
pub(crate) fn breaking_reason(stmt: &Statement) -> Option<&'static str> {
    let t = &stmt.toks;
    let w = |i: usize, s: &str| is_word(t.get(i), s);
    if w(0, "DROP") {
        if w(1, "TABLE") {
            return Some("DROP TABLE");
        }
        if w(1, "VIEW") || (w(1, "MATERIALIZED") && w(2, "VIEW")) {
            return Some("DROP VIEW");
        }
        if w(1, "SCHEMA") {
            return Some("DROP SCHEMA");
        }
        return None;
    }
    if w(0, "ALTER") && (w(1, "VIEW") || w(1, "SCHEMA")) {
        if t.iter().any(|x| matches!(x, Tok::Word(s) if s == "RENAME")) {
            return Some("RENAME");
        }
        return None;
    }
    if !(w(0, "ALTER") && w(1, "TABLE")) {
        return None;
    }
    // Skip `ALTER TABLE [IF EXISTS] [ONLY] name [*]`.
    let mut i = 2;
    if w(i, "IF") && w(i + 1, "EXISTS") {
        i += 2;
    }
    if w(i, "ONLY") {
        i += 1;
    }
    while let Some(Tok::Word(_)) | Some(Tok::Quoted) = t.get(i) {
        i += 1;
        if t.get(i) == Some(&Tok::Punct('.')) {
            i += 1;
        } else {
            break;
        }
    }
    if t.get(i) == Some(&Tok::Punct('*')) {
        i += 1;
    }
    // Actions, separated by top-level commas.
    let mut actions: Vec<&[Tok]> = Vec::new();
    let (mut depth, mut from) = (0i32, i);
    for (k, tok) in t.iter().enumerate().skip(i) {
        match tok {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => depth -= 1,
            Tok::Punct(',') if depth == 0 => {
                actions.push(&t[from..k]);
                from = k + 1;
            }
            _ => {}
        }
    }
    actions.push(&t[from..]);
    for a in actions {
        let aw = |i: usize, s: &str| is_word(a.get(i), s);
        if aw(0, "RENAME") && !aw(1, "CONSTRAINT") {
            return Some("RENAME");
        }
        if aw(0, "SET") && aw(1, "SCHEMA") {
            return Some("SET SCHEMA");
        }
        if aw(0, "DROP") && !aw(1, "CONSTRAINT") {
            return Some("DROP COLUMN");
        }
        if aw(0, "ALTER") {
            let k = if aw(1, "COLUMN") { 3 } else { 2 };
            if aw(k, "TYPE") || (aw(k, "SET") && aw(k + 1, "DATA") && aw(k + 2, "TYPE")) {
                return Some("ALTER COLUMN … TYPE");
            }
            if aw(k, "SET") && aw(k + 1, "NOT") && aw(k + 2, "NULL") {
                return Some("SET NOT NULL");
            }
        }
        if aw(0, "ADD")
            && !(aw(1, "CONSTRAINT")
                || aw(1, "PRIMARY")
                || aw(1, "UNIQUE")
                || aw(1, "CHECK")
                || aw(1, "FOREIGN")
                || aw(1, "EXCLUDE"))
        {
            let not_null = a
                .windows(2)
                .any(|p| is_word(p.first(), "NOT") && is_word(p.get(1), "NULL"));
            let has_default = a.iter().any(|x| {
                matches!(x, Tok::Word(s) if s == "DEFAULT" || s == "GENERATED"
                    || s == "SERIAL" || s == "BIGSERIAL" || s == "SMALLSERIAL")
            });
            if not_null && !has_default {
                return Some("ADD COLUMN … NOT NULL without DEFAULT");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(sql: &str) -> Vec<Option<&'static str>> {
        split(sql).iter().map(breaking_reason).collect()
    }

    #[test]
    fn breaking_statements_are_found() {
        let cases = [
            ("DROP TABLE t", "DROP TABLE"),
            ("drop table if exists s.t cascade", "DROP TABLE"),
            ("ALTER TABLE t DROP COLUMN c", "DROP COLUMN"),
            ("ALTER TABLE ONLY \"T\" DROP c", "DROP COLUMN"),
            (
                "alter table t add column x int, drop column if exists y",
                "DROP COLUMN",
            ),
            ("ALTER TABLE t RENAME COLUMN a TO b", "RENAME"),
            ("ALTER TABLE t RENAME TO u", "RENAME"),
            ("ALTER TABLE IF EXISTS t RENAME a TO b", "RENAME"),
            (
                "ALTER TABLE t ALTER COLUMN c TYPE bigint",
                "ALTER COLUMN … TYPE",
            ),
            (
                "ALTER TABLE t ALTER c SET DATA TYPE text",
                "ALTER COLUMN … TYPE",
            ),
            ("ALTER TABLE t ALTER COLUMN c SET NOT NULL", "SET NOT NULL"),
            (
                "ALTER TABLE t ADD COLUMN c int NOT NULL",
                "ADD COLUMN … NOT NULL without DEFAULT",
            ),
            (
                "ALTER TABLE t ADD c text not null",
                "ADD COLUMN … NOT NULL without DEFAULT",
            ),
            ("ALTER TABLE t SET SCHEMA archive", "SET SCHEMA"),
            ("DROP VIEW v", "DROP VIEW"),
        ];
        for (sql, why) in cases {
            assert_eq!(verdicts(sql), vec![Some(why)], "{sql}");
        }
    }

    #[test]
    fn compatible_statements_pass() {
        let sql = "
            CREATE TABLE t2 (id int PRIMARY KEY, name text NOT NULL); -- DROP TABLE t
            ALTER TABLE t ADD COLUMN c int;
            ALTER TABLE t ADD COLUMN d int NOT NULL DEFAULT 0;
            ALTER TABLE t ADD COLUMN e bigint GENERATED ALWAYS AS IDENTITY;
            ALTER TABLE t ADD CONSTRAINT c_pos CHECK (c > 0) NOT VALID;
            ALTER TABLE t DROP CONSTRAINT old_check;
            ALTER TABLE t ALTER COLUMN c DROP NOT NULL;
            ALTER TABLE t ALTER COLUMN c SET DEFAULT 1;
            ALTER TABLE t ALTER COLUMN c DROP DEFAULT;
            CREATE INDEX t_c ON t (c);
            INSERT INTO notes VALUES ('DROP TABLE t; ALTER TABLE t DROP c');
            /* ALTER TABLE t RENAME TO u; */
            CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $body$ DROP TABLE t $body$;
            UPDATE t SET c = 1 WHERE c IS NULL;
        ";
        let v = verdicts(sql);
        assert_eq!(v.len(), 13, "{:?}", split(sql));
        assert!(v.iter().all(Option::is_none), "{v:?}");
    }

    #[test]
    fn statements_keep_their_text() {
        let s = split("select 1;\n  ALTER TABLE t DROP c ;  ");
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].text, "ALTER TABLE t DROP c");
    }
}
