//! `stone apply`, `stone config export` and `stone token create` as a user runs them: the real
//! binary against a gateway and config projector on their own namespace and database.
//! Export then apply is a no-op; a bad file changes nothing and names the field.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

use stone_kit::Shutdown;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn stone(args: &[&str], gateway: &str, token: &str, database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stone"))
        .args(args)
        .env("STONE_GATEWAY_URL", gateway)
        .env("STONE_TOKEN", token)
        .env("STONE_DATABASE_URL", database_url)
        .output()
        .expect("run stone")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_apply_is_a_no_op_and_a_bad_file_changes_nothing() -> TestResult {
    let config = stone_kit::testing::isolated("cli");
    stone_kit::testing::create_database(&config).await?;
    let shutdown = Shutdown::new();
    let directory = std::env::temp_dir().join(format!("stone-cli-{}", config.namespace));
    // Caught, so that a failed assertion still removes the test's streams and database.
    let outcome: std::thread::Result<TestResult> = stone_kit::testing::caught(async {
        let gateway = stone_gateway::build(&config, &shutdown).await?;
        stone_config_projector::build(&config, &shutdown).await?;
        let url = format!("http://{}", gateway.local_addr());
        let database_url = config.database_url.clone();

        // The bootstrap token: printed once, on stdout.
        let created = stone(&["token", "create", "--name", "ops", "--scope", "admin"], &url, "", &database_url);
        assert!(created.status.success(), "{}", text(&created));
        let token = String::from_utf8(created.stdout)?.trim().to_owned();
        assert!(token.starts_with("stn_"), "{token}");

        std::fs::create_dir_all(&directory)?;
        let file = directory.join("stone.yaml");
        std::fs::write(
            &file,
            "upstreams:\n- name: users\n  targets:\n  - url: http://10.0.0.5:8000\n    weight: 3\n\
             routes:\n- name: users\n  paths: [\"/users/{id}\"]\n  upstream: users\n\
             policies:\n- name: limit\n  type: rate_limit\n  routes: [users]\n  settings: {requests: 100, window_secs: 60}\n",
        )?;
        let file_arg = file.to_string_lossy().into_owned();
        let applied = stone(&["apply", "-f", &file_arg], &url, &token, &database_url);
        assert!(applied.status.success(), "{}", text(&applied));
        let diff = String::from_utf8_lossy(&applied.stdout).into_owned();
        assert!(diff.contains("+ create upstream users") && diff.contains("+ create policy limit"), "{diff}");

        // Export includes every accepted change (the gateway waits for its projection).
        let exported = directory.join("export.yaml");
        let export_arg = exported.to_string_lossy().into_owned();
        let export = stone(&["config", "export", "-o", &export_arg], &url, &token, &database_url);
        assert!(export.status.success(), "{}", text(&export));
        assert!(std::fs::read_to_string(&exported)?.contains("/users/{id}"));
        let again = stone(&["apply", "-f", &export_arg], &url, &token, &database_url);
        assert!(again.status.success(), "{}", text(&again));
        assert!(text(&again).contains("no changes"), "{}", text(&again));
        assert!(again.stdout.is_empty(), "no diff on stdout");

        std::fs::write(&file, "routes:\n- name: bad\n  paths: [\"nope\"]\n  upstream: users\n")?;
        let refused = stone(&["apply", "-f", &file_arg, "--no-prune"], &url, &token, &database_url);
        assert!(!refused.status.success());
        assert!(text(&refused).contains("routes.paths[0]"), "{}", text(&refused));
        let unauthorised = stone(&["config", "export"], &url, "stn_nope_nope", &database_url);
        assert!(!unauthorised.status.success() && text(&unauthorised).contains("401"), "{}", text(&unauthorised));
        Ok(())
    })
    .await;
    let _ = std::fs::remove_dir_all(&directory);
    let _ = shutdown.drain(Duration::from_secs(5)).await;
    stone_kit::testing::cleanup(&config).await;
    stone_kit::testing::rethrow(outcome)
}
