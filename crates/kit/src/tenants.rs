//! The tenants of a deployment: the call centres one callapi serves, each identified by its SIP
//! domains, with the clients and users that may act for it, its extensions, trunks, OpenSIPS
//! nodes and limits (issue 11). Loaded from a TOML file (`[[tenants]]` entries, example in
//! `deploy/local/tenants.toml`), checked as a whole, and swapped as a whole when the file is
//! read again: a file with any error is refused and the tenants in force stay.
//!
//! Secrets are never kept here in clear: client secrets and passwords are Argon2 or bcrypt
//! hashes in PHC / modular crypt form (`$argon2id$…`, `$2b$…`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// What a token or a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Scope {
    /// List and read calls (a wallboard).
    #[serde(rename = "calls:read")]
    CallsRead,
    /// Start, transfer, hold and end calls (an agent desktop, a dialer).
    #[serde(rename = "calls:control")]
    CallsControl,
}

impl Scope {
    /// The scope as tokens name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::CallsRead => "calls:read",
            Scope::CallsControl => "calls:control",
        }
    }

    /// The scope a token names this way, if any.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "calls:read" => Some(Scope::CallsRead),
            "calls:control" => Some(Scope::CallsControl),
            _ => None,
        }
    }

    /// The scopes of a space-separated list (unknown words give none).
    pub fn parse_list(text: &str) -> BTreeSet<Self> {
        text.split_whitespace().filter_map(Self::parse).collect()
    }
}

/// How a tenant's new calls pick one of its OpenSIPS nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodePolicy {
    /// The first node of the list that is healthy.
    #[default]
    First,
    /// The nodes in turn.
    RoundRobin,
    /// The node with the fewest active calls.
    LeastActive,
}

/// How a webhook request proves itself to the receiver (PortSIP offers none, Basic and Bearer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookAuth {
    /// No `Authorization` header.
    #[default]
    None,
    /// HTTP Basic with `username` and the password in `password_env`.
    Basic,
    /// `Authorization: Bearer` with the token in `token_env`.
    Bearer,
}

/// A tenant's webhook: its call events POSTed to `url` in PortSIP's webhook event format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Where the events go (`http://` or `https://`).
    pub url: String,
    /// Off: nothing is sent (events wait, as PortSIP's switch pauses delivery).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How requests authenticate to the receiver.
    #[serde(default)]
    pub auth: WebhookAuth,
    /// Basic: the user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic: the environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Bearer: the environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The environment variable holding the key of the `X-Callapi-Signature` HMAC-SHA256
    /// (none: requests are not signed).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Tries of one event before it goes to the dead letters.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// Pauses before the 2nd, 3rd… try, milliseconds (the last one repeats).
    #[serde(default = "default_webhook_delays")]
    pub retry_delays_ms: Vec<u64>,
    /// One request's time limit, milliseconds.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
}

fn yes() -> bool {
    true
}

fn default_webhook_attempts() -> u32 {
    8
}

fn default_webhook_delays() -> Vec<u64> {
    vec![
        5_000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000, 3_600_000,
    ]
}

fn default_webhook_timeout() -> u64 {
    10_000
}

/// A service account: a CRM or dialer that signs in with a client id and secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    /// Client id (unique in the tenant).
    pub client_id: String,
    /// Argon2 or bcrypt hash of its secret.
    pub secret_hash: String,
    /// What its tokens may do.
    pub scopes: BTreeSet<Scope>,
}

/// A person who signs in with a user name and password.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User name (unique in the tenant).
    pub username: String,
    /// Argon2 or bcrypt hash of the password.
    pub password_hash: String,
    /// What the user's tokens may do.
    pub scopes: BTreeSet<Scope>,
}

/// An extension, for `GET /api/sessions/directly` (PortSIP's extension-password call start).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// The extension number (digits, unique in the tenant).
    pub number: String,
    /// Argon2 or bcrypt hash of its password.
    pub password_hash: String,
}

/// Which identities of a call going out through a trunk may be rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rewrite {
    /// The user part of From.
    From,
    /// The user part of P-Asserted-Identity.
    Pai,
    /// The user part of Remote-Party-ID.
    Rpi,
}

/// A trunk of the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trunk {
    /// Its name (`trunk` of `POST /api/sessions`; unique in the tenant).
    pub name: String,
    /// Where calls through it are sent (a `sip:` or `sips:` URI).
    pub uri: String,
    /// The rewrites a create may ask for.
    #[serde(default)]
    pub rewrites: BTreeSet<Rewrite>,
}

