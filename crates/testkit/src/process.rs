//! Child processes: [`ChildProcess`] runs a binary with its output captured to a log file
//! (and, on request, forwarded line by line to this process's stdout), and the small process
//! helpers (signals, bounded waits, log tails) shared by the server handles.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::POLL_INTERVAL;

/// How many log lines the panic messages of this crate quote.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// Whether this process runs as root (`id -u` prints 0). PostgreSQL refuses to run as root,
/// so its commands then go through `runuser -u postgres`.
pub(crate) fn is_root() -> bool {
    static IS_ROOT: OnceLock<bool> = OnceLock::new();
    *IS_ROOT.get_or_init(|| {
        let output = Command::new("id")
            .arg("-u")
            .output()
            .unwrap_or_else(|e| panic!("cannot run `id -u` to learn the current uid: {e}"));
        String::from_utf8_lossy(&output.stdout).trim() == "0"
    })
}

/// Sends `signal` (a name such as `TERM` or `KILL`) to `pid` with the `kill` command: the
/// workspace forbids `unsafe`, so there is no direct `kill(2)` call here.
pub(crate) fn send_signal(pid: u32, signal: &str) -> io::Result<()> {
    let output = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`kill -{signal} {pid}` failed: {}",
            output_text(&output)
        )))
    }
}

