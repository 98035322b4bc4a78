//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes two descriptor sets
//! for server reflection: the full API for the local socket, and one without `agent.proto` for
//! TCP, so that the Agent service cannot even be discovered there.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/conlog/v1/common.proto",
        "proto/conlog/v1/agent.proto",
        "proto/conlog/v1/console.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let full = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("conlog_descriptor.bin"), full.encode_to_vec())?;

    let mut console_only = full.clone();
    console_only
        .file
        .retain(|f| f.name() != "conlog/v1/agent.proto");
    std::fs::write(
        out_dir.join("conlog_console_descriptor.bin"),
        console_only.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: a chunk of console output is shared by every
        // client it goes to (a reference count each), not copied per client before encoding.
        .bytes(".")
        .build_server(true)
        .build_client(true)
        .compile_fds(full)?;
    Ok(())
}
