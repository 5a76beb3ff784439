//! The gateway's one error type and its HTTP mapping: every handler returns [`ApiError`], and
//! [`IntoResponse`] turns it into a status and a `{"error": {code, message, field?}}` body in one
//! `match`. Internal details (a ClickHouse error text, a bug) are logged here, once, and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::time_range::TimeRangeError;

/// Everything a gateway request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query parameter (or the query string itself, when `field` is `None`) is invalid.
    #[error("{message}")]
    InvalidParameter { field: Option<String>, message: String },
    #[error("no such endpoint: {path}")]
    NotFound { path: String },
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency failed in a way that may pass (down, overloaded, not migrated yet): clients
    /// should retry.
    #[error("{dependency} is unavailable")]
    Unavailable {
        dependency: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    /// A bounded resource (live streams) is used up; retry later.
    #[error("{message}")]
    Overloaded { message: String },
    /// A bug on our side, such as a query whose result does not match the row type.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// A `{"error": {code, message, field?}}` response for handlers whose errors do not fit
/// [`ApiError`] (conflicts, accepted-with-problem answers).
pub fn respond(status: StatusCode, code: &'static str, message: &str, field: Option<&str>) -> Response {
    let body = ErrorBody { error: ErrorDetail { code, message: message.to_owned(), field: field.map(str::to_owned) } };
    (status, Json(body)).into_response()
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter { field: Some(field.into()), message: message.into() }
    }
}

impl From<TimeRangeError> for ApiError {
    fn from(error: TimeRangeError) -> Self {
        Self::invalid(error.field(), error.to_string())
    }
}

impl From<clickhouse::error::Error> for ApiError {
    fn from(error: clickhouse::error::Error) -> Self {
        use clickhouse::error::Error as ClickHouseError;
        // The server's own errors (`BadResponse`) are mostly transient here: the table not yet
        // created by the projector, memory or concurrency limits. Decoding errors are ours.
        match error {
            ClickHouseError::Network(_) | ClickHouseError::TimedOut | ClickHouseError::BadResponse(_) => {
                Self::Unavailable { dependency: "ClickHouse", source: error }
            }
            other => Self::Internal(anyhow::Error::new(other).context("clickhouse query")),
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_parameter`, `not_found`, `method_not_allowed`,
    /// `unavailable` or `internal`.
    #[schema(example = "invalid_parameter")]
    pub code: &'static str,
    /// For people; may change between releases.
    #[schema(example = "\"soon\" is not a time")]
    pub message: String,
    /// The query parameter at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "from")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, field) = match self {
            Self::InvalidParameter { field, message } => (StatusCode::BAD_REQUEST, "invalid_parameter", message, field),
            Self::NotFound { path } => (StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}"), None),
            Self::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed".to_owned(), None)
            }
            Self::Unavailable { dependency, source } => {
                tracing::warn!(dependency, error = %source, "dependency unavailable, answering 503");
                let message = format!("{dependency} is unavailable; retry later");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message, None)
            }
            Self::Overloaded { message } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", message, None),
            Self::Internal(source) => {
                tracing::error!(error = format!("{source:#}"), "internal error, answering 500");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error".to_owned(), None)
            }
        };
        (status, Json(ErrorBody { error: ErrorDetail { code, message, field } })).into_response()
    }
}
