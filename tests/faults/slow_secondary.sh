#!/usr/bin/env bash
# Fault classes "slow_secondary" and "stalled_secondary": under write load at the primary,
# the replica's siterepd is throttled (a cpu cgroup of its own with a CPU quota of 3-10%
# of one CPU) or stopped (SIGSTOP) for a while, then let go. One pair of sites for all
# iterations, alternating the two kinds; FAULTS_SLOW iterations (default 10), choices from
# FAULTS_SEED. Every FAULTS_SLOW_LONG-th stall (default 5th) lasts 40 s, past the health
# budget of a continuous VM (2 x 1 s + 30 s), so that health must turn warning.
#
# Checks of each iteration:
#   guest_io   the primary's guest is not held by its replica: during the fault, both
#              numbered writers (4 KiB + fsync each, see fault_tool.py ackwrite) go on being
#              acknowledged, the longest gap between two acknowledgements is under
#              FAULTS_SLOW_MAX_GAP seconds (default 2.5; the same gap is measured for as
#              long before the fault and recorded beside it), and fio is still running
#   lag        the primary's status shows the replica falling behind: rpo_seconds or
#              pending bytes grow during the fault (the largest values are recorded); a
#              stall longer than the budget must also show health warning or critical
#   acked, prefix, sha256  after the fault the load stops, and the checks of
#              crash_points.sh run (common.sh): every acknowledged write reads back,
#              siterep-check finds the replica a prefix of the log, images hash the same
#   recovered  the link is connected again and the replica caught up (converge)
#
#   bash tests/faults/slow_secondary.sh BIN_DIR OUT_DIR
CLASS_SCRIPT=slow_secondary
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
set -- "$1"
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

ITER=${FAULTS_SLOW:-10}
LONG_EVERY=${FAULTS_SLOW_LONG:-5}
MAX_GAP=${FAULTS_SLOW_MAX_GAP:-2.5}
SEED=${FAULTS_SEED:-$RANDOM}
CG_ROOT=/sys/fs/cgroup/cpu
[[ -f $CG_ROOT/cgroup.procs ]] || CG_ROOT=/sys/fs/cgroup  # cgroup v2
CG=$CG_ROOT/siterep-faults-$$
mkdir "$CG" || skip "cannot make a cpu cgroup under $CG_ROOT"
# Our own clean-up first: the replica back in the root group, SIGCONT, the group removed.
_slow_end() {
  local rc=$?
  if [[ -n ${WEST_PID:-} ]] && _alive "$WEST_PID"; then
    kill -CONT "$WEST_PID" 2>/dev/null || true
    echo "$WEST_PID" >"$CG_ROOT/cgroup.procs" 2>/dev/null || true
  fi
  rmdir "$CG" 2>/dev/null || true
  (exit "$rc")
  _faults_end
}
trap _slow_end EXIT

python3 "$TOOL" record "$RECORDS" kind=class_info class=slow_secondary \
  injected="the replica siterepd moved into a cpu cgroup with a quota of 3-10% of one CPU for 3-8 s under write load, then moved back" \
  checked='["guest_io: numbered fsynced writes at the primary keep being acknowledged, longest gap under the bound, fio running", "lag: rpo_seconds or pending bytes at the primary grow during the fault", "acked, prefix, sha256 after the fault (as crash points)", "recovered: the replica caught up"]'
python3 "$TOOL" record "$RECORDS" kind=class_info class=stalled_secondary \
  injected="SIGSTOP of the replica siterepd for 2-12 s (every ${LONG_EVERY}th stall 40 s, past the health budget) under write load, then SIGCONT" \
  checked='["guest_io: as for slow_secondary", "lag: rpo_seconds or pending bytes grow; a 40 s stall shows health warning or critical", "acked, prefix, sha256 after the fault", "recovered: the link reconnects and the replica caught up"]'

