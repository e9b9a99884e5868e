//! The four measurements, each driving the stack only as clients would (WebSocket JSON-RPC),
//! plus direct MI to the node as the yardstick for callapi's own overhead:
//! 1. [`cycles`]: CallStart → `Ended` → CallEnd of the new call → `Ended`, in a loop per client;
//! 2. [`overhead`]: the same commands against the same MI work done directly over mi_datagram;
//! 3. [`idle`]: many idle WebSocket connections and the gateway's memory;
//! 4. [`events`]: CallHold/CallUnHold loops, counting the events that reach the clients.
//!
//! Errors are counted (with the first messages kept), never unwrapped: a figure with errors is
//! reported as such.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::WsClient;
use crate::error::{BenchError, Result};
use crate::mi::{EventTap, MiClient};
use crate::stack::{NatsCounters, Stack};
use crate::stats::{Errors, Samples, Summary};
use crate::system;

/// SDP offer of the first INVITE, as the commands service sends it.
const OFFER: &str = "v=0\r\no=click-to-dial 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
/// Connections opened at once.
const CONNECT_CONCURRENCY: usize = 256;

/// What every scenario needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The gateway's WebSocket URL.
    pub url: String,
    /// The node's mi_datagram socket.
    pub mi: SocketAddr,
    /// How long any one command or MI request may take before it counts as an error.
    pub timeout: Duration,
    /// CallStart's `caller`.
    pub caller: String,
    /// CallStart's `callee`.
    pub callee: String,
    /// Where the bench's own event socket listens.
    pub tap_listen: String,
    /// The socket OpenSIPS is told for it (default: the bound one).
    pub tap_advertise: Option<String>,
    /// How long to let memory settle before reading it.
    pub settle: Duration,
}

/// CPU used by one process during a run, in % of one core.
#[derive(Debug, Clone, Serialize)]
pub struct CpuShare {
    /// The process.
    pub process: String,
    /// CPU time / wall time × 100.
    pub percent: f64,
}

/// Measures the CPU each process of the stack (and the bench) uses over a run, and what the
/// rest of the machine used meanwhile (`others`: a concurrent build shows there).
struct CpuMeter {
    started: Instant,
    before: Vec<(String, u32, Duration)>,
    machine_before: Option<Duration>,
}

impl CpuMeter {
    fn begin(stack: &Stack) -> Self {
        let mut before = Vec::new();
        let mut procs: Vec<(String, u32)> = stack
            .procs()
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.pid()?)))
            .collect();
        procs.push(("callapi-bench".into(), std::process::id()));
        for (name, pid) in procs {
            if let Some(cpu) = system::cpu_time(pid) {
                before.push((name, pid, cpu));
            }
        }
        Self {
            started: Instant::now(),
            before,
            machine_before: system::machine_busy(),
        }
    }

    fn end(self) -> Vec<CpuShare> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let percent = |used: Duration| (used.as_secs_f64() / wall * 1000.0).round() / 10.0;
        let mut ours = Duration::ZERO;
        let mut shares: Vec<CpuShare> = self
            .before
            .into_iter()
            .filter_map(|(process, pid, before)| {
                let used = system::cpu_time(pid)?.saturating_sub(before);
                ours += used;
                Some(CpuShare {
                    process,
                    percent: percent(used),
                })
            })
            .collect();
        if let (Some(before), Some(after)) = (self.machine_before, system::machine_busy()) {
            shares.push(CpuShare {
                process: "others".into(),
                percent: percent(after.saturating_sub(before).saturating_sub(ours)),
            });
        }
        shares
    }
}

/// Whether the connection is unusable after `err` (so the client must reconnect).
fn breaks_connection(err: &BenchError) -> bool {
    matches!(
        err,
        BenchError::Closed | BenchError::Ws(_) | BenchError::Io(_)
    )
}

