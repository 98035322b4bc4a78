//! Console access tokens for remote clients, and the key that signs them.
//!
//! Owns the signing key (`<data_dir>/state/token.key`, created mode 0600 on first start, read
//! again by every start and upgrade, replaced by [`TokenKey::rotate`]) and the token format.
//! It never decides what a grant allows for a given call: `server::auth` does.
//!
//! # Format
//!
//! `conlog1.<payload>.<mac>`: `payload` is base64url (no padding) of a JSON object
//! `{"g": guest, "d": device or null, "a": "read" | "read-write", "e": expiry (Unix seconds),
//! "k": key id, "i": issue time (Unix seconds; absent in tokens from before it was added), "n":
//! node}`, `mac` is base64url of HMAC-SHA256(key, `conlog1.<payload>`). The MAC is checked
//! before anything of the payload is decoded, so unsigned bytes are never parsed at a node.
//! Rotating the key revokes every token at once.
//!
//! `n` (optional; tokens issued before it existed have none) is the node claim: the Console
//! endpoint (`host:port`, config `node.advertise`) of the node that issued the token. A node
//! refuses a token that names another node. Behind a gateway (docs/gateway.md), each node's key
//! is derived from one cluster key and the node's endpoint ([`node_key`]); the gateway holds the
//! cluster key ([`ClusterKey`]), reads `n` first (within the 1 KiB bound), derives that node's
//! key and checks the MAC with it before it trusts or acts on anything in the token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use thiserror::Error;

const PREFIX: &str = "conlog1.";
/// Longest token accepted; anything longer is refused before any work.
pub(crate) const MAX_TOKEN_LEN: usize = 1024;
const KEY_BYTES: usize = 32;

/// What a token lets its bearer do on one guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    #[serde(rename = "read")]
    Read,
    #[serde(rename = "read-write")]
    ReadWrite,
}

/// The verified content of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(rename = "g")]
    pub guest: String,
    /// One device (stream) of the guest, or all of them.
    #[serde(rename = "d")]
    pub device: Option<String>,
    #[serde(rename = "a")]
    pub access: Access,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "e")]
    pub expires_unix: u64,
    /// Id of the key that signed it (which rotation it belongs to).
    #[serde(rename = "k")]
    pub key_id: String,
    /// Unix seconds when it was issued (set by [`TokenKey::issue`]); tokens from before this
    /// field have none. Only a token issued before a guest was removed reads its logs after
    /// (docs/operations.md, "Retention").
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub issued_unix: Option<u64>,
    /// The Console endpoint (`host:port`) of the node that issued it, if it says.
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Why a token was refused (all `UNAUTHENTICATED`).
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum TokenError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not match (forged, or its key was rotated)")]
    BadSignature,
    #[error("the token expired at {0} (Unix time)")]
    Expired(u64),
    #[error("the token was issued by node {0:?}, not this one")]
    OtherNode(String),
    #[error("the token names no node (issue it on a node with node.advertise set)")]
    NoNode,
    #[error("the cluster key cannot be read ({0}); every token is refused until it can")]
    NoClusterKey(String),
}

/// Checks a token's signature and expiry: a node's [`TokenKey`], a gateway's [`ClusterKey`].
pub(crate) trait Verify: Send + Sync + 'static {
    /// The token's grant, if its signature matches and it has not expired at `now_unix`.
    fn verify(&self, token: &str, now_unix: u64) -> Result<Grant, TokenError>;
}

struct Key {
    hmac: hmac::Key,
    id: String,
}

impl Key {
    fn from_bytes(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            hmac: hmac::Key::new(hmac::HMAC_SHA256, bytes),
            id,
        }
    }
}

/// The signing key of this node's tokens.
pub struct TokenKey {
    path: PathBuf,
    key: RwLock<Key>,
    /// Counts rotations, so that calls made with older tokens can end when one happens.
    rotations: tokio::sync::watch::Sender<u64>,
    /// This node's Console endpoint (`node.advertise`), once its listener is bound: the node
    /// claim of the tokens it issues; and whether a token naming another node is refused
    /// (`console.require_gateway`: without it, a token keeps working after the node's endpoint
    /// changed, as before the claim existed).
    node: RwLock<Option<(String, bool)>>,
}

