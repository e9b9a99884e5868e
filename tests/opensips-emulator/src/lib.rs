//! An OpenSIPS stand-in for tests. It speaks OpenSIPS's real wire protocols — MI JSON-RPC over
//! `mi_datagram` (UDP) and `mi_http`, `event_subscribe` with real expiry, event_datagram and
//! event_stream notifications — and models dialogs and simulated phones so that every flow
//! produces the reply and event sequences recorded from a real OpenSIPS 3.6.8 (or, with
//! [`Version::V4_0`], 4.0.1), quirks included. It must never be kinder than the real thing.
#![forbid(unsafe_code)]

pub mod dialogs;
pub mod events;
pub mod mi;
pub mod node;
pub mod phones;
pub mod script;
pub mod shm;
pub mod sip;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
pub use crate::phones::Phones;
pub use crate::shm::Stats;

/// Which OpenSIPS to behave like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// OpenSIPS 3.6.8: hold of both legs only.
    V3_6,
    /// OpenSIPS 4.0.1: per-leg hold, namespaced MI names, crash on a method-less datagram.
    V4_0,
}

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// mi_datagram listener (None: off).
    pub mi_udp: Option<SocketAddr>,
    /// mi_http listener (None: off).
    pub mi_http: Option<SocketAddr>,
    /// Behaviour.
    pub version: Version,
    /// How long answering phones take to answer.
    pub answer_delay: Duration,
    /// How long `noanswer` rings before 408 (fr_inv_timeout; real: 8 s).
    pub ring_timeout: Duration,
    /// How long `dead` takes to time out (fr_timeout; real: 4 s).
    pub dead_timeout: Duration,
    /// More users whose phones answer, besides alice, bob, cindy and dave.
    pub extra_phones: Vec<String>,
    /// mi_http's poll step: its single httpd process checks for an asynchronous command's
    /// reply (`t_uac_dlg`) this often, sleeping in between and serving nothing else (real:
    /// 500 ms). Zero answers as soon as the command completes (kinder than OpenSIPS).
    pub mi_http_poll: Duration,
    /// Shared-memory budget: the most long transactions (`t_uac_dlg` in flight, relayed
    /// INVITEs ringing) the node holds at once; past it MI requests and BYEs fail as on an
    /// OpenSIPS out of shm (see [`shm`]). 0: unlimited.
    pub shm_budget: usize,
    /// Trunk gateways that answer (`host:port`, as a trunk's `$du` names them); an INVITE
    /// routed to any other trunk address times out (408 after `dead_timeout`): a trunk that
    /// is down.
    pub trunk_gateways: Vec<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            mi_udp: Some(local),
            mi_http: Some(local),
            version: Version::V3_6,
            answer_delay: Duration::from_millis(50),
            ring_timeout: Duration::from_secs(8),
            dead_timeout: Duration::from_secs(4),
            extra_phones: Vec::new(),
            mi_http_poll: Duration::from_millis(500),
            shm_budget: 0,
            trunk_gateways: Vec::new(),
        }
    }
}

/// A running emulator.
pub struct Emulator {
    node: Arc<Node>,
    mi_udp: Option<SocketAddr>,
    mi_http: Option<SocketAddr>,
    stop: CancellationToken,
}

impl Emulator {
    /// Where mi_datagram listens.
    pub fn mi_udp_addr(&self) -> Option<SocketAddr> {
        self.mi_udp
    }

    /// Where mi_http listens (`POST /mi`).
    pub fn mi_http_addr(&self) -> Option<SocketAddr> {
        self.mi_http
    }

    /// A call placed by phone `from_user` to `to_user` (not through MI), with pyua phones
    /// (Call-ID like `4fdbc63612fbb8cc@pyua-alice`); returns its Call-ID once the callee
    /// answered (1→2→3→4), rang (1→2, then 2→5 at the ring timeout) or refused (1→5).
    pub async fn place_call(&self, from_user: &str, to_user: &str) -> String {
        self.node.place_call(from_user, to_user, Phones::Pyua).await
    }

    /// [`Emulator::place_call`] with a choice of phones (baresip phones hang a call up as
    /// soon as they accepted a REFER on it; pyua phones keep it until told).
    pub async fn place_call_with(&self, from_user: &str, to_user: &str, phones: Phones) -> String {
        self.node.place_call(from_user, to_user, phones).await
    }

    /// A phone hangs call `callid` up (BYE once answered: 4→5; CANCEL while ringing: 2→5);
    /// false if there is no such live call.
    pub fn hang_up(&self, callid: &str) -> bool {
        self.node.hang_up(callid)
    }

    /// The shared-memory budget's counters (also served as `GET /emulator/stats`).
    pub fn stats(&self) -> Stats {
        self.node.stats()
    }

    /// Whether the node crashed.
    pub fn crashed(&self) -> bool {
        self.node.crashed()
    }

    /// Stops every listener.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the emulator's listeners.
pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
    let event_socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    let stop = CancellationToken::new();
    let node = Node::new(config.clone(), event_socket);
    let mut mi_udp = None;
    if let Some(addr) = config.mi_udp {
        let socket = UdpSocket::bind(addr).await?;
        mi_udp = Some(socket.local_addr()?);
        tokio::spawn(transport::serve_udp(socket, node.clone(), stop.clone()));
    }
    let mut mi_http = None;
    if let Some(addr) = config.mi_http {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        mi_http = Some(listener.local_addr()?);
        tokio::spawn(transport::serve_http(listener, node.clone(), stop.clone()));
    }
    tracing::info!(
        ?mi_udp,
        ?mi_http,
        version = ?config.version,
        mi_http_poll_ms = config.mi_http_poll.as_millis(),
        shm_budget = config.shm_budget,
        "OpenSIPS emulator listening"
    );
    Ok(Emulator {
        node,
        mi_udp,
        mi_http,
        stop,
    })
}