/// Opens `count` connections named `prefix-N`, at most [`CONNECT_CONCURRENCY`] at once.
async fn connect_many(
    settings: &Settings,
    prefix: &str,
    count: usize,
    small_buffers: bool,
    errors: &mut Errors,
) -> Vec<WsClient> {
    let results: Vec<Result<WsClient>> = futures::stream::iter(0..count)
        .map(|i| {
            WsClient::connect(
                &settings.url,
                format!("{prefix}-{i}"),
                settings.timeout,
                small_buffers,
            )
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut clients = Vec::with_capacity(count);
    for result in results {
        match result {
            Ok(client) => clients.push(client),
            Err(err) => errors.record(format!("connect: {err}")),
        }
    }
    clients
}

/// What one client task measured.
#[derive(Default)]
struct Tally {
    cycles: u64,
    call_start: Samples,
    call_end: Samples,
    started: Samples,
    events: u64,
    errors: Errors,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.cycles += other.cycles;
        self.call_start.merge(other.call_start);
        self.call_end.merge(other.call_end);
        self.started.merge(other.started);
        self.events += other.events;
        self.errors.merge(other.errors);
    }
}

async fn join_all(handles: Vec<JoinHandle<Tally>>) -> Tally {
    let mut total = Tally::default();
    for handle in handles {
        match handle.await {
            Ok(tally) => total.merge(tally),
            Err(err) => total.errors.record(format!("client task failed: {err}")),
        }
    }
    total
}

/// Runs `method` on `client`; reconnects it after a broken connection. `Err` only when the
/// client cannot go on (no reconnection possible).
async fn run_or_reconnect(
    client: &mut WsClient,
    settings: &Settings,
    name: &str,
    method: &str,
    params: Value,
    errors: &mut Errors,
) -> std::result::Result<Option<crate::client::Outcome>, ()> {
    match client.run(method, params, settings.timeout).await {
        Ok(outcome) => Ok(Some(outcome)),
        Err(err) => {
            errors.record(format!("{method}: {err}"));
            if breaks_connection(&err) {
                match WsClient::connect(&settings.url, name.to_owned(), settings.timeout, false)
                    .await
                {
                    Ok(fresh) => *client = fresh,
                    Err(err) => {
                        errors.record(format!("reconnect: {err}"));
                        return Err(());
                    }
                }
            }
            Ok(None)
        }
    }
}

/// Scenario 1 at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct CyclesReport {
    /// Concurrent clients asked for.
    pub clients: usize,
    /// Clients that connected.
    pub connected: usize,
    /// From the first request to the last cycle's end.
    pub elapsed_s: f64,
    /// Complete cycles (CallStart and CallEnd both without error).
    pub cycles: u64,
    /// Cycles per second.
    pub cycles_per_s: f64,
    /// CallStart: request → `Ended`.
    pub call_start: Summary,
    /// CallEnd: request → `Ended`.
    pub call_end: Summary,
    /// Any command: request → `Started`.
    pub started: Summary,
    /// Errors (must be 0).
    pub errors: Errors,
    /// CPU per process during the run.
    pub cpu: Vec<CpuShare>,
    /// NATS messages and bytes during the run.
    pub nats: Option<NatsCounters>,
    /// NATS messages (in + out) per cycle.
    pub nats_msgs_per_cycle: Option<f64>,
    /// CPU time per cycle of the four callapi services together, ms.
    pub callapi_cpu_ms_per_cycle: Option<f64>,
    /// CPU time per cycle of nats-server, ms.
    pub nats_cpu_ms_per_cycle: Option<f64>,
    /// 1-minute load average after the run.
    pub loadavg: Option<f64>,
}

/// The four callapi services.
const SERVICES: [&str; 4] = ["gateway", "commands", "proxy-connector", "event-ingest"];

/// CPU milliseconds per unit of work of the processes `names`, from their shares of a run.
fn cpu_ms_per(shares: &[CpuShare], names: &[&str], elapsed: Duration, units: u64) -> Option<f64> {
    if units == 0 {
        return None;
    }
    let percent: f64 = shares
        .iter()
        .filter(|s| names.contains(&s.process.as_str()))
        .map(|s| s.percent)
        .sum();
    let ms = percent / 100.0 * elapsed.as_secs_f64() * 1000.0 / units as f64;
    Some((ms * 1000.0).round() / 1000.0)
}

/// NATS traffic between two readings, and messages (in + out) per unit of work.
async fn nats_since(
    stack: &Stack,
    before: Option<NatsCounters>,
    units: u64,
) -> (Option<NatsCounters>, Option<f64>) {
    let delta = match (before, stack.nats_counters().await) {
        (Some(before), Some(after)) => Some(after.since(&before)),
        _ => None,
    };
    let per_unit = delta
        .filter(|_| units > 0)
        .map(|d| ((d.in_msgs + d.out_msgs) as f64 / units as f64 * 10.0).round() / 10.0);
    (delta, per_unit)
}

