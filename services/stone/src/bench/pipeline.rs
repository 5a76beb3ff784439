//! `stone bench pipeline`: the analytics pipeline against the raw JetStream consume rate of the
//! same events on the same machine, freshness from publish to visible through the API, and the
//! latency of every analytics endpoint over `--latency-rows` stored rows, reported as ratios.
//!
//! It uses the configured NATS and ClickHouse with a namespace and database of its own, removed
//! afterwards (unless `--keep`), so it never touches a deployment's data:
//! 1. publish `--events` synthetic `request.completed` events spread over the last six hours;
//! 2. consume them with the projector's reader kind (one ordered consumer over `{ns}.ev.>`, no
//!    acknowledgements), doing nothing else: the ceiling any projector instance on this machine
//!    can reach;
//! 3. start the projector and time until every event is in ClickHouse (raw and rollups);
//! 4. publish at `--rate` events/s for `--seconds`, marking some events, and poll the gateway's
//!    request search for the markers: publish → visible through the API;
//! 5. add `--latency-rows` synthetic rows straight in ClickHouse (`INSERT … SELECT … FROM
//!    numbers()`, so the rollups fill through their materialized views as with the projector's
//!    inserts) and query each analytics endpoint `--samples` times over them.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stone_analytics::synthetic::{self, Publisher};
use stone_kit::admin::Readiness;
use stone_kit::{Shutdown, StoneConfig};
use time::OffsetDateTime;

