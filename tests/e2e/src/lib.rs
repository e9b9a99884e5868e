//! End-to-end test harness: starts a real `nats-server` (free port, own JetStream dir), the
//! OpenSIPS emulator and the four services as separate processes, and gives tests a WebSocket
//! client. Everything is killed (and its files removed) when the [`Stack`] is dropped.
//!
//! The service binaries must be built first (`cargo build --workspace --bins`; `make test` does).

pub mod client;
pub mod http;
pub mod process;

pub use client::Client;
pub use process::{NatsServer, Service, bin_path, free_port};

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How the stack is set up.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Emulated OpenSIPS version: "3.6" or "4.0".
    pub opensips_version: &'static str,
    /// MI transport the connector uses: "udp" (mi_datagram for every command) or "http"
    /// (mi_http for synchronous commands, mi_datagram for `t_uac_dlg`).
    pub mi_transport: &'static str,
    /// Number of gateway replicas.
    pub gateways: usize,
    /// Number of commands replicas.
    pub commands: usize,
    /// Deadlines of the commands service (ms): call start, transfer, hold, end.
    pub deadlines_ms: (u64, u64, u64, u64),
    /// Event subscription lifetime asked by event-ingest (s).
    pub expire_secs: u32,
    /// How often event-ingest checks its subscriptions (ms).
    pub check_interval_ms: u64,
    /// Phone answer delay (ms).
    pub answer_delay_ms: u64,
    /// How long `noanswer` rings before 408 (ms).
    pub ring_timeout_ms: u64,
    /// How long `dead` takes to time out (ms).
    pub dead_timeout_ms: u64,
    /// Extra top-level TOML lines for each gateway's config (e.g. `ping_interval_ms = 500`).
    pub gateway_toml: String,
    /// Extra top-level TOML lines for each commands replica's config.
    pub commands_toml: String,
    /// Extra lines for the `[deadlines]` table of each commands replica
    /// (e.g. `transfer_start_ms = 1000`).
    pub commands_deadlines_toml: String,
    /// Extra top-level TOML lines for event-ingest's config.
    pub ingest_toml: String,
    /// Extra lines for event-ingest's `[[nodes]]` entry.
    pub ingest_node_toml: String,
    /// The tenant event-ingest gives the node's calls.
    pub node_tenant: &'static str,
    /// Extra top-level TOML lines for proxy-connector's config.
    pub connector_toml: String,
    /// Extra lines for proxy-connector's `[[nodes]]` entry.
    pub connector_node_toml: String,
    /// Extra command-line arguments of the emulator.
    pub emulator_args: Vec<String>,
    /// Extra environment variables of the four services (not the emulator), e.g. `RUST_LOG`.
    pub service_env: Vec<(String, String)>,
    /// User and password NATS requires; the services get them in their `nats.url`.
    pub nats_auth: Option<(String, String)>,
    /// Run a JetStream cluster of this many nats-servers instead of one (0: one server); the
    /// services get every server's URL.
    pub nats_cluster: usize,
    /// User information put in proxy-connector's mi_http URL (`admin:pw@`), which the emulator
    /// ignores.
    pub mi_userinfo: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            opensips_version: "3.6",
            mi_transport: "udp",
            gateways: 1,
            commands: 1,
            deadlines_ms: (15_000, 10_000, 5_000, 5_000),
            expire_secs: 3600,
            check_interval_ms: 1_000,
            answer_delay_ms: 30,
            ring_timeout_ms: 1_500,
            dead_timeout_ms: 1_000,
            gateway_toml: String::new(),
            commands_toml: String::new(),
            commands_deadlines_toml: String::new(),
            ingest_toml: String::new(),
            ingest_node_toml: String::new(),
            node_tenant: "default",
            connector_toml: String::new(),
            connector_node_toml: String::new(),
            emulator_args: Vec::new(),
            service_env: Vec::new(),
            nats_auth: None,
            nats_cluster: 0,
            mi_userinfo: String::new(),
        }
    }
}

/// A running stack.
pub struct Stack {
    /// The NATS server.
    pub nats: NatsServer,
    /// The other servers of the JetStream cluster (`nats_cluster`), if any; `nats.url` then
    /// lists all of them.
    pub nats_peers: Vec<NatsServer>,
    /// The emulator.
    pub emulator: Service,
    /// MI datagram address of the emulator.
    pub emulator_mi_udp: String,
    /// MI HTTP address of the emulator.
    pub emulator_mi_http: String,
    /// event-ingest's socket as given to OpenSIPS (`udp:IP:PORT`).
    pub event_socket: String,
    /// proxy-connector.
    pub connector: Service,
    /// event-ingest.
    pub ingest: Service,
    /// commands replicas.
    pub commands: Vec<Service>,
    /// gateway replicas.
    pub gateways: Vec<Service>,
    /// WebSocket URL of each gateway.
    pub gateway_urls: Vec<String>,
    /// Where configs and logs go.
    pub dir: PathBuf,
    options: StackOptions,
    connector_config: String,
}

