//! Errors for external services that are missing at start, phrased for the person starting us.

/// A dependency (NATS, Postgres, ClickHouse, Redis) that could not be reached or set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {service} at {address}: {cause}; {hint}")]
pub struct DependencyError {
    pub service: &'static str,
    /// The address with any credentials removed.
    pub address: String,
    pub cause: String,
    pub hint: String,
}

impl DependencyError {
    pub fn new(service: &'static str, url: &str, env_key: &str, cause: impl std::fmt::Display) -> Self {
        Self {
            service,
            address: redact_url(url),
            cause: cause.to_string(),
            hint: format!("start the local stack with `infra/stack.sh up`, or point {env_key} at a running {service}"),
        }
    }
}

/// Removes the password (and user) from a URL so it can be logged or shown.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(redact_url("postgres://app:s3cret@db:5432/x"), "postgres://app:***@db:5432/x");
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("no scheme"), "no scheme");
    }
}
