#!/bin/sh
# Installs conlog on a host run by systemd: the two binaries, their man pages and shell
# completions (generated from the binaries' own command-line definitions, so they always match),
# the systemd unit and the tmpfiles.d entry.
#
#   cargo build --release --bins && sudo deploy/install.sh target/release
#
# BIN_DIR (first argument, default target/release) holds conlogd and conlogctl. PREFIX
# (default /usr/local) and DESTDIR (default empty: the live system) place everything, as in
# make install; with a DESTDIR nothing outside it is touched and systemd is not called.
set -eu
cd "$(dirname "$0")/.."
bin_dir=${1:-target/release}
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}
for bin in conlogd conlogctl; do
  [ -x "$bin_dir/$bin" ] || { echo "install.sh: no $bin_dir/$bin (build it first)" >&2; exit 1; }
done

install -d "$dest$prefix/bin" "$dest$prefix/share/man/man1" \
  "$dest$prefix/share/bash-completion/completions" "$dest$prefix/share/zsh/site-functions" \
  "$dest$prefix/share/fish/vendor_completions.d" "$dest/etc/systemd/system" "$dest/etc/tmpfiles.d"
install -m 0755 "$bin_dir/conlogd" "$bin_dir/conlogctl" "$dest$prefix/bin/"
for bin in conlogd conlogctl; do
  "$bin_dir/$bin" man "$dest$prefix/share/man/man1"
  "$bin_dir/$bin" completions bash >"$dest$prefix/share/bash-completion/completions/$bin"
  "$bin_dir/$bin" completions zsh >"$dest$prefix/share/zsh/site-functions/_$bin"
  "$bin_dir/$bin" completions fish >"$dest$prefix/share/fish/vendor_completions.d/$bin.fish"
done
chmod 0644 "$dest$prefix"/share/man/man1/conlog*.1
# The unit starts $prefix/bin/conlogd.
sed "s|/usr/local/bin/|$prefix/bin/|g" deploy/systemd/conlogd.service \
  >"$dest/etc/systemd/system/conlogd.service"
install -m 0644 deploy/systemd/conlog.conf "$dest/etc/tmpfiles.d/conlog.conf"
if [ -z "$dest" ]; then
  systemd-tmpfiles --create conlog.conf
  systemctl daemon-reload
  echo "installed; start with: systemctl enable --now conlogd"
fi
