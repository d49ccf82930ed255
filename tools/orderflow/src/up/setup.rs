//! Everything `up` checks and prepares before it starts a process: the repository root, the
//! nats-server and PostgreSQL binaries (installed by the repository's scripts when missing),
//! the service binaries next to this executable, free ports and the data dir.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use super::plan::{self, BINARIES, Plan};

/// The script that installs the pinned nats-server and prints its path; its presence also
/// marks the repository root.
const INSTALL_NATS: &str = "scripts/install-nats.sh";
/// The script that finds (or installs) the PostgreSQL binaries and prints their directory.
const INSTALL_POSTGRES: &str = "scripts/install-postgres.sh";
/// The variable naming a nats-server binary to use instead of the pinned one.
const ENV_NATS_SERVER: &str = "ORDERFLOW_NATS_SERVER";
/// The variable naming the directory of `initdb` and `pg_ctl`.
const ENV_PG_BINDIR: &str = "ORDERFLOW_PG_BINDIR";
/// How to get the binaries `up` runs.
const BUILD_HINT: &str = "build them first: cargo build --release --bins";

/// The repository root: the nearest directory at or above `cwd` holding
/// `scripts/install-nats.sh`, else the workspace this tool was compiled in (if it still holds
/// the script), else `None`.
pub fn repo_root(cwd: &Path) -> Option<PathBuf> {
    cwd.ancestors()
        .find(|dir| dir.join(INSTALL_NATS).is_file())
        .map(Path::to_path_buf)
        .or_else(|| {
            let compiled = orderflow_testkit::workspace_root();
            compiled.join(INSTALL_NATS).is_file().then_some(compiled)
        })
}

/// The directory holding this executable, where the service binaries are built too.
pub fn exe_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the path of this executable")?;
    exe.parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", exe.display()))
}

/// Refuses to start when a binary `up` runs is missing from `dir`.
pub fn check_binaries(dir: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found in {}; {BUILD_HINT}",
            missing.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// Refuses to start when a port of the plan is in use, naming what wanted it.
pub fn check_ports_free(plan: &Plan) -> anyhow::Result<()> {
    for (port, what) in plan.ports() {
        if let Err(e) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            bail!(
                "port {port} (for {what}) is not free: {e}. Is an earlier `orderflow up` (or \
                 another nats-server, PostgreSQL or service) still running? Stop it, or choose \
                 other ports with --nats-port / --pg-port"
            );
        }
    }
    Ok(())
}

/// Deletes the data dir with `--clean`, then creates it (enterable by every user: when we
/// run as root, PostgreSQL runs as user `postgres` and must reach its data dir inside).
pub fn prepare_data_dir(plan: &Plan) -> anyhow::Result<()> {
    let dir = &plan.data_dir;
    if plan.clean && dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("--clean: cannot delete {}", dir.display()))?;
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data dir {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {}", dir.display()))?;
    }
    ensure_admin_token(&plan.admin_token_file)
}

/// Makes the NATS users' nkey seeds (readable by their owner only) when missing — one per
/// service and one for the operator (`orderflow dlq`) — and returns the nats-server
/// `authorization` block that admits exactly them, each with its permissions.
pub fn nats_users(plan: &Plan) -> anyhow::Result<String> {
    use orderflow_messaging::access;
    let dir = &plan.nats_auth_dir;
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot chmod {}", dir.display()))?;
    }
    let topology =
        orderflow_messaging::Topology::orderflow(&orderflow_messaging::TopologySettings::default());
    let mut users = Vec::new();
    for service in access::SERVICES {
        let public = ensure_seed(&plan::seed_file(dir, service.service))?;
        users.push((
            format!("\"{public}\""),
            access::service_permissions(&topology, &service),
        ));
    }
    let public = ensure_seed(&plan::seed_file(dir, access::OPERATOR))?;
    users.push((format!("\"{public}\""), access::operator_permissions()));
    Ok(access::authorization_block(&users))
}

