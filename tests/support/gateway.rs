//! `conlog-gateway` in tests (docs/gateway.md): certificates made with `rcgen` (one CA for the
//! servers, nodes and gateways, for `localhost` and `127.0.0.1`; one for the gateway's client
//! certificate), a cluster key, nodes whose token key is derived from it, and gateway processes.

use super::{
    bounded, open_console, wait_guest_connected, with_token, ConsoleChannel, Daemon, FakeGuest,
    DEADLINE, DEVICE, POLL,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use tempfile::TempDir;
use tokio::time::Instant;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

// Certificates and keys

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self { cert, key }
    }

    pub fn leaf(&self, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The files of one fleet: CAs, leaves, the cluster key.
pub struct Pki {
    pub dir: TempDir,
    pub server_ca: Ca,
    pub client_ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        let pki = Self {
            dir: tempfile::Builder::new()
                .prefix("conlog-gateway-")
                .tempdir()
                .expect("temporary directory"),
            server_ca: Ca::new("conlog test servers"),
            client_ca: Ca::new("conlog test gateway clients"),
        };
        pki.write("server-ca.pem", &pki.server_ca.cert.pem());
        pki.write("client-ca.pem", &pki.client_ca.cert.pem());
        let server = pki.server_ca.leaf(
            "conlog test server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki.write("server.pem", &server.cert);
        pki.write("server.key", &server.key);
        let client = pki
            .client_ca
            .leaf("conlog-gateway", &[], ExtendedKeyUsagePurpose::ClientAuth);
        pki.write("gateway-client.pem", &client.cert);
        pki.write("gateway-client.key", &client.key);
        pki.write("cluster.key", &format!("{}\n", "5a".repeat(32)));
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        // Beside, then renamed: a reader never sees half a file.
        let path = self.path(name);
        let partial = self.path(&format!("{name}.partial"));
        std::fs::write(&partial, text).expect("write a file");
        std::fs::rename(&partial, &path).expect("rename a file");
        path
    }

    /// A node's config: TLS, and with `require_gateway` mutual TLS with the gateway's CA.
    pub fn node_yaml(&self, require_gateway: bool) -> String {
        let mut yaml = format!(
            "tls:\n  cert: {}\n  key: {}\n",
            self.path("server.pem").display(),
            self.path("server.key").display()
        );
        if require_gateway {
            yaml.push_str(&format!(
                "  client_ca: {}\nconsole:\n  require_gateway: true\n",
                self.path("client-ca.pem").display()
            ));
        }
        yaml
    }

    pub fn gateway_yaml(&self, connect_timeout: &str) -> String {
        format!(
            "gateway:\n  listen: 127.0.0.1:0\n  tls:\n    cert: {}\n    key: {}\n  upstream:\n    \
             ca: {}\n    cert: {}\n    key: {}\n    connect_timeout: {connect_timeout}\n  \
             cluster_key: {}\n",
            self.path("server.pem").display(),
            self.path("server.key").display(),
            self.path("server-ca.pem").display(),
            self.path("gateway-client.pem").display(),
            self.path("gateway-client.key").display(),
            self.path("cluster.key").display(),
        )
    }

    /// `conlog-gateway node-key` for `node`.
    pub fn node_key(&self, node: &str) -> String {
        let output = Command::new(gateway_bin())
            .arg("node-key")
            .arg("--cluster-key")
            .arg(self.path("cluster.key"))
            .args(["--node", node])
            .output()
            .expect("run conlog-gateway node-key");
        assert!(output.status.success(), "node-key: {output:?}");
        String::from_utf8(output.stdout).expect("a key is text")
    }

    /// A node with its token key derived from the cluster key (written, then SIGHUP).
    pub async fn node(&self, require_gateway: bool) -> Daemon {
        self.node_with(require_gateway, "").await
    }

    /// The same, with more of conlogd's config (`extra`, top-level YAML keys).
    pub async fn node_with(&self, require_gateway: bool, extra: &str) -> Daemon {
        let yaml = self.node_yaml(require_gateway) + extra;
        let daemon = Daemon::start_with(Some(&yaml), &[]).await;
        let state = daemon.data_dir().join("state");
        let partial = state.join("token.key.provisioned");
        std::fs::write(&partial, self.node_key(&endpoint_of(&daemon))).unwrap();
        std::fs::rename(&partial, state.join("token.key")).unwrap();
        daemon.signal(rustix::process::Signal::HUP);
        poll_until("the node took its provisioned key", || {
            daemon.stderr().contains("token key replaced from its file")
        })
        .await;
        daemon
    }

    /// A client endpoint to `address` trusting the server CA, with the gateway's client
    /// certificate if `as_gateway`.
    pub fn endpoint(&self, address: SocketAddr, as_gateway: bool) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.server_ca.cert.pem()))
            .domain_name("localhost");
        if as_gateway {
            tls = tls.identity(Identity::from_pem(
                std::fs::read_to_string(self.path("gateway-client.pem")).unwrap(),
                std::fs::read_to_string(self.path("gateway-client.key")).unwrap(),
            ));
        }
        Endpoint::from_shared(format!("https://{address}"))
            .unwrap()
            .connect_timeout(DEADLINE)
            .tls_config(tls)
            .unwrap()
    }

    /// A Console client to `address` with `token` on every call (a new connection).
    pub async fn client(&self, address: SocketAddr, token: &str) -> ConsoleChannel {
        let channel = bounded("connect", self.endpoint(address, false).connect())
            .await
            .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
        with_token(channel, token)
    }
}

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_conlog-gateway")
}