/// A tenant's limits; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent WebSocket connections.
    #[serde(default)]
    pub websocket_connections: u32,
    /// Commands per second (WebSocket and REST together).
    #[serde(default)]
    pub commands_per_second: u32,
    /// REST requests per second.
    #[serde(default)]
    pub rest_requests_per_second: u32,
    /// Active calls.
    #[serde(default)]
    pub active_calls: u32,
}

/// One tenant: a call centre.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Its id: a NATS subject token (letters, digits, `-`, `_`), the tenant in every subject.
    pub id: String,
    /// Its SIP domains (lower case host names or IPv4 addresses; no two tenants share one).
    pub domains: Vec<String>,
    /// The OpenSIPS nodes it may use (node ids, as proxy-connector names them).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// How its new calls pick a node.
    #[serde(default)]
    pub node_policy: NodePolicy,
    /// Its service accounts.
    #[serde(default)]
    pub api_clients: Vec<ApiClient>,
    /// Its users.
    #[serde(default)]
    pub users: Vec<User>,
    /// Its extensions.
    #[serde(default)]
    pub extensions: Vec<Extension>,
    /// Its trunks.
    #[serde(default)]
    pub trunks: Vec<Trunk>,
    /// Its limits.
    #[serde(default)]
    pub limits: Limits,
    /// Its webhook, if it has one.
    #[serde(default)]
    pub webhook: Option<Webhook>,
}

impl Tenant {
    /// The user with this name.
    pub fn user(&self, username: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == username)
    }

    /// The extension with this number.
    pub fn extension(&self, number: &str) -> Option<&Extension> {
        self.extensions.iter().find(|e| e.number == number)
    }

    /// The trunk with this name.
    pub fn trunk(&self, name: &str) -> Option<&Trunk> {
        self.trunks.iter().find(|t| t.name == name)
    }

    /// Whether a SIP host is one of its domains (compared in lower case).
    pub fn owns_domain(&self, host: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(host))
    }
}

/// Why a webhook's settings cannot work: (field, reason).
fn check_webhook(webhook: &Webhook) -> Result<(), (&'static str, String)> {
    let scheme_ok = webhook.url.starts_with("http://") || webhook.url.starts_with("https://");
    if !scheme_ok || webhook.url.len() > 2048 {
        return Err((
            "webhook.url",
            "must be an http:// or https:// URL of at most 2048 bytes".to_owned(),
        ));
    }
    let named = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.is_empty());
    match webhook.auth {
        WebhookAuth::Basic if !named(&webhook.username) || !named(&webhook.password_env) => {
            return Err((
                "webhook.auth",
                "basic needs username and password_env".to_owned(),
            ));
        }
        WebhookAuth::Bearer if !named(&webhook.token_env) => {
            return Err(("webhook.auth", "bearer needs token_env".to_owned()));
        }
        _ => {}
    }
    if webhook.max_attempts == 0 || webhook.max_attempts > 100 {
        return Err(("webhook.max_attempts", "must be 1 to 100".to_owned()));
    }
    if webhook.retry_delays_ms.is_empty() {
        return Err((
            "webhook.retry_delays_ms",
            "must hold at least one pause".to_owned(),
        ));
    }
    if !(100..=120_000).contains(&webhook.timeout_ms) {
        return Err(("webhook.timeout_ms", "must be 100 to 120000".to_owned()));
    }
    Ok(())
}

/// Whether `candidate` is the secret `hash` was made from (an Argon2 PHC string or a bcrypt
/// hash, as the tenants file holds them). A malformed hash matches nothing.
pub fn verify_secret(hash: &str, candidate: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
        PasswordHash::new(hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(candidate.as_bytes(), &parsed)
                .is_ok()
        })
    } else {
        bcrypt::verify(candidate, hash).unwrap_or(false)
    }
}

/// An Argon2id hash nothing matches in practice, checked in place of an unknown user's so a
/// sign-in takes as long whether the name exists or not.
pub const DECOY_HASH: &str = "$argon2id$v=19$m=65536,t=3,p=4$ZGVjb3lkZWNveWRlY295$0TUb0i8oNz4D8IlkUHFwbX0Vv7pXwmJ3m1m1w2iE3ag";

