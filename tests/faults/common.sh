# shellcheck shell=bash
# tests/faults/common.sh: what the fault classes share, sourced after tests/lib.sh.
#
# One pair of sites for a whole class: east replicates vm1 (disks d0 and d1, seeded with
# the same random data at both sites) to west, with --archive-logs so that every shipped
# segment is kept for siterep-check. Each disk of FAULTS_DISK_MIB MiB is laid out as
#   [0, D-8 MiB)       fio's random writes
#   [D-8, D-4 MiB)     a ring of 1024 numbered 4 KiB blocks, each acknowledged by fsync
#                      (fault_tool.py ackwrite), read back after every fault (ackverify)
#   [D-4, D MiB)       64 KiB markers written and fsynced just before a fault
# Checks after a fault (each sets CHECK_acked, CHECK_prefix, CHECK_sha256 to pass or fail
# and appends a reason to CHECK_MSG):
#   check_acked     every acknowledged marker and numbered block reads back at the primary
#   converge        the load has stopped: cut, and wait until the replica applied that
#                   cycle and the primary holds no unshipped bytes (all shipped segments
#                   are then in the archive)
#   check_replica   sha256 of primary and replica images; siterep-check PRE ARCHIVE
#                   REPLICA for both disks, at the replica's applied cycle; when it passes
#                   at the end of the archived log, the replica becomes the next pre-image
#                   and the checked segments are deleted (so a check costs one interval)
#
# The caller sets CLASS_SCRIPT and OUT (the folder for records and failure artifacts).

TOOL=$FAULTS_DIR/fault_tool.py
DISK_MIB=${FAULTS_DISK_MIB:-32}
((DISK_MIB >= 16)) || fail "FAULTS_DISK_MIB must be at least 16"
FIO_MIB=$((DISK_MIB - 8))
RING_BASE=$(((DISK_MIB - 8) << 20))
RING_SLOTS=1024
MARK_MIB=$((DISK_MIB - 4))
MARK_SLOTS=64
RATE=${FAULTS_RATE:-3m}
LIBLOG=$T/lib.log        # what lib.sh's helpers print (one line per iteration on stdout)
RECORDS=$OUT/$CLASS_SCRIPT.jsonl
mkdir -p "$OUT"

command -v fio >/dev/null || skip "fio is not installed"
command -v openssl >/dev/null || skip "openssl is not installed"
[[ -x $BIN/siterep-check ]] || fail "$BIN/siterep-check is missing"

# The script's end (also a failure of lib.sh's helpers, which exit) is recorded for the
# summary; lib.sh's EXIT trap still cleans up.
_faults_end() {
  local rc=$?
  set +e
  python3 "$TOOL" record "$RECORDS" kind=script_end script="$CLASS_SCRIPT" exit_code="$rc" \
    seconds="$((SECONDS - START_SECONDS))" detail="@$LIBLOG" 2>/dev/null
  # _cleanup takes its exit code from $?: give it the script's, not the record's.
  (exit "$rc")
  _cleanup
}
trap _faults_end EXIT

