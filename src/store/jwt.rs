//! etcd's JWT auth tokens (`--auth-token jwt,pub-key=…,priv-key=…,sign-method=…,ttl=…`):
//! a signed claim of a user name and the auth revision it was issued at, valid until it
//! expires. Any member with the key checks one without having seen it issued, and a
//! restart forgets none.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// etcd's default lifetime of a JWT token.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// What `--auth-token jwt,…` names; the keys are read by [`Jwt::load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtOptions {
    pub sign_method: String,
    pub pub_key: Option<PathBuf>,
    pub priv_key: Option<PathBuf>,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("auth-token: {0}")]
    Option(String),
    #[error("auth-token: {path}: {what}")]
    Key { path: String, what: String },
}

impl JwtOptions {
    /// Parses the options after `jwt,` as etcd does: `key=value` pairs.
    pub fn parse(opts: &str, parse_duration: impl Fn(&str) -> Result<Duration, String>) -> Result<Self, JwtError> {
        let mut o = JwtOptions { sign_method: String::new(), pub_key: None, priv_key: None, ttl: DEFAULT_JWT_TTL };
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| JwtError::Option(format!("invalid option {kv:?}")))?;
            match k {
                "sign-method" => o.sign_method = v.to_string(),
                "pub-key" => o.pub_key = Some(PathBuf::from(v)),
                "priv-key" => o.priv_key = Some(PathBuf::from(v)),
                "ttl" => o.ttl = parse_duration(v).map_err(JwtError::Option)?,
                _ => return Err(JwtError::Option(format!("unknown option {k:?}"))),
            }
        }
        if o.sign_method.is_empty() {
            return Err(JwtError::Option("jwt needs sign-method".into()));
        }
        Ok(o)
    }
}

/// The claims of an etcd JWT token.
#[derive(Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// Signs and checks tokens with one key pair (or one secret, for HS*).
pub struct Jwt {
    alg: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    /// What a token must pass, built once: it is checked on every request.
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt").field("alg", &self.alg).field("ttl", &self.ttl).finish()
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, JwtError> {
    std::fs::read(path).map_err(|e| JwtError::Key { path: path.display().to_string(), what: e.to_string() })
}

impl Jwt {
    /// Reads the keys. A member with only the public key checks tokens but issues none.
    pub fn load(o: &JwtOptions) -> Result<Self, JwtError> {
        let alg: Algorithm = o
            .sign_method
            .parse()
            .map_err(|_| JwtError::Option(format!("unsupported sign-method {:?}", o.sign_method)))?;
        let bad = |path: &PathBuf| {
            let path = path.display().to_string();
            move |e: jsonwebtoken::errors::Error| JwtError::Key {
                path,
                what: format!("not a PEM key for {alg:?} ({e})"),
            }
        };
        let (encoding, decoding) = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let path = o.priv_key.as_ref().ok_or_else(|| JwtError::Option("HS* needs priv-key".into()))?;
                let secret = read(path)?;
                (Some(EncodingKey::from_secret(&secret)), DecodingKey::from_secret(&secret))
            }
            Algorithm::EdDSA => return Err(JwtError::Option("unsupported sign-method \"EdDSA\"".into())),
            _ => {
                let ec = matches!(alg, Algorithm::ES256 | Algorithm::ES384);
                let path = o.pub_key.as_ref().ok_or_else(|| JwtError::Option("jwt needs pub-key".into()))?;
                let pem = read(path)?;
                let decoding = if ec { DecodingKey::from_ec_pem(&pem) } else { DecodingKey::from_rsa_pem(&pem) };
                let decoding = decoding.map_err(bad(path))?;
                let encoding = match &o.priv_key {
                    None => None,
                    Some(path) => {
                        let pem = read(path)?;
                        let key = if ec { EncodingKey::from_ec_pem(&pem) } else { EncodingKey::from_rsa_pem(&pem) };
                        Some(key.map_err(bad(path))?)
                    }
                };
                (encoding, decoding)
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        let jwt = Jwt { alg, encoding, decoding, validation, ttl: o.ttl };
        // A key pair that does not match fails here rather than at every sign-in.
        if jwt.encoding.is_some() {
            let t = jwt.sign("probe", 0).ok_or_else(|| JwtError::Option("the private key cannot sign".into()))?;
            if jwt.check(&t).is_none() {
                return Err(JwtError::Option("pub-key does not check what priv-key signs".into()));
            }
        }
        Ok(jwt)
    }

    /// A token for `user` at auth revision `revision`; None without a private key.
    pub fn sign(&self, user: &str, revision: u64) -> Option<String> {
        let exp = (std::time::SystemTime::now() + self.ttl).duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        let claims = Claims { username: user.to_string(), revision, exp };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, self.encoding.as_ref()?).ok()
    }

    /// The user and auth revision a valid, unexpired token names.
    pub fn check(&self, token: &str) -> Option<(String, u64)> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        Some((data.claims.username, data.claims.revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_jwt(dir: &std::path::Path, ttl: Duration) -> Jwt {
        let key = dir.join("secret");
        std::fs::write(&key, b"a shared secret").unwrap();
        let o = JwtOptions { sign_method: "HS256".into(), pub_key: None, priv_key: Some(key), ttl };
        Jwt::load(&o).unwrap()
    }

    #[test]
    fn options_parse_as_etcd_writes_them() {
        let secs = |s: &str| {
            s.trim_end_matches('m').parse::<u64>().map(|m| Duration::from_secs(m * 60)).map_err(|e| e.to_string())
        };
        let o = JwtOptions::parse("pub-key=a.pub,priv-key=a,sign-method=RS256,ttl=10m", secs).unwrap();
        assert_eq!(o.sign_method, "RS256");
        assert_eq!(o.pub_key, Some(PathBuf::from("a.pub")));
        assert_eq!(o.ttl, Duration::from_secs(600));
        assert!(JwtOptions::parse("pub-key=a.pub", secs).is_err(), "no sign-method");
        assert!(JwtOptions::parse("sign-method=RS256,colour=blue", secs).is_err());
    }

    #[test]
    fn a_token_names_its_user_until_it_expires_and_a_forged_one_names_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let jwt = secret_jwt(dir.path(), Duration::from_secs(60));
        let t = jwt.sign("alice", 7).unwrap();
        assert_eq!(jwt.check(&t), Some(("alice".to_string(), 7)));
        let other = dir.path().join("other");
        std::fs::write(&other, b"another secret").unwrap();
        let o = JwtOptions {
            sign_method: "HS256".into(),
            pub_key: None,
            priv_key: Some(other),
            ttl: Duration::from_secs(60),
        };
        let forged = Jwt::load(&o).unwrap().sign("root", 7).unwrap();
        assert_eq!(jwt.check(&forged), None);
        assert_eq!(jwt.check("not.a.token"), None);
        let past = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 1;
        let claims = Claims { username: "alice".into(), revision: 7, exp: past };
        let t = jsonwebtoken::encode(&Header::new(jwt.alg), &claims, jwt.encoding.as_ref().unwrap()).unwrap();
        assert_eq!(jwt.check(&t), None, "expired");
    }
}
