#!/usr/bin/env bash
# Fault class "link cuts": the link from east (primary) to west (replica) cut and healed
# many times under write load, through the TCP proxy of the link tests (tests/tcp_proxy.py):
# close (every connection dropped, new ones refused) or stall (a black hole), for a random
# time, then pass. After each heal the link must recover: the shipper connected and the
# replica's acknowledged cycle past the one at the cut. What the replica held of a transfer
# at each cut is counted: a partial segment (*.part: cut mid-segment) and segments of a
# cycle not yet complete (cut mid-cycle). Every FAULTS_CUT_CHECK_EVERY cuts and after the
# last, the load stops and the replica must converge: acknowledged writes read back,
# siterep-check passes on the archived log, and the images hash the same.
#
#   bash tests/faults/link_cuts.sh BIN_DIR PLAN OUT_DIR
# PLAN: the "cut" lines of fault_tool.py plan. Records go to OUT_DIR/link_cuts.jsonl.
CLASS_SCRIPT=link_cuts
PLAN=$(realpath "$2")
OUT=$(realpath -m "$3")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"
CHECK_EVERY=${FAULTS_CUT_CHECK_EVERY:-25}
# A link a little faster than the load keeps it busy most of the time, so that cuts also
# land in the middle of transfers.
# (6 MiB/s against 2 x 2 MB/s of incompressible fio writes plus the numbered writers: in a
# trial 36% of random moments found a segment in transfer.)
PEER_BANDWIDTH=${FAULTS_LINK_BANDWIDTH:-6MiB}
RATE=${FAULTS_LINK_RATE:-2m}

PROXY_PORT=$(free_port)
setup_sites "$PROXY_PORT" >>"$LIBLOG"
ilog "sites up: east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID through a proxy on port $PROXY_PORT (bandwidth_limit $PEER_BANDWIDTH); load $RATE/s per disk; checkpoint every $CHECK_EVERY cuts"

POSITION=$WEST_STATE/replicas/vm1/position.json
RECEIVED=$WEST_STATE/replicas/vm1/received
total=$(grep -c '^cut ' "$PLAN" || true)

# link_state: "STATE ACKED_CYCLE CONNECTS" of vm1 at east.
link_state() {
  vm_field "$EAST_CONF" vm1 "f\"{v['link']['state']} {v.get('acked_cycle', 0)} {v['link']['connects']}\""
}

start_load || ilog "warning: no numbered write acknowledged within 10 s of starting the load"
failed_in_row=0
while read -r kind n mode up_s down_s; do
  [[ $kind == cut ]] || continue
  t0_ns=$(date +%s%N)
  sleep "$up_s"
  read -r st_before acked_before connects_before <<<"$(link_state)"
  # A marker acknowledged just before each cut, read back at the checkpoints.
  write_markers "$n" || true
  proxy_mode "$mode" >>"$LIBLOG"
  sleep 0.2
  read -r parts staged <<<"$(python3 "$TOOL" segstate "$POSITION" "$RECEIVED/d0" "$RECEIVED/d1")"
  mid_segment=false mid_cycle=false
  ((parts > 0)) && mid_segment=true
  ((parts + staged > 0)) && mid_cycle=true
  sleep "$(python3 -c "print(max(0.0, $down_s - 0.2))")"
  proxy_mode pass >>"$LIBLOG"
  heal_ns=$(date +%s%N)
  recovered=fail rec_s=""
  for ((i = 0; i < 300; i++)); do
    read -r st acked connects <<<"$(link_state 2>/dev/null || echo "? 0 0")"
    if [[ $st == connected && $acked -gt $acked_before ]]; then
      recovered=pass
      rec_s=$(python3 -c "import time; print(round((time.time_ns() - $heal_ns) / 1e9, 2))")
      break
    fi
    sleep 0.2
  done
  secs=$(python3 -c "import time; print(round((time.time_ns() - $t0_ns) / 1e9, 2))")
  what="$mode for ${down_s}s after ${up_s}s up (link $st_before, acked cycle $acked_before, $connects_before connects before)"
  summary="cut $n/$total: $what; at the cut the replica held $parts partial and $staged uncommitted segment(s) (mid-segment $mid_segment, mid-cycle $mid_cycle); recovered: $recovered${rec_s:+ in ${rec_s}s after the heal} (acked cycle $acked, $connects connects)"
  artifacts=""
  if [[ $recovered == pass ]]; then
    result=pass failed_in_row=0
  else
    result=fail failed_in_row=$((failed_in_row + 1))
    artifacts=$(save_failure "cut-$n")
  fi
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class=link_cut n="$n" mode="$mode" \
    seed_choice="{\"up_s\": $up_s, \"down_s\": $down_s}" action="$what" \
    checks="{\"recovered\": \"$recovered\"}" result="$result" seconds="$secs" \
    recovery_seconds="${rec_s:-null}" mid_segment="$mid_segment" mid_cycle="$mid_cycle" \
    partial_segments="$parts" staged_segments="$staged" summary="$summary" artifacts="$artifacts"
  give_up_after "$failed_in_row" link_cut "cut $n"
  if ((n % CHECK_EVERY == 0 || n == total)); then
    class_checkpoint link_cut "$n"
    ((n == total)) || start_load || ilog "warning: no numbered write acknowledged within 10 s of starting the load"
  fi
done <"$PLAN"

ilog "done: $total link cuts"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
