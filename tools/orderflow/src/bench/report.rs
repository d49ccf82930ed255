//! Results, and how they are shown: a table on the terminal, JSON, and the Markdown page.

use std::fmt::Write as _;

use serde::Serialize;

use super::driver::RunResult;
use super::procstat::Usage;

/// The system against the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// System throughput ÷ baseline throughput.
    pub throughput: f64,
    /// System p99 ÷ baseline p99.
    pub p99: f64,
}

impl Ratio {
    /// The ratios of `system` to `baseline`.
    pub fn of(system: &RunResult, baseline: &RunResult) -> Self {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Self {
            throughput: div(system.throughput, baseline.throughput),
            p99: div(system.latency_ms.p99, baseline.latency_ms.p99),
        }
    }
}

/// The invariant check that ends every run.
#[derive(Debug, Clone, Serialize)]
pub struct Invariants {
    /// Orders accepted by the API.
    pub accepted: u64,
    /// Accepted orders not terminal by the end of the drain.
    pub not_terminal: u64,
    /// Orders whose terminal event was seen more than once.
    pub terminal_twice: u64,
    /// Sum over products of |available + reserved + committed − initial − restocked|.
    pub stock_drift: i64,
    /// Successful charges at the provider.
    pub charges_succeeded: u64,
    /// Confirmed orders.
    pub confirmed: u64,
}

impl Invariants {
    /// Whether every invariant held.
    pub fn hold(&self) -> bool {
        self.not_terminal == 0
            && self.terminal_twice == 0
            && self.stock_drift == 0
            && self.charges_succeeded == self.confirmed
    }
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    /// How load was offered.
    pub load: String,
    /// Sending time, seconds.
    pub duration_s: f64,
    /// Excluded start, seconds.
    pub warmup_s: f64,
    /// Whether nats-server fsynced every JetStream write (`sync_interval: always`).
    pub nats_sync_always: bool,
    /// The services' database durability (`full` or `normal`).
    pub durability: String,
    /// The system.
    pub system: RunResult,
    /// The raw JetStream chain on the same server, same run.
    pub baseline: Option<RunResult>,
    /// The database chain on the same server and disk, same run.
    pub db_baseline: Option<RunResult>,
    /// System ÷ raw chain.
    pub ratio: Option<Ratio>,
    /// System ÷ database chain.
    pub db_ratio: Option<Ratio>,
    /// CPU and memory per process.
    pub processes: Vec<Usage>,
    /// The end-of-run check.
    pub invariants: Invariants,
}

fn row(out: &mut String, name: &str, r: &RunResult) {
    let _ = writeln!(
        out,
        "  {name:<10} {:>9.0}/s  p50 {:>7.2}  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>8.2} ms   sent {}  errors {}  drain {:.1}s  backlog→0 {:.1}s  nats {} µs/msg",
        r.throughput,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.latency_ms.p999,
        r.latency_ms.max,
        r.sent,
        r.send_errors,
        r.drain_s,
        r.backlog_zero_s,
        fmt_nats(r)
    );
}

/// nats-server's CPU per stored message, or a dash when it was not measured.
fn fmt_nats(r: &RunResult) -> String {
    r.nats_cpu_us_per_message
        .map_or_else(|| "–".to_owned(), |us| format!("{us:.0}"))
}

/// The terminal table of one scenario.
pub fn table(s: &Scenario) -> String {
    let mut out = format!(
        "{} — {} on {}, {:.0} s (first {:.0} s excluded)\n",
        s.name, s.load, s.store, s.duration_s, s.warmup_s
    );
    row(&mut out, "system", &s.system);
    if let Some(b) = &s.baseline {
        row(&mut out, "raw chain", b);
    }
    if let Some(b) = &s.db_baseline {
        row(&mut out, "db chain", b);
    }
    for (what, r) in [("raw chain", &s.ratio), ("db chain", &s.db_ratio)] {
        if let Some(r) = r {
            let _ = writeln!(
                out,
                "  system/{what}: throughput {:.2}×, p99 {:.1}×",
                r.throughput, r.p99
            );
        }
    }
    for h in &s.system.hops {
        let _ = writeln!(
            out,
            "    {:<62} p50 {:>7.2}  p99 {:>7.2} ms",
            h.name, h.p50, h.p99
        );
    }
    let cancelled: u64 = s.system.cancelled.values().sum();
    let _ = writeln!(
        out,
        "  confirmed {}  cancelled {} {:?}",
        s.system.confirmed, cancelled, s.system.cancelled
    );
    for p in &s.processes {
        let _ = writeln!(
            out,
            "  {:<22} cpu {:>6.1} s ({:.3} ms/order)  rss idle {:>5.1} MiB, peak {:>5.1} MiB, end {:>5.1} MiB",
            p.name, p.cpu_s, p.cpu_ms_per_order, p.idle_rss_mib, p.peak_rss_mib, p.end_rss_mib
        );
    }
    let i = &s.invariants;
    let _ = writeln!(
        out,
        "  invariants: {} — accepted {}, not terminal {}, terminal twice {}, stock drift {}, charges {} for {} confirmed",
        if i.hold() { "HOLD" } else { "VIOLATED" },
        i.accepted,
        i.not_terminal,
        i.terminal_twice,
        i.stock_drift,
        i.charges_succeeded,
        i.confirmed
    );
    out
}