impl TokenKey {
    /// Where the key of a daemon with state directory `state_dir` lives.
    pub(crate) fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("token.key")
    }

    /// Reads the key at `path`, creating it (0600) if there is none. A key readable by others
    /// has its mode tightened, with a warning.
    pub fn load_or_create(path: &Path) -> io::Result<Self> {
        let bytes = match fs::read(path) {
            Ok(text) => {
                let mode = fs::metadata(path)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                        "token key was readable by others; setting mode 0600");
                    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
                }
                decode_key_file(&text).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is not a token key ({} hex digits expected); delete it to make \
                             a new one (this revokes every token)",
                            path.display(),
                            KEY_BYTES * 2
                        ),
                    )
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => write_new_key(path)?,
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.to_owned(),
            key: RwLock::new(Key::from_bytes(&bytes)),
            rotations: tokio::sync::watch::Sender::new(0),
            node: RwLock::new(None),
        })
    }

    /// Sets this node's Console endpoint: tokens issued from now on name it; with `enforce`,
    /// tokens naming another node are refused.
    pub(crate) fn set_node(&self, node: String, enforce: bool) {
        *self.node.write().expect("token node poisoned") = Some((node, enforce));
    }

    /// Reads the key file again (SIGHUP): a key provisioned from outside (a gateway's cluster
    /// key, docs/gateway.md) takes effect, and if it differs from the current one it is a
    /// rotation (every older token stops working, calls made with them end). Returns whether
    /// the key changed. A file that is not a key leaves the current key in place.
    pub(crate) fn reload(&self) -> io::Result<bool> {
        let text = fs::read(&self.path)?;
        let bytes = decode_key_file(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a token key", self.path.display()),
            )
        })?;
        let key = Key::from_bytes(&bytes);
        {
            let mut current = self.key.write().expect("token key poisoned");
            if current.id == key.id {
                return Ok(false);
            }
            *current = key;
        }
        self.rotations.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Replaces the key on disk and in memory; every token issued so far stops working.
    /// Returns the new key id.
    pub(crate) fn rotate(&self) -> io::Result<String> {
        let bytes = write_new_key(&self.path)?;
        let key = Key::from_bytes(&bytes);
        let id = key.id.clone();
        *self.key.write().expect("token key poisoned") = key;
        self.rotations.send_modify(|n| *n += 1);
        Ok(id)
    }

    /// Changes when the key is rotated.
    pub(crate) fn rotations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rotations.subscribe()
    }

    /// The id of the current key.
    #[cfg(test)]
    pub(crate) fn key_id(&self) -> String {
        self.key.read().expect("token key poisoned").id.clone()
    }

    /// Signs a token for `grant` (its `key_id` is replaced by the current key's, its issue
    /// time, if unset, is now, and its node claim is this node's endpoint when that is set).
    pub fn issue(&self, mut grant: Grant) -> String {
        if let Some((node, _)) = self.node.read().expect("token node poisoned").clone() {
            grant.node = Some(node);
        }
        sign(&self.key.read().expect("token key poisoned"), grant)
    }

    /// Checks `token`'s signature and expiry at `now_unix` and returns its grant.
    pub(crate) fn verify(&self, token: &str, now_unix: u64) -> Result<Grant, TokenError> {
        let (signed, mac) = split_token(token)?;
        {
            let key = self.key.read().expect("token key poisoned");
            hmac::verify(&key.hmac, signed.as_bytes(), &mac)
                .map_err(|_| TokenError::BadSignature)?;
        }
        let payload = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let grant: Grant = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload is not a grant"))?;
        grant.check_expiry(now_unix)?;
        if let (Some(claim), Some((own, true))) = (
            &grant.node,
            self.node.read().expect("token node poisoned").as_ref(),
        ) {
            if claim != own {
                return Err(TokenError::OtherNode(claim.clone()));
            }
        }
        Ok(grant)
    }
}

impl Verify for TokenKey {
    fn verify(&self, token: &str, now_unix: u64) -> Result<Grant, TokenError> {
        TokenKey::verify(self, token, now_unix)
    }
}

/// `grant` signed with `key` (its `key_id` replaced by the key's, its issue time, if unset,
/// now).
fn sign(key: &Key, mut grant: Grant) -> String {
    grant.key_id = key.id.clone();
    grant.issued_unix = grant.issued_unix.or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    });
    let payload = serde_json::to_vec(&grant).expect("grants serialize");
    let signed = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
    let mac = hmac::sign(&key.hmac, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

/// Node `node`'s token key, derived from the cluster key: HMAC-SHA256(cluster key,
/// `"conlog node token key v1\0" + node`). Whoever holds one node's key can sign only that
/// node's tokens; whoever holds the cluster key (the gateway, the provisioning) can derive all.
pub fn node_key(cluster: &[u8], node: &str) -> [u8; KEY_BYTES] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, cluster);
    let tag = hmac::sign(&key, format!("conlog node token key v1\0{node}").as_bytes());
    let mut out = [0u8; KEY_BYTES];
    out.copy_from_slice(&tag.as_ref()[..KEY_BYTES]);
    out
}

