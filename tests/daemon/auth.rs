//! Who may do what over TCP: every `Console` RPC against every kind of credential, with the
//! exact status code; the token key's life (0600, restarts, rotation); `IssueToken`'s
//! validation; and the local socket's peer logging.

use crate::support;

use conlog::proto::{self, attach::Mode, Access};
use conlog::tokens::{self, Grant, TokenKey};
use std::os::unix::fs::PermissionsExt;
use std::time::{SystemTime, UNIX_EPOCH};
use support::*;
use tonic::Code;

const GUEST: &str = "vm1";
const DEVICE: &str = "serial0";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The credentials of the matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Credential {
    None,
    Garbage,
    BadSignature,
    Expired,
    WrongGuest,
    WrongDevice,
    Read,
    ReadWrite,
}

/// The RPCs of the matrix.
#[derive(Clone, Copy, Debug)]
enum Call {
    AttachReadOnly,
    AttachReadWrite,
    AttachForce,
    WatchReadOnly,
    WatchReadWrite,
    SendInput,
    ReadHistory,
}

impl Call {
    fn writes(self) -> bool {
        matches!(
            self,
            Call::AttachReadWrite | Call::AttachForce | Call::WatchReadWrite | Call::SendInput
        )
    }
}

/// What the daemon must answer.
fn expected(credential: Credential, call: Call) -> Code {
    match credential {
        Credential::None | Credential::Garbage | Credential::BadSignature | Credential::Expired => {
            Code::Unauthenticated
        }
        Credential::WrongGuest | Credential::WrongDevice => Code::PermissionDenied,
        Credential::Read if call.writes() => Code::PermissionDenied,
        Credential::Read | Credential::ReadWrite => Code::Ok,
    }
}

/// A grant signed with the daemon's own key (read from its state directory) or another one.
fn signed(key: &TokenKey, expires_unix: u64) -> String {
    key.issue(Grant {
        guest: GUEST.into(),
        device: None,
        access: tokens::Access::ReadWrite,
        expires_unix,
        key_id: String::new(),
        issued_unix: None,
        node: None,
    })
}

async fn token_for(daemon: &Daemon, credential: Credential) -> Option<String> {
    let own_key = || TokenKey::load_or_create(&daemon.data_dir().join("state/token.key")).unwrap();
    Some(match credential {
        Credential::None => return None,
        Credential::Garbage => "not-a-token".into(),
        Credential::BadSignature => {
            let other = tempfile::tempdir().unwrap();
            signed(
                &TokenKey::load_or_create(&other.path().join("token.key")).unwrap(),
                now() + 600,
            )
        }
        Credential::Expired => signed(&own_key(), now() - 10),
        Credential::WrongGuest => daemon.token("vm2", "", Access::ReadWrite, 600).await,
        Credential::WrongDevice => daemon.token(GUEST, "serial1", Access::ReadWrite, 600).await,
        Credential::Read => daemon.token(GUEST, DEVICE, Access::Read, 600).await,
        Credential::ReadWrite => daemon.token(GUEST, "", Access::ReadWrite, 600).await,
    })
}

/// Makes `call` over TCP with `token`; the status code it got (`Ok` on success).
async fn attempt(daemon: &Daemon, call: Call, token: Option<&str>) -> Code {
    let channel = match token {
        Some(token) => with_token(daemon.plain_tcp_channel().await, token),
        None => tonic::service::interceptor::InterceptedService::new(
            daemon.plain_tcp_channel().await,
            Bearer(None),
        ),
    };
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match call {
        Call::AttachReadOnly | Call::AttachReadWrite | Call::AttachForce => {
            let mut request = attach(
                GUEST,
                if matches!(call, Call::AttachReadOnly) {
                    Mode::ReadOnly
                } else {
                    Mode::ReadWrite
                },
            );
            request.force = matches!(call, Call::AttachForce);
            code(Session::attach(channel, request).await.map(drop))
        }
        Call::WatchReadOnly | Call::WatchReadWrite => {
            let mode = if matches!(call, Call::WatchReadOnly) {
                Mode::ReadOnly
            } else {
                Mode::ReadWrite
            };
            code(watch(channel, watch_request(GUEST, mode)).await.map(drop))
        }
        Call::SendInput => {
            // The session belongs to a trusted local writer; the remote caller knows its id.
            let mut request = watch_request(GUEST, Mode::ReadWrite);
            request.force = true;
            let session = watch(local_channel(daemon).await, request).await.unwrap();
            let result = send_input(channel, &session.attached.session_id, b"x").await;
            code(result.map(drop))
        }
        Call::ReadHistory => {
            let request = proto::ReadHistoryRequest {
                guest: GUEST.into(),
                stream: DEVICE.into(),
                ..Default::default()
            };
            let result = async {
                let mut stream = channel.console().read_history(request).await?.into_inner();
                stream.message().await.map(drop)
            }
            .await;
            code(result)
        }
    }
}

