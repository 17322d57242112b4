#!/usr/bin/env bash
# make demo: one site, one VM with two disks, on this machine, in a temporary folder.
# siterepd exposes the disks through FUSE; we put ext4 on one of them through a loop
# device, write files, look at `siterep status`, stop cleanly and look at the change log.
# Everything it made (mounts, loop device, daemon, folder) is removed on any exit.
# Usage: bash tools/demo.sh [BIN_DIR]   (default: build/bin next to this script)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
for tool in siterepd siterep siterep-log; do
  [[ -x $BIN/$tool ]] || { echo "demo: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (FUSE mount, loop device)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/siterep-demo.XXXXXX)
DAEMON_PID="" LOOP="" FS_MOUNTED=0
BOLD="" DIM="" PLAIN=""
if [[ -t 1 ]]; then BOLD=$'\033[1m' DIM=$'\033[2m' PLAIN=$'\033[0m'; fi
n=0
step() {
  n=$((n + 1))
  printf '\n%s[%d] %s%s\n' "$BOLD" "$n" "$*" "$PLAIN"
}
show() {
  printf '%s$ %s%s\n' "$DIM" "$*" "$PLAIN"
  "$@"
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [[ $FS_MOUNTED -eq 1 ]] && { umount "$DIR/fs" || umount -l "$DIR/fs"; }
  [[ -n $LOOP ]] && losetup -d "$LOOP"
  if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"
    wait "$DAEMON_PID"
  fi
  if findmnt -rn --mountpoint "$DIR/mnt" >/dev/null 2>&1; then
    fusermount3 -u "$DIR/mnt" || fusermount3 -uz "$DIR/mnt"
  fi
  if findmnt -rn -o TARGET | grep -q "^$DIR/"; then
    echo "demo: something is still mounted under $DIR; leaving it" >&2
  else
    rm -rf "$DIR"
  fi
  if [[ $rc -ne 0 ]]; then
    echo "demo: failed (exit $rc)" >&2
    [[ -s $DIR/siterepd.log ]] && tail -n 20 "$DIR/siterepd.log" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "A site config with one VM (web01) of two disks, in $DIR"
truncate -s 256M "$DIR/web01-os.img" "$DIR/web01-data.img"
cat >"$DIR/site.toml" <<TOML
[site]
name = "east"
state_dir = "$DIR/state"
mountpoint = "$DIR/mnt"
control_socket = "$DIR/control.sock"

[[vms]]
name = "web01"
frequency = "continuous"
log_budget = "50%"
tracking = "log"
  [[vms.disks]]
  name = "os"
  image = "$DIR/web01-os.img"
  [[vms.disks]]
  name = "data"
  image = "$DIR/web01-data.img"
TOML
sed 's/^/    /' "$DIR/site.toml"

step "Start siterepd (log: $DIR/siterepd.log)"
"$BIN/siterepd" -c "$DIR/site.toml" 2>"$DIR/siterepd.log" &
DAEMON_PID=$!
for _ in $(seq 1 100); do
  "$BIN/siterep" -c "$DIR/site.toml" status >/dev/null 2>&1 && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { echo "demo: siterepd exited" >&2; DAEMON_PID=""; exit 1; }
  sleep 0.1
done
"$BIN/siterep" -c "$DIR/site.toml" status >/dev/null || { echo "demo: siterepd did not come up" >&2; exit 1; }
show ls -l "$DIR/mnt/web01"

step "ext4 on the 'data' disk through a loop device"
LOOP=$(losetup --find --show "$DIR/mnt/web01/data")
echo "    $LOOP -> $DIR/mnt/web01/data"
mkfs.ext4 -q -F "$LOOP"
mkdir -p "$DIR/fs"
mount "$LOOP" "$DIR/fs"
FS_MOUNTED=1

step "Write a few files"
for i in 1 2 3; do
  head -c $((i * 3 << 20)) /dev/urandom >"$DIR/fs/file$i.bin"
done
echo "hello from web01" >"$DIR/fs/hello.txt"
(cd "$DIR/fs" && sha256sum file*.bin hello.txt) >"$DIR/sums"
sync -f "$DIR/fs/hello.txt"
show ls -l "$DIR/fs"
sleep 1.5   # let a replication cycle end, so the status shows a cut

step "siterep status"
show "$BIN/siterep" -c "$DIR/site.toml" status

step "A glance at siterep status --json"
"$BIN/siterep" -c "$DIR/site.toml" status --json | head -n 30
echo "    ..."

step "Unmount, detach the loop device, stop siterepd (SIGTERM)"
umount "$DIR/fs"
FS_MOUNTED=0
losetup -d "$LOOP"
LOOP=""
kill -TERM "$DAEMON_PID"
rc=0
wait "$DAEMON_PID" || rc=$?
DAEMON_PID=""
echo "    siterepd exited with $rc"
[[ $rc -eq 0 ]] || exit 1

step "The change log of the 'data' disk (next to its image)"
show ls -l "$DIR/web01-data.img.srlog"
printf '%s$ %s%s\n' "$DIM" "siterep-log dump $DIR/web01-data.img.srlog | head -n 12" "$PLAIN"
"$BIN/siterep-log" dump "$DIR/web01-data.img.srlog" | head -n 12 || true
show "$BIN/siterep-log" check "$DIR/web01-data.img.srlog"

step "Done; cleaning up $DIR"
