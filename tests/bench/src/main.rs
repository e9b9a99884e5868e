//! `callapi-bench` (`make bench`): starts a callapi stack of release binaries (nats-server, the
//! OpenSIPS emulator with instant phones or a real OpenSIPS named by `--mi`, the four services),
//! drives it only through its WebSocket JSON-RPC API as clients would, and prints a table and
//! writes a JSON file of what it measured: CallStart/CallEnd cycles per second and latencies at
//! several concurrencies, callapi's own overhead per command, idle connections and gateway
//! memory, and the event rate to clients. Not a test: it asserts nothing, it reports.

mod client;
mod error;
mod mi;
mod report;
mod scenarios;
mod stack;
mod stats;
mod system;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::error::BenchError;
use crate::report::{Conditions, Report};
use crate::scenarios::Settings;
use crate::stack::{Stack, StackConfig, Target};

/// Load generator for a callapi stack; see docs/performance.md.
#[derive(Parser, Debug, Clone)]
#[command(name = "callapi-bench", version)]
struct Args {
    /// Seconds each measured run lasts.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// A short smoke run: 1 s runs, 1,000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Concurrent clients of the CallStart/CallEnd cycle runs (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    clients: Vec<usize>,
    /// Concurrent clients of the overhead runs (comma separated; 1 shows the floor, 10 is the
    /// issue's reference load).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    overhead_clients: Vec<usize>,
    /// Idle WebSocket connections to open (0: skip).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// How many times to open and close the idle connections (a second round shows whether
    /// the memory kept after the first is reused).
    #[arg(long, default_value_t = 2)]
    idle_rounds: usize,
    /// Concurrent clients of the hold/unhold event-rate runs (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    event_clients: Vec<usize>,
    /// Which scenarios to run (comma separated): idle, cycles, overhead, events, fanout.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,cycles,overhead,events,fanout"
    )]
    only: Vec<String>,
    /// Fan-out runs (comma separated), each `SUBSCRIBERS:DIALOGS_PER_SECOND`: that many
    /// clients follow the call events while rejected dialogs (two call events each) are sent
    /// to event-ingest at that rate (the bench's own clients share the host: keep
    /// subscribers × rate × 2 within what they can read).
    #[arg(long, value_delimiter = ',', default_value = "10:10000,100:1000", value_parser = parse_fanout_run)]
    fanout_runs: Vec<(usize, u64)>,
    /// Rejected dialogs sent per fan-out run.
    #[arg(long, default_value_t = 10_000)]
    fanout_dialogs: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench.json")]
    output: PathBuf,
    /// Longest wait for any one command or MI request before it counts as an error (ms).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// How long to let the gateway's memory settle before reading it (ms).
    #[arg(long, default_value_t = 1_000)]
    settle_ms: u64,
    /// A real OpenSIPS's mi_datagram socket, `udp:HOST:PORT`: no emulator is started.
    #[arg(long)]
    mi: Option<String>,
    /// OpenSIPS version the emulator behaves like (3.6 or 4.0).
    #[arg(long, default_value = "3.6")]
    opensips_version: String,
    /// An extra emulator argument (repeatable, e.g. `--emulator-arg=--shm-budget=1000`).
    #[arg(long, allow_hyphen_values = true)]
    emulator_arg: Vec<String>,
    /// CallStart's caller.
    #[arg(long, default_value = "sip:alice@127.0.0.1")]
    caller: String,
    /// CallStart's callee.
    #[arg(long, default_value = "sip:bob@127.0.0.1")]
    callee: String,
    /// Where event-ingest listens for the node's events.
    #[arg(long, default_value = "127.0.0.1:0")]
    ingest_listen: String,
    /// event-ingest's `advertise` (the socket OpenSIPS is told, `udp:IP:PORT`).
    #[arg(long)]
    ingest_advertise: Option<String>,
    /// event-ingest's `senders` (comma separated IPs or CIDR prefixes OpenSIPS sends from).
    #[arg(long, value_delimiter = ',')]
    ingest_senders: Vec<String>,
    /// Where the bench's own event socket listens (overhead and event-rate runs).
    #[arg(long, default_value = "127.0.0.1:0")]
    tap_listen: String,
    /// The socket OpenSIPS is told for the bench's own event socket (`udp:IP:PORT`).
    #[arg(long)]
    tap_advertise: Option<String>,
    /// An extra line for proxy-connector's `[[nodes]]` entry (repeatable, e.g. `max_in_flight = 64`).
    #[arg(long)]
    connector_node_toml: Vec<String>,
    /// An extra environment variable of the services, `NAME=VALUE`, or of one of them,
    /// `SERVICE:NAME=VALUE` (e.g. `gateway:TOKIO_WORKER_THREADS=1`); repeatable.
    #[arg(long)]
    service_env: Vec<String>,
    /// The gateway's worker threads (its `TOKIO_WORKER_THREADS`): 1, as on any host that runs
    /// the whole stack (`make run` too); 0 for the binary's own default, one per core.
    /// `--service-env` naming the variable wins.
    #[arg(long, default_value_t = 1)]
    gateway_workers: usize,
    /// RUST_LOG of the services.
    #[arg(long, default_value = "info")]
    service_log: String,
    /// Directory of the service binaries (default: this program's own directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The nats-server program.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server: String,
    /// Where configs and logs go (default: a fresh temporary directory, removed unless errors).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// `udp:HOST:PORT` → the socket address.
