#!/usr/bin/env bash
# Fault class "failpoint crashes": the daemon that has a failpoint is made to abort there
# (as kill -9 would: failpoint "abort") under write load, once per iteration, at every
# failpoint of the data path that a running pair of sites reaches, and at the steps of a
# planned failover:
#   east (primary)  tracker.after_mark, tracker.mid_cut, tracker.before_seal,
#                   tracker.after_seal, tracker.mid_release, shipper.after_send (log shipping)
#   west (replica)  receiver.before_ack, applier.before_apply, applier.after_undo,
#                   applier.mid_apply, applier.before_position, applier.before_point,
#                   applier.before_delete
#   during `siterep resync vm1` (with --full or not, drawn): tracker.snapshot_mid and
#                   shipper.after_send (sync data) at east, applier.sync_mid_write and
#                   applier.sync_before_end at west; replication is paused for 0.5-2 s of
#                   the load first, so that the replica lags and the sync has blocks to send
#   during `siterep failover vm1 --planned` at east: control.planned_after_persist,
#                   control.planned_after_drain, control.planned_before_demote at east,
#                   control.promote_after_persist at west
# (siterep failpoint --list names every point. The other control.* points, of unplanned
# failover, commit and reverse, are crashed by tests/failover_crash.sh, without load.)
# Each iteration: start the load, write markers, arm NAME=abort@SKIP*1 at the daemon that
# has the point (siterep failpoint; SKIP drawn per point) -- for the sync points: pause,
# arm, resync, resume; for the failover points: arm, failover -- and wait until that
# daemon exits. Checked:
#   reached   the daemon died within FAULTS_FAILPOINT_TIMEOUT s (default 30) of the arming
#   fired     it died of SIGABRT and its log names the point ("failpoint NAME: abort")
# then the crashed daemon is restarted (a primary's load stops with errors first, as in
# crash_points.sh; a replica stays down 0-2 s under load and the load runs 1-3 s more).
# A failover iteration then runs the failover again at east until it succeeds, and fails
# back from west:
#   finished  the failover ended with east replica, west primary (30 tries, 1 s apart)
#   equal     west's disks hash as east's images (its replica now)
#   failback  the planned failover at west ended with east primary, west replica again
# Then the checks of crash_points.sh: acked, converge, prefix (siterep-check), sha256. After
# a failover and back the replica's cycles start again, which siterep-check cannot relate
# to the archived log: there prefix is skipped, sha256 must pass, and the images become
# the pre-image of the checks that follow.
#
#   bash tests/faults/failpoints.sh BIN_DIR OUT_DIR
# Environment:
#   FAULTS_FAILPOINT_ROUNDS  rounds over the points (default 4: 84 crashes)
#   FAULTS_FAILPOINT_POINTS  a number N: each round takes N points drawn at random (a slice);
#                            or names (space-separated, "NAME" or "NAME/resync"): only those;
#                            default all
#   FAULTS_FAILPOINT_TIMEOUT seconds to wait for a point to be reached (default 30)
#   FAULTS_SEED              every random choice (default: a new one, printed)
# Records go to OUT_DIR/failpoints.jsonl, one per crash (class failpoint_crash).
CLASS_SCRIPT=failpoints
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

ROUNDS=${FAULTS_FAILPOINT_ROUNDS:-4}
POINTS=${FAULTS_FAILPOINT_POINTS:-}
TIMEOUT=${FAULTS_FAILPOINT_TIMEOUT:-30}
SEED=${FAULTS_SEED:-$(new_seed)}
[[ $ROUNDS =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ && $TIMEOUT =~ ^[0-9]+$ ]] ||
  fail "FAULTS_FAILPOINT_ROUNDS, FAULTS_FAILPOINT_TIMEOUT and FAULTS_SEED must be whole numbers"

