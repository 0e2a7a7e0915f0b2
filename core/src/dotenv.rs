//! `.env` files read exactly as Emissary reads them: Emissary loads `./.env` with
//! `github.com/joho/godotenv` v1.4.0, so a file written for Emissary must mean the same here
//! (a drop-in replacement). godotenv's rules, which differ from a shell's:
//!
//! - a line is ignored when it is blank or starts with `#`; `export ` before a name is dropped;
//!   `NAME: value` (YAML style) works like `NAME=value` when the colon comes first;
//! - `#` starts a comment unless it sits inside a quoted part of the line;
//! - a value is unquoted only when the *same* quote opens and closes it: `'…'` is taken as is,
//!   `"…"` turns `\n`/`\r` into line breaks and drops other backslashes; anything else is kept
//!   verbatim, inner quotes included (`KEYS=[{"kid":1}]` keeps its JSON intact);
//! - outside single quotes, `$NAME` / `${NAME}` take the value of a name set earlier in the same
//!   file (empty when unknown), and `\$` is a literal `$`.
//!
//! `core/tests/it/emissary_interop.rs` runs godotenv itself (from Emissary's own module) on the same
//! files and compares the two results.

use std::collections::HashMap;
use std::path::Path;

/// Why a `.env` file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DotenvError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line that is neither blank, a comment, nor `NAME=value`.
    #[error("{path} line {line}: {text:?} has no `=`: write NAME=value (a comment starts with #)")]
    NoSeparator {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// Read `path` if it exists (a missing file is no variables), in file order; a name set twice
/// appears twice, the later one winning.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, DotenvError> {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DotenvError::Read { path: path.display().to_string(), source }),
    };
    parse(&text, &path.display().to_string())
}

/// Parse a `.env` text as godotenv does (`path` only names the file in errors).
pub fn parse(text: &str, path: &str) -> Result<Vec<(String, String)>, DotenvError> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    // bufio.ScanLines: split at \n, drop one trailing \r.
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_matches(is_go_space);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (key, value) =
            parse_line(line, &seen).ok_or_else(|| DotenvError::NoSeparator { path: path.to_string(), line: i + 1, text: line.to_string() })?;
        seen.insert(key.clone(), value.clone());
        out.push((key, value));
    }
    Ok(out)
}

/// `unicode.IsSpace` for the characters a line can hold (what `strings.TrimSpace` trims).
fn is_go_space(c: char) -> bool {
    c.is_whitespace()
}

/// RE2's `\s`: `[\t\n\f\r ]`.
fn is_re_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ')
}

fn parse_line(line: &str, seen: &HashMap<String, String>) -> Option<(String, String)> {
    let line = strip_comment(line);
    let eq = line.find('=');
    let colon = line.find(':');
    let sep = match (eq, colon) {
        (_, Some(c)) if eq.map_or(true, |e| c < e) => c,
        (Some(e), _) => e,
        _ => return None,
    };
    let (key, value) = (&line[..sep], &line[sep + 1..]);
    Some((parse_key(key), parse_value(value, seen)))
}

/// godotenv's comment rule: split at every `#`, keep the first segment and any segment while a
/// quote (a segment with exactly one `"` or one `'`) is open.
fn strip_comment(line: &str) -> String {
    if !line.contains('#') {
        return line.to_string();
    }
    let mut keep: Vec<&str> = Vec::new();
    let mut open = false;
    for segment in line.split('#') {
        if segment.matches('"').count() == 1 || segment.matches('\'').count() == 1 {
            if open {
                open = false;
                keep.push(segment);
            } else {
                open = true;
            }
        }
        if keep.is_empty() || open {
            keep.push(segment);
        }
    }
    keep.join("#")
}

/// `^\s*(?:export\s+)?(.*?)\s*$`.
fn parse_key(key: &str) -> String {
    let k = key.trim_start_matches(is_re_space);
    let k = match k.strip_prefix("export") {
        Some(rest) if rest.starts_with(is_re_space) => rest.trim_start_matches(is_re_space),
        _ => k,
    };
    k.trim_end_matches(is_re_space).to_string()
}

fn parse_value(value: &str, seen: &HashMap<String, String>) -> String {
    let value = value.trim_matches(' ');
    if value.len() <= 1 {
        return value.to_string();
    }
    let single = value.starts_with('\'') && value.ends_with('\'');
    let double = value.starts_with('"') && value.ends_with('"');
    let mut v = if single || double { value[1..value.len() - 1].to_string() } else { value.to_string() };
    if double {
        v = unescape(&expand_escapes(&v));
    }
    if !single {
        v = expand_variables(&v, seen);
    }
    v
}