/// `bytes` as the text of a key file (64 hex digits and a newline).
pub fn key_file_text(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}\n")
}

/// Reads a key file (the cluster key: 64 hex digits, like a node's).
pub fn read_key_file(path: &Path) -> io::Result<Vec<u8>> {
    let text = fs::read(path)?;
    decode_key_file(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a key ({} hex digits expected)",
                path.display(),
                KEY_BYTES * 2
            ),
        )
    })
}

/// What identifies a version of a file: a replaced file (rename, a Kubernetes Secret's symlink
/// swap) or a rewritten one differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path)?;
    Ok(FileStamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// The gateway's cluster key (docs/gateway.md, "Keys"): verifies every node's tokens by
/// deriving the node's key from the token's node claim. The file is checked (one `stat`) at
/// every verification and read again when it changed, so replacing it revokes every token at
/// the next call; a file that cannot be read or is not a key refuses every token (fail closed).
pub struct ClusterKey {
    path: PathBuf,
    /// The key as last read, and the file version it came from. Held for a copy, never across
    /// an `.await`.
    current: std::sync::Mutex<(FileStamp, Option<Vec<u8>>)>,
    /// Counts changes of the file, so that calls in progress re-check their token.
    changes: tokio::sync::watch::Sender<u64>,
}

impl ClusterKey {
    /// Reads the key at `path`; an error if it cannot be used now.
    pub fn load(path: &Path) -> io::Result<Self> {
        let at = stamp(path)?;
        let key = read_key_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: std::sync::Mutex::new((at, Some(key))),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Changes when the key file changed (seen by a verification or by [`Self::check`]).
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Looks at the file now (the gateway does every second), so that calls in progress learn
    /// of a new key even when no new call arrives.
    pub(crate) fn check(&self) {
        let _ = self.bytes();
    }

    /// The current key bytes, read again if the file changed.
    fn bytes(&self) -> Result<Vec<u8>, TokenError> {
        let at = stamp(&self.path).map_err(|e| TokenError::NoClusterKey(e.to_string()))?;
        let mut current = self.current.lock().expect("cluster key poisoned");
        if current.0 != at {
            let fresh = read_key_file(&self.path);
            if let Err(e) = &fresh {
                crate::limited!(error, path = %self.path.display(), error = %e, "cluster key unusable; refusing every token");
            } else {
                tracing::info!(path = %self.path.display(), "cluster key changed: tokens of the previous key are refused");
            }
            *current = (at, fresh.ok());
            self.changes.send_modify(|n| *n += 1);
        }
        current
            .1
            .clone()
            .ok_or_else(|| TokenError::NoClusterKey("not a key".into()))
    }

    /// A token for `grant` signed with the key of the node its claim names, as that node
    /// would issue it: the gateway's own read-only watch of a console it fans out
    /// (docs/gateway.md, "Fan-out").
    pub(crate) fn issue(&self, grant: Grant) -> Result<String, TokenError> {
        let node = grant.node.as_deref().ok_or(TokenError::NoNode)?;
        let key = Key::from_bytes(&node_key(&self.bytes()?, node));
        Ok(sign(&key, grant))
    }

    /// The key file text of node `node` (for `conlog-gateway node-key`).
    pub fn node_key_file(&self, node: &str) -> io::Result<String> {
        let cluster = self
            .bytes()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(key_file_text(&node_key(&cluster, node)))
    }
}

impl Verify for ClusterKey {
    /// Reads the node claim (base64url and JSON of at most 1 KiB: nothing in it is trusted
    /// yet), derives that node's key and checks the MAC with it, then the expiry.
    fn verify(&self, token: &str, now_unix: u64) -> Result<Grant, TokenError> {
        let (signed, mac) = split_token(token)?;
        let payload = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let grant: Grant = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload is not a grant"))?;
        let node = grant.node.as_deref().ok_or(TokenError::NoNode)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &node_key(&self.bytes()?, node));
        hmac::verify(&key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        grant.check_expiry(now_unix)?;
        Ok(grant)
    }
}

impl Grant {
    /// What the per-guest call limit counts this grant under: its guest, on its node when the
    /// token names one (a gateway serves many nodes' guests of the same name).
    pub(crate) fn scope(&self) -> String {
        match &self.node {
            Some(node) => format!("{}@{node}", self.guest),
            None => self.guest.clone(),
        }
    }

    /// Refuses the grant at `now_unix` if it has expired.
    pub(crate) fn check_expiry(&self, now_unix: u64) -> Result<(), TokenError> {
        if now_unix >= self.expires_unix {
            return Err(TokenError::Expired(self.expires_unix));
        }
        Ok(())
    }
}

/// Splits `conlog1.<payload>.<mac>` into the signed part and the decoded MAC.
fn split_token(token: &str) -> Result<(&str, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("longer than 1024 bytes"));
    }
    if !token.starts_with(PREFIX) {
        return Err(TokenError::Malformed("it does not start with conlog1."));
    }
    let (signed, mac) = token
        .rsplit_once('.')
        .filter(|(signed, _)| signed.len() > PREFIX.len())
        .ok_or(TokenError::Malformed(
            "expected conlog1.<payload>.<signature>",
        ))?;
    let mac = URL_SAFE_NO_PAD
        .decode(mac)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    Ok((signed, mac))
}

