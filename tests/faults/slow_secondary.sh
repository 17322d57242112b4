#!/usr/bin/env bash
# Fault classes "slow secondary" and "stalled secondary": under write load at the primary
# (east), the replica's siterepd (west) is
#   slow_secondary     throttled: moved into a CPU cgroup of this test with a quota of
#                      0.5-1.2% of one CPU (1-2.4 ms every 200 ms) for 6-15 s, so that
#                      it applies more slowly than east writes (cgroup v2 cpu.max where
#                      the cpu controller is on the unified hierarchy, else cgroup v1
#                      cpu.cfs_quota_us; at 3-8% it kept up with this load, at 2% not
#                      always behind by the 2 s the lag check wants);
#   stalled_secondary  stopped (SIGSTOP) for 4-10 s (short of the link's 15 s io_timeout),
#                      16-25 s (past it) or 36-45 s (past the RPO budget of 32 s for a
#                      continuous VM, control/health.h), then SIGCONT.
# Each iteration is one load round: 3 s of load before the fault (the baseline), the
# fault, the load until the replica has caught up again, then the checks (each pass/fail):
#   guest_io      the numbered writes acknowledged by fsync at the primary keep coming
#                 during the fault: the longest gap between two acknowledgements (either
#                 disk, polled every 10 ms) in the fault window is under FAULTS_SLOW_GAP_S
#                 (default 2 s: twice what a busy shared machine showed without a fault,
#                 and half the shortest fault, so a primary waiting on its replica can't
#                 pass); the gap in the baseline window is reported beside it
#   fio           fio ended the round without an error, its longest write and flush
#                 latencies are under the same bound, and it wrote during the fault (at
#                 least a quarter of its rate times the fault's length, from a SIGUSR1
#                 status dump at each end)
#   status        `siterep status --json` at the primary answered every 0.5 s sample of
#                 the round within 5 s
#   lag           the primary's status shows the lag: a stall adds at least half its
#                 length to rpo_seconds and pending bytes grow; a throttle raises the RPO
#                 above the baseline's highest by at least 2 s
#   health        every sample whose RPO is over the budget (+2 s) says critical, or
#                 warning for the RPO or the link (not only for the cycles missed in the
#                 last hour); a stall past the budget (+4 s) shows such a warning
#   recovered     after the fault, under load, the RPO is back under 5 s within 120 s
#   acked, prefix, sha256   as every class (common.sh), after the load stopped
#   health_after  health back to normal within 30 s of the convergence, or a warning
#                 whose only reason is the share of missed cycles in the last hour (the
#                 faults themselves miss cycles; that share stays for an hour by design)
#
#   bash tests/faults/slow_secondary.sh BIN_DIR OUT_DIR
# FAULTS_SLOW: iterations of each class (default 10); FAULTS_SLOW_LONG: stalls past the
# RPO budget (default 3 when FAULTS_SLOW >= 3, else 0); FAULTS_SEED (default: a new one,
# printed). Records go to OUT_DIR/slow_secondary.jsonl.
CLASS_SCRIPT=slow_secondary
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

COUNT=${FAULTS_SLOW:-10}
LONG=${FAULTS_SLOW_LONG:-$((COUNT >= 3 ? 3 : 0))}
SEED=${FAULTS_SEED:-$(new_seed)}
GAP_S=${FAULTS_SLOW_GAP_S:-2}
[[ $COUNT =~ ^[0-9]+$ && $LONG =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ && $LONG -le $COUNT ]] ||
  fail "FAULTS_SLOW, FAULTS_SLOW_LONG (at most FAULTS_SLOW) and FAULTS_SEED must be whole numbers"
BUDGET=32     # RpoBudget of a continuous VM: 2 x 1 s + 30 s
BASE_S=3      # load before the fault
RECOVER_RPO=5 # the replica has caught up again when the RPO is under this

# ---------------------------------------------------------------------------------------
# The cgroup: v2 when the cpu controller is on the unified hierarchy, else v1's cpu
# hierarchy. West is moved in for a throttle and back to where it was after it.
if grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
  CG_V=2 CG_ROOT=/sys/fs/cgroup