/// Scenario 1: `clients` connections each running CallStart → CallEnd cycles for `duration`.
pub async fn cycles(
    stack: &Stack,
    settings: &Settings,
    clients: usize,
    duration: Duration,
) -> CyclesReport {
    let mut errors = Errors::default();
    let prefix = format!("cycle{clients}");
    let connections = connect_many(settings, &prefix, clients, false, &mut errors).await;
    let connected = connections.len();
    let nats_before = stack.nats_counters().await;
    let meter = CpuMeter::begin(stack);
    let start = Instant::now();
    let end = start + duration;
    let handles: Vec<JoinHandle<Tally>> = connections
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let settings = settings.clone();
            let name = format!("{prefix}-r{i}");
            tokio::spawn(cycle_loop(client, settings, name, end))
        })
        .collect();
    let mut tally = join_all(handles).await;
    let elapsed = start.elapsed();
    let cpu = meter.end();
    let (nats, nats_msgs_per_cycle) = nats_since(stack, nats_before, tally.cycles).await;
    errors.merge(std::mem::take(&mut tally.errors));
    let callapi_cpu_ms_per_cycle = cpu_ms_per(&cpu, &SERVICES, elapsed, tally.cycles);
    let nats_cpu_ms_per_cycle = cpu_ms_per(&cpu, &["nats-server"], elapsed, tally.cycles);
    CyclesReport {
        clients,
        connected,
        elapsed_s: elapsed.as_secs_f64(),
        cycles: tally.cycles,
        cycles_per_s: tally.cycles as f64 / elapsed.as_secs_f64().max(1e-9),
        call_start: tally.call_start.summary(),
        call_end: tally.call_end.summary(),
        started: tally.started.summary(),
        errors,
        cpu,
        callapi_cpu_ms_per_cycle,
        nats_cpu_ms_per_cycle,
        nats,
        nats_msgs_per_cycle,
        loadavg: system::loadavg(),
    }
}

async fn cycle_loop(mut client: WsClient, settings: Settings, name: String, end: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < end {
        let start = json!({"caller": settings.caller, "callee": settings.callee});
        let Ok(outcome) = run_or_reconnect(
            &mut client,
            &settings,
            &name,
            "CallStart",
            start,
            &mut t.errors,
        )
        .await
        else {
            break;
        };
        let Some(start) = outcome else { continue };
        let callid = start.callid_of("CALL_START").map(str::to_owned);
        match &start.error {
            Some((code, message)) => t.errors.record(format!("CallStart: {code}: {message}")),
            None if callid.is_none() => t.errors.record("CallStart ended without CALL_START"),
            None => {
                t.call_start.push(start.ended);
                t.started.push(start.started);
            }
        }
        // A call that started is ended even after an error, so calls do not pile up.
        let Some(callid) = callid else { continue };
        let params = json!({"callid": callid});
        let Ok(outcome) = run_or_reconnect(
            &mut client,
            &settings,
            &name,
            "CallEnd",
            params,
            &mut t.errors,
        )
        .await
        else {
            break;
        };
        let Some(end_outcome) = outcome else { continue };
        match end_outcome.error {
            Some((code, message)) => t.errors.record(format!("CallEnd: {code}: {message}")),
            None => {
                t.call_end.push(end_outcome.ended);
                t.started.push(end_outcome.started);
                if start.error.is_none() {
                    t.cycles += 1;
                }
            }
        }
    }
    client.close(Duration::from_secs(2)).await;
    t
}

/// One command compared with the same MI work done directly.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadRow {
    /// What was measured.
    pub command: &'static str,
    /// MI requests the command makes that the client waits for.
    pub mi_round_trips: u32,
    /// Client-observed: request → `Ended`.
    pub callapi: Summary,
    /// Client-observed: request → `Started`.
    pub callapi_started: Summary,
    /// The same MI requests (and events) done straight against the node.
    pub direct: Summary,
    /// callapi p50 − direct p50.
    pub overhead_p50_ms: f64,
    /// callapi p99 − direct p99.
    pub overhead_p99_ms: f64,
}

/// Scenario 2.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    /// Concurrent clients (and concurrent direct MI workers).
    pub clients: usize,
    /// Length of each of the four phases.
    pub phase_s: f64,
    /// The commands.
    pub rows: Vec<OverheadRow>,
    /// Each phase's rate and CPU use (is the machine saturated?).
    pub phases: Vec<Phase>,
    /// Errors (must be 0; DIALOG_NOT_FOUND for the unknown Call-ID is expected, not counted).
    pub errors: Errors,
}

/// One phase of scenario 2.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// What ran.
    pub name: &'static str,
    /// Commands (or direct MI sequences) completed per second.
    pub per_s: f64,
    /// CPU per process meanwhile.
    pub cpu: Vec<CpuShare>,
}

impl Phase {
    fn new(name: &'static str, done: u64, meter: CpuMeter) -> Self {
        let elapsed = meter.started.elapsed().as_secs_f64().max(1e-9);
        Self {
            name,
            per_s: (done as f64 / elapsed * 10.0).round() / 10.0,
            cpu: meter.end(),
        }
    }
}

impl OverheadRow {
    fn new(
        command: &'static str,
        mi_round_trips: u32,
        callapi: &Samples,
        started: &Samples,
        direct: &Samples,
    ) -> Self {
        let (callapi, callapi_started, direct) =
            (callapi.summary(), started.summary(), direct.summary());
        let diff = |a: f64, b: f64| ((a - b) * 1000.0).round() / 1000.0;
        Self {
            command,
            mi_round_trips,
            overhead_p50_ms: diff(callapi.p50_ms, direct.p50_ms),
            overhead_p99_ms: diff(callapi.p99_ms, direct.p99_ms),
            callapi,
            callapi_started,
            direct,
        }
    }
}