fn decode_key_file(text: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?.trim();
    if text.len() != KEY_BYTES * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..KEY_BYTES)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Writes a fresh random key next to `path` and renames it into place (0600 from creation).
fn write_new_key(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; KEY_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("key.new");
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(format!("{text}\n").as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn grant(expires_unix: u64) -> Grant {
        Grant {
            guest: "vm1".into(),
            device: Some("serial0".into()),
            access: Access::Read,
            expires_unix,
            key_id: String::new(),
            issued_unix: None,
            node: None,
        }
    }

    fn key(dir: &tempfile::TempDir) -> TokenKey {
        TokenKey::load_or_create(&dir.path().join("token.key")).unwrap()
    }

    #[test]
    fn issued_tokens_verify_until_expiry_and_not_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let key = key(&dir);
        let mode = fs::metadata(dir.path().join("token.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = key.issue(grant(100));
        let got = key.verify(&token, 99).unwrap();
        assert_eq!((got.guest.as_str(), got.access), ("vm1", Access::Read));
        assert_eq!(key.verify(&token, 100), Err(TokenError::Expired(100)));

        // The same file read again (a restart) accepts it; a rotation does not.
        let again = TokenKey::load_or_create(&dir.path().join("token.key")).unwrap();
        assert!(again.verify(&token, 1).is_ok());
        let old_id = again.key_id();
        assert_ne!(again.rotate().unwrap(), old_id);
        assert_eq!(again.verify(&token, 1), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampering_is_a_bad_signature() {
        let dir = tempfile::tempdir().unwrap();
        let key = key(&dir);
        let token = key.issue(grant(100));
        let (signed, mac) = token.rsplit_once('.').unwrap();
        let mut payload: Grant =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&signed[PREFIX.len()..]).unwrap())
                .unwrap();
        payload.access = Access::ReadWrite;
        let forged = format!(
            "{PREFIX}{}.{mac}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap())
        );
        assert_eq!(key.verify(&forged, 1), Err(TokenError::BadSignature));
    }

    /// A key file written by hand (upper-case hex, surrounded by blanks) is the key its hex
    /// says: its id is the first 4 bytes of its SHA-256, and tokens name that id.
    #[test]
    fn a_key_file_is_read_as_its_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let bytes: Vec<u8> = (0u8..)
            .take(KEY_BYTES)
            .map(|i| i.wrapping_mul(37) ^ 0xa5)
            .collect();
        let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
        fs::write(&path, format!("  {hex}\n\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let key = TokenKey::load_or_create(&path).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let id: String = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key.key_id(), id);
        let token = key.issue(grant(100));
        assert_eq!(key.verify(&token, 1).unwrap().key_id, id);
        // The MAC is HMAC-SHA256 under exactly these bytes.
        let (signed, mac) = token.rsplit_once('.').unwrap();
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, &bytes);
        assert!(hmac::verify(
            &hmac,
            signed.as_bytes(),
            &URL_SAFE_NO_PAD.decode(mac).unwrap()
        )
        .is_ok());
        // The file was left as it was.
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("  {hex}\n\n"));
    }

    /// A file that is not 64 hex digits is refused (never replaced: that would revoke every
    /// token behind the operator's back).
    #[test]
    fn a_bad_key_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        for bad in [
            "0".repeat(63),
            "0".repeat(65),
            format!("{}g", "0".repeat(63)),
            format!("{} 0", "0".repeat(62)),
            String::new(),
        ] {
            fs::write(&path, &bad).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = TokenKey::load_or_create(&path).err().expect(&bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
            assert_eq!(fs::read_to_string(&path).unwrap(), bad);
        }
        // A directory where the key should be is an error too, not a new key.
        let dir_path = dir.path().join("a-directory");
        fs::create_dir(&dir_path).unwrap();
        assert!(TokenKey::load_or_create(&dir_path).is_err());
        assert!(dir_path.is_dir());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no new key written beside it: {names:?}");
    }

    #[test]
    fn the_key_lives_in_the_state_directory() {
        assert_eq!(
            TokenKey::path_in(Path::new("/var/lib/conlog/state")),
            Path::new("/var/lib/conlog/state/token.key")
        );
    }

    /// A key readable by others gets mode 0600; one that is already 0600 keeps it.
    #[test]
    fn a_loose_key_file_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let first = key(&dir).key_id();
        for loose in [0o644, 0o640, 0o604, 0o600] {
            fs::set_permissions(&path, fs::Permissions::from_mode(loose)).unwrap();
            let again = TokenKey::load_or_create(&path).unwrap();
            assert_eq!(again.key_id(), first, "the same key");
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "from {loose:o}");
        }
    }

    /// New keys are random (two differ), written as 64 hex digits and a newline; each rotation
    /// is counted for the calls that watch it, and the id it returns is the key's new id.
    #[test]
    fn new_keys_are_random_and_rotations_are_counted() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (first, second) = (key(&a), key(&b));
        assert_ne!(first.key_id(), second.key_id());
        let text = fs::read_to_string(a.path().join("token.key")).unwrap();
        assert_eq!(text.len(), 65, "{text:?}");
        assert!(text.ends_with('\n') && text[..64].bytes().all(|c| c.is_ascii_hexdigit()));
        let mut rotations = first.rotations();
        assert_eq!(*rotations.borrow_and_update(), 0);
        for n in 1..=2 {
            let before = first.key_id();
            let id = first.rotate().unwrap();
            assert_ne!(id, before);
            assert_eq!(id, first.key_id());
            assert!(rotations.has_changed().unwrap());
            assert_eq!(*rotations.borrow_and_update(), n);
        }
        // The rotated key is the one on disk.
        let reread = TokenKey::load_or_create(&a.path().join("token.key")).unwrap();
        assert_eq!(reread.key_id(), first.key_id());
    }

    /// The token's shape is checked before its signature: 1024 bytes at most, a non-empty
    /// payload; a well-formed token with a wrong MAC is a bad signature.
    #[test]
    fn malformed_tokens_are_told_apart_from_bad_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let key = key(&dir);
        let mac = URL_SAFE_NO_PAD.encode([0u8; 32]);
        let of_len = |len: usize| {
            let payload = "A".repeat(len - PREFIX.len() - 1 - mac.len());
            format!("{PREFIX}{payload}.{mac}")
        };
        assert_eq!(of_len(MAX_TOKEN_LEN).len(), MAX_TOKEN_LEN);
        assert_eq!(
            key.verify(&of_len(MAX_TOKEN_LEN), 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.verify(&of_len(MAX_TOKEN_LEN + 1), 0),
            Err(TokenError::Malformed("longer than 1024 bytes"))
        );
        assert_eq!(
            key.verify(&format!("{PREFIX}.{mac}"), 0),
            Err(TokenError::Malformed(
                "expected conlog1.<payload>.<signature>"
            ))
        );
        assert_eq!(
            key.verify(&format!("{PREFIX}x.{mac}"), 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.verify(&format!("conlog2.x.{mac}"), 0),
            Err(TokenError::Malformed("it does not start with conlog1."))
        );
    }

    /// Tokens name the node that issued them once it knows its endpoint; a node that enforces
    /// the claim refuses a token naming another, and every node still accepts tokens that name
    /// none (issued before the claim existed); one that does not enforce it accepts both.
    #[test]
    fn the_node_claim_is_issued_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = key(&dir);
        let unclaimed = key.issue(grant(100));
        assert_eq!(key.verify(&unclaimed, 1).unwrap().node, None);
        key.set_node("node-a:7770".into(), true);
        let claimed = key.issue(grant(100));
        assert_eq!(
            key.verify(&claimed, 1).unwrap().node.as_deref(),
            Some("node-a:7770")
        );
        assert!(key.verify(&unclaimed, 1).is_ok());
        let other = TokenKey::load_or_create(&dir.path().join("token.key")).unwrap();
        other.set_node("node-b:7770".into(), false);
        assert!(other.verify(&claimed, 1).is_ok(), "not enforced");
        other.set_node("node-b:7770".into(), true);
        assert_eq!(
            other.verify(&claimed, 1),
            Err(TokenError::OtherNode("node-a:7770".into()))
        );
        assert!(other.verify(&unclaimed, 1).is_ok());
    }

    /// The gateway verifies a node's token with the key it derives from the cluster key and
    /// the token's node claim: a token whose claim was changed, or signed by another node's
    /// key, is a bad signature; replacing the cluster key revokes every token; a node reloads
    /// a provisioned key as a rotation.
    #[test]
    fn the_cluster_key_verifies_each_nodes_tokens_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let cluster_path = dir.path().join("cluster.key");
        fs::write(&cluster_path, key_file_text(&[7u8; KEY_BYTES])).unwrap();
        let cluster = ClusterKey::load(&cluster_path).unwrap();
        let node = |name: &str, claim: &str| {
            let path = dir.path().join(format!("{name}.key"));
            fs::write(&path, cluster.node_key_file(name).unwrap()).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let key = TokenKey::load_or_create(&path).unwrap();
            key.set_node(claim.into(), true);
            key
        };
        let a = node("a:1", "a:1");
        let token = a.issue(grant(100));
        assert_eq!(
            cluster.verify(&token, 1).unwrap().node.as_deref(),
            Some("a:1")
        );
        assert_eq!(cluster.verify(&token, 100), Err(TokenError::Expired(100)));
        // Node b's key claiming to be a.
        let b_as_a = node("b:1", "a:1");
        assert_eq!(
            cluster.verify(&b_as_a.issue(grant(100)), 1),
            Err(TokenError::BadSignature)
        );
        // No claim: the gateway cannot route it.
        let plain = key(&dir).issue(grant(100));
        assert_eq!(cluster.verify(&plain, 1), Err(TokenError::NoNode));
        // A new cluster key (written beside and renamed, as a Secret update is).
        let fresh = dir.path().join("cluster.key.new");
        fs::write(&fresh, key_file_text(&[9u8; KEY_BYTES])).unwrap();
        fs::rename(&fresh, &cluster_path).unwrap();
        assert_eq!(cluster.verify(&token, 1), Err(TokenError::BadSignature));
        // The node takes its newly derived key on reload, as a rotation.
        let rotations = a.rotations();
        fs::write(
            dir.path().join("a:1.key"),
            cluster.node_key_file("a:1").unwrap(),
        )
        .unwrap();
        assert!(a.reload().unwrap());
        assert!(rotations.has_changed().unwrap());
        assert!(!a.reload().unwrap(), "the same key again is no rotation");
        assert_eq!(a.verify(&token, 1), Err(TokenError::BadSignature));
        assert!(cluster.verify(&a.issue(grant(100)), 1).is_ok());
        // An unusable cluster key refuses everything.
        fs::write(&cluster_path, "garbage").unwrap();
        assert!(matches!(
            cluster.verify(&a.issue(grant(100)), 1),
            Err(TokenError::NoClusterKey(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary text never panics and is never accepted.
        #[test]
        fn arbitrary_tokens_are_refused(text in ".{0,300}") {
            let dir = tempfile::tempdir().unwrap();
            prop_assert!(key(&dir).verify(&text, 0).is_err());
        }

        /// A valid token with any one byte changed is refused.
        #[test]
        fn mutated_tokens_are_refused(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let dir = tempfile::tempdir().unwrap();
            let key = key(&dir);
            let token = key.issue(grant(u64::MAX));
            let mut bytes = token.clone().into_bytes();
            let i = at.index(bytes.len());
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            if let Ok(text) = String::from_utf8(bytes) {
                // Base64 padding bits can make two texts decode alike; the MAC still decides.
                if let Ok(grant) = key.verify(&text, 0) {
                    prop_assert_eq!(Some(grant), key.verify(&token, 0).ok());
                }
            }
        }
    }
}
