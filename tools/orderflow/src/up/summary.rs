//! The text printed once everything is ready: what runs where, where the data and the server
//! logs are, and curl commands to try the system with.

use std::fmt::Write as _;
use std::time::Duration;

use super::display_path;
use super::plan::{ORDER, Plan};
use super::stack::Stack;

/// The summary for `plan` as `stack` runs it, ready after `elapsed`.
pub fn text(plan: &Plan, stack: &Stack, elapsed: Duration) -> String {
    let base = plan.base_dir.as_path();
    let mut rows: Vec<(String, String)> = stack
        .processes
        .iter()
        .map(|p| (p.name.clone(), format!("http://127.0.0.1:{}", p.port)))
        .collect();
    if let Some(nats) = &stack.nats {
        let nodes = nats.nodes();
        let single = nodes.len() == 1;
        for node in nodes {
            let label = if single {
                "NATS".to_owned()
            } else {
                format!("NATS {}", node.name())
            };
            rows.push((
                label,
                format!(
                    "{}  monitoring http://127.0.0.1:{}  store {}",
                    node.url(),
                    node.monitor_port(),
                    display_path(&node.store_dir(), base)
                ),
            ));
        }
    }
    if let Some(postgres) = &stack.postgres {
        rows.push((
            "PostgreSQL".to_owned(),
            format!(
                "127.0.0.1:{}  data {}",
                postgres.port(),
                display_path(&postgres.data_dir(), base)
            ),
        ));
    }
    let mut databases: Vec<&str> = plan
        .processes
        .iter()
        .filter_map(|p| p.database_url())
        .collect();
    databases.dedup();
    for url in databases {
        rows.push(("database".to_owned(), url.to_owned()));
    }
    rows.push((
        "data dir".to_owned(),
        format!(
            "{} (kept between runs; --clean starts afresh)",
            plan.data_dir.display()
        ),
    ));
    for (server, log) in stack.server_logs() {
        rows.push((format!("{server} log"), log.display().to_string()));
    }

    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    let mut text = format!(
        "\norderflow is up: {} processes ready after {:.1} s (storage: {}, NATS: {} node{})\n\n",
        stack.processes.len(),
        elapsed.as_secs_f64(),
        plan.store,
        plan.nats.nodes(),
        if plan.nats.nodes() == 1 { "" } else { "s" },
    );
    for (label, value) in rows {
        let _ = writeln!(text, "  {label:<width$}  {value}");
    }
    let order_port = plan
        .processes
        .iter()
        .find(|p| p.binary == ORDER)
        .map_or(8080, |p| p.port);
    let _ = write!(
        text,
        "\nPlace an order:\n  \
         curl -s -X POST localhost:{order_port}/v1/orders -H 'content-type: application/json' \
         -d '{{\"customer_id\":\"c-1\",\"items\":[{{\"product_id\":\"SKU-001\",\"quantity\":1}}],\
         \"payment_method\":\"card_ok\"}}'\n\
         Read it back (order_id from the answer):\n  \
         curl -s localhost:{order_port}/v1/orders/<order_id>\n\n\
         Ctrl-C stops everything.\n"
    );
    text
}