/// A description of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cores} cores ({model}), {mem_gib:.0} GiB RAM, Linux; every process (nats-server, services, simulator, load generator) on this one machine"
    )
}

fn fmt_opt(v: f64) -> String {
    if v.is_nan() {
        "–".to_owned()
    } else {
        format!("{v:.2}")
    }
}

/// The whole `docs/benchmarks.md` page.
pub fn markdown(results: &[Scenario], command: &str, machine: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `orderflow bench --write-doc`; do not edit by hand — rerun it. Every figure below comes\n\
         from one run of that command on the machine described here. Machines are shared and noisy: read\n\
         the **ratios to the baselines measured in the same run** before the absolute numbers.\n"
    );
    let _ = writeln!(out, "- **Command:** `{command}`");
    let _ = writeln!(out, "- **Machine:** {machine}");
    let _ = writeln!(out, "- **Build:** release (`cargo build --release --bins`)");
    let _ = writeln!(
        out,
        "- **What is measured:** an order's latency runs from its intended send time (open loop: queueing\n  \
         is not hidden) to its terminal event (`orders.confirmed`/`orders.cancelled`) seen on NATS.\n  \
         Two baselines run just before the system, driven the same way on the same nats-server: the\n  \
         **raw chain** (4 publishes and 3 pull-consume-republish hops of a 300-byte payload, no\n  \
         database) and the **db chain** (the same hops, each committing an inbox row and an outbox\n  \
         row per message on its own database, with the services' durability, before it publishes:\n  \
         the attainable bound with a database in the loop).\n  \
         The **hop breakdown** splits a confirmed order's latency at each event's creation time\n  \
         (CloudEvents `time`, set inside the producing transaction) and JetStream's storage time.\n"
    );
    let _ = writeln!(
        out,
        "The targets, what this run reaches of them, and the profile of where the time goes:\n\
         [performance.md](performance.md) (written by hand from this page's figures).\n"
    );
    let _ = writeln!(out, "## Summary\n");
    let _ = writeln!(
        out,
        "| scenario | load | orders/s | p50 ms | p99 ms | raw chain /s (p99 ms) | db chain /s (p99 ms) | × raw | × db | CPU ms/order (services, nats) | invariants |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for s in results {
        let chain = |b: &Option<RunResult>| {
            b.as_ref().map_or_else(
                || "–".to_owned(),
                |b| format!("{:.0} ({})", b.throughput, fmt_opt(b.latency_ms.p99)),
            )
        };
        let ratio = |r: &Option<Ratio>| r.as_ref().map_or(f64::NAN, |r| r.throughput);
        let services: f64 = s
            .processes
            .iter()
            .filter(|p| p.name.ends_with("-service"))
            .map(|p| p.cpu_ms_per_order)
            .sum();
        let nats = s
            .processes
            .iter()
            .find(|p| p.name == "nats-server")
            .map_or(f64::NAN, |p| p.cpu_ms_per_order);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {:.3}, {:.3} | {} |",
            s.name,
            s.load,
            s.system.throughput,
            s.system.latency_ms.p50,
            s.system.latency_ms.p99,
            chain(&s.baseline),
            chain(&s.db_baseline),
            fmt_opt(ratio(&s.ratio)),
            fmt_opt(ratio(&s.db_ratio)),
            services,
            nats,
            if s.invariants.hold() {
                "hold"
            } else {
                "**violated**"
            }
        );
    }
    for s in results {
        section(&mut out, s);
    }
    out
}

