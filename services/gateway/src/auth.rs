//! Who is calling (issue 11): sign-in at `POST /api/login/oauth/token` as PortSIP v22 does it
//! (OAuth 2.0, form-encoded: `password` for a tenant's user, `client_credentials` for an API
//! client, `refresh_token`), revocation at `POST /api/login/oauth/revoke`, and the check of the
//! access token every REST request and WebSocket upgrade makes.
//!
//! An access token is a JWT ([`crate::tokens`]) naming the tenant, the subject, the scopes and
//! the sign-in (grant) it comes from. Grants live in the JetStream key-value bucket
//! [`GRANTS_BUCKET`] (so any gateway refreshes what another issued); a refresh token is
//! `<grant id>.<secret>`, only the secret's SHA-256 is stored, and every refresh rotates it (an
//! old one presented again revokes the grant: it was stolen or replayed). Revoked grants go to
//! [`REVOKED_BUCKET`], which every gateway follows, so their access tokens stop working
//! everywhere at once. Each request also checks that the tenant and the subject still exist
//! with the scopes the token claims: removing a user from the tenants file (and SIGHUP) cuts it
//! off without waiting for its tokens to expire.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use callapi_kit::tenants::{self, Scope, Tenant, Tenants, TenantsFile};
use callapi_proto::v1::{AuthGrant, RevokedGrant};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::sessions::{Entries, follow};
use crate::tokens::{Claims, KeyConfig, Keys, TokenError};

/// Bucket of the live sign-ins (what refresh tokens renew).
pub const GRANTS_BUCKET: &str = "callapi_auth_grants";
/// Bucket of the revoked sign-ins, followed by every gateway.
pub const REVOKED_BUCKET: &str = "callapi_auth_revoked";

/// `[auth]` of the gateway configuration: present, every client must sign in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The tenants file (`kit::tenants`), read again on SIGHUP.
    pub tenants_file: String,
    /// The keys that sign and verify access tokens (rotation: add a new key, make it
    /// `active_key`, remove the old one once the tokens it signed have expired).
    pub signing_keys: Vec<KeyConfig>,
    /// The `kid` of the key that signs new tokens.
    pub active_key: String,
    /// Lifetime of an access token, seconds.
    #[serde(default = "default_access_ttl")]
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, seconds.
    #[serde(default = "default_refresh_ttl")]
    pub refresh_token_ttl_secs: u64,
    /// Web origins whose pages may open WebSockets (`Origin` header, e.g.
    /// `https://desk.example.com`); a request with another `Origin` is refused. Clients that
    /// send no `Origin` (servers, CLIs) are not concerned.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Refuse WebSocket upgrades without an `Origin` too (a deployment whose clients are all
    /// browsers); by default a client that sends none (a server, a CLI) is let through.
    #[serde(default)]
    pub require_origin: bool,
}

fn default_access_ttl() -> u64 {
    3_600
}

fn default_refresh_ttl() -> u64 {
    30 * 24 * 3_600
}

/// Who made a request, as its access token says and the tenants file still allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The tenant it acts for.
    pub tenant: String,
    /// `client:<id>` or `user:<name>`.
    pub subject: String,
    /// What it may do.
    pub scopes: BTreeSet<Scope>,
    /// When its token expires (Unix seconds).
    pub expires_at: u64,
    /// The sign-in its token comes from.
    pub grant: String,
}

impl Identity {
    /// Whether it may do what `scope` allows.
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// Why a request is not authenticated (a 401; the reason is for logs and the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token.
    #[error("an access token is required (Authorization: Bearer <token>)")]
    Missing,
    /// The token is not valid.
    #[error("the access token is not valid: {0}")]
    Token(#[from] TokenError),
    /// Its sign-in was revoked.
    #[error("the access token was revoked")]
    Revoked,
    /// Its tenant or subject is gone, or no longer has the scopes it claims.
    #[error("the access token's tenant or account no longer exists")]
    Gone,
}

/// An OAuth 2.0 error answer (RFC 6749 section 5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OAuthError {
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `unsupported_grant_type`,
    /// `invalid_scope`, `slow_down` (too many failures lately), `server_error`.
    pub error: &'static str,
    /// What went wrong, in words.
    pub error_description: String,
    /// For `slow_down`: when to try again (`Retry-After`).
    #[serde(skip)]
    pub retry_after_secs: Option<u64>,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            error_description: description.into(),
            retry_after_secs: None,
        }
    }

    /// The HTTP status of this error: 401 for a client that failed to authenticate, 429 for
    /// too many failures, 503 for ours, 400 otherwise.
    pub fn status(&self) -> axum::http::StatusCode {
        match self.error {
            "invalid_client" => axum::http::StatusCode::UNAUTHORIZED,
            "slow_down" => axum::http::StatusCode::TOO_MANY_REQUESTS,
            "server_error" => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            _ => axum::http::StatusCode::BAD_REQUEST,
        }
    }
}

