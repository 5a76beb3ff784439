//! CRUD of one entity: create, read, list, replace (`PUT`), merge-patch (`PATCH`), delete.
//!
//! Writes answer with the entity, its `version` (also the `ETag`) and the `stream_seq` of the
//! event; `If-Match` on `PUT`, `PATCH` and `DELETE` is honoured (412 when the entity moved on).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use stone_events::config::validation::ProposedChange;
use stone_events::config::{ConfigOp, ConsumerSpec, EntityKind, EntitySpec};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ConfigApiError, parse_value};
use super::ledger::{Committed, LedgerState};
use super::read::{self, EntityRecord};
use super::{context, kind_of, min_seq, query_error, seq_header};
use crate::AppState;
use crate::auth::{Read, RequireScope, Write};

/// `min_seq`: wait until the projection has applied this stream sequence (read-your-writes).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Wait (at most 5 s) until the projection has applied this CONFIG stream sequence.
    pub min_seq: Option<u64>,
}

/// The answer to a write.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WriteResult {
    #[schema(value_type = String, example = "route")]
    pub kind: EntityKind,
    pub name: String,
    pub id: Uuid,
    /// The entity's version after the write; also the `ETag`.
    pub version: u64,
    /// The CONFIG stream sequence of the event; pass it as `min_seq` to read this write.
    pub stream_seq: u64,
    /// Whether the entity is gone after the write.
    pub deleted: bool,
    /// The entity's spec after the write (absent after a delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub spec: Option<serde_json::Value>,
}

/// A list of entities and the checkpoint it was read at.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntityList {
    pub items: Vec<EntityRecord>,
    /// The projection's checkpoint when the list was read.
    pub checkpoint: u64,
}

/// `If-Match`: `*` (any existing version) or a version, quoted or not, weak or strong.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IfMatch {
    Any,
    Version(String),
}

fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ConfigApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().map_err(|_| ConfigApiError::invalid_parameter("If-Match", "must be ASCII"))?.trim();
    if text == "*" {
        return Ok(Some(IfMatch::Any));
    }
    let version = text.trim_start_matches("W/").trim_matches('"');
    Ok(Some(IfMatch::Version(version.to_owned())))
}

