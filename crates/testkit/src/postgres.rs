//! Real PostgreSQL for tests: [`PostgresServer`] runs a throwaway cluster (`initdb` + `pg_ctl`)
//! in a temp dir (or, through [`PostgresServerBuilder`], a persistent one on a fixed port), and
//! [`TestDatabase`] gives one test a fresh, empty database — on the shared server named by
//! `ORDERFLOW_TEST_POSTGRES_URL` when set, else on a private server.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{self, LOG_TAIL_LINES};

/// Install hint quoted when no PostgreSQL binaries are found.
const INSTALL_HINT: &str = "install PostgreSQL server binaries (scripts/install-postgres.sh, \
     Debian: `apt-get install postgresql`), or set ORDERFLOW_PG_BINDIR, or point \
     ORDERFLOW_TEST_POSTGRES_URL at a running server";
/// Environment variable naming an admin URL of a running server to create test databases on.
const SHARED_SERVER_ENV: &str = "ORDERFLOW_TEST_POSTGRES_URL";
/// How often server startup is retried with a new port when the chosen one was taken.
const PORT_RETRIES: usize = 3;
/// How often `CREATE DATABASE` is retried when the template database is busy.
const CREATE_RETRIES: usize = 20;

/// The directory holding `initdb` and `pg_ctl`: `$ORDERFLOW_PG_BINDIR` if it has `initdb`,
/// else the highest-versioned `/usr/lib/postgresql/*/bin`, else the directory of `initdb` on
/// `PATH` (symlinks resolved). Panics with an install hint when none is found.
pub fn postgres_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ORDERFLOW_PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, bin)) = versioned.pop() {
        return bin;
    }
    if let Some(initdb) = crate::nats::find_on_path("initdb") {
        let initdb = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = initdb.parent().filter(|d| d.join("pg_ctl").is_file()) {
            return dir.to_path_buf();
        }
    }
    panic!("PostgreSQL server binaries (initdb, pg_ctl) not found; {INSTALL_HINT}");
}