# set_quota PERCENT | off
set_quota() {
  if [[ $CG_ROOT == /sys/fs/cgroup ]]; then
    if [[ $1 == off ]]; then echo "max 100000" >"$CG/cpu.max"; else echo "$(($1 * 1000)) 100000" >"$CG/cpu.max"; fi
  else
    echo 100000 >"$CG/cpu.cfs_period_us"
    if [[ $1 == off ]]; then echo -1 >"$CG/cpu.cfs_quota_us"; else echo $(($1 * 1000)) >"$CG/cpu.cfs_quota_us"; fi
  fi
}

# watch_acks SECONDS OUT: samples both ack files every 20 ms for SECONDS; writes
# "MAX_GAP_S ACKS_D0 ACKS_D1" (the longest time either file did not grow).
watch_acks() {
  python3 - "$1" "$2" "$T/acks-d0" "$T/acks-d1" <<'PY'
import os, sys, time
secs, out, files = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
size = {f: os.path.getsize(f) for f in files}
first = dict(size)
last = {f: time.monotonic() for f in files}
gap = 0.0
end = time.monotonic() + secs
while time.monotonic() < end:
    time.sleep(0.02)
    now = time.monotonic()
    for f in files:
        s = os.path.getsize(f)
        if s != size[f]:
            size[f] = s
            last[f] = now
        gap = max(gap, now - last[f])
with open(out, "w") as o:
    o.write(f"{gap:.2f} " + " ".join(str(size[f] - first[f]) for f in files) + "\n")
PY
}

# watch_lag SECONDS OUT: polls east's status every 0.5 s; writes
# "MAX_RPO MAX_PENDING_BYTES WORST_HEALTH LAST_REASON".
watch_lag() {
  local end=$((SECONDS + $1)) rpo=0 pend=0 worst=normal reason="" line r p h why
  while ((SECONDS < end)); do
    line=$(vm_field "$EAST_CONF" vm1 \
      "f\"{v.get('rpo_seconds') or 0} {sum(x.get('pending_bytes', 0) for x in v['disks'])} {v['health']} {v.get('health_reason', '').replace(' ', '_')}\"" 2>/dev/null) || line=""
    if [[ -n $line ]]; then
      read -r r p h why <<<"$line"
      rpo=$(python3 -c "print(max($rpo, $r))")
      ((p > pend)) && pend=$p
      case $h in
        critical) worst=critical reason=$why ;;
        warning) [[ $worst == critical ]] || { worst=warning; reason=$why; } ;;
      esac
    fi
    sleep 0.5
  done
  echo "$rpo $pend $worst ${reason:--}" >"$2"
}

setup_sites
ilog "sites up: east pid $EAST_PID replicates vm1 to west pid $WEST_PID; load $RATE/s per disk; cgroup $CG"

read -r -a CHOICES <<<"$(python3 -c "
import random
r = random.Random($SEED * 7 + 3)
print(' '.join(f'{r.randint(3, 10)}:{r.randint(3, 8)}:{r.randint(2, 12)}' for _ in range($ITER)))")"

