//! `/v1/tokens`: creating, listing and revoking gateway tokens with an admin token (the first
//! admin token comes from `stone token create`).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{Admin, CreateTokenError, RequireScope, Scope, create_token, revoke_token};
use crate::AppState;
use crate::config::ConfigApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/tokens", get(list).post(create)).route("/v1/tokens/{name}", delete(revoke))
}

/// A token to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Unique; recorded as the actor of the token's changes.
    pub name: String,
    pub scope: Scope,
}

/// A new token; `token` is shown this once and only its hash is kept.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewToken {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub token: String,
}

/// A token as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scope: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<OffsetDateTime>,
}

fn store(state: &AppState) -> Result<&sqlx::PgPool, ConfigApiError> {
    state.token_store().ok_or(ConfigApiError::Disabled)
}

/// Creates a token.
#[utoipa::path(
    post, path = "/v1/tokens", tag = "tokens", request_body = TokenRequest,
    responses(
        (status = 201, description = "the token, shown once", body = NewToken),
        (status = 400, description = "invalid field", body = crate::error::ErrorBody),
        (status = 409, description = "the name is taken", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn create(
    State(state): State<AppState>,
    _caller: RequireScope<Admin>,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let request: TokenRequest = crate::config::error::parse_body("tokens", &body)?;
    let created = create_token(store(&state)?, &request.name, request.scope).await.map_err(|error| match error {
        CreateTokenError::NameTaken(name) => ConfigApiError::AlreadyExists { kind: "token", name },
        CreateTokenError::InvalidName => {
            ConfigApiError::InvalidField { field: "tokens.name".to_owned(), message: error.to_string() }
        }
        CreateTokenError::Postgres(error) => ConfigApiError::postgres(error),
    })?;
    let token = NewToken { id: created.id, name: created.name, scope: created.scope, token: created.token };
    Ok((StatusCode::CREATED, Json(token)).into_response())
}

/// Every token, revoked ones included, without secrets.
#[utoipa::path(
    get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "the tokens", body = Vec<TokenInfo>)),
    security(("bearer" = ["admin"]))
)]
pub async fn list(State(state): State<AppState>, _caller: RequireScope<Admin>) -> Result<Response, ConfigApiError> {
    let rows: Vec<(String, String, String, OffsetDateTime, Option<OffsetDateTime>)> =
        sqlx::query_as("SELECT id, name, scope, created_at, revoked_at FROM api_tokens ORDER BY name")
            .fetch_all(store(&state)?)
            .await
            .map_err(ConfigApiError::postgres)?;
    let tokens: Vec<TokenInfo> = rows
        .into_iter()
        .map(|(id, name, scope, created_at, revoked_at)| TokenInfo { id, name, scope, created_at, revoked_at })
        .collect();
    Ok(Json(tokens).into_response())
}

/// Revokes a token; it stops working at once.
#[utoipa::path(
    delete, path = "/v1/tokens/{name}", tag = "tokens", params(("name" = String, Path)),
    responses(
        (status = 204, description = "revoked"),
        (status = 404, description = "no active token of that name", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn revoke(
    State(state): State<AppState>,
    _caller: RequireScope<Admin>,
    Path(name): Path<String>,
) -> Result<Response, ConfigApiError> {
    if !revoke_token(store(&state)?, &name).await.map_err(ConfigApiError::postgres)? {
        return Err(ConfigApiError::NotFound { kind: "token", name });
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
