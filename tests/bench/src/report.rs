//! What the bench tells: the conditions of the run (machine, build, target, limits, load),
//! a table per scenario on stdout as each finishes, and the whole report as JSON.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::scenarios::{CpuShare, CyclesReport, EventsReport, IdleReport, OverheadReport};
use crate::stack::Target;
use crate::stats::Summary;
use crate::system::{self, FileLimit, Machine};

/// The conditions of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Conditions {
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// The machine.
    pub machine: Machine,
    /// `release` or `debug`: how the bench itself was built (the services come from `bin_dir`).
    pub bench_build: &'static str,
    /// Where the service binaries came from.
    pub bin_dir: String,
    /// Where configs and logs went.
    pub work_dir: String,
    /// What was driven: `emulator` or `opensips`.
    pub target: String,
    /// The node's mi_datagram socket, for a real OpenSIPS.
    pub mi: Option<String>,
    /// Emulator settings, when the emulator was used.
    pub emulator: Option<String>,
    /// MI transport of proxy-connector.
    pub mi_transport: &'static str,
    /// Client transport.
    pub client_transport: &'static str,
    /// Seconds per measured run.
    pub duration_s: f64,
    /// The open-files limit.
    pub file_limit: FileLimit,
    /// 1-minute load average before the stack started (other work on the machine shows here).
    pub loadavg_before: Option<f64>,
    /// 1-minute load average at the end.
    pub loadavg_after: Option<f64>,
    /// Anything adjusted.
    pub notes: Vec<String>,
}

impl Conditions {
    /// The conditions of this run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        target: &Target,
        emulator_args: &[String],
        version: &str,
        bin_dir: &Path,
        work_dir: &Path,
        file_limit: FileLimit,
        duration: Duration,
        loadavg_before: Option<f64>,
        notes: Vec<String>,
    ) -> Self {
        let (target_name, mi, emulator) = match target {
            Target::Emulator { .. } => {
                let mut text = format!("OpenSIPS {version} emulator, --answer-delay-ms 0");
                for arg in emulator_args {
                    text.push(' ');
                    text.push_str(arg);
                }
                ("emulator", None, Some(text))
            }
            Target::Real(addr) => ("opensips", Some(format!("udp:{addr}")), None),
        };
        Self {
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine: system::machine(),
            bench_build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            bin_dir: bin_dir.display().to_string(),
            work_dir: work_dir.display().to_string(),
            target: target_name.to_owned(),
            mi,
            emulator,
            mi_transport: "mi_datagram (udp)",
            client_transport: "WebSocket over TCP loopback, TCP_NODELAY",
            duration_s: duration.as_secs_f64(),
            file_limit,
            loadavg_before,
            loadavg_after: None,
            notes,
        }
    }
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Conditions.
    pub conditions: Conditions,
    /// Scenario 3, one entry per round.
    pub idle: Vec<IdleReport>,
    /// Scenario 1, one row per concurrency.
    pub cycles: Vec<CyclesReport>,
    /// Scenario 2, one entry per concurrency.
    pub overhead: Vec<OverheadReport>,
    /// Scenario 4, one row per concurrency.
    pub events: Vec<EventsReport>,
    /// Scenario 5, one row per number of subscribers.
    pub fanout: Vec<crate::scenarios::FanoutReport>,
    /// Processes of the stack that had died by the end (must be empty).
    pub dead_processes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(conditions: Conditions) -> Self {
        Self {
            conditions,
            idle: Vec::new(),
            cycles: Vec::new(),
            overhead: Vec::new(),
            events: Vec::new(),
            fanout: Vec::new(),
            dead_processes: Vec::new(),
        }
    }

    /// Errors of all scenarios, and dead processes.
    pub fn total_errors(&self) -> u64 {
        self.idle.iter().map(|i| i.errors.count).sum::<u64>()
            + self.cycles.iter().map(|c| c.errors.count).sum::<u64>()
            + self.overhead.iter().map(|o| o.errors.count).sum::<u64>()
            + self.events.iter().map(|e| e.errors.count).sum::<u64>()
            + self.dead_processes.len() as u64
    }

    /// Writes the JSON report to `path` (creating its directory).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}

