//! The config API's part of the OpenAPI document, merged into the gateway's document, with the
//! bearer-token security scheme its endpoints require.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::changes::{ApplyRequest, ApplyResult, CreatedKey, HistoryPage, RevertRequest, Snapshot};
use super::entities::{EntityList, WriteResult};
use super::read::{EntityRecord, HistoryRecord};

/// Declares `bearer`: `Authorization: Bearer stn_…` with scope read, write or admin.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "A token from `stone token create` (or the one `stone dev` prints); scopes read < write < admin",
            ))
            .build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    paths(
        super::entities::create,
        super::entities::list,
        super::entities::get_one,
        super::entities::replace,
        super::entities::patch,
        super::entities::remove,
        super::changes::create_key,
        super::changes::revoke_key,
        super::changes::history,
        super::changes::snapshot,
        super::changes::export,
        super::changes::apply,
        super::changes::revert,
        crate::auth::api::create,
        crate::auth::api::list,
        crate::auth::api::revoke,
    ),
    components(schemas(
        WriteResult,
        EntityList,
        EntityRecord,
        HistoryPage,
        HistoryRecord,
        Snapshot,
        ApplyRequest,
        ApplyResult,
        RevertRequest,
        CreatedKey,
        crate::auth::api::TokenRequest,
        crate::auth::api::NewToken,
        crate::auth::api::TokenInfo,
        crate::auth::Scope
    )),
    modifiers(&BearerScheme),
    tags(
        (name = "config", description = "Configuration: commands on the CONFIG ledger, reads from the Postgres projection"),
        (name = "tokens", description = "Gateway bearer tokens (admin)")
    )
)]
struct ConfigApiDoc;

/// The config API's paths, schemas and security scheme.
pub fn document() -> utoipa::openapi::OpenApi {
    ConfigApiDoc::openapi()
}
