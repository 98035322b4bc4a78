//! Who may call what: local trust, and bearer tokens on TCP.
//!
//! Owns the two interceptors that put a [`Caller`] into every `Console` request (the local
//! socket's [`LocalTrust`], TCP's [`BearerTokens`]) and [`authorize`], which handlers call with
//! the guest and device a request touches. A request without a `Caller` is refused: the
//! default is closed. Token signing and format belong to [`crate::tokens`].

use crate::error::Error;
use crate::tokens::{Access, Grant, TokenKey, Verify};
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
        let grant = verify_bearer(
            request.metadata().as_ref(),
            request.extensions(),
            self.0.as_ref(),
        )?;
        request.extensions_mut().insert(Caller::Remote(grant));
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` header (surrounding blanks trimmed), or
/// why there is none. The one place the header is parsed: a node's interceptor, its call
/// limits and gRPC-web body allowance, and the gateway all read tokens with it.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Error> {
    let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        Error::Unauthenticated(
            "This call needs an `authorization: Bearer <token>` header; the node's agent \
             issues tokens (Agent.IssueToken, `conlogctl token`)"
                .to_owned(),
        )
    })?;
    header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            Error::Unauthenticated("The authorization header must be `Bearer <token>`".to_owned())
        })
}

/// The grant of a call's bearer token: verified with `keys` and not expired now. A call
/// whose signature the call limits already checked ([`Signed`] among its `extensions`) has
/// only its expiry judged here. A node's interceptor ([`BearerTokens`]) and the gateway's
/// forwarding service both authenticate with it.
pub(crate) fn verify_bearer(
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
    keys: &dyn Verify,
) -> Result<Grant, Error> {
    let token = bearer_token(headers)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let refused = |e| Error::Unauthenticated(format!("Token refused: {e}"));
    match extensions.get::<Signed>() {
        Some(Signed(grant)) => {
            grant.check_expiry(now).map_err(refused)?;
            Ok(grant.clone())
        }
        None => keys.verify(token, now).map_err(refused),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = value {
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_bearer_token_is_read_trimmed_and_anything_else_is_refused_saying_why() {
        assert_eq!(
            bearer_token(&headers(Some("Bearer  abc.def "))).unwrap(),
            "abc.def"
        );
        let missing = bearer_token(&headers(None)).unwrap_err().to_string();
        assert!(
            missing.contains("needs an `authorization: Bearer <token>`"),
            "{missing}"
        );
        for malformed in ["Basic abc", "bearer abc", "Bearerabc"] {
            let refused = bearer_token(&headers(Some(malformed)))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("must be `Bearer <token>`"), "{refused}");
        }
    }

    #[test]
    fn a_grant_the_call_limits_signed_is_judged_on_expiry_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::load_or_create(&dir.path().join("token.key")).unwrap();
        let grant = |expires_unix| Grant {
            guest: "vm1".into(),
            device: None,
            access: Access::Read,
            expires_unix,
            key_id: String::new(),
            node: None,
            issued_unix: None,
        };
        let far = u64::MAX / 2;
        let token = key.issue(grant(far));
        let headers = headers(Some(&format!("Bearer {token}")));
        let verified = verify_bearer(&headers, &http::Extensions::new(), &key).unwrap();
        assert_eq!(verified.guest, "vm1");
        // A forged token with a grant already checked: the checked grant is the one used.
        let forged = self::headers(Some("Bearer not-a-token"));
        let mut signed = http::Extensions::new();
        signed.insert(Signed(grant(far)));
        assert_eq!(verify_bearer(&forged, &signed, &key).unwrap().guest, "vm1");
        let mut expired = http::Extensions::new();
        expired.insert(Signed(grant(1)));
        let refused = verify_bearer(&headers, &expired, &key)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("Token refused"), "{refused}");
        let unsigned = verify_bearer(&forged, &http::Extensions::new(), &key)
            .unwrap_err()
            .to_string();
        assert!(unsigned.contains("Token refused"), "{unsigned}");
    }
}
