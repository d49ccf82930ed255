//! CPU time and memory of the system's processes, read from `/proc` (Linux).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One process's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// User + system CPU time, in seconds.
    pub cpu_s: f64,
    /// Resident memory now, in bytes.
    pub rss: u64,
    /// Peak resident memory so far, in bytes.
    pub peak_rss: u64,
}

/// Reads a process's counters; `None` when it is gone.
pub fn read(pid: u32) -> Option<Counters> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |v| v * 1024)
    };
    Some(Counters {
        cpu_s: ticks / clock_ticks(),
        rss: kib("VmRSS:"),
        peak_rss: kib("VmHWM:"),
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Counters of every process, by name.
pub fn snapshot(pids: &[(String, u32)]) -> BTreeMap<String, Counters> {
    pids.iter()
        .filter_map(|(name, pid)| read(*pid).map(|c| (name.clone(), c)))
        .collect()
}

/// Samples RSS every second while a run goes on.
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<BTreeMap<String, Vec<u64>>>,
}

impl Sampler {
    /// Starts sampling.
    pub fn start(pids: Vec<(String, u32)>) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            loop {
                for (name, pid) in &pids {
                    if let Some(c) = read(*pid) {
                        samples.entry(name.clone()).or_default().push(c.rss);
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped.changed() => return samples,
                }
            }
        });
        Self { stop, task }
    }

    /// Stops and returns the RSS samples of each process, one a second.
    pub async fn stop(&mut self) -> BTreeMap<String, Vec<u64>> {
        let _ = self.stop.send(true);
        (&mut self.task).await.unwrap_or_default()
    }
}

/// What a process used during a run.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// The process.
    pub name: String,
    /// CPU seconds during the run.
    pub cpu_s: f64,
    /// CPU milliseconds per confirmed order.
    pub cpu_ms_per_order: f64,
    /// RSS before the load, MiB.
    pub idle_rss_mib: f64,
    /// Peak RSS, MiB.
    pub peak_rss_mib: f64,
    /// RSS at the end of the run, MiB.
    pub end_rss_mib: f64,
    /// RSS one sample a second, MiB.
    pub rss_mib: Vec<f64>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Per-process usage between two snapshots.
pub fn usage(
    before: &BTreeMap<String, Counters>,
    after: &BTreeMap<String, Counters>,
    samples: &BTreeMap<String, Vec<u64>>,
    confirmed: u64,
) -> Vec<Usage> {
    before
        .iter()
        .filter_map(|(name, b)| {
            let a = after.get(name)?;
            let cpu_s = (a.cpu_s - b.cpu_s).max(0.0);
            Some(Usage {
                name: name.clone(),
                cpu_s,
                cpu_ms_per_order: if confirmed == 0 {
                    0.0
                } else {
                    cpu_s * 1000.0 / confirmed as f64
                },
                idle_rss_mib: b.rss as f64 / MIB,
                peak_rss_mib: a.peak_rss as f64 / MIB,
                end_rss_mib: a.rss as f64 / MIB,
                rss_mib: samples
                    .get(name)
                    .map(|v| v.iter().map(|r| *r as f64 / MIB).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let c = read(std::process::id()).unwrap();
        assert!(c.rss > 0 && c.peak_rss >= c.rss);
        assert!(c.cpu_s >= 0.0);
        assert!(read(u32::MAX).is_none());
    }
}