/// The form of `POST /api/login/oauth/token`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct TokenForm {
    /// `password`, `client_credentials` or `refresh_token`.
    #[serde(default)]
    pub grant_type: String,
    /// A user's name (password grant).
    #[serde(default)]
    pub username: Option<String>,
    /// A user's password (password grant).
    #[serde(default)]
    pub password: Option<String>,
    /// The tenant's SIP domain (password grant).
    #[serde(default)]
    pub domain: Option<String>,
    /// An API client's id (client credentials; sent by PortSIP clients with every grant).
    #[serde(default)]
    pub client_id: Option<String>,
    /// An API client's secret (client credentials).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The refresh token (refresh grant).
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Scopes asked for, space separated (`all` or none: every scope the account has).
    #[serde(default)]
    pub scope: Option<String>,
}

/// The answer of a sign-in, PortSIP's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenReply {
    /// The access token (a JWT).
    pub access_token: String,
    /// Its lifetime, seconds.
    pub expires_in: u64,
    /// Renews the access token (absent for API clients, which sign in again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// The scopes granted, space separated.
    pub scope: String,
}

/// Sign-in, token checks and revocation for one gateway.
pub struct Auth {
    keys: Keys,
    tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    grants: kv::Store,
    revoked_kv: kv::Store,
    revoked: Entries<RevokedGrant>,
    access_ttl: u64,
    refresh_ttl: u64,
    allowed_origins: Vec<String>,
    require_origin: bool,
    /// Failed sign-ins per account (user, API client, extension).
    account_failures: crate::limits::Failures,
    /// Failed sign-ins per source address.
    source_failures: crate::limits::Failures,
}

/// Failed sign-ins an account may have in [`FAILURE_WINDOW`] before it must wait.
pub const ACCOUNT_FAILURES: usize = 5;
/// Failed sign-ins a source address may have in [`FAILURE_WINDOW`] before it must wait.
pub const SOURCE_FAILURES: usize = 20;
/// The window failed sign-ins are counted over.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Why an extension's password was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionRefusal {
    /// Wrong extension, password or domain (all alike).
    Wrong,
    /// Too many failures of the extension or the address lately: again after this long.
    TooMany(Duration),
}

/// A sign-in refused because its account or source address failed too often lately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyFailures {
    /// How long until it may try again.
    pub wait: Duration,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("allowed_origins", &self.allowed_origins)
            .finish()
    }
}

/// The grant id part of a refresh token and of bucket keys: 32 hex digits.
fn is_grant_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 32 random bytes, URL-safe base64: the secret part of a refresh token.
fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The scopes `asked` (space separated; empty or `all`: every one) among those `allowed`;
/// `None` if it names one not allowed or unknown.
fn granted_scopes(asked: Option<&str>, allowed: &BTreeSet<Scope>) -> Option<BTreeSet<Scope>> {
    let asked = asked.unwrap_or("").trim();
    if asked.is_empty() || asked == "all" {
        return Some(allowed.clone());
    }
    let mut granted = BTreeSet::new();
    for word in asked.split_whitespace() {
        let scope = Scope::parse(word)?;
        if !allowed.contains(&scope) {
            return None;
        }
        granted.insert(scope);
    }
    Some(granted)
}

fn scope_text(scopes: &BTreeSet<Scope>) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The scopes `subject` of `tenant` has now, if it still exists.
fn scopes_of(tenant: &Tenant, subject: &str) -> Option<BTreeSet<Scope>> {
    if let Some(id) = subject.strip_prefix("client:") {
        return tenant
            .api_clients
            .iter()
            .find(|c| c.client_id == id)
            .map(|c| c.scopes.clone());
    }
    let name = subject.strip_prefix("user:")?;
    tenant.user(name).map(|u| u.scopes.clone())
}