/// One scenario's section of the page.
fn section(out: &mut String, s: &Scenario) {
    let _ = writeln!(out, "\n## {}\n", s.name);
    let _ = writeln!(
        out,
        "{} on {} (`--db-durability {}`), {:.0} s of load, the first {:.0} s excluded from the figures; nats-server {}.\n",
        s.load,
        s.store,
        s.durability,
        s.duration_s,
        s.warmup_s,
        if s.nats_sync_always {
            "fsyncing every write (`sync_interval: always`, as `deploy/nats`)"
        } else {
            "with its default fsync (every 2 minutes)"
        }
    );
    let _ = writeln!(
        out,
        "| run | orders/s | p50 | p90 | p99 | p99.9 | max (ms) | sent | send errors | drain s | backlog → 0 s | nats-server µs / message |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (label, r) in std::iter::once(("system", &s.system))
        .chain(s.baseline.iter().map(|b| ("raw chain", b)))
        .chain(s.db_baseline.iter().map(|b| ("db chain", b)))
    {
        let _ = writeln!(
            out,
            "| {label} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {} | {} |",
            r.throughput,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.p999,
            r.latency_ms.max,
            r.sent,
            r.send_errors,
            r.drain_s,
            fmt_opt(r.backlog_zero_s),
            fmt_nats(r)
        );
    }
    let _ = writeln!(
        out,
        "\nnats-server's CPU per message divides its CPU time during the run by the messages \
         stored: 5 events per confirmed order, 4 per chain item (each also delivered and acked)."
    );
    let cancelled: u64 = s.system.cancelled.values().sum();
    let i = &s.invariants;
    let _ = writeln!(
        out,
        "\nConfirmed {}, cancelled {cancelled}. Invariants {}: accepted {}, not terminal {}, terminal twice {}, stock drift {}, {} charges for {} confirmed orders.\n",
        s.system.confirmed,
        if i.hold() { "hold" } else { "**violated**" },
        i.accepted,
        i.not_terminal,
        i.terminal_twice,
        i.stock_drift,
        i.charges_succeeded,
        i.confirmed
    );
    if !s.system.hops.is_empty() {
        let _ = writeln!(
            out,
            "| where a confirmed order's time goes | p50 ms | p99 ms |"
        );
        let _ = writeln!(out, "|---|---:|---:|");
        for h in &s.system.hops {
            let _ = writeln!(out, "| {} | {:.2} | {:.2} |", h.name, h.p50, h.p99);
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "| process | CPU s | CPU ms / order | idle RSS MiB | peak RSS MiB | end RSS MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for p in &s.processes {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.3} | {:.1} | {:.1} | {:.1} |",
            p.name, p.cpu_s, p.cpu_ms_per_order, p.idle_rss_mib, p.peak_rss_mib, p.end_rss_mib
        );
    }
    memory_over_time(out, s);
    let _ = writeln!(
        out,
        "\n![latency percentiles](benchmarks/{}-latency.svg)\n![throughput over time](benchmarks/{}-throughput.svg)",
        s.name, s.name
    );
}

/// For runs of two minutes or more: each process's RSS one minute in and then minute by
/// minute, so growth shows apart from the first minute's warm-up.
fn memory_over_time(out: &mut String, s: &Scenario) {
    const MINUTE: usize = 60;
    let minutes = s
        .processes
        .iter()
        .map(|p| p.rss_mib.len() / MINUTE)
        .min()
        .unwrap_or(0);
    if minutes < 2 {
        return;
    }
    let mut header = String::from("\n| RSS MiB at |");
    for m in 1..=minutes {
        let _ = write!(header, " {m} min |");
    }
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "|---|{}", "---:|".repeat(minutes));
    for p in &s.processes {
        let mut line = format!("| {} |", p.name);
        for m in 1..=minutes {
            let _ = write!(line, " {:.1} |", p.rss_mib[m * MINUTE - 1]);
        }
        let _ = writeln!(out, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(name: &str, rss_mib: Vec<f64>) -> Usage {
        Usage {
            name: name.to_owned(),
            cpu_s: 1.0,
            cpu_ms_per_order: 0.5,
            idle_rss_mib: 10.0,
            peak_rss_mib: 20.0,
            end_rss_mib: 20.0,
            rss_mib,
        }
    }

    fn scenario(processes: Vec<Usage>) -> Scenario {
        Scenario {
            name: "s".to_owned(),
            store: "sqlite".to_owned(),
            load: "open loop".to_owned(),
            duration_s: 180.0,
            warmup_s: 3.0,
            nats_sync_always: false,
            durability: "normal".to_owned(),
            system: RunResult {
                nats_cpu_us_per_message: Some(41.6),
                ..RunResult::default()
            },
            baseline: Some(RunResult::default()),
            db_baseline: None,
            ratio: None,
            db_ratio: None,
            processes,
            invariants: Invariants {
                accepted: 1,
                not_terminal: 0,
                terminal_twice: 0,
                stock_drift: 0,
                charges_succeeded: 1,
                confirmed: 1,
            },
        }
    }

    #[test]
    fn long_runs_show_memory_minute_by_minute() {
        let minutes = |mib: &[f64]| mib.iter().flat_map(|m| vec![*m; 60]).collect();
        let s = scenario(vec![
            usage("order-service", minutes(&[20.0, 21.0, 24.5])),
            usage("nats-server", minutes(&[40.0, 40.0, 40.0])),
        ]);
        let mut page = String::new();
        section(&mut page, &s);
        assert!(
            page.contains("| RSS MiB at | 1 min | 2 min | 3 min |"),
            "{page}"
        );
        assert!(
            page.contains("| order-service | 20.0 | 21.0 | 24.5 |"),
            "{page}"
        );

        let mut short = String::new();
        section(
            &mut short,
            &scenario(vec![usage("order-service", vec![20.0; 90])]),
        );
        assert!(!short.contains("RSS MiB at"), "{short}");
    }

    #[test]
    fn nats_cpu_per_message_shows_where_measured() {
        let mut page = String::new();
        section(&mut page, &scenario(Vec::new()));
        assert!(page.contains("| 42 |\n"), "the system's figure: {page}");
        assert!(page.contains("| – |\n"), "an unmeasured baseline: {page}");
    }
}