# The points: NAME SITE DRIVER MAX_SKIP. DRIVER load: the write load reaches it; resync:
# `siterep resync vm1` does. MAX_SKIP keeps the crash within a few seconds of the arming:
# per write or record about 1000 passes a second under the load, per cycle (a cut a
# second, "continuous") one or two. A sync writes the blocks that differ at the replica:
# fio, restarted each iteration, writes the same data at the same offsets again at first
# (its randrepeat), so only the numbered writes and the markers surely differ, a few
# runs of blocks per disk; a sync's snapshot is read in 16 MiB batches or per dirty range.
POINT_TABLE="
tracker.after_mark    east load   2000
tracker.mid_cut         east load   5
tracker.before_seal     east load   10
tracker.after_seal      east load   10
tracker.mid_release     east load   10
shipper.after_send      east load   30
receiver.before_ack     west load   5
applier.before_apply    west load   5
applier.after_undo      west load   5
applier.mid_apply       west load   1500
applier.before_position west load   5
applier.before_point    west load   5
applier.before_delete   west load   5
tracker.snapshot_mid    east resync 3
shipper.after_send      east resync 30
applier.sync_mid_write  west resync 3
applier.sync_before_end west resync 0
control.planned_after_persist east failover 0
control.planned_after_drain   east failover 0
control.planned_before_demote east failover 0
control.promote_after_persist west failover 0
"
# Every name is one the daemon knows (siterep failpoint --list).
while read -r name _; do
  [[ -z $name ]] && continue
  "$SITEREP" failpoint --list | grep -q "^$name " || fail "failpoint $name is not in siterep failpoint --list"
done <<<"$POINT_TABLE"

# The plan, from the seed alone:
#   N NAME SITE DRIVER SKIP LOAD_S DOWN_S AFTER_S FULL LAG_S SLOT
python3 - "$SEED" "$ROUNDS" "$POINTS" "$POINT_TABLE" >"$T/plan" <<'PY' ||
import random, sys
rng = random.Random(f"failpoint_crash:{sys.argv[1]}")
rounds, only = int(sys.argv[2]), sys.argv[3].split()
table = [l.split() for l in sys.argv[4].strip().splitlines()]
def key(p):
    return p[0] + ("/resync" if p[2] == "resync" else "")  # failover points: by name
if only and not (len(only) == 1 and only[0].isdigit()):
    unknown = set(only) - {key(p) for p in table}
    if unknown:
        sys.exit(f"no such point: {' '.join(sorted(unknown))}")
    table = [p for p in table if key(p) in only]
n = 0
for r in range(rounds):
    points = table[:]
    rng.shuffle(points)
    if len(only) == 1 and only[0].isdigit():
        points = points[:int(only[0])]
    for name, site, driver, max_skip in points:
        n += 1
        print(n, name, site, driver, rng.randint(0, int(max_skip)), f"{rng.uniform(0.5, 2.0):.2f}",
              f"{rng.uniform(0.0, 2.0):.2f}", f"{rng.uniform(1.0, 3.0):.2f}",
              rng.choice(["full", "dirty"]), f"{rng.uniform(0.5, 2.0):.2f}", rng.randrange(64))
PY
  fail "bad FAULTS_FAILPOINT_POINTS: $POINTS"
total=$(wc -l <"$T/plan")

setup_sites >>"$LIBLOG"
ilog "sites up: east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID; load $RATE/s per disk; $total failpoint crashes ($ROUNDS rounds), seed $SEED (FAULTS_SEED)"
python3 "$TOOL" record "$RECORDS" kind=class_info class=failpoint_crash \
  injected="abort (as kill -9) at a named failpoint of the daemon that has it, armed over the control socket (siterep failpoint NAME=abort@SKIP*1, SKIP drawn per point) under write load: tracker.after_mark, tracker.mid_cut, tracker.before_seal, tracker.after_seal, tracker.mid_release, shipper.after_send at east; receiver.before_ack, applier.before_apply, applier.after_undo, applier.mid_apply, applier.before_position, applier.before_point, applier.before_delete at west; during siterep resync vm1 (--full or not, after 0.5-2 s paused): tracker.snapshot_mid, shipper.after_send at east, applier.sync_mid_write, applier.sync_before_end at west; during siterep failover vm1 --planned: control.planned_after_persist, control.planned_after_drain, control.planned_before_demote at east, control.promote_after_persist at west; then a restart of the crashed daemon (a failover: run again to its end, then back)" \
  checked='["reached: the daemon died within the timeout of the arming", "fired: it died of SIGABRT and its log names the point", "failover points: finished (east replica, west primary), equal (disks hash the same), failback (east primary again)", "acked, prefix (siterep-check; skipped after a failover and back, whose images become the new pre-image), sha256 after the restart and convergence"]'

# site_conf SITE / site_pid SITE / site_log SITE
site_conf() { if [[ $1 == east ]]; then echo "$EAST_CONF"; else echo "$WEST_CONF"; fi; }
site_pid() { if [[ $1 == east ]]; then echo "$EAST_PID"; else echo "$WEST_PID"; fi; }
site_log() { if [[ $1 == east ]]; then echo "$EAST_LOG"; else echo "$WEST_LOG"; fi; }