fn parse_mi(text: &str) -> Result<SocketAddr, String> {
    let Some(rest) = text.strip_prefix("udp:") else {
        return Err(format!(
            "--mi {text:?}: only mi_datagram is supported, as udp:HOST:PORT"
        ));
    };
    rest.to_socket_addrs()
        .map_err(|err| format!("--mi {text:?}: {err}"))?
        .next()
        .ok_or_else(|| format!("--mi {text:?}: no address"))
}

/// `NAME=VALUE` → the pair.
fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("--service-env {text:?}: expected NAME=VALUE"))
}

const SCENARIOS: [&str; 5] = ["idle", "cycles", "overhead", "events", "fanout"];
/// Longest run asked for (a day): keeps every deadline computation far from overflow.
const MAX_DURATION_SECS: f64 = 86_400.0;
/// Longest timeout or settle time (an hour).
const MAX_WAIT_MS: u64 = 3_600_000;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.duration_secs = 1.0;
        args.idle_connections = args.idle_connections.min(1_000);
    }
    match run(args).await {
        Ok(report) if report.total_errors() == 0 => ExitCode::SUCCESS,
        Ok(report) => {
            eprintln!(
                "callapi-bench: {} errors (see the report); logs kept in {}",
                report.total_errors(),
                report.conditions.work_dir
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("callapi-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Report, BenchError> {
    if let Some(unknown) = args.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(BenchError::Usage(format!(
            "--only: unknown scenario {unknown:?} (one of {})",
            SCENARIOS.join(", ")
        )));
    }
    if !(args.duration_secs > 0.0 && args.duration_secs <= MAX_DURATION_SECS) {
        return Err(BenchError::Usage(format!(
            "--duration-secs must be > 0 and at most {MAX_DURATION_SECS}"
        )));
    }
    if !(1..=MAX_WAIT_MS).contains(&args.timeout_ms) || args.settle_ms > MAX_WAIT_MS {
        return Err(BenchError::Usage(format!(
            "--timeout-ms must be 1..={MAX_WAIT_MS} and --settle-ms at most {MAX_WAIT_MS}"
        )));
    }
    let wants = |name: &str| args.only.iter().any(|s| s == name);
    let duration = Duration::from_secs_f64(args.duration_secs);
    let target = match &args.mi {
        Some(mi) => Target::Real(parse_mi(mi).map_err(BenchError::Usage)?),
        None => Target::Emulator {
            version: args.opensips_version.clone(),
            args: args.emulator_arg.clone(),
        },
    };
    let mut service_env = args
        .service_env
        .iter()
        .map(|e| parse_env(e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(BenchError::Usage)?;
    let workers_given = service_env
        .iter()
        .any(|(name, _)| name == "TOKIO_WORKER_THREADS" || name == "gateway:TOKIO_WORKER_THREADS");
    if args.gateway_workers > 0 && !workers_given {
        service_env.push((
            "gateway:TOKIO_WORKER_THREADS".to_owned(),
            args.gateway_workers.to_string(),
        ));
    }
    let limit = system::raise_file_limit()?;
    let mut idle_connections = args.idle_connections;
    // The bench holds the client side of every connection, plus some for everything else.
    let room = usize::try_from(limit.soft.saturating_sub(1_000)).unwrap_or(usize::MAX);
    let mut notes = Vec::new();
    notes.push(
        match service_env
            .iter()
            .find(|(name, _)| name.ends_with("TOKIO_WORKER_THREADS"))
        {
            Some((name, value)) => format!("{name}={value}"),
            None => "every service with its own default worker threads".to_owned(),
        },
    );
    if wants("idle") && idle_connections > room {
        notes.push(format!(
            "open-files limit {} (hard {}): idle connections cut from {idle_connections} to {room}",
            limit.soft, limit.hard
        ));
        idle_connections = room;
    }
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| BenchError::Usage("cannot tell this program's directory".into()))?,
    };
    let (work_dir, temporary) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("callapi-bench-{}", uuid::Uuid::new_v4().simple())),
            true,
        ),
    };
    let config = StackConfig {
        bin_dir: bin_dir.clone(),
        nats_server: args.nats_server.clone(),
        dir: work_dir.clone(),
        target: target.clone(),
        ingest_listen: args.ingest_listen.clone(),
        ingest_advertise: args.ingest_advertise.clone(),
        ingest_senders: args.ingest_senders.clone(),
        connector_node_toml: args.connector_node_toml.clone(),
        service_log: args.service_log.clone(),
        service_env,
    };
    let loadavg_before = system::loadavg();
    let conditions = Conditions::new(
        &target,
        &args.emulator_arg,
        &args.opensips_version,
        &bin_dir,
        &work_dir,
        limit,
        duration,
        loadavg_before,
        notes,
    );
    report::print_conditions(&conditions);
    println!("starting the stack…");
    let mut stack = Stack::start(&config).await?;
    let rss_start = stack.gateway.pid().and_then(system::rss_kib);
    let pids: Vec<String> = stack
        .procs()
        .iter()
        .map(|p| format!("{} {}", p.name, p.pid().unwrap_or_default()))
        .collect();
    println!(
        "stack up (pids: {}); logs in {}",
        pids.join(", "),
        work_dir.display()
    );
    let settings = Settings {
        url: stack.url.clone(),
        mi: stack.mi,
        timeout: Duration::from_millis(args.timeout_ms),
        caller: args.caller.clone(),
        callee: args.callee.clone(),
        tap_listen: args.tap_listen.clone(),
        tap_advertise: args.tap_advertise.clone(),
        settle: Duration::from_millis(args.settle_ms),
    };
    let mut report = Report::new(conditions);
    if wants("idle") && idle_connections > 0 {
        for round in 1..=args.idle_rounds {
            println!("idle: {idle_connections} connections, round {round}…");
            let idle = scenarios::idle(&stack, &settings, idle_connections, rss_start).await;
            report::print_idle(&idle);
            report.idle.push(idle);
        }
    }
    if wants("cycles") {
        report::print_cycles_header();
        for &clients in &args.clients {
            let row = scenarios::cycles(&stack, &settings, clients, duration).await;
            report::print_cycles_row(&row);
            report.cycles.push(row);
        }
    }
    if wants("overhead") {
        for &clients in args.overhead_clients.iter().filter(|c| **c > 0) {
            println!(
                "overhead: {clients} clients, 4 phases of {:.1} s…",
                duration.as_secs_f64()
            );
            let overhead = scenarios::overhead(&stack, &settings, clients, duration).await;
            report::print_overhead(&overhead);
            report.overhead.push(overhead);
        }
    }
    if wants("events") {
        report::print_events_header();
        for &clients in &args.event_clients {
            let row = scenarios::events(&stack, &settings, clients, duration).await;
            report::print_events_row(&row);
            report.events.push(row);
        }
    }
    if wants("fanout") {
        report::print_fanout_header();
        for &(subscribers, rate) in &args.fanout_runs {
            let row =
                scenarios::fanout(&stack, &settings, subscribers, args.fanout_dialogs, rate).await;
            report::print_fanout_row(&row);
            report.fanout.push(row);
        }
    }
    report.dead_processes = stack.dead();
    report.conditions.loadavg_after = system::loadavg();
    stack.stop().await;
    report::print_summary(&report);
    report.write(&args.output)?;
    println!("report written to {}", args.output.display());
    if temporary && report.total_errors() == 0 {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(report)
}

