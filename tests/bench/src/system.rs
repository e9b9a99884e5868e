//! What the machine says about itself and about the stack's processes, from `/proc`: resident
//! memory and CPU time per process (to see which process limits a figure), load average (to
//! spot a concurrent build distorting a run), the machine's description, and the open-files
//! limit that 10,000 connections need.

use std::time::Duration;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Resident set size of `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kib(&status, "VmRSS:")
}

/// The value in kB of the line starting with `key` in a `/proc` status-like text.
fn parse_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU time (user + system) `pid` used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu(&stat)
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15, after the `(comm)`).
fn parse_cpu(stat: &str) -> Option<Duration> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SEC,
    ))
}

/// CPU time the whole machine spent busy (all CPUs, `/proc/stat`: everything but idle and
/// iowait).
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_busy(&stat)
}

fn parse_busy(stat: &str) -> Option<Duration> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq (guest time is already in user; steal is the
    // hypervisor's, not this machine's work).
    let busy = ticks
        .iter()
        .take(7)
        .sum::<u64>()
        .saturating_sub(*ticks.get(3)?)
        .saturating_sub(*ticks.get(4)?);
    Some(Duration::from_secs_f64(busy as f64 / TICKS_PER_SEC))
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs usable by this process.
    pub cpus: usize,
    /// `model name` of the first CPU.
    pub cpu_model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
}

/// Describes this machine.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        memory_mib: parse_kib(&meminfo, "MemTotal:").unwrap_or_default() / 1024,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// The open-files limit before and after the bench raised it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FileLimit {
    /// Soft limit found.
    pub soft_before: u64,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit now (the children inherit it).
    pub soft: u64,
}

/// Raises the soft open-files limit to the hard one.
pub fn raise_file_limit() -> std::io::Result<FileLimit> {
    let (soft_before, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(FileLimit {
        soft_before,
        hard,
        soft,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_cpu_of_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        assert!(cpu_time(pid).is_some());
        assert!(rss_kib(u32::MAX).is_none());
    }

    #[test]
    fn parses_proc_formats() {
        let status = "Name:\tgateway\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\n";
        assert_eq!(parse_kib(status, "VmRSS:"), Some(12345));
        assert_eq!(parse_kib(status, "VmSwap:"), None);
        // A command name with spaces and parentheses must not shift the fields.
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu(stat), Some(Duration::from_secs(3)));
        assert_eq!(parse_cpu("garbage"), None);
        let stat = "cpu  100 5 50 1000 20 3 2 10 0 0\ncpu0 50 2 25 500 10 1 1 5 0 0\n";
        assert_eq!(parse_busy(stat), Some(Duration::from_secs_f64(1.6)));
        assert_eq!(parse_busy("intr 1 2 3"), None);
    }
}