# wait_exit PID TIMEOUT_S: true when PID exits within the timeout; sets EXIT_MS.
wait_exit() {
  local pid=$1 t0 i
  t0=$(date +%s%N)
  for ((i = 0; i < $2 * 20; i++)); do
    if ! _alive "$pid"; then
      EXIT_MS=$((($(date +%s%N) - t0) / 1000000))
      return 0
    fi
    sleep 0.05
  done
  return 1
}

WEST_MNT=$(config_value "$WEST_CONF" mountpoint)
declare -A ARMED REACHED PASSED
consecutive_failures=0 failed=0
# ctl CONF ARGS...: siterep -c CONF ARGS; false (with the reason in CHECK_MSG) if refused.
ctl() {
  local conf=$1 out
  shift
  out=$("$SITEREP" -c "$conf" "$@" 2>&1) && return 0
  add_msg "siterep $* at $(basename "$conf" .toml) refused: $out"
  return 1
}

# resync_armed: pause replication, LAG_S of load, arm, resync, resume. The paused shipper
# sends nothing, so the armed point is reached in the sync, not in the log shipping before.
resync_armed() {
  ctl "$EAST_CONF" pause vm1 || return 1
  sleep "$lag_s"
  ctl "$conf" failpoint "$spec" &&
    ctl "$EAST_CONF" resync vm1 $([[ $full == full ]] && echo --full) &&
    ctl "$EAST_CONF" resume vm1 && return 0
  ctl "$EAST_CONF" resume vm1 || true
  return 1
}

# failover_armed: arm, then the planned failover east -> west, which the crash cuts short
# (false, with the reason, only if the arming was refused).
failover_armed() {
  ctl "$conf" failpoint "$spec" || return 1
  if timeout 120 "$SITEREP" -c "$EAST_CONF" failover vm1 --planned >>"$LIBLOG" 2>&1; then
    add_msg "the failover finished: $point did not stop it"
  fi
  return 0
}

# planned CONF: siterep -c CONF failover vm1 --planned until it succeeds (a site that just
# restarted answers "try again" for a moment), at most 30 tries a second apart.
planned() {
  local i out
  for ((i = 0; i < 30; i++)); do
    out=$(timeout 120 "$SITEREP" -c "$1" failover vm1 --planned 2>&1) && return 0
    sleep 1
  done
  add_msg "siterep failover vm1 --planned at $(basename "$1" .toml) refused 30 times: $out"
  return 1
}

# roles: "EAST_ROLE WEST_ROLE" of vm1.
roles() {
  echo "$(vm_field "$EAST_CONF" vm1 "v['role']" 2>/dev/null || echo "?")" \
    "$(vm_field "$WEST_CONF" vm1 "v['role']" 2>/dev/null || echo "?")"
}

# planned_to CONF ROLES: the planned failover run at CONF (unless done) ends in ROLES.
planned_to() {
  local r
  [[ $(roles) == "$2" ]] || planned "$1" || true
  r=$(roles)
  [[ $r == "$2" ]] && return 0
  add_msg "after siterep failover vm1 --planned at $(basename "$1" .toml): roles east/west $r"
  return 1
}

# same_disks WHAT A B: A and B (paths with %s for the disk) hash the same for d0 and d1;
# else false, with the reason.
same_disks() {
  local d a b rc=0
  for d in d0 d1; do
    # shellcheck disable=SC2059
    a=$(sha256sum <"$(printf "$2" "$d")" | cut -c1-64)
    # shellcheck disable=SC2059
    b=$(sha256sum <"$(printf "$3" "$d")" | cut -c1-64)
    if [[ $a != "$b" ]]; then
      add_msg "$1: $d ${a:0:16} != ${b:0:16}"
      rc=1
    fi
  done
  return $rc
}

# finish_failover: the interrupted failover run again to its end (CHECK_finished), the disks
# equal (CHECK_equal), and the failback west -> east (CHECK_failback); the load stops on the
# read-only disks.
finish_failover() {
  CHECK_finished=fail
  planned_to "$EAST_CONF" "replica primary" && CHECK_finished=pass
  wait_load TERM
  if [[ $CHECK_finished == pass ]]; then
    # West's disks (primary now) hash as east's images (its replica now).
    CHECK_equal=pass
    same_disks "after the failover, west's disk vs east's image" "$WEST_MNT/vm1/%s" "$T/%s.img" ||
      CHECK_equal=fail
    CHECK_failback=fail
    planned_to "$WEST_CONF" "primary replica" && CHECK_failback=pass
  fi
  return 0
}