failed_in_row=0
for ((n = 1; n <= ITER; n++)); do
  IFS=: read -r quota slow_s stall_s <<<"${CHOICES[$((n - 1))]}"
  t0_ns=$(date +%s%N)
  reset_checks
  kind=slow_secondary
  ((n % 2 == 0)) && kind=stalled_secondary
  stall_no=$((n / 2))
  long=false
  if [[ $kind == stalled_secondary ]] && ((LONG_EVERY > 0 && stall_no % LONG_EVERY == 0)); then
    stall_s=40 long=true
  fi
  fault_s=$slow_s
  [[ $kind == stalled_secondary ]] && fault_s=$stall_s
  note=""
  start_load || note="no numbered write acknowledged within 10 s of starting the load"
  write_markers "$n" || note+="${note:+; }a marker write failed"
  # The same measure without the fault, for comparison (at most 5 s).
  base_s=$((fault_s < 5 ? fault_s : 5))
  watch_acks "$base_s" "$T/gap.base"
  read -r base_gap _ _ <"$T/gap.base"
  if [[ $kind == slow_secondary ]]; then
    set_quota "$quota"
    echo "$WEST_PID" >"$CG/cgroup.procs"
    what="west throttled to ${quota}% of a CPU for ${slow_s}s"
  else
    kill -STOP "$WEST_PID"
    what="west stopped (SIGSTOP) for ${stall_s}s"
  fi
  watch_lag "$fault_s" "$T/lag.out" &
  lag_pid=$!
  _PIDS+=("$lag_pid")
  watch_acks "$fault_s" "$T/gap.fault"
  wait "$lag_pid" || true
  _forget_pid "$lag_pid"
  fio_running=true
  for pid in "${LOAD_PIDS[@]}"; do _alive "$pid" || fio_running=false; done
  if [[ $kind == slow_secondary ]]; then
    echo "$WEST_PID" >"$CG_ROOT/cgroup.procs"
    set_quota off
  else
    kill -CONT "$WEST_PID"
  fi
  heal_ns=$(date +%s%N)
  read -r gap acks0 acks1 <"$T/gap.fault"
  read -r max_rpo max_pending worst reason <"$T/lag.out"
  c_io=pass
  if ! python3 -c "import sys; sys.exit(0 if $gap < $MAX_GAP else 1)" || ((acks0 == 0 || acks1 == 0)) ||
    [[ $fio_running != true ]]; then
    c_io=fail
    add_msg "guest I/O held: longest gap between acknowledged writes ${gap}s (bound ${MAX_GAP}s), $acks0/$acks1 bytes of acks, load running $fio_running"
  fi
  c_lag=pass
  if ! python3 -c "import sys; sys.exit(0 if $max_rpo >= 1 or $max_pending > 0 else 1)"; then
    c_lag=fail
    add_msg "lag not shown: rpo_seconds at most $max_rpo, pending at most $max_pending bytes"
  fi
  if [[ $long == true && $worst == normal ]]; then
    c_lag=fail
    add_msg "a ${stall_s}s stall left health normal (max rpo ${max_rpo}s)"
  fi
  # Let the replica work for a moment under load, then stop the load and check.
  sleep 1
  wait_load TERM
  check_acked
  c_rec=pass rec_s=""
  if converge 120; then
    rec_s=$(python3 -c "import time; print(round((time.time_ns() - $heal_ns) / 1e9, 2))")
    check_replica
  else
    c_rec=fail CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  result=$(verdict)
  [[ $c_io == pass && $c_lag == pass && $c_rec == pass ]] || result=fail
  checks="{\"guest_io\": \"$c_io\", \"lag\": \"$c_lag\", \"acked\": \"$CHECK_acked\", \"prefix\": \"$CHECK_prefix\", \"sha256\": \"$CHECK_sha256\", \"recovered\": \"$c_rec\"}"
  secs=$(python3 -c "import time; print(round((time.time_ns() - $t0_ns) / 1e9, 2))")
  summary="$kind $n/$ITER: $what; longest ack gap ${gap}s (${base_gap}s before the fault), load running $fio_running; status during it: rpo up to ${max_rpo}s, pending up to $max_pending bytes, health $worst${reason:+ ($reason)}; caught up ${rec_s:-?}s after the end (cycle $CONV_TARGET); acked $ACKED_WRITES: $CHECK_acked; siterep-check $CHECK_prefix; sha256 $CHECK_sha256"
  [[ -n $note ]] && summary+="; note: $note"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  artifacts=""
  if [[ $result == fail ]]; then
    artifacts=$(save_failure "$kind-$n")
    failed_in_row=$((failed_in_row + 1))
  else
    failed_in_row=0
  fi
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class="$kind" n="$n" action="$what" \
    checks="$checks" result="$result" seconds="$secs" fault_seconds="$fault_s" \
    max_ack_gap_s="$gap" base_ack_gap_s="$base_gap" max_rpo_s="$max_rpo" \
    max_pending_bytes="$max_pending" health="$worst" health_reason="$reason" \
    recovery_seconds="${rec_s:-null}" acked_writes="$ACKED_WRITES" long_stall="$long" \
    summary="$summary" why="$CHECK_MSG" artifacts="$artifacts" note="$note"
  ((failed_in_row >= 3)) && fail "3 iterations in a row failed"
done

ilog "done: $ITER iterations"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
