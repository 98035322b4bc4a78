//! Tokens of a guest's previous node, accepted by the node it migrated to (docs/design.md,
//! "Live migration").
//!
//! Owns the table of guests this node imported (guest → the node it came from) and the check
//! of a token another node issued: its signature is not this node's, so this node asks the node
//! the guest came from (which asks its own source for a token of a node before it), over
//! the node-to-node connection ([`super::import::Importer`]'s TLS), with a `ReadHistory` that
//! can return no byte (from an offset past any end): the source verifies the token (signature,
//! expiry, guest, device, its issue time against the move) exactly as for any call of its own,
//! and answers `OUT_OF_RANGE` or the moved status when it is good. A good answer is cached until
//! the token expires, at most [`CACHE_TTL`], in a bounded table. Only a token whose (unverified)
//! node claim names another node, for a guest imported here, is ever sent, and only to the node
//! the guest came from (which checks a token of a node before it by asking its own source, a
//! bounded number of hops); any other token is refused as before, without a call. It never decides what a grant allows (`auth`).

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
/// Most nodes a token is passed along to be checked (a chain of moves A → B → C → D).
pub const MAX_HOPS: u32 = 4;
/// Request header: how many nodes already passed a token check along (see [`MAX_HOPS`]).
pub const HOPS_HEADER: &str = "conlog-token-hops";
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

    /// The grant `token` claims, if it names a node and its guest was imported here (nothing
    /// of it is verified yet): the node the guest came from, or one before it (a chain of
    /// moves), which that node asks in turn.
    pub fn candidate(&self, token: &str) -> Option<Grant> {
        let grant = unverified_grant(token)?;
        grant.node.as_deref()?;
        self.importer.imported.from(&grant.guest)?;
        Some(grant)
    }

    /// Asks the node the guest was imported from whether `token` (for `grant`, its claims) is
    /// good — that node checks it as any call of its own: with its key if it issued it, else
    /// by asking its own source in turn, `hops` counting the nodes already asked along the
    /// chain (at most [`MAX_HOPS`], so a loop of imports cannot make calls without end). The
    /// grant when it is good, or the status the call gets: the refusal, or `UNAVAILABLE` naming
    /// the source when it cannot be asked.
    pub async fn check(&self, token: &str, grant: Grant, hops: u32) -> Result<Grant, Status> {
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
        let issuer = grant.node.clone().unwrap_or_default();
        let Some(node) = self.importer.imported.from(&grant.guest) else {
            return Err(Status::unauthenticated(format!(
                "Token refused: it was issued by node {issuer}, and guest {} was not imported here",
                grant.guest
            )));
        };
        if hops >= MAX_HOPS {
            return Err(Status::unauthenticated(format!(
                "Token refused: issued by node {issuer}, it could not be checked within \
                 {MAX_HOPS} of guest {}'s previous nodes",
                grant.guest
            )));
        }
        let answer = self
            .importer
            .ask_source(
                &node,
                &grant.guest,
                grant.device.as_deref(),
                token,
                hops + 1,
            )
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
                        "node {node}, where guest {} was before it moved here, refused this \
                         token (issued by node {issuer}): {}",
                        grant.guest,
                        status.message()
                    ),
                ))
            }
            Err(status) => {
                return Err(Status::unavailable(format!(
                    "this token was issued by node {issuer}; guest {} came here from node \
                     {node}, which cannot check it now ({}); a token from this node's agent \
                     works",
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
