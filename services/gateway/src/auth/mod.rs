//! Bearer-token authentication with scopes for the gateway API.
//!
//! Tokens look like `stn_<id>_<secret>`: the id finds the row in `api_tokens`, and only the
//! SHA-256 of the whole token is stored, so a database dump does not reveal a usable token. Scopes
//! are ordered: `admin` may do what `write` may, and `write` what `read` may.
//!
//! Handlers ask for a scope with an extractor, [`RequireScope`]: `RequireScope<Write>` answers
//! 401 (with `WWW-Authenticate: Bearer`) when the token is missing or unknown, and 403 when it is
//! valid but its scope is too small.

pub mod api;

use std::marker::PhantomData;

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stone_events::config::sha256_hex;

use crate::AppState;
use crate::error::{ErrorBody, ErrorDetail};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; recorded as the `actor` of config changes.
    pub name: String,
    pub scope: Scope,
}

/// A scope required by a handler, as a type.
pub trait RequiredScope {
    const SCOPE: Scope;
}

/// Marker: the `read` scope.
#[derive(Debug)]
pub struct Read;
/// Marker: the `write` scope.
#[derive(Debug)]
pub struct Write;
/// Marker: the `admin` scope.
#[derive(Debug)]
pub struct Admin;

impl RequiredScope for Read {
    const SCOPE: Scope = Scope::Read;
}
impl RequiredScope for Write {
    const SCOPE: Scope = Scope::Write;
}
impl RequiredScope for Admin {
    const SCOPE: Scope = Scope::Admin;
}

/// Extractor: the request carries a valid bearer token with at least scope `S`.
#[derive(Debug)]
pub struct RequireScope<S> {
    pub caller: Caller,
    required: PhantomData<S>,
}

/// Why a request was not authorised.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid or revoked token")]
    Invalid,
    #[error("this endpoint needs a token with scope {required}; yours has {held}")]
    InsufficientScope { required: &'static str, held: &'static str },
    #[error("token store unavailable")]
    Unavailable(#[source] Option<sqlx::Error>),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code, challenge) = match &self {
            Self::Missing => (StatusCode::UNAUTHORIZED, "unauthorized", "Bearer realm=\"stone\"".to_owned()),
            Self::Invalid => {
                (StatusCode::UNAUTHORIZED, "unauthorized", "Bearer realm=\"stone\", error=\"invalid_token\"".to_owned())
            }
            Self::InsufficientScope { required, .. } => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("Bearer realm=\"stone\", error=\"insufficient_scope\", scope=\"{required}\""),
            ),
            Self::Unavailable(source) => {
                tracing::warn!(error = ?source, "token store unavailable, answering 503");
                let body = ErrorBody {
                    error: ErrorDetail {
                        code: "unavailable",
                        message: "Postgres is unavailable; retry later".to_owned(),
                        field: None,
                    },
                };
                return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            }
        };
        let body = ErrorBody { error: ErrorDetail { code, message, field: None } };
        let mut response = (status, Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Works in any router whose state can hand out the [`AppState`] (its token store).
impl<S, St> FromRequestParts<St> for RequireScope<S>
where
    S: RequiredScope + Send + Sync,
    St: Send + Sync,
    AppState: axum::extract::FromRef<St>,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, Self::Rejection> {
        let state = <AppState as axum::extract::FromRef<St>>::from_ref(state);
        let token = bearer_token(parts).ok_or(AuthError::Missing)?;
        let pool = state.token_store().ok_or(AuthError::Unavailable(None))?;
        let caller = authenticate(pool, token).await?;
        if caller.scope < S::SCOPE {
            return Err(AuthError::InsufficientScope { required: S::SCOPE.as_str(), held: caller.scope.as_str() });
        }
        Ok(Self { caller, required: PhantomData })
    }
}

fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|token| !token.is_empty())
}

/// Looks a token up by its id and checks its hash.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Caller, AuthError> {
    let (id, _) = split_secret(token, "stn").ok_or(AuthError::Invalid)?;
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT name, scope, secret_sha256 FROM api_tokens WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(|error| AuthError::Unavailable(Some(error)))?;
    let (name, scope, stored_hash) = row.ok_or(AuthError::Invalid)?;
    if !constant_time_eq(sha256_hex(token).as_bytes(), stored_hash.as_bytes()) {
        return Err(AuthError::Invalid);
    }
    let scope = Scope::parse(&scope).ok_or(AuthError::Invalid)?;
    Ok(Caller { name, scope })
}

/// A new secret `<prefix>_<id>_<secret>` and its id: 48 random bits of id, 256 of secret.
pub fn generate_secret(prefix: &str) -> (String, String) {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex(&id);
    (format!("{prefix}_{id}_{}", hex(&secret)), id)
}

/// `(id, secret)` of `<prefix>_<id>_<secret>`.
pub fn split_secret<'a>(token: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = token.strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Compares without an early exit, so timing does not reveal how much of a hash matched.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A token that was just created; `token` is shown once and never stored.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub token: String,
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateTokenError {
    #[error("a token named {0:?} already exists")]
    NameTaken(String),
    #[error("token names are 1 to 64 letters, digits, '_' or '-'")]
    InvalidName,
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// Creates a token (the bootstrap step of `stone token create` and `stone dev`).
pub async fn create_token(pool: &PgPool, name: &str, scope: Scope) -> Result<CreatedToken, CreateTokenError> {
    if stone_events::config::validation::check_name("name", name).is_err() {
        return Err(CreateTokenError::InvalidName);
    }
    let (token, id) = generate_secret("stn");
    let inserted = sqlx::query(
        "INSERT INTO api_tokens (id, name, scope, secret_sha256) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(name)
    .bind(scope.as_str())
    .bind(sha256_hex(&token))
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(CreateTokenError::NameTaken(name.to_owned()));
    }
    Ok(CreatedToken { id, name: name.to_owned(), scope, token })
}

/// Revokes a token by name; false when there was none.
pub async fn revoke_token(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let revoked = sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(revoked.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_split_and_differ() {
        let (token, id) = generate_secret("stn");
        assert_eq!(split_secret(&token, "stn").map(|(found, _)| found.to_owned()), Some(id));
        assert_ne!(generate_secret("stn").0, token);
        assert!(split_secret("stn__x", "stn").is_none());
        assert!(split_secret("sk_a_b", "stn").is_none());
        assert!(Scope::Admin > Scope::Write && Scope::Write > Scope::Read);
        assert!(constant_time_eq(b"ab", b"ab") && !constant_time_eq(b"ab", b"ac") && !constant_time_eq(b"a", b"ab"));
    }
}
