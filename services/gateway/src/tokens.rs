//! Access tokens (issue 11): JWTs the gateway signs for a tenant's API client or user and
//! checks on every request. HS256 with a key chosen by the header's `kid`, so keys rotate
//! without a cut: sign with the new key, keep the old one configured until the tokens it signed
//! have expired, then drop it. The algorithm is pinned (a token naming `none` or another
//! algorithm is refused), and expiry is checked against the time passed in, so every rule is
//! unit-tested without a clock. Sign-ins, refresh and revocation: [`crate::auth`].

use std::collections::{BTreeSet, HashMap};

use callapi_kit::secret::Secret;
use callapi_kit::tenants::Scope;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The `iss` of every token the gateway signs.
pub const ISSUER: &str = "callapi";

/// Shortest signing secret accepted, in bytes (HS256's output size).
pub const MIN_SECRET_LEN: usize = 32;

/// One configured signing key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Its id, written in the `kid` header of the tokens it signs.
    pub kid: String,
    /// The HS256 secret (at least [`MIN_SECRET_LEN`] bytes), or empty with `secret_env`.
    #[serde(default)]
    pub secret: Secret,
    /// The environment variable holding the secret instead (e.g. from a Kubernetes Secret).
    #[serde(default)]
    pub secret_env: Option<String>,
}

impl KeyConfig {
    /// The secret: `secret`, or the value of `secret_env` ("" if neither gives one).
    pub fn resolve(&self) -> Secret {
        match (&self.secret_env, self.secret.is_empty()) {
            (Some(name), true) => Secret::new(std::env::var(name).unwrap_or_default()),
            _ => self.secret.clone(),
        }
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Always [`ISSUER`].
    pub iss: String,
    /// Who: the API client's id or the user's name.
    pub sub: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its scopes, space separated (OAuth's `scope`).
    pub scope: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Unique id of this token.
    pub jti: String,
    /// The sign-in (grant) it comes from: revoking the grant refuses its tokens.
    pub sid: String,
}

impl Claims {
    /// The scopes the token grants (unknown words grant nothing).
    pub fn scopes(&self) -> BTreeSet<Scope> {
        Scope::parse_list(&self.scope)
    }
}

/// Why a token was refused (each a 401 for the client; the reason is for logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT of our form.
    #[error("malformed token")]
    Malformed,
    /// Its `kid` names no configured key (or it has none).
    #[error("token signed with an unknown key")]
    UnknownKey,
    /// Signed with another algorithm than HS256 (`none` included).
    #[error("token signed with a refused algorithm")]
    Algorithm,
    /// The signature does not match: tampered, or signed with another secret.
    #[error("token signature does not match")]
    Signature,
    /// Not ours (`iss`).
    #[error("token of another issuer")]
    Issuer,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
}

/// Why the key configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// No key, or the active one is not among them.
    #[error("the signing key {0:?} is not configured")]
    NoActiveKey(String),
    /// Two keys share an id.
    #[error("two signing keys are called {0:?}")]
    DuplicateKid(String),
    /// A secret too short to be safe.
    #[error("signing key {0:?}: the secret must be at least 32 bytes")]
    ShortSecret(String),
}

struct Key {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The signing keys: the active one signs, every one verifies.
pub struct Keys {
    active: String,
    keys: HashMap<String, Key>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Keys")
            .field("active", &self.active)
            .field("kids", &kids)
            .finish()
    }
}

impl Keys {
    /// The keys of `configs`, `active` signing.
    pub fn new(configs: &[KeyConfig], active: &str) -> Result<Self, KeysError> {
        let mut keys = HashMap::new();
        for config in configs {
            let resolved = config.resolve();
            let secret = resolved.expose().as_bytes();
            if secret.len() < MIN_SECRET_LEN {
                return Err(KeysError::ShortSecret(config.kid.clone()));
            }
            let (Ok(encoding), Ok(decoding)) = (
                EncodingKey::from_secret(secret),
                DecodingKey::from_secret(secret),
            ) else {
                return Err(KeysError::ShortSecret(config.kid.clone()));
            };
            if keys
                .insert(config.kid.clone(), Key { encoding, decoding })
                .is_some()
            {
                return Err(KeysError::DuplicateKid(config.kid.clone()));
            }
        }
        if !keys.contains_key(active) {
            return Err(KeysError::NoActiveKey(active.to_owned()));
        }
        Ok(Self {
            active: active.to_owned(),
            keys,
        })
    }