# setup_sites [PROXY_PORT]: two sites, vm1 with d0 and d1, both daemons up, replication
# enabled and the first copy done. With PROXY_PORT, east reaches west through a TCP proxy
# (tests/tcp_proxy.py, see proxy_mode) listening there. Sets EAST_PID, WEST_PID, EAST_LOG,
# WEST_LOG. PEER_BANDWIDTH (a size, e.g. 12MiB): east's bandwidth_limit to west.
setup_sites() {
  two_sites "$@"
  if [[ -n ${PEER_BANDWIDTH:-} ]]; then
    sed -i "/^address = \"127\.0\.0\.1:/a bandwidth_limit = \"$PEER_BANDWIDTH\"" "$EAST_CONF"
    grep -q "^bandwidth_limit = \"$PEER_BANDWIDTH\"" "$EAST_CONF" || fail "no bandwidth_limit in $EAST_CONF"
  fi
  [[ $# -gt 0 ]] && start_proxy "$1" "$WEST_PORT"
  add_vm "$EAST_CONF" vm1 'frequency = "continuous"'
  mkdir -p "$WEST_STATE/replicas/vm1" "$T/pre" "$T/work" "$T/archive/vm1/d0" "$T/archive/vm1/d1"
  local d
  for d in d0 d1; do
    truncate -s "${DISK_MIB}M" "$T/$d.img"
    fill_random "$T/$d.img" 0 "$DISK_MIB"
    cp --sparse=always "$T/$d.img" "$T/pre/$d.img"
    cp --sparse=always "$T/$d.img" "$WEST_STATE/replicas/vm1/$d.img"
    add_disk "$EAST_CONF" "$d" "$T/$d.img"
    # What the marker area must hold: the seed data until markers are written there.
    dd if="$T/$d.img" of="$T/markers-$d.exp" bs=1M skip="$MARK_MIB" count=4 status=none
  done
  start_ready "$WEST_CONF" >>"$LIBLOG"
  WEST_PID=$DAEMON_PID WEST_LOG=$DAEMON_LOG
  start_east >>"$LIBLOG"
  timeout 120 "$SITEREP" -c "$EAST_CONF" enable vm1 --to west --wait >>"$LIBLOG" 2>&1 ||
    fail "enable --wait did not finish"
  converge 120 || fail "no first recovery point: $CONV_MSG"
}

start_east() {
  start_ready "$EAST_CONF" --archive-logs "$T/archive"
  EAST_PID=$DAEMON_PID EAST_LOG=$DAEMON_LOG
}

start_west() {
  start_ready "$WEST_CONF"
  WEST_PID=$DAEMON_PID WEST_LOG=$DAEMON_LOG
}

# kill9 PID CONF: kill -9 of a daemon this script started; reaps it. The stale FUSE mount
# is removed by unmount_stale once the load has let go of it.
kill9() {
  kill -KILL "$1"
  wait "$1" 2>/dev/null || true
  _forget_pid "$1"
}

unmount_stale() {
  local mnt
  mnt=$(config_value "$1" mountpoint)
  if is_mounted "$mnt"; then
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"
  fi
}

# ---------------------------------------------------------------------------------------
# Load: fio on both disks and a numbered writer per disk. Sets LOAD_PIDS.
LOAD_ROUND=0
start_load() {
  LOAD_ROUND=$((LOAD_ROUND + 1))
  LOAD_PIDS=()
  fio --name=ld0 --filename="$EAST_MNT/vm1/d0" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --iodepth=8 --fsync=8 --size="${FIO_MIB}M" --time_based --runtime=3600 \
    --rate="$RATE" --refill_buffers --randrepeat=0 >"$T/fio-d0.out" 2>&1 &
  LOAD_PIDS+=($!)
  fio --name=ld1 --filename="$EAST_MNT/vm1/d1" --ioengine=psync --direct=0 --rw=randwrite \
    --bsrange=4k-16k --fdatasync=32 --size="${FIO_MIB}M" --time_based --runtime=3600 \
    --rate="$RATE" --refill_buffers --randrepeat=0 >"$T/fio-d1.out" 2>&1 &
  LOAD_PIDS+=($!)
  local d flag
  for d in d0 d1; do
    flag=""
    [[ $d == d0 ]] && flag=--direct
    : >"$T/acks-$d"
    python3 "$TOOL" ackwrite "$EAST_MNT/vm1/$d" "$RING_BASE" "$RING_SLOTS" \
      "$T/ackstate-$d.json" "$T/acks-$d" $flag --interval 0.004 2>"$T/ackwrite-$d.err" &
    LOAD_PIDS+=($!)
  done
  _PIDS+=("${LOAD_PIDS[@]}")
  # The load is on when both numbered writers have had a write acknowledged (by then fio,
  # started first, is writing too): the random delays count from there.
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -s $T/acks-d0 && -s $T/acks-d1 ]] && return 0
    sleep 0.05
  done
  echo "load round $LOAD_ROUND: no write acknowledged after 10 s" >>"$LIBLOG"
  return 1
}