/// Every `Console` RPC × every credential over TCP gives exactly the expected code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(b"login: ").await;
    wait_offset(&mut agent, GUEST, DEVICE, 7).await;
    create_console(&mut agent, GUEST, "serial1", None)
        .await
        .unwrap();
    open_console(&mut agent, "vm2").await;

    let credentials = [
        Credential::None,
        Credential::Garbage,
        Credential::BadSignature,
        Credential::Expired,
        Credential::WrongGuest,
        Credential::WrongDevice,
        Credential::Read,
        Credential::ReadWrite,
    ];
    let calls = [
        Call::AttachReadOnly,
        Call::AttachReadWrite,
        Call::AttachForce,
        Call::WatchReadOnly,
        Call::WatchReadWrite,
        Call::SendInput,
        Call::ReadHistory,
    ];
    let mut wrong = Vec::new();
    for credential in credentials {
        let token = token_for(&daemon, credential).await;
        for call in calls {
            let got = attempt(&daemon, call, token.as_deref()).await;
            let want = expected(credential, call);
            if got != want {
                wrong.push(format!(
                    "{credential:?} × {call:?}: got {got:?}, want {want:?}"
                ));
            }
            // Every client of the attempt is gone before the next one (the writer lease too).
            wait_clients(&mut agent, GUEST, DEVICE, 0).await;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Input from the read-write runs reached the guest; none from the refused ones could have,
    // and exactly one byte per accepted SendConsoleInput arrived.
    assert_eq!(guest.wait_len(1).await, b"x");

    // A malformed header is refused like a missing one.
    let mut request = tonic::Request::new(proto::ReadHistoryRequest {
        guest: GUEST.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let status = daemon
        .plain_tcp_channel()
        .await
        .console()
        .read_history(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("Bearer"), "{status:?}");
}

/// A valid token does not open the Agent service over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_unreachable_over_tcp_even_with_a_token() {
    let daemon = Daemon::start().await;
    let token = daemon.token(GUEST, "", Access::ReadWrite, 600).await;
    let mut agent = conlog::proto::agent_client::AgentClient::new(with_token(
        daemon.plain_tcp_channel().await,
        &token,
    ));
    let status = agent
        .issue_token(proto::IssueTokenRequest {
            guest: GUEST.into(),
            access: Access::ReadWrite.into(),
            ttl_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = agent
        .rotate_token_key(proto::RotateTokenKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

async fn read_history_code(daemon: &Daemon, token: &str) -> Code {
    attempt(daemon, Call::ReadHistory, Some(token)).await
}

/// The key is created 0600, survives restarts (and a mode that was too open is tightened);
/// `conlogctl rotate-token-key` revokes every token at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_key_survives_restarts_and_rotation_revokes() {
    let mut daemon = Daemon::start().await;
    let key_path = daemon.data_dir().join("state/token.key");
    let mode = || std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(), 0o600);
    let mut agent = daemon.agent().await;
    open_console(&mut agent, GUEST).await;
    let token = daemon.token(GUEST, "", Access::Read, 600).await;
    assert_eq!(read_history_code(&daemon, &token).await, Code::Ok);

    daemon.stop().await;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    daemon.restart().await;
    assert_eq!(mode(), 0o600, "the key's mode was not tightened");
    assert_eq!(read_history_code(&daemon, &token).await, Code::Ok);

    let output = std::process::Command::new(conlogctl_bin())
        .arg("--socket")
        .arg(daemon.socket())
        .arg("rotate-token-key")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("revoked"),
        "{}",
        describe(&output)
    );
    assert_eq!(mode(), 0o600);
    assert_eq!(
        read_history_code(&daemon, &token).await,
        Code::Unauthenticated
    );
    let fresh = daemon.token(GUEST, "", Access::Read, 600).await;
    assert_eq!(read_history_code(&daemon, &fresh).await, Code::Ok);
    daemon.stop().await;
    daemon.restart().await;
    assert_eq!(read_history_code(&daemon, &fresh).await, Code::Ok);
    assert_eq!(
        read_history_code(&daemon, &token).await,
        Code::Unauthenticated
    );
}

/// `IssueToken` refuses what it cannot sign faithfully; `conlogctl token` prints a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_token_validates_its_request() {
    let daemon = Daemon::start_with(Some("tokens:\n  max_ttl: 1h\n"), &[]).await;
    let mut agent = daemon.agent().await;
    let request = |guest: &str, device: &str, access: i32, ttl_seconds| proto::IssueTokenRequest {
        guest: guest.into(),
        device: device.into(),
        access,
        ttl_seconds,
    };
    let rw = Access::ReadWrite as i32;
    for (request, needle) in [
        (request("../x", "", rw, 60), "name"),
        (request("", "", rw, 60), "name"),
        (request(GUEST, "Bad", rw, 60), "name"),
        (request(GUEST, "", 0, 60), "access"),
        (request(GUEST, "", 9, 60), "access"),
        (request(GUEST, "", rw, 0), "ttl_seconds"),
        (request(GUEST, "", rw, 3601), "tokens.max_ttl"),
    ] {
        let what = format!("{request:?}");
        let status = agent.issue_token(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().to_lowercase().contains(needle),
            "{what}: {status:?}"
        );
    }
    let reply = agent
        .issue_token(request(GUEST, "", rw, 3600))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.expires_at_unix >= now() + 3590, "{reply:?}");

    let output = std::process::Command::new(conlogctl_bin())
        .arg("--socket")
        .arg(daemon.socket())
        .args(["token", GUEST, "--access", "read-write", "--ttl", "10m"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let token = String::from_utf8(output.stdout).unwrap();
    assert!(token.trim().starts_with("conlog1."), "{token:?}");
    open_console(&mut agent, GUEST).await;
    assert_eq!(
        attempt(&daemon, Call::AttachReadWrite, Some(token.trim())).await,
        Code::Ok
    );
}

/// Every Agent call is logged with the caller's pid, uid and gid (SO_PEERCRED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_calls_log_the_peer() {
    let daemon = Daemon::start().await;
    daemon.token(GUEST, "", Access::Read, 60).await;
    let pid = format!("peer_pid={}", std::process::id());
    let uid = format!("peer_uid={}", rustix::process::getuid().as_raw());
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let stderr = daemon.stderr();
        let logged = stderr
            .lines()
            .any(|l| l.contains("IssueToken") && l.contains(&pid) && l.contains(&uid));
        if logged {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no IssueToken line with {pid} {uid}:\n{stderr}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A rotation revokes calls in progress too: remote streams end with `UNAUTHENTICATED`;
/// local clients (no token) carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_ends_remote_calls_in_progress() {
    let daemon = Daemon::start().await;
    let mut agent = daemon.agent().await;
    let reply = open_console(&mut agent, GUEST).await;
    let mut guest = FakeGuest::connect(&reply.guest_socket).await;
    guest.write(b"boot\n").await;
    wait_offset(&mut agent, GUEST, DEVICE, 5).await;

    let mut remote = Session::attach(
        daemon.tcp_channel(GUEST).await,
        attach(GUEST, Mode::ReadOnly),
    )
    .await
    .unwrap();
    let mut follower = daemon
        .tcp_channel(GUEST)
        .await
        .console()
        .read_history(proto::ReadHistoryRequest {
            guest: GUEST.into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    follower.message().await.unwrap().expect("the logged bytes");
    let mut local = Session::attach(local_channel(&daemon).await, attach(GUEST, Mode::ReadOnly))
        .await
        .unwrap();

    agent
        .rotate_token_key(proto::RotateTokenKeyRequest {})
        .await
        .unwrap();
    let status = remote.wait_end().await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = loop {
        match follower.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the follower ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    guest.write(b"after\n").await;
    local.wait_output(b"after\n").await;
}
