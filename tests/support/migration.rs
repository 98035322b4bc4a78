//! Live migration in tests (docs/design.md, "Live migration"): nodes that import from each
//! other, and a fake guest printing numbered lines that moves between them as a migration's
//! agents make it move: the destination's agent creates the console with `migrate_from` (a
//! READ token from the source's agent), the source's agent calls `RemoveGuest(moved_to)`, the
//! source's guest connection closes, and a new guest connects on the destination and goes on
//! with the numbering.

use super::{
    bounded, endpoint_of, open_console, wait_guest_connected, Daemon, FakeGuest, Gateway, Pki,
    DEVICE,
};
use conlog::proto::{self, agent_client::AgentClient, Access};
use tonic::transport::Channel;

/// The guest that moves.
pub const MIGRATING_GUEST: &str = "mover";

/// Line `n` the guest prints (`\r\n`, so a terminal shows one per row).
pub fn numbered_line(n: usize) -> String {
    format!("line {n:06}\r\n")
}

/// Lines `0..count`, in order: what a client that saw every byte once has.
pub fn numbered_lines(count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|n| numbered_line(n).into_bytes())
        .collect()
}

/// A random number in `low..high` (move points; tests print them).
pub fn random_between(low: usize, high: usize) -> usize {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).unwrap();
    let span = u64::try_from(high - low).unwrap();
    low + usize::try_from(u64::from_le_bytes(bytes) % span).unwrap()
}

/// `count` nodes (token keys derived from one cluster key) that import from each other
/// (`migration.ca`: the nodes' server CA), and a gateway in front of them.
pub async fn migration_fleet(count: usize) -> (Pki, Vec<Daemon>, Gateway) {
    let pki = Pki::new();
    let extra = format!(
        "migration:\n  ca: {}\n",
        pki.path("server-ca.pem").display()
    );
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(pki.node_with(false, &extra).await);
    }
    let gateway = Gateway::start(&pki, "3s").await;
    (pki, nodes, gateway)
}

/// What a migration's agent needs of a node.
#[derive(Clone)]
pub struct MigrationNode {
    pub agent: AgentClient<Channel>,
    /// Its Console endpoint (`host:port`, its `node.advertise`).
    pub endpoint: String,
}

impl MigrationNode {
    pub async fn of(daemon: &Daemon) -> Self {
        Self {
            agent: daemon.agent().await,
            endpoint: endpoint_of(daemon),
        }
    }
}

/// The console of [`MIGRATING_GUEST`] on `node`, with a fake guest connected.
pub async fn first_migrating_guest(node: &MigrationNode) -> FakeGuest {
    let mut agent = node.agent.clone();
    let created = open_console(&mut agent, MIGRATING_GUEST).await;
    let guest = FakeGuest::connect(&created.guest_socket).await;
    wait_guest_connected(&mut agent, MIGRATING_GUEST, DEVICE, true).await;
    guest
}

/// Something a test does at a switch, after the destination created the console and before
/// the source's agent removes the guest (given the destination).
pub type SwitchHook =
    std::sync::Arc<dyn Fn(MigrationNode) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Moves [`MIGRATING_GUEST`] from `from` to `to` as a live migration's agents do; returns the
/// destination's guest socket.
pub async fn migrate_guest(from: &MigrationNode, to: &MigrationNode) -> String {
    migrate_guest_with(from, to, None).await
}

/// [`migrate_guest`], running `hook` between the destination's create and the source's
/// removal.
pub async fn migrate_guest_with(
    from: &MigrationNode,
    to: &MigrationNode,
    hook: Option<&SwitchHook>,
) -> String {
    let token = bounded(
        "IssueToken",
        from.agent.clone().issue_token(proto::IssueTokenRequest {
            guest: MIGRATING_GUEST.into(),
            device: String::new(),
            access: Access::Read.into(),
            ttl_seconds: 600,
        }),
    )
    .await
    .expect("IssueToken at the source")
    .into_inner()
    .token;
    let created = bounded(
        "CreateConsole with migrate_from",
        to.agent
            .clone()
            .create_console(proto::CreateConsoleRequest {
                guest: MIGRATING_GUEST.into(),
                migrate_from: Some(proto::MigrateFrom {
                    node: from.endpoint.clone(),
                    token,
                    offset: 0,
                }),
                ..Default::default()
            }),
    )
    .await
    .expect("CreateConsole with migrate_from at the destination")
    .into_inner();
    if let Some(hook) = hook {
        hook(to.clone()).await;
    }
    bounded(
        "RemoveGuest moved_to",
        from.agent.clone().remove_guest(proto::RemoveGuestRequest {
            guest: MIGRATING_GUEST.into(),
            moved_to: to.endpoint.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("RemoveGuest moved_to at the source");
    created.guest_socket
}

/// Prints lines `0..lines`, a few milliseconds apart, moving to the next of `nodes` before
/// each line number in `moves_at` (running `hook` at each switch); returns the guest on the
/// last node.
pub fn drive_guest(
    mut guest: FakeGuest,
    nodes: Vec<MigrationNode>,
    moves_at: Vec<usize>,
    lines: usize,
    hook: Option<SwitchHook>,
) -> tokio::task::JoinHandle<FakeGuest> {
    tokio::spawn(async move {
        let mut on = 0;
        for n in 0..lines {
            if moves_at.contains(&n) {
                let socket = migrate_guest_with(&nodes[on], &nodes[on + 1], hook.as_ref()).await;
                drop(guest); // the source's guest connection closes
                on += 1;
                guest = FakeGuest::connect(&socket).await;
            }
            guest.write(numbered_line(n).as_bytes()).await;
            tokio::time::sleep(std::time::Duration::from_millis(4)).await;
        }
        guest
    })
}
