//! The plaintext health listener (config `health`) against the real `conlogd`: it answers
//! `grpc.health.v1` in plaintext beside a TCP listener that requires TLS (which the kubelet's
//! gRPC probes cannot speak), offers nothing else (no `Console`, no `Agent`, no reflection),
//! needs no `insecure` on a non-loopback address, keeps a connection budget of its own, and is
//! carried across in-place upgrades and a takeover, following the config when it changes.
//!
//! Nothing is reached anywhere but on loopback: a listener bound to `0.0.0.0` is dialled at
//! `127.0.0.1`.

use crate::support;
use crate::upgrade_common;

use conlog::proto::{self, agent_client::AgentClient, Access};
use futures::stream;
use rustix::process::Signal;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use upgrade_common::*;

const SERVING: i32 = ServingStatus::Serving as i32;

/// The health listener's address in the last ready line of `text`, dialable (an unspecified
/// address becomes loopback); `None` when the line says `health=off`.
fn health_address(text: &str) -> Option<SocketAddr> {
    let line = ready_lines(text)
        .pop()
        .unwrap_or_else(|| panic!("no ready line in:\n{text}"));
    let value: String = field(&line, "health=").unwrap_or_else(|| panic!("no health= in {line}"));
    if value == "off" {
        return None;
    }
    let mut address: SocketAddr = value.parse().expect("health= is an address");
    if address.ip().is_unspecified() {
        address.set_ip([127, 0, 0, 1].into());
    }
    Some(address)
}

/// A plaintext channel to `address`, connected.
async fn channel(address: SocketAddr) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{address}"))
        .expect("valid URI")
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE)
        .connect()
        .await
        .map_err(|e| format!("connect to {address}: {e:?}"))
}

/// `Health.Check(service)` on a new plaintext connection: the status, or why it failed.
async fn check(address: SocketAddr, service: &str) -> Result<i32, String> {
    let mut client = HealthClient::new(channel(address).await?);
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{s:?}"))
}

/// Panics unless `address` answers SERVING for the whole server and for the Console service.
async fn assert_serving(address: SocketAddr, what: &str) {
    for service in ["", "conlog.v1.Console"] {
        assert_eq!(
            check(address, service).await,
            Ok(SERVING),
            "{what}: health of {service:?} at {address}"
        );
    }
}

/// The status that `ServerReflectionInfo` listing services at `$address` ends with, in the
/// reflection API `$version` (`v1` or `v1alpha`: the same calls in two generated modules, hence
/// a macro). Panics if it answers.
macro_rules! reflection_status {
    ($version:ident, $address:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new(channel($address).await.unwrap());
        match client.server_reflection_info(stream::iter([request])).await {
            Err(status) => status.code(),
            Ok(response) => match response.into_inner().message().await {
                Err(status) => status.code(),
                Ok(message) => panic!("reflection {} answered: {message:?}", stringify!($version)),
            },
        }
    }};
}

/// A config file of this test's own, passed with `--config` (so it can be rewritten between
/// upgrades).
struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(yaml: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("conlog-health-")
            .tempdir()
            .expect("temporary directory");
        let path = dir.path().join("conlogd.yaml");
        let file = Self { dir, path };
        file.write(yaml);
        file
    }

    fn write(&self, yaml: &str) {
        std::fs::write(&self.path, yaml).expect("write the config file");
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 temporary path")
    }
}