/// A console `guest` on `daemon` with a fake guest connected to it.
pub async fn console_with_guest(daemon: &Daemon, guest: &str) -> FakeGuest {
    let mut agent = daemon.agent().await;
    let created = open_console(&mut agent, guest).await;
    let peer = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent, guest, DEVICE, true).await;
    peer
}

/// The Console endpoint a node advertises by default: its TCP listener's address.
pub fn endpoint_of(daemon: &Daemon) -> String {
    daemon.tcp.to_string()
}

async fn poll_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {DEADLINE:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// One HTTP/1.1 request over TLS to `address` (trusting the server CA); the raw response, read
/// until the server closes (`connection: close`).
pub async fn https_http1(pki: &Pki, address: SocketAddr, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.server_ca.cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    bounded("an HTTP/1.1 exchange", async {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(request).await.unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        response
    })
    .await
}

/// The body of an HTTP/1.1 response (after the blank line).
pub fn body_of(response: &[u8]) -> &[u8] {
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    &response[at + 4..]
}

/// A running `conlog-gateway`.
pub struct Gateway {
    child: Option<Child>,
    stderr: PathBuf,
    pub address: SocketAddr,
    _dir: TempDir,
}

impl Gateway {
    pub async fn start(pki: &Pki, connect_timeout: &str) -> Self {
        Self::start_with(pki, connect_timeout, "").await
    }

    /// With `extra` (more keys of the `gateway:` section, indented by two) in its config.
    pub async fn start_with(pki: &Pki, connect_timeout: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, pki.gateway_yaml(connect_timeout) + extra).unwrap();
        let stderr = dir.path().join("stderr");
        let child = Command::new(gateway_bin())
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stderr).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn conlog-gateway");
        let mut gateway = Self {
            child: Some(child),
            stderr,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = gateway.log();
            if let Some(line) = text.lines().find(|l| l.contains("conlog-gateway ready")) {
                let at = line.find("tcp=").expect("tcp= in the ready line") + 4;
                gateway.address = line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .expect("an address");
                return gateway;
            }
            if let Some(status) = gateway.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("conlog-gateway exited ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "gateway not ready:\n{text}");
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL, as a crash or a lost pod would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
