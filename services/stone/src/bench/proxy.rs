//! `stone bench proxy`: the proxy against nginx as a reverse proxy to the same upstream, with the
//! same load tool, in one run, reported as ratios.
//!
//! The upstream is an nginx serving a 1 KiB file (a separate process, so neither proxy shares a
//! runtime with it). Four runs of `wrk -t1 -c64 --latency` over keep-alive: nginx (2 workers,
//! upstream keep-alive) with its access log on and off, and `stone proxy` (a child process of
//! this binary) with events on (to the local NATS) and off. Peak memory of the proxy is its
//! `VmHWM` after the run. nginx and wrk come from Debian's packages.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use stone_kit::StoneConfig;

#[derive(Debug, Args)]
pub struct ProxyBenchArgs {
    /// Seconds of measured load per run (after a warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// nginx worker processes of the nginx proxy.
    #[arg(long, default_value_t = 2)]
    nginx_workers: u32,
    /// Append the results as a section to this Markdown file (e.g. docs/benchmarks.md).
    #[arg(long)]
    record: Option<PathBuf>,
}

/// One wrk run.
#[derive(Debug, Clone)]
struct Measurement {
    name: &'static str,
    requests_per_second: f64,
    p99_ms: f64,
    errors: u64,
    peak_rss_kib: Option<u64>,
    /// CPU time (user + system) of the proxy's processes per request served, microseconds.
    proxy_cpu_us: Option<f64>,
    /// CPU time of the local nats-server per request, microseconds (what events cost it).
    nats_cpu_us: Option<f64>,
}

/// A child process stopped (and reaped) when dropped, so a failed run leaves nothing behind.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master stops its workers on TERM, but SIGKILL would orphan them.
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn require(tool: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    if found { Ok(()) } else { bail!("{tool} is not installed (apt-get install nginx wrk)") }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").is_file() { "/usr/sbin/nginx" } else { "nginx" }
}

/// A GET that succeeds with 2xx, for readiness waits.
pub(crate) fn http_ok(address: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 2")
}

pub(crate) fn wait_until(what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not become ready")
}

/// Starts an nginx with `http_block` as its `http {}` content.
pub(crate) fn start_nginx(dir: &Path, name: &str, workers: u32, http_block: &str) -> anyhow::Result<Guard> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(&prefix)?;
    let temp = |kind: &str| prefix.join(kind).display().to_string();
    let config = format!(
        "worker_processes {workers};\nuser root;\npid {pid};\nerror_log {error} warn;\ndaemon off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  client_body_temp_path {body};\n  proxy_temp_path {proxy};\n  fastcgi_temp_path {fastcgi};\n  \
         uwsgi_temp_path {uwsgi};\n  scgi_temp_path {scgi};\n{http_block}\n}}\n",
        pid = prefix.join("nginx.pid").display(),
        error = prefix.join("error.log").display(),
        body = temp("body"),
        proxy = temp("proxy"),
        fastcgi = temp("fastcgi"),
        uwsgi = temp("uwsgi"),
        scgi = temp("scgi"),
    );
    let config_path = prefix.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nginx")?;
    Ok(Guard(child))
}

fn run_wrk(args: &ProxyBenchArgs, address: SocketAddr, seconds: u64) -> anyhow::Result<(f64, f64, u64)> {
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

/// Requests/s, p99 in milliseconds and non-2xx/socket errors from wrk's text output.
pub(crate) fn parse_wrk(text: &str) -> anyhow::Result<(f64, f64, u64)> {
    let mut requests_per_second = None;
    let mut p99_ms = None;
    let mut errors = 0u64;
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("Requests/sec:") {
            requests_per_second = value.trim().parse::<f64>().ok();
        } else if let Some(value) = line.strip_prefix("99%") {
            p99_ms = parse_duration_ms(value.trim());
        } else if let Some(value) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += value.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(value) = line.strip_prefix("Socket errors:") {
            errors += value
                .split(',')
                .filter_map(|part| part.split_whitespace().last())
                .filter_map(|number| number.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    match (requests_per_second, p99_ms) {
        (Some(rps), Some(p99)) => Ok((rps, p99, errors)),
        _ => bail!("no Requests/sec or 99% line"),
    }
}

/// `1.23ms`, `456.00us`, `2.01s` → milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(us) = text.strip_suffix("us") {
        (us, 0.001)
    } else if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000.0)
    } else {
        return None;
    };
    number.trim().parse::<f64>().ok().map(|value| value * factor)
}

