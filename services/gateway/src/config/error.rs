//! The config API's errors and their HTTP mapping, in the gateway's one body shape
//! (`{"error": {code, message, field?}}`, see [`crate::error::ErrorBody`]).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use stone_events::config::validation::{FieldError, InUseError, ValidationError};

use crate::error::{ErrorBody, ErrorDetail};

/// Everything a config API request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigApiError {
    /// A field of the entity (or document) is invalid: 400 `invalid_field`.
    #[error("{message}")]
    InvalidField { field: String, message: String },
    /// A query parameter or header is invalid: 400 `invalid_parameter`.
    #[error("{message}")]
    InvalidParameter { field: String, message: String },
    #[error("no {kind} named {name:?}")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// Another writer changed the configuration at the same time; nothing was applied.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    InUse(InUseError),
    /// `If-Match` named another version.
    #[error("{kind} {name:?} is at version {current}, not {expected}")]
    PreconditionFailed { kind: &'static str, name: String, expected: String, current: u64 },
    /// The projection did not reach the requested sequence in time.
    #[error("the config projection has reached sequence {reached}, not {wanted}; retry later")]
    Lagging { wanted: u64, reached: u64 },
    #[error("{dependency} is unavailable")]
    Unavailable { dependency: &'static str, detail: String },
    /// The gateway runs without the config API (no Postgres or NATS given to it).
    #[error("the config API is not enabled on this gateway")]
    Disabled,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ConfigApiError {
    pub fn invalid_parameter(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter { field: field.into(), message: message.into() }
    }

    pub fn postgres(error: sqlx::Error) -> Self {
        Self::Unavailable { dependency: "Postgres", detail: error.to_string() }
    }

    pub fn nats(error: impl std::fmt::Display) -> Self {
        Self::Unavailable { dependency: "NATS", detail: error.to_string() }
    }

    /// A body that does not deserialise: serde names a missing or unknown field in backticks
    /// (``missing field `upstream` ``), which becomes `routes.upstream`; other errors name the
    /// body itself.
    pub fn from_body_error(prefix: &str, error: &serde_json::Error) -> Self {
        let message = error.to_string();
        let names_a_field = message.starts_with("missing field") || message.starts_with("unknown field");
        let named = message.split('`').nth(1).filter(|name| names_a_field && !name.is_empty() && !name.contains(' '));
        let field = match named {
            Some(name) => join_field(prefix, name),
            None => prefix.to_owned(),
        };
        Self::InvalidField { field, message }
    }

    /// As [`Self::from_body_error`] with the path serde was at (`targets[0].weight`), so type
    /// errors deep in a body name their field too.
    pub fn from_path_error(prefix: &str, error: &serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = error.path().to_string();
        if path.is_empty() || path == "." {
            return Self::from_body_error(prefix, error.inner());
        }
        Self::InvalidField { field: join_field(prefix, &path), message: error.inner().to_string() }
    }
}

/// `routes` + `paths[0]` → `routes.paths[0]`; an empty prefix leaves the path as it is.
fn join_field(prefix: &str, path: &str) -> String {
    if prefix.is_empty() { path.to_owned() } else { format!("{prefix}.{path}") }
}

/// Deserialises a body, naming the field at fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(prefix: &str, bytes: &[u8]) -> Result<T, ConfigApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| ConfigApiError::from_path_error(prefix, &error))
}

/// Deserialises a JSON value, naming the field at fault.
pub fn parse_value<T: serde::de::DeserializeOwned>(
    prefix: &str,
    value: serde_json::Value,
) -> Result<T, ConfigApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| ConfigApiError::from_path_error(prefix, &error))
}

impl From<FieldError> for ConfigApiError {
    fn from(error: FieldError) -> Self {
        Self::InvalidField { field: error.field, message: error.message }
    }
}

impl From<ValidationError> for ConfigApiError {
    fn from(error: ValidationError) -> Self {
        match error {
            ValidationError::Field(field) => field.into(),
            ValidationError::InUse(in_use) => Self::InUse(in_use),
        }
    }
}

impl IntoResponse for ConfigApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code, field) = match self {
            Self::InvalidField { field, .. } => (StatusCode::BAD_REQUEST, "invalid_field", Some(field)),
            Self::InvalidParameter { field, .. } => (StatusCode::BAD_REQUEST, "invalid_parameter", Some(field)),
            Self::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            Self::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists", Some("name".to_owned())),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            Self::InUse(in_use) => (StatusCode::CONFLICT, "in_use", Some(format!("{}.name", in_use.kind.plural()))),
            Self::PreconditionFailed { .. } => (StatusCode::PRECONDITION_FAILED, "precondition_failed", None),
            Self::Lagging { .. } => (StatusCode::SERVICE_UNAVAILABLE, "projection_lagging", None),
            Self::Unavailable { dependency, detail } => {
                tracing::warn!(dependency, error = %detail, "dependency unavailable, answering 503");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None)
            }
            Self::Disabled => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            Self::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error, answering 500");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        let message = match code {
            "unavailable" if message != ConfigApiError::Disabled.to_string() => format!("{message}; retry later"),
            _ => message,
        };
        let mut response = (status, Json(ErrorBody { error: ErrorDetail { code, message, field } })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