/// Why a tenants file was refused: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantsError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Not TOML of the expected shape.
    #[error("tenants file: {0}")]
    Syntax(String),
    /// A value breaks a rule.
    #[error("tenant {tenant:?}: {field} {reason}")]
    Invalid {
        /// The tenant (its id, or its position when the id itself is wrong).
        tenant: String,
        /// The field at fault.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Every tenant of the deployment, checked, and indexed by id and by SIP domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenants {
    by_id: BTreeMap<String, Arc<Tenant>>,
    by_domain: HashMap<String, String>,
    /// API client id → its tenant's id (client ids are unique in the deployment: the
    /// client-credentials grant names no tenant).
    by_client: HashMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tenants: Vec<Tenant>,
}

impl Tenants {
    /// The tenants a TOML text describes, if every one of them is valid.
    pub fn from_toml(text: &str) -> Result<Self, TenantsError> {
        let file: File = toml::from_str(text).map_err(|e| TenantsError::Syntax(e.to_string()))?;
        Self::new(file.tenants)
    }

    /// The tenants of the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Self, TenantsError> {
        let text = std::fs::read_to_string(path).map_err(|e| TenantsError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// Checks `tenants` and indexes them.
    pub fn new(tenants: Vec<Tenant>) -> Result<Self, TenantsError> {
        let mut checked = Tenants::default();
        for (position, tenant) in tenants.into_iter().enumerate() {
            let invalid = |field: &str, reason: String| TenantsError::Invalid {
                tenant: if crate::subjects::is_token(&tenant.id) {
                    tenant.id.clone()
                } else {
                    format!("#{}", position + 1)
                },
                field: field.to_owned(),
                reason,
            };
            if !is_tenant_id(&tenant.id) {
                return Err(invalid(
                    "id",
                    "must be 1 to 64 of letters, digits, - and _".to_owned(),
                ));
            }
            if checked.by_id.contains_key(&tenant.id) {
                return Err(invalid("id", "is given to two tenants".to_owned()));
            }
            if let Some(webhook) = &tenant.webhook {
                check_webhook(webhook).map_err(|(field, reason)| invalid(field, reason))?;
            }
            if tenant.domains.is_empty() {
                return Err(invalid(
                    "domains",
                    "must name at least one SIP domain".to_owned(),
                ));
            }
            for domain in &tenant.domains {
                if !is_domain(domain) {
                    return Err(invalid(
                        "domains",
                        format!("{domain:?} is not a lower-case host name or IPv4 address"),
                    ));
                }
                if let Some(other) = checked.by_domain.get(domain) {
                    return Err(invalid(
                        "domains",
                        format!("{domain:?} is also tenant {other:?}'s"),
                    ));
                }
            }
            for node in &tenant.nodes {
                if !crate::subjects::is_token(node) {
                    return Err(invalid("nodes", format!("{node:?} is not a node id")));
                }
            }
            unique(
                tenant.api_clients.iter().map(|c| c.client_id.as_str()),
                "api_clients.client_id",
            )
            .map_err(|reason| invalid("api_clients", reason))?;
            unique(
                tenant.users.iter().map(|u| u.username.as_str()),
                "users.username",
            )
            .map_err(|reason| invalid("users", reason))?;
            unique(
                tenant.extensions.iter().map(|e| e.number.as_str()),
                "extensions.number",
            )
            .map_err(|reason| invalid("extensions", reason))?;
            unique(tenant.trunks.iter().map(|t| t.name.as_str()), "trunks.name")
                .map_err(|reason| invalid("trunks", reason))?;
            for client in &tenant.api_clients {
                if client.client_id.is_empty() || client.client_id.len() > 128 {
                    return Err(invalid(
                        "api_clients.client_id",
                        "must be 1 to 128 characters".to_owned(),
                    ));
                }
                if let Some(other) = checked.by_client.get(&client.client_id) {
                    return Err(invalid(
                        "api_clients.client_id",
                        format!("{:?} is also tenant {other:?}'s", client.client_id),
                    ));
                }
                check_hash(&client.secret_hash)
                    .map_err(|reason| invalid("api_clients.secret_hash", reason))?;
            }
            for user in &tenant.users {
                if user.username.is_empty() || user.username.len() > 128 {
                    return Err(invalid(
                        "users.username",
                        "must be 1 to 128 characters".to_owned(),
                    ));
                }
                check_hash(&user.password_hash)
                    .map_err(|reason| invalid("users.password_hash", reason))?;
            }
            for extension in &tenant.extensions {
                let digits = extension.number.bytes().all(|b| b.is_ascii_digit());
                if !digits || !(1..=64).contains(&extension.number.len()) {
                    return Err(invalid(
                        "extensions.number",
                        format!("{:?} must be 1 to 64 digits", extension.number),
                    ));
                }
                check_hash(&extension.password_hash)
                    .map_err(|reason| invalid("extensions.password_hash", reason))?;
            }
            for trunk in &tenant.trunks {
                if !crate::validate::is_sip_scheme(&trunk.uri)
                    || crate::validate::sip_uri(&trunk.uri).is_err()
                {
                    return Err(invalid(
                        "trunks.uri",
                        format!("{:?} is not a sip: or sips: URI", trunk.uri),
                    ));
                }
            }
            for domain in &tenant.domains {
                checked.by_domain.insert(domain.clone(), tenant.id.clone());
            }
            for client in &tenant.api_clients {
                checked
                    .by_client
                    .insert(client.client_id.clone(), tenant.id.clone());
            }
            checked.by_id.insert(tenant.id.clone(), Arc::new(tenant));
        }
        Ok(checked)
    }

    /// The tenant with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id)
    }

