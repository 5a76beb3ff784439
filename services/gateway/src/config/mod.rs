//! The configuration API under `/v1/config`: commands append events to the CONFIG stream (the
//! record), reads come from the Postgres projection.
//!
//! - entities: `POST /v1/config/{kind}`, `GET /v1/config/{kind}`, and `GET`, `PUT`, `PATCH`
//!   (JSON merge patch), `DELETE` on `/v1/config/{kind}/{name}`, where `kind` is `routes`,
//!   `upstreams`, `consumers` or `policies`;
//! - API keys: `POST /v1/config/consumers/{name}/keys` (the key is shown once),
//!   `DELETE /v1/config/consumers/{name}/keys/{key_id}`;
//! - the ledger: `GET /v1/config/history`, `GET /v1/config/snapshot?at=`, `GET /v1/config/export`,
//!   `POST /v1/config/apply` (a whole document as one change set), `POST /v1/config/revert`.
//!
//! Reads accept `min_seq` (query) or `Stone-Min-Seq` (header) and wait, at most five seconds,
//! until the projection has applied that sequence: a client passes the `stream_seq` of its write
//! to read its own write. Writes need scope `write` (keys and revert `admin`), reads `read`.

pub mod changes;
pub mod entities;
pub mod error;
pub mod ledger;
pub mod openapi;
pub mod read;

use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::routing::{delete, get, post};
use sqlx::PgPool;
use stone_events::config::EntityKind;

pub use self::error::ConfigApiError;
pub use self::ledger::Ledger;
use crate::AppState;

/// The response header carrying the projection checkpoint a read saw, or the stream sequence of
/// a write.
pub const CONFIG_SEQ_HEADER: &str = "stone-config-seq";
/// The request header asking a read to wait for a sequence (as `min_seq`).
pub const MIN_SEQ_HEADER: &str = "stone-min-seq";

/// What the config API needs: the projection to read and the ledger to write.
#[derive(Clone, Debug)]
pub struct ConfigContext {
    pub pool: PgPool,
    pub ledger: Ledger,
}

/// Every config route, and the token endpoints that guard them.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(crate::auth::api::routes())
        .route("/v1/config/history", get(changes::history))
        .route("/v1/config/snapshot", get(changes::snapshot))
        .route("/v1/config/export", get(changes::export))
        .route("/v1/config/apply", post(changes::apply))
        .route("/v1/config/revert", post(changes::revert))
        .route("/v1/config/consumers/{name}/keys", post(changes::create_key))
        .route("/v1/config/consumers/{name}/keys/{key_id}", delete(changes::revoke_key))
        .route("/v1/config/{kind}", get(entities::list).post(entities::create))
        .route(
            "/v1/config/{kind}/{name}",
            get(entities::get_one).put(entities::replace).patch(entities::patch).delete(entities::remove),
        )
}

pub(crate) fn context(state: &AppState) -> Result<&ConfigContext, ConfigApiError> {
    state.config.as_ref().ok_or(ConfigApiError::Disabled)
}

/// `routes` → the route kind; anything else is an unknown collection.
pub(crate) fn kind_of(collection: &str) -> Result<EntityKind, ConfigApiError> {
    EntityKind::from_plural(collection)
        .ok_or_else(|| ConfigApiError::NotFound { kind: "collection", name: collection.to_owned() })
}

/// The sequence a read must wait for: `min_seq` from the query, else the header.
pub(crate) fn min_seq(query: Option<u64>, headers: &HeaderMap) -> Result<u64, ConfigApiError> {
    if let Some(sequence) = query {
        return Ok(sequence);
    }
    match headers.get(MIN_SEQ_HEADER) {
        None => Ok(0),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| ConfigApiError::invalid_parameter(MIN_SEQ_HEADER, "must be a non-negative integer")),
    }
}

pub(crate) fn seq_header(sequence: u64) -> (HeaderName, HeaderValue) {
    (HeaderName::from_static(CONFIG_SEQ_HEADER), HeaderValue::from(sequence))
}

/// A query string that does not parse names no single field: report it as the query.
pub(crate) fn query_error(rejection: axum::extract::rejection::QueryRejection) -> ConfigApiError {
    let message = rejection.body_text();
    let field = message.split('`').nth(1).unwrap_or("query").to_owned();
    ConfigApiError::invalid_parameter(field, message)
}
