//! Which OpenSIPS node a command acts on, when tenants are configured: a new call goes to one
//! of the tenant's `nodes` by its `node_policy` (`first`, `round_robin`, `least_active`: fewest
//! dialogs now, every tenant's), among those proxy-connector reaches; every command on an
//! existing call goes to the node that holds its dialog (the session store says which). A
//! node proxy-connector reports unreachable, or has not reported on for [`STALE`], gets no new
//! calls until it is reported reachable again; a node never reported on is used (a connector
//! that does not report).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use callapi_kit::subjects;
use callapi_kit::tenants::NodePolicy;
use callapi_proto::v1::NodeHealth;
use callapi_proto::v1::command_request::Command;
use futures::StreamExt as _;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::core::NodeChoice;
use crate::sessions::SessionView;

/// A node whose last report is older than this is taken as unreachable.
pub const STALE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Health {
    reachable: bool,
    at: Instant,
}

/// The node chooser of one gateway.
pub struct Nodes {
    auth: Arc<Auth>,
    view: Option<SessionView>,
    health: Arc<Mutex<HashMap<String, Health>>>,
    turns: Mutex<HashMap<String, usize>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Nodes {
    /// Follows proxy-connector's health reports until `shutdown`.
    pub async fn start(
        client: &async_nats::Client,
        auth: Arc<Auth>,
        view: Option<SessionView>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let mut reports = client
            .subscribe(subjects::ALL_NODE_HEALTH)
            .await
            .map_err(|e| format!("cannot follow the nodes' health: {e}"))?;
        let health: Arc<Mutex<HashMap<String, Health>>> = Arc::default();
        let followed = health.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = reports.next() => message,
                };
                let Some(message) = message else { return };
                let Ok(report) = NodeHealth::decode(message.payload.as_ref()) else {
                    continue;
                };
                let now = Instant::now();
                let mut health = lock(&followed);
                let was = health.get(&report.node_id).map(|h| h.reachable);
                if was != Some(report.reachable) {
                    tracing::info!(node = %report.node_id, reachable = report.reachable, "OpenSIPS node health changed");
                }
                health.insert(
                    report.node_id,
                    Health {
                        reachable: report.reachable,
                        at: now,
                    },
                );
            }
        });
        Ok(Arc::new(Self {
            auth,
            view,
            health,
            turns: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether `node` may take new calls.
    pub fn usable(&self, node: &str) -> bool {
        lock(&self.health)
            .get(node)
            .is_none_or(|h| h.reachable && h.at.elapsed() < STALE)
    }

    /// The node for a new call of `tenant`.
    fn pick(&self, tenant: &str) -> Result<String, String> {
        let tenants = self.auth.tenants();
        let Some(config) = tenants.get(tenant) else {
            return Ok(String::new());
        };
        if config.nodes.is_empty() {
            return Ok(String::new());
        }
        let usable: Vec<&String> = config.nodes.iter().filter(|n| self.usable(n)).collect();
        if usable.is_empty() {
            return Err(format!(
                "no OpenSIPS node of this tenant is reachable now ({}); try again later",
                config.nodes.join(", ")
            ));
        }
        let chosen = match config.node_policy {
            NodePolicy::First => usable[0],
            NodePolicy::RoundRobin => {
                let mut turns = lock(&self.turns);
                let turn = turns.entry(tenant.to_owned()).or_insert(0);
                let chosen = usable[*turn % usable.len()];
                *turn = turn.wrapping_add(1);
                chosen
            }
            NodePolicy::LeastActive => {
                let counts = self
                    .view
                    .as_ref()
                    .map(SessionView::dialogs_per_node)
                    .unwrap_or_default();
                usable
                    .iter()
                    .min_by_key(|n| counts.get(n.as_str()).copied().unwrap_or(0))
                    .copied()
                    .unwrap_or(usable[0])
            }
        };
        Ok(chosen.clone())
    }

    /// The node holding the dialog `callid` of `tenant`, if the store has it.
    fn holder(&self, tenant: &str, callid: &str) -> Option<String> {
        let session = self.view.as_ref()?.by_callid(tenant, callid)?;
        session
            .calls
            .iter()
            .find(|c| c.callid == callid)
            .map(|c| c.node_id.clone())
    }
}

impl NodeChoice for Nodes {
    fn node_for(&self, tenant: &str, command: &Command) -> Result<String, String> {
        match crate::core::callids_of(command).first() {
            None => self.pick(tenant),
            Some(callid) => Ok(self.holder(tenant, callid).unwrap_or_default()),
        }
    }
}