/// One fan-out run, `SUBSCRIBERS:DIALOGS_PER_SECOND`.
fn parse_fanout_run(text: &str) -> Result<(usize, u64), String> {
    let (subscribers, rate) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected SUBSCRIBERS:DIALOGS_PER_SECOND"))?;
    let subscribers: usize = subscribers
        .parse()
        .map_err(|_| format!("{text:?}: subscribers must be a number"))?;
    let rate: u64 = rate
        .parse()
        .map_err(|_| format!("{text:?}: the rate must be a number"))?;
    if subscribers == 0 || rate == 0 {
        return Err(format!("{text:?}: both must be above 0"));
    }
    Ok((subscribers, rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_runs_are_subscribers_colon_rate() {
        assert_eq!(parse_fanout_run("10:10000"), Ok((10, 10_000)));
        assert!(parse_fanout_run("10").is_err());
        assert!(parse_fanout_run("0:5").is_err());
        assert!(parse_fanout_run("x:5").is_err());
    }

    #[test]
    fn mi_endpoints_must_be_udp() {
        assert_eq!(
            parse_mi("udp:127.0.0.1:8080"),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        assert!(parse_mi("http://127.0.0.1:8888/mi").is_err());
        assert!(parse_mi("udp:127.0.0.1").is_err());
        assert!(parse_mi("udp:127.0.0.1:99999").is_err());
    }

    #[test]
    fn service_env_is_name_equals_value() {
        assert_eq!(
            parse_env("CALLAPI_X=1=2"),
            Ok(("CALLAPI_X".to_owned(), "1=2".to_owned()))
        );
        assert!(parse_env("=1").is_err());
        assert!(parse_env("CALLAPI_X").is_err());
    }

    #[tokio::test]
    async fn impossible_durations_are_refused_before_anything_starts() {
        for args in [
            ["callapi-bench", "--duration-secs", "0"],
            ["callapi-bench", "--duration-secs", "1e300"],
            ["callapi-bench", "--duration-secs", "NaN"],
            ["callapi-bench", "--timeout-ms", "18446744073709551615"],
            ["callapi-bench", "--settle-ms", "18446744073709551615"],
            ["callapi-bench", "--only", "everything"],
        ] {
            let result = run(Args::parse_from(args)).await;
            assert!(
                matches!(result, Err(BenchError::Usage(_))),
                "{args:?}: {:?}",
                result.err()
            );
        }
    }

    #[test]
    fn defaults_are_the_documented_runs() {
        let args = Args::parse_from(["callapi-bench"]);
        assert_eq!(args.clients, [1, 10, 100, 1000]);
        assert_eq!(args.idle_connections, 10_000);
        assert_eq!(args.overhead_clients, [1, 10]);
        assert_eq!(args.output, PathBuf::from("target/bench/bench.json"));
        let args = Args::parse_from(["callapi-bench", "--emulator-arg", "--shm-budget=10"]);
        assert_eq!(args.emulator_arg, ["--shm-budget=10"]);
    }
}
