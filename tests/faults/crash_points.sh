#!/usr/bin/env bash
# Fault class "crash points": kill -9 of the primary (east) or of the replica (west)
# siterepd at random moments under write load, then a restart of the killed daemon only
# (one pair of sites for every crash point). After each: every write acknowledged by a
# flush reads back at the primary, and once the load stops and the replica has caught up,
# siterep-check finds the replica to be the pre-image plus the archived log through its
# applied cycle, and the images of both sites hash the same (tests/faults/common.sh).
#
#   bash tests/faults/crash_points.sh BIN_DIR PLAN OUT_DIR
# PLAN: the "crash" lines of fault_tool.py plan. Records go to OUT_DIR/crash_points.jsonl.
CLASS_SCRIPT=crash_points
PLAN=$(realpath "$2")
OUT=$(realpath -m "$3")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

setup_sites
ilog "sites up: east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID; load $RATE/s per disk"

total=$(grep -c '^crash ' "$PLAN" || true)

# flip_byte FILE OFFSET: inverts one byte in place.
flip_byte() {
  python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); at = int(sys.argv[2])
b = os.pread(fd, 1, at); os.pwrite(fd, bytes([b[0] ^ 0xFF]), at); os.fsync(fd); os.close(fd)' "$1" "$2"
}
consecutive_failures=0
while read -r kind n target load_s kill_delay down_s after_s slot; do
  [[ $kind == crash ]] || continue
  t0=$SECONDS
  t0_ns=$(date +%s%N)
  reset_checks
  torn=false holes=false redone=0 restart_ms=0 note=""
  start_load || note="no numbered write acknowledged within 10 s of starting the load"
  sleep "$load_s"
  write_markers "$slot" || note+="${note:+; }a marker write failed before the kill"
  sleep "$kill_delay"
  if [[ $target == primary ]]; then
    victim=$EAST_PID
    kill9 "$EAST_PID"
    wait_load                 # the FUSE connection is gone: the load stops with errors
    restart_site east
    restart_ms=$RESTART_MS
    grep -q 'dropping the torn tail' "$EAST_LOG" && torn=true
    grep -q 'had holes' "$EAST_LOG" && holes=true
    redone=$(sed -n 's/.*redid \([0-9]*\) records.*/\1/p' "$EAST_LOG" | awk '{s += $1} END {print s + 0}')
    what="kill -9 east (primary) pid $victim ${load_s}s into the load, ${kill_delay}s after the markers; restarted in ${restart_ms} ms"
  else
    victim=$WEST_PID
    kill9 "$WEST_PID"
    restart_site west "$down_s"
    restart_ms=$RESTART_MS
    sleep "$after_s"
    wait_load TERM
    what="kill -9 west (replica) pid $victim ${load_s}s into the load, ${kill_delay}s after the markers; down ${down_s}s under load, restarted in ${restart_ms} ms, load ${after_s}s more"
  fi
  # FAULTS_MUTATE=N (a check of the checks, not for figures): at crash point N, one byte
  # of the expected marker data and one byte of the replica's d1 are flipped before the
  # checks, and put back after them; all three checks must then fail.
  mutate=0
  [[ ${FAULTS_MUTATE:-0} == "$n" ]] && mutate=1
  ((mutate)) && flip_byte "$T/markers-d0.exp" 100
  check_acked
  ((mutate)) && flip_byte "$T/markers-d0.exp" 100
  if converge 90; then
    ((mutate)) && flip_byte "$WEST_STATE/replicas/vm1/d1.img" 5000000
    check_replica
    ((mutate)) && flip_byte "$WEST_STATE/replicas/vm1/d1.img" 5000000
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  result=$(verdict)
  recheck=""
  artifacts=""
  if [[ $result == fail ]]; then
    artifacts=$(save_failure "crash-$n-$target")
    # Transient or lasting? One more convergence and check after 10 s (not counted as a pass).
    sleep 10
    saved_msg=$CHECK_MSG saved=("$CHECK_acked" "$CHECK_prefix" "$CHECK_sha256")
    reset_checks
    if converge 90; then check_replica; else CHECK_prefix=fail CHECK_sha256=fail; add_msg "$CONV_MSG"; fi
    recheck="after 10 s more: prefix $CHECK_prefix, sha256 $CHECK_sha256 ${CHECK_MSG:+($CHECK_MSG)}"
    CHECK_MSG=$saved_msg CHECK_acked=${saved[0]} CHECK_prefix=${saved[1]} CHECK_sha256=${saved[2]}
    consecutive_failures=$((consecutive_failures + 1))
  else
    consecutive_failures=0
  fi
  secs=$(python3 -c "import time; print(round((time.time_ns() - $t0_ns) / 1e9, 2))")
  summary="crash $n/$total $target: $what; acked $ACKED_WRITES numbered writes + markers: $CHECK_acked; caught up at cycle $CONV_TARGET in ${CONV_SECONDS:-?}s; siterep-check: $CHECK_prefix${CHECK_CYCLE:+ (cycle $CHECK_CYCLE)}; sha256: $CHECK_sha256"
  [[ $target == primary ]] && summary+="; recovery: torn tail $torn, holes $holes, redone $redone"
  [[ -n $note ]] && summary+="; note: $note"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  [[ -n $recheck ]] && summary+="; $recheck"
  ilog "${summary} -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class="crash_$target" n="$n" \
    seed_choice="{\"load_s\": $load_s, \"kill_delay_s\": $kill_delay, \"down_s\": $down_s, \"after_s\": $after_s, \"marker_slot\": $((slot % MARK_SLOTS))}" \
    action="$what" checks="$(checks_json)" result="$result" seconds="$secs" \
    acked_writes="$ACKED_WRITES" cycle="${CHECK_CYCLE:-null}" caught_up_cycle="${CONV_TARGET:-null}" \
    restart_ms="$restart_ms" recovery_torn_tail="$torn" recovery_holes="$holes" \
    recovery_redone="$([[ $redone -gt 0 ]] && echo true || echo false)" redone_records="$redone" \
    rebased="${REBASED:-0}" summary="$summary" why="$CHECK_MSG" recheck="$recheck" \
    artifacts="$artifacts" note="$note" mutated="$([[ $mutate == 1 ]] && echo true || echo false)"
  give_up_after "$consecutive_failures" crash "crash point $n"
done <"$PLAN"

ilog "done: $total crash points"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