    /// The tenant a SIP host belongs to (compared in lower case).
    pub fn by_domain(&self, host: &str) -> Option<&Arc<Tenant>> {
        let id = self.by_domain.get(&host.to_ascii_lowercase())?;
        self.by_id.get(id)
    }

    /// The API client with this id, and its tenant.
    pub fn api_client(&self, client_id: &str) -> Option<(&Arc<Tenant>, &ApiClient)> {
        let tenant = self.by_id.get(self.by_client.get(client_id)?)?;
        let client = tenant
            .api_clients
            .iter()
            .find(|c| c.client_id == client_id)?;
        Some((tenant, client))
    }

    /// Every tenant, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_id.values()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The tenants in force, read again from their file on demand (e.g. on SIGHUP).
#[derive(Debug, Clone)]
pub struct TenantsFile {
    path: PathBuf,
    current: tokio::sync::watch::Sender<Arc<Tenants>>,
}

impl TenantsFile {
    /// Loads `path`; an invalid file is an error (a service does not start on one).
    pub fn open(path: &Path) -> Result<Self, TenantsError> {
        let tenants = Tenants::load(path)?;
        let (current, _) = tokio::sync::watch::channel(Arc::new(tenants));
        Ok(Self {
            path: path.to_owned(),
            current,
        })
    }

    /// The tenants in force now.
    pub fn current(&self) -> Arc<Tenants> {
        self.current.borrow().clone()
    }

    /// Follows the tenants in force.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<Tenants>> {
        self.current.subscribe()
    }

    /// Reads the file again: a valid one replaces the tenants in force (true if anything
    /// changed); an invalid one is refused and they stay.
    pub fn reload(&self) -> Result<bool, TenantsError> {
        let tenants = Tenants::load(&self.path)?;
        let changed = *self.current.borrow().as_ref() != tenants;
        if changed {
            self.current.send_replace(Arc::new(tenants));
        }
        Ok(changed)
    }

    /// Reads the file again on every SIGHUP until `shutdown`, logging what happened.
    pub async fn reload_on_sighup(self, shutdown: tokio_util::sync::CancellationToken) {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP: the tenants file is read only at start");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!(path = %self.path.display(), tenants = self.current().len(), "tenants reloaded")
                }
                Ok(false) => tracing::info!(path = %self.path.display(), "tenants file unchanged"),
                Err(err) => {
                    tracing::error!(%err, "tenants file refused: the tenants in force stay")
                }
            }
        }
    }
}

fn is_tenant_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A lower-case host name (RFC 1123 labels) or an IPv4 address.
fn is_domain(domain: &str) -> bool {
    if domain.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    (1..=253).contains(&domain.len())
        && domain.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn unique<'a>(values: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for value in values {
        if !seen.insert(value) {
            return Err(format!("has {what} {value:?} twice"));
        }
    }
    Ok(())
}

