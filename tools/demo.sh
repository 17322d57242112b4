#!/usr/bin/env bash
# make demo: two sites on this machine (east, the primary, and west, the replica), joined
# by mutual TLS on loopback with certificates made by siterep-certs. East protects VM web01
# (two disks), whose 'data' disk already holds an ext4 file system with files. Replication
# to west is enabled: the initial copy runs from a point-in-time snapshot with a progress
# bar; then we mount the file system through a loop device on the protected disk, write
# more files, and watch delta replication in `siterep status` (RPO, bytes pending).
# Then the replica images are compared with the primary's, and the recovery points at
# west are listed.
# Then the whole round trip: a planned failover moves web01 to west (east's pre_failover
# hook "shuts the VM down", west's post_failover hook "starts it"), the files are read at
# west, east becomes the replica and reverse replication runs; west writes a file; failback
# brings web01 home to east at a new epoch, protected by west again, with every file
# (including the one written at west) in place. `siterep status` is shown between the
# steps (role, epoch, state). At the end a recovery plan moves the whole "shop" (db01,
# then web01, a consistency group) to west with actions at both sites, and a second plan
# brings it home. The demo fails unless disks and files match at every stage.
# Everything it made (mounts, loop device, daemons, folder) is removed on any exit.
# Usage: bash tools/demo.sh [BIN_DIR]   (default: build/bin next to this script)
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
die() {
  echo "demo: $*" >&2
  exit 1
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
truncate -s 128M "$DIR/db01.img"   # db01, the shop's database, for the recovery plan at the end
head -c $((16 << 20)) /dev/urandom | dd of="$DIR/db01.img" conv=notrunc status=none
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
allow_plan_actions = true   # recovery plans run at $peer may run their actions here
TOML
done
cat >>"$DIR/east.toml" <<TOML

[[vms]]
name = "web01"
frequency = "continuous"
recovery_points = 2
recovery_point_interval = "5s"
pre_failover = "sh $DIR/hook.sh"    # runs at the site giving web01 up
post_failover = "sh $DIR/hook.sh"   # runs at the site taking web01 over
hook_timeout = "30s"
consistency_group = "shop"          # cut at the same instants as db01
  [[vms.disks]]
  name = "os"
  image = "$DIR/web01-os.img"
  [[vms.disks]]
  name = "data"
  image = "$DIR/web01-data.img"

[[vms]]
name = "db01"
frequency = "continuous"
consistency_group = "shop"
  [[vms.disks]]
  name = "db"
  image = "$DIR/db01.img"
TOML
cat >>"$DIR/west.toml" <<TOML

# web01's home is east; west runs these hooks when web01 moves to or from it
[[hooks]]
vm = "web01"
pre_failover = "sh $DIR/hook.sh"
post_failover = "sh $DIR/hook.sh"
timeout = "30s"
TOML
sed 's/^/    /' "$DIR/east.toml"
echo "    ... and west.toml ends with:"
sed -n '/^# web01/,$p' "$DIR/west.toml" | sed 's/^/    /'
# The operator's hook: siterepd runs it with SITEREP_VM, SITEREP_SITE, SITEREP_EVENT and
# SITEREP_MOUNTPOINT set. A real one would stop or start the VM; this one says what it
# would do, and keeps a log the demo shows and checks.
cat >"$DIR/hook.sh" <<HOOK
case \$SITEREP_EVENT in
  pre_failover) msg="shutting down VM \$SITEREP_VM at \$SITEREP_SITE" ;;
  post_failover) msg="starting VM \$SITEREP_VM at \$SITEREP_SITE with disks \$(cd "\$SITEREP_MOUNTPOINT/\$SITEREP_VM" && echo *)" ;;
  *) msg="unexpected event \$SITEREP_EVENT" ;;
