#!/usr/bin/env bash
# Builds the tiny guest of tests/external/qemu_guest.rs into OUT_DIR:
#   OUT_DIR/vmlinuz         Debian's cloud kernel (linux-image-*-cloud-amd64), about 14 MB
#   OUT_DIR/busybox         the static busybox of Debian's busybox-static
#   OUT_DIR/initramfs.gz    that busybox + tests/qemu/init as /init (cpio newc, gzip), about 1 MB
#   OUT_DIR/stamp           recipe hash, then the kernel's and busybox's package versions
#
# Cached: a kernel and a busybox already in OUT_DIR are kept (whatever their versions), and the
# initramfs is only rebuilt when this script, tests/qemu/init or RECIPE changes. A second run with
# everything in place does no network access and takes a few milliseconds. Concurrent runs on the
# same OUT_DIR wait for each other (flock).
#
# Needs only what every Debian has (apt-get, dpkg-deb, tar, gzip, flock) and Debian's package
# registry: the kernel and busybox come as .deb files fetched with `apt-get download` and unpacked
# here, never installed. When apt has no lists yet (or the listed kernel is gone from the
# mirror), the script runs `apt-get update` once if it is root, and otherwise says to run it.
# Running the guest needs QEMU: `apt-get install qemu-system-x86` (the test checks for it).
#
# Usage: tests/qemu/build-guest.sh OUT_DIR
set -euo pipefail

# Bump when the layout of OUT_DIR or the way the initramfs is made changes.
RECIPE=1
KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PACKAGE=busybox-static

here="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
out="$(cd "$1" && pwd)"

exec 9>"$out/.lock"
flock 9
rm -rf "$out"/.work.* # left by a run that was killed

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb tar gzip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (this script needs a Debian-like system)"
done

recipe_hash="$(cat "$here/build-guest.sh" "$here/init" | sha256sum | cut -c1-16)"
want_stamp="recipe=$RECIPE-$recipe_hash"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] && [ -f "$out/stamp" ] \
  && [ "$(head -n1 "$out/stamp")" = "$want_stamp" ]; then
  exit 0
fi

apt_opts=(-q)
# As root, apt drops privileges to _apt for downloads, which cannot write into a private
# temporary directory: download as root instead (no warning, same files).
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

# Runs `apt-get update` once, as root; otherwise says to. Fails if it already ran.
updated=no
apt_update() {
  [ "$updated" = no ] || return 1
  if [ "$(id -u)" -ne 0 ]; then
    die "apt cannot find $1; run 'apt-get update' as root (or run this script as root) and retry"
  fi
  log "apt-get update (apt could not find $1)"
  apt-get update -qq >&2 || die "apt-get update failed"
  updated=yes
}

# Prints the name of the package that meta-package $1 depends on (e.g. the versioned kernel).
resolve() {
  apt-cache depends "$1" 2>/dev/null | awk '$1 == "Depends:" { print $2; exit }' || true
}

# Downloads meta-package $1's dependency (with $1 = "=NAME": package NAME itself) into the
# current directory, updating the lists once if apt cannot find it (missing or stale lists:
# the mirror keeps only the newest kernel); sets $fetched to the .deb's path and $fetched_name.
fetch() {
  local name
  while :; do
    case "$1" in
      =*) name="${1#=}" ;;
      *) name="$(resolve "$1")" ;;
    esac
    if [ -n "$name" ] && log "downloading $name" && apt-get "${apt_opts[@]}" download "$name" >&2
    then
      break
    fi
    apt_update "${name:-$1}" || die "cannot download ${name:-a package for $1}"
  done
  fetched="$(ls -1 ./"$name"_*.deb | head -n1)"
  fetched_name="$name"
}

work="$(mktemp -d "$out/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

# Both parts are kept once there, whatever their versions (the test does not care), so CI and
# developers need the registry only to fill the cache.
if ! { [ -s "$out/vmlinuz" ] && [ -f "$out/vmlinuz.package" ]; }; then
  fetch "$KERNEL_META"
  dpkg-deb --fsys-tarfile "$fetched" | tar -x --wildcards './boot/vmlinuz-*'
  image="$(ls -1 boot/vmlinuz-* | head -n1)"
  [ -s "$image" ] || die "$fetched has no boot/vmlinuz-*"
  mv "$image" "$out/vmlinuz.tmp"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  echo "$fetched_name $(dpkg-deb -f "$fetched" Version)" >"$out/vmlinuz.package"
  rm -f "$fetched"
fi
if ! { [ -s "$out/busybox" ] && [ -f "$out/busybox.package" ]; }; then
  fetch "=$BUSYBOX_PACKAGE"
  dpkg-deb --fsys-tarfile "$fetched" | tar -x ./bin/busybox
  [ -s bin/busybox ] || die "$fetched has no bin/busybox"
  mv bin/busybox "$out/busybox.tmp"
  mv "$out/busybox.tmp" "$out/busybox"
  echo "$fetched_name $(dpkg-deb -f "$fetched" Version)" >"$out/busybox.package"
  rm -f "$fetched"
fi

# The initramfs: busybox, /init and empty mount points; busybox's own cpio makes the archive
# (no host cpio needed), -R 0:0 makes every file root's in the guest.
mkdir -p root/bin root/sbin root/usr/bin root/usr/sbin root/proc root/sys root/dev root/tmp
install -m 0755 "$out/busybox" root/bin/busybox
install -m 0755 "$here/init" root/init
(cd root && find . -mindepth 1 | LC_ALL=C sort \
  | ./bin/busybox cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 >"$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"

{
  echo "$want_stamp"
  echo "kernel=$(cat "$out/vmlinuz.package")"
  echo "busybox=$(cat "$out/busybox.package")"
} >"$out/stamp"
log "guest ready in $out: $(tail -n +2 "$out/stamp" | tr '\n' ' ')"
