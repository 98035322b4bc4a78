//! TLS of the TCP listener: certificates from PEM files, optional client-certificate
//! verification (mutual TLS), and reloading on SIGHUP.
//!
//! Owns the current `rustls::ServerConfig`. A reload builds a whole new one from the files and
//! swaps it in only if every file was good; connections already established keep the config
//! they were accepted with, so a reload drops nobody. It never accepts connections itself.

use crate::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why the TLS files could not be used. One line, naming the file.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("Cannot read {what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("Invalid TLS setup: {0}")]
    Setup(String),
}

fn file_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no PEM CERTIFICATE block in it"));
    }
    Ok(certs)
}

/// Builds a server config from the files named in `config`.
fn build(config: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("tls.cert", &config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| file_error("tls.key", &config.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("tls.client_ca", path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("tls.client_ca", path, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("tls.client_ca", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Setup(format!("tls.cert and tls.key: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// The TLS side of the TCP listener.
pub struct Tls {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files; fails (and the daemon does not start) if any is bad.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(Arc::new(build(config)?)),
            config: config.clone(),
        })
    }

    /// Reads the files again. On error the previous certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = Arc::new(build(&self.config)?);
        *self.current.write().expect("tls config poisoned") = fresh;
        Ok(())
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.config.client_ca.is_some()
    }

    /// Runs the server side of the handshake on `tcp`, within the configured timeout.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.current.read().expect("tls config poisoned").clone());
        match tokio::time::timeout(self.config.handshake_timeout.get(), acceptor.accept(tcp)).await
        {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake took longer than tls.handshake_timeout",
            )),
        }
    }
}
