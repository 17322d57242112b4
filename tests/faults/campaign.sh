#!/usr/bin/env bash
# The fault campaign (`make faults`): runs every fault class many times and writes the
# figures to a JSON result file, FAULTS_RESULTS/<UTC timestamp>.json, with a summary table
# on stdout (and the one-line-per-iteration log beside it, <timestamp>.log; the logs of
# failed iterations under <timestamp>-failures/).
#
#   bash tests/faults/campaign.sh BIN_DIR
#
# Classes (see each script; FAULTS_CLASSES picks some, default all, in this order):
#   crash_points     kill -9 of the primary or of the replica siterepd under write load,
#                    restart; acked writes, siterep-check, sha256 after each
#   link_cuts        the link cut (dropped or black-holed) and healed under write load
#                    through tests/tcp_proxy.py; recovery after each, siterep-check and
#                    sha256 at checkpoints and after the last heal
#   netns_cuts       the replica in a network namespace behind a veth pair; nftables rules
#                    there drop or reset the link (both ways or one) under write load
#   failpoints       the daemons aborted at each failpoint of the data path, of a resync
#                    and of a planned failover, under write load; restart and checks
#   corruption       flipped bytes in a sealed segment at the primary, in a received
#                    segment at the replica, in a frame after decryption, in the replica
#                    image: each detected, nothing bad applied, then repaired
#   enospc           the primary's log folder or the replica's state_dir on a small file
#                    system filled under write load; the guest keeps writing, the sites
#                    converge when the space returns
#   slow_secondary   the replica throttled (a cpu cgroup quota) or stopped (SIGSTOP) under
#                    write load: guest I/O not held, lag shown, checks after each
#
# Environment:
#   FAULTS_CRASHES         crash points in all (default 200)
#   FAULTS_PRIMARY_SHARE   share of them that kill the primary (default 0.6: 120 + 80)
#   FAULTS_CUTS            link cuts (default 100)
#   FAULTS_CUT_CHECK_EVERY a full check every this many cuts (default 25)
#   FAULTS_SEED            the seed of every random choice (default: a new one, printed)
#   FAULTS_RESULTS         where result files go (default tests/faults/results)
#   FAULTS_CLASSES         the classes to run (default: all of them)
#   FAULTS_PARALLEL        N: run up to N classes at the same time, the next starting when
#                          one ends (default 1: one after another)
#   the counts of the other classes: FAULTS_NETNS_CUTS (default 100), FAULTS_FAILPOINT_ROUNDS
#   (default 4 rounds over the points), FAULTS_CORRUPTIONS (per class, default 10),
#   FAULTS_ENOSPC (per class, default 5), FAULTS_SLOW (per class, default 10): see each script
#   FAULTS_DISK_MIB, FAULTS_RATE, FAULTS_LINK_RATE, FAULTS_LINK_BANDWIDTH: see common.sh
#                          and link_cuts.sh
# The binaries are copied first, so that a rebuild during the campaign does not change them.
# Exit code: 0 when every check passed, 1 otherwise.
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$FAULTS_DIR/../.." && pwd)
source "$FAULTS_DIR/../lib.sh"

CRASHES=${FAULTS_CRASHES:-200}
CUTS=${FAULTS_CUTS:-100}
SHARE=${FAULTS_PRIMARY_SHARE:-0.6}
SEED=${FAULTS_SEED:-$(new_seed)}
RESULTS=$(realpath -m "${FAULTS_RESULTS:-$FAULTS_DIR/results}")
PARALLEL=${FAULTS_PARALLEL:-1}
ALL_CLASSES="crash_points link_cuts netns_cuts failpoints corruption enospc slow_secondary"
CLASSES=${FAULTS_CLASSES:-$ALL_CLASSES}
for c in $CLASSES; do
  [[ " $ALL_CLASSES " == *" $c "* ]] || fail "FAULTS_CLASSES: no class $c (the classes: $ALL_CLASSES)"
done
export FAULTS_SEED=$SEED  # the classes without a plan draw from it
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULT=$RESULTS/$STAMP.json
CAMPAIGN_LOG=$RESULTS/$STAMP.log
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# The tree as it is now (others may commit while the campaign runs).
COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" status --porcelain 2>/dev/null | grep -vc '^??' || true)
mkdir -p "$RESULTS"
[[ $CRASHES =~ ^[0-9]+$ && $CUTS =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ && $PARALLEL =~ ^[1-9][0-9]*$ ]] ||
  fail "FAULTS_CRASHES, FAULTS_CUTS, FAULTS_SEED and FAULTS_PARALLEL must be whole numbers (FAULTS_PARALLEL at least 1)"

COUNTS=""
[[ " $CLASSES " == *" crash_points "* ]] && COUNTS+="; $CRASHES crash points"
[[ " $CLASSES " == *" link_cuts "* ]] && COUNTS+="; $CUTS link cuts"
echo "fault campaign: seed $SEED (FAULTS_SEED=$SEED reproduces the choices), classes: $CLASSES$COUNTS; $PARALLEL at a time" |
  tee "$CAMPAIGN_LOG"