    /// A token for `subject` of `tenant` with `scopes`, from sign-in `grant`, valid for
    /// `ttl_secs` from `now`.
    pub fn issue(
        &self,
        tenant: &str,
        subject: &str,
        scopes: &BTreeSet<Scope>,
        grant: &str,
        now: u64,
        ttl_secs: u64,
    ) -> Result<(String, Claims), jsonwebtoken::errors::Error> {
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: subject.to_owned(),
            tenant: tenant.to_owned(),
            scope: scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            iat: now,
            exp: now.saturating_add(ttl_secs),
            jti: uuid::Uuid::new_v4().simple().to_string(),
            sid: grant.to_owned(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.active.clone());
        // The active key is among the keys (`new` checked it).
        let key = self
            .keys
            .get(&self.active)
            .ok_or(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)?;
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)?;
        Ok((token, claims))
    }

    /// The claims of `token` if it is ours, untampered and not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Algorithm);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against the time passed in.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "iss", "sub"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        validation.set_issuer(&[ISSUER]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|err| {
                use jsonwebtoken::errors::ErrorKind;
                match err.kind() {
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::InvalidIssuer => TokenError::Issuer,
                    ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                    _ => TokenError::Malformed,
                }
            })?
            .claims;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    const NOW: u64 = 1_765_000_000;

    fn key(kid: &str, secret: &str) -> KeyConfig {
        KeyConfig {
            kid: kid.into(),
            secret: Secret::new(secret),
            secret_env: None,
        }
    }

    fn keys() -> Keys {
        Keys::new(
            &[
                key("2026-11", "an-older-secret-of-at-least-32-bytes!"),
                key("2026-12", "the-current-secret-of-at-least-32-bytes"),
            ],
            "2026-12",
        )
        .unwrap()
    }

    fn both() -> BTreeSet<Scope> {
        BTreeSet::from([Scope::CallsRead, Scope::CallsControl])
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let keys = keys();
        let (token, claims) = keys.issue("acme", "crm", &both(), "g1", NOW, 600).unwrap();
        assert_eq!(keys.verify(&token, NOW), Ok(claims.clone()));
        assert_eq!(keys.verify(&token, NOW + 599), Ok(claims.clone()));
        assert_eq!(keys.verify(&token, NOW + 600), Err(TokenError::Expired));
        assert_eq!(claims.tenant, "acme");
        assert_eq!(claims.scope, "calls:read calls:control");
        assert_eq!(claims.scopes(), both());
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("2026-12"));
    }

    #[test]
    fn tampered_forged_and_foreign_tokens_are_refused() {
        let keys = keys();
        let (token, claims) = keys.issue("acme", "crm", &both(), "g1", NOW, 600).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        // Another tenant written into the payload, the signature kept.
        let mut other = claims.clone();
        other.tenant = "globex".into();
        let payload = b64(&serde_json::to_vec(&other).unwrap());
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(keys.verify(&tampered, NOW), Err(TokenError::Signature));
        // alg "none", no signature.
        let none_header = b64(br#"{"alg":"none","typ":"JWT","kid":"2026-12"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(keys.verify(&unsigned, NOW).is_err());
        // The right kid, another secret.
        let forger = Keys::new(
            &[key("2026-12", "a-forgers-secret-of-at-least-32-bytes!!")],
            "2026-12",
        )
        .unwrap();
        let (forged, _) = forger
            .issue("globex", "crm", &both(), "g1", NOW, 600)
            .unwrap();
        assert_eq!(keys.verify(&forged, NOW), Err(TokenError::Signature));
        // A kid nobody configured, none at all, another algorithm with the right secret.
        let stranger = Keys::new(
            &[key("elsewhere", "the-current-secret-of-at-least-32-bytes")],
            "elsewhere",
        )
        .unwrap();
        let (unknown, _) = stranger
            .issue("acme", "crm", &both(), "g1", NOW, 600)
            .unwrap();
        assert_eq!(keys.verify(&unknown, NOW), Err(TokenError::UnknownKey));
        let secret = b"the-current-secret-of-at-least-32-bytes";
        let no_kid = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap();
        assert_eq!(keys.verify(&no_kid, NOW), Err(TokenError::UnknownKey));
        let mut hs384 = Header::new(Algorithm::HS384);
        hs384.kid = Some("2026-12".into());
        let other_alg =
            jsonwebtoken::encode(&hs384, &claims, &EncodingKey::from_secret(secret).unwrap())
                .unwrap();
        assert_eq!(keys.verify(&other_alg, NOW), Err(TokenError::Algorithm));
        // Another issuer, signed with our own key.
        let mut foreign = claims;
        foreign.iss = "someone-else".into();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("2026-12".into());
        let foreign = jsonwebtoken::encode(
            &header,
            &foreign,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap();
        assert_eq!(keys.verify(&foreign, NOW), Err(TokenError::Issuer));
        for garbage in ["", "abc", "a.b.c", "..", "\u{0}.\u{0}.\u{0}"] {
            assert!(keys.verify(garbage, NOW).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn keys_rotate_without_a_cut() {
        let before = Keys::new(
            &[key("2026-11", "an-older-secret-of-at-least-32-bytes!")],
            "2026-11",
        )
        .unwrap();
        let (old_token, _) = before
            .issue("acme", "crm", &both(), "g1", NOW, 3600)
            .unwrap();
        // The new key signs; the old one still verifies what it signed.
        let during = keys();
        assert!(during.verify(&old_token, NOW + 60).is_ok());
        let (new_token, _) = during
            .issue("acme", "crm", &both(), "g1", NOW + 60, 3600)
            .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&new_token)
                .unwrap()
                .kid
                .as_deref(),
            Some("2026-12")
        );
        // Once the old key is dropped, its tokens are refused.
        let after = Keys::new(
            &[key("2026-12", "the-current-secret-of-at-least-32-bytes")],
            "2026-12",
        )
        .unwrap();
        assert_eq!(
            after.verify(&old_token, NOW + 120),
            Err(TokenError::UnknownKey)
        );
        assert!(after.verify(&new_token, NOW + 120).is_ok());
    }

    #[test]
    fn bad_key_configurations_are_refused() {
        assert_eq!(
            Keys::new(&[key("a", "short")], "a").unwrap_err(),
            KeysError::ShortSecret("a".into())
        );
        let long = "x".repeat(32);
        assert_eq!(
            Keys::new(&[key("a", &long), key("a", &long)], "a").unwrap_err(),
            KeysError::DuplicateKid("a".into())
        );
        assert_eq!(
            Keys::new(&[key("a", &long)], "b").unwrap_err(),
            KeysError::NoActiveKey("b".into())
        );
        // Secrets never show in the keys' Debug output.
        let keys = Keys::new(&[key("a", &long)], "a").unwrap();
        assert!(!format!("{keys:?}").contains(&long));
    }
}
