//! Commands that outlive their replica. The replica running a command keeps where its flow is
//! (a [`FlowCheckpoint`]: the flow's state, the MI steps in flight, timers, watched Call-IDs,
//! notifications sent) in the key-value bucket `callapi_flows` after each step, and answers
//! `callapi.v1.replica.<id>.alive` while it lives. Every replica looks at the bucket every
//! `scan_interval_ms`: a checkpoint whose owner has not answered for three scans in a row (no
//! responders: its connection is gone) is claimed with a compare-and-set, so one replica only
//! takes it, and its flow resumes there. The owner writes each checkpoint over the revision it
//! wrote last: one that was only cut off and comes back finds the command taken and leaves it. The MI requests that were in flight are told lost (the
//! flows then ask OpenSIPS what became of the dialog, as they do when proxy-connector goes
//! away) and the events of the gap possibly missed; the command still ends within its deadline.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use callapi_kit::subjects;
use callapi_proto::v1::FlowCheckpoint;
use futures::StreamExt as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::flow::{Flow, Step, Timer};

/// The bucket of checkpoints.
pub const BUCKET: &str = "callapi_flows";
/// Longest a flow waits to keep its checkpoint (then it is kept at a later step).
const SAVE_WITHIN: Duration = Duration::from_millis(250);
/// Scans in a row an owner must miss before its commands are taken over (a replica that only
/// reconnects to NATS answers again within them).
const STRIKES: u32 = 3;

/// `[takeover]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TakeoverConfig {
    /// Keep checkpoints and take over the commands of replicas that died.
    pub enabled: bool,
    /// How often the checkpoints' owners are looked at, milliseconds.
    pub scan_interval_ms: u64,
    /// Replicas of the bucket when created (3 in a JetStream cluster).
    pub replicas: usize,
    /// A command is checkpointed once it has run this long, milliseconds: most commands end
    /// within milliseconds and cost nothing; the ones that wait for phones to ring and answer
    /// are kept (one that dies younger ends with `COMMAND_LOST`).
    pub checkpoint_after_ms: u64,
}

impl Default for TakeoverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            scan_interval_ms: 1_000,
            replicas: 1,
            checkpoint_after_ms: 500,
        }
    }
}

/// The driver's part of a checkpoint: what the flow is waiting for.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FlowState {
    /// The flow itself.
    pub flow: Flow,
    /// MI requests sent and not answered yet.
    pub pending: Vec<Step>,
    /// Timers set: which, and when they fire (Unix milliseconds).
    pub timers: Vec<(Timer, u64)>,
}

/// What keeping a checkpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Kept, at this revision.
    Kept(u64),
    /// Another replica owns the command now: this one must leave it.
    TakenOver,
    /// Not kept (NATS away): tried again at the next step.
    NotNow,
}

/// Where this replica keeps its checkpoints. Cheap to clone.
#[derive(Clone)]
pub struct Checkpoints {
    client: async_nats::Client,
    /// This replica's id.
    pub replica: String,
    /// Commands younger than this are not checkpointed.
    pub after: Duration,
    /// The bucket, to read a checkpoint back.
    store: kv::Store,
}

impl Checkpoints {
    /// The key of a command's checkpoint.
    pub fn key(tenant: &str, connection_id: &str, cmd_id: &str, attempt: u64) -> String {
        format!(
            "{tenant}.{}.{}.{attempt}",
            callapi_kit::calls::callid_token(connection_id),
            callapi_kit::calls::callid_token(cmd_id)
        )
    }

    /// Keeps `checkpoint` over the revision this replica wrote last (`None`: the first), so a
    /// replica that lost the command to another finds out at its next step.
    pub async fn save(
        &self,
        key: &str,
        checkpoint: &FlowCheckpoint,
        revision: Option<u64>,
    ) -> Saved {
        // The flow never waits for NATS: away, or slow to answer, it is kept at a later step.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Saved::NotNow;
        }
        let value: bytes::Bytes = checkpoint.encode_to_vec().into();
        let write = async {
            match revision {
                None => self.store.create(key, value).await.map_err(|e| {
                    matches!(e.kind(), kv::CreateErrorKind::AlreadyExists)
                        .then_some(())
                        .ok_or(e.to_string())
                }),
                Some(revision) => self.store.update(key, value, revision).await.map_err(|e| {
                    matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision)
                        .then_some(())
                        .ok_or(e.to_string())
                }),
            }
        };
        let result = tokio::time::timeout(SAVE_WITHIN, write)
            .await
            .unwrap_or_else(|_| Err(Err("no answer in time".to_owned())));
        match result {
            Ok(revision) => Saved::Kept(revision),
            Err(Ok(())) => Saved::TakenOver,
            Err(Err(err)) => {
                tracing::debug!(%err, "checkpoint not kept; kept at the next step");
                Saved::NotNow
            }
        }
    }

    /// Removes a finished command's checkpoint.
    pub async fn remove(&self, key: &str) {
        let subject = format!("$KV.{BUCKET}.{key}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("KV-Operation", "PURGE");
        headers.insert("Nats-Rollup", "sub");
        if let Err(err) = self
            .client
            .publish_with_headers(subject, headers, bytes::Bytes::new())
            .await
        {
            tracing::debug!(%err, "checkpoint not removed");
        }
    }
}

/// Opens (or creates) the bucket.
pub async fn open(
    jetstream: &async_nats::jetstream::Context,
    config: &TakeoverConfig,
) -> Result<kv::Store, String> {
    let bucket = kv::Config {
        bucket: BUCKET.to_owned(),
        description: "callapi: where each running command's flow is (callapi.v1.FlowCheckpoint)"
            .to_owned(),
        history: 1,
        max_age: Duration::from_secs(900),
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: config.replicas.max(1),
        ..Default::default()
    };
    callapi_kit::calls::open_or_create(jetstream, bucket).await
}

