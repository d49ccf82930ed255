//! What `orderflow up` will run, worked out from the flags before anything starts: the NATS
//! ports, the PostgreSQL port and data dir, every process with its port and environment.
//!
//! This is pure (no IO), so the rules — which flag combinations are refused, which port
//! everything gets, which URL a service is given — are unit-tested here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use orderflow_store::Durability;

use crate::cli::{Store, UpArgs};

/// The payment-provider simulator's binary.
pub const SIMULATOR: &str = "payment-provider-sim";
/// The inventory service's binary.
pub const INVENTORY: &str = "inventory-service";
/// The payment service's binary.
pub const PAYMENT: &str = "payment-service";
/// The order service's binary.
pub const ORDER: &str = "order-service";
/// Every binary `up` runs.
pub const BINARIES: [&str; 4] = [SIMULATOR, INVENTORY, PAYMENT, ORDER];

/// The simulator's HTTP port.
const SIMULATOR_PORT: u16 = 8090;
/// The services in start order (consumers before the service taking orders), each with its
/// admin port, its public port (the order service's API) and its database name.
const SERVICES: [(&str, u16, Option<u16>, &str); 3] = [
    (INVENTORY, 9081, None, "inventory"),
    (PAYMENT, 9082, None, "payments"),
    (ORDER, 9080, Some(8080), "orders"),
];
/// The operator token's file in the data dir (made by `up` when missing).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The directory of the NATS nkey seeds in the data dir, one `<user>.nk` per service and
/// one for the operator (made by `up` when missing).
pub const NATS_AUTH_DIR: &str = "nats-auth";
/// Extra replicas of a service listen this many ports above the previous one.
const REPLICA_PORT_STEP: u16 = 10;
/// Nodes of a `--cluster`.
pub const CLUSTER_SIZE: u16 = 3;
/// Cluster route ports are this far above the client ports (4222 → 6222).
const ROUTE_PORT_OFFSET: u16 = 2000;
/// Monitoring ports are this far above the client ports (4222 → 8222).
const MONITOR_PORT_OFFSET: u16 = 4000;
/// The PostgreSQL user of the local server (trust authentication).
const PG_USER: &str = "postgres";

// The services' settings (flags with environment variables of the same name).
/// NATS URL(s), comma separated.
const ENV_NATS_URL: &str = "ORDERFLOW_NATS_URL";
/// Public HTTP listen address (the order service's API, the simulator's).
const ENV_HTTP_ADDR: &str = "ORDERFLOW_HTTP_ADDR";
/// Admin listen address.
const ENV_ADMIN_ADDR: &str = "ORDERFLOW_ADMIN_ADDR";
/// The operator token's file.
const ENV_ADMIN_TOKEN_FILE: &str = "ORDERFLOW_ADMIN_TOKEN_FILE";
/// The service's NATS nkey seed file.
const ENV_NATS_NKEY_SEED_FILE: &str = "ORDERFLOW_NATS_NKEY_SEED_FILE";
/// Database URL.
const ENV_DATABASE_URL: &str = "ORDERFLOW_DATABASE_URL";
/// Log format (`pretty` here: a person reads it).
const ENV_LOG_FORMAT: &str = "ORDERFLOW_LOG_FORMAT";
/// Replicas of every JetStream stream.
const ENV_STREAM_REPLICAS: &str = "ORDERFLOW_STREAM_REPLICAS";
/// The payment provider's base URL (payment-service only).
const ENV_PROVIDER_URL: &str = "ORDERFLOW_PROVIDER_URL";
/// Whether a SQLite commit waits for the disk (`--db-durability`).
const ENV_DB_DURABILITY: &str = "ORDERFLOW_DB_DURABILITY";
/// The log format the processes are started with.
const LOG_FORMAT: &str = "pretty";

/// Everything `orderflow up` will run, and where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The directory relative paths are resolved against and the processes run in.
    pub base_dir: PathBuf,
    /// The data dir, absolute.
    pub data_dir: PathBuf,
    /// The operator token's file (in the data dir), absolute.
    pub admin_token_file: PathBuf,
    /// The NATS nkey seeds' directory (in the data dir), absolute.
    pub nats_auth_dir: PathBuf,
    /// Delete the data dir before starting.
    pub clean: bool,
    /// The storage backend.
    pub store: Store,
    /// The NATS server(s).
    pub nats: NatsPlan,
    /// The PostgreSQL server, with `--store postgres`.
    pub postgres: Option<PostgresPlan>,
    /// Every process, in start order (the simulator first).
    pub processes: Vec<ProcessPlan>,
    /// How long the processes may take to become ready.
    pub ready_timeout: Duration,
}