/// Peak resident memory of a process, from `/proc/<pid>/status`.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// CPU clock ticks (user + system, all threads) of `pids`, from `/proc/<pid>/stat`.
pub(crate) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// `root` and its direct children (an nginx master and its workers).
fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    pids.extend(processes(|stat| {
        stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) == Some(root.to_string().as_str())
    }));
    pids
}

/// Processes whose `/proc/<pid>/stat` satisfies `keep`.
pub(crate) fn processes(keep: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| keep(&stat)))
        .collect()
}

/// Clock ticks per second of `/proc` CPU times.
pub(crate) fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// Runs the load against `address`. With `pid` (the proxy's process, or an nginx master), also
/// the proxy's and nats-server's CPU time per request: on a machine shared with other work,
/// requests/s move with the neighbours' load, CPU time per request much less.
fn measure(
    args: &ProxyBenchArgs,
    name: &'static str,
    address: SocketAddr,
    pid: Option<u32>,
) -> anyhow::Result<Measurement> {
    eprintln!("bench: {name}: warm-up");
    run_wrk(args, address, 2)?;
    eprintln!("bench: {name}: {} s of load", args.duration);
    let proxy = pid.map(process_tree).unwrap_or_default();
    let nats = processes(|stat| stat.contains("(nats-server)"));
    let (proxy_before, nats_before) = (cpu_ticks(&proxy), cpu_ticks(&nats));
    let (requests_per_second, p99_ms, errors) = run_wrk(args, address, args.duration)?;
    let (proxy_after, nats_after) = (cpu_ticks(&proxy), cpu_ticks(&nats));
    let requests = requests_per_second * args.duration as f64;
    let per_request = |ticks: u64| (requests > 0.0).then(|| ticks as f64 / clock_ticks_per_second() * 1e6 / requests);
    Ok(Measurement {
        name,
        requests_per_second,
        p99_ms,
        errors,
        peak_rss_kib: if name.starts_with("stone") || name.starts_with("hyper") {
            pid.and_then(peak_rss_kib)
        } else {
            None
        },
        proxy_cpu_us: if proxy.is_empty() { None } else { per_request(proxy_after.saturating_sub(proxy_before)) },
        nats_cpu_us: if nats.is_empty() { None } else { per_request(nats_after.saturating_sub(nats_before)) },
    })
}

/// Starts `stone proxy` from this binary with a file configuration routing to the upstream.
fn start_stone_proxy(
    config: &StoneConfig,
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    events: bool,
) -> anyhow::Result<(Guard, SocketAddr, String)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let namespace = format!("bench{}", &uuid_suffix());
    let config_path = dir.join(format!("{name}.toml"));
    let toml = format!(
        "namespace = \"{namespace}\"\nnats_url = \"{nats}\"\npartitions = {partitions}\n\n[telemetry]\nlog = \"warn\"\n\n\
         [proxy]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nemit_events = {events}\nspool_dir = \"{spool}\"\n\n\
         [[proxy.upstreams]]\nname = \"bench\"\ntargets = [{{ url = \"http://{upstream}\" }}]\n\n\
         [[proxy.routes]]\nname = \"bench\"\npaths = [\"/*\"]\nupstream = \"bench\"\n",
        nats = config.nats_url,
        partitions = config.partitions,
        spool = dir.join(format!("{name}-spool")).display(),
    );
    let guard = run_stone_proxy(&config_path, &toml, admin)?;
    Ok((guard, listen, namespace))
}

/// Writes `toml` to `config_path`, starts `stone proxy` from this binary with it, and waits until
/// its admin listener reports ready.
pub fn run_stone_proxy(config_path: &Path, toml: &str, admin: SocketAddr) -> anyhow::Result<Guard> {
    std::fs::write(config_path, toml)?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(config_path)
        .arg("proxy")
        .env_remove("STONE_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting stone proxy")?;
    let guard = Guard(child);
    wait_until("stone proxy", || http_ok(admin, "/readyz"))?;
    Ok(guard)
}

/// Starts the hidden `stone bench hyper-baseline` from this binary (see `bench/baseline.rs`) and
/// waits until it answers.
pub(crate) fn start_baseline(mode: &str, upstream: Option<SocketAddr>) -> anyhow::Result<(Guard, SocketAddr)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["bench", "hyper-baseline", "--mode", mode, "--listen", &listen.to_string()]);
    if let Some(upstream) = upstream {
        command.args(["--upstream", &upstream.to_string()]);
    }
    let child = command.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().context("starting hyper-baseline")?;
    let guard = Guard(child);
    wait_until("hyper baseline", || http_ok(listen, "/1k"))?;
    Ok((guard, listen))
}