/// Scenario 2: callapi's own time per command. Four phases of `duration` each, `clients` at a
/// time: CallEnd of an unknown Call-ID through callapi, the same `dlg_end_dlg` straight to the
/// node, CallStart + CallEnd through callapi, and the same MI requests and events straight.
pub async fn overhead(
    stack: &Stack,
    settings: &Settings,
    clients: usize,
    duration: Duration,
) -> OverheadReport {
    let mut errors = Errors::default();
    let mut phases = Vec::new();

    // Phase 1: CallEnd of an unknown Call-ID through callapi.
    let connections = connect_many(settings, "ovh-end", clients, false, &mut errors).await;
    let meter = CpuMeter::begin(stack);
    let end = Instant::now() + duration;
    let handles: Vec<JoinHandle<Tally>> = connections
        .into_iter()
        .map(|client| tokio::spawn(unknown_end_loop(client, settings.clone(), end)))
        .collect();
    let mut unknown = join_all(handles).await;
    let done = unknown.call_end.count() as u64;
    phases.push(Phase::new("callapi CallEnd, unknown Call-ID", done, meter));
    errors.merge(std::mem::take(&mut unknown.errors));

    // Phase 2: the same dlg_end_dlg straight to the node.
    let meter = CpuMeter::begin(stack);
    let end = Instant::now() + duration;
    let handles: Vec<JoinHandle<Tally>> = (0..clients)
        .map(|_| tokio::spawn(direct_unknown_loop(settings.clone(), end)))
        .collect();
    let mut direct_unknown = join_all(handles).await;
    let done = direct_unknown.call_end.count() as u64;
    phases.push(Phase::new(
        "direct dlg_end_dlg, unknown dialog",
        done,
        meter,
    ));
    errors.merge(std::mem::take(&mut direct_unknown.errors));

    // Phase 3: CallStart and CallEnd through callapi.
    let connections = connect_many(settings, "ovh-start", clients, false, &mut errors).await;
    let meter = CpuMeter::begin(stack);
    let end = Instant::now() + duration;
    let handles: Vec<JoinHandle<Tally>> = connections
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(cycle_loop(
                client,
                settings.clone(),
                format!("ovh-start-r{i}"),
                end,
            ))
        })
        .collect();
    let mut calls = join_all(handles).await;
    phases.push(Phase::new(
        "callapi CallStart + CallEnd",
        calls.cycles,
        meter,
    ));
    errors.merge(std::mem::take(&mut calls.errors));

    // Phase 4: the same MI requests and events straight.
    let mut direct_calls = Tally::default();
    match EventTap::start(&settings.tap_listen, settings.tap_advertise.as_deref()).await {
        Err(err) => errors.record(format!("event socket: {err}")),
        Ok(tap) => {
            let tap = Arc::new(tap);
            match subscribe(settings, &tap, "E_CALL_TRANSFER", 300).await {
                Err(err) => errors.record(format!("event_subscribe: {err}")),
                Ok(()) => {
                    let meter = CpuMeter::begin(stack);
                    let end = Instant::now() + duration;
                    let handles: Vec<JoinHandle<Tally>> = (0..clients)
                        .map(|_| tokio::spawn(direct_call_loop(settings.clone(), tap.clone(), end)))
                        .collect();
                    direct_calls = join_all(handles).await;
                    let done = direct_calls.cycles;
                    phases.push(Phase::new("direct CallStart + CallEnd MI", done, meter));
                    if let Err(err) = subscribe(settings, &tap, "E_CALL_TRANSFER", 0).await {
                        errors.record(format!("event unsubscribe: {err}"));
                    }
                }
            }
        }
    }
    errors.merge(std::mem::take(&mut direct_calls.errors));

    OverheadReport {
        clients,
        phase_s: duration.as_secs_f64(),
        rows: vec![
            OverheadRow::new(
                "CallEnd, unknown Call-ID (dlg_end_dlg → 404)",
                1,
                &unknown.call_end,
                &unknown.started,
                &direct_unknown.call_end,
            ),
            OverheadRow::new(
                "CallStart (t_uac_dlg, call_transfer, E_CALL_TRANSFER ok)",
                2,
                &calls.call_start,
                &Samples::default(),
                &direct_calls.call_start,
            ),
            OverheadRow::new(
                "CallEnd, live call (dlg_end_dlg)",
                1,
                &calls.call_end,
                &Samples::default(),
                &direct_calls.call_end,
            ),
        ],
        phases,
        errors,
    }
}

async fn subscribe(settings: &Settings, tap: &EventTap, event: &str, expire: u64) -> Result<()> {
    let mut mi = MiClient::new(settings.mi).await?;
    tap.subscribe(&mut mi, event, expire).await
}

