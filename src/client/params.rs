//! A client's startup parameters: the packet's name/value pairs and its `options` string,
//! parsed the way PostgreSQL parses them, and the ones a client may not set.

use crate::error::PgError;

/// Parameters the tenant decides; a client may not set them at startup.
pub const FORBIDDEN: [&str; 3] = ["search_path", "role", "session_authorization"];

/// Startup keys that are about the connection, not session settings.
const CONNECTION_KEYS: [&str; 4] = ["user", "database", "options", "replication"];

/// Splits an `options` string on whitespace, a backslash escaping the next character
/// (PostgreSQL's `pg_split_opts`).
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            if in_token {
                out.push(std::mem::take(&mut cur));
                in_token = false;
            }
            continue;
        }
        in_token = true;
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else {
            cur.push(c);
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

/// Parses `-c name=value`, `-cname=value` and `--name=value` settings from `options`.
/// Names are lowercased, with `-` read as `_`, as PostgreSQL does.
pub fn parse_options(s: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut out = Vec::new();
    let tokens = split_options(s);
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let setting = if t == "-c" {
            i += 1;
            tokens.get(i).cloned().ok_or_else(|| invalid(t))?
        } else if let Some(rest) = t.strip_prefix("--") {
            rest.to_string()
        } else if let Some(rest) = t.strip_prefix("-c") {
            rest.to_string()
        } else {
            return Err(invalid(t));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| PgError::fatal("42601", format!("--{setting} requires a value")))?;
        out.push((normalize(name), value.to_string()));
        i += 1;
    }
    Ok(out)
}

fn invalid(t: &str) -> PgError {
    PgError::fatal(
        "42601",
        format!("invalid command-line argument for server process: {t}"),
    )
}

fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

/// The session settings a client asked for: every startup parameter that is not about the
/// connection itself, then the `options` settings. Refuses the ones the tenant decides.
pub fn session_settings(
    params: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, PgError> {
    let mut out = Vec::new();
    for (k, v) in params {
        let key = k.to_ascii_lowercase();
        if CONNECTION_KEYS.contains(&key.as_str()) || key.starts_with("_pq_.") {
            continue;
        }
        out.push((key, v.clone()));
    }
    if let Some(opts) = params.get("options") {
        out.extend(parse_options(opts)?);
    }
    if let Some((name, _)) = out.iter().find(|(k, _)| FORBIDDEN.contains(&k.as_str())) {
        return Err(PgError::forbidden_parameter(name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_split_like_postgres() {
        assert_eq!(
            split_options(r"-c a=b  -c x=hello\ world"),
            vec!["-c", "a=b", "-c", "x=hello world"]
        );
        assert_eq!(split_options(r"\\x"), vec![r"\x"]);
    }

    #[test]
    fn options_forms() {
        let got = parse_options("-c statement_timeout=5s -cDateStyle=ISO --work-mem=64MB").unwrap();
        assert_eq!(
            got,
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("datestyle".into(), "ISO".into()),
                ("work_mem".into(), "64MB".into()),
            ]
        );
        assert_eq!(parse_options("-x").unwrap_err().code, "42601");
        assert_eq!(parse_options("-c").unwrap_err().code, "42601");
    }

    #[test]
    fn forbidden_parameters_are_refused_by_name() {
        let mut p = std::collections::BTreeMap::new();
        p.insert("user".to_string(), "app".to_string());
        p.insert(
            "options".to_string(),
            "-c search_path=tenant_globex".to_string(),
        );
        let e = session_settings(&p).unwrap_err();
        assert!(e.message.contains("search_path"), "{e}");
        let mut p = std::collections::BTreeMap::new();
        p.insert("Role".to_string(), "x".to_string());
        assert!(session_settings(&p).unwrap_err().message.contains("role"));
    }
}
