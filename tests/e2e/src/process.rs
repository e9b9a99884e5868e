//! Child processes of a test: nats-server and our binaries, killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Path of one of the workspace's binaries, next to the test executable's directory.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// A NATS client of `urls` (one URL, or several separated by commas, as the services take
/// them).
pub async fn connect_nats(urls: &str) -> async_nats::Client {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|url| url.trim().parse().expect("a NATS URL"))
        .collect();
    async_nats::connect(servers).await.expect("connect to NATS")
}

/// A real nats-server with JetStream on a free port.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// Its port.
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// User and password the server requires, if any.
    auth: Option<(String, String)>,
    /// Its cluster settings, when it is one node of a cluster.
    cluster_args: Vec<String>,
}

impl NatsServer {
    /// Starts it and waits until it accepts connections.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, None).await
    }

    /// Starts one that requires `user`/`password`; its `url` carries them
    /// (`nats://user:password@127.0.0.1:PORT`).
    pub async fn start_with_auth(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, Some((user.to_owned(), password.to_owned()))).await
    }

    async fn start_with(dir: &Path, auth: Option<(String, String)>) -> Self {
        let port = free_port();
        let store = dir.join(format!("jetstream-{port}"));
        let log = dir.join("nats-server.log");
        let userinfo = auth
            .as_ref()
            .map(|(user, password)| format!("{user}:{password}@"))
            .unwrap_or_default();
        let mut server = Self {
            url: format!("nats://{userinfo}127.0.0.1:{port}"),
            port,
            store,
            log,
            child: None,
            auth,
            cluster_args: Vec::new(),
        };
        server.restart().await;
        server
    }

    /// Starts a JetStream cluster of `size` servers (routes between all of them) and waits
    /// until JetStream answers; each server's `url` is its own.
    pub async fn start_cluster(dir: &Path, size: usize) -> Vec<Self> {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (n, (port, cluster)) in ports.iter().enumerate() {
            let mut server = Self {
                url: format!("nats://127.0.0.1:{port}"),
                port: *port,
                store: dir.join(format!("jetstream-{port}")),
                log: dir.join(format!("nats-server-{n}.log")),
                child: None,
                auth: None,
                cluster_args: vec![
                    "--server_name".to_owned(),
                    format!("n{n}"),
                    "--cluster_name".to_owned(),
                    "callapi".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{cluster}"),
                    "--routes".to_owned(),
                    routes.clone(),
                ],
            };
            server.restart().await;
            servers.push(server);
        }
        // JetStream answers once the cluster elected its meta leader.
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let client = connect_nats(&urls.join(",")).await;
        let jetstream = async_nats::jetstream::new(client);
        for _ in 0..200 {
            if jetstream.query_account().await.is_ok() {
                return servers;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the JetStream cluster did not come up");
    }

    /// Starts it again (after [`NatsServer::stop`]) on the same port.
    pub async fn restart(&mut self) {
        let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_owned());
        let log = std::fs::File::create(&self.log).expect("nats log");
        let mut command = Command::new(binary);
        if let Some((user, password)) = &self.auth {
            command.args(["--user", user, "--pass", password]);
        }
        command.args(&self.cluster_args);
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server must be installed (or NATS_SERVER_BIN set)");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not start on port {}", self.port);
    }

    /// Kills it.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// One of our binaries, started and ready.
pub struct Service {
    /// Binary name.
    pub name: String,
    /// The `READY ...` line it printed.
    pub ready_line: String,
    /// Its log file (stderr).
    pub log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Starts `name` with `args` and `env`, and waits for its `READY` line.
    pub async fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(bin_path(name));
        command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "debug,async_nats=info,hyper=info".to_owned()),
            )
            // After RUST_LOG, so a test may set its own.
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn service");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("READY") {
                    return Some(rest.trim().to_owned());
                }
            }
            None
        })
        .await;
        let ready_line = match ready {
            Ok(Some(line)) => line,
            _ => {
                let logs = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{name} did not become ready; its log:\n{logs}");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            name: name.to_owned(),
            ready_line,
            log,
            child: Some(child),
        }
    }

    pub(crate) fn placeholder() -> Self {
        Self {
            name: String::new(),
            ready_line: String::new(),
            log: PathBuf::new(),
            child: None,
        }
    }

    /// A `key=value` field of the READY line.
    pub fn ready_field(&self, key: &str) -> Option<String> {
        self.ready_line.split_whitespace().find_map(|field| {
            let (k, v) = field.split_once('=')?;
            (k == key).then(|| v.to_owned())
        })
    }

    /// Kills it at once (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops it as Kubernetes does: SIGTERM, then waits up to `within` for it to exit (killed
    /// after that). Its exit status, or `None` if it had to be killed.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(within, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
