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
    if let Some((name, _)) = out.iter().find(|(k, _)| !valid_name(k)) {
        return Err(PgError::fatal(
            "42704",
            format!("unrecognized configuration parameter \"{name}\""),
        ));
    }
    // Later values win (options after the packet's own parameters), as in PostgreSQL. A
    // stable sort by name keeps a name's values in their order: the last one of each run
    // wins. (Not a search per name: a 10 kB startup packet holds ~1,500 names, and that
    // quadratic pass cost ~20 ms of CPU before authentication.)
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut dedup: Vec<(String, String)> = Vec::with_capacity(out.len());
    for (k, v) in out {
        match dedup.last_mut() {
            Some(e) if e.0 == k => e.1 = v,
            _ => dedup.push((k, v)),
        }
    }
    Ok(dedup)
}

/// GUC names as PostgreSQL writes them: letters, digits, `_` and `.` (custom classes).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// Parameters PostgreSQL reports with ParameterStatus (GUC_REPORT) that a client may change
/// with SET and that tenantpool therefore follows (lowercase).
pub const TRACKED_REPORTS: [&str; 6] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
];

/// Every parameter PostgreSQL reports with ParameterStatus (GUC_REPORT) that a client may
/// set at startup (lowercase; names from [`valid_name`], so safe in SQL text).
pub const REPORTED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

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

    /// The (name, value) parameters of the Bind in a transition.
    #[test]
    fn later_values_win_and_names_are_checked() {
        let mut p = std::collections::BTreeMap::new();
        p.insert("TimeZone".to_string(), "UTC".to_string());
        p.insert("options".to_string(), "-c timezone=Asia/Tokyo".to_string());
        assert_eq!(
            session_settings(&p).unwrap(),
            vec![("timezone".to_string(), "Asia/Tokyo".to_string())]
        );
        p.insert("options".to_string(), "-c x;drop=1".to_string());
        assert_eq!(session_settings(&p).unwrap_err().code, "42704");
    }

    #[test]
    fn many_parameters_cost_little() {
        // The startup fuzz target ran slowly on packets full of parameters: deduplication
        // searched the list once per name (~20 ms for a 10 kB packet, before authentication).
        let mut p = std::collections::BTreeMap::new();
        for i in 0..20_000 {
            p.insert(format!("k{i}"), i.to_string());
        }
        p.insert("options".into(), "-c k7=x -c k7=y".into());
        let t = std::time::Instant::now();
        let s = session_settings(&p).unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(s.len(), 20_000);
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(s.iter().find(|(n, _)| n == "k7").unwrap().1, "y");
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
