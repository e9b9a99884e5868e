//! Turns a `CommandRequest` into the flow that runs it, checking its fields again: NATS is a
//! trust boundary, and these values end up in SIP headers.

use callapi_kit::subjects::CommandKind;
use callapi_kit::validate;
use callapi_proto::v1::{self as pb, command_request::Command};
use uuid::Uuid;

use crate::Deadlines;
use crate::flow::{
    AttendedTransferFlow, BlindTransferFlow, EndFlow, Flow, HoldAction, HoldFlow, Leg, StartFlow,
};

/// The kind of command a request carries (the last token of its subject).
pub fn kind_of(request: &pb::CommandRequest) -> Option<CommandKind> {
    Some(match request.command.as_ref()? {
        Command::CallStart(_) => CommandKind::CallStart,
        Command::BlindTransfer(_) => CommandKind::BlindTransfer,
        Command::AttendedTransfer(_) => CommandKind::AttendedTransfer,
        Command::Hold(_) => CommandKind::Hold,
        Command::Unhold(_) => CommandKind::Unhold,
        Command::End(_) => CommandKind::End,
    })
}

/// The flow for `request` and its deadline in milliseconds, or why it is refused.
pub fn flow_for(
    request: &pb::CommandRequest,
    deadlines: &Deadlines,
    invite_next_hop: Option<&str>,
) -> Result<(Flow, u64), String> {
    if request.cmd_id.is_empty() || request.cmd_id.len() > 128 {
        return Err("cmd_id must be 1 to 128 characters".to_owned());
    }
    let command = request
        .command
        .as_ref()
        .ok_or("no command in the request")?;
    let timings = deadlines.timings();
    Ok(match command {
        Command::CallStart(c) => {
            uri("caller", &c.caller)?;
            uri("callee", &c.callee)?;
            let callid = if c.callid.is_empty() {
                Uuid::new_v4().to_string()
            } else {
                callid("callid", &c.callid)?;
                c.callid.clone()
            };
            let options = c.options.as_deref().cloned().unwrap_or_default();
            validate::call_options(&options)?;
            if options.trunk.as_ref().is_some_and(|t| t.uri.is_empty()) {
                return Err("trunk must have a uri".to_owned());
            }
            if !options.target_instance_id.is_empty() && !validate::is_sip_scheme(&c.callee) {
                return Err("target_instance_id needs a sip: or sips: callee".to_owned());
            }
            (
                Flow::Start(
                    StartFlow::new(
                        c.caller.clone(),
                        c.callee.clone(),
                        callid,
                        &options,
                        timings,
                    )
                    .via(invite_next_hop.map(str::to_owned)),
                ),
                deadlines.call_start_ms,
            )
        }
        Command::BlindTransfer(c) => {
            callid("callid", &c.callid)?;
            uri("destination", &c.destination)?;
            (
                Flow::Blind(BlindTransferFlow::new(
                    c.callid.clone(),
                    one_leg("leg", c.leg)?,
                    c.destination.clone(),
                    timings,
                )),
                deadlines.transfer_ms,
            )
        }
        Command::AttendedTransfer(c) => {
            callid("callid_a", &c.callid_a)?;
            callid("callid_b", &c.callid_b)?;
            if !c.destination.is_empty() {
                uri("destination", &c.destination)?;
            }
            (
                Flow::Attended(AttendedTransferFlow::new(
                    c.callid_a.clone(),
                    one_leg("leg_a", c.leg_a)?,
                    c.callid_b.clone(),
                    one_leg("leg_b", c.leg_b)?,
                    c.destination.clone(),
                    timings,
                )),
                deadlines.transfer_ms,
            )
        }
        Command::Hold(c) => {
            callid("callid", &c.callid)?;
            (
                Flow::Hold(HoldFlow::new(
                    c.callid.clone(),
                    optional_leg(c.leg)?,
                    HoldAction::Hold,
                )),
                deadlines.hold_ms,
            )
        }
        Command::Unhold(c) => {
            callid("callid", &c.callid)?;
            (
                Flow::Hold(HoldFlow::new(
                    c.callid.clone(),
                    optional_leg(c.leg)?,
                    HoldAction::Unhold,
                )),
                deadlines.hold_ms,
            )
        }
        Command::End(c) => {
            callid("callid", &c.callid)?;
            (Flow::End(EndFlow::new(c.callid.clone())), deadlines.end_ms)
        }
    })
}

/// Checks `invite_next_hop` (a SIP URI).
pub fn check_next_hop(value: &str) -> Result<(), String> {
    uri("invite_next_hop", value)
}

fn uri(field: &str, value: &str) -> Result<(), String> {
    validate::sip_uri(value).map_err(|why| format!("{field} {why}"))
}

fn callid(field: &str, value: &str) -> Result<(), String> {
    validate::callid(value).map_err(|why| format!("{field} {why}"))
}

fn one_leg(field: &str, leg: i32) -> Result<Leg, String> {
    match pb::Leg::try_from(leg) {
        Ok(pb::Leg::Caller) => Ok(Leg::Caller),
        Ok(pb::Leg::Callee) => Ok(Leg::Callee),
        _ => Err(format!("{field} must be caller or callee")),
    }
}

fn optional_leg(leg: i32) -> Result<Option<Leg>, String> {
    match pb::Leg::try_from(leg) {
        Ok(pb::Leg::Unspecified | pb::Leg::Both) => Ok(None),
        Ok(pb::Leg::Caller) => Ok(Some(Leg::Caller)),
        Ok(pb::Leg::Callee) => Ok(Some(Leg::Callee)),
        Err(_) => Err("leg must be caller, callee or both".to_owned()),
    }
}
