//! Tokens of a guest's previous node, accepted by the node it migrated to (docs/design.md,
//! "Live migration").
//!
//! Owns the table of guests this node imported (guest → the node it came from) and the check
//! of a token that node issued: its signature is that node's, so this node asks that node, over
//! the node-to-node connection ([`super::import::Importer`]'s TLS), with a `ReadHistory` that
//! can return no byte (from an offset past any end): the source verifies the token (signature,
//! expiry, guest, device, its issue time against the move) exactly as for any call of its own,
//! and answers `OUT_OF_RANGE` or the moved status when it is good. A good answer is cached until
//! the token expires, at most [`CACHE_TTL`], in a bounded table. Only a token whose (unverified)
//! node claim names the node this node imported its guest from is ever sent there; any other
//! token is refused as before, without a call. It never decides what a grant allows (`auth`).

use super::import::Importer;
use crate::tokens::Grant;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// Longest a source's answer is trusted: a token revoked there (a key rotation) stops working
/// here within it.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most answers cached (a few hundred bytes each).
const CACHE_ENTRIES: usize = 4096;
/// Most guests remembered as imported.
const IMPORTED_GUESTS: usize = 65_536;
/// Longest token looked at (the tokens module's bound).
const MAX_TOKEN: usize = 1024;

/// Guest → the node it was imported from (its last import on this node).
#[derive(Default)]
pub struct Imported(Mutex<HashMap<String, String>>);

impl Imported {
    /// `guest` was imported from `node`: that node's tokens for it are checked there.
    pub fn insert(&self, guest: &str, node: &str) {
        let mut imported = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if imported.len() >= IMPORTED_GUESTS && !imported.contains_key(guest) {
            return;
        }
        imported.insert(guest.to_owned(), node.to_owned());
    }

    fn from(&self, guest: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(guest)
            .cloned()
    }
}

/// The answers of the previous nodes of the guests imported here.
pub struct ForeignTokens {
    importer: Arc<Importer>,
    /// Token → its grant and until when the answer holds.
    cache: Mutex<HashMap<String, (Grant, Instant)>>,
}

impl ForeignTokens {
    pub fn new(importer: Arc<Importer>) -> Self {
        Self {
            importer,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The grant `token` claims, if it names the node its guest was imported from (nothing
    /// of it is verified yet).
    pub fn candidate(&self, token: &str) -> Option<Grant> {
        let grant = unverified_grant(token)?;
        let node = grant.node.as_deref()?;
        (self.importer.imported.from(&grant.guest).as_deref() == Some(node)).then_some(grant)
    }

    /// Asks the node that issued `token` (for `grant`, its claims) whether it is good; the
    /// grant when it is, or the status the call gets: the source's refusal, or `UNAVAILABLE`
    /// naming the source when it cannot be asked.
    pub async fn check(&self, token: &str, grant: Grant) -> Result<Grant, Status> {
        if let Some((cached, until)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
        {
            if Instant::now() < *until {
                return Ok(cached.clone());
            }
        }
        let node = grant.node.clone().unwrap_or_default();
        let answer = self
            .importer
            .ask_source(&node, &grant.guest, grant.device.as_deref(), token)
            .await;
        match answer {
            Ok(()) => {}
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                return Err(Status::new(
                    status.code(),
                    format!(
                        "node {node}, which issued this token, refused it: {}",
                        status.message()
                    ),
                ))
            }
            Err(status) => {
                return Err(Status::unavailable(format!(
                    "this token was issued by node {node}, where guest {} was before it moved \
                     here, and that node cannot check it now ({}); a token from this node's \
                     agent works",
                    grant.guest,
                    status.message()
                )))
            }
        }
        let now_unix = crate::tombstone::now_unix();
        let left = Duration::from_secs(grant.expires_unix.saturating_sub(now_unix));
        let until = Instant::now() + left.min(CACHE_TTL);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (grant.clone(), until));
        Ok(grant)
    }
}

/// The grant `token` carries, decoded without checking its signature (the node that signed it
/// does), or `None` if it is not a token.
fn unverified_grant(token: &str) -> Option<Grant> {
    if token.len() > MAX_TOKEN {
        return None;
    }
    let rest = token.strip_prefix("conlog1.")?;
    let (payload, _mac) = rest.rsplit_once('.')?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}
