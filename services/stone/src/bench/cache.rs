//! `stone bench cache`: cache hits of `stone proxy` against nginx `proxy_cache` serving the same
//! 1 KiB object with the same load tool, in one run, reported as ratios; and the latency of
//! Redis-tier hits.
//!
//! The upstream is an nginx serving a 1 KiB file with `Cache-Control: public, max-age=3600`.
//! Both proxies are warmed so that every measured request is a hit: nginx with `proxy_cache`
//! (memory keys zone, file store in the page cache), `stone proxy` with a route whose cache
//! policy is on (in-process tier), each measured with `wrk --latency` over keep-alive. Each side
//! runs twice, so that like is compared with like: nginx with its access log off and on (one
//! line per request to a file), stone with its events off and on (a `request.completed` per
//! request to the local NATS). Redis-tier hits are measured in this process through
//! `Cache::serve` with no memory tier, so every lookup goes to Redis (only answers marked
//! `detail=redis` count as hits): that isolates the tier's latency from HTTP.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use http_body_util::BodyExt;
use stone_kit::StoneConfig;

use crate::bench_proxy::{
    Guard, delete_namespace, emit_report, free_port, http_ok, parse_wrk, require, run_stone_proxy, start_baseline,
    start_nginx, uuid_suffix, wait_until, with_scratch_site,
};

#[derive(Debug, Args)]
pub struct CacheBenchArgs {
    /// Seconds of measured load per run (after a warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// nginx worker processes of the nginx cache.
    #[arg(long, default_value_t = 2)]
    nginx_workers: u32,
    /// Concurrent lookups of the Redis-tier measurement.
    #[arg(long, default_value_t = 16)]
    redis_concurrency: usize,
    /// Append the results as a section to this Markdown file (e.g. docs/benchmarks.md).
    #[arg(long)]
    record: Option<PathBuf>,
}

/// One measured run.
#[derive(Debug, Clone)]
struct Measurement {
    name: &'static str,
    requests_per_second: f64,
    p50_ms: Option<f64>,
    p99_ms: f64,
    errors: u64,
}

fn wrk(args: &CacheBenchArgs, address: SocketAddr, seconds: u64) -> anyhow::Result<(f64, f64, u64)> {
    let output = Command::new("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(format!("http://{address}/1k"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn measure(args: &CacheBenchArgs, name: &'static str, address: SocketAddr) -> anyhow::Result<Measurement> {
    eprintln!("bench: {name}: warm-up");
    wrk(args, address, 2)?;
    eprintln!("bench: {name}: {} s of load", args.duration);
    let (requests_per_second, p99_ms, errors) = wrk(args, address, args.duration)?;
    Ok(Measurement { name, requests_per_second, p50_ms: None, p99_ms, errors })
}

/// The response header of a request, for checking that a proxy really answers from its cache.
fn header_of(address: SocketAddr, name: &str) -> Option<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = "GET /1k HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .lines()
        .find_map(|line| line.split_once(':').filter(|(key, _)| key.eq_ignore_ascii_case(name)))
        .map(|(_, value)| value.trim().to_owned())
}

fn start_stone_proxy(
    config: &StoneConfig,
    dir: &Path,
    upstream: SocketAddr,
    events: bool,
) -> anyhow::Result<(Guard, SocketAddr, String)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let namespace = format!("bench{}", uuid_suffix());
    let config_path = dir.join("cache.toml");
    let toml = format!(
        "namespace = \"{namespace}\"\nnats_url = \"{nats}\"\nredis_url = \"{redis}\"\npartitions = {partitions}\n\n\
         [telemetry]\nlog = \"warn\"\n\n\
         [proxy]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nemit_events = {events}\nspool_dir = \"{spool}\"\n\n\
         [[proxy.upstreams]]\nname = \"bench\"\ntargets = [{{ url = \"http://{upstream}\" }}]\n\n\
         [[proxy.routes]]\nname = \"bench\"\npaths = [\"/*\"]\nupstream = \"bench\"\ncache = {{ enabled = true }}\n",
        nats = config.nats_url,
        redis = config.redis_url,
        partitions = config.partitions,
        spool = dir.join("cache-spool").display(),
    );
    let guard = run_stone_proxy(&config_path, &toml, admin)?;
    Ok((guard, listen, namespace))
}

