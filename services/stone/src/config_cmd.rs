//! `stone config export` and `stone token create|revoke`: the config ledger's tools, plus the
//! small HTTP client that `stone apply` shares to talk to the gateway.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stone_events::config::document::ConfigDocument;
use stone_gateway::auth::{Scope, create_token, revoke_token};
use stone_kit::StoneConfig;

/// Where the gateway is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Gateway base URL (plain HTTP).
    #[arg(long, env = "STONE_GATEWAY_URL", default_value = "http://127.0.0.1:8081")]
    pub gateway: String,
    /// Bearer token (`stone token create`, or the one `stone dev` prints).
    #[arg(long, env = "STONE_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Write the current configuration as YAML, in the format `stone apply` reads.
    Export {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Output file; standard output when absent.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a gateway API token and print it once (talks to Postgres directly: the bootstrap).
    Create {
        /// A unique name; recorded as the actor of the token's config changes.
        #[arg(long)]
        name: String,
        /// read, write or admin.
        #[arg(long, default_value = "read", value_parser = parse_scope)]
        scope: Scope,
    },
    /// Revoke a token by name.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    Scope::parse(text).ok_or_else(|| format!("{text:?} is not one of read, write, admin"))
}

/// A JSON client for the gateway.
pub struct GatewayClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl GatewayClient {
    pub fn new(args: &GatewayArgs) -> anyhow::Result<Self> {
        if !args.gateway.starts_with("http://") {
            anyhow::bail!("--gateway must be an http:// URL (got {:?})", args.gateway);
        }
        Ok(Self {
            base: args.gateway.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Sends a request and returns the JSON body of a 2xx answer; other answers become an error
    /// that carries the gateway's code, field and message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let payload = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value)?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(payload))?;
        let response =
            self.client.request(request).await.with_context(|| format!("cannot reach the gateway at {url}"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let error = &value["error"];
        let field = error["field"].as_str().map(|field| format!(" ({field})")).unwrap_or_default();
        anyhow::bail!(
            "gateway answered {status} {}{field}: {}",
            error["code"].as_str().unwrap_or("error"),
            error["message"].as_str().unwrap_or("no details")
        )
    }
}

impl GatewayClient {
    /// Opens a Server-Sent-Events stream (`GET`, authenticated) and returns the response once its
    /// status is 2xx.
    pub async fn open_events(&self, path: &str) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let url = format!("{}{path}", self.base);
        let request = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))?;
        let response =
            self.client.request(request).await.with_context(|| format!("cannot reach the gateway at {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            anyhow::bail!("gateway answered {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(response)
    }
}

/// Writes text to standard output (the commands' result, unlike logs on standard error).
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

pub async fn run_config(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Export { gateway, output } => {
            let client = GatewayClient::new(&gateway)?;
            let exported = client.send(Method::GET, "/v1/config/export", None).await?;
            let document: ConfigDocument = serde_json::from_value(exported).context("the gateway's export")?;
            let yaml = to_yaml(&document)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?
                }
                None => print(&yaml)?,
            }
            Ok(())
        }
    }
}

/// The document as `stone.yaml`.
pub fn to_yaml(document: &ConfigDocument) -> anyhow::Result<String> {
    Ok(format!("# Proxy Stone configuration (stone apply -f this file)\n{}", serde_norway::to_string(document)?))
}

/// Reads `stone.yaml`; errors carry the line and column.
pub fn from_yaml(text: &str) -> anyhow::Result<ConfigDocument> {
    serde_norway::from_str(text).map_err(|error| anyhow::anyhow!("{error}"))
}

pub async fn run_token(config: &StoneConfig, command: TokenCommand) -> anyhow::Result<()> {
    let pool = stone_kit::postgres::connect(config, 1).await?;
    stone_kit::postgres::migrate(&pool).await?;
    match command {
        TokenCommand::Create { name, scope } => {
            let created = create_token(&pool, &name, scope).await?;
            eprintln!("token {:?} (scope {}) created; it is shown once, store it now:", created.name, scope.as_str());
            print(&format!("{}\n", created.token))?;
        }
        TokenCommand::Revoke { name } => {
            if !revoke_token(&pool, &name).await? {
                anyhow::bail!("no active token named {name:?}");
            }
            eprintln!("token {name:?} revoked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_round_trips_a_document() -> anyhow::Result<()> {
        let text = "upstreams:\n- name: users\n  targets:\n  - url: http://10.0.0.5:8000\n    weight: 3\nroutes:\n- name: users\n  paths: [\"/users/{id}\"]\n  upstream: users\nconsumers:\n- name: acme\n  metadata: {tier: gold}\npolicies:\n- name: limit\n  type: rate_limit\n  routes: [users]\n  settings: {requests: 100, window_secs: 60}\n";
        let document = from_yaml(text)?;
        assert_eq!(document.routes[0].paths, vec!["/users/{id}".to_owned()]);
        assert_eq!(from_yaml(&to_yaml(&document)?)?, document);
        let typo =
            from_yaml("routes:\n- name: x\n  upstraem: y\n").err().map(|error| error.to_string()).unwrap_or_default();
        assert!(typo.contains("upstraem") && typo.contains("line"), "{typo}");
        Ok(())
    }
}