/// Opens a bucket, creating it with `max_age` if no one did yet.
async fn open_bucket(
    jetstream: &async_nats::jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
) -> Result<kv::Store, String> {
    let config = kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        max_age,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    callapi_kit::calls::open_or_create(jetstream, config).await
}

impl Auth {
    /// Loads the tenants and keys, opens the buckets (creating them if needed) and follows
    /// the revoked grants until `shutdown`; the tenants file is read again on SIGHUP.
    pub async fn start(
        config: &AuthConfig,
        jetstream: &async_nats::jetstream::Context,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let keys = Keys::new(&config.signing_keys, &config.active_key)
            .map_err(|e| format!("auth.signing_keys: {e}"))?;
        if config.access_token_ttl_secs == 0 || config.refresh_token_ttl_secs == 0 {
            return Err("auth: token lifetimes must be greater than 0".to_owned());
        }
        let file = TenantsFile::open(std::path::Path::new(&config.tenants_file))
            .map_err(|e| format!("auth.tenants_file: {e}"))?;
        let tenants = file.watch();
        tokio::spawn(file.reload_on_sighup(shutdown.clone()));
        let grants = open_bucket(
            jetstream,
            GRANTS_BUCKET,
            "callapi: sign-ins refresh tokens renew (callapi.v1.AuthGrant)",
            Duration::from_secs(config.refresh_token_ttl_secs),
        )
        .await?;
        let revoked_kv = open_bucket(
            jetstream,
            REVOKED_BUCKET,
            "callapi: revoked sign-ins, refused until their access tokens expire (callapi.v1.RevokedGrant)",
            // Long enough for any access token the grant gave to have expired.
            Duration::from_secs(config.access_token_ttl_secs.saturating_add(60)),
        )
        .await?;
        let revoked: Entries<RevokedGrant> = Entries::default();
        follow(
            revoked_kv.clone(),
            REVOKED_BUCKET,
            revoked.clone(),
            Arc::new(|_: &RevokedGrant| {}),
            shutdown,
        )
        .await?;
        Ok(Arc::new(Self {
            keys,
            tenants,
            grants,
            revoked_kv,
            revoked,
            access_ttl: config.access_token_ttl_secs,
            refresh_ttl: config.refresh_token_ttl_secs,
            allowed_origins: config.allowed_origins.clone(),
            require_origin: config.require_origin,
            account_failures: crate::limits::Failures::new(ACCOUNT_FAILURES, FAILURE_WINDOW),
            source_failures: crate::limits::Failures::new(SOURCE_FAILURES, FAILURE_WINDOW),
        }))
    }

    /// The tenants in force, followed as the tenants file is read again.
    pub fn watch_tenants(&self) -> tokio::sync::watch::Receiver<Arc<Tenants>> {
        self.tenants.clone()
    }