impl Stack {
    /// Starts a stack with default options.
    pub async fn start() -> Stack {
        Self::with(StackOptions::default()).await
    }

    /// Starts a stack.
    pub async fn with(options: StackOptions) -> Stack {
        let dir =
            std::env::temp_dir().join(format!("callapi-e2e-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create test dir");
        let (nats, nats_peers) = match (&options.nats_auth, options.nats_cluster) {
            (_, size) if size > 1 => {
                let mut servers = NatsServer::start_cluster(&dir, size).await;
                let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
                let mut first = servers.remove(0);
                // Everyone connects with every server's URL.
                first.url = urls.join(",");
                (first, servers)
            }
            (Some((user, password)), _) => (
                NatsServer::start_with_auth(&dir, user, password).await,
                Vec::new(),
            ),
            (None, _) => (NatsServer::start(&dir).await, Vec::new()),
        };
        let emulator = start_emulator(&dir, &options, "127.0.0.1:0", "127.0.0.1:0").await;
        let emulator_mi_udp = emulator.ready_field("mi_udp").expect("emulator mi_udp");
        let emulator_mi_http = emulator.ready_field("mi_http").expect("emulator mi_http");
        let mut stack = Stack {
            connector: Service::placeholder(),
            ingest: Service::placeholder(),
            commands: Vec::new(),
            gateways: Vec::new(),
            gateway_urls: Vec::new(),
            event_socket: String::new(),
            emulator_mi_udp,
            emulator_mi_http: emulator_mi_http.clone(),
            emulator,
            nats,
            nats_peers,
            dir,
            options: options.clone(),
            connector_config: String::new(),
        };
        // Asynchronous commands always go over mi_datagram (mi_http answers them at its 500 ms
        // poll step); "http" sends the synchronous ones over mi_http.
        let mi = match options.mi_transport {
            "udp" => format!("mi = \"udp:{}\"", stack.emulator_mi_udp),
            _ => format!(
                "mi = \"http://{}{emulator_mi_http}/mi\"\nmi_async = \"udp:{}\"",
                options.mi_userinfo, stack.emulator_mi_udp
            ),
        };
        stack.connector_config = format!(
            "ops_listen = \"127.0.0.1:0\"\n{}\n[nats]\nurl = \"{}\"\n[[nodes]]\nid = \"opensips1\"\n{mi}\ndefault_timeout_ms = 5000\n{}\n",
            options.connector_toml, stack.nats.url, options.connector_node_toml
        );
        stack.connector = stack
            .service("proxy-connector", &stack.connector_config)
            .await;
        stack.start_ingest().await;
        for _ in 0..options.commands {
            let commands = stack.start_commands().await;
            stack.commands.push(commands);
        }
        for _ in 0..options.gateways {
            stack.start_gateway().await;
        }
        stack.wait_subscribed(Duration::from_secs(10));
        stack
    }

    async fn service(&self, name: &str, config: &str) -> Service {
        let path = self
            .dir
            .join(format!("{name}-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, config).expect("write config");
        let path = path.to_string_lossy().into_owned();
        let env: Vec<(&str, &str)> = self
            .options
            .service_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Service::start(&self.dir, name, &["--config", &path], &env).await
    }

    /// Starts one more commands replica.
    pub async fn start_commands(&self) -> Service {
        let (start, transfer, hold, end) = self.options.deadlines_ms;
        self.service(
            "commands",
            &format!(
                "node_id = \"opensips1\"\nops_listen = \"127.0.0.1:0\"\n{}\n[nats]\nurl = \"{}\"\n[deadlines]\ncall_start_ms = {start}\ntransfer_ms = {transfer}\nhold_ms = {hold}\nend_ms = {end}\n{}\n",
                self.options.commands_toml, self.nats.url, self.options.commands_deadlines_toml
            ),
        )
        .await
    }

    fn ingest_config(&self, listen: &str) -> String {
        format!(
            "expire_secs = {}\ncheck_interval_ms = {}\nops_listen = \"127.0.0.1:0\"\n{}\n[nats]\nurl = \"{}\"\n[[nodes]]\nid = \"opensips1\"\ntenant = \"{}\"\nlisten = \"{listen}\"\n{}\n",
            self.options.expire_secs,
            self.options.check_interval_ms,
            self.options.ingest_toml,
            self.nats.url,
            self.options.node_tenant,
            self.options.ingest_node_toml
        )
    }

    async fn start_ingest(&mut self) {
        self.ingest = self
            .service("event-ingest", &self.ingest_config("127.0.0.1:0"))
            .await;
        self.event_socket = self.ingest.ready_field("opensips1").expect("ingest socket");
    }

    /// Starts a second event-ingest bound to the same address as the running one (as a
    /// replacement behind the same Service), and returns it; the caller keeps it.
    pub async fn start_ingest_beside(&self) -> Service {
        let listen = self
            .event_socket
            .strip_prefix("udp:")
            .expect("the ingest listens on UDP");
        self.service("event-ingest", &self.ingest_config(listen))
            .await
    }

    /// Starts another proxy-connector with the stack's configuration (it joins the queue group
    /// of the running one); the caller keeps it.
    pub async fn start_connector(&self) -> Service {
        self.service("proxy-connector", &self.connector_config)
            .await
    }

    /// Starts event-ingest again (after `ingest.terminate()`), as `restart_ingest` does.
    pub async fn start_ingest_again(&mut self) {
        self.start_ingest().await;
        self.wait_subscribed(Duration::from_secs(10));
    }

    /// Starts proxy-connector again with the same configuration (after `connector.kill()`).
    pub async fn restart_connector(&mut self) {
        self.connector.kill().await;
        self.connector = self
            .service("proxy-connector", &self.connector_config)
            .await;
    }

    /// Kills every callapi service (gateways, commands, proxy-connector, event-ingest) and
    /// starts them again with the same configuration; NATS and the emulator stay up. The
    /// gateways listen on new ports (`gateway_urls` follows).
    pub async fn restart_services(&mut self) {
        for gateway in &mut self.gateways {
            gateway.kill().await;
        }
        for commands in &mut self.commands {
            commands.kill().await;
        }
        self.connector.kill().await;
        self.ingest.kill().await;
        self.connector = self
            .service("proxy-connector", &self.connector_config)
            .await;
        self.start_ingest().await;
        let mut commands = Vec::new();
        for _ in 0..self.options.commands {
            commands.push(self.start_commands().await);
        }
        self.commands = commands;
        self.gateways.clear();
        self.gateway_urls.clear();
        for _ in 0..self.options.gateways {
            self.start_gateway().await;
        }
        self.wait_subscribed(Duration::from_secs(10));
    }

    /// Kills event-ingest and starts it again with the same configuration (it listens on a new
    /// port and subscribes the node to it).
    pub async fn restart_ingest(&mut self) {
        self.ingest.kill().await;
        self.start_ingest().await;
        self.wait_subscribed(Duration::from_secs(10));
    }

    /// Starts one more gateway, with `extra` added to its configuration, and returns it with
    /// its WebSocket URL (it is not one of `gateways`).
    pub async fn extra_gateway(&self, extra: &str) -> (Service, String) {
        let gateway = self
            .service(
                "gateway",
                &format!(
                    "listen = \"127.0.0.1:0\"\n{extra}\n[nats]\nurl = \"{}\"\n",
                    self.nats.url
                ),
            )
            .await;
        let listen = gateway.ready_field("listen").expect("gateway listen");
        (gateway, format!("ws://{listen}/call-api"))
    }

    /// Starts one more gateway with the stack's gateway options; it joins `gateways` and
    /// `gateway_urls`.
    pub async fn start_gateway(&mut self) {
        let gateway = self
            .service(
                "gateway",
                &format!(
                    "listen = \"127.0.0.1:0\"\n{}\n[nats]\nurl = \"{}\"\n",
                    self.options.gateway_toml, self.nats.url
                ),
            )
            .await;
        let listen = gateway.ready_field("listen").expect("gateway listen");
        self.gateway_urls.push(format!("ws://{listen}/call-api"));
        self.gateways.push(gateway);
    }

    /// Kills the emulator and starts a fresh one (no dialogs, no subscriptions) on the same
    /// MI addresses, as when OpenSIPS restarts.
    pub async fn restart_emulator(&mut self) {
        self.emulator.kill().await;
        let udp = self.emulator_mi_udp.clone();
        let http = self.emulator_mi_http.clone();
        self.emulator = self.start_emulator(&udp, &http).await;
    }

    async fn start_emulator(&self, udp: &str, http: &str) -> Service {
        start_emulator(&self.dir, &self.options, udp, http).await
    }

    /// `host:port` of the first gateway's HTTP listener (REST under `/api`).
    pub fn http_addr(&self) -> String {
        self.gateway_urls[0]
            .trim_start_matches("ws://")
            .trim_end_matches("/call-api")
            .to_owned()
    }

    /// URL of the first gateway.
    pub fn url(&self) -> &str {
        &self.gateway_urls[0]
    }

    /// Connects a client to gateway `index`.
    pub async fn client_of(&self, index: usize) -> Client {
        Client::connect(&self.gateway_urls[index]).await
    }

    /// Connects a client to the first gateway.
    pub async fn client(&self) -> Client {
        self.client_of(0).await
    }

    /// Sends one MI request straight to the emulator over UDP (as an operator would).
    pub fn mi(&self, method: &str, params: Value) -> Value {
        mi_udp(&self.emulator_mi_udp, method, params)
    }

    /// Seconds left on event-ingest's subscription to `event`, from the emulator itself.
    pub fn subscription_ttl(&self, event: &str) -> Option<u64> {
        let listed = self.mi("subscribers_list", json!({"event": event}));
        let subscribers = listed["result"]["Event"]["Subscribers"].as_array()?.clone();
        subscribers
            .iter()
            .find(|s| s["socket"] == Value::String(self.event_socket.clone()))
            .and_then(|s| s["ttl"].as_u64())
    }

    /// Waits until event-ingest holds live subscriptions for the three events.
    pub fn wait_subscribed(&self, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let all = ["E_DLG_STATE_CHANGED", "E_CALL_TRANSFER", "E_CALL_HOLD"]
                .iter()
                .all(|e| self.subscription_ttl(e).is_some_and(|ttl| ttl > 0));
            if all {
                return;
            }
            assert!(
                Instant::now() < until,
                "event-ingest did not subscribe in time; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var_os("CALLAPI_E2E_KEEP").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files and logs kept in {}", self.dir.display());
        }
    }
}

/// Starts an emulator with the stack's phone settings on the given MI addresses (the stack's
/// own, or another node for tests with several).
pub async fn start_emulator(
    dir: &std::path::Path,
    options: &StackOptions,
    udp: &str,
    http: &str,
) -> Service {
    let (answer, ring, dead) = (
        options.answer_delay_ms.to_string(),
        options.ring_timeout_ms.to_string(),
        options.dead_timeout_ms.to_string(),
    );
    let mut args = vec![
        "--mi-udp",
        udp,
        "--mi-http",
        http,
        "--opensips-version",
        options.opensips_version,
        "--answer-delay-ms",
        &answer,
        "--ring-timeout-ms",
        &ring,
        "--dead-timeout-ms",
        &dead,
        "--extra-phones",
        "eve",
    ];
    args.extend(options.emulator_args.iter().map(String::as_str));
    Service::start(dir, "opensips-emulator", &args, &[]).await
}

/// One MI request over UDP to `addr`, waiting up to 10 s for the reply.
///
/// A socket with a receive timeout is never restarted after a signal (signal(7), even with
/// SA_RESTART), and the test process gets SIGCHLD from the services it runs: an interrupted
/// receive is retried until the deadline.
pub fn mi_udp(addr: &str, method: &str, params: Value) -> Value {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    socket
        .send_to(request.to_string().as_bytes(), addr)
        .expect("send MI");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65_535];
    let len = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no MI reply to {method} within 10 s");
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.recv(&mut buf) {
            Ok(len) => break len,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => panic!("MI reply to {method}: {error}"),
        }
    };
    serde_json::from_slice(&buf[..len]).unwrap_or(Value::Null)
}

/// Subscribes to `subject` and returns once nats-server has the subscription in place.
///
/// async-nats's `flush` only writes the SUB to the socket: a message another connection
/// publishes right after can still be routed before the server has read it (seen on this
/// loaded machine). A probe published on this connection after the SUB (on `probe`, which
/// `subject` must match) comes back only once the server has it. Call it before anything is
/// published on `subject`: what arrives before the probe is dropped.
pub async fn subscribe_ready(
    client: &async_nats::Client,
    subject: &str,
    probe: &str,
) -> async_nats::Subscriber {
    use futures::StreamExt as _;
    let mut subscriber = client
        .subscribe(subject.to_owned())
        .await
        .expect("subscribe");
    client
        .publish(probe.to_owned(), "probe".into())
        .await
        .expect("publish the probe");
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = subscriber.next().await {
            if message.subject.as_str() == probe {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        arrived,
        Ok(true),
        "the probe on {probe} never came back on {subject}"
    );
    subscriber
}
