//! The emulated OpenSIPS node: runs MI commands against the dialog model and plays the SIP
//! flows (phones answering, REFERs, re-INVITEs, timeouts) in time, raising the events the
//! transcripts recorded from OpenSIPS 3.6.8 and 4.0.1 show (quirks included).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::dialogs::{Dialog, DialogTable, HoldLegs, Leg, Party, TransferRefused};
use crate::events::{Events, SubscribeError};
use crate::mi::{self, Command, MiError, MiResult, match_params, text};
use crate::phones::{self, Behaviour, Phones};
use crate::script::{self, CalleeInstructions, SentRequest, SipLog};
use crate::shm::{Shm, Slot, Stats};
use crate::sip::{self, UacReply, UacRequest};
use crate::{EmulatorConfig, Version};

/// A short pause putting an event just after the MI reply that caused it.
const AFTER_REPLY: Duration = Duration::from_millis(2);

/// What an MI command gave back, as the MI transports see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Answered at once: a synchronous command, or an asynchronous one refused before it
    /// started (bad params, bad R-URI…).
    Now(MiResult),
    /// Answered through the command's async handler once it completed (`t_uac_dlg`): mi_http
    /// picks such a reply up only at its next poll step.
    Async(MiResult),
    /// No shared memory for the command's async handler: the transport builds no response
    /// at all (mi_datagram answers the plain text `500 Internal error`, mi_http an HTTP 500
    /// with an empty body).
    NoMemory,
}

/// The node.
pub struct Node {
    config: EmulatorConfig,
    dialogs: Mutex<DialogTable>,
    events: Mutex<Events>,
    crashed: CancellationToken,
    counter: AtomicU64,
    shm: Arc<Shm>,
    /// The shm slot of each INVITE the proxy relays while it rings (by Call-ID).
    ringing: Mutex<HashMap<String, Slot>>,
    /// The SIP requests sent, for tests (`GET /emulator/sip`).
    sent: Mutex<SipLog>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Node {
    /// A node with no dialogs and no subscriptions, sending event datagrams from `udp`.
    pub fn new(config: EmulatorConfig, udp: std::net::UdpSocket) -> Arc<Self> {
        let events = Events::new(udp, config.version);
        Arc::new(Self {
            dialogs: Mutex::new(DialogTable::new()),
            events: Mutex::new(events),
            crashed: CancellationToken::new(),
            counter: AtomicU64::new(1),
            shm: Shm::new(config.shm_budget),
            ringing: Mutex::new(HashMap::new()),
            sent: Mutex::new(SipLog::default()),
            config,
        })
    }

    /// The shared-memory budget's counters now.
    pub fn stats(&self) -> Stats {
        self.shm.stats()
    }

    /// How long mi_http's httpd sleeps between checks for an async reply.
    pub fn mi_http_poll(&self) -> Duration {
        self.config.mi_http_poll
    }

    /// Which OpenSIPS this node behaves like.
    pub fn version(&self) -> Version {
        self.config.version
    }

    /// Whether the node crashed (it then answers nothing and raises nothing).
    pub fn crashed(&self) -> bool {
        self.crashed.is_cancelled()
    }

    /// Cancelled when the node crashes.
    pub fn crash_token(&self) -> CancellationToken {
        self.crashed.clone()
    }

    /// Makes the node crash (OpenSIPS 4.0.1 on a method-less request over mi_datagram).
    pub fn crash(&self) {
        tracing::error!("emulated crash: OpenSIPS 4.0.1 segfaults on a request without a method");
        self.crashed.cancel();
    }

    fn raise(&self, event: &str, params: Value) {
        if self.crashed() {
            return;
        }
        lock(&self.events).raise(event, params);
    }

    /// The user whose phone listens at `contact` (`sip:[user@]127.0.0.1:PORT`), if any.
    fn phone_at(&self, contact: &str) -> Option<String> {
        let host = script::host_of(contact);
        let port: u16 = host.strip_prefix("127.0.0.1:")?.parse().ok()?;
        ["alice", "bob", "cindy", "dave", "busy", "noanswer", "dead"]
            .into_iter()
            .map(str::to_owned)
            .chain(self.config.extra_phones.iter().cloned())
            .find(|user| phones::port(user, &self.config.extra_phones) == port)
    }

    fn behaviour(&self, user: &str) -> Behaviour {
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
            Party::Phone(user) => match self.config.version {
                Version::V3_6 => format!(
                    "sip:{user}-0x55f47d82dec0@127.0.0.1:{}",
                    phones::port(user, &self.config.extra_phones)
                ),
                Version::V4_0 => self.phone_uri(user),
            },
        }
    }

