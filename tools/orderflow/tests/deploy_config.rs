//! The production NATS configuration in `deploy/nats` works as documented: each file passes
//! `nats-server -t`, and three real servers started from those very files — only ports and
//! paths rewritten to temporary ones — form one JetStream cluster that fsyncs every write,
//! holds orderflow's streams with 3 replicas, and survives the graceful restart its comments
//! describe (lame duck mode, then the two health checks) without losing a message.
#![allow(clippy::unwrap_used, clippy::too_many_lines, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use orderflow_contracts::names::{streams, subjects};
use orderflow_messaging::{
    Nats, NatsConfig, NatsTls, Publisher, Topology, TopologySettings, access,
};
use orderflow_testkit::{ChildProcess, TestPki, eventually, nats_server_binary};
use serde_json::Value;

/// How long a node may take to start, to catch up, or to leave in lame duck mode (its grace
/// period is 10 s before the last clients are closed).
const WAIT: Duration = Duration::from_mins(1);
const NODES: usize = 3;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with `from` replaced by `to`; `from` must be there, so a change to the files that
/// this test no longer understands fails loudly instead of testing something else.
fn rewrite(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "deploy/nats/cluster.conf no longer contains {from:?}: update this test"
    );
    text.replace(from, to)
}

/// The users of `auth.conf`: each user's seed, and the environment that gives the server
/// their public keys.
struct Users {
    seeds: Vec<(String, String)>,
}

impl Users {
    fn new() -> Self {
        let seeds = access::SERVICES
            .iter()
            .map(|s| s.service)
            .chain([access::OPERATOR])
            .map(|user| (user.to_owned(), access::new_user_nkey().0))
            .collect();
        Self { seeds }
    }

    fn env(&self) -> Vec<(String, String)> {
        self.seeds
            .iter()
            .map(|(user, seed)| {
                (
                    access::nkey_variable(user),
                    access::public_key(seed).unwrap(),
                )
            })
            .collect()
    }

    fn seed(&self, user: &str) -> String {
        self.seeds
            .iter()
            .find(|(u, _)| u == user)
            .unwrap()
            .1
            .clone()
    }
}

/// `deploy/nats/auth.conf` is what `orderflow_messaging::access` makes from the topology
/// (`ORDERFLOW_BLESS=1` rewrites it after a change to the topology or the permissions).
#[test]
fn the_authorization_file_is_the_generated_one() {
    let path = deploy_dir().join("auth.conf");
    let generated =
        access::deploy_authorization(&Topology::orderflow(&TopologySettings::default()));
    if std::env::var_os("ORDERFLOW_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    assert_eq!(
        read(&path),
        generated,
        "deploy/nats/auth.conf differs from the permissions in the code: rerun this test \
         with ORDERFLOW_BLESS=1 and review the diff"
    );
}

/// The ports of one node on this machine.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    route: u16,
    monitor: u16,
}

/// Distinct free loopback ports for every node.
fn free_ports() -> Vec<Ports> {
    orderflow_testkit::free_ports(NODES * 3)
        .chunks(3)
        .map(|p| Ports {
            client: p[0],
            route: p[1],
            monitor: p[2],
        })
        .collect()
}

/// One node: its directory holds its own `nats-<n>.conf` as committed and a `cluster.conf`
/// rewritten for this machine.
struct Node {
    name: String,
    config: PathBuf,
    ports: Ports,
    process: Option<ChildProcess>,
    /// The public nkeys auth.conf reads from the environment.
    env: Vec<(String, String)>,
}

impl Node {
    fn start(&mut self) {
        let mut command = Command::new(nats_server_binary());
        command.arg("-c").arg(&self.config).envs(self.env.clone());
        self.process = Some(ChildProcess::spawn(self.name.clone(), command));
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    fn log(&self) -> String {
        self.process
            .as_ref()
            .map_or_else(|| "<not running>".to_owned(), |p| p.log_tail(30))
    }

    /// GET on the monitoring port: (status, body).
    async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://127.0.0.1:{}{path}", self.ports.monitor);
        let response = orderflow_testkit::http_client()
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|e| format!("{url}: {e}"))?;
        Ok((status, body))
    }

    /// Waits until `path` answers 200.
    async fn wait_healthy(&self, path: &str) {
        eventually(WAIT, &format!("{} {path} 200", self.name), || async {
            match self.get(path).await? {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}\n{}", self.log())),
            }
        })
        .await;
    }

    async fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// Writes the three nodes' configuration into `dir`, with `pki`'s certificates in place of