/// The public key of the seed in `path`, making a new seed there when there is none.
fn ensure_seed(path: &Path) -> anyhow::Result<String> {
    if !path.exists() {
        let (seed, _) = orderflow_messaging::access::new_user_nkey();
        write_secret(path, &seed)?;
    }
    let seed =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    orderflow_messaging::access::public_key(&seed)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes `text` and a newline to a new file readable by its owner only.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{text}").with_context(|| format!("cannot write {}", path.display()))
}

/// Makes the operator token file (readable by its owner only) when it is missing; an existing
/// one is kept, so the token stays the same across runs until `--clean`.
fn ensure_admin_token(path: &Path) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    use std::io::Read as _;
    if path.exists() {
        return Ok(());
    }
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom for the operator token")?;
    let token = random.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    });
    write_secret(path, &token)
}

/// The nats-server binary: `$ORDERFLOW_NATS_SERVER` when set, else the pinned one that
/// `scripts/install-nats.sh` installs when missing.
pub fn nats_server(root: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = non_empty_env(ENV_NATS_SERVER) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{ENV_NATS_SERVER}={} does not exist", path.display());
        }
        return Ok(path);
    }
    let Some(root) = root else {
        bail!(
            "nats-server: not in an orderflow checkout (no {INSTALL_NATS} above the current \
             directory) and {ENV_NATS_SERVER} is not set"
        );
    };
    let path = PathBuf::from(run_script(root, INSTALL_NATS)?);
    if !path.is_file() {
        bail!(
            "{INSTALL_NATS} printed {}, which is not a file",
            path.display()
        );
    }
    Ok(path)
}

/// The directory of `initdb` and `pg_ctl`: what `scripts/install-postgres.sh` prints (it
/// honours `$ORDERFLOW_PG_BINDIR`, and installs Debian's package when it may); outside a
/// checkout, `$ORDERFLOW_PG_BINDIR`.
pub fn postgres_bin_dir(root: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match root {
        Some(root) => PathBuf::from(run_script(root, INSTALL_POSTGRES)?),
        None => PathBuf::from(non_empty_env(ENV_PG_BINDIR).with_context(|| {
            format!(
                "PostgreSQL: not in an orderflow checkout (no {INSTALL_POSTGRES}) and \
                 {ENV_PG_BINDIR} is not set"
            )
        })?),
    };
    if !dir.join("initdb").is_file() || !dir.join("pg_ctl").is_file() {
        bail!("{} does not hold initdb and pg_ctl", dir.display());
    }
    Ok(dir)
}

/// Runs `script` (relative to `root`) in `root`, its stderr on ours, and returns the last
/// line it printed on stdout.
fn run_script(root: &Path, script: &str) -> anyhow::Result<String> {
    let path = root.join(script);
    let output = Command::new(&path)
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "{script} failed ({}); see its messages above",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{script} printed nothing"))
}

/// The value of `name` unless it is unset or empty.
fn non_empty_env(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repo_root_is_found_from_below() {
        let root = orderflow_testkit::workspace_root();
        let below = root.join("tools/orderflow/src");
        assert_eq!(repo_root(&below).as_deref(), Some(root.as_path()));
    }

    #[test]
    fn missing_binaries_are_named_with_the_build_hint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("order-service"), "").unwrap();
        let error = check_binaries(dir.path()).unwrap_err().to_string();
        assert!(
            error.starts_with("payment-provider-sim, inventory-service, payment-service not found"),
            "{error}"
        );
        assert!(error.ends_with(BUILD_HINT), "{error}");
    }

    #[test]
    fn scripts_report_their_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        std::fs::create_dir(dir.join("scripts")).unwrap();
        let script = dir.join("scripts/say.sh");
        std::fs::write(&script, "#!/bin/sh\necho first\necho /the/answer\necho\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(run_script(dir, "scripts/say.sh").unwrap(), "/the/answer");
        std::fs::write(&script, "#!/bin/sh\nexit 3\n").unwrap();
        let error = run_script(dir, "scripts/say.sh").unwrap_err().to_string();
        assert!(error.contains("failed"), "{error}");
    }
}