    /// The tenants in force now.
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.borrow().clone()
    }

    /// Whether a request with this `Origin` header may be served (none: not a browser, let
    /// through unless `require_origin`).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            Some(origin) => self.allowed_origins.iter().any(|o| o == origin),
            None => !self.require_origin,
        }
    }

    /// Who the bearer of `token` is, at `now` (Unix seconds).
    pub fn authenticate(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let claims: Claims = self.keys.verify(token, now)?;
        if self
            .revoked
            .read()
            .map_or(true, |revoked| revoked.contains_key(&claims.sid))
        {
            return Err(AuthError::Revoked);
        }
        let tenants = self.tenants();
        let tenant = tenants.get(&claims.tenant).ok_or(AuthError::Gone)?;
        let has = scopes_of(tenant, &claims.sub).ok_or(AuthError::Gone)?;
        let scopes: BTreeSet<Scope> = claims.scopes().intersection(&has).copied().collect();
        Ok(Identity {
            tenant: claims.tenant,
            subject: claims.sub,
            scopes,
            expires_at: claims.exp,
            grant: claims.sid,
        })
    }

    /// Whether `account` (if any) and `source` may try to sign in now.
    pub fn may_try(&self, account: Option<&str>, source: IpAddr) -> Result<(), TooManyFailures> {
        let now = tokio::time::Instant::now();
        let by_source = self.source_failures.check(&format!("ip:{source}"), now);
        let by_account = account.map_or(Ok(()), |a| self.account_failures.check(a, now));
        match (by_source, by_account) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(a), Err(b)) => Err(TooManyFailures { wait: a.max(b) }),
            (Err(wait), _) | (_, Err(wait)) => Err(TooManyFailures { wait }),
        }
    }

    /// Checks an extension's password (`GET /api/sessions/directly`) from `source`: the
    /// tenant of `domain` whose extension `number` has `password`. Failures count as sign-in
    /// failures, of the account `ext:<domain>:<number>` and of `source`.
    pub async fn check_extension(
        &self,
        domain: &str,
        number: &str,
        password: String,
        source: IpAddr,
    ) -> Result<Arc<Tenant>, ExtensionRefusal> {
        let account = format!("ext:{}:{number}", domain.to_ascii_lowercase());
        self.may_try(Some(&account), source)
            .map_err(|too_many| ExtensionRefusal::TooMany(too_many.wait))?;
        let tenants = self.tenants();
        let tenant = tenants.by_domain(domain).cloned();
        let hash = tenant
            .as_ref()
            .and_then(|t| t.extension(number))
            .map(|e| e.password_hash.clone());
        let known = hash.is_some();
        // An unknown extension is checked against the decoy too: it takes as long.
        let matches = verify(
            hash.unwrap_or_else(|| tenants::DECOY_HASH.to_owned()),
            password,
        )
        .await;
        match (tenant, known && matches) {
            (Some(tenant), true) => Ok(tenant),
            _ => {
                self.failed(Some(&account), source);
                Err(ExtensionRefusal::Wrong)
            }
        }
    }

    /// Counts a failed sign-in of `account` (if any) from `source`.
    pub fn failed(&self, account: Option<&str>, source: IpAddr) {
        let now = tokio::time::Instant::now();
        self.source_failures.record(&format!("ip:{source}"), now);
        if let Some(account) = account {
            self.account_failures.record(account, now);
        }
    }

    /// Answers a sign-in from `source`: refused at once when its account or address failed
    /// too often lately; else checks the credentials (slow by design: off the async workers),
    /// records the grant and issues the tokens.
    pub async fn sign_in(
        &self,
        form: TokenForm,
        source: IpAddr,
        now_ms: u64,
    ) -> Result<TokenReply, OAuthError> {
        let account = match form.grant_type.as_str() {
            "password" => Some(format!(
                "user:{}:{}",
                form.domain.as_deref().unwrap_or("").to_ascii_lowercase(),
                form.username.as_deref().unwrap_or("")
            )),
            "client_credentials" => Some(format!(
                "client:{}",
                form.client_id.as_deref().unwrap_or("")
            )),
            _ => None,
        };
        if let Err(TooManyFailures { wait }) = self.may_try(account.as_deref(), source) {
            return Err(OAuthError {
                error: "slow_down",
                error_description: format!(
                    "too many failed sign-ins from this account or address: try again in {} s",
                    crate::limits::retry_after_secs(wait)
                ),
                retry_after_secs: Some(crate::limits::retry_after_secs(wait)),
            });
        }
        let result = self.grant_for(form, now_ms).await;
        if let Err(error) = &result
            && matches!(error.error, "invalid_grant" | "invalid_client")
        {
            self.failed(account.as_deref(), source);
        }
        result
    }

    async fn grant_for(&self, form: TokenForm, now_ms: u64) -> Result<TokenReply, OAuthError> {
        match form.grant_type.as_str() {
            "password" => self.password_grant(form, now_ms).await,
            "client_credentials" => self.client_grant(form, now_ms).await,
            "refresh_token" => self.refresh_grant(form, now_ms).await,
            "" => Err(OAuthError::new("invalid_request", "grant_type is required")),
            _ => Err(OAuthError::new(
                "unsupported_grant_type",
                "grant_type must be password, client_credentials or refresh_token",
            )),
        }
    }

    async fn password_grant(&self, form: TokenForm, now_ms: u64) -> Result<TokenReply, OAuthError> {
        let (Some(username), Some(password)) = (form.username, form.password) else {
            return Err(OAuthError::new(
                "invalid_request",
                "the password grant needs username and password",
            ));
        };
        let Some(domain) = form.domain.filter(|d| !d.is_empty()) else {
            return Err(OAuthError::new(
                "invalid_request",
                "the password grant needs domain: the tenant's SIP domain",
            ));
        };
        let tenants = self.tenants();
        let tenant = tenants.by_domain(&domain).cloned();
        let user = tenant
            .as_ref()
            .and_then(|t| t.user(&username))
            .map(|u| (u.password_hash.clone(), u.scopes.clone()));
        let hash = user
            .as_ref()
            .map_or(tenants::DECOY_HASH.to_owned(), |(hash, _)| hash.clone());
        let matches = verify(hash, password).await;
        let (Some(tenant), Some((_, allowed)), true) = (tenant, user, matches) else {
            return Err(OAuthError::new(
                "invalid_grant",
                "wrong username, password or domain",
            ));
        };
        let scopes = granted_scopes(form.scope.as_deref(), &allowed).ok_or_else(|| {
            OAuthError::new("invalid_scope", "a scope asked for is not the user's")
        })?;
        self.grant(
            &tenant.id,
            &format!("user:{username}"),
            &scopes,
            true,
            now_ms,
        )
        .await
    }

    async fn client_grant(&self, form: TokenForm, now_ms: u64) -> Result<TokenReply, OAuthError> {
        let (Some(client_id), Some(secret)) = (form.client_id, form.client_secret) else {
            return Err(OAuthError::new(
                "invalid_client",
                "client_credentials needs client_id and client_secret",
            ));
        };
        let tenants = self.tenants();
        let found = tenants
            .api_client(&client_id)
            .map(|(t, c)| (t.id.clone(), c.secret_hash.clone(), c.scopes.clone()));
        let hash = found
            .as_ref()
            .map_or(tenants::DECOY_HASH.to_owned(), |(_, hash, _)| hash.clone());
        let matches = verify(hash, secret).await;
        let (Some((tenant, _, allowed)), true) = (found, matches) else {
            return Err(OAuthError::new(
                "invalid_client",
                "wrong client_id or client_secret",
            ));
        };
        let scopes = granted_scopes(form.scope.as_deref(), &allowed).ok_or_else(|| {
            OAuthError::new("invalid_scope", "a scope asked for is not the client's")
        })?;
        self.grant(
            &tenant,
            &format!("client:{client_id}"),
            &scopes,
            false,
            now_ms,
        )
        .await
    }

    async fn refresh_grant(&self, form: TokenForm, now_ms: u64) -> Result<TokenReply, OAuthError> {
        let invalid = || OAuthError::new("invalid_grant", "the refresh token is not valid");
        let token = form.refresh_token.unwrap_or_default();
        let (id, secret) = token.split_once('.').ok_or_else(invalid)?;
        if !is_grant_id(id) {
            return Err(invalid());
        }
        let entry = self
            .grants
            .entry(id)
            .await
            .map_err(|e| OAuthError::new("server_error", format!("sign-ins unavailable: {e}")))?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(invalid)?;
        let mut grant = AuthGrant::decode(entry.value.as_ref()).map_err(|_| invalid())?;
        if grant.refresh_hash.is_empty() || grant.expires_at_ms <= now_ms {
            return Err(invalid());
        }
        if grant.refresh_hash != sha256_hex(secret) {
            // An older refresh token of this grant: replayed or stolen. End the grant.
            tracing::warn!(grant = id, tenant = %grant.tenant, "a replaced refresh token was presented: the sign-in is revoked");
            self.revoke_grant(id, now_ms).await;
            return Err(invalid());
        }
        let tenants = self.tenants();
        let has = tenants
            .get(&grant.tenant)
            .and_then(|t| scopes_of(t, &grant.subject))
            .ok_or_else(invalid)?;
        let scopes: BTreeSet<Scope> = Scope::parse_list(&grant.scope)
            .intersection(&has)
            .copied()
            .collect();
        let refresh_secret = random_secret();
        grant.refresh_hash = sha256_hex(&refresh_secret);
        grant.scope = scope_text(&scopes);
        // Compare-and-set: of two refreshes with the same token, one wins.
        self.grants
            .update(id, grant.encode_to_vec().into(), entry.revision)
            .await
            .map_err(|_| invalid())?;
        self.tokens(
            &grant.tenant,
            &grant.subject,
            &scopes,
            id,
            Some(format!("{id}.{refresh_secret}")),
            now_ms,
        )
    }

    /// Records a new grant and issues its tokens.
    async fn grant(
        &self,
        tenant: &str,
        subject: &str,
        scopes: &BTreeSet<Scope>,
        with_refresh: bool,
        now_ms: u64,
    ) -> Result<TokenReply, OAuthError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let refresh_secret = with_refresh.then(random_secret);
        let record = AuthGrant {
            tenant: tenant.to_owned(),
            subject: subject.to_owned(),
            scope: scope_text(scopes),
            refresh_hash: refresh_secret
                .as_deref()
                .map(sha256_hex)
                .unwrap_or_default(),
            expires_at_ms: now_ms.saturating_add(self.refresh_ttl.saturating_mul(1000)),
        };
        self.grants
            .put(&id, record.encode_to_vec().into())
            .await
            .map_err(|e| OAuthError::new("server_error", format!("sign-ins unavailable: {e}")))?;
        tracing::info!(%tenant, %subject, grant = %id, "signed in");
        self.tokens(
            tenant,
            subject,
            scopes,
            &id,
            refresh_secret.map(|s| format!("{id}.{s}")),
            now_ms,
        )
    }

    fn tokens(
        &self,
        tenant: &str,
        subject: &str,
        scopes: &BTreeSet<Scope>,
        grant: &str,
        refresh_token: Option<String>,
        now_ms: u64,
    ) -> Result<TokenReply, OAuthError> {
        let (access_token, _) = self
            .keys
            .issue(
                tenant,
                subject,
                scopes,
                grant,
                now_ms / 1000,
                self.access_ttl,
            )
            .map_err(|e| OAuthError::new("server_error", format!("cannot sign a token: {e}")))?;
        Ok(TokenReply {
            access_token,
            expires_in: self.access_ttl,
            refresh_token,
            token_type: "Bearer",
            scope: scope_text(scopes),
        })
    }

    /// Revokes the grant of a valid access token (`bearer`) or of a refresh token (`token`,
    /// RFC 7009: an unknown one is no error). Returns whether something was revoked.
    pub async fn revoke(&self, bearer: Option<&str>, token: Option<&str>, now_ms: u64) -> bool {
        let mut grant = None;
        if let Some(bearer) = bearer
            && let Ok(identity) = self.authenticate(bearer, now_ms / 1000)
        {
            grant = Some(identity.grant);
        }
        if grant.is_none()
            && let Some((id, _)) = token.and_then(|t| t.split_once('.'))
            && is_grant_id(id)
        {
            grant = Some(id.to_owned());
        }
        match grant {
            Some(id) => {
                self.revoke_grant(&id, now_ms).await;
                true
            }
            None => false,
        }
    }

    async fn revoke_grant(&self, id: &str, now_ms: u64) {
        let record = RevokedGrant {
            revoked_at_ms: now_ms,
        };
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.insert(id.to_owned(), record);
        }
        if let Err(err) = self.revoked_kv.put(id, record.encode_to_vec().into()).await {
            tracing::warn!(%err, grant = id, "could not record a revocation for the other gateways");
        }
        if let Err(err) = self.grants.delete(id).await {
            tracing::warn!(%err, grant = id, "could not remove a revoked sign-in");
        }
        tracing::info!(grant = id, "sign-in revoked");
    }
}

