//! The emulated OpenSIPS node: dialogs, phones, and the MI commands that drive them, behaving
//! as the transcripts recorded from OpenSIPS 3.6.8 and 4.0.1 show (quirks included).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt as _;
use serde_json::{Map, Value, json};

use crate::events::{Events, SubscribeError};
use crate::mi::{MiError, MiResult, match_params, text};
use crate::phones::{self, Behaviour};
use crate::{EmulatorConfig, Version};

/// How long ended dialogs stay listed (state 5).
const LINGER: Duration = Duration::from_secs(2);

/// A party of a dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    /// OpenSIPS itself (the caller leg of a `t_uac_dlg` dialog): refuses REFER and re-INVITEs.
    Proxy,
    /// A simulated phone, by user name.
    Phone(String),
}

/// One dialog.
#[derive(Debug, Clone)]
pub struct Dialog {
    id: String,
    db_id: String,
    callid: String,
    from_uri: String,
    to_uri: String,
    caller_tag: String,
    callee_tag: Option<String>,
    caller: Party,
    callee: Party,
    state: i64,
    timestart: u64,
    /// Quirk 1: after one transfer, every `call_transfer` gets 491.
    transferred: bool,
    held_caller: bool,
    held_callee: bool,
    /// Made by `t_uac_dlg` (its caller leg is OpenSIPS itself).
    uac: bool,
    /// The transferee hangs this dialog up as soon as it accepted a REFER (baresip does;
    /// pyua keeps it until told).
    hangs_up_on_refer: bool,
    ended_at: Option<Instant>,
}