elif [[ -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]]; then
  CG_V=1 CG_ROOT=/sys/fs/cgroup/cpu
else
  skip "no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us)"
fi
CG=$CG_ROOT/siterep-slow-$$
CG_MADE=0

# cg_home PID: the cgroup folder PID is in now (of the hierarchy used).
cg_home() {
  local line
  if ((CG_V == 2)); then
    line=$(sed -n 's/^0:://p' "/proc/$1/cgroup")
  else
    line=$(sed -n 's/^[0-9]*:\([^:]*,\)\{0,1\}cpu\(,[^:]*\)\{0,1\}://p' "/proc/$1/cgroup")
  fi
  echo "$CG_ROOT${line%/}"
}

# throttle PID PERMILLE: PID (west) into the cgroup, at PERMILLE/1000 of one CPU.
throttle() {
  local pid=$1 quota=$(($2 * 200))
  if ((!CG_MADE)); then
    mkdir "$CG"
    CG_MADE=1
  fi
  if ((CG_V == 2)); then
    echo "$quota 200000" >"$CG/cpu.max"
  else
    echo 200000 >"$CG/cpu.cfs_period_us"
    echo "$quota" >"$CG/cpu.cfs_quota_us"
  fi
  WEST_CG_HOME=$(cg_home "$pid")
  echo "$pid" >"$CG/cgroup.procs"
  [[ $(cg_home "$pid") == "$CG" ]] || fail "west (pid $pid) is not in $CG after the move"
}

unthrottle() {
  local pid
  while read -r pid; do
    [[ -n $pid ]] && echo "$pid" >"$WEST_CG_HOME/cgroup.procs"
  done <"$CG/cgroup.procs"
}

# On any exit: west running again and out of the cgroup, the cgroup removed; then the
# script_end record and lib.sh's clean-up.
_slow_end() {
  local rc=$?
  set +e
  [[ -n ${WEST_PID:-} ]] && kill -CONT "$WEST_PID" 2>/dev/null
  if ((CG_MADE)); then
    unthrottle
    rmdir "$CG"
  fi
  python3 "$TOOL" record "$RECORDS" kind=script_end script="$CLASS_SCRIPT" exit_code="$rc" \
    seconds="$((SECONDS - START_SECONDS))" detail="@$LIBLOG" 2>/dev/null
  (exit "$rc")
  _cleanup
}
trap _slow_end EXIT

# ---------------------------------------------------------------------------------------
# The monitor of a round: when each numbered write was acknowledged (the ack files, polled
# every 10 ms) and east's status every 0.5 s; on SIGTERM it writes what it saw as JSON.
# `analyze` reduces that to the figures and verdicts of one iteration.
cat >"$T/monitor.py" <<'PY'
import collections, json, os, re, signal, subprocess, sys, threading, time

def monitor(out, siterep, conf, acks):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen = {p: [] for p in acks}
    status = []

    def poll_acks():
        sizes = {p: 0 for p in acks}
        rest = {p: b"" for p in acks}
        while not stop.is_set():
            now = time.time()
            for p in acks:
                try:
                    size = os.stat(p).st_size
                except OSError:
                    continue
                if size > sizes[p]:
                    with open(p, "rb") as f:
                        f.seek(sizes[p])
                        data = rest[p] + f.read(size - sizes[p])
                    sizes[p] = size
                    lines = data.split(b"\n")
                    rest[p] = lines.pop()
                    seen[p].extend([now] * len(lines))
            time.sleep(0.01)

    def poll_status():
        while not stop.is_set():
            t0 = time.time()
            s = {"t": t0, "ok": False}
            try:
                r = subprocess.run([siterep, "-c", conf, "status", "vm1", "--json"],
                                   capture_output=True, timeout=5)
                v = [x for x in json.loads(r.stdout)["vms"] if x["name"] == "vm1"][0]
                s.update(ok=True, rpo=v.get("rpo_seconds"), health=v.get("health"),
                         reason=v.get("health_reason", ""), link=v["link"]["state"],
                         pending=sum(d.get("pending_bytes", 0) for d in v["disks"]))
            except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as e:
                s["error"] = repr(e)[:200]
            s["secs"] = round(time.time() - t0, 3)
            status.append(s)
            stop.wait(max(0.0, 0.5 - (time.time() - t0)))

    threads = [threading.Thread(target=poll_acks), threading.Thread(target=poll_status)]
    for t in threads:
        t.start()
    while not stop.is_set():
        stop.wait(0.2)
    for t in threads:
        t.join()
    with open(out, "w") as f:
        json.dump({"acks": seen, "status": status}, f)