async fn unknown_end_loop(mut client: WsClient, settings: Settings, end: Instant) -> Tally {
    let mut t = Tally::default();
    let name = format!("ovh-end-{}", uuid::Uuid::new_v4().simple());
    while Instant::now() < end {
        let params = json!({"callid": format!("bench-unknown-{}", uuid::Uuid::new_v4().simple())});
        let Ok(outcome) = run_or_reconnect(
            &mut client,
            &settings,
            &name,
            "CallEnd",
            params,
            &mut t.errors,
        )
        .await
        else {
            break;
        };
        let Some(outcome) = outcome else { continue };
        match &outcome.error {
            Some((code, _)) if code == "DIALOG_NOT_FOUND" => {
                t.call_end.push(outcome.ended);
                t.started.push(outcome.started);
            }
            Some((code, message)) => t.errors.record(format!("CallEnd: {code}: {message}")),
            None => t.errors.record("CallEnd of an unknown Call-ID succeeded"),
        }
    }
    client.close(Duration::from_secs(2)).await;
    t
}

async fn direct_unknown_loop(settings: Settings, end: Instant) -> Tally {
    let mut t = Tally::default();
    let mut mi = match MiClient::new(settings.mi).await {
        Ok(mi) => mi,
        Err(err) => {
            t.errors.record(format!("MI socket: {err}"));
            return t;
        }
    };
    while Instant::now() < end {
        let params =
            json!({"dialog_id": format!("bench-unknown-{}", uuid::Uuid::new_v4().simple())});
        let sent = Instant::now();
        match mi.call("dlg_end_dlg", params, settings.timeout).await {
            Ok(Err((404, _))) => t.call_end.push(sent.elapsed()),
            Ok(Err((code, message))) => t.errors.record(format!("dlg_end_dlg: {code} {message}")),
            Ok(Ok(result)) => t
                .errors
                .record(format!("dlg_end_dlg of an unknown dialog: {result}")),
            Err(err) => t.errors.record(format!("dlg_end_dlg: {err}")),
        }
    }
    t
}

async fn direct_call_loop(settings: Settings, tap: Arc<EventTap>, end: Instant) -> Tally {
    let mut t = Tally::default();
    let mut mi = match MiClient::new(settings.mi).await {
        Ok(mi) => mi,
        Err(err) => {
            t.errors.record(format!("MI socket: {err}"));
            return t;
        }
    };
    while Instant::now() < end {
        if let Err(err) = direct_call(&mut mi, &tap, &settings, &mut t).await {
            t.errors.record(format!("direct call: {err}"));
        }
    }
    t
}

/// CallStart's MI requests and events done by hand: `t_uac_dlg` INVITE to the caller,
/// `call_transfer` to the callee, wait for `E_CALL_TRANSFER` `ok` (timed: as CallStart's
/// `Ended`), end the first leg (untimed: callapi does not wait for it either), then
/// `dlg_end_dlg` of the new call (timed: as CallEnd).
async fn direct_call(
    mi: &mut MiClient,
    tap: &EventTap,
    settings: &Settings,
    t: &mut Tally,
) -> Result<()> {
    let callid = format!("{}@bench", uuid::Uuid::new_v4().simple());
    let headers = format!(
        "From: <{caller}>\r\nTo: <{callee}>\r\nContact: <{caller}>\r\nContent-Type: application/sdp\r\nCSeq: 1 INVITE\r\nCall-Id: {callid}\r\n",
        caller = settings.caller,
        callee = settings.callee,
    );
    let started = Instant::now();
    let invite = mi
        .call_ok(
            "t_uac_dlg",
            json!({"method": "INVITE", "ruri": settings.caller, "headers": headers, "body": OFFER}),
            settings.timeout,
        )
        .await?;
    let status = invite["Status"].as_str().unwrap_or_default();
    if !status.starts_with('2') {
        return Err(BenchError::Mi(format!("t_uac_dlg answered {status:?}")));
    }
    let done = tap.expect_transfer(&callid);
    let transfer = mi
        .call_ok(
            "call_transfer",
            json!({"callid": callid, "leg": "callee", "destination": settings.callee}),
            settings.timeout,
        )
        .await;
    if let Err(err) = transfer {
        tap.forget(&callid);
        return Err(err);
    }
    let event = match tokio::time::timeout(settings.timeout, done).await {
        Ok(Ok(event)) => event,
        _ => {
            tap.forget(&callid);
            return Err(BenchError::Timeout {
                ms: settings.timeout.as_millis(),
                what: "E_CALL_TRANSFER ok",
            });
        }
    };
    let call_start = started.elapsed();
    // The first leg may already have ended by itself (baresip hangs up after a REFER).
    let _ = mi
        .call(
            "dlg_end_dlg",
            json!({"dialog_id": callid}),
            settings.timeout,
        )
        .await?;
    if event["state"] != "ok" {
        return Err(BenchError::Mi(format!("transfer failed: {event}")));
    }
    let new_callid = event["transfer_callid"].as_str().unwrap_or_default();
    let ending = Instant::now();
    mi.call_ok(
        "dlg_end_dlg",
        json!({"dialog_id": new_callid}),
        settings.timeout,
    )
    .await?;
    t.call_end.push(ending.elapsed());
    t.call_start.push(call_start);
    t.cycles += 1;
    Ok(())
}

