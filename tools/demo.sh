#!/usr/bin/env bash
# make demo: two sites on this machine (east, the primary, and west, the replica), joined
# by mutual TLS on loopback with certificates made by siterep-certs. East protects VM web01
# (two disks), whose 'data' disk already holds an ext4 file system with files. Replication
# to west is enabled: the initial copy runs from a point-in-time snapshot with a progress
# bar; then we mount the file system through a loop device on the protected disk, write
# more files, and watch delta replication in `siterep status` (RPO, bytes pending).
# Then the replica images are compared with the primary's, and the recovery points at
# west are listed. Everything it made (mounts, loop device, daemons, folder) is removed on
# any exit. Usage: bash tools/demo.sh [BIN_DIR]   (default: build/bin next to this script)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
for tool in siterepd siterep siterep-log siterep-certs; do
  [[ -x $BIN/$tool ]] || { echo "demo: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (FUSE mount, loop device)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/siterep-demo.XXXXXX)
EAST_PID="" WEST_PID="" LOOP="" FS_MOUNTED=0
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
stop_pid() {
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid"
  wait "$pid"
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [[ $FS_MOUNTED -eq 1 ]] && { umount "$DIR/fs" || umount -l "$DIR/fs"; }
  [[ -n $LOOP ]] && losetup -d "$LOOP"
  stop_pid "$EAST_PID"
  stop_pid "$WEST_PID"
  for site in east west; do
    if findmnt -rn --mountpoint "$DIR/$site/mnt" >/dev/null 2>&1; then
      fusermount3 -u "$DIR/$site/mnt" || fusermount3 -uz "$DIR/$site/mnt"
    fi
  done
  if [[ $rc -ne 0 ]]; then
    echo "demo: failed (exit $rc)" >&2
    for site in east west; do
      [[ -s $DIR/$site.log ]] && { echo "--- $site.log" >&2; tail -n 20 "$DIR/$site.log" >&2; }
    done
  fi
  if findmnt -rn -o TARGET | grep -q "^$DIR/"; then
    echo "demo: something is still mounted under $DIR; leaving it" >&2
  else
    rm -rf "$DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
EAST_PORT=$(free_port)
WEST_PORT=$(free_port)
east() { "$BIN/siterep" -c "$DIR/east.toml" "$@"; }
west() { "$BIN/siterep" -c "$DIR/west.toml" "$@"; }

step "Certificates: a CA and one certificate per site (siterep-certs)"
show "$BIN/siterep-certs" "$DIR/certs" ca
show "$BIN/siterep-certs" "$DIR/certs" site east
show "$BIN/siterep-certs" "$DIR/certs" site west

step "web01's disks hold data already: ext4 with files on 'data', random bytes on 'os'"
truncate -s 256M "$DIR/web01-os.img"
truncate -s 512M "$DIR/web01-data.img"
head -c $((48 << 20)) /dev/urandom | dd of="$DIR/web01-os.img" conv=notrunc status=none
mkfs.ext4 -q -F "$DIR/web01-data.img"
mkdir -p "$DIR/fs"
mount -o loop "$DIR/web01-data.img" "$DIR/fs"
FS_MOUNTED=1
for i in 1 2 3 4 5; do head -c $((i * 16 << 20)) /dev/urandom >"$DIR/fs/old$i.bin"; done
echo "written before protection" >"$DIR/fs/before.txt"
df -h "$DIR/fs" | sed 's/^/    /'
umount "$DIR/fs"
FS_MOUNTED=0

step "Two site configs: east protects web01 (two disks) and replicates to west"
for site in east west; do
  mkdir -p "$DIR/$site"
  port=$EAST_PORT peer=west peer_port=$WEST_PORT
  [[ $site == west ]] && port=$WEST_PORT peer=east peer_port=$EAST_PORT
  cat >"$DIR/$site.toml" <<TOML
[site]
name = "$site"
state_dir = "$DIR/$site/state"
mountpoint = "$DIR/$site/mnt"
control_socket = "$DIR/$site/control.sock"
listen = "127.0.0.1:$port"

[tls]
ca = "$DIR/certs/ca.pem"
cert = "$DIR/certs/$site.pem"
key = "$DIR/certs/$site.key"

[[peers]]
name = "$peer"
address = "127.0.0.1:$peer_port"
bandwidth_limit = "96MiB"   # a WAN-like link, so the progress is visible
TOML
done
cat >>"$DIR/east.toml" <<TOML

[[vms]]
name = "web01"
frequency = "continuous"
recovery_points = 2
recovery_point_interval = "5s"
  [[vms.disks]]
  name = "os"
  image = "$DIR/web01-os.img"
  [[vms.disks]]
  name = "data"
  image = "$DIR/web01-data.img"
TOML
sed 's/^/    /' "$DIR/east.toml"

step "Start siterepd at both sites (logs: $DIR/east.log, $DIR/west.log)"
start() {
  local site=$1 pid
  "$BIN/siterepd" -c "$DIR/$site.toml" 2>"$DIR/$site.log" &
  pid=$!
  for _ in $(seq 1 100); do
    "$BIN/siterep" -c "$DIR/$site.toml" status >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "demo: siterepd ($site) exited" >&2; exit 1; }
    sleep 0.1
  done
  "$BIN/siterep" -c "$DIR/$site.toml" status >/dev/null || { echo "demo: siterepd ($site) did not come up" >&2; exit 1; }
  echo "    siterepd $site: pid $pid"
  START_PID=$pid
}
start west
WEST_PID=$START_PID
start east
EAST_PID=$START_PID

step "Enable replication of web01 to west: initial copy from a snapshot, with progress"
show east enable web01 --to west --wait
show east status web01

step "The existing ext4 on the 'data' disk, mounted through a loop device"
LOOP=$(losetup --find --show "$DIR/east/mnt/web01/data")
echo "    $LOOP -> $DIR/east/mnt/web01/data"
mkdir -p "$DIR/fs"
mount "$LOOP" "$DIR/fs"
FS_MOUNTED=1
ls -l "$DIR/fs" | sed 's/^/    /'

step "Write more files: delta replication ships only the changes"
for i in 1 2 3 4; do
  head -c $((i * 4 << 20)) /dev/urandom >"$DIR/fs/new$i.bin"
done
echo "hello from web01" >"$DIR/fs/hello.txt"
sync -f "$DIR/fs/hello.txt"
for _ in 1 2 3; do
  east status --json | python3 -c '
import json, sys
v = json.load(sys.stdin)["vms"][0]
l = v.get("link", {})
print("    east: RPO %.1f s, pending %d bytes, link %s at %.1f MiB/s, health %s" % (
    v["rpo_seconds"] or 0, v["pending_bytes"], l.get("state"),
    l.get("throughput_bytes_per_s", 0) / 1048576, v["health"]))'
  sleep 1
done

step "Unmount; once the last cycle is applied the replica equals the primary"
umount "$DIR/fs"
FS_MOUNTED=0
losetup -d "$LOOP"
LOOP=""
target=$(east cut web01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
for _ in $(seq 1 300); do
  applied=$(east status web01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["vms"][0].get("applied_cycle", 0))')
  [[ $applied -ge $target ]] && break
  sleep 0.2
done
show east status
show west status
for d in os data; do
  a=$(sha256sum <"$DIR/web01-$d.img" | cut -c1-16)
  b=$(sha256sum <"$DIR/west/state/replicas/web01/$d.img" | cut -c1-16)
  echo "    $d: east $a  west $b  $([[ $a == "$b" ]] && echo equal || echo DIFFERENT)"
  [[ $a == "$b" ]] || exit 1
done

step "Recovery points kept at west"
show west points web01

step "Stop both daemons (SIGTERM)"
stop_pid "$EAST_PID"; EAST_PID=""
stop_pid "$WEST_PID"; WEST_PID=""
echo "    stopped cleanly"

step "Done; cleaning up $DIR"