/// The NATS server, or the nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsPlan {
    /// Three nodes instead of one.
    pub cluster: bool,
    /// The client port of the (first) node.
    pub client_port: u16,
    /// The cluster route port of the first node (only used with `cluster`).
    pub route_port: u16,
    /// The monitoring port of the (first) node.
    pub monitor_port: u16,
    /// Every node fsyncs every JetStream write before acknowledging it (`--durable`).
    pub sync_always: bool,
}

impl NatsPlan {
    /// How many servers run.
    pub fn nodes(&self) -> u16 {
        if self.cluster { CLUSTER_SIZE } else { 1 }
    }

    /// The client URL of every node, comma separated (how the services take it).
    pub fn url(&self) -> String {
        (0..self.nodes())
            .map(|i| format!("nats://127.0.0.1:{}", self.client_port + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The stream replicas the services create: one per node.
    pub fn stream_replicas(&self) -> u16 {
        self.nodes()
    }

    /// Every port, named, for the conflict checks.
    fn ports(&self) -> Vec<(u16, String)> {
        let mut ports = Vec::new();
        for i in 0..self.nodes() {
            ports.push((self.client_port + i, format!("NATS node {i} (clients)")));
            ports.push((self.monitor_port + i, format!("NATS node {i} (monitoring)")));
            if self.cluster {
                ports.push((self.route_port + i, format!("NATS node {i} (routes)")));
            }
        }
        ports
    }
}

/// The local PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresPlan {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its data dir (absolute).
    pub data_dir: PathBuf,
    /// The databases to create when missing, one per service.
    pub databases: Vec<&'static str>,
}

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    /// Its name in the logs (`order-service`, or `order-service-2` with replicas).
    pub name: String,
    /// The binary's file name.
    pub binary: &'static str,
    /// Its HTTP port on 127.0.0.1 where `/readyz` is: a service's admin listener, the
    /// simulator's API.
    pub port: u16,
    /// The port of its public API, for a service that has one (the order service).
    pub public_port: Option<u16>,
    /// The environment it is given.
    pub env: Vec<(&'static str, String)>,
}

impl ProcessPlan {
    /// The value of `key` in its environment.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The database URL it is given (none for the simulator).
    pub fn database_url(&self) -> Option<&str> {
        self.env(ENV_DATABASE_URL)
    }
}

impl Plan {
    /// Works out the plan for `args`, resolving relative paths against `base_dir`; refuses
    /// combinations that cannot work, with a message saying what to change.
    pub fn new(args: &UpArgs, base_dir: &Path) -> anyhow::Result<Self> {
        if args.replicas > 1 && args.store == Store::Sqlite {
            bail!(
                "--replicas {} needs --store postgres: the replicas of a service share its \
                 database, and a SQLite file is for one process only",
                args.replicas
            );
        }
        let data_dir = normalize(&base_dir.join(&args.data_dir));
        if args.clean {
            check_deletable(&data_dir, base_dir)?;
        }
        let nats = nats_plan(args)?;
        let postgres = (args.store == Store::Postgres).then(|| PostgresPlan {
            port: args.pg_port,
            data_dir: data_dir.join("postgres"),
            databases: SERVICES.iter().map(|&(_, _, _, db)| db).collect(),
        });

        // Ports: NATS, PostgreSQL and the simulator first; the services' replicas then skip
        // any port already taken.
        let mut ports = nats.ports();
        if let Some(pg) = &postgres {
            ports.push((pg.port, "PostgreSQL".to_owned()));
        }
        ports.push((SIMULATOR_PORT, SIMULATOR.to_owned()));
        let mut taken: BTreeSet<u16> = ports.iter().map(|&(port, _)| port).collect();

        let provider_url = format!("http://127.0.0.1:{SIMULATOR_PORT}");
        let mut processes = vec![ProcessPlan {
            name: SIMULATOR.to_owned(),
            binary: SIMULATOR,
            port: SIMULATOR_PORT,
            public_port: None,
            env: vec![
                (ENV_HTTP_ADDR, http_addr(SIMULATOR_PORT)),
                (ENV_LOG_FORMAT, LOG_FORMAT.to_owned()),
            ],
        }];
        let admin_token_file = data_dir.join(ADMIN_TOKEN_FILE);
        let nats_auth_dir = data_dir.join(NATS_AUTH_DIR);
        for (binary, admin_base, public_base, database) in SERVICES {
            let database_url = match &postgres {
                Some(pg) => format!("postgres://{PG_USER}@127.0.0.1:{}/{database}", pg.port),
                None => sqlite_url(&args.data_dir, database),
            };
            for replica in 1..=args.replicas {
                let no_port = || format!("no free port for {binary} replica {replica}");
                let port = next_free_port(admin_base, &mut taken).with_context(no_port)?;
                let public_port = match public_base {
                    Some(base) => Some(next_free_port(base, &mut taken).with_context(no_port)?),
                    None => None,
                };
                let name = if args.replicas == 1 {
                    binary.to_owned()
                } else {
                    format!("{binary}-{replica}")
                };
                ports.push((port, format!("{name} (admin)")));
                let mut env = vec![(ENV_NATS_URL, nats.url())];
                if let Some(public_port) = public_port {
                    ports.push((public_port, name.clone()));
                    env.push((ENV_HTTP_ADDR, http_addr(public_port)));
                }
                env.extend([
                    (ENV_ADMIN_ADDR, http_addr(port)),
                    (ENV_ADMIN_TOKEN_FILE, admin_token_file.display().to_string()),
                    (
                        ENV_NATS_NKEY_SEED_FILE,
                        seed_file(&nats_auth_dir, binary).display().to_string(),
                    ),
                    (ENV_DATABASE_URL, database_url.clone()),
                    (ENV_LOG_FORMAT, LOG_FORMAT.to_owned()),
                    (ENV_STREAM_REPLICAS, nats.stream_replicas().to_string()),
                    (ENV_DB_DURABILITY, db_durability(args).as_str().to_owned()),
                ]);
                if binary == PAYMENT {
                    env.push((ENV_PROVIDER_URL, provider_url.clone()));
                }
                processes.push(ProcessPlan {
                    name,
                    binary,
                    port,
                    public_port,
                    env,
                });
            }
        }
        check_distinct(&ports)?;

        Ok(Self {
            base_dir: base_dir.to_path_buf(),
            data_dir,
            admin_token_file,
            nats_auth_dir,
            clean: args.clean,
            store: args.store,
            nats,
            postgres,
            processes,
            ready_timeout: Duration::from_secs(args.ready_timeout),
        })
    }

    /// Every port this plan listens on, named, for the check that they are free.
    pub fn ports(&self) -> Vec<(u16, String)> {
        let mut ports = self.nats.ports();
        if let Some(pg) = &self.postgres {
            ports.push((pg.port, "PostgreSQL".to_owned()));
        }
        for p in &self.processes {
            ports.push((p.port, p.name.clone()));
            ports.extend(p.public_port.map(|port| (port, p.name.clone())));
        }
        ports
    }
}

/// The NATS ports for `--nats-port` (and `--cluster`), refusing ports past 65535.
fn nats_plan(args: &UpArgs) -> anyhow::Result<NatsPlan> {
    let nodes = if args.cluster { CLUSTER_SIZE } else { 1 };
    let highest = u32::from(args.nats_port) + u32::from(MONITOR_PORT_OFFSET) + u32::from(nodes) - 1;
    if highest > u32::from(u16::MAX) {
        bail!(
            "--nats-port {} is too high: the monitoring port{} would be above 65535",
            args.nats_port,
            if args.cluster { "s" } else { "" }
        );
    }
    Ok(NatsPlan {
        cluster: args.cluster,
        client_port: args.nats_port,
        route_port: args.nats_port + ROUTE_PORT_OFFSET,
        monitor_port: args.nats_port + MONITOR_PORT_OFFSET,
        sync_always: args.durable,
    })
}

/// The services' commits: as durable as NATS is (see `UpArgs::durable`).
fn db_durability(args: &UpArgs) -> Durability {
    if args.durable {
        Durability::Full
    } else {
        Durability::Normal
    }
}

/// `base`, `base + 10`, `base + 20`, ...: the first one not in `taken`, which it joins.
fn next_free_port(base: u16, taken: &mut BTreeSet<u16>) -> Option<u16> {
    let port = (0..)
        .map_while(|k: u16| k.checked_mul(REPLICA_PORT_STEP)?.checked_add(base))
        .find(|port| !taken.contains(port))?;
    taken.insert(port);
    Some(port)
}

/// Refuses two uses of one port (e.g. `--pg-port 8080`).
fn check_distinct(ports: &[(u16, String)]) -> anyhow::Result<()> {
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (port, what) in ports {
        if let Some(first) = seen.insert(*port, what) {
            bail!(
                "port {port} would be used twice, by {first} and by {what}: choose another \
                 --nats-port or --pg-port"
            );
        }
    }
    Ok(())
}

/// The nkey seed file of `user` (a service's binary name, or the operator) in `dir`.
pub fn seed_file(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("{user}.nk"))
}

/// `127.0.0.1:<port>`.
fn http_addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// `sqlite://<data dir>/<database>.db?mode=rwc`, the data dir as given: the processes run in
/// the base dir, so a relative path means the same to them as to `up`.
fn sqlite_url(data_dir: &Path, database: &str) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        data_dir.join(format!("{database}.db")).display()
    )
}

