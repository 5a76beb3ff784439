//! The SQL migrations of both stores, embedded in the binary so a deployed service needs no files
//! beside it. A test checks that every file under `migrations/` is listed here.

/// One ordered migration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// `migrations/postgres/*.sql`, in order.
pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "config_projection",
        sql: include_str!("../../../migrations/postgres/0001_config_projection.sql"),
    },
    Migration {
        version: 2,
        name: "config_ledger",
        sql: include_str!("../../../migrations/postgres/0002_config_ledger.sql"),
    },
];

/// `migrations/clickhouse/*.sql`, in order.
pub const CLICKHOUSE: &[Migration] = &[
    Migration { version: 1, name: "requests", sql: include_str!("../../../migrations/clickhouse/0001_requests.sql") },
    Migration { version: 2, name: "analytics", sql: include_str!("../../../migrations/clickhouse/0002_analytics.sql") },
    Migration {
        version: 3,
        name: "consumer_usage",
        sql: include_str!("../../../migrations/clickhouse/0003_consumer_usage.sql"),
    },
    Migration {
        version: 4,
        name: "cache_event_count",
        sql: include_str!("../../../migrations/clickhouse/0004_cache_event_count.sql"),
    },
];

/// Splits a file into statements at `;` outside quotes and comments (the ClickHouse HTTP
/// interface takes one statement per request).
pub fn statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(character) = chars.next() {
        match quote {
            Some(open) => {
                current.push(character);
                if character == '\\' {
                    if let Some(escaped) = chars.next() {
                        current.push(escaped);
                    }
                } else if character == open {
                    quote = None;
                }
            }
            None if character == '-' && chars.peek() == Some(&'-') => {
                // A line comment: skip to the end of the line.
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            None if character == ';' => {
                if !current.trim().is_empty() {
                    statements.push(current.trim().to_owned());
                }
                current.clear();
            }
            None => {
                if matches!(character, '\'' | '"' | '`') {
                    quote = Some(character);
                }
                current.push(character);
            }
        }
    }
    if !current.trim().is_empty() {
        statements.push(current.trim().to_owned());
    }
    statements
}

/// A stable checksum of a migration's text (FNV-1a), to detect edits of applied migrations.
pub fn checksum(sql: &str) -> u64 {
    sql.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed_files(directory: &str) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations").join(directory);
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map(|entries| {
                entries.filter_map(Result::ok).map(|entry| entry.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default();
        names.retain(|name| name.ends_with(".sql"));
        names.sort();
        names
    }

    fn embedded(migrations: &[Migration]) -> Vec<String> {
        migrations.iter().map(|migration| format!("{:04}_{}.sql", migration.version, migration.name)).collect()
    }

    #[test]
    fn every_migration_file_is_embedded_in_order() {
        assert_eq!(embedded(POSTGRES), listed_files("postgres"));
        assert_eq!(embedded(CLICKHOUSE), listed_files("clickhouse"));
        for list in [POSTGRES, CLICKHOUSE] {
            assert!(list.windows(2).all(|pair| pair[0].version < pair[1].version));
        }
    }

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let sql = "-- a comment; not a split\nCREATE TABLE a (x String DEFAULT 'a;b');\n\nSELECT 1;  \n";
        assert_eq!(statements(sql), vec!["CREATE TABLE a (x String DEFAULT 'a;b')".to_owned(), "SELECT 1".to_owned()]);
    }
}