/// The node.
pub struct Node {
    config: EmulatorConfig,
    dialogs: Mutex<Vec<Dialog>>,
    events: Mutex<Events>,
    crashed: AtomicBool,
    counter: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16u32), 16).unwrap_or('0'))
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
fn date(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn header(headers: &str, name: &str) -> Option<String> {
    headers.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

fn uri_in(value: &str) -> String {
    match (value.find('<'), value.find('>')) {
        (Some(start), Some(end)) if start < end => value[start + 1..end].to_owned(),
        _ => value.split(';').next().unwrap_or(value).trim().to_owned(),
    }
}

impl Node {
    /// A node with no dialogs and no subscriptions.
    pub fn new(config: EmulatorConfig, udp: std::net::UdpSocket) -> Arc<Self> {
        Arc::new(Self {
            config,
            dialogs: Mutex::new(Vec::new()),
            events: Mutex::new(Events::new(udp)),
            crashed: AtomicBool::new(false),
            counter: AtomicU64::new(1),
        })
    }

    /// Which OpenSIPS this node behaves like.
    pub fn version(&self) -> Version {
        self.config.version
    }

    /// Whether the node crashed (it then answers nothing and raises nothing).
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Makes the node crash (OpenSIPS 4.0.1 on a method-less request over mi_datagram).
    pub fn crash(&self) {
        tracing::error!("emulated crash: OpenSIPS 4.0.1 segfaults on a request without a method");
        self.crashed.store(true, Ordering::SeqCst);
    }

    fn raise(&self, event: &str, params: Value) {
        if self.crashed() {
            return;
        }
        lock(&self.events).raise(event, params);
    }

    fn phone_behaviour(&self, user: &str) -> Behaviour {
        phones::behaviour(user, &self.config.extra_phones)
    }

    fn phone_uri(&self, user: &str) -> String {
        format!(
            "sip:{user}@127.0.0.1:{}",
            phones::port(user, &self.config.extra_phones)
        )
    }

    fn contact(&self, party: &Party) -> String {
        match party {
            Party::Proxy => "sip:127.0.0.1:5060".to_owned(),
            Party::Phone(user) => format!(
                "sip:{user}-0x55f47d82dec0@127.0.0.1:{}",
                phones::port(user, &self.config.extra_phones)
            ),
        }
    }

    fn new_dialog(
        &self,
        callid: String,
        from_uri: String,
        to_uri: String,
        caller: Party,
        callee: Party,
        uac: bool,
    ) -> Dialog {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Dialog {
            id: format!("{:x}.{}", 0x100 + (n % 0xe00), hex(8)),
            db_id: format!("{}", 1_000_000_000 + n * 7919),
            callid,
            from_uri,
            to_uri,
            caller_tag: if uac {
                format!("533cb9e91f4b999cf76861cbb9ed54ed-{}", hex(4))
            } else {
                hex(10)
            },
            callee_tag: None,
            caller,
            callee,
            state: 1,
            timestart: now_secs(),
            transferred: false,
            held_caller: false,
            held_callee: false,
            uac,
            hangs_up_on_refer: uac,
            ended_at: None,
        }
    }

    fn insert(&self, dialog: Dialog) {
        let mut dialogs = lock(&self.dialogs);
        dialogs.retain(|d| d.ended_at.is_none_or(|at| at.elapsed() < LINGER));
        dialogs.push(dialog);
    }

    /// Moves dialog `callid` to `state`, raising E_DLG_STATE_CHANGED.
    fn set_state(&self, callid: &str, state: i64) {
        let params = {
            let mut dialogs = lock(&self.dialogs);
            let Some(dialog) = dialogs
                .iter_mut()
                .rev()
                .find(|d| d.callid == callid && d.state != 5)
            else {
                return;
            };
            if dialog.state == state {
                return;
            }
            if state >= 2 && dialog.callee_tag.is_none() {
                dialog.callee_tag = Some(hex(16));
            }
            let old = dialog.state;
            dialog.state = state;
            if state == 5 {
                dialog.ended_at = Some(Instant::now());
            }
            json!({
                "id": dialog.id,
                "db_id": dialog.db_id,
                "callid": dialog.callid,
                "from_tag": dialog.caller_tag,
                "to_tag": dialog.callee_tag,
                "old_state": old,
                "new_state": state,
            })
        };
        self.raise("E_DLG_STATE_CHANGED", params);
    }

    /// A live (not ended) dialog by Call-ID or dialog ID.
    fn find(&self, key: &str) -> Option<Dialog> {
        lock(&self.dialogs)
            .iter()
            .rev()
            .find(|d| d.state != 5 && (d.callid == key || d.id == key))
            .cloned()
    }

    fn update(&self, callid: &str, change: impl FnOnce(&mut Dialog)) {
        if let Some(dialog) = lock(&self.dialogs)
            .iter_mut()
            .rev()
            .find(|d| d.callid == callid && d.state != 5)
        {
            change(dialog);
        }
    }

    fn answered_status(&self) -> &'static str {
        match self.config.version {
            Version::V3_6 => "200 Answering",
            Version::V4_0 => "200 OK",
        }
    }

    /// Runs one MI command (already past the envelope checks).
    pub async fn call(self: &Arc<Self>, method: &str, params: &Value) -> MiResult {
        let method = match (self.config.version, method) {
            (Version::V4_0, namespaced) if namespaced.contains(':') => match alias(namespaced) {
                Some(plain) => plain,
                None => return Err(MiError::no_method()),
            },
            (_, plain) => plain,
        };
        match method {
            "version" => {
                match_params(params, &[&[]])?;
                Ok(json!({"Server": match self.config.version {
                    Version::V3_6 => "OpenSIPS (3.6.8 (x86_64/linux))",
                    Version::V4_0 => "OpenSIPS (4.0.1 (x86_64/linux))",
                }}))
            }
            "events_list" => {
                match_params(params, &[&[]])?;
                let events: Vec<Value> = crate::events::EVENTS
                    .iter()
                    .enumerate()
                    .map(|(id, name)| json!({"name": name, "id": id}))
                    .collect();
                Ok(json!({"Events": events}))
            }
            "event_subscribe" => self.event_subscribe(params),
            "subscribers_list" => {
                let p = match_params(params, &[&[], &["event"], &["event", "socket"]])?;
                let event = text(&p, "event");
                Ok(lock(&self.events).list(event.as_deref()))
            }
            "t_uac_dlg" => self.uac_dlg(params).await,
            "call_transfer" => self.transfer(params),
            "call_hold" => self.hold(params, true),
            "call_unhold" => self.hold(params, false),
            "dlg_end_dlg" => self.end(params),
            "dlg_list" | "dlg_list_ctx" => self.list(params),
            _ => Err(MiError::no_method()),
        }
    }

    fn event_subscribe(&self, params: &Value) -> MiResult {
        let p = match_params(
            params,
            &[&["event", "socket"], &["event", "socket", "expire"]],
        )?;
        let event = text(&p, "event").unwrap_or_default();
        let socket = text(&p, "socket").unwrap_or_default();
        let expire = match p.get("expire") {
            None => 3600,
            Some(value) => value
                .as_i64()
                .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(MiError::bad_value)?,
        };
        match lock(&self.events).subscribe(&event, &socket, expire) {
            Ok(()) => Ok(json!("OK")),
            Err(SubscribeError::BadValue) => Err(MiError::new(400, "Bad parameter value")),
            Err(SubscribeError::Negative) => Err(MiError::invalid_params("Negative expire value")),
        }
    }

    async fn uac_dlg(self: &Arc<Self>, params: &Value) -> MiResult {
        let p = match_params(
            params,
            &[
                &["method", "ruri", "headers"],
                &["method", "ruri", "headers", "body"],
                &["method", "ruri", "headers", "next_hop"],
                &["method", "ruri", "headers", "body", "next_hop"],
            ],
        )?;
        let method = text(&p, "method").unwrap_or_default();
        let ruri = text(&p, "ruri").unwrap_or_default();
        let headers = text(&p, "headers").unwrap_or_default();
        if !(ruri.starts_with("sip:") || ruri.starts_with("sips:")) || ruri.contains(' ') {
            return Err(MiError::new(400, "Invalid ruri"));
        }
        let Some(from) = header(&headers, "From") else {
            return Err(MiError::new(400, "From missing"));
        };
        if p.contains_key("body") && header(&headers, "Content-Type").is_none() {
            return Err(MiError::new(400, "Content-Type missing"));
        }
        let to = header(&headers, "To").unwrap_or_default();
        let callid = header(&headers, "Call-Id")
            .unwrap_or_else(|| format!("{}-{}@127.0.0.1", hex(16), hex(5)));
        let user = phones::user_of(&ruri).to_owned();
        let behaviour = self.phone_behaviour(&user);
        let message = |status: &str, tag: &str| {
            format!(
                "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK{}.{}.0\r\nTo: {to};tag={tag}\r\nFrom: {from};tag=533cb9e91f4b999cf76861cbb9ed54ed-{}\r\nCSeq: 1 {method}\r\nCall-ID: {callid}\r\nServer: emulated phone\r\nContent-Length: 0\r\n\r\n",
                hex(4),
                hex(8),
                hex(4)
            )
            .replace("emulated phone", if status.starts_with("2") { "baresip v1.0.0 (x86_64/linux)" } else { "OpenSIPS (3.6.8 (x86_64/linux))" })
        };
        if method != "INVITE" {
            return Ok(self.uac_other(&method, &ruri, &callid, &message));
        }
        let dialog = self.new_dialog(
            callid.clone(),
            uri_in(&from),
            uri_in(&to),
            Party::Proxy,
            Party::Phone(user.clone()),
            true,
        );
        let did = dialog.id.clone();
        self.insert(dialog);
        match behaviour {
            Behaviour::Answers => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&callid, 2);
                self.set_state(&callid, 3);
                let node = self.clone();
                let confirm = callid.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    node.set_state(&confirm, 4);
                });
                let route =
                    format!("sip:127.0.0.1;lr;ftag=533cb9e91f4b999cf76861cbb9ed54ed;did={did}");
                let status = self.answered_status();
                Ok(json!({
                    "Status": status,
                    "RURI": self.contact(&Party::Phone(user)),
                    "Next-hop": route,
                    "Routes": [format!("<{route}>")],
                    "Message": format!("Record-Route: <{route}>\r\n{}", message(status, &hex(16))),
                }))
            }
            Behaviour::Busy => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.end_later(&callid);
                Ok(json!({"Status": "486 Busy Here", "Message": message("486", &hex(10))}))
            }
            Behaviour::NoAnswer => {
                self.set_state(&callid, 2);
                tokio::time::sleep(self.config.ring_timeout).await;
                self.set_state(&callid, 5);
                Ok(json!({"Status": "408 Request Timeout", "Message": message("408", &hex(10))}))
            }
            Behaviour::Dead => {
                tokio::time::sleep(self.config.dead_timeout).await;
                self.end_later(&callid);
                Ok(json!({"Status": "408 Request Timeout", "Message": message("408", &hex(10))}))
            }
            Behaviour::Unknown => {
                self.set_state(&callid, 5);
                Ok(json!({"Status": "404 User Not Found", "Message": message("404", &hex(10))}))
            }
        }
    }

    /// Ends a dialog just after the current MI reply went out (reply first, then the event).
    fn end_later(self: &Arc<Self>, callid: &str) {
        let node = self.clone();
        let callid = callid.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            node.set_state(&callid, 5);
        });
    }

    fn uac_other(
        &self,
        method: &str,
        ruri: &str,
        callid: &str,
        message: &dyn Fn(&str, &str) -> String,
    ) -> Value {
        if method == "BYE" {
            let live = self.find(callid).is_some_and(|d| d.state == 4);
            if !live {
                return json!({"Status": "481 Call Does Not Exist", "Message": message("481", &hex(16))});
            }
            self.set_state(callid, 5);
        }
        let user = phones::user_of(ruri).to_owned();
        if self.phone_behaviour(&user) == Behaviour::Unknown {
            return json!({"Status": "404 User Not Found", "Message": message("404", &hex(10))});
        }
        let contact = self.contact(&Party::Phone(user));
        json!({"Status": "200 OK", "RURI": contact, "Next-hop": contact, "Message": message("200", &hex(16))})
    }

    fn transfer(self: &Arc<Self>, params: &Value) -> MiResult {
        let p = match_params(
            params,
            &[
                &["callid", "leg", "destination"],
                &["callid", "leg", "transfer_callid", "transfer_leg"],
                &[
                    "callid",
                    "leg",
                    "transfer_callid",
                    "transfer_leg",
                    "destination",
                ],
                &[
                    "callid",
                    "leg",
                    "transfer_callid",
                    "transfer_fromtag",
                    "transfer_totag",
                ],
                &[
                    "callid",
                    "leg",
                    "transfer_callid",
                    "transfer_fromtag",
                    "transfer_totag",
                    "transfer_destination",
                ],
                &[
                    "callid",
                    "leg",
                    "transfer_callid",
                    "transfer_fromtag",
                    "transfer_totag",
                    "destination",
                ],
            ],
        )?;
        // Quirk 5: the from/to-tag recipe is broken on 3.6.8 and 4.0.1.
        if p.contains_key("transfer_fromtag") {
            return Err(MiError::bad_value());
        }
        let leg = text(&p, "leg").unwrap_or_default();
        if leg != "caller" && leg != "callee" {
            return Err(MiError::bad_value());
        }
        let callid = text(&p, "callid").unwrap_or_default();
        if let Some(transfer_callid) = text(&p, "transfer_callid") {
            let transfer_leg = text(&p, "transfer_leg").unwrap_or_default();
            if transfer_leg != "caller" && transfer_leg != "callee" {
                return Err(MiError::bad_value());
            }
            let b = self
                .find(&transfer_callid)
                .ok_or_else(|| MiError::new(404, "Transfer dialog not found"))?;
            let a = self
                .find(&callid)
                .ok_or_else(|| MiError::new(404, "Dialog not found"))?;
            if a.transferred {
                return Err(MiError::new(491, "Request Pending"));
            }
            self.update(&a.callid, |d| d.transferred = true);
            let node = self.clone();
            tokio::spawn(async move { node.run_attended(a, leg, b, transfer_leg).await });
            return Ok(json!("Accepted"));
        }
        let destination = text(&p, "destination").unwrap_or_default();
        let dialog = self
            .find(&callid)
            .ok_or_else(|| MiError::new(404, "Dialog not found"))?;
        if dialog.transferred {
            return Err(MiError::new(491, "Request Pending"));
        }
        self.update(&dialog.callid, |d| d.transferred = true);
        let node = self.clone();
        tokio::spawn(async move { node.run_blind(dialog, leg, destination).await });
        Ok(json!("Accepted"))
    }

    fn transfer_event(
        &self,
        callid: &str,
        leg: &str,
        transfer_callid: &str,
        destination: &str,
        state: &str,
        status: &str,
    ) {
        self.raise(
            "E_CALL_TRANSFER",
            json!({
                "callid": callid,
                "leg": leg,
                "transfer_callid": transfer_callid,
                "destination": destination,
                "state": state,
                "status": status,
            }),
        );
    }

    async fn run_blind(self: Arc<Self>, dialog: Dialog, leg: String, destination: String) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let transferee = if leg == "caller" {
            &dialog.caller
        } else {
            &dialog.callee
        };
        let Party::Phone(transferee) = transferee.clone() else {
            // Quirk 2: OpenSIPS itself rejects the REFER; no event at all.
            return;
        };
        let target = phones::user_of(&destination).to_owned();
        let new_callid = hex(16);
        let behaviour = self.phone_behaviour(&target);
        let new_dialog = self.new_dialog(
            new_callid.clone(),
            format!("sip:{transferee}@127.0.0.1"),
            format!("{destination};osid={}", dialog.id),
            Party::Phone(transferee),
            Party::Phone(target.clone()),
            false,
        );
        self.insert(new_dialog);
        if behaviour == Behaviour::Unknown {
            // Quirk 2: the proxy rejects the new call statelessly; no transfer event.
            self.set_state(&new_callid, 5);
            if dialog.hangs_up_on_refer {
                self.set_state(&dialog.callid, 5);
            }
            return;
        }
        let full_destination = format!("{};osid={}", self.phone_uri(&target), dialog.id);
        // Quirk 3: the start event carries the transfer Call-ID as its leg.
        self.transfer_event(
            &dialog.callid,
            &new_callid,
            &new_callid,
            &full_destination,
            "start",
            "",
        );
        if dialog.hangs_up_on_refer && !dialog.uac {
            self.set_state(&dialog.callid, 5);
        }
        match behaviour {
            Behaviour::Answers => {
                if self.config.version == Version::V3_6 {
                    self.transfer_event(
                        &dialog.callid,
                        &leg,
                        &new_callid,
                        "",
                        "notify",
                        "100 Trying",
                    );
                }
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&new_callid, 2);
                if dialog.uac {
                    // a_callstart: the phone hangs the click-to-dial leg up as the new call rings.
                    self.set_state(&dialog.callid, 5);
                }
                self.set_state(&new_callid, 3);
                self.transfer_event(
                    &dialog.callid,
                    &leg,
                    &new_callid,
                    &full_destination,
                    "ok",
                    self.answered_status(),
                );
                self.set_state(&new_callid, 4);
                self.transfer_event(&dialog.callid, "", &new_callid, "", "notify", "200 OK");
            }
            Behaviour::Busy => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&new_callid, 5);
                self.transfer_event(
                    &dialog.callid,
                    &leg,
                    &new_callid,
                    &full_destination,
                    "fail",
                    "486 Busy Here",
                );
                self.transfer_event(
                    &dialog.callid,
                    "",
                    &new_callid,
                    "",
                    "notify",
                    "486 Busy Here",
                );
            }
            Behaviour::NoAnswer => {
                self.set_state(&new_callid, 2);
                tokio::time::sleep(self.config.ring_timeout).await;
                self.set_state(&new_callid, 5);
                self.transfer_event(
                    &dialog.callid,
                    &leg,
                    &new_callid,
                    &full_destination,
                    "fail",
                    "408 Request Timeout",
                );
            }
            Behaviour::Dead => {
                tokio::time::sleep(self.config.dead_timeout).await;
                self.set_state(&new_callid, 5);
                self.transfer_event(
                    &dialog.callid,
                    &leg,
                    &new_callid,
                    &full_destination,
                    "fail",
                    "408 Request Timeout",
                );
            }
            Behaviour::Unknown => {}
        }
    }

    async fn run_attended(
        self: Arc<Self>,
        a: Dialog,
        leg: String,
        b: Dialog,
        transfer_leg: String,
    ) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let transferee = if leg == "caller" {
            &a.caller
        } else {
            &a.callee
        };
        let target = if transfer_leg == "caller" {
            &b.caller
        } else {
            &b.callee
        };
        let (Party::Phone(transferee), Party::Phone(target)) = (transferee.clone(), target.clone())
        else {
            return;
        };
        let new_callid = format!("{}@pyua-{transferee}", hex(16));
        let destination = self.phone_uri(&target);
        self.insert(self.new_dialog(
            new_callid.clone(),
            format!("sip:{transferee}@127.0.0.1"),
            format!("sip:{target}@127.0.0.1"),
            Party::Phone(transferee),
            Party::Phone(target),
            false,
        ));
        self.transfer_event(&a.callid, &leg, &new_callid, &destination, "start", "");
        self.transfer_event(
            &b.callid,
            &transfer_leg,
            &new_callid,
            &destination,
            "start",
            "",
        );
        tokio::time::sleep(self.config.answer_delay).await;
        self.set_state(&new_callid, 2);
        self.set_state(&new_callid, 3);
        self.transfer_event(
            &b.callid,
            &transfer_leg,
            &new_callid,
            &destination,
            "ok",
            "200 OK",
        );
        self.transfer_event(&a.callid, &leg, &new_callid, &destination, "ok", "200 OK");
        self.set_state(&b.callid, 5);
        self.set_state(&new_callid, 4);
        self.transfer_event(&a.callid, "", &new_callid, "", "notify", "200 OK");
    }

    fn hold(self: &Arc<Self>, params: &Value, hold: bool) -> MiResult {
        let recipes: &[&[&str]] = match self.config.version {
            Version::V3_6 => &[&["callid"]],
            Version::V4_0 => &[
                &["callid"],
                &["callid", "leg"],
                &["callid", "leg", "headers"],
            ],
        };
        let p = match_params(params, recipes)?;
        let (want_caller, want_callee) = match p.get("leg") {
            None => (true, true),
            Some(Value::Null) => {
                return Err(MiError::invalid_params("Bad type for parameter 'leg'"));
            }
            Some(Value::String(leg)) => match leg.as_str() {
                "caller" => (true, false),
                "callee" => (false, true),
                "both" => (true, true),
                _ => return Err(MiError::new(420, "Bad leg")),
            },
            Some(_) => return Err(MiError::new(420, "Bad leg")),
        };
        if let Some(headers) = p.get("headers")
            && !matches!(headers, Value::String(_) | Value::Array(_))
        {
            return Err(MiError::invalid_params("Bad type for parameter 'headers'"));
        }
        let callid = text(&p, "callid").unwrap_or_default();
        let dialog = self
            .find(&callid)
            .ok_or_else(|| MiError::new(404, "Dialog not found"))?;
        if dialog.state < 4 {
            return Err(MiError::new(410, "Dialog not ready"));
        }
        if hold {
            let already =
                (!want_caller || dialog.held_caller) && (!want_callee || dialog.held_callee);
            if already {
                return Err(MiError::new(480, "Both dialog legs are on hold"));
            }
            self.update(&dialog.callid, |d| {
                d.held_caller |= want_caller;
                d.held_callee |= want_callee;
            });
        } else {
            let any = (want_caller && dialog.held_caller) || (want_callee && dialog.held_callee);
            if !any {
                return Err(MiError::new(480, "No dialog legs on hold"));
            }
            self.update(&dialog.callid, |d| {
                d.held_caller &= !want_caller;
                d.held_callee &= !want_callee;
            });
        }
        // Both legs are re-INVITEd and reported, whatever leg was asked (4.0 too).
        let action = if hold { "hold" } else { "unhold" };
        let outcome = |party: &Party| if *party == Party::Proxy { "fail" } else { "ok" };
        let event = |leg: &str, state: &str| json!({"callid": dialog.callid, "leg": leg, "action": action, "state": state});
        let caller_outcome = outcome(&dialog.caller);
        let callee_outcome = outcome(&dialog.callee);
        if hold {
            // c_hold_unhold: every event before the reply.
            self.raise("E_CALL_HOLD", event("caller", "start"));
            if caller_outcome == "fail" {
                self.raise("E_CALL_HOLD", event("caller", "fail"));
            }
            self.raise("E_CALL_HOLD", event("callee", "start"));
            self.raise("E_CALL_HOLD", event("callee", callee_outcome));
            if caller_outcome == "ok" {
                self.raise("E_CALL_HOLD", event("caller", "ok"));
            }
        } else {
            // c_hold_unhold: callee start, the reply, then the rest.
            self.raise("E_CALL_HOLD", event("callee", "start"));
            let node = self.clone();
            let rest = [
                event("caller", "start"),
                event("callee", callee_outcome),
                event("caller", caller_outcome),
            ];
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                for params in rest {
                    node.raise("E_CALL_HOLD", params);
                }
            });
        }
        Ok(json!("OK"))
    }

    fn end(&self, params: &Value) -> MiResult {
        let p = match_params(params, &[&["dialog_id"], &["dialog_id", "extra_hdrs"]])?;
        let key = text(&p, "dialog_id").unwrap_or_default();
        let dialog = self
            .find(&key)
            .ok_or_else(|| MiError::new(404, "Requested Dialog not found"))?;
        self.set_state(&dialog.callid, 5);
        Ok(json!("OK"))
    }

    fn list(&self, params: &Value) -> MiResult {
        let p = match_params(
            params,
            &[
                &[],
                &["callid"],
                &["callid", "from_tag"],
                &["index", "counter"],
            ],
        )?;
        let mut dialogs = lock(&self.dialogs);
        dialogs.retain(|d| d.ended_at.is_none_or(|at| at.elapsed() < LINGER));
        if let Some(callid) = text(&p, "callid") {
            let dialog = dialogs
                .iter()
                .rev()
                .find(|d| d.callid == callid)
                .ok_or_else(|| MiError::new(404, "No such dialog"))?;
            return Ok(json!({"Dialog": self.dialog_json(dialog)}));
        }
        let index = p.get("index").and_then(Value::as_u64).unwrap_or(0);
        let counter = p.get("counter").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let listed: Vec<Value> = dialogs
            .iter()
            .skip(usize::try_from(index).unwrap_or(usize::MAX))
            .take(usize::try_from(counter).unwrap_or(usize::MAX))
            .map(|d| self.dialog_json(d))
            .collect();
        Ok(json!({"Dialogs": listed}))
    }

    fn dialog_json(&self, d: &Dialog) -> Value {
        let timeout = if d.state == 5 { 0 } else { d.timestart + 3600 };
        let mut value = Map::new();
        value.insert("ID".into(), d.id.clone().into());
        value.insert("db_id".into(), d.db_id.clone().into());
        value.insert("state".into(), d.state.into());
        value.insert("user_flags".into(), "".into());
        value.insert("timestart".into(), d.timestart.into());
        value.insert("datestart".into(), date(d.timestart).into());
        value.insert("timeout".into(), timeout.into());
        if timeout > 0 {
            value.insert("dateout".into(), date(timeout).into());
        }
        value.insert("callid".into(), d.callid.clone().into());
        value.insert("from_uri".into(), d.from_uri.clone().into());
        value.insert("to_uri".into(), d.to_uri.clone().into());
        value.insert("caller_tag".into(), d.caller_tag.clone().into());
        value.insert("caller_contact".into(), self.contact(&d.caller).into());
        value.insert("callee_cseq".into(), "0".into());
        value.insert("caller_route_set".into(), "".into());
        value.insert("caller_bind_addr".into(), "udp:127.0.0.1:5060".into());
        value.insert("caller_sdp".into(), sdp(&d.caller).into());
        let mut callees = Vec::new();
        if let Some(tag) = &d.callee_tag {
            callees.push(json!({
                "callee_tag": tag,
                "callee_contact": self.contact(&d.callee),
                "caller_cseq": "1",
                "callee_route_set": "",
                "callee_bind_addr": "udp:127.0.0.1:5060",
                "callee_sdp": sdp(&d.callee),
            }));
        }
        value.insert("CALLEES".into(), callees.into());
        Value::Object(value)
    }

    /// A call placed by phone `from` to `to` (not through MI), as i_dlg_lifecycle shows.
    /// `hangs_up_on_refer`: the phones behave like baresip (they hang the call up as soon as
    /// they accepted a REFER) rather than like pyua (they keep it until told).
    pub async fn place_call(
        self: &Arc<Self>,
        from: &str,
        to: &str,
        hangs_up_on_refer: bool,
    ) -> String {
        let callid = if hangs_up_on_refer {
            hex(16)
        } else {
            format!("{}@pyua-{from}", hex(16))
        };
        let mut dialog = self.new_dialog(
            callid.clone(),
            format!("sip:{from}@127.0.0.1"),
            format!("sip:{to}@127.0.0.1"),
            Party::Phone(from.to_owned()),
            Party::Phone(to.to_owned()),
            false,
        );
        dialog.hangs_up_on_refer = hangs_up_on_refer;
        self.insert(dialog);
        match self.phone_behaviour(to) {
            Behaviour::Answers => {
                self.set_state(&callid, 2);
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&callid, 3);
                self.set_state(&callid, 4);
            }
            Behaviour::NoAnswer => self.set_state(&callid, 2),
            _ => self.set_state(&callid, 5),
        }
        callid
    }
}

