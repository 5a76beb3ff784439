//! `stone tail`: the gateway's live event stream in a terminal, with the same filters, and
//! automatic resume (`Last-Event-ID`) when the connection drops.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stone_kit::Shutdown;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Gateway base URL.
    #[arg(long, env = "STONE_GATEWAY_URL", default_value = "http://127.0.0.1:8081")]
    gateway: String,
    /// Bearer token with the read scope.
    #[arg(long, env = "STONE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Event type (`request.completed`, `cache.hit`) or family (`request`, `cache`, `health`).
    #[arg(long = "type")]
    event_type: Option<String>,
    #[arg(long)]
    route: Option<String>,
    #[arg(long)]
    upstream: Option<String>,
    #[arg(long)]
    consumer: Option<String>,
    /// Status class (`5xx`) or code (`503`).
    #[arg(long)]
    status: Option<String>,
    /// Cache status (`hit`, `miss`, …).
    #[arg(long)]
    cache: Option<String>,
    /// Only requests at least this slow.
    #[arg(long)]
    min_latency_ms: Option<u64>,
    /// Start after this stream sequence.
    #[arg(long)]
    from_seq: Option<u64>,
    /// Start at this time (RFC 3339).
    #[arg(long)]
    from_time: Option<String>,
    /// Print each event's JSON envelope instead of a summary line.
    #[arg(long)]
    json: bool,
}

impl TailArgs {
    fn query(&self) -> String {
        let pairs = [
            ("type", self.event_type.clone()),
            ("route", self.route.clone()),
            ("upstream", self.upstream.clone()),
            ("consumer", self.consumer.clone()),
            ("status", self.status.clone()),
            ("cache", self.cache.clone()),
            ("min_latency_ms", self.min_latency_ms.map(|value| value.to_string())),
            ("from_seq", self.from_seq.map(|value| value.to_string())),
            ("from_time", self.from_time.clone()),
        ];
        pairs
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|value| format!("{key}={}", percent_encode(value))))
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// One parsed Server-Sent Event.
#[derive(Debug, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Incremental SSE parser: feed bytes, take complete events; comments (heartbeats) are skipped.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: String,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.push_str(&String::from_utf8_lossy(chunk).replace("\r\n", "\n"));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = SseEvent::default();
            let mut has_field = false;
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = Some(value.to_owned()),
                    "data" => {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                    }
                    _ => continue,
                }
                has_field = true;
            }
            if has_field {
                events.push(event);
            }
        }
        events
    }
}

/// A one-line summary of an event for people.
fn summary_line(event: &SseEvent) -> String {
    let kind = event.event.as_deref().unwrap_or("message");
    let sequence = event.id.as_deref().unwrap_or("-");
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&event.data) else {
        return format!("{sequence:>8}  {kind:<24} {}", event.data);
    };
    let data = &json["data"];
    let time = json["time"].as_str().unwrap_or("");
    let detail = match kind {
        "request.completed" => format!(
            "{} {} {}{} route={} {:.1}ms cache={}",
            data["status"],
            data["method"].as_str().unwrap_or(""),
            data["host"].as_str().unwrap_or(""),
            data["path"].as_str().unwrap_or(""),
            data["route"].as_str().unwrap_or(""),
            data["total_us"].as_f64().unwrap_or(0.0) / 1000.0,
            data["cache"].as_str().unwrap_or(""),
        ),
        "lagged" => format!(
            "missed {} events ({}..{}); they stay in the stream",
            json["missed"], json["first_seq"], json["last_seq"]
        ),
        _ => data.to_string(),
    };
    format!("{sequence:>8}  {time}  {kind:<24} {detail}")
}

/// Streams until Ctrl-C, reconnecting after the last sequence seen.
pub async fn run(args: TailArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}/v1/streams/events?{}", args.gateway.trim_end_matches('/'), args.query());
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    let mut stdout = std::io::stdout().lock();
    while !shutdown.is_triggered() {
        let mut request = hyper::Request::get(&url).header("accept", "text/event-stream");
        if let Some(token) = &args.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id.as_str());
        }
        let response = tokio::select! {
            response = client.request(request.body(Empty::new())?) => response,
            () = shutdown.triggered() => return Ok(()),
        };
        let response = match response {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
                anyhow::bail!("gateway answered {status}: {}", String::from_utf8_lossy(&body));
            }
            Err(error) => {
                failures += 1;
                if failures > 10 {
                    anyhow::bail!("cannot reach the gateway at {}: {error}", args.gateway);
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
                continue;
            }
        };
        failures = 0;
        let mut body = response.into_body();
        let mut parser = SseParser::default();
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = shutdown.triggered() => return Ok(()),
            };
            let Some(Ok(frame)) = frame else { break };
            let Some(data) = frame.data_ref() else { continue };
            for event in parser.feed(data) {
                if event.id.is_some() {
                    last_id.clone_from(&event.id);
                }
                let line = if args.json { event.data.clone() } else { summary_line(&event) };
                writeln!(stdout, "{line}")?;
            }
            stdout.flush()?;
        }
        // The connection ended (gateway restart, network): resume after the last event.
        tracing::info!(last_id = last_id.as_deref().unwrap_or("-"), "stream ended, resuming");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_handles_split_chunks_comments_and_multiline_data() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b": heartbeat\n\nid: 7\nevent: request.com").is_empty());
        let events = parser.feed(b"pleted\ndata: {\"a\":1}\n\ndata: one\ndata: two\n\n");
        assert_eq!(
            events,
            vec![
                SseEvent { id: Some("7".into()), event: Some("request.completed".into()), data: "{\"a\":1}".into() },
                SseEvent { id: None, event: None, data: "one\ntwo".into() },
            ]
        );
    }

    #[test]
    fn filters_are_encoded_into_the_query() {
        let args = TailArgs {
            gateway: String::new(),
            token: None,
            event_type: Some("request.completed".into()),
            route: Some("checkout".into()),
            upstream: None,
            consumer: None,
            status: Some("5xx".into()),
            cache: None,
            min_latency_ms: Some(20),
            from_seq: None,
            from_time: Some("2026-11-21T10:00:00+01:00".into()),
            json: false,
        };
        assert_eq!(
            args.query(),
            "type=request.completed&route=checkout&status=5xx&min_latency_ms=20&from_time=2026-11-21T10%3A00%3A00%2B01%3A00"
        );
    }
}