def fio_io_bytes(path):
    """The io= figure (bytes, decimal units) of every status dump in a fio output."""
    mult = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    out = []
    for m in re.finditer(r"WRITE: bw=.*?io=\S+ \(([\d.]+)([kMG]?B)\)", open(path).read()):
        out.append(float(m.group(1)) * mult[m.group(2)])
    return out


def fio_max_lat_s(path):
    """The longest write (lat) and flush (sync) latency of the final report, in s."""
    unit = {"nsec": 1e-9, "usec": 1e-6, "msec": 1e-3}
    text = open(path).read()
    final = text[text.rfind("err="):] if "err=" in text else ""
    res = {}
    for name in ("lat", "sync"):
        m = re.search(r"(?<![a-z])" + name + r" \((nsec|usec|msec)\): min=\S+, max=([\d.]+)([kM]?)", final)
        if m:
            k = {"": 1, "k": 1e3, "M": 1e6}[m.group(3)]
            res[name] = float(m.group(2)) * k * unit[m.group(1)]
    m = re.search(r"err=\s*(\d+)", final)
    res["err"] = int(m.group(1)) if m else None
    return res


def analyze(mon_path, kind, b0, f0, f1, duration, budget, gap_bound, rate_bps, fio0, fio1):
    mon = json.load(open(mon_path))
    def max_gap(a, b):
        worst, count = 0.0, 0
        for times in mon["acks"].values():
            pts = [a] + [t for t in times if a < t < b] + [b]
            count += len(pts) - 2
            worst = max(worst, max(y - x for x, y in zip(pts, pts[1:])))
        return round(worst, 3), count
    base_gap, _ = max_gap(b0, f0)
    fault_gap, fault_acks = max_gap(f0, f1)
    st = mon["status"]
    ok = [s for s in st if s["ok"]]
    before = [s for s in ok if s["t"] <= f0]
    during = [s for s in ok if f0 < s["t"] <= f1 + 1]
    rpo = lambda s: s["rpo"] if s["rpo"] is not None else 0.0
    rpo_start = rpo(before[-1]) if before else 0.0
    pend_start = before[-1]["pending"] if before else 0
    base_rpo_max = max([rpo(s) for s in before if s["t"] >= b0] or [0.0])
    rpo_max = max([rpo(s) for s in during] or [0.0])
    pend_max = max([s["pending"] for s in during] or [0])
    if kind == "stall":
        lag_ok = rpo_max - rpo_start >= 0.5 * duration and pend_max > pend_start
        lag_want = f"RPO +{0.5 * duration:.1f} s and pending bytes up"
    else:
        lag_ok = rpo_max >= base_rpo_max + 2
        lag_want = f"RPO over the baseline's {base_rpo_max:.1f} s + 2 s"
    status_ok = all(s["ok"] for s in st) and bool(st)
    status_max = max([s["secs"] for s in st] or [0])
    # Warning for the RPO or the link (JudgeHealth puts these before the missed cycles).
    lag_flag = lambda s: s["health"] == "critical" or (
        s["health"] == "warning" and s["reason"].startswith(("RPO", "link down")))
    over = [s for s in ok if rpo(s) > budget + 2]
    unflagged = [s for s in over if not lag_flag(s)]
    flagged = [s for s in ok if f0 < s["t"] <= f1 + 5 and lag_flag(s)]
    need_flag = kind == "stall" and duration > budget + 4
    health_ok = not unflagged and (flagged or not need_flag)
    # Health as seen during the fault, its figures made N: "warning (RPO N s is ...) x7".
    seen = collections.Counter(s["health"] + (f" ({re.sub(r'[0-9]+', 'N', s['reason'])})"
                                              if s["reason"] else "") for s in during)
    healths = [f"{h} x{c}" for h, c in sorted(seen.items())]
    fio_bytes = [b - a for a, b in zip(fio0, fio1)]
    return {
        "ack_gap_fault_s": fault_gap, "ack_gap_baseline_s": base_gap, "acks_in_fault": fault_acks,
        "guest_io": "pass" if fault_gap < gap_bound and fault_acks > 0 else "fail",
        "fio_bytes_in_fault": [int(x) for x in fio_bytes],
        "fio_wrote": all(x >= 0.25 * rate_bps * duration for x in fio_bytes) and len(fio_bytes) == 2,
        "status": "pass" if status_ok else "fail", "status_max_s": status_max,
        "status_failed": sum(1 for s in st if not s["ok"]),
        "rpo_start_s": round(rpo_start, 1), "rpo_max_s": round(rpo_max, 1),
        "rpo_baseline_max_s": round(base_rpo_max, 1),
        "pending_start": pend_start, "pending_max": pend_max,
        "lag": "pass" if lag_ok else "fail", "lag_want": lag_want,
        "health": "pass" if health_ok else "fail",
        "health_seen": healths, "over_budget_samples": len(over),
        "over_budget_normal": len(unflagged), "flagged_samples": len(flagged),
        "health_flag_needed": need_flag,
    }


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "monitor":
        monitor(a[0], a[1], a[2], a[3:])
    elif cmd == "fio":
        # fio OUT...: the io= figure of each status dump and the final latencies
        print(json.dumps({p: {"io": fio_io_bytes(p), **fio_max_lat_s(p)} for p in a}))
    else:
        r = analyze(a[0], a[1], *map(float, a[2:9]), json.loads(a[9]), json.loads(a[10]))
        print(json.dumps(r))
