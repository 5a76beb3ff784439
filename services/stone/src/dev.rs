//! `stone dev`: every service in one process, plus the demo upstream and traffic.

use std::net::SocketAddr;

use clap::Args;
use stone_events::config::{RouteSpec, TargetSpec, UpstreamSpec};
use stone_kit::{Shutdown, StoneConfig};

use crate::demo;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address of the demo upstream.
    #[arg(long, default_value = "127.0.0.1:8090")]
    demo_upstream: SocketAddr,
    /// Demo requests per second through the proxy (0 turns the generator off).
    #[arg(long, default_value_t = 20)]
    traffic: u32,
}

/// Routes to the demo upstream, used when the configuration has none.
fn demo_routes(upstream: SocketAddr) -> (Vec<RouteSpec>, Vec<UpstreamSpec>) {
    let route = |name: &str, paths: &[&str]| RouteSpec {
        name: name.to_owned(),
        hosts: vec![],
        paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        methods: vec![],
        headers: Default::default(),
        upstream: "demo".to_owned(),
        strip_prefix: false,
        timeout_ms: None,
        priority: 0,
        retries: None,
        max_body_bytes: None,
        auth: None,
        rate_limit: None,
        cache: None,
    };
    let routes =
        vec![route("users", &["/api/users/{id}"]), route("orders", &["/api/orders"]), route("api", &["/api/*"])];
    let upstreams = vec![UpstreamSpec {
        name: "demo".to_owned(),
        algorithm: Default::default(),
        targets: vec![TargetSpec { url: format!("http://{upstream}"), weight: 1 }],
        health_check: None,
        hash_on: None,
        passive_health: None,
    }];
    (routes, upstreams)
}

pub async fn start(mut config: StoneConfig, args: DevArgs, shutdown: &Shutdown) -> anyhow::Result<()> {
    let demo_listener = stone_kit::bind(args.demo_upstream, "--demo-upstream").await?;
    let demo_addr = demo_listener.local_addr()?;
    if config.proxy.routes.is_empty() && config.proxy.upstreams.is_empty() {
        let (routes, upstreams) = demo_routes(demo_addr);
        config.proxy.routes = routes;
        config.proxy.upstreams = upstreams;
    }
    // The projector applies the ClickHouse migrations the gateway reads through, so it goes first.
    let projector = stone_analytics::build(&config, shutdown).await?;
    let gateway = stone_gateway::build(&config, shutdown).await?;
    stone_config_projector::build(&config, shutdown).await?;
    let admin_token = dev_admin_token(&config).await?;
    let proxy = stone_proxy::build(&config, shutdown).await?;
    shutdown.spawn(demo::serve_upstream(demo_listener, shutdown.clone()));
    if args.traffic > 0 {
        shutdown.spawn(demo::generate_traffic(proxy.listen_addr, args.traffic, shutdown.clone()));
    }

    let gateway_addr = gateway.local_addr();
    tracing::info!(
        proxy = %proxy.listen_addr,
        gateway = %gateway_addr,
        "proxy stone dev stack is up"
    );
    eprintln!(
        "\nProxy Stone is running (Ctrl-C to stop).\n\
         \n  proxy            http://{proxy}/api/users/42   (demo traffic: {traffic} req/s)\
         \n  proxy admin      http://{proxy_admin}/metrics\
         \n  analytics        http://{gateway_addr}/v1/analytics/summary?from=-15m\
         \n  openapi          http://{gateway_addr}/v1/openapi.json\
         \n  config API       curl -H 'Authorization: Bearer {admin_token}' http://{gateway_addr}/v1/config/routes\
         \n  admin token      {admin_token}   (shown once; export STONE_TOKEN=… for stone apply)\
         \n  projector admin  http://{projector_admin}/readyz\
         \n  demo upstream    http://{demo_addr}/api/orders\n",
        proxy = proxy.listen_addr,
        proxy_admin = proxy.admin_addr,
        projector_admin = projector.admin_addr,
        traffic = args.traffic,
    );
    Ok(())
}

/// A fresh admin token for this dev session, so a new user can call the config API at once.
async fn dev_admin_token(config: &StoneConfig) -> anyhow::Result<String> {
    let pool = stone_kit::postgres::connect(config, 1).await?;
    let name = format!("dev-admin-{}", stone_events::new_event_id().simple());
    let created = stone_gateway::auth::create_token(&pool, &name, stone_gateway::auth::Scope::Admin).await?;
    pool.close().await;
    Ok(created.token)
}
