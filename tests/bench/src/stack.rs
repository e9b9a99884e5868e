//! The stack under test, started by the bench itself: a nats-server on a free port, the
//! OpenSIPS emulator with instant phones (unless a real OpenSIPS is named), and the four
//! services, each from the given binary directory with its own config file and log. Unlike the
//! e2e harness it never panics (every failure is a [`BenchError`]), starts the services with
//! their production log level, and can point at a real OpenSIPS, leaving the emulator out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::error::{BenchError, Result};
use crate::mi::MiClient;

/// How long a process may take to print its `READY` line.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// The events event-ingest subscribes to (its default).
pub const EVENTS: [&str; 3] = ["E_DLG_STATE_CHANGED", "E_CALL_TRANSFER", "E_CALL_HOLD"];

/// Which OpenSIPS the stack drives.
#[derive(Debug, Clone)]
pub enum Target {
    /// The emulator, started by the bench.
    Emulator {
        /// `--opensips-version`.
        version: String,
        /// Extra emulator arguments.
        args: Vec<String>,
    },
    /// A real OpenSIPS's mi_datagram socket.
    Real(SocketAddr),
}

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// The nats-server program.
    pub nats_server: String,
    /// Where configs and logs go.
    pub dir: PathBuf,
    /// Which OpenSIPS.
    pub target: Target,
    /// event-ingest's `listen` for the node.
    pub ingest_listen: String,
    /// event-ingest's `advertise` for the node, if set.
    pub ingest_advertise: Option<String>,
    /// event-ingest's `senders` for the node, if set.
    pub ingest_senders: Vec<String>,
    /// Extra lines for proxy-connector's `[[nodes]]` entry.
    pub connector_node_toml: Vec<String>,
    /// `RUST_LOG` of the services.
    pub service_log: String,
    /// Extra environment variables of the services (`CALLAPI_...`).
    pub service_env: Vec<(String, String)>,
}

/// One child process.
pub struct Proc {
    /// Its name.
    pub name: String,
    /// The rest of its `READY` line.
    pub ready: String,
    /// Its log (stderr).
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// A `key=value` field of its READY line.
    pub fn ready_field(&self, key: &str) -> Option<String> {
        self.ready.split_whitespace().find_map(|field| {
            let (k, v) = field.split_once('=')?;
            (k == key).then(|| v.to_owned())
        })
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The running stack.
pub struct Stack {
    /// nats-server.
    pub nats: Proc,
    /// The emulator, unless a real OpenSIPS is used.
    pub emulator: Option<Proc>,
    /// proxy-connector.
    pub connector: Proc,
    /// event-ingest.
    pub ingest: Proc,
    /// commands.
    pub commands: Proc,
    /// gateway.
    pub gateway: Proc,
    /// `ws://…/call-api` of the gateway.
    pub url: String,
    /// The node's mi_datagram socket.
    pub mi: SocketAddr,
    /// event-ingest's socket as given to OpenSIPS.
    pub event_socket: String,
    /// Configs and logs.
    pub dir: PathBuf,
    /// nats-server's HTTP monitoring port.
    nats_monitor: u16,
}

/// nats-server's message counters (`/varz`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NatsCounters {
    /// Messages received from clients.
    pub in_msgs: u64,
    /// Messages delivered to clients.
    pub out_msgs: u64,
    /// Bytes received.
    pub in_bytes: u64,
    /// Bytes delivered.
    pub out_bytes: u64,
}

impl NatsCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &NatsCounters) -> NatsCounters {
        NatsCounters {
            in_msgs: self.in_msgs.saturating_sub(earlier.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(earlier.out_msgs),
            in_bytes: self.in_bytes.saturating_sub(earlier.in_bytes),
            out_bytes: self.out_bytes.saturating_sub(earlier.out_bytes),
        }
    }

    fn from_varz(varz: &Value) -> Option<NatsCounters> {
        Some(NatsCounters {
            in_msgs: varz["in_msgs"].as_u64()?,
            out_msgs: varz["out_msgs"].as_u64()?,
            in_bytes: varz["in_bytes"].as_u64()?,
            out_bytes: varz["out_bytes"].as_u64()?,
        })
    }
}

/// A port free right now on 127.0.0.1.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_error(name: &str, reason: impl std::fmt::Display) -> BenchError {
    BenchError::Start {
        name: name.to_owned(),
        reason: reason.to_string(),
    }
}

/// A TOML string literal.
fn toml_str(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Starts `program` with `args` and waits for its `READY` line.
async fn spawn_ready(
    dir: &Path,
    name: &str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
) -> Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log)?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| start_error(name, format!("{}: {err}", program.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| start_error(name, "no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(READY_WITHIN, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("READY") {
                return Some(rest.trim().to_owned());
            }
        }
        None
    })
    .await;
    let Ok(Some(ready)) = ready else {
        let _ = child.kill().await;
        let tail: String = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(start_error(
            name,
            format!("no READY line; last lines of {}:\n{tail}", log.display()),
        ));
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc {
        name: name.to_owned(),
        ready,
        log,
        child,
    })
}

