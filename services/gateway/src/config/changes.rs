//! The ledger endpoints: history, point-in-time snapshots, export, declarative apply (one change
//! set), revert (compensating events), and consumer API keys.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use stone_events::config::document::{ConfigDocument, PlannedChange, plan};
use stone_events::config::validation::{ProposedChange, validate_changes};
use stone_events::config::{ApiKeyHash, ConsumerSpec, EntityKind, EntitySpec, sha256_hex};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::entities::{ReadQuery, WriteResult, write_response};
use super::error::{ConfigApiError, parse_body};
use super::ledger::Committed;
use super::read::{self, HistoryFilter, HistoryRecord};
use super::{context, min_seq, query_error, seq_header};
use crate::AppState;
use crate::auth::{Admin, Read, RequireScope, Write, generate_secret};

const DEFAULT_HISTORY_LIMIT: u32 = 50;
const MAX_HISTORY_LIMIT: u32 = 500;

/// Filters of the history.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// `route`, `upstream`, `consumer` or `policy` (plural accepted).
    pub kind: Option<String>,
    /// An entity name.
    pub name: Option<String>,
    /// At most this many changes, 1 to 500 (default 50).
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`: only older changes.
    pub cursor: Option<u64>,
    /// Wait until the projection has applied this sequence.
    pub min_seq: Option<u64>,
}

/// A page of history, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryPage {
    pub items: Vec<HistoryRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u64>,
}

fn parse_kind(text: &str) -> Result<EntityKind, ConfigApiError> {
    EntityKind::parse(text).or_else(|| EntityKind::from_plural(text)).ok_or_else(|| {
        ConfigApiError::invalid_parameter("kind", format!("{text:?} is not one of route, upstream, consumer, policy"))
    })
}

/// Who changed what, when, with the state before and after.
#[utoipa::path(
    get, path = "/v1/config/history", tag = "config", params(HistoryQuery),
    responses(
        (status = 200, description = "changes, newest first", body = HistoryPage),
        (status = 400, description = "invalid parameter", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn history(
    State(state): State<AppState>,
    _caller: RequireScope<Read>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let Query(query) = query.map_err(query_error)?;
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
        return Err(ConfigApiError::invalid_parameter("limit", format!("must be between 1 and {MAX_HISTORY_LIMIT}")));
    }
    let filter = HistoryFilter {
        kind: query.kind.as_deref().map(parse_kind).transpose()?,
        name: query.name,
        before_seq: query.cursor,
        limit,
    };
    let checkpoint = read::wait_for(&context.pool, min_seq(query.min_seq, &headers)?).await?;
    let items = read::history(&context.pool, &filter).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|item| item.stream_seq)).flatten();
    Ok(([seq_header(checkpoint)], Json(HistoryPage { items, next_cursor })).into_response())
}

/// When a snapshot is taken: a time or a sequence.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SnapshotQuery {
    /// RFC 3339 time: the configuration as it was then.
    pub at: Option<String>,
    /// Or a CONFIG stream sequence: the configuration once that change had taken effect.
    pub seq: Option<u64>,
    pub min_seq: Option<u64>,
}

/// A configuration as of a point of the ledger.
#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    /// The last change included.
    pub as_of_seq: u64,
    /// The configuration, in the `stone apply` document format.
    #[schema(value_type = Object)]
    pub document: ConfigDocument,
}

/// The sequence a `{at | seq}` pair designates; exactly one must be given.
async fn resolve_point(
    pool: &sqlx::PgPool,
    at: Option<&str>,
    seq: Option<u64>,
    field_prefix: &str,
) -> Result<u64, ConfigApiError> {
    match (at, seq) {
        (Some(at), None) => {
            let time = parse_time(at).ok_or_else(|| {
                ConfigApiError::invalid_parameter(
                    format!("{field_prefix}at"),
                    format!("{at:?} is not an RFC 3339 time"),
                )
            })?;
            read::seq_at(pool, time).await
        }
        (None, Some(seq)) => Ok(seq),
        _ => Err(ConfigApiError::invalid_parameter(format!("{field_prefix}at"), "give exactly one of at and seq")),
    }
}

fn parse_time(text: &str) -> Option<OffsetDateTime> {
    stone_events::timestamp::parse(text).ok()
}

/// The configuration as it was at a time (or sequence), from the history.
#[utoipa::path(
    get, path = "/v1/config/snapshot", tag = "config", params(SnapshotQuery),
    responses(
        (status = 200, description = "the configuration then", body = Snapshot),
        (status = 400, description = "invalid parameter", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["read"]))
)]
pub async fn snapshot(
    State(state): State<AppState>,
    _caller: RequireScope<Read>,
    query: Result<Query<SnapshotQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let Query(query) = query.map_err(query_error)?;
    let checkpoint = read::wait_for(&context.pool, min_seq(query.min_seq, &headers)?).await?;
    let as_of_seq = resolve_point(&context.pool, query.at.as_deref(), query.seq, "").await?.min(checkpoint);
    let specs = read::specs_at(&context.pool, as_of_seq).await?;
    let document = ConfigDocument::from_specs(&specs);
    Ok(([seq_header(checkpoint)], Json(Snapshot { as_of_seq, document })).into_response())
}

/// The current configuration in the `stone apply` format (without API keys), including every
/// change accepted so far (it waits for the projection to catch up with the ledger).
#[utoipa::path(
    get, path = "/v1/config/export", tag = "config", params(ReadQuery),
    responses((status = 200, description = "the configuration document", body = Object)),
    security(("bearer" = ["read"]))
)]
pub async fn export(
    State(state): State<AppState>,
    _caller: RequireScope<Read>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let Query(query) = query.map_err(query_error)?;
    // An export is the document `stone apply` compares with, so by default it includes every
    // change the ledger has accepted, not only what the projection had applied by chance.
    let wanted = match min_seq(query.min_seq, &headers)? {
        0 => context.ledger.current().await?.last_seq,
        explicit => explicit,
    };
    let checkpoint = read::wait_for(&context.pool, wanted).await?;
    let records = read::entities(&context.pool, None).await?;
    let specs = records
        .iter()
        .map(read::EntityRecord::to_spec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ConfigApiError::Internal(anyhow::Error::new(error).context("stored spec")))?;
    Ok(([seq_header(checkpoint)], Json(ConfigDocument::from_specs(&specs))).into_response())
}

/// A desired configuration to apply as one change set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The whole desired configuration (`stone.yaml`).
    #[schema(value_type = Object)]
    pub document: ConfigDocument,
    /// Delete entities that the document does not list (default true: the document is the
    /// whole configuration).
    #[serde(default = "default_true")]
    pub prune: bool,
    /// Only compute and validate the plan.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_true() -> bool {
    true
}

/// What an apply or revert did (or would do).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApplyResult {
    /// The changes, with the state before and after each.
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<PlannedChange>,
    /// False for a dry run or an empty plan.
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_set: Option<Uuid>,
    /// The stream sequence of the last event written (or the ledger's position when nothing was
    /// written); pass it as `min_seq` to read the result.
    pub stream_seq: u64,
}

/// Computes the plan from `desired` on the current state and, unless `dry_run`, appends it as
/// one change set.
async fn apply_document(
    state: &AppState,
    actor: &str,
    desired: ConfigDocument,
    prune: bool,
    dry_run: bool,
) -> Result<ApplyResult, ConfigApiError> {
    let context = context(state)?;
    if dry_run {
        let current = context.ledger.current().await?;
        let changes = plan(&current.config, &desired, prune)?;
        let proposed: Vec<ProposedChange> = changes.iter().map(PlannedChange::proposed).collect();
        validate_changes(&current.config, &proposed)?;
        return Ok(ApplyResult { changes, applied: false, change_set: None, stream_seq: current.last_seq });
    }
    let mut planned = Vec::new();
    let mut position = 0;
    let committed: Committed = context
        .ledger
        .commit(actor, |current| {
            planned = plan(&current.config, &desired, prune)?;
            position = current.last_seq;
            Ok(planned.iter().map(PlannedChange::proposed).collect())
        })
        .await?;
    let applied = !committed.events.is_empty();
    let stream_seq = if applied { committed.last_seq() } else { position };
    Ok(ApplyResult { changes: planned, applied, change_set: committed.change_set, stream_seq })
}

/// Makes the configuration equal to a document, atomically (`stone apply`).
#[utoipa::path(
    post, path = "/v1/config/apply", tag = "config", request_body = ApplyRequest,
    responses(
        (status = 200, description = "the plan, applied unless dry_run", body = ApplyResult),
        (status = 400, description = "invalid field; nothing applied", body = crate::error::ErrorBody),
        (status = 409, description = "a concurrent change; nothing applied", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["write"]))
)]
pub async fn apply(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Write>,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let request: ApplyRequest = parse_body("", &body)?;
    let result = apply_document(&state, &caller.name, request.document, request.prune, request.dry_run).await?;
    Ok(([seq_header(result.stream_seq)], Json(result)).into_response())
}

/// Where to revert to: a sequence or a time.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// Make the configuration what it was once this CONFIG sequence had taken effect.
    pub to_seq: Option<u64>,
    /// Or what it was at this RFC 3339 time.
    pub at: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Writes compensating events that bring the configuration back to an earlier point, as one
/// change set. API keys stay as they are (a revoked key is not revived).
#[utoipa::path(
    post, path = "/v1/config/revert", tag = "config", request_body = RevertRequest,
    responses(
        (status = 200, description = "the compensating changes", body = ApplyResult),
        (status = 400, description = "invalid field", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn revert(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Admin>,
    body: Bytes,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let request: RevertRequest = parse_body("revert", &body)?;
    let target = resolve_point(&context.pool, request.at.as_deref(), request.to_seq, "").await?;
    // The history must contain everything up to the ledger's current end, or the snapshot
    // could miss changes that are in the stream but not yet projected.
    let position = context.ledger.current().await?.last_seq;
    read::wait_for(&context.pool, position).await?;
    let specs = read::specs_at(&context.pool, target).await?;
    let actor = format!("{} (revert to {target})", caller.name);
    let result = apply_document(&state, &actor, ConfigDocument::from_specs(&specs), true, request.dry_run).await?;
    Ok(([seq_header(result.stream_seq)], Json(result)).into_response())
}

/// A key that was just created. `key` is shown this once; only its hash is kept.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub consumer: String,
    /// The key's public id (for revocation).
    pub id: String,
    /// The secret key; store it now, it cannot be shown again.
    pub key: String,
    pub version: u64,
    pub stream_seq: u64,
}

fn consumer_of(current: &super::ledger::LedgerState, name: &str) -> Result<ConsumerSpec, ConfigApiError> {
    match current.config.get(EntityKind::Consumer, name).map(|entity| &entity.spec) {
        Some(EntitySpec::Consumer(consumer)) => Ok(consumer.clone()),
        _ => Err(ConfigApiError::NotFound { kind: "consumer", name: name.to_owned() }),
    }
}

/// Creates an API key for a consumer.
#[utoipa::path(
    post, path = "/v1/config/consumers/{name}/keys", tag = "config",
    params(("name" = String, Path)),
    responses(
        (status = 201, description = "the key, shown once", body = CreatedKey),
        (status = 404, description = "no such consumer", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn create_key(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Admin>,
    Path(name): Path<String>,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let (key, key_id) = generate_secret("sk");
    let stored = ApiKeyHash { id: key_id.clone(), sha256: sha256_hex(&key) };
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            let mut consumer = consumer_of(current, &name)?;
            consumer.api_keys.push(stored.clone());
            Ok(vec![ProposedChange::upsert(EntitySpec::Consumer(consumer))])
        })
        .await?;
    let (stream_seq, version) = committed.events.last().map_or((0, 0), |(seq, change)| (*seq, change.version));
    let created = CreatedKey { consumer: name, id: key_id, key, version, stream_seq };
    Ok((StatusCode::CREATED, [seq_header(stream_seq)], Json(created)).into_response())
}

/// Revokes an API key.
#[utoipa::path(
    delete, path = "/v1/config/consumers/{name}/keys/{key_id}", tag = "config",
    params(("name" = String, Path), ("key_id" = String, Path)),
    responses(
        (status = 200, description = "revoked; the consumer's new version", body = WriteResult),
        (status = 404, description = "no such consumer or key", body = crate::error::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    RequireScope { caller, .. }: RequireScope<Admin>,
    Path((name, key_id)): Path<(String, String)>,
) -> Result<Response, ConfigApiError> {
    let context = context(&state)?;
    let committed = context
        .ledger
        .commit(&caller.name, |current| {
            let mut consumer = consumer_of(current, &name)?;
            let before = consumer.api_keys.len();
            consumer.api_keys.retain(|key| key.id != key_id);
            if consumer.api_keys.len() == before {
                return Err(ConfigApiError::NotFound { kind: "api key", name: key_id.clone() });
            }
            Ok(vec![ProposedChange::upsert(EntitySpec::Consumer(consumer))])
        })
        .await?;
    write_response(StatusCode::OK, &committed, || None)
}
