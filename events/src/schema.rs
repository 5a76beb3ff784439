//! JSON Schemas of every event type and version, generated from the Rust types. The files in
//! `schemas/` are written by `just schemas` and checked by the test `schemas_are_current`.

use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::cache::{CacheAction, CacheEvent};
use crate::config::ConfigChange;
use crate::decode::KNOWN_EVENT_TYPES;
use crate::envelope::Envelope;
use crate::health::{EventsLost, TargetHealthChanged, WorkerHeartbeat};
use crate::request::{RequestCompleted, RequestCompletedV1};

/// One generated schema file.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaFile {
    /// File name inside `schemas/`, e.g. `request.completed.v2.json`.
    pub file_name: String,
    pub schema: Value,
}

fn envelope_schema<T: JsonSchema>(event_type: &str, version: u32) -> SchemaFile {
    let mut schema = serde_json::to_value(schema_for!(Envelope<T>)).unwrap_or(Value::Null);
    schema["$id"] = json!(format!("https://proxy-stone.dev/schemas/{event_type}.v{version}.json"));
    schema["title"] = json!(format!("{event_type} v{version}"));
    if let Some(properties) = schema.get_mut("properties") {
        properties["type"] = json!({ "const": event_type, "description": "Event type." });
        properties["version"] = json!({ "const": version, "description": "Version of `data`'s shape." });
    }
    SchemaFile { file_name: format!("{event_type}.v{version}.json"), schema }
}

/// Every schema, in a stable order, plus `index.json` listing the types and versions.
pub fn all_schemas() -> Vec<SchemaFile> {
    let mut files = vec![
        envelope_schema::<RequestCompletedV1>("request.completed", 1),
        envelope_schema::<RequestCompleted>("request.completed", 2),
    ];
    for action in CacheAction::ALL {
        files.push(envelope_schema::<CacheEvent>(action.event_type(), 1));
    }
    files.push(envelope_schema::<TargetHealthChanged>("health.target_up", 1));
    files.push(envelope_schema::<TargetHealthChanged>("health.target_down", 1));
    files.push(envelope_schema::<WorkerHeartbeat>("health.worker_heartbeat", 1));
    files.push(envelope_schema::<EventsLost>("health.events_lost", 1));
    for event_type in ConfigChange::TYPES {
        files.push(envelope_schema::<ConfigChange>(event_type, 1));
    }

    let index: Vec<Value> = KNOWN_EVENT_TYPES
        .iter()
        .map(|(event_type, versions)| {
            json!({
                "type": event_type,
                "versions": versions,
                "current": versions.last(),
                "schemas": versions.iter().map(|v| format!("{event_type}.v{v}.json")).collect::<Vec<_>>(),
            })
        })
        .collect();
    files.push(SchemaFile { file_name: "index.json".to_owned(), schema: json!({ "events": index }) });
    files
}

/// The text written to disk for a schema: pretty JSON with a trailing newline.
pub fn render(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}