impl Stack {
    /// Starts everything and waits until event-ingest is subscribed on the node.
    pub async fn start(config: &StackConfig) -> Result<Stack> {
        std::fs::create_dir_all(&config.dir)?;
        let nats_port = free_port()?;
        let nats_monitor = free_port()?;
        let nats = start_nats(config, nats_port, nats_monitor).await?;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let (emulator, mi) = match &config.target {
            Target::Emulator { version, args } => {
                let mut all: Vec<String> = [
                    "--mi-udp",
                    "127.0.0.1:0",
                    "--mi-http",
                    "127.0.0.1:0",
                    "--opensips-version",
                    version,
                    "--answer-delay-ms",
                    "0",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
                all.extend(args.iter().cloned());
                let emulator = spawn_ready(
                    &config.dir,
                    "opensips-emulator",
                    &config.bin_dir.join("opensips-emulator"),
                    &all,
                    &[],
                )
                .await?;
                let mi = emulator
                    .ready_field("mi_udp")
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| start_error("opensips-emulator", "no mi_udp in READY"))?;
                (Some(emulator), mi)
            }
            Target::Real(mi) => (None, *mi),
        };
        let nats_toml = format!("[nats]\nurl = {}\n", toml_str(&nats_url));
        let connector = service(
            config,
            "proxy-connector",
            &format!(
                "{nats_toml}[[nodes]]\nid = \"opensips1\"\nmi = {}\n{}\n",
                toml_str(&format!("udp:{mi}")),
                config.connector_node_toml.join("\n")
            ),
        )
        .await?;
        let mut node = format!(
            "[[nodes]]\nid = \"opensips1\"\ntenant = \"default\"\nlisten = {}\n",
            toml_str(&config.ingest_listen)
        );
        if let Some(advertise) = &config.ingest_advertise {
            node.push_str(&format!("advertise = {}\n", toml_str(advertise)));
        }
        if !config.ingest_senders.is_empty() {
            let list: Vec<String> = config.ingest_senders.iter().map(|s| toml_str(s)).collect();
            node.push_str(&format!("senders = [{}]\n", list.join(", ")));
        }
        let ingest = service(config, "event-ingest", &format!("{nats_toml}{node}")).await?;
        let event_socket = ingest
            .ready_field("opensips1")
            .ok_or_else(|| start_error("event-ingest", "no opensips1 socket in READY"))?;
        let commands = service(
            config,
            "commands",
            &format!("node_id = \"opensips1\"\n{nats_toml}"),
        )
        .await?;
        let gateway = service(
            config,
            "gateway",
            &format!("listen = \"127.0.0.1:0\"\n{nats_toml}"),
        )
        .await?;
        let listen = gateway
            .ready_field("listen")
            .ok_or_else(|| start_error("gateway", "no listen in READY"))?;
        let stack = Stack {
            nats,
            emulator,
            connector,
            ingest,
            commands,
            gateway,
            url: format!("ws://{listen}/call-api"),
            mi,
            event_socket,
            dir: config.dir.clone(),
            nats_monitor,
        };
        stack.wait_subscribed(Duration::from_secs(15)).await?;
        Ok(stack)
    }

