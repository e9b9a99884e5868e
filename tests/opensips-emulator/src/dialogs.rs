//! The dialog model, without I/O: dialogs and their states (with the E_DLG_STATE_CHANGED
//! params each transition raises), the one-transfer-per-dialog rule, hold bookkeeping per leg
//! (3.6.8: both legs only; 4.0.1: per-leg directions) and the `dlg_list` rendering.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::Version;
use crate::mi::MiError;
use crate::phones::Phones;
use crate::sip;

/// How long ended dialogs stay listed (state 5).
pub const LINGER: Duration = Duration::from_secs(2);

/// A party of a dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    /// OpenSIPS itself (the caller leg of a `t_uac_dlg` dialog): refuses REFER and re-INVITEs.
    Proxy,
    /// A simulated phone, by user name.
    Phone(String),
}

impl Party {
    /// The phone's user, if it is a phone.
    pub fn user(&self) -> Option<&str> {
        match self {
            Party::Proxy => None,
            Party::Phone(user) => Some(user),
        }
    }
}

/// One leg of a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The caller (From) side.
    Caller,
    /// The callee (To) side.
    Callee,
}

impl Leg {
    /// The name OpenSIPS uses (`caller` / `callee`).
    pub fn name(self) -> &'static str {
        match self {
            Leg::Caller => "caller",
            Leg::Callee => "callee",
        }
    }

    /// Parses `caller` / `callee` (case-sensitive, as OpenSIPS).
    pub fn parse(text: &str) -> Option<Leg> {
        match text {
            "caller" => Some(Leg::Caller),
            "callee" => Some(Leg::Callee),
            _ => None,
        }
    }
}

/// An SDP direction offered to a leg by a hold re-INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Not held.
    SendRecv,
    /// This leg is held.
    SendOnly,
    /// The other leg is held.
    RecvOnly,
    /// Both legs held.
    Inactive,
}

fn direction(this_held: bool, other_held: bool) -> Direction {
    match (this_held, other_held) {
        (false, false) => Direction::SendRecv,
        (true, false) => Direction::SendOnly,
        (false, true) => Direction::RecvOnly,
        (true, true) => Direction::Inactive,
    }
}

/// Hold bookkeeping of one dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldState {
    /// Hold requested on the caller leg.
    pub caller: bool,
    /// Hold requested on the callee leg.
    pub callee: bool,
    /// What the caller leg last accepted.
    pub caller_dir: Direction,
    /// What the callee leg last accepted.
    pub callee_dir: Direction,
}

impl Default for HoldState {
    fn default() -> Self {
        Self {
            caller: false,
            callee: false,
            caller_dir: Direction::SendRecv,
            callee_dir: Direction::SendRecv,
        }
    }
}

/// Which legs a hold request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldLegs {
    /// No `leg` param.
    Plain,
    /// `leg: "caller"`.
    Caller,
    /// `leg: "callee"`.
    Callee,
    /// `leg: "both"`.
    Both,
}

impl HoldLegs {
    fn wants(self, leg: Leg) -> bool {
        match self {
            HoldLegs::Plain | HoldLegs::Both => true,
            HoldLegs::Caller => leg == Leg::Caller,
            HoldLegs::Callee => leg == Leg::Callee,
        }
    }
}

/// One leg re-INVITEd by a hold or unhold, and whether it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegOutcome {
    /// The leg.
    pub leg: Leg,
    /// `ok` (a phone) or `fail` (OpenSIPS itself refuses its own re-INVITE).
    pub ok: bool,
}