pub(crate) fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", nanos & 0xff_ffff_ffff)
}

/// Removes the streams and KV buckets a bench proxy created in its namespace.
pub(crate) fn delete_namespace(config: &StoneConfig, namespace: &str) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    runtime.block_on(async {
        let Ok(client) = async_nats::connect(config.nats_url.as_str()).await else { return };
        let Ok(ns) = stone_events::Namespace::new(namespace) else { return };
        stone_kit::nats::delete_namespace(&async_nats::jetstream::new(client), &ns).await;
    });
}

pub fn run(config: &StoneConfig, args: ProxyBenchArgs) -> anyhow::Result<()> {
    require("wrk")?;
    require("nginx")?;
    let results = with_scratch_site("stone-bench", |dir| run_in(config, &args, dir))?;
    emit_report(&report(&args, &results), args.record.as_deref())
}

/// Runs `bench` with a fresh scratch folder holding `www/1k` (the 1 KiB object every benchmark
/// serves), and removes the folder whatever the outcome.
pub(crate) fn with_scratch_site<T>(prefix: &str, bench: impl FnOnce(&Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid_suffix()));
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www").join("1k"), vec![b'x'; 1024])?;
    let outcome = bench(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// Prints a report (the command's output) and appends it to `record` when given.
pub(crate) fn emit_report(report: &str, record: Option<&Path>) -> anyhow::Result<()> {
    println_report(report);
    if let Some(path) = record {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        file.write_all(report.as_bytes())?;
        eprintln!("bench: appended to {}", path.display());
    }
    Ok(())
}

#[allow(clippy::print_stdout)] // the report is the command's output
fn println_report(report: &str) {
    print!("{report}");
}

fn run_in(config: &StoneConfig, args: &ProxyBenchArgs, dir: &Path) -> anyhow::Result<Vec<Measurement>> {
    let upstream = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let upstream_block = format!(
        "  access_log off;\n  keepalive_requests 1000000;\n  server {{\n    listen {upstream} backlog=4096;\n    \
         location / {{ root {www}; try_files /1k =404; }}\n  }}",
        www = dir.join("www").display()
    );
    let _upstream = start_nginx(dir, "upstream", 1, &upstream_block)?;
    wait_until("upstream nginx", || http_ok(upstream, "/1k"))?;

    let mut results = Vec::new();
    for (name, access_log) in [("nginx, access log on", true), ("nginx, access log off", false)] {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = if access_log {
            format!("access_log {};", dir.join("access.log").display())
        } else {
            "access_log off;".to_owned()
        };
        let block = format!(
            "  {log}\n  keepalive_requests 1000000;\n  upstream backend {{ server {upstream}; keepalive 128; }}\n  \
             server {{\n    listen {listen} backlog=4096;\n    location / {{\n      proxy_pass http://backend;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}"
        );
        let guard = start_nginx(dir, if access_log { "proxy-log" } else { "proxy-nolog" }, args.nginx_workers, &block)?;
        wait_until("nginx proxy", || http_ok(listen, "/1k"))?;
        results.push(measure(args, name, listen, Some(guard.0.id()))?);
        drop(guard);
    }
    {
        let (guard, listen) = start_baseline("forward", Some(upstream))?;
        results.push(measure(args, BASELINE, listen, Some(guard.0.id()))?);
    }
    for (name, events) in [("stone proxy, events on", true), ("stone proxy, events off", false)] {
        let (guard, listen, namespace) =
            start_stone_proxy(config, dir, if events { "events-on" } else { "events-off" }, upstream, events)?;
        let measured = measure(args, name, listen, Some(guard.0.id()));
        drop(guard);
        delete_namespace(config, &namespace);
        results.push(measured?);
    }
    Ok(results)
}

/// The row of the minimal hyper forwarder: the same server, client and runtime as the proxy,
/// doing nothing else.
const BASELINE: &str = "hyper baseline: plain forward, nothing else";

fn report(args: &ProxyBenchArgs, results: &[Measurement]) -> String {
    let find = |name: &str| results.iter().find(|measurement| measurement.name == name);
    let mut text = String::new();
    let _ =
        writeln!(text, "\n## Proxy vs nginx ({})\n", stone_events::timestamp::format(time::OffsetDateTime::now_utc()));
    let _ = writeln!(
        text,
        "`stone bench proxy --duration {} --connections {}` (release build): `wrk -t{} -c{} --latency`, 1 KiB \
         responses over keep-alive, upstream an nginx serving a static file; nginx proxy with {} workers and \
         upstream keep-alive. {} CPUs.\n",
        args.duration,
        args.connections,
        args.threads,
        args.connections,
        args.nginx_workers,
        std::thread::available_parallelism().map(usize::from).unwrap_or(0),
    );
    let _ = writeln!(
        text,
        "| run | requests/s | p99 | errors | peak RSS | proxy CPU / request | nats-server CPU / request |"
    );
    let _ = writeln!(text, "|---|---:|---:|---:|---:|---:|---:|");
    let micros = |value: Option<f64>| value.map(|us| format!("{us:.1} µs")).unwrap_or_else(|| "-".into());
    for measurement in results {
        let rss =
            measurement.peak_rss_kib.map(|kib| format!("{:.1} MiB", kib as f64 / 1024.0)).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            text,
            "| {} | {:.0} | {:.2} ms | {} | {rss} | {} | {} |",
            measurement.name,
            measurement.requests_per_second,
            measurement.p99_ms,
            measurement.errors,
            micros(measurement.proxy_cpu_us),
            micros(measurement.nats_cpu_us)
        );
    }
    let _ = writeln!(
        text,
        "
CPU per request is the proxy's processes' (and the local nats-server's) user + system time during \
         the measured run divided by the requests served; it moves much less with other load on the machine \
         than requests/s."
    );
    let ratio = |a: Option<&Measurement>, b: Option<&Measurement>, p99: bool| match (a, b) {
        (Some(a), Some(b)) if p99 => format!("{:.2}x", a.p99_ms / b.p99_ms),
        (Some(a), Some(b)) => format!("{:.2}x", a.requests_per_second / b.requests_per_second),
        _ => "-".to_owned(),
    };
    // CPU per request of the proxy plus NATS (what events cost is mostly in nats-server), as the
    // inverse ratio so that, like requests/s, higher is better.
    let cpu_ratio = |a: Option<&Measurement>, b: Option<&Measurement>| {
        let total = |m: &Measurement| m.proxy_cpu_us.map(|proxy| proxy + m.nats_cpu_us.unwrap_or(0.0));
        match (a.and_then(total), b.and_then(total)) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".to_owned(),
        }
    };
    let on = find("stone proxy, events on");
    let off = find("stone proxy, events off");
    let nginx_log = find("nginx, access log on");
    let nginx_nolog = find("nginx, access log off");
    let _ = writeln!(
        text,
        "\n| ratio | requests/s | p99 (lower is better) | requests per CPU second, proxy + nats-server | target |"
    );
    let _ = writeln!(text, "|---|---:|---:|---:|---|");
    let baseline = find(BASELINE);
    for (label, a, b, target) in [
        ("events on / nginx log on", on, nginx_log, "≥ 1.0x rps"),
        ("events off / nginx log off", off, nginx_nolog, ""),
        ("events on / events off", on, off, "≥ 0.95x rps"),
        ("hyper baseline / nginx log off (the stack's ceiling)", baseline, nginx_nolog, ""),
        ("events off / hyper baseline (what our features cost)", off, baseline, ""),
    ] {
        let _ = writeln!(
            text,
            "| {label} | {} | {} | {} | {target} |",
            ratio(a, b, false),
            ratio(a, b, true),
            cpu_ratio(a, b)
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() -> anyhow::Result<()> {
        let text = "Running 10s test @ http://127.0.0.1:1/1k\n  1 threads and 64 connections\n  Latency Distribution\n     50%  401.00us\n     75%  512.00us\n     90%  700.00us\n     99%    1.52ms\n  1180000 requests in 10.00s, 1.3GB read\n  Non-2xx or 3xx responses: 3\nRequests/sec: 117980.55\nTransfer/sec:    130.05MB\n";
        let (rps, p99, errors) = parse_wrk(text)?;
        assert!((rps - 117_980.55).abs() < 0.01);
        assert!((p99 - 1.52).abs() < 1e-9);
        assert_eq!(errors, 3);
        assert_eq!(parse_duration_ms("250.00us"), Some(0.25));
        Ok(())
    }
}
