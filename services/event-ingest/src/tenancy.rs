//! Which tenant each of a node's events belongs to, when one OpenSIPS node serves many
//! tenants (issue 11). OpenSIPS's events carry no URI, so the tenant of a dialog comes from
//! the node's own answer about it (`dlg_list {callid}`: its From and To URIs): the tenant whose
//! SIP domain is the From host, else the To host's (a call from outside to the tenant). A
//! transfer's new call is its old call's tenant's (E_CALL_TRANSFER names both Call-IDs), with
//! no question asked. Events of a Call-ID wait, in order, while its question is out; events
//! of a dialog no tenant owns are dropped and counted, never published under a wrong tenant.
//!
//! [`Resolver`] is the bookkeeping without I/O (tested as a table): events and answers in,
//! steps out.

use std::collections::HashMap;

use callapi_kit::tenants::Tenants;
use callapi_proto::v1::{DialogState, OpensipsEvent, opensips_event};

use crate::calls::Listed;

/// How long the tenant of an ended dialog is kept (late events still find it).
pub const ENDED_TTL_MS: u64 = 60_000;
/// How long the tenant of a dialog with no event is kept (a live call asked again later is
/// found again).
pub const IDLE_TTL_MS: u64 = 3_600_000;

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Publish this event (its `tenant` set).
    Publish(OpensipsEvent),
    /// Ask the node about this dialog, then call [`Resolver::on_answer`].
    Ask(String),
    /// Drop this event: no tenant owns its dialog.
    Drop(OpensipsEvent),
}

#[derive(Debug, Clone)]
struct Known {
    tenant: String,
    last_seen_ms: u64,
    ended_at_ms: Option<u64>,
}

/// The tenants of one node's dialogs.
#[derive(Debug, Default)]
pub struct Resolver {
    known: HashMap<String, Known>,
    /// Events of dialogs being asked about, in arrival order.
    waiting: HashMap<String, Vec<OpensipsEvent>>,
}

/// The tenant a dialog belongs to by its URIs: the From host's, else the To host's.
pub fn tenant_of(listed: &Listed, tenants: &Tenants) -> Option<String> {
    [&listed.from_uri, &listed.to_uri]
        .into_iter()
        .filter_map(|uri| host_of(uri))
        .find_map(|host| tenants.by_domain(&host))
        .map(|tenant| tenant.id.clone())
}

