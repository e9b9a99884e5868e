//! The live view of a node's dialogs, without I/O: each OpenSIPS event (and each `dlg_list`
//! answer) becomes the writes that bring the session store up to date. One record per dialog
//! (`CallRecord`); a transfer's new call joins the session of the call it came from.
//!
//! The book keeps what it last wrote, so an event that changes nothing visible writes nothing,
//! and it is what reconciliation compares with the node's own list.

use std::collections::HashMap;

use callapi_kit::calls;

use crate::parse::without_osid;
use callapi_proto::v1::{
    CallRecord, DialogState, HoldAction, HoldState, Leg, OpensipsEvent, TransferState,
    opensips_event,
};

/// One write to the session store.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Store this record (under `calls::key(tenant, node, callid)`).
    Put(CallRecord),
    /// Remove the record of this dialog.
    Delete {
        /// Tenant.
        tenant: String,
        /// Node.
        node_id: String,
        /// Call-ID.
        callid: String,
    },
}

/// What a write asks of the caller besides writing.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The writes, in order.
    pub writes: Vec<Write>,
    /// Dialogs first seen, whose parties (From/To) should be asked of the node.
    pub ask_parties: Vec<String>,
    /// Dialogs the node's full list did not show: gone, or missed by a paged listing (a page
    /// shifts when a dialog before it ends). Ask the node about each before forgetting it.
    pub suspects: Vec<String>,
}

/// A dialog as the node lists it (`dlg_list`).
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    /// Call-ID.
    pub callid: String,
    /// State 1 to 5.
    pub state: DialogState,
    /// From URI.
    pub from_uri: String,
    /// To URI.
    pub to_uri: String,
    /// When it was answered, Unix seconds (0 if not yet).
    pub timestart: u64,
}

/// How long a transfer's link to its new call is kept while that call has not shown up.
const LINK_TTL_MS: u64 = 60_000;

/// The records of one node.
#[derive(Debug)]
pub struct Book {
    tenant: String,
    node_id: String,
    records: HashMap<String, CallRecord>,
    /// New calls announced by a transfer (Call-ID → session id and when), not seen yet.
    links: HashMap<String, (u64, u64)>,
}