/// `path` with `.` and `..` resolved lexically (no file system access; `path` is absolute).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `--clean` deletes the data dir: refuse when that would delete the repository (or more).
fn check_deletable(data_dir: &Path, base_dir: &Path) -> anyhow::Result<()> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if base_dir.starts_with(data_dir) || home.is_some_and(|home| normalize(&home) == data_dir) {
        bail!(
            "--clean would delete {}, which holds {} : pick a --data-dir of its own",
            data_dir.display(),
            base_dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    const ROOT: &str = "/repo";

    fn plan(flags: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(["orderflow", "up"].iter().chain(flags)).unwrap();
        let Command::Up(mut args) = cli.command else {
            panic!("not up")
        };
        // Independent of an ORDERFLOW_STORE in the environment running the tests.
        if !flags.contains(&"--store") {
            args.store = Store::Sqlite;
        }
        Plan::new(&args, Path::new(ROOT))
    }

    fn process<'a>(plan: &'a Plan, name: &str) -> &'a ProcessPlan {
        plan.processes.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn replicas_with_sqlite_are_refused() {
        let error = plan(&["--replicas", "2"]).unwrap_err().to_string();
        assert!(
            error.contains("--replicas 2 needs --store postgres"),
            "{error}"
        );
        assert!(plan(&["--replicas", "2", "--store", "postgres"]).is_ok());
        assert!(plan(&["--replicas", "1"]).is_ok());
    }

    #[test]
    fn default_plan_runs_one_of_each_on_sqlite() {
        let plan = plan(&[]).unwrap();
        let names: Vec<&str> = plan.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, [SIMULATOR, INVENTORY, PAYMENT, ORDER]);
        assert_eq!(plan.data_dir, Path::new("/repo/.data"));
        assert!(plan.postgres.is_none());
        assert_eq!(plan.ready_timeout, Duration::from_mins(1));

        let order = process(&plan, ORDER);
        assert_eq!((order.port, order.public_port), (9080, Some(8080)));
        assert_eq!(order.env(ENV_NATS_URL), Some("nats://127.0.0.1:4222"));
        assert_eq!(order.env(ENV_HTTP_ADDR), Some("127.0.0.1:8080"));
        assert_eq!(order.env(ENV_ADMIN_ADDR), Some("127.0.0.1:9080"));
        assert_eq!(
            order.env(ENV_ADMIN_TOKEN_FILE),
            Some("/repo/.data/admin-token")
        );
        assert_eq!(
            order.env(ENV_NATS_NKEY_SEED_FILE),
            Some("/repo/.data/nats-auth/order-service.nk")
        );
        assert_eq!(
            order.env(ENV_DATABASE_URL),
            Some("sqlite://.data/orders.db?mode=rwc")
        );
        assert_eq!(order.env(ENV_LOG_FORMAT), Some("pretty"));
        assert_eq!(order.env(ENV_STREAM_REPLICAS), Some("1"));
        assert_eq!(order.env(ENV_PROVIDER_URL), None);

        let payment = process(&plan, PAYMENT);
        assert_eq!((payment.port, payment.public_port), (9082, None));
        assert_eq!(payment.env(ENV_HTTP_ADDR), None);
        assert_eq!(payment.env(ENV_ADMIN_ADDR), Some("127.0.0.1:9082"));
        assert_eq!(
            payment.env(ENV_DATABASE_URL),
            Some("sqlite://.data/payments.db?mode=rwc")
        );
        assert_eq!(payment.env(ENV_PROVIDER_URL), Some("http://127.0.0.1:8090"));
        let inventory = process(&plan, INVENTORY);
        assert_eq!(
            (inventory.port, inventory.env(ENV_DATABASE_URL)),
            (9081, Some("sqlite://.data/inventory.db?mode=rwc"))
        );

        let simulator = process(&plan, SIMULATOR);
        assert_eq!(simulator.port, 8090);
        assert_eq!(
            simulator.env,
            [
                (ENV_HTTP_ADDR, "127.0.0.1:8090".to_owned()),
                (ENV_LOG_FORMAT, "pretty".to_owned())
            ]
        );
    }

    #[test]
    fn durable_syncs_nats_and_every_commit() {
        let durability = |plan: &Plan| -> Vec<(bool, Option<String>)> {
            plan.processes
                .iter()
                .filter(|p| p.binary != SIMULATOR)
                .map(|p| {
                    (
                        plan.nats.sync_always,
                        p.env(ENV_DB_DURABILITY).map(str::to_owned),
                    )
                })
                .collect()
        };
        let lazy = plan(&[]).unwrap();
        assert_eq!(
            durability(&lazy),
            vec![(false, Some("normal".to_owned())); 3]
        );
        let durable = plan(&["--durable", "--cluster"]).unwrap();
        assert_eq!(
            durability(&durable),
            vec![(true, Some("full".to_owned())); 3]
        );
    }

    #[test]
    fn cluster_gives_three_urls_and_three_stream_replicas() {
        let plan = plan(&["--cluster", "--nats-port", "5222"]).unwrap();
        assert_eq!(plan.nats.nodes(), 3);
        assert_eq!(
            (
                plan.nats.client_port,
                plan.nats.route_port,
                plan.nats.monitor_port
            ),
            (5222, 7222, 9222)
        );
        let order = process(&plan, ORDER);
        assert_eq!(
            order.env(ENV_NATS_URL),
            Some("nats://127.0.0.1:5222,nats://127.0.0.1:5223,nats://127.0.0.1:5224")
        );
        assert_eq!(order.env(ENV_STREAM_REPLICAS), Some("3"));
    }

    #[test]
    fn postgres_gives_one_database_per_service() {
        let plan = plan(&["--store", "postgres", "--pg-port", "6543"]).unwrap();
        let pg = plan.postgres.as_ref().unwrap();
        assert_eq!(pg.port, 6543);
        assert_eq!(pg.data_dir, Path::new("/repo/.data/postgres"));
        assert_eq!(pg.databases, ["inventory", "payments", "orders"]);
        assert_eq!(
            process(&plan, ORDER).env(ENV_DATABASE_URL),
            Some("postgres://postgres@127.0.0.1:6543/orders")
        );
    }

    #[test]
    fn replicas_get_ports_ten_apart_around_the_simulator() {
        let plan = plan(&["--store", "postgres", "--replicas", "3"]).unwrap();
        let ports: Vec<(&str, u16, Option<u16>)> = plan
            .processes
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.public_port))
            .collect();
        assert_eq!(
            ports,
            [
                (SIMULATOR, 8090, None),
                ("inventory-service-1", 9081, None),
                ("inventory-service-2", 9091, None),
                ("inventory-service-3", 9101, None),
                ("payment-service-1", 9082, None),
                ("payment-service-2", 9092, None),
                ("payment-service-3", 9102, None),
                // 8090 is the simulator's.
                ("order-service-1", 9080, Some(8080)),
                ("order-service-2", 9090, Some(8100)),
                ("order-service-3", 9100, Some(8110)),
            ]
        );
    }

    #[test]
    fn port_conflicts_are_refused() {
        let error = plan(&["--store", "postgres", "--pg-port", "4222"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("port 4222 would be used twice"), "{error}");
        let error = plan(&["--nats-port", "65000"]).unwrap_err().to_string();
        assert!(error.contains("too high"), "{error}");
        // The last monitoring port of a cluster is P+4002: 61533 is the highest valid P.
        assert!(plan(&["--cluster", "--nats-port", "61533"]).is_ok());
        assert!(plan(&["--cluster", "--nats-port", "61534"]).is_err());
    }

    #[test]
    fn relative_and_absolute_data_dirs() {
        let plan_abs = plan(&["--data-dir", "/var/tmp/of"]).unwrap();
        assert_eq!(plan_abs.data_dir, Path::new("/var/tmp/of"));
        assert_eq!(
            process(&plan_abs, ORDER).env(ENV_DATABASE_URL),
            Some("sqlite:///var/tmp/of/orders.db?mode=rwc")
        );
        let plan_rel = plan(&["--data-dir", "./tmp/../state"]).unwrap();
        assert_eq!(plan_rel.data_dir, Path::new("/repo/state"));
    }

    #[test]
    fn clean_refuses_to_delete_the_repository() {
        for dir in [".", "..", "/", "sub/../.."] {
            let error = plan(&["--clean", "--data-dir", dir])
                .unwrap_err()
                .to_string();
            assert!(error.contains("--clean would delete"), "{dir}: {error}");
        }
        assert!(plan(&["--clean"]).unwrap().clean);
    }
}