fn sdp(party: &Party) -> String {
    match party {
        Party::Proxy => "v=0\r\no=click-to-dial 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n".to_owned(),
        Party::Phone(user) => format!("v=0\r\no=- 3379185210 848403378 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 20144 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\na=ssrc:93757171 cname:sip:{user}@127.0.0.1\r\n"),
    }
}

/// OpenSIPS 4.0 namespaced MI names → the 3.x names.
fn alias(name: &str) -> Option<&'static str> {
    Some(match name {
        "core:version" => "version",
        "tm:uac_dlg" => "t_uac_dlg",
        "callops:transfer" => "call_transfer",
        "callops:hold" => "call_hold",
        "callops:unhold" => "call_unhold",
        "dialog:end_dlg" => "dlg_end_dlg",
        "dialog:list" => "dlg_list",
        "dialog:list_ctx" => "dlg_list_ctx",
        "evi:subscribe" => "event_subscribe",
        "evi:subscribers" => "subscribers_list",
        "evi:list" => "events_list",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_opensips_prints_them() {
        assert_eq!(date(1_795_349_538), "2026-11-22 12:12:18");
        assert_eq!(date(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn headers_are_found_whatever_their_case() {
        let headers = "From: <sip:alice@127.0.0.1>\r\nTo: <sip:bob@127.0.0.1>\r\nCall-Id: x-1\r\n";
        assert_eq!(header(headers, "call-id").as_deref(), Some("x-1"));
        assert_eq!(
            uri_in(&header(headers, "From").unwrap_or_default()),
            "sip:alice@127.0.0.1"
        );
        assert!(header(headers, "Content-Type").is_none());
    }
}