    fn new_dialog(
        &self,
        callid: String,
        from_uri: String,
        to_uri: String,
        caller: Party,
        callee: Party,
    ) -> Dialog {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let uac = caller == Party::Proxy;
        // The recordings' phones: baresip on 3.6.8, pyua on 4.0.1.
        let phones = match self.config.version {
            Version::V3_6 => Phones::Baresip,
            Version::V4_0 => Phones::Pyua,
        };
        Dialog {
            id: format!("{:x}.{}", 0x100 + (n % 0xe00), sip::hex(8)),
            db_id: format!("{}", 1_000_000_000 + n * 7919),
            callid,
            from_uri,
            to_uri,
            caller_tag: if uac {
                format!("533cb9e91f4b999cf76861cbb9ed54ed-{}", sip::hex(4))
            } else {
                sip::hex(10)
            },
            callee_tag: None,
            caller_contact: self.contact(&caller),
            callee_contact: self.contact(&callee),
            caller,
            callee,
            state: 1,
            timestart: sip::now_secs(),
            transferred: false,
            hold: Default::default(),
            uac,
            phones,
            // a_callstart: baresip hangs the click-to-dial call up once transferred; pyua not.
            hangs_up_on_refer: uac && phones == Phones::Baresip,
            ended_at: None,
            vals: Default::default(),
        }
    }

    /// Moves dialog `callid` to `state`, raising E_DLG_STATE_CHANGED.
    fn set_state(&self, callid: &str, state: u8) {
        let params = lock(&self.dialogs).set_state(callid, state);
        if state >= 3 {
            // Answered or gone: its INVITE transaction no longer holds shared memory.
            let slot = lock(&self.ringing).remove(callid);
            drop(slot);
        }
        if let Some(params) = params {
            self.raise("E_DLG_STATE_CHANGED", params);
        }
    }

    /// Takes a shm slot for an INVITE the proxy relays (transfer target, phone-placed call),
    /// held while dialog `callid` rings; false if there is no memory for it: the proxy then
    /// rejects the INVITE statelessly (500), before any dialog exists.
    fn admit_invite(&self, callid: &str) -> bool {
        match self.shm.acquire("a relayed INVITE") {
            Some(slot) => {
                lock(&self.ringing).insert(callid.to_owned(), slot);
                true
            }
            None => {
                tracing::error!(
                    %callid,
                    "ERROR:tm:t_newtran: out of memory: INVITE rejected statelessly (500)"
                );
                false
            }
        }
    }