/// Checks `candidate` against `hash` on a blocking thread (Argon2 takes tens of
/// milliseconds by design).
async fn verify(hash: String, candidate: String) -> bool {
    tokio::task::spawn_blocking(move || tenants::verify_secret(&hash, &candidate))
        .await
        .unwrap_or(false)
}

/// A request refused before reaching its handler: 401 (no valid token; with
/// `WWW-Authenticate: Bearer`) or 403 (a scope or `Origin` not allowed), as problem+json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: axum::http::StatusCode,
    code: &'static str,
    detail: String,
    retry_after_secs: Option<u64>,
}

impl Refusal {
    /// 401: no valid access token.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self {
            status: axum::http::StatusCode::UNAUTHORIZED,
            code: "UNAUTHORIZED",
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    /// 403: authenticated, but not allowed this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self {
            status: axum::http::StatusCode::FORBIDDEN,
            code: "FORBIDDEN",
            detail: detail.into(),
            retry_after_secs: None,
        }
    }

    /// 429: over one of the tenant's limits (`code` says which); again after
    /// `retry_after_secs`, if that is known.
    pub fn too_many(
        code: &'static str,
        detail: impl Into<String>,
        retry_after_secs: Option<u64>,
    ) -> Self {
        Self {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            code,
            detail: detail.into(),
            retry_after_secs,
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(err: AuthError) -> Self {
        Self::unauthorized(err.to_string())
    }
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        use axum::http::{HeaderValue, StatusCode, header};
        let (status, code) = (self.status, self.code);
        let body = serde_json::json!({
            "type": format!("urn:callapi:error:{code}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "code": code,
            "detail": self.detail,
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"callapi\""),
            );
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `POST /api/login/oauth/token` and `POST /api/login/oauth/revoke`.
pub fn routes(auth: Arc<Auth>) -> axum::Router {
    use axum::routing::post;
    axum::Router::new()
        .route("/api/login/oauth/token", post(token_endpoint))
        .route("/api/login/oauth/revoke", post(revoke_endpoint))
        .with_state(auth)
}

/// The bearer token of an `Authorization` header, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The client id and secret of an `Authorization: Basic` header (RFC 6749 section 2.3.1).
fn basic_credentials(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Token answers must not be cached (RFC 6749 section 5.1).
fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        axum::http::header::PRAGMA,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    response
}

fn oauth_error(error: OAuthError) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let status = error.status();
    let mut response = (status, axum::Json(&error)).into_response();
    if let Some(secs) = error.retry_after_secs {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
    }
    if status == axum::http::StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Basic realm=\"callapi\""),
        );
    }
    no_store(response)
}