/// /etc/nats/tls.
fn materialise(dir: &Path, users: &Users, pki: &TestPki) -> Vec<Node> {
    let shared = read(&deploy_dir().join("cluster.conf"));
    let ports = free_ports();
    (0..NODES)
        .map(|i| {
            let n = i + 1;
            let node_dir = dir.join(format!("nats-{n}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut config = shared.clone();
            for (from, to) in [
                ("0.0.0.0:4222", ports[i].client),
                ("0.0.0.0:6222", ports[i].route),
                ("0.0.0.0:8222", ports[i].monitor),
            ] {
                config = rewrite(&config, from, &format!("127.0.0.1:{to}"));
            }
            for (j, other) in ports.iter().enumerate() {
                config = rewrite(
                    &config,
                    &format!("nats-route://nats-{}:6222", j + 1),
                    &format!("nats-route://127.0.0.1:{}", other.route),
                );
            }
            config = rewrite(
                &config,
                "/etc/nats/tls/",
                &format!("{}/", pki.dir().display()),
            );
            let store = node_dir.join("jetstream");
            config = rewrite(
                &config,
                "/var/lib/nats/jetstream",
                &store.display().to_string(),
            );
            std::fs::write(node_dir.join("cluster.conf"), config).unwrap();
            // The node file itself is used as committed: it includes ./cluster.conf.
            let file = format!("nats-{n}.conf");
            std::fs::copy(deploy_dir().join(&file), node_dir.join(&file)).unwrap();
            std::fs::copy(deploy_dir().join("auth.conf"), node_dir.join("auth.conf")).unwrap();
            Node {
                name: format!("nats-{n}"),
                config: node_dir.join(file),
                ports: ports[i],
                process: None,
                env: users.env(),
            }
        })
        .collect()
}

/// The committed files pass the server's own configuration check (with the certificate
/// paths pointing at certificates made here).
#[test]
fn every_node_file_passes_the_servers_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let users = Users::new();
    let pki = TestPki::new(&["nats-1", "nats-2", "nats-3"]);
    for node in materialise(dir.path(), &users, &pki) {
        let file = node.config;
        // From another directory: the include must resolve relative to the file.
        let output = Command::new(nats_server_binary())
            .arg("-t")
            .arg("-c")
            .arg(&file)
            .envs(users.env())
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{}: {said}", file.display());
        assert!(said.contains("is valid"), "{said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_from_the_files_replicates_streams_and_restarts_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let users = Users::new();
    let pki = TestPki::new(&["nats-1", "nats-2", "nats-3"]);
    let mut nodes = materialise(dir.path(), &users, &pki);
    for node in &mut nodes {
        node.start();
    }
    for node in &nodes {
        node.wait_healthy("/healthz?js-enabled-only=true").await;
        node.wait_healthy("/healthz").await;
    }

    // Each node runs under its own name, in the one cluster, fsyncing every write.
    for node in &nodes {
        let varz = node.json("/varz").await;
        assert_eq!(varz["server_name"], node.name.as_str());
        assert_eq!(varz["cluster"]["name"], "orderflow", "{varz}");
        assert_eq!(
            varz["jetstream"]["config"]["sync_always"], true,
            "sync_interval: always is in effect"
        );
        // Two routes each way: the route to itself in the shared list was dropped.
        eventually(
            WAIT,
            &format!("{} routed to both others", node.name),
            || async {
                let routez: Value = serde_json::from_str(&node.get("/routez").await?.1)
                    .map_err(|e| e.to_string())?;
                let mut peers: Vec<String> = routez["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["remote_name"].as_str().map(str::to_owned))
                    .collect();
                peers.sort();
                peers.dedup();
                if peers.len() == NODES - 1 && !peers.contains(&node.name) {
                    Ok(())
                } else {
                    Err(format!("routes to {peers:?}"))
                }
            },
        )
        .await;
    }

    // orderflow's streams, with 3 replicas, as the services create them on a cluster.
    let urls: Vec<String> = nodes.iter().map(Node::url).collect();
    let tls = NatsTls {
        ca: pki.ca(),
        client: Some(pki.client()),
    };
    let mut operator = NatsConfig::new(urls.join(","), "deploy-config-test");
    operator.nkey_seed = Some(users.seed(access::OPERATOR));
    operator.tls = Some(tls.clone());
    let nats = Nats::connect(&operator).await.unwrap();
    nats.wait_connected(WAIT).await.unwrap();
    let settings = TopologySettings {
        replicas: 3,
        ..TopologySettings::default()
    };
    Topology::orderflow(&settings)
        .reconcile_streams(&nats)
        .await
        .unwrap();
    let (cert, key) = pki.client();
    let js = jetstream::new(
        async_nats::ConnectOptions::with_nkey(users.seed(access::OPERATOR))
            .require_tls(true)
            .add_root_certificates(pki.ca())
            .add_client_certificate(cert.clone(), key.clone())
            .connect(urls.clone())
            .await
            .unwrap(),
    );
    // Anonymous clients are refused (over TLS with a good certificate, and without TLS), and
    // a service's user publishes only its own events.
    let anonymous = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.ca())
        .add_client_certificate(cert, key)
        .connection_timeout(Duration::from_secs(5))
        .connect(urls.clone())
        .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let plain = async_nats::ConnectOptions::with_nkey(users.seed(access::OPERATOR))
        .connection_timeout(Duration::from_secs(5))
        .connect(urls.clone())
        .await;
    assert!(plain.is_err(), "a client without TLS was let in");
    let mut inventory = NatsConfig::new(urls.join(","), "inventory-service");
    inventory.nkey_seed = Some(users.seed("inventory-service"));
    inventory.tls = Some(tls.clone());
    inventory.request_timeout = Duration::from_secs(1);
    let inventory = Nats::connect(&inventory).await.unwrap();
    inventory.wait_connected(WAIT).await.unwrap();
    let refused = Publisher::new(&inventory)
        .publish_raw(
            subjects::ORDER_CREATED,
            &[],
            bytes::Bytes::from_static(b"{}"),
        )
        .await;
    assert!(
        refused.is_err(),
        "inventory-service published an orders.created"
    );
    let orders_cluster = || async {
        let mut stream = js
            .get_stream(streams::ORDERS)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            info.config.num_replicas,
            info.cluster.clone().unwrap_or_default(),
        ))
    };
    let (replicas, cluster) = orders_cluster().await.unwrap();
    assert_eq!(replicas, 3);
    assert_eq!(cluster.name.as_deref(), Some("orderflow"));

    let publisher = Publisher::new(&nats);
    let publish = |n: u32| {
        let publisher = publisher.clone();
        async move {
            publisher
                .publish_raw(
                    subjects::ORDER_CREATED,
                    &[("Nats-Msg-Id".to_owned(), format!("deploy-test-{n}"))],
                    bytes::Bytes::from_static(b"{}"),
                )
                .await
                .map_err(|e| e.to_string())
        }
    };
    publish(1).await.unwrap();

    // Restart the ORDERS leader gracefully, as cluster.conf describes.
    let leader = eventually(
        WAIT,
        "an ORDERS leader with both replicas current",
        || async {
            let (_, cluster) = orders_cluster().await?;
            match cluster.leader {
                Some(leader)
                    if cluster.replicas.len() == 2
                        && cluster.replicas.iter().all(|r| r.current) =>
                {
                    Ok(leader)
                }
                _ => Err(format!("{cluster:?}")),
            }
        },
    )
    .await;
    let i = nodes.iter().position(|n| n.name == leader).unwrap();
    let pid = nodes[i].process.as_ref().unwrap().id();
    let signal = Command::new(nats_server_binary())
        .arg("--signal")
        .arg(format!("ldm={pid}"))
        .output()
        .unwrap();
    assert!(signal.status.success(), "{signal:?}");

    // Meanwhile the other two elect a new leader and keep accepting writes.
    let new_leader = eventually(WAIT, "another ORDERS leader", || async {
        match orders_cluster().await?.1.leader {
            Some(l) if l != leader => Ok(l),
            other => Err(format!("leader {other:?}")),
        }
    })
    .await;
    assert_ne!(new_leader, leader);
    eventually(WAIT, "a write while one node is away", || publish(2)).await;

    let status = nodes[i].process.as_mut().unwrap().wait_exit(WAIT).await;
    assert!(status.success(), "{status}: {}", nodes[i].log());
    assert!(
        nodes[i].log().contains("Entering lame duck mode"),
        "{}",
        nodes[i].log()
    );

    // Back with the same config and store: up, then caught up.
    nodes[i].start();
    nodes[i].wait_healthy("/healthz?js-enabled-only=true").await;
    nodes[i].wait_healthy("/healthz").await;
    eventually(WAIT, "all three ORDERS replicas current again", || async {
        let (_, cluster) = orders_cluster().await?;
        if cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster.replicas.iter().all(|r| r.current && !r.offline)
        {
            Ok(())
        } else {
            Err(format!("{cluster:?}"))
        }
    })
    .await;
    // The restarted node holds both messages, the one written while it was away included.
    let jsz = nodes[i].json("/jsz?streams=true").await;
    let orders = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
        .find(|s| s["name"] == streams::ORDERS)
        .cloned()
        .unwrap_or_else(|| panic!("no ORDERS on the restarted node: {jsz}"));
    assert_eq!(orders["state"]["messages"], 2, "{orders}");
}