impl Book {
    /// An empty book for `node_id` of `tenant`.
    pub fn new(tenant: &str, node_id: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            node_id: node_id.to_owned(),
            records: HashMap::new(),
            links: HashMap::new(),
        }
    }

    /// The records it holds.
    pub fn records(&self) -> impl Iterator<Item = &CallRecord> {
        self.records.values()
    }

    /// Whether dialog `callid` is recorded without its parties yet.
    pub fn lacks_parties(&self, callid: &str) -> bool {
        self.records
            .get(callid)
            .is_some_and(|r| r.caller_uri.is_empty() && r.callee_uri.is_empty())
    }

    /// Takes a record found in the store (at start-up).
    pub fn load(&mut self, record: CallRecord) {
        self.records.insert(record.callid.clone(), record);
    }

    fn delete(&mut self, callid: &str) -> Write {
        self.records.remove(callid);
        Write::Delete {
            tenant: self.tenant.clone(),
            node_id: self.node_id.clone(),
            callid: callid.to_owned(),
        }
    }

    fn new_record(&mut self, callid: &str, now_ms: u64) -> CallRecord {
        let session_id = match self.links.remove(callid) {
            Some((session_id, _)) => session_id,
            None => calls::session_id(&self.tenant, callid),
        };
        CallRecord {
            tenant: self.tenant.clone(),
            node_id: self.node_id.clone(),
            session_id,
            callid: callid.to_owned(),
            started_at_ms: now_ms,
            ..Default::default()
        }
    }

    /// Applies one event received at `now_ms`.
    pub fn on_event(&mut self, event: &OpensipsEvent, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        match &event.body {
            Some(opensips_event::Body::DialogStateChanged(change)) => {
                let state = change.new_state();
                if change.callid.is_empty() || state == DialogState::Unspecified {
                    return outcome;
                }
                if state == DialogState::Deleted {
                    self.links.remove(&change.callid);
                    outcome.writes.push(self.delete(&change.callid));
                    return outcome;
                }
                let (mut record, fresh) = match self.records.get(&change.callid) {
                    Some(record) => (record.clone(), false),
                    None => (self.new_record(&change.callid, now_ms), true),
                };
                record.state = state as i32;
                if matches!(
                    state,
                    DialogState::ConfirmedNotAcked | DialogState::Confirmed
                ) && record.answered_at_ms == 0
                {
                    record.answered_at_ms = now_ms;
                }
                if fresh {
                    outcome.ask_parties.push(change.callid.clone());
                }
                self.put(record, now_ms, fresh, &mut outcome);
            }
            Some(opensips_event::Body::CallTransfer(transfer))
                if transfer.state() == TransferState::Start
                    && !transfer.transfer_callid.is_empty()
                    && transfer.transfer_callid != transfer.callid =>
            {
                let session_id = self.records.get(&transfer.callid).map_or_else(
                    || calls::session_id(&self.tenant, &transfer.callid),
                    |from| from.session_id,
                );
                if let Some(from) = self.records.get(&transfer.callid) {
                    let mut from = from.clone();
                    from.transferred_to = transfer.transfer_callid.clone();
                    self.put(from, now_ms, false, &mut outcome);
                }
                match self.records.get(&transfer.transfer_callid) {
                    Some(to) => {
                        let mut to = to.clone();
                        to.session_id = session_id;
                        self.put(to, now_ms, false, &mut outcome);
                    }
                    None => {
                        self.links
                            .retain(|_, (_, at)| now_ms.saturating_sub(*at) < LINK_TTL_MS);
                        self.links
                            .insert(transfer.transfer_callid.clone(), (session_id, now_ms));
                    }
                }
            }
            Some(opensips_event::Body::CallHold(hold)) if hold.state() == HoldState::Ok => {
                let Some(record) = self.records.get(&hold.callid) else {
                    return outcome;
                };
                let mut record = record.clone();
                let held = hold.action() == HoldAction::Hold;
                match hold.leg() {
                    Leg::Caller => record.caller_held = held,
                    Leg::Callee => record.callee_held = held,
                    Leg::Both | Leg::Unspecified => return outcome,
                }
                self.put(record, now_ms, false, &mut outcome);
            }
            _ => {}
        }
        outcome
    }

    /// Stores `record` if it differs from what the book holds (or `fresh`).
    fn put(&mut self, mut record: CallRecord, now_ms: u64, fresh: bool, outcome: &mut Outcome) {
        let unchanged = self.records.get(&record.callid).is_some_and(|old| {
            CallRecord {
                updated_at_ms: record.updated_at_ms,
                ..old.clone()
            } == record
        });
        if unchanged && !fresh {
            return;
        }
        record.updated_at_ms = now_ms;
        self.records.insert(record.callid.clone(), record.clone());
        outcome.writes.push(Write::Put(record));
    }

    /// The node told us who the parties of `callid` are.
    pub fn on_parties(&mut self, listed: &Listed, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        if let Some(record) = self.records.get(&listed.callid) {
            let mut record = record.clone();
            record.caller_uri = listed.from_uri.clone();
            record.callee_uri = listed.to_uri.clone();
            self.put(record, now_ms, false, &mut outcome);
        }
        outcome
    }

    /// Compares the book with the node's full list, taken starting at `listed_since_ms`:
    /// dialogs missing from the book are added; records of dialogs the list does not show
    /// (unless written since the list was asked for: an event may be newer than the list) are
    /// suspects, to be asked about one by one ([`Book::on_suspect`]).
    pub fn reconcile(&mut self, listed: &[Listed], listed_since_ms: u64, now_ms: u64) -> Outcome {
        let mut outcome = Outcome::default();
        let live: HashMap<&str, &Listed> = listed
            .iter()
            .filter(|l| l.state != DialogState::Deleted && l.state != DialogState::Unspecified)
            .map(|l| (l.callid.as_str(), l))
            .collect();
        outcome.suspects = self
            .records
            .values()
            .filter(|r| r.updated_at_ms < listed_since_ms && !live.contains_key(r.callid.as_str()))
            .map(|r| r.callid.clone())
            .collect();
        for (callid, listed) in live {
            if self.records.contains_key(callid) {
                continue;
            }
            let mut record = self.new_record(callid, now_ms);
            record.state = listed.state as i32;
            record.caller_uri = listed.from_uri.clone();
            record.callee_uri = listed.to_uri.clone();
            if listed.timestart > 0 {
                record.answered_at_ms = listed.timestart.saturating_mul(1000);
                record.started_at_ms = record.started_at_ms.min(record.answered_at_ms);
            }
            self.put(record, now_ms, true, &mut outcome);
        }
        outcome
    }
}

impl Book {
    /// What the node said of a suspect (`None`: it has no such dialog): a record not written
    /// since `asked_since_ms` of a dialog the node no longer has, or has ended, is removed.
    pub fn on_suspect(
        &mut self,
        callid: &str,
        listed: Option<&Listed>,
        asked_since_ms: u64,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let gone = listed.is_none_or(|l| l.state == DialogState::Deleted);
        let untouched = self
            .records
            .get(callid)
            .is_some_and(|r| r.updated_at_ms < asked_since_ms);
        if gone && untouched {
            outcome.writes.push(self.delete(callid));
        }
        outcome
    }

