//! `stone replay analytics|config`: starts a projection rebuild on the gateway
//! (`POST /v1/projections/{name}/rebuild`) and follows its progress stream with a progress bar
//! (done / total, rate, ETA) until the shadow tables are swapped in. Exits non-zero if the
//! rebuild fails.

use std::time::Duration;

use clap::{Args, ValueEnum};
use http_body_util::BodyExt;
use hyper::Method;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use stone_kit::rebuild::{Phase, RebuildStatus};

use crate::config_cmd::{GatewayArgs, GatewayClient};
use crate::tail::SseParser;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProjectionName {
    /// Traffic analytics in ClickHouse (raw tables and every rollup).
    Analytics,
    /// Configuration state and history in Postgres.
    Config,
}

impl ProjectionName {
    fn as_str(self) -> &'static str {
        match self {
            Self::Analytics => "analytics",
            Self::Config => "config",
        }
    }
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The projection to rebuild.
    #[arg(value_enum)]
    projection: ProjectionName,
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Replay from this stream sequence (analytics); earlier rows are kept as they are.
    #[arg(long, conflicts_with = "from_time")]
    from_seq: Option<u64>,
    /// Replay from this time (analytics): RFC 3339 or relative (`-6h`).
    #[arg(long)]
    from_time: Option<String>,
    /// Print one line per progress report instead of drawing a bar (logs, CI).
    #[arg(long)]
    plain: bool,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let client = GatewayClient::new(&args.gateway)?;
    let name = args.projection.as_str();
    let mut body = json!({});
    if let Some(from_seq) = args.from_seq {
        body["from_seq"] = json!(from_seq);
    }
    if let Some(from_time) = &args.from_time {
        body["from_time"] = json!(from_time);
    }
    let accepted = client.send(Method::POST, &format!("/v1/projections/{name}/rebuild"), Some(&body)).await?;
    let id = accepted["id"].as_str().unwrap_or_default().to_owned();
    eprintln!("rebuild of {name} started (id {id})");

    let bar = if args.plain {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}")
            .map_err(|error| anyhow::anyhow!("progress template: {error}"))?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let outcome = follow(&client, name, &id, &bar, args.plain).await;
    bar.finish_and_clear();
    let record = outcome?;
    match record.phase {
        Phase::Done => {
            eprintln!(
                "rebuild of {name} done: {} events from sequence {} at {:.0} events/s ({} skipped as undecodable)",
                record.done, record.from_seq, record.rate, record.skipped
            );
            Ok(())
        }
        _ => anyhow::bail!("rebuild of {name} failed: {}", record.error.as_deref().unwrap_or("no reason recorded")),
    }
}

/// Follows the progress stream until the rebuild ends; reconnects if the connection drops.
async fn follow(
    client: &GatewayClient,
    name: &str,
    id: &str,
    bar: &ProgressBar,
    plain: bool,
) -> anyhow::Result<RebuildStatus> {
    let path = format!("/v1/projections/{name}/rebuild/events?id={id}");
    let mut failures = 0u32;
    loop {
        let response = match client.open_events(&path).await {
            Ok(response) => response,
            Err(error) if failures < 10 => {
                failures += 1;
                tracing::debug!(%error, "progress stream unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        let mut body = response.into_body();
        let mut parser = SseParser::default();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else { continue };
            for event in parser.feed(data) {
                let Ok(record) = serde_json::from_str::<RebuildStatus>(&event.data) else { continue };
                bar.set_length(record.total.max(record.done));
                bar.set_position(record.done);
                bar.set_message(format!("{:?}", record.phase).to_lowercase());
                if plain {
                    eprintln!(
                        "{:?}: {}/{} events, {:.0} events/s, ETA {}",
                        record.phase,
                        record.done,
                        record.total,
                        record.rate,
                        record.eta_seconds.map_or_else(|| "-".to_owned(), |eta| format!("{eta:.0}s"))
                    );
                }
                if !record.phase.is_running() {
                    return Ok(record);
                }
            }
        }
        failures += 1;
        if failures > 10 {
            anyhow::bail!("the progress stream keeps ending before the rebuild does");
        }
    }
}