/// `\\.` → `\n` and `\r` become line breaks, any other pair is kept.
fn expand_escapes(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied()) {
            ('\\', Some(n)) if n != '\n' => {
                chars.next();
                match n {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    _ => {
                        out.push('\\');
                        out.push(n);
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// `\\([^$])` → `$1`: a backslash before anything but `$` is dropped.
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied()) {
            ('\\', Some(n)) if n != '$' => {
                chars.next();
                out.push(n);
            }
            _ => out.push(c),
        }
    }
    out
}

/// `(\\)?(\$)(\()?\{?([A-Z0-9_]+)?\}?`: `\$…` loses its backslash, `$NAME` / `${NAME}` is the
/// value set earlier in the file, anything else is kept.
fn expand_variables(v: &str, seen: &HashMap<String, String>) -> String {
    let b = v.as_bytes();
    let mut out = String::with_capacity(v.len());
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        let escaped = b[i] == b'\\' && b.get(i + 1) == Some(&b'$');
        if !(escaped || b[i] == b'$') {
            i += 1;
            continue;
        }
        let start = i;
        i += if escaped { 2 } else { 1 };
        if b.get(i) == Some(&b'(') {
            i += 1;
        }
        if b.get(i) == Some(&b'{') {
            i += 1;
        }
        let name_start = i;
        while i < b.len() && (b[i].is_ascii_uppercase() || b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
        let name = &v[name_start..i];
        if b.get(i) == Some(&b'}') {
            i += 1;
        }
        out.push_str(&v[copied..start]);
        if escaped {
            out.push_str(&v[start + 1..i]);
        } else if !name.is_empty() {
            out.push_str(seen.get(name).map(String::as_str).unwrap_or(""));
        } else {
            out.push_str(&v[start..i]);
        }
        copied = i;
    }
    out.push_str(&v[copied..]);
    out
}

/// When a setting read from `.env` fails to parse, a value with a quote at one end only is the
/// likely cause: say so.
pub fn quoting_hint(var: &str, value: &str) -> Option<String> {
    let v = value.trim();
    let first = v.chars().next().filter(|c| matches!(c, '\'' | '"'));
    let last = v.chars().last().filter(|c| matches!(c, '\'' | '"'));
    match (first, last) {
        (Some(f), Some(l)) if f == l && v.len() > 1 => None,
        (None, None) => None,
        (Some(q), _) | (None, Some(q)) => Some(format!(
            "{var}'s value in ./.env has a {q} at one end only, so it was kept with that quote: enclose the whole value in one pair of \
             quotes (NAME='[...]') or none (NAME=[...]), as Emissary's godotenv reads it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Vec<(String, String)> {
        parse(text, ".env").unwrap()
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn unquoted_json_keeps_its_quotes() {
        assert_eq!(p(r#"EMISSARY_AUTH_KEYS=[{"kid":1,"data":"YQ=="}]"#), vec![kv("EMISSARY_AUTH_KEYS", r#"[{"kid":1,"data":"YQ=="}]"#)]);
        assert_eq!(p(r#"A='[{ "host": "x", "port": 1 }]'"#), vec![kv("A", r#"[{ "host": "x", "port": 1 }]"#)]);
        assert_eq!(p(r#"A="[{\"kid\": 1}]""#), vec![kv("A", r#"[{"kid": 1}]"#)]);
    }

    #[test]
    fn comments_export_yaml_and_expansion() {
        let text = "# c\n\n  export A=1 # trailing\nB: two\nC=\"x # not a comment\"\nD=${A}-$B-\\$A\nE='$A'\r\nF=\"a\\nb\\\\c\"\n";
        assert_eq!(p(text), vec![kv("A", "1"), kv("B", "two"), kv("C", "x # not a comment"), kv("D", "1-two-$A"), kv("E", "$A"), kv("F", "a\nb\\c")]);
    }

    #[test]
    fn a_line_without_separator_names_its_line() {
        let e = parse("A=1\nnonsense\n", "x.env").unwrap_err().to_string();
        assert!(e.contains("x.env line 2") && e.contains("NAME=value"), "{e}");
    }

    #[test]
    fn quoting_hint_only_for_one_sided_quotes() {
        assert!(quoting_hint("A", "'[1]").is_some());
        assert!(quoting_hint("A", "[1]\"").is_some());
        assert!(quoting_hint("A", "[1]").is_none());
        assert!(quoting_hint("A", "'[1]'").is_none());
    }
}