/// One dialog.
#[derive(Debug, Clone)]
pub struct Dialog {
    /// Dialog ID (`hex.hex`).
    pub id: String,
    /// Numeric string.
    pub db_id: String,
    /// Call-ID.
    pub callid: String,
    /// From URI.
    pub from_uri: String,
    /// To URI.
    pub to_uri: String,
    /// From tag.
    pub caller_tag: String,
    /// To tag, once the callee answered provisionally or finally.
    pub callee_tag: Option<String>,
    /// Caller party.
    pub caller: Party,
    /// Callee party.
    pub callee: Party,
    /// Caller Contact.
    pub caller_contact: String,
    /// Callee Contact.
    pub callee_contact: String,
    /// 1 unconfirmed, 2 early, 3 confirmed (no ACK), 4 confirmed, 5 deleted.
    pub state: u8,
    /// Unix start time.
    pub timestart: u64,
    /// Quirk 1: after one transfer (or rejected REFER), every `call_transfer` gets 491.
    pub transferred: bool,
    /// Hold bookkeeping.
    pub hold: HoldState,
    /// Made by `t_uac_dlg` (its caller leg is OpenSIPS itself).
    pub uac: bool,
    /// The phones' SIP stack (Call-ID style of the calls they place).
    pub phones: Phones,
    /// The transferee hangs this dialog up as soon as it accepted a REFER (baresip calls
    /// placed on their own do; pyua keeps the call until told).
    pub hangs_up_on_refer: bool,
    /// When it reached state 5.
    pub ended_at: Option<Instant>,
    /// Dialog values (`dlg_push_var`, `$dlg_val`).
    pub vals: std::collections::BTreeMap<String, String>,
}

impl Dialog {
    /// A Call-ID for a call the phone of `user` places.
    pub fn new_callid(&self, user: &str) -> String {
        self.phones.callid(user)
    }

    /// The party on `leg`.
    pub fn party(&self, leg: Leg) -> &Party {
        match leg {
            Leg::Caller => &self.caller,
            Leg::Callee => &self.callee,
        }
    }

    /// The dialog as `dlg_list` shows it (keys as in h_dlg_list).
    pub fn to_json(&self) -> Value {
        let timeout = if self.state == 5 {
            0
        } else {
            self.timestart + 3600
        };
        let mut value = Map::new();
        value.insert("ID".into(), self.id.clone().into());
        value.insert("db_id".into(), self.db_id.clone().into());
        value.insert("state".into(), self.state.into());
        value.insert("user_flags".into(), "".into());
        value.insert("timestart".into(), self.timestart.into());
        value.insert("datestart".into(), sip::date(self.timestart).into());
        value.insert("timeout".into(), timeout.into());
        if timeout > 0 {
            value.insert("dateout".into(), sip::date(timeout).into());
        }
        value.insert("callid".into(), self.callid.clone().into());
        value.insert("from_uri".into(), self.from_uri.clone().into());
        value.insert("to_uri".into(), self.to_uri.clone().into());
        value.insert("caller_tag".into(), self.caller_tag.clone().into());
        value.insert("caller_contact".into(), self.caller_contact.clone().into());
        value.insert("callee_cseq".into(), "0".into());
        value.insert("caller_route_set".into(), "".into());
        value.insert("caller_bind_addr".into(), "udp:127.0.0.1:5060".into());
        value.insert("caller_sdp".into(), sip::sdp(&self.caller).into());
        let mut callees = Vec::new();
        if let Some(tag) = &self.callee_tag {
            callees.push(json!({
                "callee_tag": tag,
                "callee_contact": self.callee_contact,
                "caller_cseq": "1",
                "callee_route_set": "",
                "callee_bind_addr": "udp:127.0.0.1:5060",
                "callee_sdp": sip::sdp(&self.callee),
            }));
        }
        value.insert("CALLEES".into(), callees.into());
        Value::Object(value)
    }
}

/// Why `call_transfer` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferRefused {
    /// No such live dialog.
    NotFound,
    /// Quirk 1: this dialog had its transfer.
    Pending,
}

/// All dialogs of a node (ended ones linger for [`LINGER`]). Live dialogs and ended ones are
/// kept apart: under load thousands of ended dialogs linger, and look-ups of live ones must not
/// scan them.
#[derive(Debug, Default)]
pub struct DialogTable {
    /// Dialogs not in state 5, oldest first.
    live: Vec<Dialog>,
    /// Ended dialogs, in the order they ended.
    ended: VecDeque<Dialog>,
}

