//! Replay tests: the requests of each transcript recorded from a real OpenSIPS are sent to the
//! emulator over real UDP, in order, and the emulator must answer with the same shapes: the
//! same reply kind (result keys or value, error code/message/data, no reply, raw parse error)
//! and, between one request and the next, the same OpenSIPS events (name and state/leg/action).
//!
//! Calls the recording's phones placed on their own are placed with `place_call`. Call-IDs the
//! emulator makes up (transfer targets) are mapped to the recorded ones as they appear.
//! Compared events: E_CALL_HOLD all; E_CALL_TRANSFER all but `notify` (informative: phones
//! differ, the facts say never to rely on it); E_DLG_STATE_CHANGED of dialogs created by the
//! request itself or by its transfer (phones differ on when they hang up the old dialog).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use opensips_emulator::{EmulatorConfig, Phones, Version};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

struct Line {
    t: f64,
    dir: String,
    data: Value,
}

fn load(version: &str, name: &str) -> Vec<Line> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(version)
        .join(format!("{name}.jsonl"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("transcript line");
            Line {
                t: v["t"].as_f64().unwrap_or(0.0),
                dir: v["dir"].as_str().unwrap_or_default().to_owned(),
                data: v["data"].clone(),
            }
        })
        .collect()
}

/// The shape of an MI reply, for comparison.
fn reply_shape(reply: Option<&Value>) -> String {
    let Some(reply) = reply else {
        return "no reply".into();
    };
    if let Some(raw) = reply.get("_unparsable_raw") {
        return format!("raw {}", raw.as_str().unwrap_or_default());
    }
    if let Some(error) = reply.get("error") {
        return format!(
            "error {} {} {}",
            error["code"],
            error["message"],
            error.get("data").unwrap_or(&Value::Null)
        );
    }
    let result = &reply["result"];
    match result {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let status = map
                .get("Status")
                .and_then(Value::as_str)
                .map(|s| s.split(' ').next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            let detail = if let Some(dialog) = map.get("Dialog") {
                format!("state={}", dialog["state"])
            } else if let Some(events) = map.get("Events").and_then(Value::as_array) {
                // subscribers_list: event names and each subscriber's ttl kind.
                events
                    .iter()
                    .map(|e| {
                        let subs = e["Subscribers"].as_array().map(|s| {
                            s.iter()
                                .map(|s| {
                                    format!(
                                        "{}:{}",
                                        s["socket"].as_str().unwrap_or("?"),
                                        if s["ttl"].is_number() {
                                            "live"
                                        } else {
                                            "expired"
                                        }
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        });
                        format!(
                            "{}[{}]",
                            e["name"].as_str().unwrap_or("?"),
                            subs.unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else if let Some(event) = map.get("Event") {
                let subs = event["Subscribers"]
                    .as_array()
                    .map(|s| s.len())
                    .unwrap_or(0);
                format!(
                    "{} subscribers={subs}",
                    event["name"].as_str().unwrap_or("?")
                )
            } else {
                String::new()
            };
            format!("result {keys:?} {status} {detail}")
        }
        other => format!("result {other}"),
    }
}

/// The compared shape of an event with the group it belongs to (one dialog's state changes,
/// one dialog's transfer, one leg's hold), or None if it is not compared.
fn event_shape(event: &Value, compared_dialogs: &[String]) -> Option<(String, String)> {
    let p = &event["params"];
    let callid = p["callid"].as_str()?;
    match event["method"].as_str()? {
        "E_CALL_HOLD" => {
            let leg = p["leg"].as_str()?;
            Some((
                format!("hold {callid} {leg}"),
                format!(
                    "hold {leg} {} {}",
                    p["action"].as_str()?,
                    p["state"].as_str()?
                ),
            ))
        }
        "E_CALL_TRANSFER" => {
            let state = p["state"].as_str()?;
            if state == "notify" {
                return None;
            }
            let leg = p["leg"].as_str()?;
            let leg = if leg == p["transfer_callid"].as_str()? {
                "<transfer_callid>"
            } else {
                leg
            };
            let code = p["status"].as_str()?.split(' ').next()?.to_owned();
            Some((
                format!("transfer {callid}"),
                format!("transfer {state} leg={leg} {code}"),
            ))
        }
        "E_DLG_STATE_CHANGED" => compared_dialogs.iter().any(|c| c == callid).then(|| {
            (
                format!("dialog {callid}"),
                format!("dialog {}->{}", p["old_state"], p["new_state"]),
            )
        }),
        _ => None,
    }
}

/// The compared events as ordered sequences per group (groups in no particular order: leg
/// order and interleaving vary on the real thing, the order within a group does not).
fn sequences<'a>(events: impl Iterator<Item = &'a Value>, dialogs: &[String]) -> Vec<String> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (group, shape) in events.filter_map(|e| event_shape(e, dialogs)) {
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, shapes)) => shapes.push(shape),
            None => groups.push((group, vec![shape])),
        }
    }
    let mut out: Vec<String> = groups.into_iter().map(|(_, s)| s.join(", ")).collect();
    out.sort();
    out
}

fn count(sequences: &[String]) -> usize {
    sequences.iter().map(|s| s.split(", ").count()).sum()
}

struct Replayer {
    mi: UdpSocket,
    events: mpsc::UnboundedReceiver<Value>,
    sockets: Vec<(String, String)>,
    /// Recorded Call-ID → emulator Call-ID.
    callids: HashMap<String, String>,
    emulator: opensips_emulator::Emulator,
    version: &'static str,
    next_id: u64,
}

impl Replayer {
    async fn new(version: &'static str) -> Self {
        let config = EmulatorConfig {
            version: if version == "4.0" {
                Version::V4_0
            } else {
                Version::V3_6
            },
            answer_delay: Duration::from_millis(5),
            ring_timeout: Duration::from_millis(300),
            dead_timeout: Duration::from_millis(200),
            ..EmulatorConfig::default()
        };
        let emulator = opensips_emulator::start(config).await.expect("emulator");
        let (tx, events) = mpsc::unbounded_channel();
        let mut sockets = Vec::new();
        // The recording's event sockets, each replaced by one of ours.
        for recorded in ["udp:127.0.0.1:9099", "udp:127.0.0.1:9097"] {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("event socket");
            sockets.push((
                recorded.to_owned(),
                format!("udp:{}", socket.local_addr().expect("addr")),
            ));
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_535];
                while let Ok(len) = socket.recv(&mut buf).await {
                    if let Ok(value) = serde_json::from_slice::<Value>(&buf[..len]) {
                        let _ = tx.send(value);
                    }
                }
            });
        }
        let mi = UdpSocket::bind("127.0.0.1:0").await.expect("mi socket");
        mi.connect(emulator.mi_udp_addr().expect("mi_udp"))
            .await
            .expect("connect");
        let mut replayer = Self {
            mi,
            events,
            sockets,
            callids: HashMap::new(),
            emulator,
            version,
            next_id: 1000,
        };
        // The recordings ran with these subscriptions in place (00_subscribe).
        for event in ["E_DLG_STATE_CHANGED", "E_CALL_TRANSFER", "E_CALL_HOLD"] {
            let socket = replayer.sockets[0].1.clone();
            let reply = replayer.request(json!({"jsonrpc":"2.0","method":"event_subscribe","id":1,"params":{"event":event,"socket":socket}})).await;
            assert_eq!(
                reply.as_ref().map(|r| r["result"].clone()),
                Some(json!("OK"))
            );
        }
        replayer
    }

    fn substitute(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (recorded, ours) in &self.sockets {
            text = text.replace(recorded, ours);
        }
        for (recorded, ours) in &self.callids {
            text = text.replace(recorded, ours);
        }
        text
    }

    async fn request(&mut self, request: Value) -> Option<Value> {
        self.send_raw(request.to_string().as_bytes()).await
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Option<Value> {
        self.mi.send(bytes).await.expect("send");
        let mut buf = vec![0u8; 65_535];
        match tokio::time::timeout(Duration::from_secs(3), self.mi.recv(&mut buf)).await {
            Ok(Ok(len)) => Some(serde_json::from_slice(&buf[..len]).unwrap_or_else(
                |_| json!({"_unparsable_raw": String::from_utf8_lossy(&buf[..len])}),
            )),
            _ => None,
        }
    }

    fn drain_events(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            out.push(event);
        }
        out
    }

    /// Places the calls the recording's phones placed by themselves before `lines[upto]`.
    async fn place_phone_calls(
        &mut self,
        lines: &[Line],
        from: usize,
        upto: usize,
        known: &[String],
    ) {
        for line in &lines[from..upto] {
            if line.dir != "event" || line.data["method"] != "E_DLG_STATE_CHANGED" {
                continue;
            }
            let callid = line.data["params"]["callid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if self.callids.contains_key(&callid)
                || known.contains(&callid)
                || line.data["params"]["old_state"] != 1
            {
                continue;
            }
            let caller = callid.split("@pyua-").nth(1).unwrap_or("alice").to_owned();
            // A call that only rang before the request was placed to a phone that does not answer.
            let answered = lines[from..upto].iter().any(|l| {
                l.data["params"]["callid"] == callid.as_str()
                    && l.data["params"]["new_state"].as_i64() >= Some(3)
            });
            let callee = match (answered, caller.as_str()) {
                (false, _) => "noanswer",
                (true, "dave" | "bob") => "cindy",
                _ => "bob",
            };
            // The 3.6 recordings' own calls came from baresip (plain Call-IDs) or pyua.
            let phones = if callid.contains("@pyua-") {
                Phones::Pyua
            } else {
                Phones::Baresip
            };
            let ours = self.emulator.place_call_with(&caller, callee, phones).await;
            self.callids.insert(callid, ours);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.drain_events();
    }

    /// Replays one transcript; returns the differences found.
    async fn replay(&mut self, name: &str, real_gaps: bool) -> Vec<String> {
        let lines = load(self.version, name);
        // Call-IDs that requests or transfers create (not phones on their own).
        let mut created: Vec<String> = Vec::new();
        for line in &lines {
            let text = line.data.to_string();
            if line.dir == "mi_req"
                && let Some(start) = text.find("Call-Id: ")
            {
                let rest = &text[start + 9..];
                created.push(rest[..rest.find('\\').unwrap_or(rest.len())].to_owned());
            }
            if line.data["method"] == "E_CALL_TRANSFER" {
                created.push(
                    line.data["params"]["transfer_callid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
        let mut differences = Vec::new();
        let mut last = 0;
        let mut last_t: Option<f64> = None;
        let requests: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].dir == "mi_req")
            .collect();
        for (n, &i) in requests.iter().enumerate() {
            self.place_phone_calls(&lines, last, i, &created).await;
            if real_gaps && let Some(prev) = last_t {
                let gap = (lines[i].t - prev).clamp(0.0, 9.0);
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
            let end = requests.get(n + 1).copied().unwrap_or(lines.len());
            let request = &lines[i].data;
            let expected_reply = request.get("id").and_then(|id| {
                lines[i..]
                    .iter()
                    .find(|l| l.dir == "mi_rep" && l.data.get("id") == Some(id))
                    .map(|l| &l.data)
            });
            let expected_reply = expected_reply.or_else(|| {
                request.get("_unparsable_raw").and_then(|_| {
                    lines
                        .get(i + 1)
                        .filter(|l| l.dir == "mi_rep")
                        .map(|l| &l.data)
                })
            });
            // The dialogs whose state events are compared in this window.
            let window = &lines[i..end];
            let mut window_dialogs: Vec<String> = Vec::new();
            let text = request.to_string();
            if text.contains("\"INVITE\"")
                && let Some(start) = text.find("Call-Id: ")
            {
                let rest = &text[start + 9..];
                window_dialogs.push(rest[..rest.find('\\').unwrap_or(rest.len())].to_owned());
            }
            if text.contains("dlg_end_dlg")
                && let Some(id) = request["params"]["dialog_id"].as_str()
            {
                window_dialogs.push(id.to_owned());
            }
            for line in window {
                if line.data["method"] == "E_CALL_TRANSFER" {
                    window_dialogs.push(
                        line.data["params"]["transfer_callid"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
            let expected = sequences(
                window.iter().filter(|l| l.dir == "event").map(|l| &l.data),
                &window_dialogs,
            );
            // Send it.
            let actual_reply = if let Some(raw) =
                request.get("_unparsable_raw").and_then(Value::as_str)
            {
                self.send_raw(raw.as_bytes()).await
            } else {
                let mut ours: Value =
                    serde_json::from_str(&self.substitute(&request.to_string())).expect("json");
                let id = json!(self.next_id);
                self.next_id += 1;
                if ours.get("id").is_some()
                    && let Some(map) = ours.as_object_mut()
                {
                    map.insert("id".into(), id);
                }
                if ours.get("id").is_none() && ours.get("method").is_some() {
                    self.mi
                        .send(ours.to_string().as_bytes())
                        .await
                        .expect("send");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut buf = vec![0u8; 65_535];
                    match tokio::time::timeout(Duration::from_millis(200), self.mi.recv(&mut buf))
                        .await
                    {
                        Ok(Ok(len)) => {
                            Some(serde_json::from_slice(&buf[..len]).unwrap_or(Value::Null))
                        }
                        _ => None,
                    }
                } else {
                    self.send_raw(ours.to_string().as_bytes()).await
                }
            };
            let (want, got) = (
                reply_shape(expected_reply),
                reply_shape(actual_reply.as_ref()),
            );
            // Sockets in subscriber lists are ours.
            let want = self.substitute(&want);
            if want != got {
                differences.push(format!(
                    "{name} request {request}: reply {got} instead of {want}"
                ));
            }
            // Collect this window's events.
            let mut events = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            loop {
                events.extend(self.drain_events());
                // Map Call-IDs the emulator made up to the recorded ones, in order of appearance.
                let recorded_new: Vec<String> = window
                    .iter()
                    .filter(|l| {
                        l.data["method"] == "E_CALL_TRANSFER"
                            && l.data["params"]["state"] == "start"
                    })
                    .filter_map(|l| {
                        l.data["params"]["transfer_callid"]
                            .as_str()
                            .map(str::to_owned)
                    })
                    .collect();
                let ours_new: Vec<String> = events
                    .iter()
                    .filter(|e| e["method"] == "E_CALL_TRANSFER" && e["params"]["state"] == "start")
                    .filter_map(|e| e["params"]["transfer_callid"].as_str().map(str::to_owned))
                    .collect();
                for (recorded, ours) in recorded_new.iter().zip(&ours_new) {
                    self.callids
                        .entry(recorded.clone())
                        .or_insert_with(|| ours.clone());
                }
                let ours_dialogs: Vec<String> =
                    window_dialogs.iter().map(|c| self.substitute(c)).collect();
                let got = sequences(events.iter(), &ours_dialogs);
                if count(&got) >= count(&expected) || tokio::time::Instant::now() > deadline {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    events.extend(self.drain_events());
                    let got = sequences(events.iter(), &ours_dialogs);
                    if got != expected {
                        differences.push(format!(
                            "{name} request {request}: events {got:?} instead of {expected:?}"
                        ));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Order matters for transfers: start before the outcome.
            let order: Vec<String> = events
                .iter()
                .filter(|e| e["method"] == "E_CALL_TRANSFER" && e["params"]["state"] != "notify")
                .map(|e| format!("{} {}", e["params"]["callid"], e["params"]["state"]))
                .collect();
            for pair in order.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if a.split(' ').next() == b.split(' ').next()
                    && a.ends_with("ok")
                    && b.ends_with("start")
                {
                    differences.push(format!("{name}: transfer outcome before its start"));
                }
            }
            last = i;
            last_t = Some(lines[end.saturating_sub(1)].t);
        }
        differences
    }
}

async fn replay_all(version: &'static str, names: &[&str], real_gaps: bool) {
    let mut replayer = Replayer::new(version).await;
    let mut differences = Vec::new();
    for name in names {
        differences.extend(replayer.replay(name, real_gaps).await);
    }
    assert!(
        differences.is_empty(),
        "the emulator differs from OpenSIPS {version}:\n{}",
        differences.join("\n")
    );
}

#[tokio::test]
async fn opensips_36_session_callstart_transfer_hold_end() {
    // One recording session: each file goes on with the calls of the previous ones.
    replay_all(
        "3.6",
        &[
            "a_callstart",
            "a2_callstart_orig_dialog_cleanup",
            "b_blind_transfer",
            "c_hold_unhold",
            "d_hold_caller_leg",
            "e_end",
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn opensips_36_transfer_failures() {
    replay_all("3.6", &["b2_blind_transfer_fail"], false).await;
}

#[tokio::test]
async fn opensips_36_attended_and_second_transfer() {
    replay_all(
        "3.6",
        &["f_attended_transfer", "b3_second_transfer_same_dialog"],
        false,
    )
    .await;
}

#[tokio::test]
async fn opensips_36_errors() {
    replay_all("3.6", &["g_errors"], false).await;
}

#[tokio::test]
async fn opensips_36_subscriptions_expire() {
    replay_all("3.6", &["j_subscribe_expiry"], true).await;
}

#[tokio::test]
async fn opensips_40_per_leg_hold() {
    replay_all(
        "4.0",
        &[
            "hold_leg_caller",
            "hold_leg_callee",
            "hold_leg_both",
            "hold_both",
            "hold_mixed",
            "hold_errors",
            "hold_headers",
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn opensips_40_crashes_on_a_request_without_method() {
    replay_all("4.0", &["g2_mi_no_method_crash"], false).await;
}

#[tokio::test]
async fn opensips_40_session_callstart_transfer_hold_end_mi_names() {
    replay_all(
        "4.0",
        &[
            "a_callstart",
            "a2_callstart_orig_dialog_cleanup",
            "b_blind_transfer",
            "c_hold_unhold",
            "d_hold_caller_leg",
            "e_end",
            "hold_callstart_dialog",
            "mi_names",
        ],
        false,
    )
    .await;
}

#[tokio::test]
async fn opensips_40_bad_envelopes_that_do_not_crash() {
    replay_all(
        "4.0",
        &["g3_envelope_none", "g3_envelope_r4", "g3_envelope_r5"],
        false,
    )
    .await;
}

#[tokio::test]
async fn opensips_40_crashes_on_a_numeric_method() {
    replay_all("4.0", &["g3_envelope_r7"], false).await;
}

#[tokio::test]
async fn opensips_40_crashes_on_params_without_method() {
    replay_all("4.0", &["g3_envelope_r8"], false).await;
}