# rebase_after_failover: a failover and back starts the replica's cycles again, so
# siterep-check cannot relate it to the archived log: the images must hash the same
# (CHECK_sha256), and become the pre-image of the checks that follow (archive emptied).
rebase_after_failover() {
  local d
  CHECK_sha256=pass
  if ! same_disks "primary image vs replica" "$T/%s.img" "$WEST_STATE/replicas/vm1/%s.img"; then
    CHECK_sha256=fail
    return 0
  fi
  for d in d0 d1; do
    cp --sparse=always "$T/$d.img" "$T/pre/$d.img.new"
    mv "$T/pre/$d.img.new" "$T/pre/$d.img"
  done
  (cd "$T/archive/vm1" && find d0 d1 -name '*.seg' -delete)
  REBASED=1
}

# reached: the victim died at the point (within TIMEOUT s, or while it was being disarmed).
reached() {
  wait_exit "$victim" "$TIMEOUT" && return 0
  if ! "$SITEREP" -c "$conf" failpoint "$name=off" >>"$LIBLOG" 2>&1; then
    wait_exit "$victim" 5 && return 0
  fi
  # It may have fired in another thread while the control thread disarmed it.
  wait_exit "$victim" 1
}

while read -r -u 3 n name site driver skip load_s down_s after_s full lag_s slot; do
  t0_ns=$(date +%s%N)
  reset_checks
  CHECK_reached=skip CHECK_fired=skip CHECK_finished=skip CHECK_equal=skip CHECK_failback=skip
  point=$name
  [[ $driver == resync ]] && point+="/resync"
  conf=$(site_conf "$site")
  victim=$(site_pid "$site")
  victim_log=$(site_log "$site")
  torn=false holes=false cut_done=false redone=0 restart_ms=0 exit_code=null fire_ms=null note="" what=""
  start_load || note="no numbered write acknowledged within 10 s of starting the load"
  sleep "$load_s"
  write_markers "$slot" || note+="${note:+; }a marker write failed before the arming"
  spec="$name=abort@$skip*1"
  ARMED[$point]=$((${ARMED[$point]:-0} + 1))
  msg_before=$CHECK_MSG
  case $driver in
    load) ctl "$conf" failpoint "$spec" || CHECK_reached=fail ;;
    resync) resync_armed || CHECK_reached=fail ;;
    failover) failover_armed || CHECK_reached=fail ;;
  esac
  # The point may fire while the driver's own commands still run (a resync's snapshot,
  # before the resume is asked): the daemon they talk to is gone, which is the point
  # reached, not a refusal.
  if [[ $CHECK_reached == fail ]] && ! _alive "$victim"; then
    CHECK_reached=skip CHECK_MSG=$msg_before
  fi
  if [[ $CHECK_reached == skip ]]; then
    if reached; then
      CHECK_reached=pass
      fire_ms=${EXIT_MS:-$((TIMEOUT * 1000))}
      rc=0
      wait "$victim" 2>/dev/null || rc=$?
      _forget_pid "$victim"
      exit_code=$rc
      if [[ $rc -eq 134 ]] && grep -q "failpoint $name: abort" "$victim_log"; then
        CHECK_fired=pass
      else
        CHECK_fired=fail
        add_msg "$site exited with $rc; its log: $(grep -m1 -o 'failpoint [a-z_.]*: abort' "$victim_log" || echo "no failpoint abort")"
      fi
    else
      CHECK_reached=fail
      add_msg "$point not reached within ${TIMEOUT}s of the arming (skip $skip); disarmed"
    fi
  else
    "$SITEREP" -c "$conf" failpoint "$name=off" >>"$LIBLOG" 2>&1 || true
  fi
  if [[ $CHECK_reached == pass ]]; then
    if [[ $site == east ]]; then
      wait_load # the FUSE connection is gone: the load stops with errors
      restart_site east
      restart_ms=$RESTART_MS
      grep -q 'dropping the torn tail' "$EAST_LOG" && torn=true
      grep -q 'had holes' "$EAST_LOG" && holes=true
      grep -q 'completing the interrupted cut' "$EAST_LOG" && cut_done=true
      redone=$(sed -n 's/.*redid \([0-9]*\) records.*/\1/p' "$EAST_LOG" | awk '{s += $1} END {print s + 0}')
      what="$site aborted at $spec ${fire_ms} ms after the arming; restarted in ${restart_ms} ms"
    elif [[ $driver == failover ]]; then
      restart_site west
      restart_ms=$RESTART_MS
      what="$site aborted at $spec ${fire_ms} ms after the arming; restarted in ${restart_ms} ms"
    else
      restart_site west "$down_s"
      restart_ms=$RESTART_MS
      sleep "$after_s"
      wait_load TERM
      what="$site aborted at $spec ${fire_ms} ms after the arming; down ${down_s}s under load, restarted in ${restart_ms} ms, load ${after_s}s more"
    fi
  else
    [[ $driver == failover ]] || wait_load TERM
    what="$spec armed at $site, not reached within ${TIMEOUT}s"
    # A daemon that died all the same (not at the point) starts again, so that the next
    # iterations are not failed by this one.
    if ! _alive "$victim"; then
      wait "$victim" 2>/dev/null || true
      _forget_pid "$victim"
      restart_site "$site"
      what+="; $site had died (restarted)"
    fi
  fi
  if [[ $driver == resync ]]; then
    # Should the pause have outlived the crash, replication goes on.
    ctl "$EAST_CONF" resume vm1 || true
    what="siterep resync vm1 ($full) after ${lag_s}s paused: $what"
  fi
  if [[ $driver == failover ]]; then
    finish_failover
    what="siterep failover vm1 --planned under load: $what; the failover finished: $CHECK_finished, disks equal: $CHECK_equal, failed back: $CHECK_failback"
  fi
  check_acked
  if converge 120; then
    if [[ $driver == failover ]]; then rebase_after_failover; else check_replica; fi
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  result=$(verdict)
  [[ " $CHECK_reached $CHECK_fired $CHECK_finished $CHECK_equal $CHECK_failback " == *" fail "* ]] &&
    result=fail
  artifacts=""
  if [[ $result == fail ]]; then
    artifacts=$(save_failure "failpoint-$n-${name}")
    consecutive_failures=$((consecutive_failures + 1))
    failed=$((failed + 1))
  else
    consecutive_failures=0
    PASSED[$point]=$((${PASSED[$point]:-0} + 1))
  fi
  [[ $CHECK_reached == pass ]] && REACHED[$point]=$((${REACHED[$point]:-0} + 1))
  secs=$(python3 -c "import time; print(round((time.time_ns() - $t0_ns) / 1e9, 2))")
  summary="failpoint $n/$total $point: $what; reached: $CHECK_reached, fired: $CHECK_fired; acked $ACKED_WRITES numbered writes + markers: $CHECK_acked; caught up at cycle $CONV_TARGET in ${CONV_SECONDS:-?}s; siterep-check: $CHECK_prefix${CHECK_CYCLE:+ (cycle $CHECK_CYCLE)}; sha256: $CHECK_sha256"
  [[ $site == east && $CHECK_reached == pass ]] && summary+="; recovery: torn tail $torn, holes $holes, redone $redone, interrupted cut completed $cut_done"
  [[ -n $note ]] && summary+="; note: $note"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class=failpoint_crash n="$n" \
    point="$name" site="$site" driver="$driver" spec="$spec" \
    seed_choice="{\"skip\": $skip, \"load_s\": $load_s, \"down_s\": $down_s, \"after_s\": $after_s, \"resync\": \"$full\", \"lag_s\": $lag_s, \"marker_slot\": $slot}" \
    action="$what" result="$result" seconds="$secs" \
    checks="{\"reached\": \"$CHECK_reached\", \"fired\": \"$CHECK_fired\", \"finished\": \"$CHECK_finished\", \"equal\": \"$CHECK_equal\", \"failback\": \"$CHECK_failback\", \"acked\": \"$CHECK_acked\", \"prefix\": \"$CHECK_prefix\", \"sha256\": \"$CHECK_sha256\"}" \
    exit_code="$exit_code" fire_ms="$fire_ms" restart_ms="$restart_ms" \
    acked_writes="$ACKED_WRITES" cycle="${CHECK_CYCLE:-null}" caught_up_cycle="${CONV_TARGET:-null}" \
    recovery_torn_tail="$torn" recovery_holes="$holes" redone_records="$redone" \
    recovery_cut_completed="$cut_done" \
    rebased="${REBASED:-0}" summary="$summary" why="$CHECK_MSG" artifacts="$artifacts" note="$note"
  give_up_after "$consecutive_failures" failpoint_crash "failpoint crash $n"
done 3<"$T/plan"

ilog "done: $total failpoint crashes, $failed failed; per point (armed / reached / passed):"
while read -r name site driver _; do
  [[ -z $name ]] && continue
  point=$name
  [[ $driver == resync ]] && point+="/resync"
  [[ -n ${ARMED[$point]:-} ]] || continue
  ilog "  $(printf '%-32s %-4s %3d / %3d / %3d' "$point" "$site" "${ARMED[$point]}" "${REACHED[$point]:-0}" "${PASSED[$point]:-0}")"
done <<<"$POINT_TABLE"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
