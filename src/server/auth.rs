//! Who may call what: local trust, and bearer tokens on TCP.
//!
//! Owns the two interceptors that put a [`Caller`] into every `Console` request (the local
//! socket's [`LocalTrust`], TCP's [`BearerTokens`]) and [`authorize`], which handlers call with
//! the guest and device a request touches. A request without a `Caller` is refused: the
//! default is closed. Token signing and format belong to [`crate::tokens`].

use crate::error::Error;
use crate::tokens::{Access, Grant, TokenKey};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A process on this host, trusted by the local socket's permissions.
    Local,
    /// A network client holding a valid token.
    Remote(Grant),
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Watch output, read history.
    Read,
    /// Also hold the writer lease and type.
    Write,
}

/// The local socket's interceptor: its callers are trusted.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalTrust;

impl Interceptor for LocalTrust {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.extensions_mut().insert(Caller::Local);
        Ok(request)
    }
}

/// A grant whose signature the call limits ([`super::limits`]) already checked for this
/// request (its expiry is still the interceptor's to judge): the token is verified once per
/// call.
#[derive(Clone, Debug)]
pub struct Signed(pub Grant);

/// TCP's interceptor: `authorization: Bearer <token>` or `UNAUTHENTICATED`.
#[derive(Clone)]
pub struct BearerTokens(pub Arc<TokenKey>);

impl Interceptor for BearerTokens {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::from(Error::Unauthenticated(
                "This call needs an `authorization: Bearer <token>` header; the node's agent \
                 issues tokens (Agent.IssueToken, `conlogctl token`)"
                    .to_owned(),
            ))
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::from(Error::Unauthenticated(
                    "The authorization header must be `Bearer <token>`".to_owned(),
                ))
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let refused = |e| Status::from(Error::Unauthenticated(format!("Token refused: {e}")));
        let grant = match request.extensions().get::<Signed>() {
            Some(Signed(grant)) => {
                grant.check_expiry(now).map_err(refused)?;
                grant.clone()
            }
            None => self.0.verify(token.trim(), now).map_err(refused)?,
        };
        request.extensions_mut().insert(Caller::Remote(grant));
        Ok(request)
    }
}

/// The caller of `request`, as the interceptor recorded it.
pub fn caller<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// The caller's grant (`None` for a trusted local caller), or why there is none.
fn grant_for<'a>(caller: Option<&'a Caller>, guest: &str) -> Result<Option<&'a Grant>, Error> {
    let grant = match caller {
        Some(Caller::Local) => return Ok(None),
        Some(Caller::Remote(grant)) => grant,
        None => {
            return Err(Error::Unauthenticated(
                "The caller is not identified".into(),
            ))
        }
    };
    if grant.guest != guest {
        return Err(Error::PermissionDenied(format!(
            "The token is for guest {:?}, not {guest:?}",
            grant.guest
        )));
    }
    Ok(Some(grant))
}

/// Checks that `caller` may touch `guest` at all (before anything is looked up).
pub fn authorize_guest(caller: Option<&Caller>, guest: &str) -> Result<(), Error> {
    grant_for(caller, guest).map(|_| ())
}

/// Checks that `caller` may do `need` on `guest`'s `device`.
pub fn authorize(
    caller: Option<&Caller>,
    guest: &str,
    device: &str,
    need: Need,
) -> Result<(), Error> {
    let Some(grant) = grant_for(caller, guest)? else {
        return Ok(());
    };
    if let Some(allowed) = &grant.device {
        if allowed != device {
            return Err(Error::PermissionDenied(format!(
                "The token is for device {allowed:?} of {guest:?}, not {device:?}"
            )));
        }
    }
    if need == Need::Write && grant.access == Access::Read {
        return Err(Error::PermissionDenied(
            "The token is read-only: it cannot take the writer lease or send input".into(),
        ));
    }
    Ok(())
}

/// Checks that `caller` may read the logs of `guest`'s stream `device` that was removed at
/// the time its tombstone records: a local caller always may; a token only if it grants that
/// stream and was issued no later than the second of the removal. A token issued after it may
/// be meant for a guest created again under the name (another tenant's), so it never reads
/// what the removed one left; nor does a token that carries no issue time, nor any token when
/// the removal time is unknown (logs left without a tombstone).
pub fn authorize_removed(
    caller: Option<&Caller>,
    guest: &str,
    device: &str,
    removed_unix: Option<u64>,
) -> Result<(), Error> {
    authorize(caller, guest, device, Need::Read)?;
    let Some(Caller::Remote(grant)) = caller else {
        return Ok(());
    };
    match (grant.issued_unix, removed_unix) {
        (Some(issued), Some(removed)) if issued <= removed => Ok(()),
        _ => Err(Error::PermissionDenied(format!(
            "{guest}/{device} was removed; only a token issued before its removal reads its logs"
        ))),
    }
}

/// The device a token is limited to, if any (the default stream of a history read).
pub fn granted_device(caller: Option<&Caller>) -> Option<&str> {
    match caller {
        Some(Caller::Remote(grant)) => grant.device.as_deref(),
        _ => None,
    }
}
