//! `stone apply -f stone.yaml`: shows what would change, then applies the whole file as one
//! change set through the gateway (`POST /v1/config/apply`), so workers and the projection see all
//! of it or none of it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use hyper::Method;
use serde_json::json;
use stone_events::config::document::{PlannedChange, PlannedOp};

use crate::config_cmd::{GatewayArgs, GatewayClient, from_yaml, print};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The desired configuration (YAML; `-` for standard input).
    #[arg(long, short = 'f')]
    file: PathBuf,
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Show the diff only.
    #[arg(long)]
    dry_run: bool,
    /// Keep entities that the file does not list (by default the file is the whole configuration).
    #[arg(long)]
    no_prune: bool,
}

pub async fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let document = from_yaml(&text).with_context(|| format!("{} is not a valid configuration", args.file.display()))?;
    let client = GatewayClient::new(&args.gateway)?;
    let request = |dry_run: bool| json!({ "document": document, "prune": !args.no_prune, "dry_run": dry_run });

    let planned = client.send(Method::POST, "/v1/config/apply", Some(&request(true))).await?;
    let changes: Vec<PlannedChange> =
        serde_json::from_value(planned["changes"].clone()).context("the gateway's plan")?;
    if changes.is_empty() {
        eprintln!("no changes: the configuration already matches {}", args.file.display());
        return Ok(());
    }
    print(&render_diff(&changes))?;
    if args.dry_run {
        eprintln!("dry run: nothing applied");
        return Ok(());
    }
    let applied = client.send(Method::POST, "/v1/config/apply", Some(&request(false))).await?;
    let applied_changes: Vec<PlannedChange> = serde_json::from_value(applied["changes"].clone()).unwrap_or_default();
    if applied_changes != changes {
        // Someone changed the configuration between the plan and the apply; the gateway planned
        // again on the newer state, so show what was really done.
        eprintln!("the configuration changed meanwhile; applied this instead:");
        print(&render_diff(&applied_changes))?;
    }
    eprintln!(
        "applied {} change(s) as one change set at stream sequence {}",
        applied_changes.len(),
        applied["stream_seq"].as_u64().unwrap_or(0)
    );
    Ok(())
}

/// `+ route users`, `~ upstream demo` with the changed fields, `- policy old`.
pub fn render_diff(changes: &[PlannedChange]) -> String {
    let mut out = String::new();
    for change in changes {
        let (sign, verb) = match change.op {
            PlannedOp::Create => ('+', "create"),
            PlannedOp::Update => ('~', "update"),
            PlannedOp::Delete => ('-', "delete"),
        };
        out.push_str(&format!("{sign} {verb} {} {}\n", change.kind.as_str(), change.name));
        let body = |spec: &Option<stone_events::config::EntitySpec>| {
            spec.as_ref().and_then(|spec| spec.to_body().ok()).unwrap_or(serde_json::Value::Null)
        };
        let (before, after) = (body(&change.before), body(&change.after));
        let empty = serde_json::Map::new();
        let before_fields = before.as_object().unwrap_or(&empty);
        let after_fields = after.as_object().unwrap_or(&empty);
        let mut keys: Vec<&String> = before_fields.keys().chain(after_fields.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            match (before_fields.get(key), after_fields.get(key)) {
                (Some(old), Some(new)) if old != new => out.push_str(&format!("    {key}: {old} -> {new}\n")),
                (None, Some(new)) if change.op == PlannedOp::Update => out.push_str(&format!("    {key}: {new}\n")),
                (Some(old), None) if change.op == PlannedOp::Update => {
                    out.push_str(&format!("    {key}: {old} -> (removed)\n"))
                }
                _ => {}
            }
        }
    }
    out
}
