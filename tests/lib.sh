# tests/lib.sh: shared helpers for the whole-system tests (tests/*.sh).
#
# Source it from a test script that was called as `bash tests/x.sh BIN_DIR`; BIN_DIR holds
# siterepd, siterep, siterep-log (and siterep-certs, siterep-check for two-site tests). It gives the test:
#   - a private temp folder $T (under /tmp), removed at exit;
#   - config generation (new_site, add_vm, add_disk);
#   - daemons started in the background with their pids recorded (start_daemon), waited
#     for through the control socket (wait_ready), stopped by pid (stop_daemon, crash_daemon);
#   - loop devices and mounts that are recorded as they are made (attach_loop, mount_dev).
# An EXIT trap undoes exactly what the test made, in order, on success and on failure:
# file systems it mounted, loop devices it attached, processes it started, FUSE mounts of
# its own daemons. It never touches anything else (no kill by name, no umount of other
# mounts). The temp folder is removed only when nothing is mounted under it any more.
#
# Exit codes: 0 pass, 1 fail, 77 skip (registered as SKIP_RETURN_CODE in CMake).

set -euo pipefail

if [[ $# -lt 1 || ! -d $1 ]]; then
  echo "usage: bash $0 BIN_DIR   (the folder with siterepd, siterep, siterep-log)" >&2
  exit 2
fi
BIN=$(realpath "$1")
SITEREPD=$BIN/siterepd
SITEREP=$BIN/siterep
SITEREP_LOG=$BIN/siterep-log
TEST_NAME=$(basename "$0" .sh)

TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T=$(mktemp -d "/tmp/siterep-${TEST_NAME}.XXXXXX")
cd "$T"   # tools that drop files in the working folder (fio's verify state) drop them here
START_SECONDS=$SECONDS

_PIDS=()        # processes this test started and has not reaped yet
_LOOPS=()       # loop devices this test attached
_MOUNTS=()      # file systems this test mounted (not FUSE), in mount order
_FUSE_MNTS=()   # mountpoints of the daemons this test started
_LOGS=()        # daemon logs, shown when the test fails

log() { echo "[$TEST_NAME +$((SECONDS - START_SECONDS))s] $*"; }
step() { echo; log "== $*"; }
fail() {
  echo "FAIL [$TEST_NAME]: $*" >&2
  exit 1
}
# new_seed: a random seed for a run's random choices (1 .. 2^31-1), printed by the caller
# so that FAULTS_SEED=N replays it.
new_seed() { python3 -c 'import random; print(random.SystemRandom().randrange(1, 1 << 31))'; }

skip() {
  echo "SKIP [$TEST_NAME]: $*"
  exit 77
}

for tool in "$SITEREPD" "$SITEREP" "$SITEREP_LOG"; do
  [[ -x $tool ]] || fail "$tool is missing (build first)"
done
[[ $(id -u) -eq 0 ]] || skip "needs root (FUSE mounts with allow_other, loop devices)"
[[ -c /dev/fuse ]] || skip "/dev/fuse is missing"

# is_mounted DIR: true when DIR is a mountpoint now (also a stale FUSE mount).
is_mounted() {
  findmnt -rn --mountpoint "$1" >/dev/null 2>&1
}

# _alive PID: the process exists and is not a zombie waiting to be reaped.
_alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

_forget_pid() {
  local pid=$1 kept=() p
  for p in "${_PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  _PIDS=("${kept[@]}")
}

_cleanup() {
  local rc=$? i pid dev dir waited
  set +e
  trap - EXIT INT TERM
  if [[ $rc -ne 0 && $rc -ne 77 ]]; then
    for f in "${_LOGS[@]}"; do
      [[ -s $f ]] || continue
      echo "---- last lines of $f ----" >&2
      tail -n 40 "$f" >&2
    done
  fi
  # 1. File systems this test mounted (they sit on loop devices over FUSE disks, so they
  #    go first, while the daemons still run and can take their write-back).
  for ((i = ${#_MOUNTS[@]} - 1; i >= 0; i--)); do
    dir=${_MOUNTS[i]}
    if is_mounted "$dir"; then
      umount "$dir" 2>/dev/null || umount -l "$dir"
    fi
  done
  # 2. Loop devices this test attached.
  for dev in "${_LOOPS[@]}"; do
    losetup "$dev" >/dev/null 2>&1 && losetup -d "$dev"
  done
  # 3. Processes this test started: SIGTERM, up to 20 s, then SIGKILL.
  for pid in "${_PIDS[@]}"; do
    if ! _alive "$pid"; then
      wait "$pid" 2>/dev/null
      continue
    fi
    kill -TERM "$pid" 2>/dev/null
    waited=0
    while _alive "$pid" && ((waited < 200)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    if _alive "$pid"; then
      echo "cleanup: pid $pid did not stop on SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  done
  # 4. FUSE mounts left by daemons of this test (stale after a crash).
  for dir in "${_FUSE_MNTS[@]}"; do
    if is_mounted "$dir"; then
      fusermount3 -u "$dir" 2>/dev/null || fusermount3 -uz "$dir"
    fi
  done
  # 5. The temp folder, only when nothing is mounted below it.
  if findmnt -rn -o TARGET | grep -q "^$T/"; then
    echo "cleanup: mounts remain under $T, leaving it in place" >&2
  else
    rm -rf "$T"
  fi
  if [[ $rc -eq 0 ]]; then
    log "PASS ($((SECONDS - START_SECONDS)) s)"
  elif [[ $rc -ne 77 ]]; then
    log "FAILED with exit code $rc"
  fi
  exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Configuration.

# new_site NAME: writes the [site] table of $T/NAME.toml, with state under $T/NAME/ and the
# disks at $T/NAME/mnt. Sets CONF, MNT, STATE, SOCK for this site (the last one made).
new_site() {
  local name=$1
  CONF=$T/$name.toml
  STATE=$T/$name/state
  MNT=$T/$name/mnt
  SOCK=$T/$name/control.sock
  mkdir -p "$T/$name"
  cat >"$CONF" <<EOF
[site]
name = "$name"
state_dir = "$STATE"
mountpoint = "$MNT"
control_socket = "$SOCK"
EOF
}

# add_vm CONF VM [key = value lines...]: appends a [[vms]] table; extra arguments are TOML
# lines written as given (e.g. 'frequency = "continuous"').
add_vm() {
  local conf=$1 vm=$2
  shift 2
  {
    echo
    echo "[[vms]]"
    echo "name = \"$vm\""
    local line
    for line in "$@"; do echo "$line"; done
  } >>"$conf"
}

# add_disk CONF DISK IMAGE [SIZE]: appends a disk to the last VM; creates a sparse image
# of SIZE (e.g. 128M) when SIZE is given.
add_disk() {
  local conf=$1 disk=$2 image=$3 size=${4:-}
  [[ -n $size ]] && truncate -s "$size" "$image"
  cat >>"$conf" <<EOF
  [[vms.disks]]
  name = "$disk"
  image = "$image"
EOF
}

# ---------------------------------------------------------------------------------------
# Daemons.

# config_value CONF KEY: a string key of [site] (mountpoint, control_socket).
config_value() {
  sed -n "s/^$2 = \"\(.*\)\"$/\1/p" "$1" | head -n 1
}

# start_daemon CONF [ARGS...]: starts siterepd in the background. Sets DAEMON_PID and
# DAEMON_LOG; does not wait for it (see wait_ready).
_daemon_count=0
start_daemon() {
  local conf=$1
  shift
  _daemon_count=$((_daemon_count + 1))
  DAEMON_LOG=$T/siterepd.$_daemon_count.log
  _LOGS+=("$DAEMON_LOG")
  "$SITEREPD" -c "$conf" "$@" 2>"$DAEMON_LOG" &
  DAEMON_PID=$!
  _PIDS+=("$DAEMON_PID")
  local mnt
  mnt=$(config_value "$conf" mountpoint)
  [[ -n $mnt ]] && _FUSE_MNTS+=("$mnt")
  log "started siterepd pid $DAEMON_PID (-c $(basename "$conf") $*), log $(basename "$DAEMON_LOG")"
}

# wait_ready CONF PID [TIMEOUT_S]: waits until `siterep status` answers; fails if the
# daemon exits first or the timeout passes.
wait_ready() {
  local conf=$1 pid=$2 timeout=${3:-30} i
  for ((i = 0; i < timeout * 10; i++)); do
    if ! _alive "$pid"; then
      local rc=0
      wait "$pid" || rc=$?
      _forget_pid "$pid"
      fail "siterepd pid $pid exited with $rc before it was ready: $(tail -n 5 "$DAEMON_LOG")"
    fi
    if "$SITEREP" -c "$conf" status >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  fail "siterepd pid $pid not ready after ${timeout}s"
}

# start_ready CONF [ARGS...]: start_daemon + wait_ready.
start_ready() {
  start_daemon "$@"
  wait_ready "$1" "$DAEMON_PID"
}

# stop_daemon PID [TIMEOUT_S]: SIGTERM, waits for the exit, sets STOP_RC (the exit code).
stop_daemon() {
  local pid=$1 timeout=${2:-60} i
  kill -TERM "$pid"
  for ((i = 0; i < timeout * 10; i++)); do
    _alive "$pid" || break
    sleep 0.1
  done
  _alive "$pid" && fail "siterepd pid $pid still running ${timeout}s after SIGTERM"
  STOP_RC=0
  wait "$pid" || STOP_RC=$?
  _forget_pid "$pid"
  log "siterepd pid $pid stopped, exit code $STOP_RC"
}

# stop_clean PID CONF: stop_daemon, and check a clean stop: exit 0, no mount, no socket.
stop_clean() {
  local pid=$1 conf=$2 mnt sock
  stop_daemon "$pid"
  [[ $STOP_RC -eq 0 ]] || fail "siterepd exited with $STOP_RC on SIGTERM (want 0)"
  mnt=$(config_value "$conf" mountpoint)
  sock=$(config_value "$conf" control_socket)
  ! is_mounted "$mnt" || fail "$mnt is still mounted after a clean stop"
  [[ -z $sock || ! -e $sock ]] || fail "control socket $sock still exists after a clean stop"
}

# crash_daemon PID CONF: kill -9, reap, and unmount the stale FUSE mount.
crash_daemon() {
  local pid=$1 conf=$2 mnt
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null || true
  _forget_pid "$pid"
  mnt=$(config_value "$conf" mountpoint)
  if is_mounted "$mnt"; then
    fusermount3 -u "$mnt" || fusermount3 -uz "$mnt"
  fi
  log "siterepd pid $pid killed with SIGKILL, stale mount removed"
}

# status_json CONF [VM]: prints `siterep status --json`.
status_json() {
  local conf=$1
  shift
  "$SITEREP" -c "$conf" status "$@" --json
}

# jq_py EXPR: evaluates a Python expression over the JSON document on stdin (bound to d);
# strings print bare, everything else as JSON.
jq_py() {
  python3 -c '
import json, sys
d = json.load(sys.stdin)
v = eval(sys.argv[1], {"d": d})
print(v if isinstance(v, str) else json.dumps(v))
' "$1"
}

# disk_field CONF VM DISK FIELD: one field of one disk from `status --json`.
disk_field() {
  status_json "$1" | jq_py "[x for v in d['vms'] if v['name'] == '$2' for x in v['disks'] if x['name'] == '$3'][0]['$4']"
}

# ---------------------------------------------------------------------------------------
# Block devices and file systems.

# attach_loop FILE: sets LOOP to a new loop device over FILE.
attach_loop() {
  LOOP=$(losetup --find --show "$1")
  _LOOPS+=("$LOOP")
  log "attached $LOOP -> $1"
}

detach_loop() {
  losetup -d "$1"
}

# mount_dev DEV DIR: mounts and records it.
mount_dev() {
  mkdir -p "$2"
  mount "$1" "$2"
  _MOUNTS+=("$2")
}

# expect_fail DESCRIPTION CMD...: runs CMD, which must fail with exit code 1 (not a crash,
# not success). Leaves its stderr+stdout in FAIL_OUTPUT.
expect_exit1() {
  local what=$1 rc=0
  shift
  FAIL_OUTPUT=$("$@" 2>&1) || rc=$?
  [[ $rc -eq 1 ]] || fail "$what: exit code $rc (want 1); output: $FAIL_OUTPUT"
  log "$what: refused as expected: $(echo "$FAIL_OUTPUT" | tail -n 1)"
}

# expect_output_has TEXT: the last expect_exit1 output contains TEXT.
expect_output_has() {
  grep -qF -- "$1" <<<"$FAIL_OUTPUT" || fail "message does not mention '$1': $FAIL_OUTPUT"
}

# fill_random FILE OFFSET_MIB COUNT_MIB: writes random data into a plain file (no truncate).
fill_random() {
  dd if=/dev/urandom of="$1" bs=1M seek="$2" count="$3" conv=notrunc status=none
}

# ---------------------------------------------------------------------------------------
# Two sites: certificates, listen addresses, peers, a TCP proxy.

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# make_certs DIR SITE...: a CA in DIR and a certificate for every SITE (bin/siterep-certs).
make_certs() {
  local dir=$1 site
  shift
  "$BIN/siterep-certs" "$dir" ca >/dev/null
  for site in "$@"; do "$BIN/siterep-certs" "$dir" site "$site" >/dev/null; done
}

# new_repl_site NAME PORT CERT_DIR: new_site plus listen = 127.0.0.1:PORT and a [tls] table
# with CERT_DIR/ca.pem and CERT_DIR/NAME.{pem,key}.
new_repl_site() {
  local name=$1 port=$2 certs=$3
  new_site "$name"
  sed -i "/^control_socket = /a listen = \"127.0.0.1:$port\"" "$CONF"
  cat >>"$CONF" <<EOT

[tls]
ca = "$certs/ca.pem"
cert = "$certs/$name.pem"
key = "$certs/$name.key"
EOT
}

# add_peer CONF NAME ADDRESS [key = value lines...]
add_peer() {
  local conf=$1 name=$2 address=$3 line
  shift 3
  {
    echo
    echo "[[peers]]"
    echo "name = \"$name\""
    echo "address = \"$address\""
    for line in "$@"; do echo "$line"; done
  } >>"$conf"
}

# two_sites [EAST_TO_WEST_PORT]: certificates for east and west (in $CERTS), and two site
# configs with each other as peers: west listens on WEST_PORT; east on EAST_PORT, and
# reaches west at 127.0.0.1:EAST_TO_WEST_PORT (default WEST_PORT; a proxy's port for the
# link tests). Sets CERTS, EAST_PORT, WEST_PORT, EAST_CONF, EAST_MNT, WEST_CONF, WEST_STATE.
two_sites() {
  CERTS=$T/certs
  make_certs "$CERTS" east west
  EAST_PORT=$(free_port)
  WEST_PORT=$(free_port)
  new_repl_site west "$WEST_PORT" "$CERTS"
  WEST_CONF=$CONF WEST_STATE=$STATE
  add_peer "$WEST_CONF" east "127.0.0.1:$EAST_PORT"
  new_repl_site east "$EAST_PORT" "$CERTS"
  EAST_CONF=$CONF EAST_MNT=$MNT
  add_peer "$EAST_CONF" west "127.0.0.1:${1:-$WEST_PORT}"
}

# vm_field CONF VM EXPR: a Python expression over the VM's status object (bound to v).
vm_field() {
  status_json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
vs = [v for v in d["vms"] if v["name"] == sys.argv[1]]
if not vs:
    print("")
    sys.exit(0)
v = vs[0]
r = eval(sys.argv[2], {"v": v})
print(r if isinstance(r, str) else json.dumps(r))
' "$2" "$3"
}

# wait_caught_up PRIMARY_CONF VM [TIMEOUT_S]: cuts the VM, then waits until the replica has
# applied that cycle (the primary's applied_cycle) and nothing is pending.
wait_caught_up() {
  local conf=$1 vm=$2 timeout=${3:-120} target i applied
  target=$("$SITEREP" -c "$conf" cut "$vm" --json | jq_py "d['cycle']")
  for ((i = 0; i < timeout * 5; i++)); do
    [[ $(vm_field "$conf" "$vm" "v['state']") != "resync required" ]] ||
      fail "VM $vm needs a resync: $(vm_field "$conf" "$vm" "v['health_reason']")"
    applied=$(vm_field "$conf" "$vm" "v.get('applied_cycle', 0)")
    if [[ -n $applied && $applied -ge $target ]]; then
      log "VM $vm: replica applied cycle $applied (target $target)"
      return 0
    fi
    sleep 0.2
  done
  fail "VM $vm: the replica did not reach cycle $target in ${timeout}s (at $applied); $(status_json "$conf" | head -c 2000)"
}

# wait_state CONF VM STATE [TIMEOUT_S]: waits until the VM's state (status) is STATE.
wait_state() {
  local conf=$1 vm=$2 want=$3 timeout=${4:-30} i
  for ((i = 0; i < timeout * 5; i++)); do
    [[ $(vm_field "$conf" "$vm" "v['state']") == "$want" ]] && return 0
    sleep 0.2
  done
  fail "VM $vm is not $want: $(vm_field "$conf" "$vm" "v['state'] + ': ' + v['health_reason']")"
}

# expect_erofs DISK: a direct 4 KiB write to DISK (a fenced disk file) fails with EROFS.
expect_erofs() {
  if dd if=/dev/zero of="$1" bs=4k count=1 seek=100 conv=notrunc oflag=direct status=none \
    2>"$T/dd.err"; then
    fail "a write to fenced $1 succeeded"
  fi
  grep -q "Read-only file system" "$T/dd.err" ||
    fail "the write to $1 was not refused with EROFS: $(cat "$T/dd.err")"
}

# start_proxy LISTEN_PORT TARGET_PORT: a TCP proxy (tests/tcp_proxy.py) whose mode is set
# with proxy_mode. Sets PROXY_PID, PROXY_CTL.
start_proxy() {
  PROXY_CTL=$T/proxy.$1.mode
  echo pass >"$PROXY_CTL"
  python3 "$TESTS_DIR/tcp_proxy.py" "$1" "$2" "$PROXY_CTL" 2>"$T/proxy.$1.log" &
  PROXY_PID=$!
  _PIDS+=("$PROXY_PID")
  _LOGS+=("$T/proxy.$1.log")
  local i
  for ((i = 0; i < 50; i++)); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2).close()" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "TCP proxy on port $1 did not start"
}

# proxy_mode MODE: pass (forward), close (drop every connection and refuse new ones),
# stall (keep connections open, forward nothing).
proxy_mode() {
  echo "$1" >"$PROXY_CTL.tmp"
  mv "$PROXY_CTL.tmp" "$PROXY_CTL"
  log "proxy: $1"
}

# same_sha256 FILE_A FILE_B WHAT: fails unless both files hash the same.
same_sha256() {
  local a b
  a=$(sha256sum "$1" | cut -d' ' -f1)
  b=$(sha256sum "$2" | cut -d' ' -f1)
  [[ $a == "$b" ]] || fail "$3: $1 ($a) differs from $2 ($b)"
}

# ---------------------------------------------------------------------------------------
# Recovery plans.

# allow_plan_actions_both: each of the two sites (two_sites) runs the plan actions the
# other asks for: allow_plan_actions = true in the [[peers]] table two_sites wrote.
allow_plan_actions_both() {
  local conf
  sed -i '/^address = "127\.0\.0\.1:/a allow_plan_actions = true' "$EAST_CONF" "$WEST_CONF"
  for conf in "$EAST_CONF" "$WEST_CONF"; do
    grep -A3 '^\[\[peers\]\]' "$conf" | grep -qx 'allow_plan_actions = true' ||
      fail "allow_plan_actions is not in the [[peers]] table of $conf"
  done
}

# plan_doc CONF NAME EXPR: a Python expression over the run document (bound to d).
plan_doc() {
  "$SITEREP" -c "$1" plan status "$2" --json | jq_py "$3"
}

# show_run CONF NAME: the run document, for a failure message.
show_run() {
  "$SITEREP" -c "$1" plan status "$2" --json 2>&1 | head -c 12000
}

# run_plan WANT_RC OUT CONF ARGS...: `siterep -c CONF ARGS...` (a plan command), which must
# exit with WANT_RC; its output goes to OUT.
run_plan() {
  local want=$1 out=$2 conf=$3 rc=0
  shift 3
  timeout 180 "$SITEREP" -c "$conf" "$@" >"$out" 2>&1 || rc=$?
  sed 's/^/    | /' "$out"
  [[ $rc -eq $want ]] || fail "siterep $*: exit code $rc (want $want); output above"
}