/// Runs `op` from `concurrency` tasks for `seconds`; returns every call's latency in
/// microseconds and the calls that did not find what they should have.
async fn timed<F, Fut>(concurrency: usize, seconds: u64, op: F) -> anyhow::Result<(Vec<u32>, u64)>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut misses = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                if !op().await {
                    misses += 1;
                }
                latencies_us.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            (latencies_us, misses)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (worker_latencies, misses) = worker.await?;
        latencies.extend(worker_latencies);
        errors += misses;
    }
    latencies.sort_unstable();
    Ok((latencies, errors))
}

fn summarize(name: &'static str, seconds: u64, latencies: &[u32], errors: u64) -> Measurement {
    let quantile = |q: f64| {
        let index = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(index).map_or(0.0, |micros| f64::from(*micros) / 1000.0)
    };
    Measurement {
        name,
        requests_per_second: latencies.len() as f64 / seconds.max(1) as f64,
        p50_ms: Some(quantile(0.50)),
        p99_ms: quantile(0.99),
        errors,
    }
}

/// Redis-tier hits through `Cache::serve`: with a memory tier of 0 bytes there is none, so each
/// lookup reads and decodes the object from Redis; answers not marked `detail=redis` count as
/// misses. Then the same object read by the tier alone, undecoded (one `GET` round trip on the
/// multiplexed connection) and decoded, so the report shows where a Redis-tier hit's time goes.
async fn redis_tier(config: &StoneConfig, args: &CacheBenchArgs) -> anyhow::Result<Vec<Measurement>> {
    use stone_proxy::cache::store::RedisTier;
    use stone_proxy::cache::{Cache, CachePolicy, CacheRequest, CacheSettings, Fetcher};
    let prefix = format!("bench{}:cache", uuid_suffix());
    let settings = CacheSettings {
        memory_max_bytes: 0,
        redis_url: Some(config.redis_url.clone()),
        redis_prefix: prefix.clone(),
        redis_timeout: Duration::from_millis(500),
        ..CacheSettings::default()
    };
    let cache = Cache::new(&settings, None).await;
    anyhow::ensure!(cache.has_redis(), "Redis at {} is not reachable", config.redis_url);
    let fetcher: Fetcher = Arc::new(|_parts| {
        Box::pin(async {
            let body =
                http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; 1024])).map_err(|never| match never {}).boxed();
            let mut response = hyper::Response::new(body);
            response
                .headers_mut()
                .insert("cache-control", hyper::header::HeaderValue::from_static("public, max-age=3600"));
            Ok(response)
        })
    });
    let policy = Arc::new(CachePolicy::with_defaults());
    let request =
        CacheRequest { route: "bench".into(), policy: Arc::clone(&policy), host: "bench".into(), consumer: None };
    // Store the object, then every later lookup is a Redis hit.
    let stored = cache
        .serve(request.clone(), lookup_parts(), Arc::clone(&fetcher))
        .await
        .map_err(|kind| anyhow::anyhow!("{}", kind.as_str()))?;
    let _ = stored.response.into_body().collect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut results = Vec::new();
    eprintln!("bench: redis tier: {} s of lookups through Cache::serve", args.duration);
    let serve = {
        let (cache, fetcher, request) = (cache.clone(), Arc::clone(&fetcher), request.clone());
        move || {
            let (cache, fetcher, request) = (cache.clone(), Arc::clone(&fetcher), request.clone());
            async move {
                match cache.serve(request, lookup_parts(), fetcher).await {
                    Ok(served) => {
                        let from_redis = served
                            .response
                            .headers()
                            .get("cache-status")
                            .and_then(|value| value.to_str().ok())
                            .is_some_and(|value| value.contains("detail=redis"));
                        let _ = served.response.into_body().collect().await;
                        served.status == stone_events::request::CacheStatus::Hit && from_redis
                    }
                    Err(_) => false,
                }
            }
        }
    };
    let (latencies, errors) = timed(args.redis_concurrency, args.duration, serve).await?;
    results.push(summarize("stone, Redis-tier hits (in process, Cache::serve)", args.duration, &latencies, errors));

    let tier =
        RedisTier::connect(&config.redis_url, &prefix, Duration::from_millis(500), Duration::from_secs(3)).await?;
    let seconds = args.duration.div_ceil(2);
    for (name, decode) in
        [("Redis tier alone: GET round trip, undecoded", false), ("Redis tier alone: GET and decode", true)]
    {
        eprintln!("bench: {name}: {seconds} s");
        let tier = tier.clone();
        let op = move || {
            let tier = tier.clone();
            async move {
                if decode {
                    matches!(tier.get("bench/1k").await, Ok(Some(_)))
                } else {
                    matches!(tier.get_encoded("bench/1k").await, Ok(Some(_)))
                }
            }
        };
        let (latencies, errors) = timed(args.redis_concurrency, seconds, op).await?;
        results.push(summarize(name, seconds, &latencies, errors));
    }
    let _ = cache
        .purge(&stone_events::cache::PurgeCommand {
            by: stone_events::cache::PurgeBy::Prefix,
            value: "bench".into(),
            actor: "bench".into(),
        })
        .await;
    Ok(results)
}