#[derive(Debug, Args)]
pub struct PipelineBenchArgs {
    /// Events stored and projected in the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Publish rate of the freshness phase, events per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Length of the freshness phase in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Pause between two polls of the freshness phase, milliseconds. A marker counts as
    /// visible at the start of the first poll that returns it, so a longer pause can only add to
    /// the figures; each poll is a search query the engine also has to answer.
    #[arg(long, default_value_t = 25)]
    poll_ms: u64,
    /// Requests per endpoint in the latency phase.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Rows the latency phase measures over: the rows already stored are topped up to this many
    /// with rows generated in ClickHouse, spread over the last six hours (0: no top-up).
    #[arg(long, default_value_t = 10_000_000)]
    latency_rows: u64,
    /// `analytics.batch_max_rows` of the projector (default: the configuration's).
    #[arg(long)]
    batch_max_rows: Option<usize>,
    /// `analytics.batch_max_wait_ms` of the projector (default: the configuration's).
    #[arg(long)]
    batch_max_wait_ms: Option<u64>,
    /// `analytics.insert_concurrency` of the projector (default: the configuration's).
    #[arg(long)]
    insert_concurrency: Option<usize>,
    /// Keep the bench's streams and database afterwards.
    #[arg(long)]
    keep: bool,
    /// What the projector and its clients log to stderr while the bench runs (a `tracing`
    /// filter): warnings by default, so a retried insert or a recreated consumer is seen beside
    /// the figures it affects.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// Runs the benchmark and prints the report.
pub async fn run(base: &StoneConfig, args: PipelineBenchArgs) -> anyhow::Result<()> {
    let telemetry = stone_kit::config::TelemetryConfig { log: args.log.clone(), ..base.telemetry.clone() };
    let _telemetry = stone_kit::telemetry::init(&telemetry, "stone-bench")?;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let suffix = &unique[unique.len() - 8..];
    let mut config = base.clone();
    config.namespace = format!("bench{suffix}");
    config.clickhouse_database = format!("bench_{suffix}");
    config.analytics.admin_listen = "127.0.0.1:0".parse()?;
    config.analytics.instance_id = format!("bench-{suffix}");
    if let Some(rows) = args.batch_max_rows {
        config.analytics.batch_max_rows = rows;
    }
    if let Some(wait) = args.batch_max_wait_ms {
        config.analytics.batch_max_wait_ms = wait;
    }
    if let Some(slots) = args.insert_concurrency {
        config.analytics.insert_concurrency = slots;
    }
    // Room for the events in JetStream without reserving the server's whole storage.
    config.events.max_bytes = i64::try_from(args.events.saturating_mul(1_200).max(256 << 20)).unwrap_or(i64::MAX);
    let outcome = measure(&config, &args).await;
    if !args.keep {
        cleanup(&config).await;
    }
    let report = outcome?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(report.as_bytes())?;
    Ok(())
}

async fn measure(config: &StoneConfig, args: &PipelineBenchArgs) -> anyhow::Result<String> {
    let mut report = String::new();
    let line = |report: &mut String, text: String| {
        report.push_str(&text);
        report.push('\n');
        let _ = writeln!(std::io::stderr(), "{text}");
    };
    stone_kit::clickhouse::migrate(config).await?;
    let (_client, js) = stone_kit::nats::connect_and_provision(config, "stone-bench").await?;

    // 1. Publish.
    let started = Instant::now();
    let mut publisher = Publisher::new(js.clone(), config.namespace(), config.partitions, 4_096);
    let now = OffsetDateTime::now_utc();
    let spread = 6 * 3_600_000_000i64;
    let step = spread / i64::try_from(args.events.max(1)).unwrap_or(i64::MAX);
    for index in 0..args.events {
        let offset = spread - step * i64::try_from(index).unwrap_or(0);
        let time = now - time::Duration::microseconds(offset);
        publisher.publish(&synthetic::request(index, time)).await?;
    }
    publisher.flush().await?;
    let publish_rate = args.events as f64 / started.elapsed().as_secs_f64();
    line(&mut report, format!("published {} events at {publish_rate:.0} ev/s", args.events));

    // 2. Raw consume: the same events through the projector's reader kind, no work.
    let processes = Processes::find();
    let before = processes.ticks();
    let consume_rate = raw_consume(config, &js, args.events).await?;
    let consume_cpu = processes.ticks().since(&before);
    line(&mut report, format!("raw JetStream consume, one ordered consumer over the stream: {consume_rate:.0} ev/s"));
    line(&mut report, format!("  CPU per event: {}", consume_cpu.per_event(args.events, "reader")));
    line(
        &mut report,
        format!(
            "projector: {} partitions, batch_max_rows {}, batch_max_wait_ms {}, insert_concurrency {}",
            config.partitions,
            config.analytics.batch_max_rows,
            config.analytics.batch_max_wait_ms,
            config.analytics.insert_concurrency
        ),
    );

    // 3. The projector. Its batch sizes are read back from this process's metrics recorder,
    // which must be in place before it records anything.
    stone_kit::telemetry::metrics_handle();
    let shutdown = Shutdown::new();
    let before = processes.ticks();
    let started = Instant::now();
    stone_analytics::build(config, &shutdown).await?;
    let clickhouse = stone_kit::clickhouse::client(config);
    loop {
        let count: u64 = clickhouse.query("SELECT count() FROM requests").fetch_one().await?;
        if count >= args.events {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("the projector stored {count} of {} events in 10 minutes", args.events);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pipeline_rate = args.events as f64 / started.elapsed().as_secs_f64();
    // A part reaches the raw table before its rollup blocks: give the last inserts a moment.
    let checked = Instant::now();
    let rolled = loop {
        let rolled: u64 = clickhouse.query("SELECT sum(requests) FROM requests_1h").fetch_one().await?;
        if rolled >= args.events || checked.elapsed() > Duration::from_secs(30) {
            break rolled;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    anyhow::ensure!(rolled == args.events, "hourly rollup holds {rolled} of {} events", args.events);
    let pipeline_cpu = processes.ticks().since(&before);
    line(
        &mut report,
        format!(
            "pipeline JetStream → ClickHouse (raw + every rollup): {pipeline_rate:.0} ev/s, ratio to raw consume {:.2}",
            pipeline_rate / consume_rate
        ),
    );
    line(&mut report, format!("  CPU per event: {}", pipeline_cpu.per_event(args.events, "projector")));
    if let (Some(raw), Some(pipeline)) = (consume_cpu.total(), pipeline_cpu.total()) {
        line(
            &mut report,
            format!(
                "  events per CPU second, pipeline / raw consume: {:.2} (the ratio above with the machine's other load taken out)",
                raw / pipeline
            ),
        );
    }
    let batches = Batches::now();
    line(&mut report, format!("  {batches}"));

    // 4. Freshness through the gateway's API, at a steady rate: once the engine has merged the
    // throughput phase's parts, so that this phase measures steady ingest, not the tail of a
    // catch-up.
    let (settle_wait, still_merging) = settle_merges(&clickhouse, SETTLE_LIMIT).await?;
    let gateway_shutdown = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_address = listener.local_addr()?;
    let state = stone_gateway::AppState::new(stone_gateway::analytics::clickhouse_client(config), Readiness::new(&[]));
    gateway_shutdown.spawn(stone_kit::admin::serve(listener, stone_gateway::router(state), gateway_shutdown.token()));
    let freshness = freshness(config, &js, gateway_address, args).await;
    let (p50, p99, max, seen, marked) = freshness?;
    line(
        &mut report,
        format!(
            "freshness at {} ev/s for {} s: publish → visible in /v1/analytics/requests p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms ({seen}/{marked} markers seen; {} ms between polls; merges settled in {:.1} s{})",
            args.rate,
            args.seconds,
            args.poll_ms,
            settle_wait.as_secs_f64(),
            still_merging_note(still_merging),
        ),
    );
    line(&mut report, format!("  {}", Batches::now().since(&batches)));

    // 5. Endpoint latency over `--latency-rows` stored events.
    let stored: u64 = clickhouse.query("SELECT count() FROM requests").fetch_one().await?;
    if args.latency_rows > stored {
        let added = args.latency_rows - stored;
        let started = Instant::now();
        bulk_requests(&clickhouse, added).await?;
        let rolled: u64 = clickhouse.query("SELECT sum(requests) FROM requests_1h").fetch_one().await?;
        line(
            &mut report,
            format!(
                "generated {added} rows in ClickHouse in {:.1} s (hourly rollup now sums {rolled})",
                started.elapsed().as_secs_f64()
            ),
        );
    }
    // Stored events accumulate over hours; the top-up lands them in seconds, and the merges
    // that ingest would have spread over those hours would otherwise run during the first
    // endpoint's samples. Wait (bounded) until the engine has merged what it is merging.
    let (settle_wait, still_merging) = settle_merges(&clickhouse, SETTLE_LIMIT).await?;
    let stored: u64 = clickhouse.query("SELECT count() FROM requests").fetch_one().await?;
    line(
        &mut report,
        format!(
            "endpoint latency over {stored} stored events ({} samples each, endpoints in turn; merges settled in {:.1} s{})",
            args.samples,
            settle_wait.as_secs_f64(),
            still_merging_note(still_merging),
        ),
    );
    let hour = |hours_ago: i64| -> anyhow::Result<String> {
        let instant = OffsetDateTime::now_utc() - time::Duration::hours(hours_ago);
        let aligned = instant.replace_minute(0)?.replace_second(0)?.replace_nanosecond(0)?;
        Ok(aligned.format(&time::format_description::well_known::Rfc3339)?)
    };
    let aligned = format!("from={}&to={}", hour(6)?, hour(0)?);
    let endpoints = [
        ("summary -6h (mixed: hour, minute, raw edges)", "/v1/analytics/summary?from=-6h".to_owned()),
        ("summary, hourly rollup", format!("/v1/analytics/summary?{aligned}")),
        ("summary -6h (mixed), route filter", "/v1/analytics/summary?from=-6h&route=users".to_owned()),
        (
            "timeseries 1m by status_class (-6h)",
            "/v1/analytics/timeseries?from=-6h&interval=1m&group_by=status_class".to_owned(),
        ),
        ("timeseries 1h by route", format!("/v1/analytics/timeseries?{aligned}&interval=1h&group_by=route")),
        ("top path_template by p99, rollup", format!("/v1/analytics/top?{aligned}&by=path_template&order=p99")),
        ("top consumer by errors -6h (mixed)", "/v1/analytics/top?from=-6h&by=consumer&order=errors".to_owned()),
        ("requests search, 100 newest 5xx", "/v1/analytics/requests?from=-6h&status=5xx&limit=100".to_owned()),
        ("health upstreams", "/v1/health/upstreams".to_owned()),
    ];
    let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // Round after round over every endpoint, so whatever else the machine does at some moment
    // lands on all of them alike instead of on whichever was being measured then.
    let mut durations: Vec<Vec<f64>> = vec![Vec::with_capacity(args.samples); endpoints.len()];
    for _ in 0..args.samples {
        for ((_, path), samples) in endpoints.iter().zip(&mut durations) {
            let started = Instant::now();
            let response = http.get(format!("http://{gateway_address}{path}").parse()?).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(status.is_success(), "{path}: {status} {}", String::from_utf8_lossy(&body));
            samples.push(started.elapsed().as_secs_f64() * 1_000.0);
        }
    }
    for ((name, _), mut durations) in endpoints.into_iter().zip(durations) {
        line(
            &mut report,
            format!(
                "  {name:<40} p50 {:>7.1} ms  p95 {:>7.1} ms",
                quantile(&mut durations, 0.5),
                quantile(&mut durations, 0.95)
            ),
        );
    }
    gateway_shutdown.trigger();
    let _ = gateway_shutdown.drain(Duration::from_secs(5)).await;
    shutdown.trigger();
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    Ok(report)
}

/// The processes whose CPU time an event costs: this one (the reader, then the projector; the
/// bench's own polling is a query every 100 ms), the local nats-server and the ClickHouse server
/// (a `clickhouse` process or the development stack's chDB server). On a machine shared with
/// other work, events per second move with the neighbours' load; CPU time per event much less.
struct Processes {
    own: Vec<u32>,
    nats: Vec<u32>,
    clickhouse: Vec<u32>,
}

/// CPU clock ticks of each kind; `None` for a server with no process found.
struct Ticks {
    own: u64,
    nats: Option<u64>,
    clickhouse: Option<u64>,
}

impl Processes {
    fn find() -> Self {
        let clickhouse = crate::bench_proxy::processes(|stat| stat.contains("(clickhouse"))
            .into_iter()
            .chain(crate::bench_proxy::processes(|stat| stat.contains("(python")).into_iter().filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("chdb/server.py"))
            }))
            .collect();
        Self {
            own: vec![std::process::id()],
            nats: crate::bench_proxy::processes(|stat| stat.contains("(nats-server)")),
            clickhouse,
        }
    }

    fn ticks(&self) -> Ticks {
        let found = |pids: &[u32]| (!pids.is_empty()).then(|| crate::bench_proxy::cpu_ticks(pids));
        Ticks {
            own: crate::bench_proxy::cpu_ticks(&self.own),
            nats: found(&self.nats),
            clickhouse: found(&self.clickhouse),
        }
    }
}

/// CPU seconds spent between two [`Ticks`], per process kind (`None` where none was found).
struct CpuSpent {
    own: f64,
    nats: Option<f64>,
    clickhouse: Option<f64>,
}

impl Ticks {
    fn since(&self, before: &Ticks) -> CpuSpent {
        let per_second = crate::bench_proxy::clock_ticks_per_second();
        let seconds = |after: u64, before: u64| after.saturating_sub(before) as f64 / per_second;
        let both = |after: Option<u64>, before: Option<u64>| Some(seconds(after?, before?));
        CpuSpent {
            own: seconds(self.own, before.own),
            nats: both(self.nats, before.nats),
            clickhouse: both(self.clickhouse, before.clickhouse),
        }
    }
}

impl CpuSpent {
    /// This process, nats-server and, where found, the ClickHouse server (the raw read costs it
    /// nothing); `None` without nats-server.
    fn total(&self) -> Option<f64> {
        Some(self.own + self.nats? + self.clickhouse.unwrap_or(0.0)).filter(|total| *total > 0.0)
    }

    fn per_event(&self, events: u64, own_name: &str) -> String {
        let micros = |seconds: f64| format!("{:.1} µs", seconds * 1e6 / events.max(1) as f64);
        let optional = |seconds: Option<f64>| seconds.map_or_else(|| "not found".to_owned(), micros);
        format!(
            "{own_name} {}, nats-server {}, ClickHouse {}",
            micros(self.own),
            optional(self.nats),
            optional(self.clickhouse)
        )
    }
}

/// Reads every event once through one ordered consumer over the whole stream: the reader kind
/// of a projector instance (`stone_analytics::feed`), without acknowledgements.
async fn raw_consume(config: &StoneConfig, js: &async_nats::jetstream::Context, events: u64) -> anyhow::Result<f64> {
    let namespace = config.namespace();
    let stream = js.get_stream(namespace.stream_name("EVENTS")).await?;
    let started = Instant::now();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: namespace.events_wildcard(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut read = 0u64;
    let mut bytes = 0usize;
    while read < events {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        match next {
            Ok(Some(message)) => {
                let message = message.map_err(|error| anyhow::anyhow!("{error}"))?;
                // Touch what a projector reads first, so the work is not optimised away.
                bytes += message.payload.len();
                message.info().map_err(|error| anyhow::anyhow!("{error}"))?;
                read += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(read == events, "raw consume read {read} of {events} events ({bytes} bytes)");
    Ok(events as f64 / elapsed.max(0.001))
}

/// Adds `rows` synthetic `request.completed` rows spread over the last six hours, generated in
/// ClickHouse with the distribution of [`synthetic::request`], so the materialized views fill the
/// rollups exactly as with the projector's inserts.
async fn bulk_requests(clickhouse: &clickhouse::Client, rows: u64) -> anyhow::Result<()> {
    let now_us = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
    let spread_us: i128 = 6 * 3_600_000_000;
    let start_us = now_us - spread_us;
    let step_us = (spread_us / i128::from(rows.max(1))).max(1);
    // Numbers only (ours, not input), so formatting them into the statement is safe.
    let sql = format!(
        "INSERT INTO requests (event_id, time, source, config_seq, partition, stream_seq, method, host, route, \
           path_template, path, upstream, target, consumer, client_ip, protocol, status, total_us, upstream_us, \
           ttfb_us, bytes_in, bytes_out, cache, error, rate_limited, traceparent) \
         SELECT generateUUIDv4(number), fromUnixTimestamp64Micro(toInt64({start_us} + number * {step_us}), 'UTC'), \
           'bench-bulk', 1, toUInt16(number % 8), 0, 'GET', 'api.example.com', \
           ['users', 'orders', 'search', 'static'][number % 4 + 1] AS route, concat('/', route, '/{{id}}'), \
           concat('/', route, '/', toString(number)), concat(route, '-svc'), 'http://10.0.0.5:8000', \
           ['acme', 'globex', 'initech'][number % 3 + 1], '10.1.2.3', 'HTTP/1.1', \
           multiIf(number % 50 = 0, 500, number % 20 = 0, 404, 200) AS status, 1000 + number % 997, \
           800 + number % 997, 500, 200, 2000, multiIf(number % 3 = 0, 'hit', number % 3 = 1, 'miss', 'none'), \
           if(status = 500, 'upstream_reset', ''), 0, '' \
         FROM numbers({rows})"
    );
    clickhouse.query(&sql).with_setting("insert_deduplicate", "0").execute().await?;
    Ok(())
}

/// The longest the freshness and latency phases wait for the engine's merges to finish.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// ", N still running at the limit" when [`settle_merges`] gave up waiting.
fn still_merging_note(still_merging: u64) -> String {
    if still_merging > 0 { format!(", {still_merging} still running at the limit") } else { String::new() }
}

/// Waits until no merge of the bench's database has run for a second (one merge often
/// schedules the next), or `limit` passes; how long it waited and how many merges were still
/// running then.
async fn settle_merges(clickhouse: &clickhouse::Client, limit: Duration) -> anyhow::Result<(Duration, u64)> {
    const POLL: Duration = Duration::from_millis(250);
    const QUIET_POLLS: u32 = 4;
    let started = Instant::now();
    let mut quiet = 0;
    loop {
        let merging: u64 = clickhouse
            .query("SELECT count() FROM system.merges WHERE database = currentDatabase()")
            .fetch_one()
            .await?;
        quiet = if merging == 0 { quiet + 1 } else { 0 };
        if quiet >= QUIET_POLLS || started.elapsed() >= limit {
            return Ok((started.elapsed(), merging));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Publishes at `rate` for `seconds`, one marker every 10 ms, and polls the API for markers.
async fn freshness(
    config: &StoneConfig,
    js: &async_nats::jetstream::Context,
    gateway: std::net::SocketAddr,
    args: &PipelineBenchArgs,
) -> anyhow::Result<(f64, f64, f64, usize, usize)> {
    let published: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let seen_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let poll = Duration::from_millis(args.poll_ms);
    // Every marker is published after this instant. Searching from it (not from `-1m`) keeps the
    // throughput phase's rows, stored seconds earlier, out of every poll: with them, each poll
    // scanned a million rows, and the probe's own cost became part of the figure.
    let since = (OffsetDateTime::now_utc() - time::Duration::seconds(1))
        .format(&time::format_description::well_known::Rfc3339)?;
    let poller = {
        let published = published.clone();
        let seen_count = seen_count.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut seen: HashMap<String, f64> = HashMap::new();
            let uri = format!("http://{gateway}/v1/analytics/requests?from={since}&consumer=bench-marker&limit=1000");
            while !stop.is_cancelled() {
                let polled = Instant::now();
                if let Ok(response) = http.get(uri.parse()?).await {
                    let body = response.into_body().collect().await?.to_bytes();
                    let page: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let published = published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
                    for request in page["requests"].as_array().into_iter().flatten() {
                        let Some(id) = request["event_id"].as_str() else { continue };
                        if let (false, Some(sent)) = (seen.contains_key(id), published.get(id)) {
                            seen.insert(id.to_owned(), polled.saturating_duration_since(*sent).as_secs_f64() * 1_000.0);
                            seen_count.store(seen.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(poll).await;
            }
            Ok::<_, anyhow::Error>(seen)
        })
    };
    let mut publisher = Publisher::new(js.clone(), config.namespace(), config.partitions, 4_096);
    let total = args.rate * args.seconds;
    let started = Instant::now();
    let mut marked = 0;
    for index in 0..total {
        let due = Duration::from_secs_f64(index as f64 / args.rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let mut envelope = synthetic::request(10_000_000_000 + index, OffsetDateTime::now_utc());
        if index.is_multiple_of((args.rate / 100).max(1)) {
            envelope.data.consumer = Some("bench-marker".to_owned());
            published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(envelope.id.to_string(), Instant::now());
            marked += 1;
        }
        publisher.publish(&envelope).await?;
    }
    publisher.flush().await?;
    // Until every marker was seen, or 30 s.
    let drained = Instant::now();
    while drained.elapsed() < Duration::from_secs(30) && !poller.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let all_seen = seen_count.load(std::sync::atomic::Ordering::Relaxed) >= marked;
        if all_seen {
            break;
        }
    }
    stop.cancel();
    let seen = poller.await.context("freshness poller")??;
    let mut latencies: Vec<f64> = seen.values().copied().collect();
    let count = latencies.len();
    let max = latencies.iter().copied().fold(0.0, f64::max);
    Ok((quantile(&mut latencies, 0.5), quantile(&mut latencies, 0.99), max, count, marked))
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index.min(values.len() - 1)]
}

async fn cleanup(config: &StoneConfig) {
    if let Ok(client) = async_nats::connect(config.nats_url.as_str()).await {
        stone_kit::nats::delete_namespace(&async_nats::jetstream::new(client), &config.namespace()).await;
    }
    let server = clickhouse::Client::default().with_url(&config.clickhouse_url);
    let _ = server.query(&format!("DROP DATABASE IF EXISTS `{}`", config.clickhouse_database)).execute().await;
}

/// The projector's inserts so far (`stone_analytics_batch_events`): each costs ClickHouse a part
/// in the raw table and in every rollup, so their number, not only the events, drives the
/// pipeline's cost.
struct Batches {
    inserts: f64,
    events: f64,
}

impl Batches {
    fn now() -> Self {
        Self {
            inserts: stone_kit::telemetry::sample("stone_analytics_batch_events_count").unwrap_or(0.0),
            events: stone_kit::telemetry::sample("stone_analytics_batch_events_sum").unwrap_or(0.0),
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self { inserts: self.inserts - earlier.inserts, events: self.events - earlier.events }
    }
}

impl std::fmt::Display for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mean = if self.inserts > 0.0 { self.events / self.inserts } else { 0.0 };
        write!(f, "{:.0} batches inserted, {mean:.0} events per batch on average", self.inserts)
    }
}
