//! The text printed once everything is ready: what runs where, where the data and the server
//! logs are, and curl commands to try the system with.

use std::fmt::Write as _;
use std::time::Duration;

use super::display_path;
use super::plan::{ORDER, Plan, SIMULATOR};
use super::stack::Stack;

/// The summary for `plan` as `stack` runs it, ready after `elapsed`.
pub fn text(plan: &Plan, stack: &Stack, elapsed: Duration) -> String {
    let base = plan.base_dir.as_path();
    let mut rows: Vec<(String, String)> = stack
        .processes
        .iter()
        .map(|p| {
            let plan = plan.processes.iter().find(|q| q.name == p.name);
            let where_ = match plan.and_then(|q| q.public_port) {
                Some(public) => format!(
                    "http://127.0.0.1:{public}  admin http://127.0.0.1:{}",
                    p.port
                ),
                None if plan.is_some_and(|q| q.binary != SIMULATOR) => {
                    format!("admin http://127.0.0.1:{}", p.port)
                }
                None => format!("http://127.0.0.1:{}", p.port),
            };
            (p.name.clone(), where_)
        })
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
    rows.push(("durability".to_owned(), durability(plan).to_owned()));
    rows.push((
        "operator token".to_owned(),
        format!(
            "{} (the admin listeners' routes need it)",
            display_path(&plan.admin_token_file, base)
        ),
    ));
    rows.push((
        "NATS users".to_owned(),
        format!(
            "{} (nkey seeds: one per service, operator.nk for orderflow dlq)",
            display_path(&plan.nats_auth_dir, base)
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
    text.push_str(&walkthrough(plan));
    text
}

/// The curl commands to try the system with.
/// What a commit survives, as `--durable` chose.
fn durability(plan: &Plan) -> &'static str {
    if plan.nats.sync_always {
        "every commit and JetStream write fsynced (--durable): survives a power loss"
    } else {
        "a crash of any process loses nothing; a power loss may lose the last moments \
         (--durable fsyncs everything)"
    }
}

fn walkthrough(plan: &Plan) -> String {
    let mut text = String::new();
    let order = plan.processes.iter().find(|p| p.binary == ORDER);
    let order_port = order.and_then(|p| p.public_port).unwrap_or(8080);
    let order_admin = order.map_or(9080, |p| p.port);
    let token = display_path(&plan.admin_token_file, &plan.base_dir);
    let nats_auth = display_path(&plan.nats_auth_dir, &plan.base_dir);
    let _ = write!(
        text,
        "\nPlace an order:\n  \
         curl -s -X POST localhost:{order_port}/v1/orders -H 'content-type: application/json' \
         -d '{{\"customer_id\":\"c-1\",\"items\":[{{\"product_id\":\"SKU-001\",\"quantity\":1}}],\
         \"payment_method\":\"card_ok\"}}'\n\
         Read it back (order_id from the answer):\n  \
         curl -s localhost:{order_port}/v1/orders/<order_id>\n\
         List every order (an operator route, on the admin listener, with the token):\n  \
         curl -s localhost:{order_admin}/v1/orders -H \"Authorization: Bearer $(cat {token})\"\n\
         Dead letters (NATS refuses anonymous clients: `orderflow dlq` authenticates as the\n\
         operator; in this checkout's default data dir it finds the seed by itself):\n  \
         target/release/orderflow dlq list --nats-nkey-seed-file {nats_auth}/operator.nk\n\n\
         Ctrl-C stops everything.\n"
    );
    text
}
