//! PostgreSQL passwords where libpq looks for them: `PGPASSWORD`, then the password file
//! (`PGPASSFILE`, else `~/.pgpass`: `host:port:database:user:password` lines, `*` matching
//! anything, `\:` and `\\` escaped; ignored unless only its owner can read it, as libpq does).

use postgres::config::Host;

/// The password for a connection `config` describes, if the environment or the password file
/// has one.
pub fn password_for(config: &postgres::Config) -> Option<String> {
    if let Ok(p) = std::env::var("PGPASSWORD")
        && !p.is_empty()
    {
        return Some(p);
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return None;
        }
    }
    let text = std::fs::read_to_string(&file).ok()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        // libpq matches a socket directory as `localhost`.
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let dbname = config.get_dbname().unwrap_or(&user).to_string();
    lookup(&text, [&host, &port, &dbname, &user])
}

/// The password of the first line of `text` whose four fields match `wanted`.
fn lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split(line);
        if fields.len() < 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field == "*" || field == want)
        {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

/// A line's fields, split on unescaped colons, escapes removed.
fn split(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().unwrap().push(next);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let file =
            "# comment\nother:5432:*:me:no\ndb.local:5432:insp:me:s\\:e\\\\cret\n*:*:*:*:any\n";
        assert_eq!(
            lookup(file, ["db.local", "5432", "insp", "me"]).as_deref(),
            Some("s:e\\cret")
        );
        assert_eq!(lookup(file, ["x", "1", "y", "z"]).as_deref(), Some("any"));
        assert_eq!(lookup("a:1:b:c:p\n", ["a", "2", "b", "c"]), None);
    }
}