/// With TLS on the TCP listener and `health: 0.0.0.0:0` (no `insecure`), a plaintext client
/// gets SERVING from the health listener, whereas the TCP listener needs TLS. On the health
/// listener, `Console` (even with a valid token), `Agent` and both reflection services are
/// UNIMPLEMENTED, and an unknown health service is NOT_FOUND. Its connections have a budget of
/// their own (`limits.tcp_connections` each): held console connections do not fail it, and
/// connections over its own budget are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_listener_serves_only_health_in_plaintext_beside_tls() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .expect("self-signed certificate");
    let config = ConfigFile::new("");
    let cert = config.dir().join("tls.crt");
    let key = config.dir().join("tls.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    config.write(&format!(
        "health: 0.0.0.0:0\ntls:\n  cert: {}\n  key: {}\nlimits:\n  tcp_connections: 3\n",
        cert.display(),
        key.display()
    ));
    let daemon = Daemon::start_with(None, &["--config", config.arg()]).await;
    let ready = ready_lines(&daemon.stderr()).pop().unwrap();
    assert!(ready.contains("tls=on"), "{ready}");
    assert!(ready.contains("health=0.0.0.0:"), "{ready}");
    assert!(
        !daemon.stderr().contains("insecure"),
        "a non-loopback health listener needs no insecure: {}",
        daemon.stderr()
    );
    let health = health_address(&daemon.stderr()).expect("health listener on");

    assert_serving(health, "plaintext health listener").await;
    assert!(
        check(daemon.tcp, "").await.is_err(),
        "the TCP listener requires TLS, so a plaintext probe fails there"
    );
    let unknown = HealthClient::new(channel(health).await.unwrap())
        .check(HealthCheckRequest {
            service: "conlog.v1.Agent".into(),
        })
        .await
        .expect_err("the Agent service is no health service there");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Nothing but health: a valid token makes no difference.
    let token = daemon.token("vm1", "", Access::ReadWrite, 600).await;
    let mut console = with_token(channel(health).await.unwrap(), &token).console();
    let status = console
        .read_history(proto::ReadHistoryRequest {
            guest: "vm1".into(),
            ..Default::default()
        })
        .await
        .expect_err("no Console service on the health listener");
    assert_eq!(status.code(), Code::Unimplemented, "Console: {status:?}");
    drop(console);
    let status = AgentClient::new(channel(health).await.unwrap())
        .list_guests(proto::ListGuestsRequest::default())
        .await
        .expect_err("no Agent service on the health listener");
    assert_eq!(status.code(), Code::Unimplemented, "Agent: {status:?}");
    assert_eq!(
        reflection_status!(v1, health),
        Code::Unimplemented,
        "reflection v1"
    );
    assert_eq!(
        reflection_status!(v1alpha, health),
        Code::Unimplemented,
        "reflection v1alpha"
    );

    // The TCP listener's three places taken by connections that never finish a TLS handshake:
    // the probe still gets through.
    let held_tcp = hold(daemon.tcp, 3, false).await;
    assert_serving(health, "with every TCP place taken").await;
    // The health listener's own three places taken: the next connection is closed at accept, and
    // a place given back serves again.
    let mut held_health = hold(health, 3, true).await;
    let over = check(health, "").await;
    assert!(
        over.is_err(),
        "a connection over the health listener's budget is served: {over:?}"
    );
    held_health.pop();
    let deadline = Instant::now() + DEADLINE;
    while check(health, "").await != Ok(SERVING) {
        assert!(
            Instant::now() < deadline,
            "a place given back is never reused"
        );
        tokio::time::sleep(POLL).await;
    }
    drop((held_tcp, held_health));
    let mut daemon = daemon;
    assert!(daemon.stop().await.success(), "{}", daemon.stderr());
}

/// `count` idle connections to `address` that the daemon kept (a connection closed at accept,
/// because a place was still held by one that is ending, is replaced): each holds one place
/// under `limits.tcp_connections`. A refused connection reads end of stream. A kept one greets
/// with HTTP/2 settings when `greets` (plaintext gRPC; anything else is retried), or stays
/// silent (TLS waits for the client's hello).
async fn hold(address: SocketAddr, count: usize, greets: bool) -> Vec<TcpStream> {
    tokio::task::spawn_blocking(move || {
        use std::io::{ErrorKind, Read};
        let deadline = Instant::now() + DEADLINE;
        let mut held = Vec::new();
        while held.len() < count {
            assert!(
                Instant::now() < deadline,
                "{address} keeps closing new connections"
            );
            let mut stream = TcpStream::connect(address).expect("connect");
            let wait = if greets {
                DEADLINE
            } else {
                Duration::from_millis(500)
            };
            stream.set_read_timeout(Some(wait)).unwrap();
            match stream.read(&mut [0u8; 256]) {
                Ok(0) => std::thread::sleep(POLL),
                Ok(_) if greets => held.push(stream),
                Err(e)
                    if !greets
                        && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    held.push(stream)
                }
                _ => std::thread::sleep(POLL),
            }
        }
        held
    })
    .await
    .expect("hold task")
}

