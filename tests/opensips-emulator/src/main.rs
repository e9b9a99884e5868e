//! `opensips-emulator`: runs the emulator until SIGTERM/SIGINT. Prints one line
//! `READY mi_udp=ADDR mi_http=ADDR` on stdout once it listens; logs go to stderr (the shm
//! budget's counters among them at exit; `GET /emulator/stats` on mi_http serves them live).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use opensips_emulator::{EmulatorConfig, Version};

/// An OpenSIPS stand-in speaking the real MI and event wire protocols.
#[derive(Parser, Debug)]
#[command(name = "opensips-emulator", version)]
struct Args {
    /// mi_datagram address (UDP), e.g. 127.0.0.1:8080 (port 0: any); off when absent or "off".
    #[arg(long)]
    mi_udp: Option<String>,
    /// mi_http address (POST /mi), e.g. 127.0.0.1:8888 (port 0: any); off when absent or "off".
    #[arg(long)]
    mi_http: Option<String>,
    /// OpenSIPS version to behave like: 3.6 or 4.0.
    #[arg(long, default_value = "3.6")]
    opensips_version: String,
    /// How long answering phones take to answer (ms).
    #[arg(long, default_value_t = 50)]
    answer_delay_ms: u64,
    /// How long `noanswer` rings before 408 (ms).
    #[arg(long, default_value_t = 8000)]
    ring_timeout_ms: u64,
    /// How long `dead` takes to time out (ms).
    #[arg(long, default_value_t = 4000)]
    dead_timeout_ms: u64,
    /// More users whose phones answer (comma separated); like the reference OpenSIPS script,
    /// only alice, bob, cindy and dave answer by default.
    #[arg(long, value_delimiter = ',')]
    extra_phones: Vec<String>,
    /// mi_http's poll step (ms): an asynchronous command's reply (t_uac_dlg) goes out at the
    /// first multiple of it after the command completed, and the single httpd serves nothing
    /// else meanwhile, as OpenSIPS does (0: answer at once, kinder than OpenSIPS).
    #[arg(long, default_value_t = 500)]
    mi_http_poll_ms: u64,
    /// Shared-memory budget: the most t_uac_dlg in flight plus relayed INVITEs ringing at
    /// once; past it MI requests get `500 Internal error` and BYEs fail (0: unlimited).
    #[arg(long, default_value_t = 0)]
    shm_budget: usize,
    /// Trunk gateways that answer (`host:port`, comma separated); calls routed to any other
    /// trunk address time out: a trunk that is down.
    #[arg(long, value_delimiter = ',')]
    trunk_gateways: Vec<String>,
}

fn listener(text: Option<&str>) -> Result<Option<SocketAddr>, String> {
    let Some(text) = text.filter(|t| *t != "off") else {
        return Ok(None);
    };
    text.parse()
        .map(Some)
        .map_err(|e| format!("bad address {text:?}: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    let version = match args.opensips_version.as_str() {
        "3.6" | "3.6.8" => Version::V3_6,
        "4.0" | "4.0.1" => Version::V4_0,
        other => {
            eprintln!("opensips-emulator: unknown version {other:?} (3.6 or 4.0)");
            return ExitCode::FAILURE;
        }
    };
    let (mi_udp, mi_http) = match (
        listener(args.mi_udp.as_deref()),
        listener(args.mi_http.as_deref()),
    ) {
        (Ok(None), Ok(None)) => {
            eprintln!("opensips-emulator: no listener (give --mi-udp and/or --mi-http)");
            return ExitCode::FAILURE;
        }
        (Ok(udp), Ok(http)) => (udp, http),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("opensips-emulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = EmulatorConfig {
        mi_udp,
        mi_http,
        version,
        answer_delay: Duration::from_millis(args.answer_delay_ms),
        ring_timeout: Duration::from_millis(args.ring_timeout_ms),
        dead_timeout: Duration::from_millis(args.dead_timeout_ms),
        extra_phones: args.extra_phones,
        mi_http_poll: Duration::from_millis(args.mi_http_poll_ms),
        shm_budget: args.shm_budget,
        trunk_gateways: args.trunk_gateways,
    };
    let emulator = match opensips_emulator::start(config).await {
        Ok(emulator) => emulator,
        Err(err) => {
            eprintln!("opensips-emulator: cannot listen: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut ready = String::from("READY");
    if let Some(addr) = emulator.mi_udp_addr() {
        ready.push_str(&format!(" mi_udp={addr}"));
    }
    if let Some(addr) = emulator.mi_http_addr() {
        ready.push_str(&format!(" mi_http={addr}"));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{ready}");
    let _ = out.flush();
    drop(out);
    callapi_kit::shutdown::on_signal().cancelled().await;
    let stats = emulator.stats();
    tracing::info!(
        in_flight = stats.in_flight,
        high_water = stats.high_water,
        budget = stats.budget,
        refused = stats.refused,
        "shm budget at exit"
    );
    emulator.shutdown();
    ExitCode::SUCCESS
}
