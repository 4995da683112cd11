//! `PolicyError`: every way a policy file can be wrong, rendered as one line
//! `file:LINE:COL: key: problem — fix` for the operator.
//!
//! Owns the translation of toml/serde messages (unknown keys and values,
//! missing keys, wrong types) into that form, including the nearest valid key.
//! It does not decide what is valid; the parser and `validate.rs` do.

use std::ops::Range;

/// A policy file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read the policy file: {source} — check the path (--config or HYPERION_CONFIG) and its permissions")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{col}: {key}: {problem} — {fix}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        key: String,
        problem: String,
        fix: String,
    },
}

/// Where an error points: the file's name and its text, to turn byte spans
/// into line and column.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// A path written in the policy: relative ones are relative to the
    /// policy file's directory, wherever hyperion was started.
    pub fn relative_path(&self, written: &str) -> std::path::PathBuf {
        let path = std::path::Path::new(written);
        match std::path::Path::new(self.name).parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub fn error(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> PolicyError {
        let (line, col) = span.map_or((1, 1), |s| line_col(self.text, s.start));
        PolicyError::Invalid {
            file: self.name.to_owned(),
            line,
            col,
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Turns a deserialization failure into a `PolicyError` at its position.
    pub fn deserialize_error(
        &self,
        err: serde_path_to_error::Error<toml::de::Error>,
    ) -> PolicyError {
        // `Spanned<T>` adds a private segment to serde's path; operators never wrote it.
        let path = err
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "")
            .replace("$__serde_spanned_private_value", "");
        let inner = err.into_inner();
        let span = inner.span();
        let message = inner.message().trim().to_owned();
        let key = if path.is_empty() || path == "." {
            String::new()
        } else {
            path
        };
        let (key, problem, fix) = explain(key, &message);
        self.error(span, key, problem, fix)
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Splits a serde/toml message into (key, problem, fix).
fn explain(key: String, message: &str) -> (String, String, String) {
    let join = |key: &str, leaf: &str| {
        if key.is_empty() {
            leaf.to_owned()
        } else if key.ends_with(leaf) {
            key.to_owned()
        } else {
            format!("{key}.{leaf}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (found, expected) = split_expected(rest);
        let fix = match expected.as_slice() {
            [] => "this table takes no keys: remove it".to_owned(),
            _ => suggest(&found, &expected, "key"),
        };
        return (join(&key, &found), format!("unknown key `{found}`"), fix);
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (found, expected) = split_expected(rest);
        return (
            key,
            format!("unknown value `{found}`"),
            suggest(&found, &expected, "value"),
        );
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        let field = rest.trim_matches('`').to_owned();
        let fix = format!("add `{field} = …` here (see docs/policy.md for its shape)");
        return (join(&key, &field), format!("missing key `{field}`"), fix);
    }
    if let Some((problem, fix)) = message.split_once(" — ") {
        return (key, problem.to_owned(), fix.to_owned());
    }
    if message.starts_with("invalid type") || message.starts_with("invalid value") {
        let fix =
            "write the value as docs/policy.md shows (durations, sizes and rates are quoted strings)";
        return (key, message.to_owned(), fix.to_owned());
    }
    // TOML syntax errors: the message is already specific; keep its first line.
    let first = message.lines().next().unwrap_or(message).to_owned();
    let key = if key.is_empty() {
        "syntax".to_owned()
    } else {
        key
    };
    (
        key,
        first,
        "fix the TOML syntax at this position".to_owned(),
    )
}

/// Parses "`x`, expected one of `a`, `b`" / "`x`, expected `a` or `b`" /
/// "`x`, there are no fields".
fn split_expected(rest: &str) -> (String, Vec<String>) {
    let (found, tail) = rest.split_once(", ").unwrap_or((rest, ""));
    let found = found.trim_matches('`').to_owned();
    let list = tail
        .strip_prefix("expected one of ")
        .or_else(|| tail.strip_prefix("expected "))
        .unwrap_or("");
    // serde writes two choices as "`a` or `b`", more as "`a`, `b`, `c`".
    let expected = list
        .split(", ")
        .flat_map(|s| s.split(" or "))
        .map(|s| s.trim().trim_matches('`').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (found, expected)
}

/// "did you mean `listen`?" when one valid name is close, and the list either way.
fn suggest(found: &str, valid: &[String], what: &str) -> String {
    let list = valid.join(", ");
    match nearest(found, valid) {
        Some(best) => format!("did you mean `{best}`? (valid {what}s here: {list})"),
        None => format!("use one of: {list}"),
    }
}

/// The valid name closest to `found` by edit distance, when it is close enough
/// to be a plausible typo.
pub(crate) fn nearest<'a>(found: &str, valid: &'a [String]) -> Option<&'a str> {
    let found_l = found.to_ascii_lowercase();
    valid
        .iter()
        .map(|v| (edit_distance(&found_l, &v.to_ascii_lowercase()), v))
        .filter(|(d, v)| *d <= (v.len().max(found.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v.as_str())
}

/// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev2 = vec![0usize; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0usize; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        std::mem::swap(&mut prev2, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_key() {
        let valid: Vec<String> = ["listen", "max_request_body", "idle_timeout"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(nearest("lisen", &valid), Some("listen"));
        assert_eq!(nearest("listne", &valid), Some("listen"));
        assert_eq!(nearest("max_body", &valid), None);
        assert_eq!(nearest("idle_timout", &valid), Some("idle_timeout"));
        assert_eq!(nearest("zzz", &valid), None);
    }

    #[test]
    fn line_and_column() {
        let text = "a = 1\nbb = 2\n  c = é3";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 15), (3, 3));
    }

    #[test]
    fn explains_unknown_field() {
        let (key, problem, fix) = explain(
            "server".into(),
            "unknown field `lisen`, expected one of `listen`, `tls`",
        );
        assert_eq!(key, "server.lisen");
        assert_eq!(problem, "unknown key `lisen`");
        assert!(fix.starts_with("did you mean `listen`?"), "{fix}");
    }
}