impl DialogTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn prune(&mut self) {
        let Some(cutoff) = Instant::now().checked_sub(LINGER) else {
            return;
        };
        while self
            .ended
            .front()
            .is_some_and(|d| d.ended_at.is_none_or(|at| at <= cutoff))
        {
            self.ended.pop_front();
        }
    }

    /// Adds a dialog (state 1: no event, as OpenSIPS raises no 0→1).
    pub fn insert(&mut self, dialog: Dialog) {
        self.prune();
        self.live.push(dialog);
    }

    fn live_index(&self, callid: &str) -> Option<usize> {
        self.live.iter().rposition(|d| d.callid == callid)
    }

    fn live_mut(&mut self, callid: &str) -> Option<&mut Dialog> {
        let index = self.live_index(callid)?;
        self.live.get_mut(index)
    }

    /// Moves live dialog `callid` forward to `state`; returns the E_DLG_STATE_CHANGED params,
    /// or `None` if there is no such live dialog or it is already at or past `state`.
    pub fn set_state(&mut self, callid: &str, state: u8) -> Option<Value> {
        let index = self.live_index(callid)?;
        let dialog = self.live.get_mut(index)?;
        if state <= dialog.state || state > 5 {
            return None;
        }
        if state >= 2 && dialog.callee_tag.is_none() {
            dialog.callee_tag = Some(sip::hex(if dialog.uac { 16 } else { 10 }));
        }
        let old = dialog.state;
        dialog.state = state;
        let params = json!({
            "id": dialog.id,
            "db_id": dialog.db_id,
            "callid": dialog.callid,
            "from_tag": dialog.caller_tag,
            "to_tag": dialog.callee_tag.clone().unwrap_or_default(),
            "old_state": old,
            "new_state": state,
        });
        if state == 5 {
            let mut ended = self.live.remove(index);
            ended.ended_at = Some(Instant::now());
            self.ended.push_back(ended);
        }
        Some(params)
    }

    /// A live (not ended) dialog by Call-ID or dialog ID.
    pub fn find(&self, key: &str) -> Option<Dialog> {
        self.live
            .iter()
            .rev()
            .find(|d| d.callid == key || d.id == key)
            .cloned()
    }

    /// Changes live dialog `callid`.
    pub fn update(&mut self, callid: &str, change: impl FnOnce(&mut Dialog)) {
        if let Some(dialog) = self.live_mut(callid) {
            change(dialog);
        }
    }

    /// Starts the one transfer a dialog may have (quirk 1); returns the dialog.
    pub fn begin_transfer(&mut self, callid: &str) -> Result<Dialog, TransferRefused> {
        let dialog = self.live_mut(callid).ok_or(TransferRefused::NotFound)?;
        if dialog.transferred {
            return Err(TransferRefused::Pending);
        }
        dialog.transferred = true;
        Ok(dialog.clone())
    }

    /// `call_hold` (`hold`) or `call_unhold` on live dialog `callid`: checks, records, and
    /// returns the legs re-INVITEd (in the order their events start) with their outcome.
    pub fn hold(
        &mut self,
        callid: &str,
        legs: HoldLegs,
        hold: bool,
        version: Version,
    ) -> Result<Vec<LegOutcome>, MiError> {
        let dialog = self
            .live_mut(callid)
            .ok_or_else(|| MiError::new(404, "Dialog not found"))?;
        if dialog.state < 4 {
            return Err(MiError::new(410, "Dialog not ready"));
        }
        let order = if hold {
            [Leg::Caller, Leg::Callee]
        } else {
            [Leg::Callee, Leg::Caller]
        };
        let outcome = |dialog: &Dialog, leg: Leg| LegOutcome {
            leg,
            ok: *dialog.party(leg) != Party::Proxy,
        };
        match version {
            Version::V3_6 => {
                let state = &mut dialog.hold;
                if hold {
                    if state.caller && state.callee {
                        return Err(MiError::new(480, "Both dialog legs are on hold"));
                    }
                    (state.caller, state.callee) = (true, true);
                } else {
                    if !state.caller && !state.callee {
                        return Err(MiError::new(480, "No dialog legs on hold"));
                    }
                    (state.caller, state.callee) = (false, false);
                }
                Ok(order.iter().map(|&leg| outcome(dialog, leg)).collect())
            }
            Version::V4_0 => hold_40(dialog, legs, hold, order),
        }
    }

    /// `dlg_list {callid}`: the newest dialog with that Call-ID, ended ones included.
    pub fn by_callid(&mut self, callid: &str) -> Option<Dialog> {
        self.prune();
        let newest = |d: &&Dialog| d.callid == callid;
        self.live
            .iter()
            .rev()
            .find(newest)
            .or_else(|| self.ended.iter().rev().find(newest))
            .cloned()
    }

    /// `dlg_list` (optionally `index` + `counter`): live dialogs, then the lingering ended ones.
    pub fn listed(&mut self, index: usize, counter: usize) -> Vec<Dialog> {
        self.prune();
        self.live
            .iter()
            .chain(self.ended.iter())
            .skip(index)
            .take(counter)
            .cloned()
            .collect()
    }
}