/// Scenario 3.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Connections asked for.
    pub connections: usize,
    /// Connections opened.
    pub opened: usize,
    /// Time to open them all (at most 256 handshakes at once).
    pub open_s: f64,
    /// Handshakes per second.
    pub opens_per_s: f64,
    /// Connections still open after the settle time.
    pub still_open: usize,
    /// Gateway RSS right after start, KiB.
    pub rss_start_kib: Option<u64>,
    /// Gateway RSS before opening, KiB.
    pub rss_before_kib: Option<u64>,
    /// Gateway RSS with all open, KiB.
    pub rss_open_kib: Option<u64>,
    /// Gateway RSS after they all closed, KiB.
    pub rss_closed_kib: Option<u64>,
    /// (open − before) / opened, KiB.
    pub per_connection_kib: Option<f64>,
    /// Errors (must be 0).
    pub errors: Errors,
}

/// Scenario 3: `count` idle connections.
pub async fn idle(
    stack: &Stack,
    settings: &Settings,
    count: usize,
    rss_start_kib: Option<u64>,
) -> IdleReport {
    let rss = || stack.gateway.pid().and_then(system::rss_kib);
    let mut errors = Errors::default();
    let rss_before_kib = rss();
    let started = Instant::now();
    let connections = connect_many(settings, "idle", count, true, &mut errors).await;
    let open_s = started.elapsed().as_secs_f64();
    let opened = connections.len();
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(opened));
    let holders: Vec<JoinHandle<()>> = connections
        .into_iter()
        .map(|mut client| {
            let (stop, open) = (stop.clone(), open.clone());
            tokio::spawn(async move {
                if !client.hold_open(&stop).await {
                    open.fetch_sub(1, Ordering::Relaxed);
                }
                client.close(Duration::from_secs(5)).await;
            })
        })
        .collect();
    tokio::time::sleep(settings.settle).await;
    let rss_open_kib = rss();
    let still_open = open.load(Ordering::Relaxed);
    if still_open < opened {
        errors.record(format!(
            "{} of {opened} idle connections were closed by the gateway",
            opened - still_open
        ));
    }
    stop.cancel();
    for holder in holders {
        if let Err(err) = holder.await {
            errors.record(format!("connection task failed: {err}"));
        }
    }
    tokio::time::sleep(settings.settle * 2).await;
    let rss_closed_kib = rss();
    let per_connection_kib = match (rss_before_kib, rss_open_kib) {
        (Some(before), Some(open)) if opened > 0 => {
            Some(((open as f64 - before as f64) / opened as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    IdleReport {
        connections: count,
        opened,
        open_s,
        opens_per_s: opened as f64 / open_s.max(1e-9),
        still_open,
        rss_start_kib,
        rss_before_kib,
        rss_open_kib,
        rss_closed_kib,
        per_connection_kib,
        errors,
    }
}

/// Scenario 4 at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct EventsReport {
    /// Concurrent clients, each holding and unholding its own call.
    pub clients: usize,
    /// From the first hold to the last unhold's end.
    pub elapsed_s: f64,
    /// CallHold and CallUnHold commands that ended without error.
    pub commands: u64,
    /// `Event` notifications the clients received (one CALL_HOLD / CALL_UNHOLD per command).
    pub client_events: u64,
    /// Per second.
    pub client_events_per_s: f64,
    /// `E_CALL_HOLD` events the node raised (counted on the bench's own subscription; event-ingest
    /// got the same).
    pub node_events: u64,
    /// Per second.
    pub node_events_per_s: f64,
    /// CallHold / CallUnHold: request → `Ended`.
    pub latency: Summary,
    /// NATS messages (in + out) per command.
    pub nats_msgs_per_command: Option<f64>,
    /// Clients subscribed to the tenant's call events (`Subscribe`) during the run.
    pub subscribers: usize,
    /// `held` / `resumed` call events the subscribers received, all together (each command
    /// makes one per leg: two).
    pub fanout_events: u64,
    /// Per second.
    pub fanout_events_per_s: f64,
    /// Call events a subscriber should have had and did not (must be 0).
    pub fanout_lost: u64,
    /// CPU per process during the run.
    pub cpu: Vec<CpuShare>,
    /// Errors (must be 0).
    pub errors: Errors,
}

/// Clients subscribed to the call events during scenario 4.
const EVENT_SUBSCRIBERS: usize = 10;

/// Scenario 4: `clients` calls, each held and unheld in a loop for `duration`, while
/// [`EVENT_SUBSCRIBERS`] clients follow the tenant's call events.
pub async fn events(
    stack: &Stack,
    settings: &Settings,
    clients: usize,
    duration: Duration,
) -> EventsReport {
    let mut errors = Errors::default();
    let tap = match EventTap::start(&settings.tap_listen, settings.tap_advertise.as_deref()).await {
        Ok(tap) => Some(tap),
        Err(err) => {
            errors.record(format!("event socket: {err}"));
            None
        }
    };
    if let Some(tap) = &tap
        && let Err(err) = subscribe(settings, tap, "E_CALL_HOLD", 300).await
    {
        errors.record(format!("event_subscribe: {err}"));
    }
    let prefix = format!("hold{clients}");
    let mut calls = Vec::new();
    for mut client in connect_many(settings, &prefix, clients, false, &mut errors).await {
        let start = json!({"caller": settings.caller, "callee": settings.callee});
        match client.run("CallStart", start, settings.timeout).await {
            Ok(outcome) => match (outcome.callid_of("CALL_START"), &outcome.error) {
                (Some(callid), None) => calls.push((client, callid.to_owned())),
                _ => errors.record(format!("CallStart: {:?}", outcome.error)),
            },
            Err(err) => errors.record(format!("CallStart: {err}")),
        }
    }
    // The subscribers: each counts the held / resumed events it gets.
    let stop_subscribers = tokio_util::sync::CancellationToken::new();
    let mut subscribers = Vec::new();
    for mut client in connect_many(settings, "sub", EVENT_SUBSCRIBERS, false, &mut errors).await {
        let stop = stop_subscribers.clone();
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        subscribers.push(tokio::spawn(async move {
            client
                .count_hold_events(&stop, Duration::from_millis(500), ready)
                .await
        }));
        if subscribed.await.is_err() {
            errors.record("a subscriber was not subscribed".to_owned());
        }
    }
    let node_before = tap.as_ref().map_or(0, EventTap::received);
    let nats_before = stack.nats_counters().await;
    let meter = CpuMeter::begin(stack);
    let start = Instant::now();
    let end = start + duration;
    let handles: Vec<JoinHandle<Tally>> = calls
        .into_iter()
        .enumerate()
        .map(|(i, (client, callid))| {
            let settings = settings.clone();
            let name = format!("{prefix}-r{i}");
            tokio::spawn(hold_loop(client, settings, name, callid, end))
        })
        .collect();
    let mut tally = join_all(handles).await;
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let cpu = meter.end();
    let (_, nats_msgs_per_command) = nats_since(stack, nats_before, tally.cycles).await;
    // Events of the last commands may still be on their way to the tap.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let node_events = tap
        .as_ref()
        .map_or(0, EventTap::received)
        .saturating_sub(node_before);
    if let Some(tap) = &tap
        && let Err(err) = subscribe(settings, tap, "E_CALL_HOLD", 0).await
    {
        errors.record(format!("event unsubscribe: {err}"));
    }
    errors.merge(std::mem::take(&mut tally.errors));
    stop_subscribers.cancel();
    let (mut fanout_events, mut fanout_lost) = (0u64, 0u64);
    let expected = 2 * tally.cycles;
    let subscribed = subscribers.len();
    for subscriber in subscribers {
        match subscriber.await {
            Ok(Ok((count, ordered))) => {
                fanout_events += count;
                fanout_lost += expected.saturating_sub(count);
                if !ordered {
                    errors.record("a subscriber's call events came out of order".to_owned());
                }
            }
            Ok(Err(err)) => errors.record(format!("subscriber: {err}")),
            Err(err) => errors.record(format!("subscriber task: {err}")),
        }
    }
    if fanout_lost > 0 {
        errors.record(format!(
            "{fanout_lost} call events lost on the way to subscribers"
        ));
    }
    EventsReport {
        clients,
        elapsed_s: elapsed,
        commands: tally.cycles,
        client_events: tally.events,
        client_events_per_s: tally.events as f64 / elapsed,
        node_events,
        node_events_per_s: node_events as f64 / elapsed,
        latency: tally.call_start.summary(),
        nats_msgs_per_command,
        subscribers: subscribed,
        fanout_events,
        fanout_events_per_s: fanout_events as f64 / elapsed,
        fanout_lost,
        cpu,
        errors,
    }
}

async fn hold_loop(
    mut client: WsClient,
    settings: Settings,
    name: String,
    callid: String,
    end: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut held = false;
    while Instant::now() < end || held {
        let method = if held { "CallUnHold" } else { "CallHold" };
        let params = json!({"callid": callid});
        let Ok(outcome) =
            run_or_reconnect(&mut client, &settings, &name, method, params, &mut t.errors).await
        else {
            return t;
        };
        let Some(outcome) = outcome else {
            // Whether the hold took is unknown: stop rather than guess.
            break;
        };
        t.events += outcome.events.len() as u64;
        match outcome.error {
            Some((code, message)) => {
                t.errors.record(format!("{method}: {code}: {message}"));
                break;
            }
            None => {
                t.cycles += 1;
                t.call_start.push(outcome.ended);
                held = !held;
            }
        }
    }
    let params = json!({"callid": callid});
    match client.run("CallEnd", params, settings.timeout).await {
        Ok(outcome) => {
            if let Some((code, message)) = outcome.error {
                t.errors.record(format!("CallEnd: {code}: {message}"));
            }
        }
        Err(err) => t.errors.record(format!("CallEnd: {err}")),
    }
    client.close(Duration::from_secs(2)).await;
    t
}

/// Scenario 5 at one number of subscribers.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Clients following the tenant's call events.
    pub subscribers: usize,
    /// Call events injected (two per rejected dialog sent to event-ingest).
    pub injected: u64,
    /// Dialogs sent per second (the offered rate).
    pub offered_dialogs_per_s: f64,
    /// From the first datagram sent to the last subscriber's last event, seconds.
    pub elapsed_s: f64,
    /// Call events the subscribers received, all together.
    pub delivered: u64,
    /// `delivered` per second.
    pub delivered_per_s: f64,
    /// Call events a subscriber should have had and did not (must be 0).
    pub lost: u64,
    /// CPU per process over the run.
    pub cpu: Vec<CpuShare>,
    /// Errors.
    pub errors: Errors,
}

/// Scenario 5: `dialogs` rejected dialogs sent to event-ingest as OpenSIPS would (two call
/// events each: created, ended), `rate` a second, while `subscribers` clients follow the
/// tenant's call events: how many events per second reach the subscribers in all, from the
/// node's datagram to the client, and how many are lost.
pub async fn fanout(
    stack: &Stack,
    settings: &Settings,
    subscribers: usize,
    dialogs: usize,
    rate: u64,
) -> FanoutReport {
    let mut errors = Errors::default();
    let prefix = format!("fanout{subscribers}-{}-", std::process::id());
    let expected = 2 * dialogs as u64;
    let mut tasks = Vec::new();
    for mut client in connect_many(settings, "fan", subscribers, false, &mut errors).await {
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            client
                .count_prefixed_events(&prefix, expected, Duration::from_secs(5), ready)
                .await
        }));
        if subscribed.await.is_err() {
            errors.record("a subscriber was not subscribed".to_owned());
        }
    }
    let target = stack
        .event_socket
        .strip_prefix("udp:")
        .unwrap_or(&stack.event_socket)
        .to_owned();
    let meter = CpuMeter::begin(stack);
    let start = Instant::now();
    let sender_prefix = prefix.clone();
    let sender = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let begun = std::time::Instant::now();
        for i in 0..dialogs {
            // Paced to `rate`: a burst beyond what event-ingest reads is lost in the kernel,
            // not in callapi.
            let due = begun + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            let datagram = json!({"jsonrpc": "2.0", "method": "E_DLG_STATE_CHANGED", "params": {
                "id": format!("9.{i}"), "db_id": "9", "callid": format!("{sender_prefix}{i}"),
                "from_tag": "a", "to_tag": "", "old_state": 1, "new_state": 5}})
            .to_string();
            socket.send_to(datagram.as_bytes(), &target)?;
        }
        Ok(())
    });
    match sender.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => errors.record(format!("sending events: {err}")),
        Err(err) => errors.record(format!("sender: {err}")),
    }
    let (mut delivered, mut lost, mut last) = (0u64, 0u64, start);
    let subscribed = tasks.len();
    for task in tasks {
        match task.await {
            Ok(Ok((count, ordered, at))) => {
                delivered += count;
                lost += expected.saturating_sub(count);
                last = last.max(at);
                if !ordered {
                    errors.record("a subscriber's call events came out of order".to_owned());
                }
            }
            Ok(Err(err)) => errors.record(format!("subscriber: {err}")),
            Err(err) => errors.record(format!("subscriber task: {err}")),
        }
    }
    let cpu = meter.end();
    if lost > 0 {
        errors.record(format!("{lost} call events lost on the way to subscribers"));
    }
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-9);
    FanoutReport {
        subscribers: subscribed,
        injected: expected,
        offered_dialogs_per_s: rate as f64,
        elapsed_s: elapsed,
        delivered,
        delivered_per_s: delivered as f64 / elapsed,
        lost,
        cpu,
        errors,
    }
}