/// The host of a SIP URI (`sip:user@host:port;params`, angle brackets allowed), lower case.
pub fn host_of(uri: &str) -> Option<String> {
    let uri = uri.trim().trim_start_matches('<');
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))?;
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let end = hostport.find([';', '>', '?']).unwrap_or(hostport.len());
    let hostport = &hostport[..end];
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        hostport.split(':').next().unwrap_or_default()
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl Resolver {
    /// Takes one event (its `tenant` unset) received at `now_ms`.
    pub fn on_event(&mut self, mut event: OpensipsEvent, now_ms: u64) -> Vec<Step> {
        let callid = event.callid.clone();
        if callid.is_empty() {
            // Not a dialog's event: no way to tell whose.
            return vec![Step::Drop(event)];
        }
        if let Some(waiting) = self.waiting.get_mut(&callid) {
            waiting.push(event);
            return Vec::new();
        }
        let Some(known) = self.known.get_mut(&callid) else {
            self.waiting.insert(callid.clone(), vec![event]);
            return vec![Step::Ask(callid)];
        };
        known.last_seen_ms = now_ms;
        if ended(&event) {
            known.ended_at_ms = Some(now_ms);
        }
        event.tenant = known.tenant.clone();
        let mut steps = Vec::new();
        self.learn_transfer(&event, now_ms, &mut steps);
        steps.insert(0, Step::Publish(event));
        steps
    }

    /// The node's answer about `callid`: the tenant that owns it, if any.
    pub fn on_answer(&mut self, callid: &str, tenant: Option<String>, now_ms: u64) -> Vec<Step> {
        let Some(events) = self.waiting.remove(callid) else {
            // Settled meanwhile (a transfer named it): the answer is not needed.
            return Vec::new();
        };
        let Some(tenant) = tenant else {
            return events.into_iter().map(Step::Drop).collect();
        };
        self.known.insert(
            callid.to_owned(),
            Known {
                tenant: tenant.clone(),
                last_seen_ms: now_ms,
                ended_at_ms: None,
            },
        );
        let mut steps = Vec::new();
        for mut event in events {
            if ended(&event)
                && let Some(known) = self.known.get_mut(callid)
            {
                known.ended_at_ms = Some(now_ms);
            }
            event.tenant = tenant.clone();
            let mut learned = Vec::new();
            self.learn_transfer(&event, now_ms, &mut learned);
            steps.push(Step::Publish(event));
            steps.extend(learned);
        }
        steps
    }

    /// A transfer names its new call: it is the same tenant's. Events of the new call waiting
    /// for an answer go out now.
    fn learn_transfer(&mut self, event: &OpensipsEvent, now_ms: u64, steps: &mut Vec<Step>) {
        let Some(opensips_event::Body::CallTransfer(transfer)) = &event.body else {
            return;
        };
        let new = &transfer.transfer_callid;
        if new.is_empty() || self.known.contains_key(new) {
            return;
        }
        if self.waiting.contains_key(new) {
            steps.extend(self.on_answer(&new.clone(), Some(event.tenant.clone()), now_ms));
        } else {
            self.known.insert(
                new.clone(),
                Known {
                    tenant: event.tenant.clone(),
                    last_seen_ms: now_ms,
                    ended_at_ms: None,
                },
            );
        }
    }

    /// Forgets dialogs ended [`ENDED_TTL_MS`] ago or silent for [`IDLE_TTL_MS`].
    pub fn forget_old(&mut self, now_ms: u64) {
        self.known.retain(|_, known| match known.ended_at_ms {
            Some(at) => now_ms.saturating_sub(at) < ENDED_TTL_MS,
            None => now_ms.saturating_sub(known.last_seen_ms) < IDLE_TTL_MS,
        });
    }

    /// Dialogs whose tenant is known.
    pub fn known(&self) -> usize {
        self.known.len()
    }
}