/// OpenSIPS 4.0.1: holds add up per leg; a leg is re-INVITEd when the direction offered to it
/// changes; OpenSIPS's own leg never accepts (and a plain request leaves it alone, as
/// d_hold_caller_leg on 4.0.1 shows).
fn hold_40(
    dialog: &mut Dialog,
    legs: HoldLegs,
    hold: bool,
    order: [Leg; 2],
) -> Result<Vec<LegOutcome>, MiError> {
    let is_phone = |leg: Leg| *dialog.party(leg) != Party::Proxy;
    let state = dialog.hold;
    let held = |leg: Leg| {
        is_phone(leg)
            && match leg {
                Leg::Caller => state.caller,
                Leg::Callee => state.callee,
            }
    };
    let mut next = state;
    if hold {
        if [Leg::Caller, Leg::Callee]
            .iter()
            .all(|&leg| !legs.wants(leg) || held(leg))
        {
            return Err(MiError::new(480, "Both dialog legs are on hold"));
        }
        next.caller |= legs.wants(Leg::Caller);
        next.callee |= legs.wants(Leg::Callee);
    } else {
        if !state.caller && !state.callee {
            return Err(MiError::new(480, "No dialog legs on hold"));
        }
        match legs {
            HoldLegs::Plain | HoldLegs::Both => (next.caller, next.callee) = (false, false),
            HoldLegs::Caller => next.caller = false,
            HoldLegs::Callee => next.callee = false,
        }
    }
    let mut outcomes = Vec::new();
    for leg in order {
        let (offered, current) = match leg {
            Leg::Caller => (direction(next.caller, next.callee), state.caller_dir),
            Leg::Callee => (direction(next.callee, next.caller), state.callee_dir),
        };
        if offered == current || (legs == HoldLegs::Plain && !is_phone(leg)) {
            continue;
        }
        let ok = is_phone(leg);
        if ok {
            match leg {
                Leg::Caller => next.caller_dir = offered,
                Leg::Callee => next.callee_dir = offered,
            }
        }
        outcomes.push(LegOutcome { leg, ok });
    }
    dialog.hold = next;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog(callid: &str, caller: Party) -> Dialog {
        Dialog {
            id: "fed.b360b044".into(),
            db_id: "1234".into(),
            callid: callid.into(),
            from_uri: "sip:alice@127.0.0.1".into(),
            to_uri: "sip:bob@127.0.0.1".into(),
            caller_tag: "abc".into(),
            callee_tag: None,
            uac: caller == Party::Proxy,
            caller,
            callee: Party::Phone("bob".into()),
            caller_contact: "sip:alice@127.0.0.1:5071".into(),
            callee_contact: "sip:bob@127.0.0.1:5072".into(),
            state: 1,
            timestart: 1_795_349_538,
            transferred: false,
            hold: HoldState::default(),
            phones: Phones::Pyua,
            hangs_up_on_refer: false,
            ended_at: None,
            vals: Default::default(),
        }
    }

    fn confirmed(table: &mut DialogTable, callid: &str, caller: Party) {
        table.insert(dialog(callid, caller));
        for state in 2..=4 {
            assert!(table.set_state(callid, state).is_some());
        }
    }

    fn shape(outcomes: &[LegOutcome]) -> Vec<(&'static str, bool)> {
        outcomes.iter().map(|o| (o.leg.name(), o.ok)).collect()
    }

    #[test]
    fn states_only_move_forward_and_ended_dialogs_are_gone_for_commands() {
        let mut table = DialogTable::new();
        table.insert(dialog("c1", Party::Phone("alice".into())));
        let event = table.set_state("c1", 2).unwrap_or_default();
        assert_eq!(event["old_state"], 1);
        assert_eq!(event["new_state"], 2);
        assert!(event["to_tag"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(table.set_state("c1", 2).is_none());
        assert!(table.set_state("c1", 1).is_none());
        assert!(table.set_state("c1", 5).is_some());
        assert!(table.set_state("c1", 5).is_none());
        assert!(table.find("c1").is_none());
        assert!(table.find("fed.b360b044").is_none());
        // Still listed with state 5 for a while.
        assert_eq!(table.by_callid("c1").map(|d| d.state), Some(5));
        assert_eq!(table.listed(0, usize::MAX).len(), 1);
        assert!(table.set_state("nope", 2).is_none());
    }

    #[test]
    fn one_transfer_per_dialog() {
        let mut table = DialogTable::new();
        confirmed(&mut table, "c1", Party::Phone("alice".into()));
        assert!(table.begin_transfer("c1").is_ok());
        assert_eq!(
            table.begin_transfer("c1").err(),
            Some(TransferRefused::Pending)
        );
        assert_eq!(
            table.begin_transfer("c2").err(),
            Some(TransferRefused::NotFound)
        );
    }

    #[test]
    fn hold_36_both_legs_and_errors() {
        let mut table = DialogTable::new();
        table.insert(dialog("ring", Party::Phone("alice".into())));
        assert_eq!(
            table
                .hold("ring", HoldLegs::Plain, true, Version::V3_6)
                .err()
                .map(|e| e.code),
            Some(410)
        );
        confirmed(&mut table, "c1", Party::Phone("alice".into()));
        let held = table.hold("c1", HoldLegs::Plain, true, Version::V3_6);
        assert_eq!(
            shape(&held.unwrap_or_default()),
            [("caller", true), ("callee", true)]
        );
        let again = table.hold("c1", HoldLegs::Plain, true, Version::V3_6);
        assert_eq!(
            again.err().map(|e| e.message),
            Some("Both dialog legs are on hold".into())
        );
        let resumed = table.hold("c1", HoldLegs::Plain, false, Version::V3_6);
        assert_eq!(
            shape(&resumed.unwrap_or_default()),
            [("callee", true), ("caller", true)]
        );
        let again = table.hold("c1", HoldLegs::Plain, false, Version::V3_6);
        assert_eq!(
            again.err().map(|e| e.message),
            Some("No dialog legs on hold".into())
        );
        assert_eq!(
            table
                .hold("x", HoldLegs::Plain, true, Version::V3_6)
                .err()
                .map(|e| e.code),
            Some(404)
        );
    }

    #[test]
    fn hold_36_callstart_dialog_fails_on_the_proxy_leg() {
        let mut table = DialogTable::new();
        confirmed(&mut table, "x", Party::Proxy);
        let held = table.hold("x", HoldLegs::Plain, true, Version::V3_6);
        assert_eq!(
            shape(&held.unwrap_or_default()),
            [("caller", false), ("callee", true)]
        );
        assert!(
            table
                .hold("x", HoldLegs::Plain, true, Version::V3_6)
                .is_err()
        );
    }

    #[test]
    fn hold_40_adds_up_per_leg_as_hold_mixed_shows() {
        let mut table = DialogTable::new();
        confirmed(&mut table, "c1", Party::Phone("alice".into()));
        let both = [("caller", true), ("callee", true)];
        let both_rev = [("callee", true), ("caller", true)];
        let v = Version::V4_0;
        assert_eq!(
            shape(
                &table
                    .hold("c1", HoldLegs::Caller, true, v)
                    .unwrap_or_default()
            ),
            both
        );
        assert_eq!(
            shape(
                &table
                    .hold("c1", HoldLegs::Callee, true, v)
                    .unwrap_or_default()
            ),
            both
        );
        assert_eq!(
            table
                .hold("c1", HoldLegs::Plain, true, v)
                .err()
                .map(|e| e.code),
            Some(480)
        );
        assert_eq!(
            shape(
                &table
                    .hold("c1", HoldLegs::Caller, false, v)
                    .unwrap_or_default()
            ),
            both_rev
        );
        assert_eq!(
            shape(
                &table
                    .hold("c1", HoldLegs::Callee, false, v)
                    .unwrap_or_default()
            ),
            both_rev
        );
        assert_eq!(
            table
                .hold("c1", HoldLegs::Plain, false, v)
                .err()
                .map(|e| e.message),
            Some("No dialog legs on hold".into())
        );
        // A plain unhold resumes everything.
        assert!(table.hold("c1", HoldLegs::Callee, true, v).is_ok());
        assert!(table.hold("c1", HoldLegs::Plain, false, v).is_ok());
        assert_eq!(table.find("c1").map(|d| d.hold), Some(HoldState::default()));
    }

    #[test]
    fn hold_40_callstart_dialog_as_recorded() {
        let v = Version::V4_0;
        // d_hold_caller_leg (4.0.1): a plain hold touches the callee only, a second one is "OK".
        let mut table = DialogTable::new();
        confirmed(&mut table, "x", Party::Proxy);
        let callee = [("callee", true)];
        assert_eq!(
            shape(
                &table
                    .hold("x", HoldLegs::Plain, true, v)
                    .unwrap_or_default()
            ),
            callee
        );
        assert_eq!(
            table
                .hold("x", HoldLegs::Plain, true, v)
                .ok()
                .map(|o| o.len()),
            Some(0)
        );
        assert_eq!(
            shape(
                &table
                    .hold("x", HoldLegs::Plain, false, v)
                    .unwrap_or_default()
            ),
            callee
        );
        // hold_callstart_dialog (4.0.1).
        let mut table = DialogTable::new();
        confirmed(&mut table, "y", Party::Proxy);
        let with_caller = [("caller", false), ("callee", true)];
        assert_eq!(
            shape(
                &table
                    .hold("y", HoldLegs::Callee, true, v)
                    .unwrap_or_default()
            ),
            with_caller
        );
        assert_eq!(
            shape(
                &table
                    .hold("y", HoldLegs::Callee, false, v)
                    .unwrap_or_default()
            ),
            callee
        );
        assert_eq!(
            shape(
                &table
                    .hold("y", HoldLegs::Caller, true, v)
                    .unwrap_or_default()
            ),
            with_caller
        );
        assert_eq!(
            shape(
                &table
                    .hold("y", HoldLegs::Caller, true, v)
                    .unwrap_or_default()
            ),
            [("caller", false)]
        );
        assert_eq!(
            shape(
                &table
                    .hold("y", HoldLegs::Caller, false, v)
                    .unwrap_or_default()
            ),
            callee
        );
    }

    #[test]
    fn dlg_list_keys_as_h_dlg_list() {
        let mut d = dialog("c1", Party::Phone("alice".into()));
        d.callee_tag = Some("t".into());
        let value = d.to_json();
        let keys: Vec<&String> = value
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        for key in [
            "ID",
            "db_id",
            "state",
            "user_flags",
            "timestart",
            "datestart",
            "timeout",
            "dateout",
            "callid",
            "from_uri",
            "to_uri",
            "caller_tag",
            "caller_contact",
            "callee_cseq",
            "caller_route_set",
            "caller_bind_addr",
            "caller_sdp",
            "CALLEES",
        ] {
            assert!(keys.iter().any(|k| *k == key), "{key} missing");
        }
        assert_eq!(value["CALLEES"][0]["callee_tag"], "t");
    }
}