# wait_load [SIGNAL]: sends SIGNAL (none: they are expected to stop by themselves, the
# daemon being gone) to the load, waits up to 20 s, then SIGKILL.
wait_load() {
  local sig=${1:-} pid i
  if [[ -n $sig ]]; then
    for pid in "${LOAD_PIDS[@]}"; do kill "-$sig" "$pid" 2>/dev/null || true; done
  fi
  for pid in "${LOAD_PIDS[@]}"; do
    for ((i = 0; i < 200; i++)); do
      _alive "$pid" || break
      sleep 0.1
    done
    if _alive "$pid"; then
      echo "load pid $pid still running 20 s after the fault; SIGKILL" >>"$LIBLOG"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    _forget_pid "$pid"
  done
  LOAD_PIDS=()
}

# write_markers SLOT: 64 KiB of random data at marker SLOT of each disk, acknowledged by
# fsync (O_DIRECT on d0, buffered on d1); the expected area is updated only when the write
# was acknowledged. Returns 1 if a write failed.
write_markers() {
  local slot=$(($1 % MARK_SLOTS)) d oflag rc=0
  head -c 65536 /dev/urandom >"$T/marker.bin"
  for d in d0 d1; do
    oflag=""
    [[ $d == d0 ]] && oflag="oflag=direct"
    if dd if="$T/marker.bin" of="$EAST_MNT/vm1/$d" bs=64k seek=$((MARK_MIB * 16 + slot)) \
      $oflag conv=notrunc,fsync status=none 2>>"$LIBLOG"; then
      dd if="$T/marker.bin" of="$T/markers-$d.exp" bs=64k seek="$slot" conv=notrunc status=none
    else
      rc=1
    fi
  done
  return $rc
}

# ---------------------------------------------------------------------------------------
# Checks.
reset_checks() {
  CHECK_acked=skip CHECK_prefix=skip CHECK_sha256=skip CHECK_MSG="" CHECK_CYCLE=""
  CONV_SECONDS="" CONV_TARGET="" REBASED=0
  ACKED_WRITES=0
}
add_msg() { CHECK_MSG+="${CHECK_MSG:+; }$*"; }

# check_acked: markers and numbered blocks, read through the primary's disks.
check_acked() {
  local d out ok=1 total=0
  for d in d0 d1; do
    if ! cmp -s <(dd if="$EAST_MNT/vm1/$d" bs=1M skip="$MARK_MIB" count=4 iflag=direct status=none) \
      "$T/markers-$d.exp"; then
      ok=0
      add_msg "$d: acknowledged marker data differs: $(cmp <(dd if="$EAST_MNT/vm1/$d" bs=1M \
        skip="$MARK_MIB" count=4 iflag=direct status=none) "$T/markers-$d.exp" 2>&1 | head -c 200)"
    fi
    if out=$(python3 "$TOOL" ackverify "$EAST_MNT/vm1/$d" "$RING_BASE" "$RING_SLOTS" \
      "$T/ackstate-$d.json" "$T/acks-$d" 2>&1); then
      :
    else
      ok=0
      add_msg "$d: acknowledged numbered blocks: $out"
    fi
    total=$((total + $(jq_py "d.get('acked', 0)" <<<"$out" 2>/dev/null || echo 0)))
  done
  ACKED_WRITES=$total
  if ((ok)); then CHECK_acked=pass; else CHECK_acked=fail; fi
}

# east_state: "APPLIED PENDING_BYTES STATE" of vm1 at east.
east_state() {
  vm_field "$EAST_CONF" vm1 \
    "f\"{v.get('applied_cycle', 0)} {sum(x.get('pending_bytes', 0) for x in v['disks'])} {v['state'].replace(' ', '_')}\""
}