/// Waits up to `timeout` for `child` to exit, polling; `None` when it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last `lines` lines of the file at `path`, or a note saying why there are none.
pub(crate) fn tail_file(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A command's stdout and stderr, for error messages.
pub(crate) fn output_text(output: &Output) -> String {
    format!(
        "status {}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// A process spawned for a test, its stdout and stderr appended to one log file in its own
/// temp dir. Its stdin is a pipe held open until [`Self::close_stdin`] (so helpers that stop on
/// EOF keep running). Dropping it kills the process (SIGKILL) and reaps it.
///
/// ```no_run
/// # async fn demo() {
/// use std::time::Duration;
/// use orderflow_testkit::ChildProcess;
///
/// let mut service = ChildProcess::spawn_binary(
///     "order-service",
///     ["--listen", "127.0.0.1:0"],
///     [("NATS_URL", "nats://127.0.0.1:4222")],
/// );
/// service.wait_for_log("listening", Duration::from_secs(10)).await;
/// service.terminate();
/// let status = service.wait_exit(Duration::from_secs(10)).await;
/// assert!(status.success(), "{}", service.log_tail(50));
/// # }
/// ```
#[derive(Debug)]
pub struct ChildProcess {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    // Held for its Drop: removes the log when the handle goes away.
    _dir: TempDir,
}

impl ChildProcess {
    /// Spawns `command` with stdout and stderr appended to [`Self::log_path`] and stdin piped
    /// from this handle.
    /// `label` names the process in panic messages.
    pub fn spawn(label: impl Into<String>, command: Command) -> Self {
        Self::spawn_with(label.into(), command, None)
    }

    /// Like [`Self::spawn`], and every line the process writes to stdout or stderr is also
    /// printed to this process's stdout as `{prefix}{line}` (the log file gets the bare line).
    /// Lines of different processes do not interleave mid-line. Meant for tools that show the
    /// output of several processes at once, e.g. `prefix = "order-service | "`.
    pub fn spawn_forwarding(
        label: impl Into<String>,
        command: Command,
        prefix: impl Into<String>,
    ) -> Self {
        Self::spawn_with(label.into(), command, Some(prefix.into()))
    }

    fn spawn_with(label: String, mut command: Command, forward_prefix: Option<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("orderflow-proc-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for {label}'s log: {e}"));
        let log_path = dir.path().join("output.log");
        let (stdout, stderr) = open_log_pair(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        command.stdin(Stdio::piped());
        // Forwarding reads pipes and appends to the log itself; otherwise the child writes to
        // the log directly.
        let forward = if let Some(prefix) = forward_prefix {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            Some((prefix, stdout, stderr))
        } else {
            command.stdout(stdout).stderr(stderr);
            None
        };
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label} ({command:?}): {e}"));
        if let Some((prefix, stdout_log, stderr_log)) = forward {
            if let Some(out) = child.stdout.take() {
                spawn_forwarder(&label, out, stdout_log, prefix.clone());
            }
            if let Some(err) = child.stderr.take() {
                spawn_forwarder(&label, err, stderr_log, prefix);
            }
        }
        let stdin = child.stdin.take();
        Self {
            label,
            child,
            stdin,
            status: None,
            log_path,
            _dir: dir,
        }
    }

    /// Spawns the workspace binary `name` (see [`crate::binary_path`]) with `args` and extra
    /// environment variables `envs` (the test's own environment is inherited).
    pub fn spawn_binary<A, S, E, K, V>(name: &str, args: A, envs: E) -> Self
    where
        A: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut command = Command::new(crate::binary_path(name));
        command.args(args).envs(envs);
        Self::spawn(name, command)
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The operating-system process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        let bytes = std::fs::read(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.log_path.display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The last `lines` lines the process has written.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("cannot poll {} for its exit status: {e}", self.label));
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Closes the process's stdin, so it reads EOF.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Kills the process with SIGKILL and reaps it. No-op when it has already exited.
    pub fn kill(&mut self) {
        if self.try_exit_status().is_some() {
            return;
        }
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("cannot kill {} (pid {}): {e}", self.label, self.id()));
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("cannot reap {} after SIGKILL: {e}", self.label));
        self.status = Some(status);
    }

    /// Asks the process to shut down with SIGTERM; use [`Self::wait_exit`] to wait for it.
    /// No-op when it has already exited.
    pub fn terminate(&mut self) {
        if self.try_exit_status().is_some() {
            return;
        }
        // The child is not reaped yet, so its pid cannot have been reused.
        send_signal(self.id(), "TERM").unwrap_or_else(|e| {
            panic!(
                "cannot send SIGTERM to {}: {e}\n{}",
                self.label,
                self.log_tail(LOG_TAIL_LINES)
            )
        });
    }

    /// Waits up to `timeout` for the process to exit and returns its exit status; panics with
    /// the log tail when it is still running at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} (pid {}) did not exit within {timeout:?}; log tail:\n{}",
                self.label,
                self.id(),
                self.log_tail(LOG_TAIL_LINES)
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits up to `timeout` until the log contains `needle`; panics with the log tail (and
    /// the exit status, if the process died) otherwise.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            let exited = self.try_exit_status();
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let why = match exited {
                    Some(status) => format!("exited ({status})"),
                    None => format!("did not log it within {timeout:?}"),
                };
                panic!(
                    "waiting for {} to log {needle:?}: it {why}; log tail:\n{}",
                    self.label,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Errors cannot be reported from Drop; the process is gone or unkillable anyway.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a thread copying the lines of `source` to `log` and, prefixed, to our stdout. It ends
/// at EOF, i.e. when the child (and anything it passed the pipe to) has exited.
fn spawn_forwarder(label: &str, source: impl Read + Send + 'static, mut log: File, prefix: String) {
    std::thread::Builder::new()
        .name(format!("forward-{label}"))
        .spawn(move || {
            forward_lines(source, &mut log, |line| {
                // Our stdout may be closed (a pipe whose reader left): keep draining the child
                // anyway, so that it never blocks on a full pipe.
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{prefix}{line}");
            });
        })
        .unwrap_or_else(|e| panic!("cannot start the thread forwarding {label}'s output: {e}"));
}

/// Copies `source` line by line: the raw bytes to `log`, and each line (lossily decoded,
/// without its line ending) to `emit`. Returns at EOF or on a read error.
pub(crate) fn forward_lines(source: impl Read, log: &mut impl Write, mut emit: impl FnMut(&str)) {
    let mut reader = BufReader::new(source);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // The log is best effort, like the terminal: a full disk must not stop the child.
                let _ = log.write_all(&buf);
                let text = String::from_utf8_lossy(&buf);
                emit(text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

/// Opens `path` for appending twice (stdout and stderr of one child).
pub(crate) fn open_log_pair(path: &Path) -> io::Result<(File, File)> {
    let out = OpenOptions::new().create(true).append(true).open(path)?;
    let err = out.try_clone()?;
    Ok((out, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn captures_output_and_exit_status() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 3"]);
        let mut child = ChildProcess::spawn("sh", command);
        let status = child.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(3));
        let log = child.log();
        assert!(log.contains("out") && log.contains("err"), "{log}");
    }

    #[test]
    fn forwarded_lines_are_logged_raw_and_emitted_without_line_endings() {
        let mut log = Vec::new();
        let mut lines = Vec::new();
        forward_lines(&b"one\r\ntwo\n\xff three"[..], &mut log, |line| {
            lines.push(line.to_owned());
        });
        assert_eq!(log, b"one\r\ntwo\n\xff three");
        assert_eq!(lines, ["one", "two", "\u{fffd} three"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn forwarding_keeps_the_log() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2; exit 4"]);
        let mut child = ChildProcess::spawn_forwarding("sh", command, "sh | ");
        let status = child.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(4));
        // The forwarding threads may still be copying the last lines.
        crate::eventually_true(Duration::from_secs(10), "both lines in the log", || {
            let log = child.log();
            async move { log.contains("out\n") && log.contains("err\n") }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn terminate_and_kill_stop_the_process() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = ChildProcess::spawn("sleep", command);
        assert!(child.is_running());
        child.terminate();
        let status = child.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success());

        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = ChildProcess::spawn("sleep", command);
        child.kill();
        assert!(!child.is_running());
    }
}