PY

# ---------------------------------------------------------------------------------------
setup_sites >>"$LIBLOG"
# fio's rate in bytes/s (RATE as fio reads it: k/m/g are 1024-based).
RATE_BPS=$(python3 -c "
import sys; r = sys.argv[1].lower(); m = {'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}
print(int(float(r[:-1]) * m[r[-1]]) if r[-1] in m else int(r))" "$RATE")
ilog "sites up: east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID; load $RATE/s per disk; cgroup v$CG_V ($CG); $COUNT throttles and $COUNT stalls ($LONG past the RPO budget), seed $SEED (FAULTS_SEED); ack gap bound ${GAP_S}s"

python3 "$TOOL" record "$RECORDS" kind=class_info class=slow_secondary \
  injected="the replica siterepd (west) moved into a cgroup (v$CG_V) with a CPU quota of 0.5-1.2% of one CPU (1-2.4 ms every 200 ms) for 6-15 s under write load at the primary, then moved back" \
  checked='["guest_io: the longest gap between fsync-acknowledged numbered writes at the primary during the fault is under the bound", "fio: no error, longest write and flush latency under the bound, it wrote during the fault", "status: the primary answers status within 5 s", "lag: rpo_seconds at the primary rises 2 s over the baseline", "health: critical, or warning for the RPO or the link, whenever the RPO is over the budget", "recovered: RPO under 5 s again within 120 s under load", "acked + prefix (siterep-check) + sha256 after the load stopped", "health_after: normal again (or a warning for the missed-cycle share alone)"]'
python3 "$TOOL" record "$RECORDS" kind=class_info class=stalled_secondary \
  injected="the replica siterepd (west) stopped by SIGSTOP under write load at the primary for 4-10 s, 16-25 s (past the 15 s io_timeout) or 36-45 s (past the 32 s RPO budget), then SIGCONT" \
  checked='["guest_io: the longest gap between fsync-acknowledged numbered writes at the primary during the stall is under the bound", "fio: no error, longest write and flush latency under the bound, it wrote during the stall", "status: the primary answers status within 5 s", "lag: rpo_seconds grows by at least half the stall, pending bytes grow", "health: critical, or warning for the RPO or the link, whenever the RPO is over the budget; a stall past the budget shows such a warning", "recovered: RPO under 5 s again within 120 s under load", "acked + prefix (siterep-check) + sha256 after the load stopped", "health_after: normal again (or a warning for the missed-cycle share alone)"]'

# The iterations: N KIND SECONDS PERMILLE (of a CPU, throttles), shuffled from the seed.
python3 - "$SEED" "$COUNT" "$LONG" >"$T/plan" <<'PY'
import random, sys
rng = random.Random(f"slow_secondary:{sys.argv[1]}")
count, long_ = int(sys.argv[2]), int(sys.argv[3])
medium = (count - long_) // 2
stalls = [rng.uniform(36, 45) for _ in range(long_)] + \
         [rng.uniform(16, 25) for _ in range(medium)] + \
         [rng.uniform(4, 10) for _ in range(count - long_ - medium)]
its = [("stall", s, 0) for s in stalls] + \
      [("throttle", rng.uniform(6, 15), rng.randint(5, 12)) for _ in range(count)]
rng.shuffle(its)
for n, (kind, secs, pct) in enumerate(its, 1):
    print(f"{n} {kind} {secs:.2f} {pct}")
PY
total=$(wc -l <"$T/plan")
since() { python3 -c "import time; print(round((time.time_ns() - $1) / 1e9, 2))"; }
now_s() { date +%s.%N; }
east_rpo() { vm_field "$EAST_CONF" vm1 "str(v.get('rpo_seconds'))" 2>/dev/null || echo None; }

fails=0
failed_in_row=0
while read -r n kind secs permille; do
  t0_ns=$(date +%s%N)
  reset_checks
  note=""
  start_load || note="no numbered write acknowledged within 10 s of starting the load"
  python3 "$T/monitor.py" monitor "$T/mon.json" "$SITEREP" "$EAST_CONF" "$T/acks-d0" "$T/acks-d1" \
    2>"$T/monitor.err" &
  MON_PID=$!
  _PIDS+=("$MON_PID")
  b0=$(now_s)
  sleep "$BASE_S"
  write_markers "$n" || note+="${note:+; }a marker write failed before the fault"
  kill -USR1 "${LOAD_PIDS[0]}" "${LOAD_PIDS[1]}"
  f0=$(now_s)
  if [[ $kind == stall ]]; then
    kill -STOP "$WEST_PID"
    sleep "$secs"
    kill -CONT "$WEST_PID"
    what="SIGSTOP of west (pid $WEST_PID) for ${secs}s"
    class=stalled_secondary
  else
    throttle "$WEST_PID" "$permille"
    sleep "$secs"
    unthrottle
    what="west (pid $WEST_PID) throttled to $((permille / 10)).$((permille % 10))% of a CPU for ${secs}s"
    class=slow_secondary
  fi
  f1=$(now_s)
  kill -USR1 "${LOAD_PIDS[0]}" "${LOAD_PIDS[1]}"
  end_ns=$(date +%s%N)
  # Caught up again under load: the RPO back under RECOVER_RPO.
  recovered=fail rec_s=""
  while (($(date +%s%N) - end_ns < 120 * 1000000000)); do
    rpo=$(east_rpo)
    if [[ $rpo != None ]] && python3 -c "import sys; sys.exit(0 if $rpo < $RECOVER_RPO else 1)"; then
      recovered=pass rec_s=$(since "$end_ns")
      break
    fi
    sleep 0.3
  done
  sleep 0.5
  wait_load TERM
  kill -TERM "$MON_PID"
  wait "$MON_PID" || add_msg "the monitor failed: $(tail -c 300 "$T/monitor.err")"
  _forget_pid "$MON_PID"
  # The figures of the fault window.
  fio=$(python3 "$T/monitor.py" fio "$T/fio-d0.out" "$T/fio-d1.out")
  fio0=$(jq_py "[v['io'][0] if len(v['io']) > 2 else 0 for v in d.values()]" <<<"$fio")
  fio1=$(jq_py "[v['io'][1] if len(v['io']) > 2 else 0 for v in d.values()]" <<<"$fio")
  fig=$(python3 "$T/monitor.py" analyze "$T/mon.json" "$kind" "$b0" "$f0" "$f1" "$secs" "$BUDGET" \
    "$GAP_S" "$RATE_BPS" "$fio0" "$fio1")
  read -r fio_ok fio_lat fio_sync fio_errs <<<"$(jq_py "' '.join([
    'pass' if all(v.get('err') == 0 and v.get('lat', 99) < $GAP_S and v.get('sync', 0) < $GAP_S
                  for v in d.values()) else 'fail',
    str(round(max(v.get('lat', -1) for v in d.values()), 3)),
    str(round(max(v.get('sync', -1) for v in d.values()), 3)),
    ','.join(str(v.get('err')) for v in d.values())])" <<<"$fio")"
  [[ $(jq_py "d['fio_wrote']" <<<"$fig") == true ]] || fio_ok=fail
  # The common checks, then health back to normal.
  checks_after_load 120
  health_after=fail hreason=""
  for ((i = 0; i < 60; i++)); do
    read -r h hreason <<<"$(vm_field "$EAST_CONF" vm1 "v['health'] + ' ' + v['health_reason']" 2>/dev/null || echo "? ")"
    if [[ $h == normal ]] ||
      [[ $h == warning && $hreason =~ ^[0-9]+%\ of\ the\ replication\ cycles\ in\ the\ last\ hour\ were\ missed$ ]]; then
      health_after=pass
      break
    fi
    sleep 0.5
  done
  checks=$(python3 -c '
import json, sys
f = json.loads(sys.argv[1])
c = {k: f[k] for k in ("guest_io",)}
c["fio"] = sys.argv[2]
c.update({k: f[k] for k in ("status", "lag", "health")})
c["recovered"] = sys.argv[3]
c.update(json.loads(sys.argv[4]))
c["health_after"] = sys.argv[5]
print(json.dumps(c))' "$fig" "$fio_ok" "$recovered" "$(checks_json)" "$health_after")
  result=$(jq_py "'fail' if 'fail' in d.values() else 'pass'" <<<"$checks")
  failed=$(jq_py "', '.join(k for k, v in d.items() if v == 'fail')" <<<"$checks")
  artifacts=""
  if [[ $result == fail ]]; then
    fails=$((fails + 1)) failed_in_row=$((failed_in_row + 1))
    artifacts=$(save_failure "$class-$n")
    cp "$T/mon.json" "$artifacts/" 2>/dev/null || true
  else
    failed_in_row=0
  fi
  secs_it=$(since "$t0_ns")
  summary=$(jq_py "f\"{d['ack_gap_fault_s']}s longest ack gap in the fault ({d['acks_in_fault']} acks; baseline {d['ack_gap_baseline_s']}s); fio max write $fio_lat s, flush $fio_sync s; RPO {d['rpo_start_s']} -> max {d['rpo_max_s']} s (baseline max {d['rpo_baseline_max_s']} s), pending max {d['pending_max'] >> 20} MiB; health seen: {'; '.join(d['health_seen'])}; status max {d['status_max_s']} s\"" <<<"$fig")
  summary="$what: $summary; recovered ${rec_s:-never} s after; acked $CHECK_acked, prefix $CHECK_prefix, sha256 $CHECK_sha256 (caught up in ${CONV_SECONDS:-?}s); health after: ${h:-?}${hreason:+ ($hreason)}${failed:+; FAILED: $failed}${CHECK_MSG:+; why: $CHECK_MSG}${note:+; note: $note}"
  ilog "$class $n/$total: $summary -> ${result^^} (${secs_it}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class="$class" n="$n" action="$what" \
    seed_choice="{\"seconds\": $secs, \"cpu_permille\": $permille}" checks="$checks" \
    result="$result" seconds="$secs_it" figures="$fig" recovery_seconds="${rec_s:-null}" \
    fio_max_write_s="$fio_lat" fio_max_flush_s="$fio_sync" fio_errors="$fio_errs" \
    converge_seconds="${CONV_SECONDS:-null}" health_after="$h" health_after_reason="$hreason" \
    summary="$summary" why="$CHECK_MSG" artifacts="$artifacts"
  give_up_after "$failed_in_row" slow_secondary "iteration $n"
done <"$T/plan"

ilog "done: $total iterations (seed $SEED), $fails failed"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
