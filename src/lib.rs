//! conlog: keeps every byte a virtual machine prints, in size-capped logs, and serves it live.
//!
//! The daemon (`conlogd`) is assembled in [`daemon`]; each other module owns one concern and
//! says in its doc what it must never do. The only module allowed raw-descriptor `unsafe` code
//! would opt back in explicitly; today none needs it (descriptors go through `rustix`).

pub mod client;
pub mod config;
pub mod console;
pub mod daemon;
pub mod error;
pub mod fault;
pub mod guests;
pub mod handoff;
pub mod history;
pub mod ids;
pub mod keeper;
pub mod log_owner;
pub mod logfile;
pub mod metrics;
pub mod names;
pub mod pipe;
pub mod ratelimit;
pub mod server;
pub mod terminal_safety;
pub mod tls;
pub mod tokens;
pub mod upgrade;

/// Generated protobuf types and gRPC stubs of `conlog.v1`, and the descriptor sets served by
/// reflection.
pub mod proto {
    tonic::include_proto!("conlog.v1");

    /// Every file of the API (local socket reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/conlog_descriptor.bin"));
    /// The API without `agent.proto` (TCP reflection: the Agent service is not discoverable).
    pub const CONSOLE_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/conlog_console_descriptor.bin"));
}
