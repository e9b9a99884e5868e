//! The router of a node that serves many tenants: finds each event's tenant
//! ([`crate::tenancy`]: the node is asked about each new dialog), publishes the event under
//! that tenant and hands it to that tenant's session-store recorder. Events no tenant owns are
//! dropped and counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use callapi_kit::bus;
use callapi_kit::mi::MiClient;
use callapi_kit::subjects;
use callapi_kit::tenants::Tenants;
use callapi_proto::v1::OpensipsEvent;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::drops::{Drops, Why};
use crate::store::{self, Belongs, Recorder, StoreConfig};
use crate::tenancy::{self, Resolver, Step};

/// How often tenants of ended and idle dialogs are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Where a drop decided here comes from (no datagram's sender is at hand).
const NO_SENDER: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// What a node's router works with.
pub struct Context {
    /// NATS, to publish on.
    pub client: async_nats::Client,
    /// MI, to ask the node about dialogs.
    pub mi: MiClient,
    /// The session store, if it is kept.
    pub kv: Option<async_nats::jetstream::kv::Store>,
    /// The node.
    pub node_id: String,
    /// The tenants in force.
    pub tenants: watch::Receiver<Arc<Tenants>>,
    /// The recorders' settings.
    pub store: StoreConfig,
    /// Where drops are counted.
    pub drops: Drops,
    /// The node's normalised call events.
    pub calls: crate::calls_stream::CallEvents,
    /// Stops everything.
    pub shutdown: CancellationToken,
}

/// One node's router.
pub struct Router {
    ctx: Context,
    resolver: Resolver,
    recorders: HashMap<String, Recorder>,
}

impl Router {
    /// A router with nothing known yet.
    pub fn new(ctx: Context) -> Self {
        Self {
            ctx,
            resolver: Resolver::default(),
            recorders: HashMap::new(),
        }
    }

    /// Routes the events of `queue` until shutdown.
    pub async fn run(mut self, mut queue: mpsc::Receiver<OpensipsEvent>) {
        // The recorders of the tenants that use this node start at once: they bring the store
        // up to date with the node (calls that ended while event-ingest was away).
        let users: Vec<String> = self
            .ctx
            .tenants
            .borrow()
            .iter()
            .filter(|t| t.nodes.contains(&self.ctx.node_id))
            .map(|t| t.id.clone())
            .collect();
        for tenant in users {
            self.recorder(&tenant);
        }
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<(String, Option<String>)>();
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            let now = callapi_kit::unix_ms();
            let steps = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                event = queue.recv() => match event {
                    Some(event) => self.resolver.on_event(event, now),
                    None => break,
                },
                Some((callid, tenant)) = answers.recv() => {
                    self.resolver.on_answer(&callid, tenant, now)
                }
                _ = prune.tick() => {
                    self.resolver.forget_old(now);
                    continue;
                }
            };
            for step in steps {
                match step {
                    Step::Publish(event) => self.publish(event).await,
                    Step::Ask(callid) => self.ask(callid, answers_tx.clone()),
                    Step::Drop(event) => self.ctx.drops.record(
                        Why::NoTenant,
                        NO_SENDER,
                        &format_args!("{} of Call-ID {:?}", event.name, event.callid),
                    ),
                }
            }
        }
    }

    /// Asks the node about `callid` in a task of its own; the tenant that owns it (or `None`)
    /// comes back on `answers`.
    fn ask(&self, callid: String, answers: mpsc::UnboundedSender<(String, Option<String>)>) {
        let (mi, node_id, tenants) = (
            self.ctx.mi.clone(),
            self.ctx.node_id.clone(),
            self.ctx.tenants.clone(),
        );
        tokio::spawn(async move {
            let listed =
                store::dlg_list(&mi, &node_id, serde_json::json!({ "callid": callid })).await;
            let tenant = match listed {
                Ok(listed) => listed
                    .iter()
                    .find(|l| l.callid == callid)
                    .and_then(|l| tenancy::tenant_of(l, &tenants.borrow())),
                Err(reason) => {
                    tracing::debug!(%reason, %callid, "cannot ask the node whose dialog this is");
                    None
                }
            };
            let _ = answers.send((callid, tenant));
        });
    }

    async fn publish(&mut self, event: OpensipsEvent) {
        let subject =
            match subjects::event(&event.tenant, &self.ctx.node_id, &event.name, &event.callid) {
                Ok(subject) => subject,
                Err(err) => {
                    self.ctx.drops.record(Why::UnusableEvent, NO_SENDER, &err);
                    return;
                }
            };
        tracing::debug!(%subject, name = %event.name, callid = %event.callid, "event");
        if let Err(err) = bus::publish(&self.ctx.client, subject, &event)
            .instrument(crate::event_span(&event))
            .await
        {
            tracing::warn!(%err, "could not publish an event");
        }
        self.ctx.calls.on_event(&event).await;
        let tenant = event.tenant.clone();
        if let Some(recorder) = self.recorder(&tenant)
            && !recorder.record(event)
        {
            self.ctx.drops.record(
                Why::StoreBehind,
                NO_SENDER,
                &"session store recorder queue full",
            );
        }
    }

    /// The recorder of `tenant`'s dialogs on this node, started on first use.
    fn recorder(&mut self, tenant: &str) -> Option<&Recorder> {
        let kv = self.ctx.kv.as_ref()?;
        if !self.recorders.contains_key(tenant) {
            let belongs: Belongs = {
                let (tenants, tenant) = (self.ctx.tenants.clone(), tenant.to_owned());
                Arc::new(move |listed| {
                    tenancy::tenant_of(listed, &tenants.borrow()).as_deref() == Some(&tenant)
                })
            };
            let (recorder, _task) = store::start(
                self.ctx.mi.clone(),
                kv.clone(),
                tenant,
                &self.ctx.node_id,
                &self.ctx.store,
                Some(belongs),
                self.ctx.shutdown.clone(),
            );
            self.recorders.insert(tenant.to_owned(), recorder);
        }
        self.recorders.get(tenant)
    }
}