# converge [TIMEOUT_S]: see the top. Sets CONV_TARGET, CONV_SECONDS, CONV_MSG.
converge() {
  local timeout=${1:-90} start=$SECONDS st applied pending state i
  CONV_MSG=""
  CONV_TARGET=$("$SITEREP" -c "$EAST_CONF" cut vm1 --json 2>&1 | jq_py "d['cycle']" 2>/dev/null) ||
    { CONV_MSG="siterep cut failed"; return 1; }
  for ((i = 0; i < timeout * 5; i++)); do
    st=$(east_state 2>/dev/null) || st="0 -1 unknown"
    read -r applied pending state <<<"$st"
    [[ $state == resync_required ]] && { CONV_MSG="east: resync required"; return 1; }
    if [[ -n $applied && $applied -ge $CONV_TARGET && $pending -eq 0 ]]; then
      CONV_SECONDS=$((SECONDS - start))
      return 0
    fi
    sleep 0.2
  done
  CONV_MSG="the replica did not reach cycle $CONV_TARGET in ${timeout}s (applied $applied, $pending bytes pending, state $state)"
  return 1
}

archive_list() {
  (cd "$T/archive/vm1" && find d0 d1 -name '*.seg' | sort)
}

# check_replica: sha256 and siterep-check; rebases when it may.
check_replica() {
  local d a b west_applied ends rc=0 list_before list_after
  for d in d0 d1; do
    a=$(sha256sum <"$T/$d.img" | cut -c1-64)
    b=$(sha256sum <"$WEST_STATE/replicas/vm1/$d.img" | cut -c1-64)
    if [[ $a != "$b" ]]; then
      CHECK_sha256=fail
      add_msg "$d: primary image sha256 ${a:0:16} != replica ${b:0:16}"
    fi
  done
  [[ $CHECK_sha256 == fail ]] || CHECK_sha256=pass
  list_before=$(archive_list)
  "$BIN/siterep-check" --work-dir "$T/work" \
    "$T/pre/d0.img" "$T/archive/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" \
    "$T/pre/d1.img" "$T/archive/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" \
    >"$T/check.out" 2>&1 || rc=$?
  west_applied=$(vm_field "$WEST_CONF" vm1 "v['applied_cycle']" 2>/dev/null || echo "?")
  CHECK_CYCLE=$(sed -n 's/^consistent: .* through cycle \([0-9]*\)$/\1/p' "$T/check.out")
  if [[ $rc -ne 0 || -z $CHECK_CYCLE ]]; then
    CHECK_prefix=fail
    add_msg "siterep-check: $(tr '\n' ' ' <"$T/check.out" | head -c 600)"
  elif [[ $CHECK_CYCLE != "$west_applied" ]]; then
    CHECK_prefix=fail
    add_msg "siterep-check: consistent at cycle $CHECK_CYCLE but west applied $west_applied"
  else
    CHECK_prefix=pass
  fi
  # Rebase: only when the replica is the whole archived log and nothing came in meanwhile.
  ends=$(sed -n 's/.*(log ends at cycle \([0-9]*\))$/\1/p' "$T/check.out" | sort -u)
  list_after=$(archive_list)
  if [[ $CHECK_prefix == pass && $CHECK_sha256 == pass && $ends == "$CHECK_CYCLE" &&
    $list_before == "$list_after" ]]; then
    for d in d0 d1; do
      cp --sparse=always "$WEST_STATE/replicas/vm1/$d.img" "$T/pre/$d.img.new"
      mv "$T/pre/$d.img.new" "$T/pre/$d.img"
    done
    (cd "$T/archive/vm1" && xargs -r rm -f <<<"$list_before")
    REBASED=1
  else
    REBASED=0
  fi
}

# save_failure NAME: daemon logs, status, check output, load output for a failed
# iteration, under $OUT/failures/NAME. Prints the folder.
save_failure() {
  local dir=$OUT/failures/$1 f
  mkdir -p "$dir"
  for f in "${_LOGS[@]}"; do
    [[ -s $f ]] || continue
    tail -n 400 "$f" >"$dir/$(basename "$f")"
  done
  # Only the newest few daemon logs matter; drop the rest.
  (cd "$dir" && ls -1 siterepd.*.log 2>/dev/null | sort -t. -k2 -n | head -n -4 | xargs -r rm -f)
  status_json "$EAST_CONF" >"$dir/east-status.json" 2>&1 || true
  status_json "$WEST_CONF" >"$dir/west-status.json" 2>&1 || true
  cp "$T/check.out" "$T"/fio-*.out "$T"/ackwrite-*.err "$dir/" 2>/dev/null || true
  tail -n 200 "$LIBLOG" >"$dir/lib.log" 2>/dev/null || true
  cp "$EAST_CONF" "$WEST_CONF" "$dir/" 2>/dev/null || true
  echo "$dir"
}