fn ended(event: &OpensipsEvent) -> bool {
    matches!(
        &event.body,
        Some(opensips_event::Body::DialogStateChanged(change))
            if change.new_state == DialogState::Deleted as i32
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1::{CallTransferEvent, DialogStateChanged};

    fn state(callid: &str, new_state: DialogState) -> OpensipsEvent {
        OpensipsEvent {
            name: "E_DLG_STATE_CHANGED".into(),
            callid: callid.into(),
            body: Some(opensips_event::Body::DialogStateChanged(
                DialogStateChanged {
                    callid: callid.into(),
                    new_state: new_state as i32,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn transfer(callid: &str, new: &str) -> OpensipsEvent {
        OpensipsEvent {
            name: "E_CALL_TRANSFER".into(),
            callid: callid.into(),
            body: Some(opensips_event::Body::CallTransfer(CallTransferEvent {
                callid: callid.into(),
                transfer_callid: new.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn published(steps: &[Step]) -> Vec<(String, String)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Publish(e) => Some((e.callid.clone(), e.tenant.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_dialogs_events_wait_in_order_for_the_nodes_answer() {
        let mut r = Resolver::default();
        assert_eq!(
            r.on_event(state("x", DialogState::Early), 0),
            [Step::Ask("x".into())]
        );
        assert!(r.on_event(state("x", DialogState::Confirmed), 1).is_empty());
        let steps = r.on_answer("x", Some("acme".into()), 2);
        assert_eq!(
            published(&steps),
            [("x".into(), "acme".into()), ("x".into(), "acme".into())]
        );
        let Step::Publish(first) = &steps[0] else {
            panic!()
        };
        assert_eq!(
            first.body,
            state("x", DialogState::Early).body,
            "the order kept"
        );
        // Known now: no more questions.
        let steps = r.on_event(state("x", DialogState::Deleted), 3);
        assert_eq!(published(&steps), [("x".into(), "acme".into())]);
    }

    #[test]
    fn a_transfers_new_call_is_its_old_calls_tenants_without_asking() {
        let mut r = Resolver::default();
        r.on_event(state("x", DialogState::Early), 0);
        r.on_answer("x", Some("globex".into()), 1);
        let steps = r.on_event(transfer("x", "y"), 2);
        assert_eq!(published(&steps), [("x".into(), "globex".into())]);
        let steps = r.on_event(state("y", DialogState::Early), 3);
        assert_eq!(published(&steps), [("y".into(), "globex".into())]);
        // The new call's events came first and wait: the transfer lets them out.
        let mut r = Resolver::default();
        r.on_event(state("x", DialogState::Early), 0);
        r.on_answer("x", Some("globex".into()), 1);
        assert_eq!(
            r.on_event(state("y", DialogState::Early), 2),
            [Step::Ask("y".into())]
        );
        let steps = r.on_event(transfer("x", "y"), 3);
        assert_eq!(
            published(&steps),
            [("x".into(), "globex".into()), ("y".into(), "globex".into())]
        );
        // The late answer about y finds nothing waiting, and changes nothing.
        assert!(r.on_answer("y", Some("acme".into()), 4).is_empty());
        let steps = r.on_event(state("y", DialogState::Confirmed), 5);
        assert_eq!(published(&steps), [("y".into(), "globex".into())]);
    }

    #[test]
    fn events_of_a_dialog_no_tenant_owns_are_dropped_never_published() {
        let mut r = Resolver::default();
        r.on_event(state("z", DialogState::Early), 0);
        r.on_event(state("z", DialogState::Deleted), 1);
        let steps = r.on_answer("z", None, 2);
        assert_eq!(steps.len(), 2);
        assert!(steps.iter().all(|s| matches!(s, Step::Drop(_))));
        let no_callid = OpensipsEvent {
            name: "E_SOMETHING".into(),
            ..Default::default()
        };
        assert!(matches!(&r.on_event(no_callid, 3)[..], [Step::Drop(_)]));
    }

    #[test]
    fn ended_and_idle_dialogs_are_forgotten() {
        let mut r = Resolver::default();
        r.on_event(state("a", DialogState::Early), 0);
        r.on_answer("a", Some("acme".into()), 0);
        r.on_event(state("b", DialogState::Early), 0);
        r.on_answer("b", Some("acme".into()), 0);
        r.on_event(state("b", DialogState::Deleted), 10);
        r.forget_old(10 + ENDED_TTL_MS - 1);
        assert_eq!(r.known(), 2);
        r.forget_old(10 + ENDED_TTL_MS);
        assert_eq!(r.known(), 1, "b ended a minute ago");
        r.forget_old(IDLE_TTL_MS);
        assert_eq!(r.known(), 0, "a silent for an hour");
    }

    #[test]
    fn the_from_hosts_tenant_else_the_to_hosts() {
        let tenants = Tenants::from_toml(
            r#"
[[tenants]]
id = "acme"
domains = ["acme.example", "10.0.0.1"]
[[tenants]]
id = "globex"
domains = ["globex.example"]
"#,
        )
        .unwrap();
        let listed = |from: &str, to: &str| Listed {
            callid: "c".into(),
            state: DialogState::Confirmed,
            from_uri: from.into(),
            to_uri: to.into(),
            timestart: 0,
        };
        let of = |from, to| tenant_of(&listed(from, to), &tenants);
        assert_eq!(
            of("sip:1001@ACME.example", "sip:bob@x.org"),
            Some("acme".into())
        );
        assert_eq!(
            of(
                "sip:+15551234@carrier.net",
                "<sip:2001@globex.example;transport=tcp>"
            ),
            Some("globex".into())
        );
        assert_eq!(
            of("sip:a@10.0.0.1:5060", "sip:b@globex.example"),
            Some("acme".into())
        );
        assert_eq!(of("sip:a@elsewhere.org", "tel:+1555"), None);
        assert_eq!(
            host_of("sips:[2001:db8::1]:5061"),
            Some("2001:db8::1".into())
        );
        assert_eq!(
            host_of("sip:bob@example.com?subject=x"),
            Some("example.com".into())
        );
        assert_eq!(host_of("mailto:x"), None);
    }
}