    /// Waits until the node lists event-ingest's socket for every event.
    async fn wait_subscribed(&self, within: Duration) -> Result<()> {
        let mut mi = MiClient::new(self.mi).await?;
        let until = Instant::now() + within;
        loop {
            let mut all = true;
            for event in EVENTS {
                let listed = mi
                    .call(
                        "subscribers_list",
                        json!({"event": event}),
                        Duration::from_secs(2),
                    )
                    .await;
                let subscribed = match listed {
                    Ok(Ok(result)) => lists_socket(&result, &self.event_socket),
                    _ => false,
                };
                all &= subscribed;
            }
            if all {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(start_error(
                    "event-ingest",
                    format!(
                        "not subscribed on the node within {} s (is {} reachable from OpenSIPS, and its address in senders?); logs in {}",
                        within.as_secs(),
                        self.event_socket,
                        self.dir.display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// nats-server's counters now (`None` if its monitoring endpoint does not answer).
    pub async fn nats_counters(&self) -> Option<NatsCounters> {
        let get = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.nats_monitor))
                .await
                .ok()?;
            stream
                .write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await
                .ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            let start = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let varz: Value = serde_json::from_slice(&response[start..]).ok()?;
            NatsCounters::from_varz(&varz)
        };
        tokio::time::timeout(Duration::from_secs(5), get)
            .await
            .ok()
            .flatten()
    }

    /// Every process, for CPU accounting.
    pub fn procs(&self) -> Vec<&Proc> {
        let mut all = vec![&self.nats];
        all.extend(self.emulator.as_ref());
        all.extend([&self.connector, &self.ingest, &self.commands, &self.gateway]);
        all
    }

    /// Names of the processes that are no longer running.
    pub fn dead(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        let mut all: Vec<&mut Proc> = vec![&mut self.nats];
        all.extend(self.emulator.as_mut());
        all.extend([
            &mut self.connector,
            &mut self.ingest,
            &mut self.commands,
            &mut self.gateway,
        ]);
        for proc in all {
            if !proc.alive() {
                dead.push(format!("{} (log {})", proc.name, proc.log.display()));
            }
        }
        dead
    }

    /// Kills everything.
    pub async fn stop(mut self) {
        self.gateway.kill().await;
        self.commands.kill().await;
        self.ingest.kill().await;
        self.connector.kill().await;
        if let Some(emulator) = self.emulator.as_mut() {
            emulator.kill().await;
        }
        self.nats.kill().await;
    }
}

/// Whether a `subscribers_list` result names `socket` with time left.
fn lists_socket(result: &Value, socket: &str) -> bool {
    result["Event"]["Subscribers"]
        .as_array()
        .is_some_and(|subs| {
            subs.iter()
                .any(|s| s["socket"] == socket && has_time_left(&s["ttl"]))
        })
}

/// A subscriber's `ttl`: seconds left, `"expired"`, or absent (then taken as live).
fn has_time_left(ttl: &Value) -> bool {
    match ttl {
        Value::Null => true,
        Value::Number(n) => n.as_u64().is_some_and(|n| n > 0),
        _ => false,
    }
}

async fn start_nats(config: &StackConfig, port: u16, monitor: u16) -> Result<Proc> {
    let log = config.dir.join("nats-server.log");
    let log_file = std::fs::File::create(&log)?;
    // JetStream: the session store is a key-value bucket.
    let store = config.dir.join("jetstream");
    let mut child = Command::new(&config.nats_server)
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| {
            start_error(
                "nats-server",
                format!(
                    "{}: {err} (install it, e.g. `apt-get install nats-server`, or set NATS_SERVER_BIN)",
                    config.nats_server
                ),
            )
        })?;
    let until = Instant::now() + READY_WITHIN;
    while Instant::now() < until {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(Proc {
                name: "nats-server".into(),
                ready: format!("port={port}"),
                log,
                child,
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill().await;
    Err(start_error(
        "nats-server",
        format!("no listener on port {port}"),
    ))
}

async fn service(config: &StackConfig, name: &str, toml: &str) -> Result<Proc> {
    let path = config.dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml)?;
    let mut env = vec![("RUST_LOG".to_owned(), config.service_log.clone())];
    // `SERVICE:NAME` scopes a variable to one service (`gateway:TOKIO_WORKER_THREADS`).
    env.extend(
        config
            .service_env
            .iter()
            .filter_map(|(key, value)| match key.split_once(':') {
                Some((service, key)) => (service == name).then(|| (key.to_owned(), value.clone())),
                None => Some((key.clone(), value.clone())),
            }),
    );
    spawn_ready(
        &config.dir,
        name,
        &config.bin_dir.join(name),
        &["--config".to_owned(), path.to_string_lossy().into_owned()],
        &env,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_lists_are_read_as_the_node_writes_them() {
        let result = json!({"Event": {"name": "E_CALL_HOLD", "Subscribers": [
            {"socket": "udp:127.0.0.1:9", "expire": 3600, "ttl": 3599},
            {"socket": "udp:127.0.0.1:10", "expire": 0, "ttl": 0},
            {"socket": "udp:127.0.0.1:12", "expire": 0, "ttl": "expired"},
        ]}});
        assert!(lists_socket(&result, "udp:127.0.0.1:9"));
        assert!(!lists_socket(&result, "udp:127.0.0.1:10"));
        assert!(!lists_socket(&result, "udp:127.0.0.1:11"));
        assert!(!lists_socket(&result, "udp:127.0.0.1:12"));
        assert!(!lists_socket(&json!(null), "udp:127.0.0.1:9"));
    }

    #[test]
    fn nats_counters_come_from_varz() {
        let varz = json!({"in_msgs": 10, "out_msgs": 25, "in_bytes": 1000, "out_bytes": 2500, "connections": 4});
        let now = NatsCounters::from_varz(&varz).unwrap();
        let before = NatsCounters {
            in_msgs: 4,
            out_msgs: 5,
            in_bytes: 400,
            out_bytes: 500,
        };
        let delta = now.since(&before);
        assert_eq!((delta.in_msgs, delta.out_msgs), (6, 20));
        assert_eq!((delta.in_bytes, delta.out_bytes), (600, 2000));
        assert!(NatsCounters::from_varz(&json!({"in_msgs": 1})).is_none());
    }

    #[test]
    fn toml_strings_are_quoted_and_escaped() {
        assert_eq!(toml_str("udp:127.0.0.1:8080"), "\"udp:127.0.0.1:8080\"");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
