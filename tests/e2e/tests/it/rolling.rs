//! Rolling restarts under steady load, as Kubernetes does them: each replica of each service
//! is replaced (a new one started, the old one sent SIGTERM) while clients keep starting and
//! ending calls; event-ingest's replacement binds the same address, as it would sit behind the
//! same Service. Clients whose gateway goes away connect to another one and re-attach to their
//! commands (`CommandAttach`), as the close frame tells them. Every command must end, and end
//! well: none lost, none failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::{Client, Stack, StackOptions};
use serde_json::{Value, json};

use crate::commands::CALL_START_OK;

/// The gateways clients may connect to now.
type Urls = Arc<Mutex<Vec<String>>>;

/// What one command came to: its id and notification shape.
#[derive(Debug)]
struct Outcome {
    cmd_id: String,
    shape: Vec<String>,
    /// Times the client had to re-attach to it.
    reattached: u32,
    /// The `CALL_START` event's Call-ID, for a CallStart.
    callid: Option<String>,
}

/// A client that survives its gateway going away.
struct Worker {
    urls: Urls,
    client: Option<Client>,
    turn: usize,
    closes: Vec<(u16, String)>,
}

impl Worker {
    async fn connected(&mut self) -> &mut Client {
        if self.client.is_none() {
            for _ in 0..200 {
                let url = {
                    let urls = self.urls.lock().unwrap();
                    urls[self.turn % urls.len()].clone()
                };
                self.turn += 1;
                if let Ok(client) = Client::try_connect(&url, &[]).await {
                    self.client = Some(client);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.client
            .as_mut()
            .expect("no gateway took the connection")
    }

    /// Runs `method` with our own `cmd_id` to its `Ended`, re-attaching on another gateway
    /// whenever the connection closes. A request whose answer the close cut off is looked up
    /// with `CommandAttach` before it is sent again (-32004: it never started); a command that
    /// started and then is unknown to `CommandAttach` is lost (shape `LOST`).
    async fn run(&mut self, method: &str, mut params: Value, cmd_id: &str) -> Outcome {
        params["cmd_id"] = json!(cmd_id);
        let mut reattached = 0;
        // Sent (its answer maybe cut off), and started (answered `Started`).
        let (mut sent, mut started) = (false, false);
        let mut notes: Vec<Value> = Vec::new();
        loop {
            let client = self.connected().await;
            let attaching = sent || started;
            let request = if attaching {
                client
                    .try_request("CommandAttach", json!({"cmd_id": cmd_id}))
                    .await
            } else {
                client.try_request(method, params.clone()).await
            };
            let Some(id) = request else {
                self.client = None;
                continue;
            };
            sent = true;
            notes.clear();
            let closed = loop {
                let message = match client.next_or_closed().await {
                    Ok(message) => message,
                    Err(close) => break Some(close),
                };
                if message.get("id") == Some(&id) {
                    if let Some(error) = message.get("error") {
                        assert!(
                            attaching && error["code"] == -32004,
                            "{method} {cmd_id}: {message}"
                        );
                        if started {
                            return Outcome {
                                cmd_id: cmd_id.to_owned(),
                                shape: vec!["LOST".to_owned()],
                                reattached,
                                callid: None,
                            };
                        }
                        // It never started: sent again, below.
                        sent = false;
                        break None;
                    }
                    started = true;
                    continue;
                }
                if message["params"]["cmd_id"].as_str() != Some(cmd_id) {
                    continue;
                }
                let ended = message["method"] == "Ended";
                notes.push(message);
                if ended {
                    let callid = notes
                        .iter()
                        .find(|n| n["params"]["data"] == "CALL_START")
                        .and_then(|n| n["params"]["callid"].as_str())
                        .map(str::to_owned);
                    return Outcome {
                        cmd_id: cmd_id.to_owned(),
                        shape: shape(&notes),
                        reattached,
                        callid,
                    };
                }
            };
            if let Some(close) = closed {
                self.closes.push(close);
                self.client = None;
                if started {
                    reattached += 1;
                }
            }
        }
    }
}

/// Starts and ends calls until `stop`, and returns every command's outcome.
async fn steady_load(
    urls: Urls,
    worker: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Outcome>, Vec<(u16, String)>) {
    let mut me = Worker {
        urls,
        client: None,
        turn: worker,
        closes: Vec::new(),
    };
    let (caller, callee) = if worker.is_multiple_of(2) {
        ("alice", "bob")
    } else {
        ("cindy", "dave")
    };
    let mut outcomes = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let start = me
            .run(
                "CallStart",
                json!({"caller": format!("sip:{caller}@127.0.0.1"), "callee": format!("sip:{callee}@127.0.0.1")}),
                &format!("roll-{worker}-{n}"),
            )
            .await;
        let callid = start.callid.clone();
        outcomes.push(start);
        if let Some(callid) = callid {
            let end = me
                .run(
                    "CallEnd",
                    json!({"callid": callid}),
                    &format!("roll-{worker}-{n}-end"),
                )
                .await;
            outcomes.push(end);
        }
    }
    (outcomes, me.closes)
}

#[tokio::test]
async fn a_rolling_restart_of_every_service_under_load_loses_no_command() {
    // Phones answer after 1 s: a CallStart runs over 2 s, within the commands' 5 s
    // shutdown grace (the hand-over after it has its own test, in resilience.rs).
    let mut stack = Stack::with(StackOptions {
        gateways: 2,
        commands: 2,
        answer_delay_ms: 1_000,
        commands_toml: "shutdown_grace_ms = 5000\n[takeover]\nscan_interval_ms = 300".to_owned(),
        gateway_toml: "drain_delay_ms = 300".to_owned(),
        ingest_toml: "drain_delay_ms = 300".to_owned(),
        // The event-ingest hand-over is read off its debug lines.
        service_env: vec![(
            "RUST_LOG".to_owned(),
            "debug,async_nats=info,hyper=info".to_owned(),
        )],
        ..StackOptions::default()
    })
    .await;
    let urls: Urls = Arc::new(Mutex::new(stack.gateway_urls.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|n| tokio::spawn(steady_load(urls.clone(), n, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // commands: a new replica joins, then the old one is stopped.
    let mut finished_on_stop = 0;
    for _ in 0..2 {
        let fresh = stack.start_commands().await;
        let mut old = stack.commands.remove(0);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let status = old.terminate(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "commands exit: {status:?}\n{}",
            old.logs()
        );
        assert!(!old.logs().contains("handed over"), "{}", old.logs());
        finished_on_stop += in_flight_at_stop(&old.logs());
        stack.commands.push(fresh);
    }
    // gateways: a new one joins, clients stop being sent to the old one, which is stopped.
    let mut closed_by_gateway = 0;
    for _ in 0..2 {
        stack.start_gateway().await;
        let fresh_url = stack.gateway_urls.last().cloned().expect("new gateway");
        let old_url = stack.gateway_urls.remove(0);
        let mut old = stack.gateways.remove(0);
        {
            let mut live = urls.lock().unwrap();
            live.push(fresh_url);
            live.retain(|u| *u != old_url);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let status = old.terminate(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "gateway exit: {status:?}\n{}",
            old.logs()
        );
        closed_by_gateway += 1;
    }
    // proxy-connector: a second one joins the queue group, the old one is stopped.
    let fresh = stack.start_connector().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = stack.connector.terminate(Duration::from_secs(25)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "connector exit: {status:?}\n{}",
        stack.connector.logs()
    );
    stack.connector = fresh;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // event-ingest: a replacement binds the same address (as behind its Service), the old one
    // is stopped: it drains what the kernel holds, and the node's events go on to the new one.
    let fresh = stack.start_ingest_beside().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = stack.ingest.terminate(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "ingest exit: {status:?}\n{}",
        stack.ingest.logs()
    );
    let old_log = plain(&stack.ingest.logs());
    let events_after_stop = old_log
        .split("stopping: not ready")
        .nth(1)
        .map_or(0, |after| after.matches(" event ").count());
    stack.ingest = fresh;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new_events = plain(&stack.ingest.logs()).matches(" event ").count();
    println!(
        "event-ingest: the stopping one published {events_after_stop} events after SIGTERM, its replacement {new_events} by the end"
    );
    assert!(new_events > 0, "the replacement got no event");

    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    let mut closes = Vec::new();
    for worker in workers {
        let (done, closed) = worker.await.expect("worker");
        outcomes.extend(done);
        closes.extend(closed);
    }
    let starts = outcomes
        .iter()
        .filter(|o| !o.cmd_id.ends_with("-end"))
        .count();
    let reattached: u32 = outcomes.iter().map(|o| o.reattached).sum();
    println!(
        "{} commands ({starts} CallStart), {reattached} re-attachments, {finished_on_stop} commands in flight on stopping commands replicas, {} connections closed by {closed_by_gateway} stopping gateways",
        outcomes.len(),
        closes.len()
    );
    let bad: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| {
            if o.cmd_id.ends_with("-end") {
                o.shape != ["Ended"]
            } else {
                o.shape != CALL_START_OK
            }
        })
        .collect();
    assert!(bad.is_empty(), "commands that did not end well: {bad:#?}");
    assert!(starts >= 12, "too little load to show anything: {starts}");
    assert!(
        finished_on_stop >= 1,
        "no commands replica was stopped mid-command: the test did not test it"
    );
    assert!(
        reattached >= 1,
        "no client had to re-attach: the test did not test it"
    );
    for (code, reason) in &closes {
        assert_eq!(*code, 1001, "{reason}");
        assert!(reason.contains("CommandAttach"), "{reason}");
    }
}

/// A log without its colours.
fn plain(log: &str) -> String {
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The commands in flight when a commands replica was told to stop, from its log line.
fn in_flight_at_stop(log: &str) -> usize {
    plain(log)
        .lines()
        .filter(|line| line.contains("stopping: finishing the commands in flight"))
        .filter_map(|line| line.split("in_flight=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}