# verdict: pass when no check failed.
verdict() {
  if [[ $CHECK_acked == fail || $CHECK_prefix == fail || $CHECK_sha256 == fail ]]; then
    echo fail
  else
    echo pass
  fi
}

checks_json() {
  echo "{\"acked\": \"$CHECK_acked\", \"prefix\": \"$CHECK_prefix\", \"sha256\": \"$CHECK_sha256\"}"
}

# ilog LINE: the one line of an iteration.
ilog() { echo "[$CLASS_SCRIPT +$((SECONDS - START_SECONDS))s] $*"; }

# ---------------------------------------------------------------------------------------
# checks_after_load [CONVERGE_TIMEOUT_S]: with the load stopped, check_acked, then converge
# and check_replica; a convergence that does not come fails prefix and sha256.
checks_after_load() {
  check_acked
  if converge "${1:-120}"; then
    check_replica
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
}

# class_checkpoint CLASS N [CONVERGE_TIMEOUT_S]: a checkpoint of a class that checks every
# so many iterations (link_cuts.sh's): the load stops, checks_after_load, and one
# kind=checkpoint record for CLASS after iteration N.
class_checkpoint() {
  local class=$1 n=$2 t0_ns result secs summary artifacts=""
  t0_ns=$(date +%s%N)
  reset_checks
  wait_load TERM
  checks_after_load "${3:-120}"
  result=$(verdict)
  [[ $result == fail ]] && artifacts=$(save_failure "$class-checkpoint-after-$n")
  secs=$(python3 -c "import time; print(round((time.time_ns() - $t0_ns) / 1e9, 2))")
  summary="checkpoint after $class $n: load stopped; acked $ACKED_WRITES numbered writes + markers: $CHECK_acked; caught up at cycle $CONV_TARGET in ${CONV_SECONDS:-?}s; siterep-check: $CHECK_prefix${CHECK_CYCLE:+ (cycle $CHECK_CYCLE)}; sha256: $CHECK_sha256${CHECK_MSG:+; why: $CHECK_MSG}"
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=checkpoint class="$class" n="$n" \
    checks="$(checks_json)" result="$result" seconds="$secs" acked_writes="$ACKED_WRITES" \
    cycle="${CHECK_CYCLE:-null}" caught_up_cycle="${CONV_TARGET:-null}" rebased="$REBASED" \
    summary="$summary" why="$CHECK_MSG" artifacts="$artifacts"
}

# restart_site east|west [DOWN_S]: after that site's siterepd died: its stale mount
# removed, DOWN_S seconds down (default 0), started again. RESTART_MS: how long the start
# took. (A primary's load must have stopped first: its FUSE connection is gone.)
restart_site() {
  local r0 conf=$EAST_CONF
  [[ $1 == west ]] && conf=$WEST_CONF
  unmount_stale "$conf"
  sleep "${2:-0}"
  r0=$(date +%s%N)
  if [[ $1 == west ]]; then start_west >>"$LIBLOG"; else start_east >>"$LIBLOG"; fi
  RESTART_MS=$((($(date +%s%N) - r0) / 1000000))
}

# give_up_after FAILED_IN_ROW CLASS WHAT: after 3 failed iterations in a row the sites are
# not in a state to go on: a note for the summary, and the class ends failed.
give_up_after() {
  (($1 >= 3)) || return 0
  python3 "$TOOL" record "$RECORDS" kind=note class="$2" \
    text="stopped after $3: 3 in a row failed; the sites are not in a state to go on"
  fail "3 in a row failed, the last $3"
}