async fn token_endpoint(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let mut form = match form {
        Ok(axum::Form(form)) => form,
        Err(rejection) => {
            return oauth_error(OAuthError::new(
                "invalid_request",
                format!(
                    "the body must be application/x-www-form-urlencoded OAuth parameters ({})",
                    rejection.body_text()
                ),
            ));
        }
    };
    if form.client_secret.is_none()
        && let Some((id, secret)) = basic_credentials(&headers)
    {
        form.client_id = Some(id);
        form.client_secret = Some(secret);
    }
    match auth.sign_in(form, peer.ip(), callapi_kit::unix_ms()).await {
        Ok(reply) => no_store(axum::Json(reply).into_response()),
        Err(error) => {
            tracing::info!(error = error.error, reason = %error.error_description, "sign-in refused");
            oauth_error(error)
        }
    }
}

/// The form of `POST /api/login/oauth/revoke` (RFC 7009), all optional: PortSIP revokes the
/// access token of the `Authorization` header.
#[derive(Debug, Default, Deserialize)]
struct RevokeForm {
    #[serde(default)]
    token: Option<String>,
}

async fn revoke_endpoint(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let form: RevokeForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let bearer = bearer(&headers);
    if bearer.is_none() && form.token.is_none() {
        return oauth_error(OAuthError::new(
            "invalid_request",
            "name what to revoke: Authorization: Bearer <access token>, or token=<refresh token>",
        ));
    }
    // RFC 7009: an unknown or invalid token is no error (nothing to revoke).
    auth.revoke(bearer, form.token.as_deref(), callapi_kit::unix_ms())
        .await;
    no_store(axum::http::StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_scopes_are_those_allowed_or_refused() {
        let both = BTreeSet::from([Scope::CallsRead, Scope::CallsControl]);
        let read = BTreeSet::from([Scope::CallsRead]);
        assert_eq!(granted_scopes(None, &both), Some(both.clone()));
        assert_eq!(granted_scopes(Some("all"), &read), Some(read.clone()));
        assert_eq!(
            granted_scopes(Some(" calls:read "), &both),
            Some(read.clone())
        );
        assert_eq!(granted_scopes(Some("calls:control"), &read), None);
        assert_eq!(granted_scopes(Some("admin"), &both), None);
    }

    #[test]
    fn credentials_headers_are_read_whatever_the_scheme_case() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "bearer abc.def.ghi".parse().unwrap(),
        );
        assert_eq!(bearer(&headers), Some("abc.def.ghi"));
        assert_eq!(basic_credentials(&headers), None);
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Basic Y3JtOnMzY3JldDp3aXRoLWNvbG9u".parse().unwrap(),
        );
        assert_eq!(bearer(&headers), None);
        assert_eq!(
            basic_credentials(&headers),
            Some(("crm".into(), "s3cret:with-colon".into()))
        );
    }

    #[test]
    fn refresh_tokens_name_their_grant() {
        assert!(is_grant_id(&uuid::Uuid::new_v4().simple().to_string()));
        assert!(!is_grant_id("../../etc"));
        assert_eq!(sha256_hex("abc").len(), 64);
        assert_ne!(random_secret(), random_secret());
    }
}
