//! The install identity (docs/reference/wire-protocol.md, Identity): who this agent is to
//! the backend.
//!
//! Created once by `init` and never overwritten: `<data_dir>/identity.json`, mode 0600,
//! holding the install id, the signing secret and the site URL. The secret never
//! appears in `Debug` output, logs or errors.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use usage_protocol::signing::Secret;

/// Why the identity could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid site URL {url:?}: {rule}")]
    BadUrl { url: String, rule: String },
    #[error("cannot read identity file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write identity file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The contents of `identity.json`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub install_id: String,
    /// `whsec_` + base64 of the 32-byte signing key.
    pub secret: String,
    pub site_url: String,
    pub created_at: String,
    pub enrolled_at: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("install_id", &self.install_id)
            .field("secret", &"<redacted>")
            .field("site_url", &self.site_url)
            .field("created_at", &self.created_at)
            .field("enrolled_at", &self.enrolled_at)
            .finish()
    }
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// An identity already existed and was left as it was.
    AlreadyExisted,
}

/// Normalises a site URL so that trivially different spellings hash the same:
/// lowercase scheme and host, no default port, no query or fragment, no trailing slash.
pub fn normalize_site_url(url: &str) -> Result<String, IdentityError> {
    let bad = |rule: &str| IdentityError::BadUrl {
        url: url.to_owned(),
        rule: rule.to_owned(),
    };
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    let host = parsed.host_str().ok_or_else(|| bad("must have a host"))?;
    let mut normal = format!("{}://{}", parsed.scheme(), host.to_ascii_lowercase());
    if let Some(port) = parsed.port() {
        normal.push_str(&format!(":{port}"));
    }
    normal.push_str(parsed.path().trim_end_matches('/'));
    Ok(normal)
}

/// `sha256_hex(normalized site url)`.
pub fn site_hash(normalized_url: &str) -> String {
    hex(&Sha256::digest(normalized_url.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Identity {
    /// Makes a new identity for a site: `{uuid-v4}_{sha256_hex(normalized url)}` and a fresh secret.
    pub fn generate(site_url: &str) -> Result<Identity, IdentityError> {
        let normalized = normalize_site_url(site_url)?;
        Ok(Identity {
            install_id: format!("{}_{}", uuid::Uuid::new_v4(), site_hash(&normalized)),
            secret: Secret::generate().to_whsec(),
            site_url: normalized,
            created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            enrolled_at: None,
        })
    }

    /// The hash of the site URL sent at enrollment.
    pub fn site_hash(&self) -> String {
        site_hash(&self.site_url)
    }

    /// Reads the identity, or `None` if `init` has not run.
    pub fn load(path: &Path) -> Result<Option<Identity>, IdentityError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IdentityError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let identity: Identity =
            serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Secret::parse(&identity.secret).map_err(|e| IdentityError::Corrupt {
            path: path.to_path_buf(),
            message: format!("secret: {e}"),
        })?;
        Ok(Some(identity))
    }

    /// Creates `path` with this identity unless one exists there; never overwrites.
    pub fn create_once(&self, path: &Path) -> Result<Created, IdentityError> {
        if path.exists() {
            return Ok(Created::AlreadyExisted);
        }
        let temp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        self.write_private(&temp)?;
        // A hard link fails if the target exists, so two racing inits cannot both win.
        let linked = std::fs::hard_link(&temp, path);
        let _ = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(Created::New),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Created::AlreadyExisted),
            Err(source) => Err(IdentityError::Write {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Replaces the file at `path` atomically (used to record enrollment).
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let temp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        self.write_private(&temp)?;
        std::fs::rename(&temp, path).map_err(|source| IdentityError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    fn write_private(&self, path: &Path) -> Result<(), IdentityError> {
        let write_error = |source| IdentityError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        let mut text = serde_json::to_string_pretty(self).expect("identity always serializes");
        text.push('\n');
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_error)?;
        // The umask may have narrowed the mode further, never widened it; make it exact.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
        file.write_all(text.as_bytes()).map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_before_hashing() {
        let same = [
            "https://example.com",
            "HTTPS://Example.COM/",
            "https://example.com:443/",
            "https://example.com/?utm=1#top",
        ];
        for url in same {
            assert_eq!(
                normalize_site_url(url).unwrap(),
                "https://example.com",
                "{url}"
            );
        }
        assert_eq!(
            normalize_site_url("http://example.com:8080/blog/").unwrap(),
            "http://example.com:8080/blog"
        );
        assert!(normalize_site_url("ftp://example.com").is_err());
        assert!(normalize_site_url("not a url").is_err());
    }

    #[test]
    fn install_id_has_the_spec_shape() {
        let identity = Identity::generate("https://example.com").unwrap();
        let (uuid, hash) = identity.install_id.split_once('_').unwrap();
        assert_eq!(uuid::Uuid::parse_str(uuid).unwrap().get_version_num(), 4);
        assert_eq!(hash, site_hash("https://example.com"));
        assert_eq!(hash.len(), 64);
        assert!(identity.secret.starts_with("whsec_"));
        assert!(!format!("{identity:?}").contains(&identity.secret));
    }

    #[test]
    fn create_once_never_overwrites_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.json");
        let first = Identity::generate("https://a.example").unwrap();
        assert_eq!(first.create_once(&path).unwrap(), Created::New);
        let second = Identity::generate("https://b.example").unwrap();
        assert_eq!(second.create_once(&path).unwrap(), Created::AlreadyExisted);
        assert_eq!(Identity::load(&path).unwrap().unwrap(), first);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