    /// Moves dialog `callid` to `state` just after the current MI reply went out.
    fn set_state_later(self: &Arc<Self>, callid: &str, state: u8) {
        let node = self.clone();
        let callid = callid.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(AFTER_REPLY).await;
            node.set_state(&callid, state);
        });
    }

    fn find(&self, key: &str) -> Option<Dialog> {
        lock(&self.dialogs).find(key)
    }

    fn answered_status(&self) -> &'static str {
        match self.config.version {
            Version::V3_6 => "200 Answering",
            Version::V4_0 => "200 OK",
        }
    }

    fn server_line(&self) -> &'static str {
        match self.config.version {
            Version::V3_6 => "Server: OpenSIPS (3.6.8 (x86_64/linux))",
            Version::V4_0 => "Server: OpenSIPS (4.0.1 (x86_64/linux))",
        }
    }

    /// The SIP requests sent for `callid` (all when `None`), oldest first.
    pub fn sent(&self, callid: Option<&str>) -> Vec<SentRequest> {
        lock(&self.sent).of(callid)
    }

    /// Runs one MI command (already past the envelope checks).
    pub async fn call(self: &Arc<Self>, method: &str, params: &Value) -> Answer {
        let command = match mi::resolve(self.config.version, method) {
            Ok(command) => command,
            Err(error) => return Answer::Now(Err(error)),
        };
        if command.is_async() {
            // The transport builds the async handler before the params are even looked at.
            let Some(slot) = self.shm.acquire("an MI async handler") else {
                return Answer::NoMemory;
            };
            let result = self.uac_dlg(params).await;
            drop(slot);
            return match result {
                Ok(value) => Answer::Async(Ok(value)),
                Err(error) => Answer::Now(Err(error)),
            };
        }
        Answer::Now(self.call_sync(command, params))
    }

    /// Runs a synchronous command.
    fn call_sync(self: &Arc<Self>, command: Command, params: &Value) -> MiResult {
        match command {
            Command::Version => {
                match_params(params, &[&[]])?;
                Ok(json!({"Server": match self.config.version {
                    Version::V3_6 => "OpenSIPS (3.6.8 (x86_64/linux))",
                    Version::V4_0 => "OpenSIPS (4.0.1 (x86_64/linux))",
                }}))
            }
            Command::Which => {
                match_params(params, &[&[]])?;
                Ok(json!(mi::NAMES_40.as_slice()))
            }
            Command::Help => {
                let p = match_params(params, &[&["mi_cmd"]])?;
                let name = text(&p, "mi_cmd").unwrap_or_default();
                let command = mi::resolve(self.config.version, &name)
                    .map_err(|_| MiError::new(404, "Unknown MI command"))?;
                Ok(
                    json!({"Help": "not available for this command", "Exported by": command.module()}),
                )
            }
            Command::EventsList => {
                match_params(params, &[&[]])?;
                Ok(lock(&self.events).events_list())
            }
            Command::EventSubscribe => self.event_subscribe(params),
            Command::SubscribersList => {
                let p = match_params(params, &[&[], &["event"], &["event", "socket"]])?;
                let event = text(&p, "event");
                lock(&self.events)
                    .list(event.as_deref())
                    .ok_or_else(|| MiError::new(404, "Unknown event"))
            }
            Command::Transfer => self.transfer(params),
            Command::Hold => self.hold(params, true),
            Command::Unhold => self.hold(params, false),
            Command::EndDlg => self.end(params),
            Command::DlgList => self.list(params),
            Command::PushVar => self.push_var(params),
            // Asynchronous: run by `call` itself, never here.
            Command::UacDlg => Err(MiError::no_method()),
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
                .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
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
                &["method", "ruri", "headers", "next_hop"],
                &["method", "ruri", "headers", "body"],
                &["method", "ruri", "headers", "next_hop", "body"],
                &["method", "ruri", "headers", "body", "next_hop"],
            ],
        )?;
        let method = text(&p, "method").unwrap_or_default();
        let ruri = text(&p, "ruri").unwrap_or_default();
        let headers = text(&p, "headers").unwrap_or_default();
        if !sip::valid_ruri(&ruri) {
            return Err(MiError::new(400, "Invalid ruri"));
        }
        let Some(from) = sip::header(&headers, "From") else {
            return Err(MiError::new(400, "From missing"));
        };
        if p.contains_key("body") && sip::header(&headers, "Content-Type").is_none() {
            return Err(MiError::new(400, "Content-Type missing"));
        }
        let request = UacRequest {
            method: method.clone(),
            to: sip::header(&headers, "To").unwrap_or_default(),
            callid: sip::header(&headers, "Call-Id")
                .or_else(|| sip::header(&headers, "Call-ID"))
                .unwrap_or_else(|| format!("{}-{}@127.0.0.1", sip::hex(16), sip::hex(5))),
            cseq: sip::header(&headers, "CSeq")
                .and_then(|c| c.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "1".to_owned()),
            from,
        };
        lock(&self.sent).push(SentRequest {
            callid: request.callid.clone(),
            method: method.clone(),
            ruri: ruri.clone(),
            destination: text(&p, "next_hop"),
            headers: script::header_lines(&headers),
            body: text(&p, "body"),
        });
        let user = phones::user_of(&ruri).to_owned();
        if method != "INVITE" {
            return Ok(self.uac_other(&request, &user));
        }
        let dialog = self.new_dialog(
            request.callid.clone(),
            sip::uri_in(&request.from),
            sip::uri_in(&request.to),
            Party::Proxy,
            Party::Phone(user.clone()),
        );
        let (did, from_tag) = (dialog.id.clone(), dialog.caller_tag.clone());
        let callid = request.callid.clone();
        lock(&self.dialogs).insert(dialog);
        let failed = |status: &str, server: &str| {
            let reply = UacReply {
                from_tag: from_tag.clone(),
                to_tag: sip::hex(10),
                server: server.to_owned(),
                ..UacReply::default()
            };
            json!({"Status": status, "Message": sip::reply_text(&request, &reply)})
        };
        let phone_server = format!("User-Agent: pyua/{user}");
        match self.behaviour(&user) {
            Behaviour::Answers => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&callid, 2);
                self.set_state(&callid, 3);
                self.set_state_later(&callid, 4);
                let route = format!("sip:127.0.0.1;lr;ftag={from_tag};did={did}");
                let contact = self.contact(&Party::Phone(user));
                let to_tag = self
                    .find(&callid)
                    .and_then(|d| d.callee_tag)
                    .unwrap_or_default();
                let reply = UacReply {
                    from_tag: from_tag.clone(),
                    to_tag,
                    server: phone_server,
                    record_route: Some(route.clone()),
                    contact: Some(contact.clone()),
                    sdp: true,
                };
                Ok(json!({
                    "Status": self.answered_status(),
                    "RURI": contact,
                    "Next-hop": route,
                    "Routes": [format!("<{route}>")],
                    "Message": sip::reply_text(&request, &reply),
                }))
            }
            Behaviour::Busy => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state_later(&callid, 5);
                Ok(failed("486 Busy Here", &phone_server))
            }
            Behaviour::NoAnswer => {
                self.set_state(&callid, 2);
                tokio::time::sleep(self.config.ring_timeout).await;
                self.set_state(&callid, 5);
                Ok(failed("408 Request Timeout", self.server_line()))
            }
            Behaviour::Dead => {
                tokio::time::sleep(self.config.dead_timeout).await;
                self.set_state_later(&callid, 5);
                Ok(failed("408 Request Timeout", self.server_line()))
            }
            Behaviour::Unknown => {
                self.set_state(&callid, 5);
                Ok(failed("404 User Not Found", self.server_line()))
            }
        }
    }

    /// `t_uac_dlg` with a method other than INVITE: answered simply.
    fn uac_other(&self, request: &UacRequest, user: &str) -> Value {
        let reply = |server: &str| {
            let reply = UacReply {
                from_tag: format!("533cb9e91f4b999cf76861cbb9ed54ed-{}", sip::hex(4)),
                to_tag: sip::hex(16),
                server: server.to_owned(),
                ..UacReply::default()
            };
            sip::reply_text(request, &reply)
        };
        if request.method == "BYE" {
            // Sent outside the dialog module (a_callstart): the phone answers, the dialog as
            // OpenSIPS tracks it stays as it is.
            let live = self.find(&request.callid).is_some_and(|d| d.state == 4);
            let status = if live {
                "200 OK"
            } else {
                "481 Call Does Not Exist"
            };
            let message = reply(&format!("User-Agent: pyua/{user}"));
            return json!({"Status": status, "Message": message});
        }
        if self.behaviour(user) == Behaviour::Unknown {
            let message = reply(self.server_line());
            return json!({"Status": "404 User Not Found", "Message": message});
        }
        let contact = self.contact(&Party::Phone(user.to_owned()));
        let message = reply(&format!("User-Agent: pyua/{user}"));
        json!({"Status": "200 OK", "RURI": contact, "Next-hop": contact, "Message": message})
    }

    /// `dlg_push_var {dlg_val_name, dlg_val_value, DID: [Call-ID or dialog id, …]}`: sets a
    /// dialog value; unknown dialogs are skipped, the answer is "OK" all the same.
    fn push_var(&self, params: &Value) -> MiResult {
        let p = match_params(params, &[&["dlg_val_name", "dlg_val_value", "DID"]])?;
        let name = text(&p, "dlg_val_name").ok_or_else(MiError::bad_value)?;
        let value = text(&p, "dlg_val_value").ok_or_else(MiError::bad_value)?;
        let Some(Value::Array(ids)) = p.get("DID") else {
            return Err(MiError::invalid_params("Bad type for parameter 'DID'"));
        };
        let mut dialogs = lock(&self.dialogs);
        for id in ids {
            let Some(id) = id.as_str() else {
                return Err(MiError::invalid_params(
                    "Bad type for array item in parameter 'DID'",
                ));
            };
            dialogs.update(id, |d| {
                d.vals.insert(name.clone(), value.clone());
            });
        }
        Ok(json!("OK"))
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
        let leg = text(&p, "leg")
            .as_deref()
            .and_then(Leg::parse)
            .ok_or_else(MiError::bad_value)?;
        let callid = text(&p, "callid").unwrap_or_default();
        let refused = |refused: TransferRefused| match refused {
            TransferRefused::NotFound => MiError::new(404, "Dialog not found"),
            TransferRefused::Pending => MiError::new(491, "Request Pending"),
        };
        if let Some(transfer_callid) = text(&p, "transfer_callid") {
            let transfer_leg = text(&p, "transfer_leg")
                .as_deref()
                .and_then(Leg::parse)
                .ok_or_else(MiError::bad_value)?;
            let b = self
                .find(&transfer_callid)
                .ok_or_else(|| MiError::new(404, "Transfer dialog not found"))?;
            let a = lock(&self.dialogs)
                .begin_transfer(&callid)
                .map_err(refused)?;
            self.refer_room(&callid)?;
            let node = self.clone();
            tokio::spawn(async move { node.run_attended(a, leg, b, transfer_leg).await });
            return Ok(json!("Accepted"));
        }
        let destination = text(&p, "destination").unwrap_or_default();
        let dialog = lock(&self.dialogs)
            .begin_transfer(&callid)
            .map_err(refused)?;
        self.refer_room(&callid)?;
        let node = self.clone();
        tokio::spawn(async move { node.run_blind(dialog, leg, destination).await });
        Ok(json!("Accepted"))
    }

    /// Whether the REFER of a transfer of `callid` can be sent; if not, callops forgets the
    /// transfer (a later one is allowed) and its handler returns no response (-32000).
    fn refer_room(&self, callid: &str) -> Result<(), MiError> {
        if self.shm.room("a REFER") {
            return Ok(());
        }
        lock(&self.dialogs).update(callid, |d| d.transferred = false);
        tracing::error!(%callid, "ERROR:callops:mi_call_blind_transfer: could not send the transfer message!");
        Err(MiError::command_null())
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

    /// A blind transfer: the phone on `leg` gets a REFER and calls `destination`.
    async fn run_blind(self: Arc<Self>, dialog: Dialog, leg: Leg, destination: String) {
        tokio::time::sleep(AFTER_REPLY).await;
        let Party::Phone(transferee) = dialog.party(leg).clone() else {
            // OpenSIPS itself rejects the REFER: no event at all (quirk 2).
            return;
        };
        let new_callid = dialog.new_callid(&transferee);
        // The phone calls from its own address of record, in the domain it is registered in.
        let aor = format!(
            "sip:{transferee}@{}",
            registered_domain(&dialog, &transferee)
        );
        // The phone's INVITE, as our shipped script relays it toward the callee.
        let mut invite = SentRequest {
            callid: new_callid.clone(),
            method: "INVITE".to_owned(),
            ruri: destination.clone(),
            destination: None,
            headers: vec![
                format!("From: <{aor}>;tag={}", sip::hex(10)),
                format!("To: <{destination}>"),
                format!("Call-ID: {new_callid}"),
                "CSeq: 1 INVITE".to_owned(),
                format!("Referred-By: <{aor}>"),
                "Content-Type: application/sdp".to_owned(),
            ],
            body: Some(sip::sdp(&Party::Phone(transferee.clone()))),
        };
        let mut trunk_behaviour = None;
        if let Some(instructions) = dialog
            .vals
            .get(script::CALLEE_VALUE)
            .and_then(|v| CalleeInstructions::parse(v))
        {
            instructions.apply(&mut invite);
            if let (Some(_), Some(du)) = (&instructions.trunk, &instructions.du) {
                let gateway = script::host_of(du);
                trunk_behaviour = Some(if self.config.trunk_gateways.contains(&gateway) {
                    Behaviour::Answers
                } else {
                    Behaviour::Dead
                });
            }
        }
        // Whose phone rings: the one at the contact the script sent it to, else the
        // Request-URI's user once the script is done.
        let target = match (&trunk_behaviour, &invite.destination) {
            (None, Some(contact)) => self.phone_at(contact),
            _ => Some(phones::user_of(&invite.ruri).to_owned()),
        };
        let behaviour = match (trunk_behaviour, &target) {
            (Some(behaviour), _) => behaviour,
            (None, Some(user)) => self.behaviour(user),
            // Nothing listens at that contact.
            (None, None) => Behaviour::Dead,
        };
        let target = target.unwrap_or_else(|| phones::user_of(&invite.ruri).to_owned());
        lock(&self.sent).push(invite);
        let mut new_dialog = self.new_dialog(
            new_callid.clone(),
            aor,
            format!("{destination};osid={}", dialog.id),
            Party::Phone(transferee),
            Party::Phone(target.clone()),
        );
        new_dialog.phones = dialog.phones;
        lock(&self.dialogs).insert(new_dialog);
        // No memory for the new INVITE: rejected statelessly like an unknown user's.
        if behaviour == Behaviour::Unknown || !self.admit_invite(&new_callid) {
            // Quirk 2: the proxy rejects the new call statelessly; no transfer event.
            self.set_state(&new_callid, 5);
            if dialog.hangs_up_on_refer {
                self.set_state(&dialog.callid, 5);
            }
            return;
        }
        let full_destination = format!("{};osid={}", self.phone_uri(&target), dialog.id);
        let (callid, leg) = (dialog.callid.as_str(), leg.name());
        // Quirk 3: the start event carries the transfer Call-ID as its leg.
        self.transfer_event(
            callid,
            &new_callid,
            &new_callid,
            &full_destination,
            "start",
            "",
        );
        if dialog.hangs_up_on_refer && !dialog.uac {
            self.set_state(callid, 5);
        }
        let fail = |status: &str| {
            self.transfer_event(callid, leg, &new_callid, &full_destination, "fail", status);
        };
        match behaviour {
            Behaviour::Answers => {
                if self.config.version == Version::V3_6 {
                    self.transfer_event(callid, leg, &new_callid, "", "notify", "100 Trying");
                }
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&new_callid, 2);
                if dialog.uac && dialog.hangs_up_on_refer {
                    // a_callstart: the phone hangs the click-to-dial leg up as the new call rings.
                    self.set_state(callid, 5);
                }
                self.set_state(&new_callid, 3);
                self.transfer_event(
                    callid,
                    leg,
                    &new_callid,
                    &full_destination,
                    "ok",
                    self.answered_status(),
                );
                self.set_state(&new_callid, 4);
                self.transfer_event(callid, "", &new_callid, "", "notify", "200 OK");
            }
            Behaviour::Busy => {
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&new_callid, 5);
                fail("486 Busy Here");
                self.transfer_event(callid, "", &new_callid, "", "notify", "486 Busy Here");
            }
            Behaviour::NoAnswer => {
                self.set_state(&new_callid, 2);
                tokio::time::sleep(self.config.ring_timeout).await;
                self.set_state(&new_callid, 5);
                fail("408 Request Timeout");
            }
            Behaviour::Dead => {
                tokio::time::sleep(self.config.dead_timeout).await;
                self.set_state(&new_callid, 5);
                fail("408 Request Timeout");
            }
            Behaviour::Unknown => {}
        }
    }

    /// An attended transfer: the party on `leg` of A calls the party on `transfer_leg` of B,
    /// replacing B.
    async fn run_attended(self: Arc<Self>, a: Dialog, leg: Leg, b: Dialog, transfer_leg: Leg) {
        tokio::time::sleep(AFTER_REPLY).await;
        let (Party::Phone(transferee), Party::Phone(target)) =
            (a.party(leg).clone(), b.party(transfer_leg).clone())
        else {
            return;
        };
        let new_callid = a.new_callid(&transferee);
        let destination = self.phone_uri(&target);
        let mut new_dialog = self.new_dialog(
            new_callid.clone(),
            format!("sip:{transferee}@{}", registered_domain(&a, &transferee)),
            format!("sip:{target}@{}", registered_domain(&b, &target)),
            Party::Phone(transferee),
            Party::Phone(target),
        );
        new_dialog.phones = a.phones;
        lock(&self.dialogs).insert(new_dialog);
        if !self.admit_invite(&new_callid) {
            // Rejected statelessly: like quirk 2, no transfer event at all.
            self.set_state(&new_callid, 5);
            return;
        }
        let (leg, transfer_leg) = (leg.name(), transfer_leg.name());
        self.transfer_event(&a.callid, leg, &new_callid, &destination, "start", "");
        self.transfer_event(
            &b.callid,
            transfer_leg,
            &new_callid,
            &destination,
            "start",
            "",
        );
        tokio::time::sleep(self.config.answer_delay).await;
        self.set_state(&new_callid, 2);
        self.set_state(&new_callid, 3);
        let ok = self.answered_status();
        self.transfer_event(&b.callid, transfer_leg, &new_callid, &destination, "ok", ok);
        self.transfer_event(&a.callid, leg, &new_callid, &destination, "ok", ok);
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
        let legs = match p.get("leg") {
            None => HoldLegs::Plain,
            Some(Value::Null) => {
                return Err(MiError::invalid_params("Bad type for parameter 'leg'"));
            }
            Some(Value::String(leg)) => match leg.as_str() {
                "caller" => HoldLegs::Caller,
                "callee" => HoldLegs::Callee,
                "both" => HoldLegs::Both,
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
        let before = self.find(&callid).map(|d| d.hold);
        let outcomes = lock(&self.dialogs).hold(&callid, legs, hold, self.config.version)?;
        if !self.shm.room("a re-INVITE") {
            // The first re-INVITE cannot be sent: nothing changes, the handler returns none.
            if let Some(before) = before {
                lock(&self.dialogs).update(&callid, |d| d.hold = before);
            }
            tracing::error!(%callid, "ERROR:callops:call_put_leg_onhold: failed to send the re-INVITE");
            return Err(MiError::command_null());
        }
        let action = if hold { "hold" } else { "unhold" };
        let event = |leg: Leg, state: &str| json!({"callid": callid, "leg": leg.name(), "action": action, "state": state});
        let outcome = |ok: bool| if ok { "ok" } else { "fail" };
        if hold {
            // c_hold_unhold / d_hold_caller_leg: every event before the reply; OpenSIPS's own
            // leg fails at once, the phones answer in reverse order.
            for o in &outcomes {
                self.raise("E_CALL_HOLD", event(o.leg, "start"));
                if !o.ok {
                    self.raise("E_CALL_HOLD", event(o.leg, "fail"));
                }
            }
            for o in outcomes.iter().rev().filter(|o| o.ok) {
                self.raise("E_CALL_HOLD", event(o.leg, "ok"));
            }
        } else if let Some((first, rest)) = outcomes.split_first() {
            // c_hold_unhold: the first start, the reply, then the rest.
            self.raise("E_CALL_HOLD", event(first.leg, "start"));
            let mut later: Vec<Value> = rest.iter().map(|o| event(o.leg, "start")).collect();
            later.extend(outcomes.iter().map(|o| event(o.leg, outcome(o.ok))));
            let node = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(AFTER_REPLY).await;
                for params in later {
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
        if !self.shm.room("a BYE") {
            if dialog.state >= 3 {
                // dlg_send_dual_bye: both BYEs fail, and the dialog is ended locally anyway
                // (dual_bye_event), the phones untold.
                for leg in ["caller", "callee"] {
                    tracing::error!(callid = %dialog.callid, leg, "ERROR:dialog:send_leg_bye: failed to send the BYE request");
                }
                self.set_state(&dialog.callid, 5);
            } else {
                tracing::error!(callid = %dialog.callid, "ERROR:dialog:dlg_end_dlg: Failed to send cancels");
            }
            return Err(MiError::new(500, "Operation failed"));
        }
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
        if let Some(callid) = text(&p, "callid") {
            let dialog = dialogs
                .by_callid(&callid)
                .ok_or_else(|| MiError::new(404, "No such dialog"))?;
            return Ok(json!({"Dialog": dialog.to_json()}));
        }
        let number = |name: &str| -> Result<Option<usize>, MiError> {
            match p.get(name) {
                None => Ok(None),
                Some(value) => value
                    .as_u64()
                    .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(MiError::bad_value),
            }
        };
        let index = number("index")?.unwrap_or(0);
        let counter = number("counter")?.unwrap_or(usize::MAX);
        let listed: Vec<Value> = dialogs
            .listed(index, counter)
            .iter()
            .map(Dialog::to_json)
            .collect();
        Ok(json!({"Dialogs": listed}))
    }

    /// A call placed by phone `from` to `to` (not through MI), as i_dlg_lifecycle shows;
    /// returns its Call-ID once the callee answered, rang or refused.
    pub async fn place_call(self: &Arc<Self>, from: &str, to: &str, phones: Phones) -> String {
        let callid = phones.callid(from);
        let mut dialog = self.new_dialog(
            callid.clone(),
            format!("sip:{from}@127.0.0.1"),
            format!("sip:{to}@127.0.0.1"),
            Party::Phone(from.to_owned()),
            Party::Phone(to.to_owned()),
        );
        dialog.phones = phones;
        dialog.hangs_up_on_refer = phones == Phones::Baresip;
        let behaviour = self.behaviour(to);
        if !matches!(behaviour, Behaviour::Busy | Behaviour::Unknown) && !self.admit_invite(&callid)
        {
            // No memory: the INVITE is rejected statelessly, no dialog ever exists.
            return callid;
        }
        lock(&self.dialogs).insert(dialog);
        match behaviour {
            Behaviour::Answers => {
                self.set_state(&callid, 2);
                tokio::time::sleep(self.config.answer_delay).await;
                self.set_state(&callid, 3);
                self.set_state(&callid, 4);
            }
            Behaviour::Busy | Behaviour::Unknown => self.set_state(&callid, 5),
            Behaviour::NoAnswer => {
                self.set_state(&callid, 2);
                self.end_after(&callid, self.config.ring_timeout);
            }
            Behaviour::Dead => self.end_after(&callid, self.config.dead_timeout),
        }
        callid
    }

    /// Ends dialog `callid` after `delay` unless it was answered or ended meanwhile (a
    /// transaction timeout: 408).
    fn end_after(self: &Arc<Self>, callid: &str, delay: Duration) {
        let node = self.clone();
        let callid = callid.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if node.find(&callid).is_some_and(|d| d.state < 3) {
                node.set_state(&callid, 5);
            }
        });
    }

    /// A phone hangs call `callid` up (BYE once answered, CANCEL while ringing); false if there
    /// is no such live call.
    pub fn hang_up(&self, callid: &str) -> bool {
        if self.find(callid).is_none() {
            return false;
        }
        self.set_state(callid, 5);
        true
    }
}

/// The domain `user`'s phone is registered in, as `dialog`'s From or To shows it (the host of
/// the URI naming that user, without a port); 127.0.0.1, the phones' own host, when neither
/// does.
fn registered_domain(dialog: &Dialog, user: &str) -> String {
    [&dialog.from_uri, &dialog.to_uri]
        .into_iter()
        .find(|uri| phones::user_of(uri) == user)
        .map(|uri| script::host_of(uri))
        .map(|host| host.split(':').next().unwrap_or_default().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_owned())
}
