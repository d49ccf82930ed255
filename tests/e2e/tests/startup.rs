//! Process-level behaviour at start and stop: waiting for NATS, naming bad settings.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::time::Duration;

use orderflow_testkit::{ChildProcess, NatsServer, TestDb, eventually, free_port};

/// A service started before nats-server reports not-ready (naming NATS), then becomes ready
/// once the server comes up, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_nats_becomes_ready_when_it_comes_up() {
    let nats_port = free_port();
    let http_port = free_port();
    let db = TestDb::sqlite();
    let mut service = ChildProcess::spawn_binary(
        "inventory-service",
        Vec::<String>::new(),
        [
            (
                "ORDERFLOW_NATS_URL",
                format!("nats://127.0.0.1:{nats_port}"),
            ),
            ("ORDERFLOW_ADMIN_ADDR", format!("127.0.0.1:{http_port}")),
            ("ORDERFLOW_DATABASE_URL", db.url().to_owned()),
            ("ORDERFLOW_LOG_FORMAT", "json".to_owned()),
        ],
    );
    let http = orderflow_testkit::http_client();
    let readyz = format!("http://127.0.0.1:{http_port}/readyz");
    let report = eventually(Duration::from_secs(30), "readyz answers", || async {
        let r = http.get(&readyz).send().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        ))
    })
    .await;
    assert_eq!(report.0, 503, "not ready without NATS: {}", report.1);
    assert!(
        report.1["checks"]["nats"]
            .as_str()
            .unwrap()
            .contains("not connected"),
        "{}",
        report.1
    );
    let live = http
        .get(format!("http://127.0.0.1:{http_port}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200, "alive all the same");

    let _nats = NatsServer::start_on(nats_port).await;
    eventually(Duration::from_secs(30), "ready once NATS is up", || async {
        let r = http.get(&readyz).send().await.map_err(|e| e.to_string())?;
        if r.status() == 200 {
            Ok(())
        } else {
            Err(r.text().await.unwrap_or_default())
        }
    })
    .await;
    service.terminate();
    assert!(
        service.wait_exit(Duration::from_secs(30)).await.success(),
        "clean exit on SIGTERM"
    );
}

/// A bad setting stops the process at start with an error naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_named() {
    for (name, value, expected) in [
        ("ORDERFLOW_HTTP_ADDR", "localhost", "--http-addr"),
        ("ORDERFLOW_ADMIN_ADDR", "localhost", "--admin-addr"),
        ("ORDERFLOW_ADMIN_TOKEN", "short", "at least 16 characters"),
        ("ORDERFLOW_ACK_WAIT", "soon", "--ack-wait"),
        ("ORDERFLOW_DATABASE_URL", "mysql://x/y", "mysql://x/y"),
    ] {
        let mut p =
            ChildProcess::spawn_binary("order-service", Vec::<String>::new(), [(name, value)]);
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(!status.success(), "{name}={value} must fail");
        let log = p.log();
        assert!(
            log.contains(expected),
            "{name}={value}: the error must name {expected}:\n{log}"
        );
    }
}
