//! What guards the daemon's listeners: the TLS files and the token key, loaded once at start
//! (and by the upgrade preflight) and kept across upgrades that fail.
//!
//! Owns loading them and reloading the certificates on SIGHUP; never serves anything itself.

use super::StartError;
use crate::config::Config;
use crate::server::Protection;
use crate::tls::Tls;
use crate::tokens::TokenKey;
use std::sync::Arc;

/// What guards the listeners; built once, kept across upgrades that fail.
pub(super) struct Security {
    pub(super) tls: Option<Arc<Tls>>,
    pub(super) tokens: Arc<TokenKey>,
    pub(super) protection: Protection,
}

impl Security {
    pub(super) fn load(config: &Config) -> Result<Self, StartError> {
        let path = TokenKey::path_in(&config.data_dir().join("state"));
        let tokens = TokenKey::load_or_create(&path)
            .map_err(|source| StartError::TokenKey { path, source })?;
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(Tls::load(tls)?)),
            None => None,
        };
        if config.insecure && tls.is_none() {
            tracing::warn!(
                listen = %config.listen,
                "insecure: true — console traffic and tokens on TCP are not encrypted; \
                 configure tls.cert and tls.key"
            );
        }
        let tokens = Arc::new(tokens);
        Ok(Self {
            tls,
            protection: Protection::new(&config.limits, tokens.clone()).with_web(&config.web),
            tokens,
        })
    }

    /// SIGHUP: reads the TLS files and the token key again; on error the old ones stay. A
    /// token key provisioned from outside (docs/gateway.md, "Keys") takes effect here, as a
    /// rotation when it differs.
    pub(super) fn reload(&self) {
        match self.tokens.reload() {
            Ok(true) => tracing::warn!(
                "SIGHUP: token key replaced from its file: every token issued before is revoked"
            ),
            Ok(false) => tracing::info!("SIGHUP: token key unchanged"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: cannot read the token key; keeping the current one")
            }
        }
        let Some(tls) = &self.tls else {
            tracing::info!("SIGHUP: no TLS configured, nothing to reload");
            return;
        };
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates")
            }
        }
    }
}