/// The head of `GET /1k`.
fn lookup_parts() -> hyper::http::request::Parts {
    let (mut parts, ()) = hyper::Request::new(()).into_parts();
    parts.uri = hyper::Uri::from_static("/1k");
    parts
}

pub fn run(config: &StoneConfig, runtime: &tokio::runtime::Runtime, args: CacheBenchArgs) -> anyhow::Result<()> {
    require("wrk")?;
    require("nginx")?;
    let load = load_average();
    let mut results = with_scratch_site("stone-bench-cache", |dir| run_in(config, &args, dir))?;
    results.extend(runtime.block_on(redis_tier(config, &args))?);
    emit_report(&report(&args, &results, &load), args.record.as_deref())
}

fn run_in(config: &StoneConfig, args: &CacheBenchArgs, dir: &Path) -> anyhow::Result<Vec<Measurement>> {
    let upstream = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let upstream_block = format!(
        "  access_log off;\n  keepalive_requests 1000000;\n  server {{\n    listen {upstream} backlog=4096;\n    \
         location / {{ root {www}; add_header Cache-Control \"public, max-age=3600\"; try_files /1k =404; }}\n  }}",
        www = dir.join("www").display()
    );
    let _upstream = start_nginx(dir, "upstream", 1, &upstream_block)?;
    wait_until("upstream nginx", || http_ok(upstream, "/1k"))?;

    let mut results = Vec::new();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let block = format!(
        "  access_log off;\n  keepalive_requests 1000000;\n  \
         proxy_cache_path {cache} levels=1:2 keys_zone=bench:10m max_size=100m inactive=60m use_temp_path=off;\n  \
         upstream backend {{ server {upstream}; keepalive 128; }}\n  \
         server {{\n    listen {listen} backlog=4096;\n    location / {{\n      proxy_pass http://backend;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_cache bench;\n      \
         add_header X-Cache-Status $upstream_cache_status;\n    }}\n  }}",
        cache = dir.join("nginx-cache").display()
    );
    for (name, log) in
        [("nginx proxy_cache hits, access log off", false), ("nginx proxy_cache hits, access log on", true)]
    {
        let log_line = if log {
            format!("access_log {};", dir.join("access.log").display())
        } else {
            "access_log off;".to_owned()
        };
        let nginx = start_nginx(
            dir,
            if log { "cache-log" } else { "cache" },
            args.nginx_workers,
            &block.replace("access_log off;", &log_line),
        )?;
        wait_until("nginx cache", || http_ok(listen, "/1k"))?;
        wait_until("nginx cache hit", || header_of(listen, "x-cache-status").as_deref() == Some("HIT"))?;
        results.push(measure(args, name, listen)?);
        drop(nginx);
    }

    {
        let (_baseline, listen) = start_baseline("static", None)?;
        results.push(measure(args, BASELINE, listen)?);
    }
    for (name, events) in
        [("stone proxy, in-process hits, events off", false), ("stone proxy, in-process hits, events on", true)]
    {
        let (guard, listen, namespace) = start_stone_proxy(config, dir, upstream, events)?;
        let hit = wait_until("stone cache hit", || {
            header_of(listen, "cache-status").is_some_and(|status| status.contains("; hit"))
        });
        let measured = hit.and_then(|()| measure(args, name, listen));
        drop(guard);
        delete_namespace(config, &namespace);
        results.push(measured?);
    }
    Ok(results)
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages: how busy the machine was besides the run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The row of the minimal hyper server answering from memory: the same server and runtime as the
/// proxy, no cache lookup, no events.
const BASELINE: &str = "hyper baseline: stored 1 KiB answer, nothing else";

fn report(args: &CacheBenchArgs, results: &[Measurement], load: &str) -> String {
    let find = |name: &str| results.iter().find(|measurement| measurement.name.starts_with(name));
    let mut text = String::new();
    let _ = writeln!(
        text,
        "\n## Cache hits vs nginx proxy_cache ({})\n",
        stone_events::timestamp::format(time::OffsetDateTime::now_utc())
    );
    let _ = writeln!(
        text,
        "`stone bench cache --duration {} --connections {}` (release build): `wrk -t{} -c{} --latency` over \
         keep-alive, every request a hit on one 1 KiB object (`Cache-Control: public, max-age=3600`); nginx \
         proxy_cache with {} workers, access log off and on; stone with its events off and on. Redis-tier hits: {} \
         concurrent `Cache::serve` calls in process with no memory tier, then the tier alone (`GET` on the \
         multiplexed connection, undecoded and decoded) to split round trip from decoding. {} CPUs; load average \
         before the run: {}.\n",
        args.duration,
        args.connections,
        args.threads,
        args.connections,
        args.nginx_workers,
        args.redis_concurrency,
        std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        load,
    );
    let _ = writeln!(text, "| run | requests/s | p50 | p99 | errors or misses |");
    let _ = writeln!(text, "|---|---:|---:|---:|---:|");
    for measurement in results {
        let p50 = measurement.p50_ms.map(|ms| format!("{ms:.3} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            text,
            "| {} | {:.0} | {p50} | {:.3} ms | {} |",
            measurement.name, measurement.requests_per_second, measurement.p99_ms, measurement.errors
        );
    }
    let _ = writeln!(text, "\n| ratio | requests/s | p99 (lower is better) | target |");
    let _ = writeln!(text, "|---|---:|---:|---|");
    for (label, stone, nginx) in [
        (
            "stone events off / nginx log off",
            "stone proxy, in-process hits, events off",
            "nginx proxy_cache hits, access log off",
        ),
        (
            "stone events on / nginx log on",
            "stone proxy, in-process hits, events on",
            "nginx proxy_cache hits, access log on",
        ),
    ] {
        if let (Some(stone), Some(nginx)) = (find(stone), find(nginx)) {
            let _ = writeln!(
                text,
                "| {label} | {:.2}x | {:.2}x | ≥ 1.3x rps |",
                stone.requests_per_second / nginx.requests_per_second,
                stone.p99_ms / nginx.p99_ms
            );
        }
    }
    if let (Some(baseline), Some(nginx), Some(stone)) = (
        find(BASELINE),
        find("nginx proxy_cache hits, access log off"),
        find("stone proxy, in-process hits, events off"),
    ) {
        let _ = writeln!(
            text,
            "| hyper baseline / nginx log off (the stack's ceiling) | {:.2}x | {:.2}x | |",
            baseline.requests_per_second / nginx.requests_per_second,
            baseline.p99_ms / nginx.p99_ms
        );
        let _ = writeln!(
            text,
            "| stone events off / hyper baseline (what the cache costs) | {:.2}x | {:.2}x | |",
            stone.requests_per_second / baseline.requests_per_second,
            stone.p99_ms / baseline.p99_ms
        );
    }
    if let Some(redis) = find("stone, Redis") {
        let verdict = if redis.p99_ms < 1.0 { "met" } else { "not met" };
        let _ = writeln!(text, "\nRedis-tier hit p99: {:.3} ms (target < 1 ms: {verdict}).", redis.p99_ms);
    }
    text
}
