//! Session settings: what a client's startup packet and SETs ask of the server session
//! (`DateStyle`, `TimeZone`, `application_name`, ...), interned so that clients with the
//! same settings share one value, and the one statement that moves a server connection from
//! one set to another. The client side decides what a client may set (`client::params`);
//! the server side's session state records which set a connection carries.

/// A client's session settings, sorted by name, with the query that applies them.
/// Clients with identical settings share one `Arc` (see [`SettingsCache`]), so "the
/// server connection already has this client's settings" is a pointer comparison.
#[derive(Debug, PartialEq, Eq)]
pub struct Settings {
    pub list: Vec<(String, String)>,
    /// ParameterStatus values PostgreSQL reported after applying them (normalized
    /// spellings such as `ISO, DMY`), once known.
    pub reported: std::sync::OnceLock<Vec<(String, String)>>,
    /// The ParameterStatus messages a client with these settings is sent at login, made
    /// once for the server's parameters they were made from (`client::startup::welcome`).
    pub welcome: std::sync::OnceLock<Welcome>,
}

/// The server's parameters and the ParameterStatus messages made from them.
pub type Welcome = (std::sync::Arc<[(String, String)]>, bytes::Bytes);

impl Settings {
    pub fn new(list: Vec<(String, String)>) -> Settings {
        Settings {
            list,
            reported: std::sync::OnceLock::new(),
            welcome: std::sync::OnceLock::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Appends what moves a server connection from `from` (None: unknown, treated as the
    /// server's defaults plus whatever was SET) to these settings: one statement,
    /// `SELECT pg_catalog.set_config($1, $2, false), ...`, a NULL value resetting what only
    /// `from` has. Names and values travel as parameters, never as SQL text. Returns false
    /// (and appends nothing) when nothing is to do.
    pub fn put_transition(&self, from: Option<&Settings>, out: &mut bytes::BytesMut) -> bool {
        let mut params: Vec<Option<&str>> = Vec::new();
        if let Some(from) = from {
            for (k, _) in &from.list {
                if self.get(k).is_none() {
                    params.extend([Some(k.as_str()), None]);
                }
            }
        }
        for (k, v) in &self.list {
            if from.and_then(|f| f.get(k)) != Some(v.as_str()) {
                params.extend([Some(k.as_str()), Some(v.as_str())]);
            }
        }
        if params.is_empty() {
            return false;
        }
        let mut sql = String::from("SELECT ");
        for i in 0..params.len() / 2 {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "pg_catalog.set_config(${}, ${}, false)",
                2 * i + 1,
                2 * i + 2
            ));
        }
        crate::protocol::put_statement(out, &sql, &params);
        true
    }
}

/// Name/value pairs, sorted by name.
pub type SettingsList = Vec<(String, String)>;

/// Interns settings so that clients with the same settings share them.
#[derive(Debug, Default)]
pub struct SettingsCache {
    map: std::sync::Mutex<std::collections::HashMap<SettingsList, std::sync::Arc<Settings>>>,
}

/// Distinct settings kept; beyond this new ones are not shared (memory stays bounded).
const MAX_INTERNED: usize = 10_000;

impl SettingsCache {
    pub fn intern(&self, list: Vec<(String, String)>) -> std::sync::Arc<Settings> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&list) {
            return s.clone();
        }
        let s = std::sync::Arc::new(Settings::new(list.clone()));
        if map.len() < MAX_INTERNED {
            map.insert(list, s.clone());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(to: &Settings, from: Option<&Settings>) -> Vec<Option<String>> {
        let mut out = bytes::BytesMut::new();
        if !to.put_transition(from, &mut out) {
            return Vec::new();
        }
        // Parse, then Bind: empty portal and statement names, one format code, the values.
        let parse_len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize + 1;
        let b = &out[parse_len..];
        assert_eq!(b[0], b'B');
        let mut pos = 5 + 1 + 1 + 2 + 2 + 2;
        let n = i16::from_be_bytes([b[pos - 2], b[pos - 1]]) as usize;
        let mut vals = Vec::new();
        for _ in 0..n {
            let len = i32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
            pos += 4;
            if len < 0 {
                vals.push(None);
            } else {
                vals.push(Some(
                    String::from_utf8_lossy(&b[pos..pos + len as usize]).into(),
                ));
                pos += len as usize;
            }
        }
        vals
    }

    #[test]
    fn transitions_set_what_differs_and_reset_the_rest() {
        let s = |v: &str| Some(v.to_string());
        let a = Settings::new(vec![
            ("datestyle".into(), "SQL, DMY".into()),
            ("timezone".into(), "UTC".into()),
        ]);
        let b = Settings::new(vec![("timezone".into(), "Asia/Tokyo".into())]);
        assert_eq!(
            transition(&b, Some(&a)),
            vec![s("datestyle"), None, s("timezone"), s("Asia/Tokyo")]
        );
        assert!(transition(&a, Some(&a)).is_empty());
        assert_eq!(
            transition(&a, None),
            vec![s("datestyle"), s("SQL, DMY"), s("timezone"), s("UTC")]
        );
        // Values are parameters: quotes and backslashes travel as they are.
        let q = Settings::new(vec![(
            "application_name".into(),
            r"x\'; SET ROLE r; --".into(),
        )]);
        assert_eq!(
            transition(&q, None),
            vec![s("application_name"), s(r"x\'; SET ROLE r; --")]
        );
    }
}