    /// The keys this book's records live under.
    pub fn keys(&self) -> std::collections::HashSet<String> {
        self.records
            .values()
            .map(|r| calls::key(&r.tenant, &r.node_id, &r.callid))
            .collect()
    }
}

/// The dialogs of a `dlg_list` result (`{"Dialogs": [...]}` or, for one Call-ID,
/// `{"Dialog": {...}}`); entries without a Call-ID are skipped.
pub fn parse_listing(result: &serde_json::Value) -> Vec<Listed> {
    let entries: Vec<&serde_json::Value> = match (result.get("Dialogs"), result.get("Dialog")) {
        (Some(serde_json::Value::Array(all)), _) => all.iter().collect(),
        (_, Some(one @ serde_json::Value::Object(_))) => vec![one],
        _ => Vec::new(),
    };
    entries
        .into_iter()
        .filter_map(|d| {
            let text = |key: &str| d.get(key).and_then(|v| v.as_str()).unwrap_or_default();
            let callid = text("callid");
            if callid.is_empty() {
                return None;
            }
            let state = d
                .get("state")
                .and_then(serde_json::Value::as_i64)
                .and_then(|s| i32::try_from(s).ok())
                .and_then(|s| DialogState::try_from(s).ok())
                .unwrap_or(DialogState::Unspecified);
            Some(Listed {
                callid: callid.to_owned(),
                state,
                from_uri: without_osid(text("from_uri")),
                to_uri: without_osid(text("to_uri")),
                timestart: d
                    .get("timestart")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1::{CallHoldEvent, CallTransferEvent, DialogStateChanged};
    use serde_json::json;

    fn dialog(callid: &str, old: DialogState, new: DialogState) -> OpensipsEvent {
        OpensipsEvent {
            callid: callid.into(),
            body: Some(opensips_event::Body::DialogStateChanged(
                DialogStateChanged {
                    callid: callid.into(),
                    old_state: old as i32,
                    new_state: new as i32,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn transfer(callid: &str, to: &str, state: TransferState) -> OpensipsEvent {
        OpensipsEvent {
            callid: callid.into(),
            body: Some(opensips_event::Body::CallTransfer(CallTransferEvent {
                callid: callid.into(),
                transfer_callid: to.into(),
                state: state as i32,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn puts(outcome: &Outcome) -> Vec<(String, DialogState, u64)> {
        outcome
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Put(r) => Some((r.callid.clone(), r.state(), r.session_id)),
                Write::Delete { .. } => None,
            })
            .collect()
    }

    fn deletes(outcome: &Outcome) -> Vec<String> {
        outcome
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Delete { callid, .. } => Some(callid.clone()),
                Write::Put(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_call_is_recorded_from_its_first_transition_to_its_end() {
        use DialogState::*;
        let mut book = Book::new("acme", "n1");
        let x = calls::session_id("acme", "X");
        let first = book.on_event(&dialog("X", Unconfirmed, Early), 10);
        assert_eq!(puts(&first), [("X".into(), Early, x)]);
        assert_eq!(first.ask_parties, ["X"]);
        book.on_event(&dialog("X", Early, ConfirmedNotAcked), 20);
        let confirmed = book.on_event(&dialog("X", ConfirmedNotAcked, Confirmed), 21);
        assert_eq!(puts(&confirmed), [("X".into(), Confirmed, x)]);
        let record = book.records().next().cloned().unwrap();
        assert_eq!((record.started_at_ms, record.answered_at_ms), (10, 20));
        // The same event again changes nothing and writes nothing.
        assert!(
            book.on_event(&dialog("X", ConfirmedNotAcked, Confirmed), 22)
                .writes
                .is_empty()
        );
        let ended = book.on_event(&dialog("X", Confirmed, Deleted), 30);
        assert_eq!(deletes(&ended), ["X"]);
        assert_eq!(book.records().count(), 0);
    }

    #[test]
    fn a_transfers_new_call_joins_the_session_of_the_call_it_came_from() {
        use DialogState::*;
        let mut book = Book::new("acme", "n1");
        let x = calls::session_id("acme", "X");
        book.on_event(&dialog("X", Unconfirmed, Confirmed), 1);
        // The usual order: the REFER, then the new call's first transition.
        let linked = book.on_event(&transfer("X", "Y", TransferState::Start), 2);
        assert_eq!(puts(&linked), [("X".into(), Confirmed, x)]);
        assert_eq!(
            book.records()
                .find(|r| r.callid == "X")
                .unwrap()
                .transferred_to,
            "Y"
        );
        let y = book.on_event(&dialog("Y", Unconfirmed, Early), 3);
        assert_eq!(puts(&y), [("Y".into(), Early, x)]);
        // Out of order: the new call first, then the REFER's event moves it into the session.
        book.on_event(&dialog("Z", Unconfirmed, Early), 4);
        let moved = book.on_event(&transfer("X", "Z", TransferState::Start), 5);
        assert!(puts(&moved).contains(&("Z".into(), Early, x)));
        // Other transfer states link nothing.
        assert!(
            book.on_event(&transfer("X", "W", TransferState::Ok), 6)
                .writes
                .is_empty()
        );
    }

    #[test]
    fn holds_are_recorded_per_leg_when_done() {
        use DialogState::*;
        let mut book = Book::new("acme", "n1");
        book.on_event(&dialog("X", Unconfirmed, Confirmed), 1);
        let hold = |leg: Leg, action: HoldAction, state: HoldState| OpensipsEvent {
            body: Some(opensips_event::Body::CallHold(CallHoldEvent {
                callid: "X".into(),
                leg: leg as i32,
                action: action as i32,
                state: state as i32,
            })),
            ..Default::default()
        };
        assert!(
            book.on_event(&hold(Leg::Callee, HoldAction::Hold, HoldState::Start), 2)
                .writes
                .is_empty()
        );
        assert_eq!(
            book.on_event(&hold(Leg::Callee, HoldAction::Hold, HoldState::Ok), 3)
                .writes
                .len(),
            1
        );
        let record = book.records().next().cloned().unwrap();
        assert!(record.callee_held && !record.caller_held);
        book.on_event(&hold(Leg::Callee, HoldAction::Unhold, HoldState::Ok), 4);
        assert!(!book.records().next().unwrap().callee_held);
    }

    #[test]
    fn reconciliation_removes_ghosts_and_adds_missing_calls_but_spares_newer_records() {
        use DialogState::*;
        let mut book = Book::new("acme", "n1");
        book.on_event(&dialog("ghost", Unconfirmed, Confirmed), 1);
        book.on_event(&dialog("newer", Unconfirmed, Early), 100);
        book.on_event(&dialog("kept", Unconfirmed, Confirmed), 1);
        let listed = vec![
            Listed {
                callid: "kept".into(),
                state: Confirmed,
                from_uri: "sip:a@h".into(),
                to_uri: "sip:b@h".into(),
                timestart: 5,
            },
            Listed {
                callid: "missing".into(),
                state: Confirmed,
                from_uri: "sip:c@h".into(),
                to_uri: "sip:d@h".into(),
                timestart: 7,
            },
            Listed {
                callid: "gone".into(),
                state: Deleted,
                from_uri: String::new(),
                to_uri: String::new(),
                timestart: 0,
            },
        ];
        let outcome = book.reconcile(&listed, 50, 10_000);
        assert_eq!(outcome.suspects, ["ghost"]);
        assert!(deletes(&outcome).is_empty());
        assert_eq!(
            puts(&outcome),
            [(
                "missing".into(),
                Confirmed,
                calls::session_id("acme", "missing")
            )]
        );
        let missing = book.records().find(|r| r.callid == "missing").unwrap();
        assert_eq!(
            (missing.caller_uri.as_str(), missing.answered_at_ms),
            ("sip:c@h", 7_000)
        );
        // The node is asked about the suspect: still there (a shifted page missed it) keeps
        // it; gone removes it.
        let live = Listed {
            callid: "ghost".into(),
            state: Confirmed,
            from_uri: String::new(),
            to_uri: String::new(),
            timestart: 0,
        };
        assert!(book.on_suspect("ghost", Some(&live), 50).writes.is_empty());
        assert_eq!(deletes(&book.on_suspect("ghost", None, 50)), ["ghost"]);
        let mut left: Vec<_> = book.records().map(|r| r.callid.clone()).collect();
        left.sort();
        assert_eq!(left, ["kept", "missing", "newer"]);
    }

    #[test]
    fn listings_of_both_shapes_parse() {
        let all = json!({"Dialogs": [{"ID": "e57.0ceab283", "state": 4, "timestart": 1795349716, "callid": "2274fe66c9822ef1", "from_uri": "sip:dave@127.0.0.1:5074", "to_uri": "sip:cindy@127.0.0.1"}, {"state": 4}]});
        let listed = parse_listing(&all);
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].state, listed[0].timestart),
            (DialogState::Confirmed, 1_795_349_716)
        );
        let one = json!({"Dialog": {"callid": "c", "state": 2, "from_uri": "sip:a@b", "to_uri": "sip:c@d;osid=101.e6de2737", "timestart": 0}});
        assert_eq!(parse_listing(&one)[0].to_uri, "sip:c@d");
        assert!(parse_listing(&json!("OK")).is_empty());
    }
}