esac
echo "\$msg"
echo "\$SITEREP_SITE \$SITEREP_EVENT: \$msg" >>"$DIR/hooks.log"
HOOK
echo "    hook ($DIR/hook.sh):"
sed 's/^/      /' "$DIR/hook.sh"

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
echo "    (db01, the shop's database, is replicated too; the recovery plan at the end moves both)"
east enable db01 --to west --wait >/dev/null

# web01's 'data' disk at SITE ($DIR/SITE/mnt/web01/data), through a loop device, on $DIR/fs.
mount_data() {
  LOOP=$(losetup --find --show "$DIR/$1/mnt/web01/data")
  echo "    $LOOP -> $DIR/$1/mnt/web01/data"
  mkdir -p "$DIR/fs"
  mount "$LOOP" "$DIR/fs"
  FS_MOUNTED=1
}
unmount_data() {
  umount "$DIR/fs"
  FS_MOUNTED=0
  losetup -d "$LOOP"
  LOOP=""
}
# field SITE EXPR: a Python expression over web01 in `siterep status web01 --json` (v).
field() {
  "$BIN/siterep" -c "$DIR/$1.toml" status "${FIELD_VM:-web01}" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)["vms"][0]
r = eval(sys.argv[1], {"v": v})
print(r if isinstance(r, str) else json.dumps(r))' "$2"
}
# watch_link SITE: web01's replication from SITE (its primary), three times a second apart.
watch_link() {
  for _ in 1 2 3; do
    field "$1" '"    %s: RPO %.1f s, pending %d bytes, link %s at %.1f MiB/s, health %s" % (
        "'"$1"'", v["rpo_seconds"] or 0, v["pending_bytes"], v.get("link", {}).get("state"),
        v.get("link", {}).get("throughput_bytes_per_s", 0) / 1048576, v["health"])'
    sleep 1
  done
}
# caught_up SITE: a cut at SITE (the primary), then wait until the replica applied it.
caught_up() {
  local target applied=0
  target=$("$BIN/siterep" -c "$DIR/$1.toml" cut web01 --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
  [[ $target -ge 1 ]] || die "siterep cut web01 at $1 returned cycle $target after writes"
  for _ in $(seq 1 300); do
    applied=$(field "$1" "v.get('applied_cycle') or 0")
    [[ $applied -ge $target ]] && return 0
    sleep 0.2
  done
  die "the replica of web01 did not apply cycle $target in 60 s (applied: $applied)"
}
# wait_link SITE STATE: until web01 at SITE (its primary) is in STATE with the link to
# the replica connected (30 s at most); says how long after the switch that was.
SWITCHED=0
wait_link() {
  local i
  for i in $(seq 1 150); do
    if [[ $(field "$1" "v['state'] + '/' + str(v.get('link', {}).get('state'))") == "$2/connected" ]]; then
      echo "    $1: $2, link connected ($((SECONDS - SWITCHED)) s after the switch)"
      return 0
    fi
    sleep 0.2
  done
  die "web01 at $1: $(field "$1" "v['state'] + ', link ' + str(v.get('link', {}).get('state')) + ' (' + v['health_reason'] + ')'"), not $2 with the link connected"
}
# expect SITE ROLE EPOCH: web01's role and epoch at SITE.
expect() {
  local got
  got="$(field "$1" "v['role']") $(field "$1" "v['epoch']")"
  [[ $got == "$2 $3" ]] || die "web01 at $1 is '$got', not '$2 $3'"
}
# same_disks: each disk of web01 at east equals the one at west, byte for byte (the files
# `siterep status` names: the exposed disk at the primary, the image at the replica).
same_disks() {
  local d a b pa pb
  for d in os data; do
    pa=$(field east "[d['path'] for d in v['disks'] if d['name'] == '$d'][0]")
    pb=$(field west "[d['path'] for d in v['disks'] if d['name'] == '$d'][0]")
    a=$(sha256sum <"$pa" | cut -c1-16)
    b=$(sha256sum <"$pb" | cut -c1-16)
    echo "    $d: east $a  west $b  $([[ $a == "$b" ]] && echo equal || echo DIFFERENT)"
    [[ $a == "$b" ]] || die "disk $d differs: $pa and $pb"
  done
}
# roles: web01 at both sites, as `siterep status web01` shows it up to the disk table.
roles() {
  local site
  for site in east west; do
    printf '%s$ %s status web01   (up to the disk table)%s\n' "$DIM" "$site" "$PLAIN"
    "$BIN/siterep" -c "$DIR/$site.toml" status web01 | sed -n '/^VM /,/^  last cycle/p' | sed '$d'
  done
}
# hooks_ran: what the hooks logged since the last call.
HOOKS_SHOWN=0
hooks_ran() {
  local total
  total=$(wc -l <"$DIR/hooks.log")
  sed -n "$((HOOKS_SHOWN + 1)),\$p" "$DIR/hooks.log" | sed 's/^/    hook at /'
  HOOKS_SHOWN=$total
}
HOOK_PRE_EAST="east pre_failover: shutting down VM web01 at east"
HOOK_POST_WEST="west post_failover: starting VM web01 at west with disks data os"
HOOK_PRE_WEST="west pre_failover: shutting down VM web01 at west"
HOOK_POST_EAST="east post_failover: starting VM web01 at east with disks data os"

step "The existing ext4 on the 'data' disk, mounted through a loop device"
mount_data east
ls -l "$DIR/fs" | sed 's/^/    /'

step "Write more files: delta replication ships only the changes"
for i in 1 2 3 4; do
  head -c $((i * 4 << 20)) /dev/urandom >"$DIR/fs/new$i.bin"
done
echo "hello from web01" >"$DIR/fs/hello.txt"
sync -f "$DIR/fs/hello.txt"
watch_link east
(cd "$DIR/fs" && sha256sum before.txt hello.txt old*.bin new*.bin) >"$DIR/east-files.sha256"

step "Unmount; once the last cycle is applied the replica equals the primary"
unmount_data
caught_up east
show east status
show west status
same_disks

step "Recovery points kept at west"
show west points web01

step "Planned failover: web01 moves to west"
echo "    The VM is down (its file system was unmounted above). East runs its pre_failover hook,"
echo "    makes web01's disks read-only and ships the last changes; west applies them, becomes"
echo "    the primary at a new epoch and runs its post_failover hook; east keeps its images as"
echo "    the replica of west."
show east failover web01 --planned
SWITCHED=$SECONDS
hooks_ran
expect west primary 2
expect east replica 2
[[ ! -e $DIR/east/mnt/web01/data ]] || die "east still exposes web01's disks after the failover"
diff <(printf '%s\n' "$HOOK_PRE_EAST" "$HOOK_POST_WEST") "$DIR/hooks.log" >&2 ||
  die "the hooks did not run as expected"
roles

step "At west, the new primary: every file is there, reverse replication runs to east"
mount_data west
ls -l "$DIR/fs" | sed 's/^/    /'
(cd "$DIR/fs" && sha256sum -c --quiet "$DIR/east-files.sha256") || die "files differ at west"
echo "    the $(wc -l <"$DIR/east-files.sha256") files written at east read back at west: checksums equal"
wait_link west "reverse replicating"
roles

step "Write at west: the changes flow back to east"
echo "written at west, while web01 ran there" >"$DIR/fs/west.txt"
head -c $((12 << 20)) /dev/urandom >"$DIR/fs/west.bin"
sync -f "$DIR/fs/west.txt"
watch_link west
(cd "$DIR/fs" && sha256sum west.txt west.bin) >"$DIR/west-files.sha256"
unmount_data
caught_up west
show west status web01
same_disks

step "Failback at west: web01 goes home to east"
echo "    At the current primary: reverse replication is in line already; a planned failover"
echo "    back runs west's pre_failover hook and east's post_failover hook, east becomes the"
echo "    primary at the next epoch (3), and west becomes its replica again."
show west failback web01
SWITCHED=$SECONDS
hooks_ran
expect east primary 3
expect west replica 3
[[ ! -e $DIR/west/mnt/web01/data ]] || die "west still exposes web01's disks after the failback"
roles

step "Home and protected again: every file at east, a new write reaches west"
wait_link east replicating
mount_data east
ls -l "$DIR/fs" | sed 's/^/    /'
(cd "$DIR/fs" && sha256sum -c --quiet "$DIR/east-files.sha256" "$DIR/west-files.sha256") ||
  die "files differ at east after the failback"
echo "    the $(cat "$DIR/east-files.sha256" "$DIR/west-files.sha256" | wc -l) files (written at east and at west) read back at east: checksums equal"
echo "back home at east, protected by west" >"$DIR/fs/home.txt"
head -c $((4 << 20)) /dev/urandom >"$DIR/fs/home.bin"
unmount_data
caught_up east
show east status web01
show west points web01
same_disks
fsck.ext4 -n -f "$DIR/east/mnt/web01/data" >/dev/null 2>&1 || die "fsck.ext4 finds errors on web01's data disk"
echo "    fsck.ext4 -n -f: the file system is clean"
diff <(printf '%s\n' "$HOOK_PRE_EAST" "$HOOK_POST_WEST" "$HOOK_PRE_WEST" "$HOOK_POST_EAST") \
  "$DIR/hooks.log" >&2 || die "the hooks did not run in the expected order"
echo "    the hooks ran in order: pre at east, post at west, pre at west, post at east"

step "A recovery plan: the whole shop (db01, then web01) moves to west and back"
echo "    A plan fails VMs over group by group, in the order the applications need, with"
echo "    actions at either site and pauses for a person; --yes confirms the pauses here."
cat >"$DIR/shop-to-west.toml" <<PLAN
name = "shop-to-west"
from = "east"
to = "west"
[[groups]]
name = "database"
vms = ["db01"]
  [[groups.post]]
  site = "west"
  run = "echo db01 accepts connections at \$SITEREP_SITE"
  timeout = "30s"
  [[groups.manual]]
  message = "Check that the shop's database answers at west"
[[groups]]
name = "web"
vms = ["web01"]
  [[groups.pre]]
  site = "east"
  run = "echo draining the load balancer at \$SITEREP_SITE"
PLAN
cat >"$DIR/shop-home.toml" <<PLAN
name = "shop-home"
from = "west"
to = "east"
[[groups]]
name = "database"
vms = ["db01"]
  [[groups.post]]
  site = "east"
  run = "echo db01 accepts connections at \$SITEREP_SITE"
  timeout = "30s"
[[groups]]
name = "web"
vms = ["web01"]
PLAN
sed 's/^/    /' "$DIR/shop-to-west.toml"
show west plan validate "$DIR/shop-to-west.toml"
show east plan run "$DIR/shop-to-west.toml" --planned --yes
for vm in db01 web01; do
  [[ $(FIELD_VM=$vm field west "v['role']") == primary ]] || die "$vm does not run at west after the plan"
done
echo "    db01 and web01 run at west; east is their replica"
show west plan run "$DIR/shop-home.toml" --planned --yes
for vm in db01 web01; do
  [[ $(FIELD_VM=$vm field east "v['role']") == primary ]] || die "$vm is not home at east after the plan"
  [[ $(FIELD_VM=$vm field west "v['role']") == replica ]] || die "$vm is not west's replica after the plan"
done
same_disks
echo "    both VMs are home at east, protected by west, and web01's disks are equal at both sites"

step "Stop both daemons (SIGTERM)"
stop_pid "$EAST_PID"; EAST_PID=""
stop_pid "$WEST_PID"; WEST_PID=""
echo "    stopped cleanly"

step "Done; cleaning up $DIR"
