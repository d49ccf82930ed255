//! The command line: `orderflow <subcommand> [flags]`, declared with clap's derive API.
//!
//! Each subcommand has an args struct here and a module of its own that runs it (`up` →
//! [`crate::up`]). The doc comments below *are* the `--help` text.

use std::fmt;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The orderflow developer and operator CLI.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine (NATS, the services, the payment-provider
    /// simulator) with their logs on this terminal, until Ctrl-C.
    ///
    /// Steps:
    ///
    /// 1. nats-server: $ORDERFLOW_NATS_SERVER if set, else scripts/install-nats.sh (installs the
    ///    pinned version into .tools/nats when it is missing).
    ///
    /// 2. NATS with JetStream on 127.0.0.1:4222 (monitoring on :8222, store in <DATA_DIR>/nats).
    ///    With --cluster: three nodes on 4222-4224 (routes 6222-6224, monitoring 8222-8224,
    ///    stores in <DATA_DIR>/nats-0..2), and the services create their streams with 3
    ///    replicas. The ports move with --nats-port: clients P+i, routes P+2000+i, monitoring
    ///    P+4000+i.
    ///
    /// 3. Storage. sqlite (default): one file per service, <DATA_DIR>/orders.db, inventory.db
    ///    and payments.db. postgres: a local PostgreSQL on 127.0.0.1:5433 (--pg-port; data in
    ///    <DATA_DIR>/postgres, binaries from $ORDERFLOW_PG_BINDIR or
    ///    scripts/install-postgres.sh) with the databases orders, inventory and payments.
    ///
    /// 4. The processes, from the directory holding this executable: payment-provider-sim
    ///    (:8090), inventory-service (:8081), payment-service (:8082) and order-service
    ///    (:8080), configured through their ORDERFLOW_* environment variables. With
    ///    --replicas N, N processes of each service; the extra ones listen on +10, +20, ...
    ///    (skipping ports taken by something else in this list).
    ///
    /// 5. Waits until every process answers GET /readyz with 200, then prints where everything
    ///    runs and a curl command that places an order. Each process's output is shown as
    ///    "order-service | ..." (coloured on a terminal, unless NO_COLOR is set).
    ///
    /// 6. Ctrl-C or SIGTERM stops everything in order: the services (SIGTERM, SIGKILL after
    ///    20 s; a second Ctrl-C kills them at once), the simulator, NATS, PostgreSQL. A
    ///    process that exits on its own, or one not ready in time, stops everything: its log
    ///    tail is printed and the exit status is non-zero.
    ///
    /// Relative paths are relative to the repository root (the nearest directory above the
    /// current one holding scripts/install-nats.sh), where the processes also run. Data is
    /// kept between runs; --clean deletes it first.
    ///
    /// The binaries must be built first: cargo build --release --bins (`make up` does both).
    #[command(
        verbatim_doc_comment,
        about = "Run the whole system locally (NATS, the services, the payment-provider \
                 simulator) with prefixed logs, until Ctrl-C"
    )]
    Up(UpArgs),

    /// Measure the system: a load generator driving the real services over HTTP, beside a
    /// raw-JetStream baseline measured in the same run.
    #[command(verbatim_doc_comment)]
    Bench(crate::bench::BenchArgs),

    /// Dead letters: list, show, replay or purge the messages no handler could process.
    ///
    /// A message ends in the DEAD_LETTERS stream (subject deadletter.<consumer>) when it is
    /// poison (undecodable or schema-invalid), its handler failed permanently, it failed
    /// transiently on its last allowed delivery, or JetStream gave up on it (max deliveries)
    /// because no handler ever finished. It keeps its payload and headers, plus
    /// Orderflow-DL-* headers saying where it came from and why.
    ///
    /// This talks to NATS directly, so it works while the services are down; every service
    /// serves the same operations on its admin port under /admin/dead-letters. Exit status:
    /// 0 done, 1 failed or refused (NATS unreachable, nothing given to act on, a failed
    /// replay), 2 bad command line.
    Dlq(crate::dlq::DlqArgs),
}

/// The flags of `orderflow up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Where the services keep their data.
    #[arg(long, value_enum, env = "ORDERFLOW_STORE", default_value_t = Store::Sqlite)]
    pub store: Store,

    /// Run a 3-node NATS cluster instead of one server; streams get 3 replicas.
    #[arg(long)]
    pub cluster: bool,

    /// Processes per service (inventory, payment, order). More than 1 needs --store postgres:
    /// the replicas of a service share its database.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=9))]
    pub replicas: u16,

    /// Directory for all data (NATS store, databases); kept between runs.
    #[arg(long, value_name = "DIR", default_value = ".data")]
    pub data_dir: PathBuf,

    /// NATS client port (of the first node with --cluster); monitoring is on PORT+4000 and
    /// cluster routes on PORT+2000.
    #[arg(long, value_name = "PORT", default_value_t = 4222)]
    pub nats_port: u16,

    /// PostgreSQL port with --store postgres (5433 keeps clear of a system server on 5432).
    #[arg(long, value_name = "PORT", default_value_t = 5433)]
    pub pg_port: u16,

    /// How long every process may take to answer GET /readyz with 200.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub ready_timeout: u64,

    /// Delete the data dir first: start from a fresh system (no orders, no streams).
    #[arg(long)]
    pub clean: bool,

    /// Survive a power loss, as the production configuration does: NATS fsyncs every
    /// JetStream write before acknowledging it (`sync_interval: always`) and the services
    /// commit with `--db-durability full`. Without it, a crash of any process loses nothing,
    /// but the machine's last moments (NATS's last two minutes) may be lost: nats-server's
    /// default, with SQLite at `normal` to match it.
    #[arg(long)]
    pub durable: bool,
}

/// The storage backend of the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Store {
    /// One SQLite file per service in the data dir.
    Sqlite,
    /// A local PostgreSQL server, one database per service.
    Postgres,
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_defaults() {
        let cli = Cli::try_parse_from(["orderflow", "up"]).unwrap();
        let Command::Up(args) = cli.command else {
            panic!("not up")
        };
        assert_eq!(args.replicas, 1);
        assert_eq!(args.data_dir, PathBuf::from(".data"));
        assert_eq!(
            (args.nats_port, args.pg_port, args.ready_timeout),
            (4222, 5433, 60)
        );
        assert!(!args.cluster && !args.clean);
    }

    #[test]
    fn replicas_are_bounded() {
        assert!(Cli::try_parse_from(["orderflow", "up", "--replicas", "0"]).is_err());
        assert!(Cli::try_parse_from(["orderflow", "up", "--replicas", "10"]).is_err());
        assert!(Cli::try_parse_from(["orderflow", "up", "--store", "mysql"]).is_err());
    }
}