/// Starts answering the liveness probe of replica `replica` and returns the checkpoints it
/// keeps.
pub async fn start(
    client: &async_nats::Client,
    replica: &str,
    store: kv::Store,
    after: Duration,
) -> Result<Checkpoints, String> {
    let mut alive = client
        .subscribe(subjects::replica_alive(replica))
        .await
        .map_err(|e| e.to_string())?;
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(probe) = alive.next().await {
            if let Some(reply) = probe.reply {
                let _ = responder.publish(reply, bytes::Bytes::new()).await;
            }
        }
    });
    Ok(Checkpoints {
        client: client.clone(),
        replica: replica.to_owned(),
        after,
        store,
    })
}

/// A checkpoint claimed by this replica: the command to resume.
pub struct Claimed {
    /// Its key.
    pub key: String,
    /// What it holds (owner now this replica).
    pub checkpoint: FlowCheckpoint,
    /// The revision the claim wrote.
    pub revision: u64,
}

/// Looks at the checkpoints every `scan_interval` and hands over, through `claimed`, those
/// whose owner is gone and that this replica won, until `shutdown`.
pub async fn watch(
    store: kv::Store,
    checkpoints: Checkpoints,
    scan_interval: Duration,
    claimed: tokio::sync::mpsc::Sender<Claimed>,
    shutdown: CancellationToken,
) {
    let mut strikes: HashMap<String, u32> = HashMap::new();
    let mut every = tokio::time::interval(scan_interval.max(Duration::from_millis(100)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let entries = match entries_of(&store).await {
            Ok(entries) => entries,
            Err(err) => {
                tracing::debug!(%err, "cannot read the checkpoints");
                continue;
            }
        };
        // A released checkpoint (no owner: its replica stopped and handed it over) is taken
        // at once.
        let mut owners: Vec<String> = entries
            .iter()
            .map(|(_, _, c)| c.owner.clone())
            .filter(|owner| *owner != checkpoints.replica && !owner.is_empty())
            .collect();
        owners.sort();
        owners.dedup();
        let mut gone = vec![String::new()];
        for owner in &owners {
            if answers(&checkpoints.client, owner).await {
                strikes.remove(owner);
            } else {
                let count = strikes.entry(owner.clone()).or_insert(0);
                *count += 1;
                if *count >= STRIKES {
                    gone.push(owner.clone());
                }
            }
        }
        strikes.retain(|owner, _| owners.contains(owner));
        for (key, revision, mut checkpoint) in entries {
            // A replica that is stopping claims nothing more.
            if shutdown.is_cancelled() {
                return;
            }
            if !gone.contains(&checkpoint.owner) {
                continue;
            }
            let previous = std::mem::replace(&mut checkpoint.owner, checkpoints.replica.clone());
            match store
                .update(&key, checkpoint.encode_to_vec().into(), revision)
                .await
            {
                Ok(revision) => {
                    if previous.is_empty() {
                        tracing::info!(cmd_id = %checkpoint.cmd_id, tenant = %checkpoint.tenant, "took over a command handed over by a stopping replica");
                    } else {
                        tracing::warn!(cmd_id = %checkpoint.cmd_id, tenant = %checkpoint.tenant, from = %previous, "took over a command whose replica is gone");
                    }
                    let taken = Claimed {
                        key,
                        checkpoint,
                        revision,
                    };
                    if claimed.send(taken).await.is_err() {
                        return;
                    }
                }
                // Another replica claimed it first (or it just ended).
                Err(err) => tracing::debug!(%err, %key, "checkpoint not claimed"),
            }
        }
    }
}

/// Every checkpoint with its revision.
async fn entries_of(store: &kv::Store) -> Result<Vec<(String, u64, FlowCheckpoint)>, String> {
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        let Ok(Some(entry)) = store.entry(&key).await else {
            continue;
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        if let Ok(checkpoint) = FlowCheckpoint::decode(entry.value.as_ref()) {
            out.push((key, entry.revision, checkpoint));
        }
    }
    Ok(out)
}

/// Whether replica `owner` answers its liveness probe. Only "no responders" (its subscription
/// is gone) counts as an answer missed; a slow answer is an answer.
async fn answers(client: &async_nats::Client, owner: &str) -> bool {
    let probe = client.request(subjects::replica_alive(owner), bytes::Bytes::new());
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) | Err(_) => true,
        Ok(Err(err)) => !matches!(
            err.kind(),
            async_nats::client::RequestErrorKind::NoResponders
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{EndFlow, Input, MiResult};

    #[test]
    fn a_flow_state_survives_the_round_trip_and_goes_on_where_it_was() {
        let mut flow = Flow::End(EndFlow::new("x@example".to_owned()));
        let first = flow.start();
        assert!(!first.is_empty());
        let state = FlowState {
            flow,
            pending: vec![Step::End],
            timers: vec![(Timer::Reprobe, 42)],
        };
        let json = serde_json::to_string(&state).expect("serialise");
        let mut back: FlowState = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back.pending, [Step::End]);
        assert_eq!(back.timers, [(Timer::Reprobe, 42)]);
        // The resumed flow answers as the original would have.
        let actions = back
            .flow
            .handle(Input::Mi(Step::End, MiResult::Ok(serde_json::json!("OK"))));
        assert!(
            actions.contains(&crate::flow::Action::Finish),
            "{actions:?}"
        );
    }

    #[test]
    fn keys_are_valid_key_value_keys() {
        let key = Checkpoints::key("acme", "c0ffee", "a cmd/id with spaces", 3);
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.')),
            "{key}"
        );
    }
}