/// A password hash as stored: Argon2 (PHC string) or bcrypt (modular crypt), never clear text.
fn check_hash(hash: &str) -> Result<(), String> {
    let argon2 = ["$argon2id$", "$argon2i$", "$argon2d$"]
        .iter()
        .any(|prefix| hash.starts_with(prefix));
    let bcrypt = ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|prefix| hash.starts_with(prefix))
        && hash.len() == 60;
    if argon2 {
        argon2::password_hash::PasswordHash::new(hash)
            .map(|_| ())
            .map_err(|e| format!("is not a well-formed Argon2 hash ({e})"))
    } else if bcrypt {
        Ok(())
    } else {
        Err(
            "must be an Argon2 ($argon2id$…) or bcrypt ($2b$…) hash, not a clear-text secret"
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXo";

    fn two_tenants() -> String {
        format!(
            r#"
[[tenants]]
id = "acme"
domains = ["acme.example.com", "10.0.0.1"]
nodes = ["opensips1"]
node_policy = "round_robin"
limits = {{ websocket_connections = 100, commands_per_second = 20 }}
[[tenants.api_clients]]
client_id = "crm"
secret_hash = "{HASH}"
scopes = ["calls:read", "calls:control"]
[[tenants.users]]
username = "wallboard"
password_hash = "{HASH}"
scopes = ["calls:read"]
[[tenants.extensions]]
number = "1001"
password_hash = "{HASH}"
[[tenants.trunks]]
name = "carrier"
uri = "sip:203.0.113.7"
rewrites = ["from", "pai"]

[[tenants]]
id = "globex"
domains = ["globex.example.net"]
"#
        )
    }

    #[test]
    fn a_valid_file_is_indexed_by_id_and_domain() {
        let tenants = Tenants::from_toml(&two_tenants()).unwrap();
        assert_eq!(tenants.len(), 2);
        let acme = tenants.get("acme").unwrap();
        assert_eq!(acme.node_policy, NodePolicy::RoundRobin);
        assert_eq!(acme.limits.websocket_connections, 100);
        assert_eq!(acme.limits.active_calls, 0);
        assert_eq!(
            acme.api_clients[0].scopes,
            BTreeSet::from([Scope::CallsRead, Scope::CallsControl])
        );
        assert_eq!(
            acme.trunks[0].rewrites,
            BTreeSet::from([Rewrite::From, Rewrite::Pai])
        );
        assert_eq!(tenants.by_domain("ACME.example.com").unwrap().id, "acme");
        assert_eq!(tenants.by_domain("10.0.0.1").unwrap().id, "acme");
        assert_eq!(
            tenants.by_domain("globex.example.net").unwrap().id,
            "globex"
        );
        assert!(tenants.by_domain("example.org").is_none());
        assert_eq!(
            tenants.get("globex").unwrap().node_policy,
            NodePolicy::First
        );
        assert_eq!(tenants.get("globex").unwrap().webhook, None);
        let with_hook = two_tenants().replace(
            r#"domains = ["globex.example.net"]"#,
            r#"domains = ["globex.example.net"]
webhook = { url = "https://crm.example/hook", auth = "bearer", token_env = "HOOK_TOKEN" }"#,
        );
        let tenants = Tenants::from_toml(&with_hook).unwrap();
        let hook = tenants.get("globex").unwrap().webhook.clone().unwrap();
        assert_eq!(hook.auth, WebhookAuth::Bearer);
        assert!(hook.enabled);
        assert_eq!(hook.max_attempts, 8);
        assert_eq!(hook.retry_delays_ms[0], 5_000);
    }

    #[test]
    fn every_broken_rule_names_the_tenant_and_field() {
        let base = two_tenants();
        for (from, to, field) in [
            (r#"id = "globex""#, r#"id = "acme""#, "id"),
            (r#"id = "globex""#, r#"id = "glo.bex""#, "id"),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["acme.example.com"]"#,
                "domains",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["Globex.example.net"]"#,
                "domains",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = []"#,
                "domains",
            ),
            (r#"nodes = ["opensips1"]"#, r#"nodes = ["a.b"]"#, "nodes"),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["globex.example.net"]
webhook = { url = "ftp://crm.example/hook" }"#,
                "webhook.url",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["globex.example.net"]
webhook = { url = "https://crm.example/hook", auth = "basic", username = "crm" }"#,
                "webhook.auth",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["globex.example.net"]
webhook = { url = "https://crm.example/hook", auth = "bearer" }"#,
                "webhook.auth",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["globex.example.net"]
webhook = { url = "https://crm.example/hook", retry_delays_ms = [] }"#,
                "webhook.retry_delays_ms",
            ),
            (
                r#"domains = ["globex.example.net"]"#,
                r#"domains = ["globex.example.net"]
webhook = { url = "https://crm.example/hook", max_attempts = 0 }"#,
                "webhook.max_attempts",
            ),
            (
                r#"number = "1001""#,
                r#"number = "10a1""#,
                "extensions.number",
            ),
            (
                r#"uri = "sip:203.0.113.7""#,
                r#"uri = "http://203.0.113.7""#,
                "trunks.uri",
            ),
        ] {
            let text = base.replacen(from, to, 1);
            assert_ne!(text, base, "{from}");
            match Tenants::from_toml(&text) {
                Err(TenantsError::Invalid { field: got, .. }) => assert_eq!(got, field, "{to}"),
                other => panic!("{to}: {other:?}"),
            }
        }
        let clear = base.replacen(
            &format!("secret_hash = \"{HASH}\""),
            "secret_hash = \"hunter2\"",
            1,
        );
        match Tenants::from_toml(&clear) {
            Err(TenantsError::Invalid { field, reason, .. }) => {
                assert_eq!(field, "api_clients.secret_hash");
                assert!(!reason.contains("hunter2"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        for (text, what) in [
            (
                base.replace("calls:read\", \"calls:control", "calls:everything"),
                "scope",
            ),
            (format!("{base}\nextra = 1\n"), "unknown key"),
            (base.replace("round_robin", "random"), "policy"),
        ] {
            assert!(
                matches!(Tenants::from_toml(&text), Err(TenantsError::Syntax(_))),
                "{what}"
            );
        }
    }

    #[test]
    fn the_local_stacks_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local/tenants.toml");
        let tenants = Tenants::load(&path).unwrap();
        let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["acme", "globex"]);
        assert_eq!(tenants.by_domain("127.0.0.1").unwrap().id, "acme");
        // The clear texts its comments give match its hashes, and nothing else does.
        let (acme, crm) = tenants.api_client("crm").unwrap();
        assert_eq!(acme.id, "acme");
        assert!(verify_secret(&crm.secret_hash, "acme-crm-secret"));
        assert!(!verify_secret(&crm.secret_hash, "globex-dialer-secret"));
        let wallboard = acme.user("wallboard").unwrap();
        assert!(verify_secret(
            &wallboard.password_hash,
            "acme-wallboard-password"
        ));
        let ext = acme.extension("1001").unwrap();
        assert!(verify_secret(&ext.password_hash, "acme-1001-password"));
        let (globex, dialer) = tenants.api_client("dialer").unwrap();
        assert_eq!(globex.id, "globex");
        assert!(verify_secret(&dialer.secret_hash, "globex-dialer-secret"));
        assert!(!verify_secret(DECOY_HASH, ""));
    }

    #[test]
    fn bcrypt_hashes_verify_too_and_malformed_ones_match_nothing() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify_secret(&hash, "s3cret"));
        assert!(!verify_secret(&hash, "s3cret "));
        assert!(!verify_secret("$2b$not-a-hash", "s3cret"));
        assert!(!verify_secret("$argon2id$garbage", "s3cret"));
    }

    #[test]
    fn a_client_id_belongs_to_one_tenant_in_the_deployment() {
        let text = format!(
            "{}[[tenants.api_clients]]\nclient_id = \"crm\"\nsecret_hash = \"{HASH}\"\nscopes = []\n",
            two_tenants()
        );
        let err = Tenants::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("\"crm\" is also tenant \"acme\"'s"), "{err}");
    }

    #[test]
    fn a_reload_swaps_a_valid_file_and_keeps_the_tenants_on_a_broken_one() {
        let dir = std::env::temp_dir().join(format!("callapi-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        std::fs::write(&path, two_tenants()).unwrap();
        let file = TenantsFile::open(&path).unwrap();
        let mut watch = file.watch();
        assert!(!file.reload().unwrap(), "nothing changed");
        std::fs::write(&path, two_tenants().replace("globex", "initech")).unwrap();
        assert!(file.reload().unwrap());
        assert!(watch.has_changed().unwrap());
        assert!(watch.borrow_and_update().get("initech").is_some());
        std::fs::write(&path, "[[tenants]]\nid = \"\"\n").unwrap();
        assert!(file.reload().is_err());
        assert!(file.current().get("initech").is_some(), "kept");
        assert!(!watch.has_changed().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
