//! What the harness learns about processes, disks and the machine from `/proc` and `statvfs`.
//!
//! Read-only, except [`reset_peak_rss`], which clears a process's `VmHWM` (it only affects what
//! `/proc` reports), and [`raise_nofile`], which raises this process's own descriptor limit.

use anyhow::Context;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// `USER_HZ`: the unit of the CPU times in `/proc/PID/stat`, 100 on every Linux ABI.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {field} in /proc/{pid}/status"),
            )
        })
}

/// Resident memory, KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Resets the process's peak resident memory (`VmHWM`) to its current value
/// (`echo 5 > /proc/PID/clear_refs`, Linux 4.0+).
pub fn reset_peak_rss(pid: u32) -> io::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// User plus system CPU time the process has used so far. Also readable for a zombie, so a child
/// can be measured after it exits and before it is reaped.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // `after_name` starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |index: usize| -> io::Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / CLOCK_TICKS_PER_SECOND))
}

/// Time the (single-threaded) process has spent on a CPU, to the nanosecond: the first field
/// of `/proc/PID/schedstat`, readable until the process is reaped.
pub fn on_cpu(pid: u32) -> anyhow::Result<Duration> {
    let schedstat = fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    let nanos = schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .context("malformed /proc/PID/schedstat")?;
    Ok(Duration::from_nanos(nanos))
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `D`, `Z`…).
pub fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// `Threads:` of `/proc/PID/status` (not a `kB` field).
pub fn thread_count(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:")?.trim().parse().ok())
        .context("no Threads: in /proc/PID/status")
}

/// Descriptors the process has open (`/proc/PID/fd`).
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Waits until the child `pid` has exited, without reaping it, so that its CPU times are still
/// readable in `/proc`.
pub fn wait_exited_unreaped(pid: u32) -> anyhow::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .context("bad pid")?;
    rustix::process::waitid(
        rustix::process::WaitId::Pid(pid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )?;
    Ok(())
}

/// Raises this process's RLIMIT_NOFILE to its hard limit (a daemon it starts inherits the hard
/// limit and raises its own): the hard limit. Thousands of guests hold more descriptors than
/// the default soft limit.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        eprintln!("cannot raise RLIMIT_NOFILE to its hard limit: {e}");
    }
    let limit = getrlimit(Resource::Nofile);
    limit.current.unwrap_or(u64::MAX)
}

/// The process's command name (`/proc/PID/comm`).
pub fn command_name(pid: u32) -> io::Result<String> {
    Ok(fs::read_to_string(format!("/proc/{pid}/comm"))?
        .trim_end()
        .to_owned())
}

/// The machine's CPU time so far, all CPUs together (`cpu` line of `/proc/stat`), in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineCpu {
    total: u64,
    idle: u64,
    iowait: u64,
    steal: u64,
}

/// Shares of the machine's CPU time over an interval, 0 to 1.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuShares {
    /// Idle with nothing to wait for: nobody had work for that CPU.
    pub idle: f64,
    /// Idle while a task waited for block I/O (synchronous disk work on the measured path).
    pub iowait: f64,
    /// Taken by the hypervisor for other guests (a noisy host).
    pub steal: f64,
}

impl MachineCpu {
    pub fn read() -> Self {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already counted in user.
        Self {
            total: ticks.iter().take(8).sum(),
            idle: ticks.get(3).copied().unwrap_or(0),
            iowait: ticks.get(4).copied().unwrap_or(0),
            steal: ticks.get(7).copied().unwrap_or(0),
        }
    }

    /// How the machine's CPU time was spent since `earlier`.
    pub fn since(&self, earlier: &Self) -> CpuShares {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return CpuShares::default();
        }
        let share = |now: u64, then: u64| now.saturating_sub(then) as f64 / total as f64;
        CpuShares {
            idle: share(self.idle, earlier.idle),
            iowait: share(self.iowait, earlier.iowait),
            steal: share(self.steal, earlier.steal),
        }
    }
}

/// Samples a process's resident memory on a thread and remembers the highest value seen.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl RssSampler {
    /// Starts sampling `pid` every `interval`.
    pub fn start(pid: u32, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A process that has exited has no VmRSS; its last sample stands.
                    if let Ok(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    thread::sleep(interval);
                }
            })
        };
        Self { stop, peak, thread }
    }

    /// Stops sampling; the highest resident memory seen, KiB (0 if never read).
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Bytes an unprivileged user may still write on the file system holding `path`.
pub fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let stat =
        rustix::fs::statvfs(path).with_context(|| format!("cannot statvfs {}", path.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The file system holding `path` and its mount options, `ext4 (/dev/vda on /; rw,discard)`,
/// from the longest matching mount point in `/proc/self/mounts` (options such as `discard`
/// change what deleting and replacing files costs).
pub fn filesystem(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount_point, kind, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            // Spaces in mount points are written \040.
            let mount_point = mount_point.replace("\\040", " ");
            path.starts_with(&mount_point).then(|| {
                (
                    mount_point.len(),
                    format!("{kind} ({device} on {mount_point}; {options})"),
                )
            })
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, text)| text)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Facts about the machine worth printing next to every figure.
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| release.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let memory_kib: u64 = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|line| {
                line.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        Self {
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel,
            memory_gib: memory_kib as f64 / (1 << 20) as f64,
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs ({}), {:.0} GiB RAM, Linux {}",
            self.cpus, self.cpu_model, self.memory_gib, self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        cpu_time(pid).unwrap();
        assert!(!command_name(pid).unwrap().is_empty());
        assert_ne!(filesystem(Path::new("/")), "unknown");
        on_cpu(pid).unwrap();
        // The main thread's state: running, or sleeping while the tests run on others.
        assert!(matches!(state(pid), Some('R' | 'S')));
        assert!(thread_count(pid).unwrap() >= 1);
        assert!(open_fds(pid).unwrap() >= 3);
    }
}
