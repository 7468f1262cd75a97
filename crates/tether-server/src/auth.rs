//! HS256 JWT login tokens, signed with a secret the server creates in its data
//! directory on first start (`<data>/jwt-secret`, 32 random bytes, hex, mode 0600).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// File name of the signing secret inside the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

/// Default lifetime of a minted token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a token was refused; the text goes to the peer in ERROR{AUTH_FAILED}.
#[derive(Debug, Error)]
pub enum AuthError {
    /// Signature, format, expiry or claims are wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The secret could not be read or created.
    #[error("token secret unavailable: {0}")]
    Secret(#[from] io::Error),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// Verifies tokens and mints new ones with one secret.
#[derive(Clone)]
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator(HS256)")
    }
}

impl Authenticator {
    /// An authenticator for `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Loads `<dir>/jwt-secret`, creating it (and `dir`) on first use.
    pub fn open(dir: &Path) -> Result<Self, AuthError> {
        Ok(Self::new(&load_or_create_secret(dir, SECRET_FILE)?))
    }

    /// Returns the user id the token is for, if it is valid now.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_issued(token).map(|(user, _)| user)
    }

    /// Returns the user id the token is for and when it was issued (s since the Unix
    /// epoch), if it is valid now.
    pub fn verify_issued(&self, token: &str) -> Result<(String, u64), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > 128 {
            return Err(AuthError::Invalid("`sub` must be 1-128 bytes".into()));
        }
        Ok((sub, data.claims.iat))
    }

    /// Mints a token for `user` valid for `ttl` (a negative age is possible in tests via
    /// [`Authenticator::mint_expired`]).
    pub fn mint(&self, user: &str, ttl: Duration) -> String {
        let now = unix_now();
        self.sign(user, now, now + ttl.as_secs())
    }

    /// A token for `user` that expired an hour ago (for tests and tooling).
    pub fn mint_expired(&self, user: &str) -> String {
        let now = unix_now();
        self.sign(user, now - 7200, now - 3600)
    }

    fn sign(&self, user: &str, iat: u64, exp: u64) -> String {
        let claims = Claims {
            sub: user.to_owned(),
            iat,
            exp,
        };
        // Encoding HS256 with an in-memory key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }
}

/// Mints a token for `user` with the secret of the data directory `dir` (created if
/// missing), valid for [`DEFAULT_TOKEN_TTL`].
pub fn mint_token(dir: &Path, user: &str) -> Result<String, AuthError> {
    Ok(Authenticator::open(dir)?.mint(user, DEFAULT_TOKEN_TTL))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the hex secret in `<dir>/<name>`, creating it (32 random bytes, mode 0600)
/// and `dir` on first use.
pub(crate) fn load_or_create_secret(dir: &Path, name: &str) -> io::Result<Vec<u8>> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path:?}: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            let secret: [u8; 32] = rand::random();
            let tmp = dir.join(format!("{name}.tmp"));
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(hex::encode(secret).as_bytes())?;
            file.sync_all()?;
            // Two processes racing on first start: the first rename wins, both then
            // read the same file.
            if let Err(e) = fs::hard_link(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return if e.kind() == io::ErrorKind::AlreadyExists {
                    load_or_create_secret(dir, name)
                } else {
                    Err(e)
                };
            }
            let _ = fs::remove_file(&tmp);
            fs::File::open(dir)?.sync_all()?;
            Ok(secret.to_vec())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_and_tokens_verify_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authenticator::open(dir.path()).unwrap();
        let b = Authenticator::open(dir.path()).unwrap();
        let token = a.mint("alice", DEFAULT_TOKEN_TTL);
        assert_eq!(b.verify(&token).unwrap(), "alice");
    }

    #[test]
    fn expired_wrongly_signed_and_garbage_tokens_are_refused() {
        let a = Authenticator::new(b"one secret");
        let other = Authenticator::new(b"another secret");
        assert!(a.verify(&a.mint_expired("alice")).is_err());
        assert!(a.verify(&other.mint("alice", DEFAULT_TOKEN_TTL)).is_err());
        assert!(a.verify("not-a-token").is_err());
        assert!(a.verify("").is_err());
    }
}