/// Options for a [`PostgresServer`]; start with [`PostgresServer::builder`].
///
/// The defaults suit tests: a fresh cluster in a temp dir, a random free port, `fsync=off`.
/// [`Self::data_dir`] and [`Self::port`] are for long-running local setups such as
/// `orderflow up`.
#[derive(Debug, Default, Clone)]
pub struct PostgresServerBuilder {
    data_dir: Option<PathBuf>,
    port: Option<u16>,
    bin_dir: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl PostgresServerBuilder {
    /// Keep the cluster in `dir`: `initdb` runs only when `dir` does not hold a cluster yet
    /// (no `PG_VERSION` file), and an existing cluster is started as it is. The data is
    /// durable (`fsync` stays on) and outlives the handle: dropping the server stops it with
    /// a fast shutdown and leaves `dir` in place. When running as root, a new `dir` is handed
    /// to user `postgres`, and every directory above it must be enterable by every user.
    #[must_use]
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Listen on this port of 127.0.0.1 instead of a random free one.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Take `initdb` and `pg_ctl` from this directory instead of [`postgres_bin_dir`].
    #[must_use]
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Serve TLS (`ssl = on`) with this certificate and key (PEM files; copied into the
    /// server's dir, where only the server's user may read the key).
    #[must_use]
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    /// Starts the server (see [`Self::start_blocking`]) on tokio's blocking pool.
    pub async fn start(self) -> PostgresServer {
        match tokio::task::spawn_blocking(move || self.start_blocking()).await {
            Ok(server) => server,
            // Re-raise the startup panic with its own message.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("PostgreSQL startup task failed: {e}"),
        }
    }

    /// Runs `initdb` (unless the data dir holds a cluster already) and `pg_ctl start -w`,
    /// blocking the thread until the server accepts connections (about a second).
    pub fn start_blocking(self) -> PostgresServer {
        let bin_dir = self.bin_dir.unwrap_or_else(postgres_bin_dir);
        let dir = tempfile::Builder::new()
            .prefix("orderflow-pg-")
            .tempdir_in(std::env::temp_dir())
            .unwrap_or_else(|e| panic!("cannot create a temp dir for PostgreSQL: {e}"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.path().display()));
        if process::is_root() {
            hand_to_postgres_user(dir.path());
        }
        let persistent_data = self.data_dir.map(|data| {
            std::path::absolute(&data)
                .unwrap_or_else(|e| panic!("cannot make {} absolute: {e}", data.display()))
        });
        let tls = self.tls.map(|(cert, key)| {
            let (to_cert, to_key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(&cert, &to_cert)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", cert.display()));
            std::fs::copy(&key, &to_key)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", key.display()));
            std::fs::set_permissions(&to_key, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", to_key.display()));
            if process::is_root() {
                run(
                    Command::new("chown")
                        .arg("postgres")
                        .arg(&to_cert)
                        .arg(&to_key),
                    "chown the TLS files",
                );
            }
            (to_cert, to_key)
        });
        let mut server = PostgresServer {
            bin_dir,
            port: 0,
            running: false,
            persistent_data,
            dir,
            tls,
        };
        let needs_init = match &server.persistent_data {
            None => true,
            Some(data) => prepare_persistent_data_dir(data),
        };
        if needs_init {
            server.init();
        }
        // A fixed port gets one attempt: retrying cannot free it.
        let attempts = if self.port.is_some() { 1 } else { PORT_RETRIES };
        for attempt in 1..=attempts {
            server.port = self.port.unwrap_or_else(crate::free_port);
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.running = true;
                    return server;
                }
                Err(_) if attempt < attempts && server.port_was_taken() => {}
                Err(why) => panic!(
                    "cannot start PostgreSQL on port {}: {why}\nserver log tail:\n{}",
                    server.port,
                    server.log_tail(LOG_TAIL_LINES)
                ),
            }
        }
        unreachable!("the last attempt either returns or panics");
    }
}

/// Makes sure user `postgres` can use `dir` (we are root): every directory above it must be
/// enterable, and `dir` is handed over.
fn hand_to_postgres_user(dir: &Path) {
    assert!(
        world_searchable(dir),
        "user postgres cannot reach {}: use a directory every user may enter (for temp dirs, \
         set TMPDIR to one such as /tmp)",
        dir.display()
    );
    run(
        Command::new("chown").arg("postgres").arg(dir),
        "chown the PostgreSQL dir",
    );
}

/// Prepares a persistent data dir and says whether `initdb` still has to run in it.
fn prepare_persistent_data_dir(data: &Path) -> bool {
    if data.join("PG_VERSION").is_file() {
        return false;
    }
    std::fs::create_dir_all(data)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", data.display()));
    // PostgreSQL insists on a data dir only its owner may enter.
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", data.display()));
    if process::is_root() {
        hand_to_postgres_user(data);
    }
    true
}

/// A PostgreSQL server: by default a throwaway cluster in a temp dir, listening on a free port
/// of 127.0.0.1 (socket in the same dir), `fsync=off`, trust authentication for user
/// `postgres`. Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the
/// directory. A server given a persistent data dir ([`PostgresServerBuilder::data_dir`]) is
/// stopped with `-m fast` instead, and its data dir is kept.
///
/// When the tests run as root the PostgreSQL commands run as user `postgres` through
/// `runuser`, since `initdb` refuses root; the temp dir is then handed to that user.
#[derive(Debug)]
pub struct PostgresServer {
    bin_dir: PathBuf,
    port: u16,
    running: bool,
    /// The data dir given to the builder; `None`: `<dir>/data`.
    persistent_data: Option<PathBuf>,
    /// Socket, server log and (unless persistent) the cluster; removed on drop.
    dir: TempDir,
    /// The certificate and key it serves TLS with, in `dir`.
    tls: Option<(PathBuf, PathBuf)>,
}

impl PostgresServer {
    /// Options for a server with a persistent data dir or a fixed port.
    pub fn builder() -> PostgresServerBuilder {
        PostgresServerBuilder::default()
    }

    /// Starts a server (see [`Self::start_blocking`]) on tokio's blocking pool.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Runs `initdb` and `pg_ctl start -w`, blocking the thread until the server accepts
    /// connections (about a second).
    pub fn start_blocking() -> Self {
        Self::builder().start_blocking()
    }

    /// Admin URL of the default database: `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `name` on this server: `postgres://postgres@127.0.0.1:PORT/<name>`.
    pub fn database_url(&self, name: &str) -> String {
        with_database(&self.url(), name)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        match &self.persistent_data {
            Some(data) => data.clone(),
            None => self.dir.path().join("data"),
        }
    }

    /// The server log written by `pg_ctl -l`.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail_file(&self.log_path(), lines)
    }

    /// Stops the server with a fast shutdown (`pg_ctl stop -m fast`), waiting for it.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// Stops the server the way a crash would: `pg_ctl stop -m immediate` (no shutdown
    /// checkpoint; every client connection is cut and the next start runs crash recovery).
    /// Blocks until it is down.
    pub fn kill(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// `pg_ctl stop -m <mode>`, waiting until the server is down; no-op when it is not running.
    fn pg_ctl_stop(&mut self, mode: &str) {
        if self.running {
            self.running = false;
            run(
                self.pg_command("pg_ctl")
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-w", "-m", mode, "stop"]),
                &format!("stop PostgreSQL ({mode})"),
            );
        }
    }

    /// Whether the server runs (it was started and not stopped through this handle).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Starts a server stopped with [`Self::stop`] or [`Self::kill`] again, on the same port
    /// and data dir, blocking until it accepts connections. No-op when it runs.
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        if let Err(why) = self.pg_ctl_start() {
            panic!(
                "cannot start PostgreSQL again on port {}: {why}\nserver log tail:\n{}",
                self.port,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.running = true;
    }

    /// A command running `program` from the bin dir, as user `postgres` when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let binary = self.bin_dir.join(program);
        if process::is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        } else {
            Command::new(binary)
        }
    }

    fn init(&self) {
        let mut initdb = self.pg_command("initdb");
        initdb.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            // The C locale exists everywhere (containers often lack others) and sorts bytewise.
            "--locale=C",
        ]);
        if self.persistent_data.is_none() {
            // Throwaway data need not survive a crash.
            initdb.arg("--no-sync");
        }
        run(&mut initdb, "initdb");
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut options = format!(
            "-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200",
            port = self.port,
            socket_dir = self.dir.path().display(),
        );
        if self.persistent_data.is_none() {
            // Throwaway data need not survive a crash; skipping fsync makes tests faster.
            options.push_str(" -c fsync=off");
        }
        if let Some((cert, key)) = &self.tls {
            let _ = write!(
                options,
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        let output = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "30", "-l"])
            .arg(self.log_path())
            .args(["-o", &options, "start"])
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed: {}",
                process::output_text(&output)
            ))
        }
    }

    fn port_was_taken(&self) -> bool {
        self.log_tail(LOG_TAIL_LINES)
            .contains("Address already in use")
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            // Throwaway data: an immediate stop is enough. Persistent data: a fast stop, so
            // the next start needs no crash recovery. Errors cannot be raised from Drop, so
            // they are printed.
            let mode = if self.persistent_data.is_some() {
                "fast"
            } else {
                "immediate"
            };
            let result = self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-m", mode, "stop"])
                .output();
            match result {
                Ok(output) if output.status.success() => {}
                Ok(output) => eprintln!(
                    "orderflow-testkit: stopping PostgreSQL on port {} failed: {}",
                    self.port,
                    process::output_text(&output)
                ),
                Err(e) => eprintln!("orderflow-testkit: cannot run pg_ctl stop: {e}"),
            }
        }
    }
}