/// `p50 / p99 / max` in ms.
fn lat(s: &Summary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!("{:.2} / {:.2} / {:.1}", s.p50_ms, s.p99_ms, s.max_ms)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn cpu(shares: &[CpuShare]) -> String {
    let short = |name: &str| {
        match name {
            "gateway" => "gw",
            "commands" => "cmd",
            "proxy-connector" => "conn",
            "event-ingest" => "ingest",
            "nats-server" => "nats",
            "opensips-emulator" => "emu",
            "callapi-bench" => "bench",
            other => other,
        }
        .to_owned()
    };
    shares
        .iter()
        .map(|s| format!("{} {:.0}", short(&s.process), s.percent))
        .collect::<Vec<_>>()
        .join(" ")
}

fn errors_text(count: u64, first: &[String]) -> String {
    match first.first() {
        None => count.to_string(),
        Some(message) => format!("{count} (first: {message})"),
    }
}

/// Prints the conditions.
pub fn print_conditions(c: &Conditions) {
    println!("callapi-bench");
    println!(
        "  machine: {} CPUs ({}), {} MiB, Linux {}",
        c.machine.cpus, c.machine.cpu_model, c.machine.memory_mib, c.machine.kernel
    );
    println!("  services from {}", c.bin_dir);
    match (&c.emulator, &c.mi) {
        (Some(emulator), _) => println!("  target: {emulator}; MI over {}", c.mi_transport),
        (None, Some(mi)) => println!(
            "  target: a real OpenSIPS at {mi}; MI over {}",
            c.mi_transport
        ),
        (None, None) => {}
    }
    println!("  clients: {}", c.client_transport);
    println!(
        "  open files: soft limit {} (was {}), hard {}",
        c.file_limit.soft, c.file_limit.soft_before, c.file_limit.hard
    );
    if let Some(load) = c.loadavg_before {
        let warn = if load > 0.5 {
            " (something else is using the CPU: figures may be distorted)"
        } else {
            ""
        };
        println!("  load average before: {load:.2}{warn}");
    }
    for note in &c.notes {
        println!("  note: {note}");
    }
}

/// Prints scenario 3.
pub fn print_idle(i: &IdleReport) {
    println!();
    println!("Idle WebSocket connections");
    println!(
        "  opened {} of {} in {:.2} s ({:.0}/s); {} still open after settling",
        i.opened, i.connections, i.open_s, i.opens_per_s, i.still_open
    );
    println!(
        "  gateway RSS: at start {}, before {}, all open {}, after close {}; {} KiB per connection",
        mib(i.rss_start_kib),
        mib(i.rss_before_kib),
        mib(i.rss_open_kib),
        mib(i.rss_closed_kib),
        i.per_connection_kib
            .map_or("?".into(), |k| format!("{k:.1}"))
    );
    println!("  errors: {}", errors_text(i.errors.count, &i.errors.first));
}

/// Prints the header of scenario 1.
pub fn print_cycles_header() {
    println!();
    println!("CallStart → Ended, CallEnd → Ended cycles (latencies in ms: p50 / p99 / max)");
    println!(
        "  NATS/cyc: NATS messages in + out per cycle; CPU ms/cyc: the four services + nats-server"
    );
    println!(
        "{:>7} {:>9} {:>8} {:>26} {:>26} {:>22} {:>9} {:>10}  errors | CPU % of a core",
        "clients",
        "cycles/s",
        "cycles",
        "CallStart",
        "CallEnd",
        "Started",
        "NATS/cyc",
        "CPU ms/cyc"
    );
}

/// Prints one row of scenario 1.
pub fn print_cycles_row(r: &CyclesReport) {
    println!(
        "{:>7} {:>9.1} {:>8} {:>26} {:>26} {:>22} {:>9} {:>10}  {} | {}",
        r.clients,
        r.cycles_per_s,
        r.cycles,
        lat(&r.call_start),
        lat(&r.call_end),
        lat(&r.started),
        r.nats_msgs_per_cycle
            .map_or("?".into(), |n| format!("{n:.1}")),
        match (r.callapi_cpu_ms_per_cycle, r.nats_cpu_ms_per_cycle) {
            (Some(c), Some(n)) => format!("{c:.2}+{n:.2}"),
            _ => "?".into(),
        },
        errors_text(r.errors.count, &r.errors.first),
        cpu(&r.cpu)
    );
}

/// Prints scenario 2.
pub fn print_overhead(o: &OverheadReport) {
    println!();
    println!(
        "callapi overhead per command, {} concurrent clients (ms; overhead = callapi − direct MI)",
        o.clients
    );
    println!(
        "  {:<58} {:>24} {:>24} {:>10} {:>10}",
        "command", "callapi p50/p99/max", "direct p50/p99/max", "ovh p50", "ovh p99"
    );
    for row in &o.rows {
        println!(
            "  {:<58} {:>24} {:>24} {:>10.2} {:>10.2}",
            row.command,
            lat(&row.callapi),
            lat(&row.direct),
            row.overhead_p50_ms,
            row.overhead_p99_ms
        );
    }
    for phase in &o.phases {
        println!(
            "  phase {:<36} {:>8.1}/s | {}",
            phase.name,
            phase.per_s,
            cpu(&phase.cpu)
        );
    }
    println!("  errors: {}", errors_text(o.errors.count, &o.errors.first));
}

/// Scenario 5's table header.
pub fn print_fanout_header() {
    println!();
    println!(
        "Fan-out: rejected dialogs sent to event-ingest (2 call events each), every event to every subscriber"
    );
    println!(
        "{:>11} {:>9} {:>14} {:>9} {:>11} {:>18} {:>6}  errors | CPU % of a core",
        "subscribers",
        "events",
        "dialogs/s sent",
        "seconds",
        "delivered",
        "delivered events/s",
        "lost"
    );
}

/// One row of scenario 5.
pub fn print_fanout_row(r: &crate::scenarios::FanoutReport) {
    println!(
        "{:>11} {:>9} {:>14.0} {:>9.2} {:>11} {:>18.0} {:>6}  {} | {}",
        r.subscribers,
        r.injected,
        r.offered_dialogs_per_s,
        r.elapsed_s,
        r.delivered,
        r.delivered_per_s,
        r.lost,
        errors_text(r.errors.count, &r.errors.first),
        cpu(&r.cpu)
    );
}

/// Prints the header of scenario 4.
pub fn print_events_header() {
    println!();
    println!(
        "Event rate: CallHold/CallUnHold loops, one call per client; 10 more clients follow the call events (Subscribe)"
    );
    println!(
        "{:>7} {:>10} {:>16} {:>16} {:>26} {:>9} {:>16}  errors | CPU % of a core",
        "clients",
        "commands/s",
        "client events/s",
        "node events/s",
        "hold/unhold ms",
        "NATS/cmd",
        "fan-out events/s"
    );
}

/// Prints one row of scenario 4.
pub fn print_events_row(r: &EventsReport) {
    println!(
        "{:>7} {:>10.1} {:>16.1} {:>16.1} {:>26} {:>9} {:>16}  {} | {}",
        r.clients,
        r.commands as f64 / r.elapsed_s.max(1e-9),
        r.client_events_per_s,
        r.node_events_per_s,
        lat(&r.latency),
        r.nats_msgs_per_command
            .map_or("?".into(), |n| format!("{n:.1}")),
        format!("{:.0} ({} lost)", r.fanout_events_per_s, r.fanout_lost),
        errors_text(r.errors.count, &r.errors.first),
        cpu(&r.cpu)
    );
}

/// Prints the closing lines.
pub fn print_summary(r: &Report) {
    println!();
    if !r.dead_processes.is_empty() {
        println!("processes that died: {}", r.dead_processes.join(", "));
    }
    if let Some(load) = r.conditions.loadavg_after {
        println!("load average after: {load:.2}");
    }
    println!("errors in all: {}", r.total_errors());
}