# A private copy of the binaries.
mkdir -p "$T/bin"
for b in siterepd siterep siterep-log siterep-check siterep-certs; do
  cp -p "$BIN/$b" "$T/bin/$b" || fail "$BIN/$b is missing (build first)"
done

python3 "$FAULTS_DIR/fault_tool.py" plan "$SEED" "$CRASHES" "$CUTS" "$SHARE" >"$T/plan"
grep '^crash ' "$T/plan" >"$T/plan.crash" || true
grep '^cut ' "$T/plan" >"$T/plan.cut" || true
OUTD=$T/out
mkdir -p "$OUTD"

# Classes run as child processes with their own lib.sh clean-up; ours stops them first.
CHILDREN=()
SUMMARIZED=0
summarize() {
  local rc=0
  python3 - "$T/meta.json" <<PY
import json, sys, os, hashlib, time
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
meta = {
    "campaign": "siterep fault campaign",
    "seed": $SEED,
    "classes_run": "$CLASSES".split(),
    "requested": {"crash_points": $CRASHES, "primary_share": $SHARE, "link_cuts": $CUTS,
                  "cut_check_every": ${FAULTS_CUT_CHECK_EVERY:-25}},
    "parameters": {k: v for k, v in os.environ.items() if k.startswith("FAULTS_")},
    "started": "$STARTED",
    "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "seconds": $((SECONDS - START_SECONDS)),
    "host": {"cpus": os.cpu_count(), "load_at_end": os.getloadavg()[0]},
    "git_at_start": {"commit": "$COMMIT", "modified_tracked_files": ${DIRTY:-0}},
    "binaries": {b: {"sha256": sha("$T/bin/" + b),
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime("$T/bin/" + b)))}
                 for b in ("siterepd", "siterep", "siterep-check")},
    "log": "$CAMPAIGN_LOG",
}
json.dump(meta, open(sys.argv[1], "w"))
PY
  python3 "$FAULTS_DIR/fault_tool.py" summarize "$RESULT" "$T/meta.json" \
    "$OUTD"/*.jsonl | tee -a "$CAMPAIGN_LOG" || rc=1
  if [[ -d $OUTD/failures ]]; then
    cp -r "$OUTD/failures" "$RESULTS/$STAMP-failures"
    echo "logs of the failed iterations: $RESULTS/$STAMP-failures" | tee -a "$CAMPAIGN_LOG"
  fi
  SUMMARIZED=1
  return $rc
}

_campaign_end() {
  local rc=$? pid
  set +e
  if ((!SUMMARIZED)); then
    for pid in "${CHILDREN[@]}"; do
      _alive "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${CHILDREN[@]}"; do
      wait "$pid" 2>/dev/null
      _forget_pid "$pid"
    done
    echo "campaign interrupted (exit code $rc); the figures so far:" | tee -a "$CAMPAIGN_LOG"
    summarize
    [[ $rc -eq 0 ]] && rc=1
  fi
  (exit "$rc")
  _cleanup
}
trap _campaign_end EXIT

# run_class SCRIPT [PLAN]: starts a class in the background; its lines go to the log.
run_class() {
  local script=$1 plan=${2:-}
  local args=("$T/bin" "$OUTD")
  if [[ $# -ge 2 ]]; then
    [[ -s $plan ]] || return 0
    args=("$T/bin" "$plan" "$OUTD")
  fi
  [[ -f $FAULTS_DIR/$script ]] || fail "no class script $FAULTS_DIR/$script"
  : >"$T/${script%.sh}.out"  # before tail opens it
  bash "$FAULTS_DIR/$script" "${args[@]}" >"$T/${script%.sh}.out" 2>&1 &
  local pid=$!
  CHILDREN+=("$pid")
  _PIDS+=("$pid")
  tail -n +1 -f --pid="$pid" "$T/${script%.sh}.out" | tee -a "$CAMPAIGN_LOG" &
}

# wait_one_child: until one of the classes running has ended; it leaves CHILDREN.
wait_one_child() {
  local pid left=()
  wait -n "${CHILDREN[@]}" || true
  for pid in "${CHILDREN[@]}"; do
    if _alive "$pid"; then left+=("$pid"); else wait "$pid" || true; _forget_pid "$pid"; fi
  done
  CHILDREN=("${left[@]}")
}

wait_children() {
  local pid
  for pid in "${CHILDREN[@]}"; do
    wait "$pid" || true
    _forget_pid "$pid"
  done
  wait  # the tails
  CHILDREN=()
}

# The classes asked for, each with its plan (the two planned classes) or none (the others
# draw their choices from FAULTS_SEED themselves).
declare -A CLASS_PLAN=([crash_points]=$T/plan.crash [link_cuts]=$T/plan.cut)
for c in $CLASSES; do
  if [[ -n ${CLASS_PLAN[$c]:-} ]]; then
    run_class "$c.sh" "${CLASS_PLAN[$c]}"
  else
    run_class "$c.sh"
  fi
  ((${#CHILDREN[@]} < PARALLEL)) || wait_one_child
done
wait_children

summarize || exit 1