/// 412 when `If-Match` names something else than the current version.
fn check_if_match(
    kind: EntityKind,
    name: &str,
    current_version: Option<u64>,
    condition: Option<&IfMatch>,
) -> Result<(), ConfigApiError> {
    let holds = match (condition, current_version) {
        (None, _) => true,
        (Some(IfMatch::Any), current) => current.is_some(),
        (Some(IfMatch::Version(expected)), Some(current)) => expected == &current.to_string(),
        (Some(IfMatch::Version(_)), None) => false,
    };
    if holds {
        return Ok(());
    }
    let expected = match condition {
        Some(IfMatch::Version(version)) => version.clone(),
        _ => "*".to_owned(),
    };
    Err(ConfigApiError::PreconditionFailed {
        kind: kind.as_str(),
        name: name.to_owned(),
        expected,
        current: current_version.unwrap_or(0),
    })
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Parses a body into a spec of `kind`, naming the field that is wrong.
pub(crate) fn parse_spec(kind: EntityKind, body: serde_json::Value) -> Result<EntitySpec, ConfigApiError> {
    let prefix = kind.plural();
    Ok(match kind {
        EntityKind::Route => EntitySpec::Route(parse_value(prefix, body)?),
        EntityKind::Upstream => EntitySpec::Upstream(parse_value(prefix, body)?),
        EntityKind::Consumer => EntitySpec::Consumer(parse_value(prefix, body)?),
        EntityKind::Policy => EntitySpec::Policy(parse_value(prefix, body)?),
    })
}

pub(crate) fn parse_json(kind: EntityKind, body: &Bytes) -> Result<serde_json::Value, ConfigApiError> {
    serde_json::from_slice(body).map_err(|error| ConfigApiError::InvalidField {
        field: kind.plural().to_owned(),
        message: format!("the body is not JSON: {error}"),
    })
}

/// API keys are managed by their own endpoints: a written consumer keeps its current keys.
fn keep_api_keys(spec: EntitySpec, state: &LedgerState) -> EntitySpec {
    match spec {
        EntitySpec::Consumer(consumer) => {
            let api_keys = match state.config.get(EntityKind::Consumer, &consumer.name).map(|entity| &entity.spec) {
                Some(EntitySpec::Consumer(existing)) => existing.api_keys.clone(),
                _ => Vec::new(),
            };
            EntitySpec::Consumer(ConsumerSpec { api_keys, ..consumer })
        }
        other => other,
    }
}

/// The response of a write: the event written, or (when nothing had to change) the entity as is.
pub(crate) fn write_response(
    status: StatusCode,
    committed: &Committed,
    state_after: impl FnOnce() -> Option<WriteResult>,
) -> Result<Response, ConfigApiError> {
    let result = match committed.events.last() {
        Some((stream_seq, change)) => WriteResult {
            kind: change.kind,
            name: change.name.clone(),
            id: change.id,
            version: change.version,
            stream_seq: *stream_seq,
            deleted: change.op == ConfigOp::Deleted,
            spec: change
                .spec
                .as_ref()
                .map(EntitySpec::to_body)
                .transpose()
                .map_err(|error| ConfigApiError::Internal(error.into()))?,
        },
        None => state_after().ok_or_else(|| ConfigApiError::Internal(anyhow::anyhow!("unchanged entity vanished")))?,
    };
    let status = if committed.events.is_empty() { StatusCode::OK } else { status };
    let mut response = (status, [seq_header(result.stream_seq)], Json(&result)).into_response();
    if !result.deleted {
        response.headers_mut().insert(header::ETAG, etag(result.version));
    }
    Ok(response)
}

fn unchanged(state: &LedgerState, kind: EntityKind, name: &str) -> Option<WriteResult> {
    let entity = state.config.get(kind, name)?;
    Some(WriteResult {
        kind,
        name: name.to_owned(),
        id: entity.id,
        version: entity.version,
        stream_seq: entity.stream_seq,
        deleted: false,
        spec: entity.spec.to_body().ok(),
    })
}

/// Creates an entity; 409 when one of that name exists.
#[utoipa::path(
    post, path = "/v1/config/{kind}", tag = "config",
    params(("kind" = String, Path, description = "routes, upstreams, consumers or policies")),
    request_body(content = Object, description = "the entity's spec"),
    responses(
        (status = 201, description = "created", body = WriteResult),
        (status = 400, description = "invalid field", body = crate::error::ErrorBody),
        (status = 401, description = "no valid token", body = crate::error::ErrorBody),
        (status = 403, description = "scope too small", body = crate::error::ErrorBody),
        (status = 409, description = "exists already, or a concurrent change", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn create(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Write>,
    Path(collection): Path<String>,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let spec = parse_spec(kind, parse_json(kind, &body)?)?;
    let name = spec.name().to_owned();
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            if current.config.get(kind, &name).is_some() {
                return Err(ConfigApiError::AlreadyExists { kind: kind.as_str(), name: name.clone() });
            }
            Ok(vec![ProposedChange::upsert(keep_api_keys(spec.clone(), current))])
        })
        .await?;
    write_response(StatusCode::CREATED, &committed, || None)
}

/// Replaces an entity, or creates it when absent (without `If-Match`).
#[utoipa::path(
    put, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("If-Match" = Option<String>, Header, description = "the version the change is based on")),
    request_body(content = Object, description = "the entity's full spec"),
    responses(
        (status = 200, description = "replaced (or unchanged)", body = WriteResult),
        (status = 201, description = "created", body = WriteResult),
        (status = 400, description = "invalid field", body = crate::error::ErrorBody),
        (status = 409, description = "a concurrent change", body = crate::error::ErrorBody),
        (status = 412, description = "If-Match does not hold", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn replace(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Write>,
    Path((collection, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let condition = if_match(&headers)?;
    let mut body = parse_json(kind, &body)?;
    name_from_path(kind, &name, &mut body)?;
    let spec = parse_spec(kind, body)?;
    let mut created = false;
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            let existing = current.config.get(kind, &name);
            check_if_match(kind, &name, existing.map(|entity| entity.version), condition.as_ref())?;
            created = existing.is_none();
            let spec = keep_api_keys(spec.clone(), current);
            if existing.is_some_and(|entity| entity.spec == spec) {
                return Ok(Vec::new());
            }
            Ok(vec![ProposedChange::upsert(spec)])
        })
        .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    write_response(status, &committed, || unchanged(&context.ledger.snapshot(), kind, &name))
}

/// The name in a body must be the one in the path; a body without one gets it.
fn name_from_path(kind: EntityKind, name: &str, body: &mut serde_json::Value) -> Result<(), ConfigApiError> {
    let Some(object) = body.as_object_mut() else {
        return Err(ConfigApiError::InvalidField {
            field: kind.plural().to_owned(),
            message: "the body must be a JSON object".to_owned(),
        });
    };
    match object.get("name") {
        None => {
            object.insert("name".to_owned(), serde_json::Value::String(name.to_owned()));
            Ok(())
        }
        Some(serde_json::Value::String(given)) if given == name => Ok(()),
        Some(_) => Err(ConfigApiError::InvalidField {
            field: format!("{}.name", kind.plural()),
            message: format!("must be {name:?}, the name in the path; renaming is a create and a delete"),
        }),
    }
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch_fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(target_fields) = target {
        for (key, value) in patch_fields {
            if value.is_null() {
                target_fields.remove(key);
            } else {
                merge_patch(target_fields.entry(key.clone()).or_insert(serde_json::Value::Null), value);
            }
        }
    }
}

/// Changes some fields of an entity (JSON merge patch).
#[utoipa::path(
    patch, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body(content = Object, content_type = "application/merge-patch+json", description = "RFC 7386 merge patch of the spec"),
    responses(
        (status = 200, description = "patched", body = WriteResult),
        (status = 400, description = "invalid field", body = crate::error::ErrorBody),
        (status = 404, description = "no such entity", body = crate::error::ErrorBody),
        (status = 412, description = "If-Match does not hold", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn patch(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Write>,
    Path((collection, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let condition = if_match(&headers)?;
    let patch_body = parse_json(kind, &body)?;
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            let existing = current
                .config
                .get(kind, &name)
                .ok_or_else(|| ConfigApiError::NotFound { kind: kind.as_str(), name: name.clone() })?;
            check_if_match(kind, &name, Some(existing.version), condition.as_ref())?;
            let mut merged = existing.spec.to_body().map_err(|error| ConfigApiError::Internal(error.into()))?;
            merge_patch(&mut merged, &patch_body);
            name_from_path(kind, &name, &mut merged)?;
            let spec = keep_api_keys(parse_spec(kind, merged)?, current);
            if spec == existing.spec {
                return Ok(Vec::new());
            }
            Ok(vec![ProposedChange::upsert(spec)])
        })
        .await?;
    write_response(StatusCode::OK, &committed, || unchanged(&context.ledger.snapshot(), kind, &name))
}

/// Deletes an entity; 409 `in_use` while another entity refers to it.
#[utoipa::path(
    delete, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ("If-Match" = Option<String>, Header)),
    responses(
        (status = 200, description = "deleted", body = WriteResult),
        (status = 404, description = "no such entity", body = crate::error::ErrorBody),
        (status = 409, description = "still referenced, or a concurrent change", body = crate::error::ErrorBody),
        (status = 412, description = "If-Match does not hold", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn remove(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Write>,
    Path((collection, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let condition = if_match(&headers)?;
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            let existing = current
                .config
                .get(kind, &name)
                .ok_or_else(|| ConfigApiError::NotFound { kind: kind.as_str(), name: name.clone() })?;
            check_if_match(kind, &name, Some(existing.version), condition.as_ref())?;
            Ok(vec![ProposedChange::Delete { kind, name: name.clone() }])
        })
        .await?;
    write_response(StatusCode::OK, &committed, || None)
}

/// One entity from the projection.
#[utoipa::path(
    get, path = "/v1/config/{kind}/{name}", tag = "config",
    params(("kind" = String, Path), ("name" = String, Path), ReadQuery),
    responses(
        (status = 200, description = "the entity; ETag is its version", body = EntityRecord),
        (status = 404, description = "no such entity", body = crate::error::ErrorBody),
        (status = 503, description = "the projection did not reach min_seq in time", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn get_one(
    State(state): State<AppState>,
    _caller: RequireScope<Read>,
    Path((collection, name)): Path<(String, String)>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let Query(query) = query.map_err(query_error)?;
    let checkpoint = read::wait_for(&context.pool, min_seq(query.min_seq, &headers)?).await?;
    let record = read::entity(&context.pool, kind, &name)
        .await?
        .ok_or_else(|| ConfigApiError::NotFound { kind: kind.as_str(), name: name.clone() })?;
    let version = record.version;
    let mut response = ([seq_header(checkpoint)], Json(record)).into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

/// Every entity of a kind from the projection.
#[utoipa::path(
    get, path = "/v1/config/{kind}", tag = "config",
    params(("kind" = String, Path), ReadQuery),
    responses(
        (status = 200, description = "the entities, by name", body = EntityList),
        (status = 503, description = "the projection did not reach min_seq in time", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn list(
    State(state): State<AppState>,
    _caller: RequireScope<Read>,
    Path(collection): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let kind = kind_of(&collection)?;
    let Query(query) = query.map_err(query_error)?;
    let checkpoint = read::wait_for(&context.pool, min_seq(query.min_seq, &headers)?).await?;
    let items = read::entities(&context.pool, Some(kind)).await?;
    Ok(([seq_header(checkpoint)], Json(EntityList { items, checkpoint })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = serde_json::json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut target, &serde_json::json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, serde_json::json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn if_match_compares_versions() {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MATCH, HeaderValue::from_static("W/\"3\""));
        let condition = if_match(&headers).ok().flatten();
        assert_eq!(condition, Some(IfMatch::Version("3".to_owned())));
        assert!(check_if_match(EntityKind::Route, "r", Some(3), condition.as_ref()).is_ok());
        assert!(check_if_match(EntityKind::Route, "r", Some(4), condition.as_ref()).is_err());
        assert!(check_if_match(EntityKind::Route, "r", None, Some(&IfMatch::Any)).is_err());
    }
}