/// Runs `command`, panicking with its output when it cannot run or fails.
fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot {what} ({command:?}): {e}; {INSTALL_HINT}"));
    assert!(
        output.status.success(),
        "cannot {what} ({command:?}): {}",
        process::output_text(&output)
    );
}

/// A fresh, empty PostgreSQL database for one test.
///
/// With `ORDERFLOW_TEST_POSTGRES_URL` set (an admin URL such as
/// `postgres://postgres@127.0.0.1:5432/postgres`) the database is created on that server and
/// dropped (`WITH (FORCE)`) when this handle is dropped; otherwise a private
/// [`PostgresServer`] is started for it and goes away with it.
///
/// ```no_run
/// # async fn demo() {
/// let db = orderflow_testkit::TestDatabase::postgres().await;
/// let url = db.url(); // postgres://…, for orderflow_store::Db::connect
/// # }
/// ```
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    /// The private server, when no shared one was configured.
    server: Option<PostgresServer>,
}

impl TestDatabase {
    /// Creates the database `t_<uuid>` on the shared or a private server.
    pub async fn postgres() -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let shared = std::env::var(SHARED_SERVER_ENV)
            .ok()
            .filter(|url| !url.trim().is_empty());
        let (admin_url, server) = if let Some(url) = shared {
            (url.trim().to_owned(), None)
        } else {
            let server = PostgresServer::start().await;
            (server.url(), Some(server))
        };
        create_database(&admin_url, &name).await;
        let url = with_database(&admin_url, &name);
        Self {
            name,
            url,
            admin_url,
            server,
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`t_<uuid>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin URL of the server the database lives on.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The private server, when no shared one was configured.
    pub fn server(&self) -> Option<&PostgresServer> {
        self.server.as_ref()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.server.is_some() {
            // The private server takes the database with it.
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop is synchronous and may run inside a runtime: use a thread with its own runtime.
        let dropper = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return Err(format!("cannot build a runtime: {e}")),
            };
            runtime.block_on(async {
                // `name` is `t_` + a UUID in hex, generated above: safe to splice.
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                admin_sql(&admin_url, &sql)
                    .await
                    .map_err(|e| format!("DROP DATABASE failed: {e}"))
            })
        });
        match dropper.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "orderflow-testkit: cannot drop test database {}: {e}",
                self.name
            ),
            Err(_) => eprintln!(
                "orderflow-testkit: dropping test database {} panicked",
                self.name
            ),
        }
    }
}

/// `CREATE DATABASE "<name>"` on the server at `admin_url`, retried while the template
/// database is busy (another session connected to it).
async fn create_database(admin_url: &str, name: &str) {
    // `name` is `t_` + a UUID in hex, generated by the caller: safe to splice.
    let sql = format!("CREATE DATABASE \"{name}\"");
    for attempt in 1..=CREATE_RETRIES {
        match admin_sql(admin_url, &sql).await {
            Ok(()) => break,
            Err(e) if attempt < CREATE_RETRIES && e.contains("accessed by other users") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot create test database {name} at {admin_url}: {e}"),
        }
    }
}

/// Runs one administrative statement (`CREATE DATABASE`, `DROP DATABASE`…) on its own
/// connection to the server at `url`.
pub async fn admin_sql(url: &str, sql: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = client
        .batch_execute(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        });
    drop(client);
    let _ = driver.await;
    result
}

/// `admin_url` with its database path replaced by `database` (query parameters kept).
fn with_database(admin_url: &str, database: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut url = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Whether every directory above `path` may be entered by every user (the `postgres` user
/// must reach the data directory when we run as root).
fn world_searchable(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_swapped_in_the_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t_1"),
            "postgres://postgres@127.0.0.1:5432/t_1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "t_1"),
            "postgres://u:p@h:1/t_1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t_1"), "postgres://h:1/t_1");
        assert_eq!(
            with_database("postgres://h?x=1", "t_1"),
            "postgres://h/t_1?x=1"
        );
    }
}