const UPGRADES: usize = 3;

/// The health listener is carried: three in-place upgrades (SIGUSR1) keep its port (the config
/// says port 0, so a new socket would get another) without refusing a connection meanwhile,
/// and it answers SERVING after each. It follows the config at an upgrade: `health: null`
/// closes it, and turning it on again binds one, as a roll from an image without the key
/// does. A takeover hands it to the successor, which answers on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_listener_survives_upgrades_and_a_takeover() {
    let config = ConfigFile::new("health: 127.0.0.1:0\n");
    let mut daemon = Daemon::start_with(None, &["--config", config.arg()]).await;
    let pid = daemon.pid();
    let health = health_address(&daemon.stderr()).expect("health listener on");
    assert_serving(health, "before the upgrades").await;

    let probe = ConnectProbe::start(vec![Target::Tcp(health)]);
    let mut readies = 1;
    for n in 1..=UPGRADES {
        daemon.signal(Signal::USR1);
        readies += 1;
        let ready = wait_ready_count(&format!("upgrade {n}"), readies, || daemon.stderr()).await;
        assert_eq!(field::<u32>(&ready, "pid="), Some(pid), "{ready}");
        assert_eq!(
            health_address(&daemon.stderr()),
            Some(health),
            "upgrade {n}: the health listener was not carried: {ready}"
        );
        probe.wait_more(3).await;
        assert_serving(health, &format!("after upgrade {n}")).await;
    }
    let (connects, refused) = probe.finish().await;
    assert!(
        refused.is_empty(),
        "connections refused during the upgrades ({connects} succeeded): {refused:#?}"
    );

    // Off at an upgrade: closed.
    config.write("health: null\n");
    daemon.signal(Signal::USR1);
    readies += 1;
    wait_ready_count("upgrade to health: null", readies, || daemon.stderr()).await;
    assert_eq!(health_address(&daemon.stderr()), None);
    assert!(
        TcpStream::connect(health).is_err(),
        "the health listener stays open after health: null"
    );
    // On again: bound by the upgraded image, as after a roll from an image without the key.
    config.write("health: 127.0.0.1:0\n");
    daemon.signal(Signal::USR1);
    readies += 1;
    wait_ready_count("upgrade to health on", readies, || daemon.stderr()).await;
    let health = health_address(&daemon.stderr()).expect("health listener bound at the upgrade");
    assert_serving(health, "bound at an upgrade").await;

    // A takeover carries it to the successor.
    let probe = ConnectProbe::start(vec![Target::Tcp(health)]);
    let mut successor = Successor::spawn(&daemon, daemon.tcp, daemon.metrics);
    let ready = successor.wait_ready().await;
    successor.assert_took_over();
    assert_eq!(
        field::<u32>(&ready, "pid="),
        Some(successor.pid()),
        "{ready}"
    );
    assert_eq!(
        health_address(&successor.stderr()),
        Some(health),
        "the successor serves the carried health listener: {ready}"
    );
    let status = daemon.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.all_stderr());
    probe.wait_more(3).await;
    assert_serving(health, "after the takeover").await;
    let (connects, refused) = probe.finish().await;
    assert!(
        refused.is_empty(),
        "connections refused during the takeover ({connects} succeeded): {refused:#?}"
    );
    let diagnostics = daemon.all_stderr() + &successor.stderr();
    for bad in ["cannot bind the health listener", "panicked", "unusable"] {
        assert!(!diagnostics.contains(bad), "{bad:?} in:\n{diagnostics}");
    }
    assert!(successor.stop().await.success(), "{}", successor.stderr());
}
