#!/usr/bin/env bash
# make bench: the same fio jobs, side by side in one run, on
#   (a) raw  a raw image file, O_DIRECT (the host's own disk path),
#   (b) off  a protected disk with tracking = "off" (the ceiling of the FUSE layer),
#   (c) log  a protected disk with tracking = "log" (siterepd --discard-sealed: every cut
#            cycle is dropped as if shipped, so a cycle is cut, frozen, copied-on-write and
#            read every second, as by a shipper that keeps up).
# Each daemon protects 4 disks of BENCH_SIZE (one VM); fio runs on the first disk. For each
# round and job, a, b and c run back to back (the order rotates per round). The daemon's
# CPU seconds (utime+stime from /proc/PID/stat) are taken around each job, and its peak RSS
# (VmHWM). bench/summarize.py prints the table (medians over rounds, ratios, targets) and
# writes bench/results/<UTC time>.json.
#
# Usage: bash bench/run.sh [BIN_DIR]
# Environment: BENCH_RUNTIME (s, default 20), BENCH_RAMP (s, 5), BENCH_ROUNDS (3),
#   BENCH_SIZE (disk size, 4G), BENCH_SPAN (bytes the random jobs touch, prefilled, 1G),
#   BENCH_JOBS (space-separated subset of the job names), BENCH_DIR (work folder parent,
#   default /var/tmp; the images live there, on the host file system).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
source "$ROOT/bench/sites.sh"
RUNTIME=${BENCH_RUNTIME:-20}
RAMP=${BENCH_RAMP:-5}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-4G}
SPAN=${BENCH_SPAN:-1G}
ALL_JOBS="randwrite-4k-qd1 randwrite-4k-qd32 seqwrite-1m-qd8 randread-4k-qd32"
JOBS=${BENCH_JOBS:-$ALL_JOBS}
CONFIGS=(raw off log)

for tool in siterepd siterep; do
  [[ -x $BIN/$tool ]] || { echo "bench: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
command -v fio >/dev/null || { echo "bench: fio is not installed (make deps)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root" >&2; exit 1; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/siterep-bench.XXXXXX")
declare -A PID MNT CONF
say() { echo "[bench +${SECONDS}s] $*"; }

cleanup() {
  local rc=$? c
  set +e
  trap - EXIT INT TERM
  for c in off log; do
    if [[ -n ${PID[$c]:-} ]] && kill -0 "${PID[$c]}" 2>/dev/null; then
      kill -TERM "${PID[$c]}"
      wait "${PID[$c]}"
    fi
    if [[ -n ${MNT[$c]:-} ]] && findmnt -rn --mountpoint "${MNT[$c]}" >/dev/null 2>&1; then
      fusermount3 -u "${MNT[$c]}" || fusermount3 -uz "${MNT[$c]}"
    fi
  done
  bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# prefill FILE: real data over the span the random jobs touch (reads of holes or of
# unwritten extents cost no I/O and would flatter the raw case).
prefill() {
  fallocate -l "$SIZE" "$1"
  fio --name=prefill --filename="$1" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
    --iodepth=8 --size="$SPAN" --output=/dev/null
}

say "work folder $W (on $(findmnt -n -o FSTYPE --target "$W"), images of $SIZE, random span $SPAN)"
truncate -s "$SIZE" "$W/raw.img"
prefill "$W/raw.img"
for c in off log; do
  CONF[$c]=$W/$c.toml
  MNT[$c]=$W/$c/mnt
  mkdir -p "$W/$c"
  {
    echo "[site]"
    echo "name = \"bench-$c\""
    echo "state_dir = \"$W/$c/state\""
    echo "mountpoint = \"${MNT[$c]}\""
    echo "control_socket = \"$W/$c/control.sock\""
    echo
    echo "[[vms]]"
    echo "name = \"vm\""
    echo "frequency = \"continuous\""
    echo "tracking = \"$c\""
    for d in 0 1 2 3; do
      truncate -s "$SIZE" "$W/$c/disk$d.img"
      echo "  [[vms.disks]]"
      echo "  name = \"disk$d\""
      echo "  image = \"$W/$c/disk$d.img\""
    done
  } >"${CONF[$c]}"
  prefill "$W/$c/disk0.img"
  args=()
  [[ $c == log ]] && args=(--discard-sealed)
  "$BIN/siterepd" -c "${CONF[$c]}" "${args[@]}" 2>"$W/siterepd-$c.log" &
  PID[$c]=$!
  for _ in $(seq 1 100); do
    "$BIN/siterep" -c "${CONF[$c]}" status >/dev/null 2>&1 && break
    kill -0 "${PID[$c]}" 2>/dev/null || { tail "$W/siterepd-$c.log" >&2; exit 1; }
    sleep 0.1
  done
  "$BIN/siterep" -c "${CONF[$c]}" status >/dev/null || { echo "bench: siterepd ($c) did not come up" >&2; exit 1; }
  say "siterepd ($c) pid ${PID[$c]}: 4 disks of $SIZE at ${MNT[$c]}/vm/"
done

target() {
  case $1 in
    raw) echo "$W/raw.img" ;;
    *) echo "${MNT[$1]}/vm/disk0" ;;
  esac
}

job_args() {
  case $1 in
    randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --size=$SPAN" ;;
    randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32 --size=$SPAN" ;;
    seqwrite-1m-qd8) echo "--rw=write --bs=1M --iodepth=8 --size=$SIZE" ;;
    randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32 --size=$SPAN" ;;
    *) echo "bench: unknown job $1" >&2; return 1 ;;
  esac
}

# cpu_ticks PID: utime + stime of the process (all threads), in clock ticks.
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
hwm_kib() {
  awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

mkdir -p "$W/out"
: >"$W/runs.jsonl"
TICKS=$(getconf CLK_TCK)
say "jobs: $JOBS; $ROUNDS rounds; ramp ${RAMP}s + runtime ${RUNTIME}s each"
for ((round = 1; round <= ROUNDS; round++)); do
  for job in $JOBS; do
    read -r -a jargs <<<"$(job_args "$job")"
    for ((k = 0; k < 3; k++)); do
      c=${CONFIGS[$(((k + round - 1) % 3))]}
      out=$W/out/$job.$c.$round.json
      pid=${PID[$c]:-}
      t0=0
      [[ -n $pid ]] && t0=$(cpu_ticks "$pid")
      fio --name="$job" --filename="$(target "$c")" --ioengine=io_uring --direct=1 \
        --time_based --ramp_time="$RAMP" --runtime="$RUNTIME" --norandommap --randrepeat=0 \
        --group_reporting "${jargs[@]}" --output-format=json --output="$out"
      cpu=null hwm=null
      if [[ -n $pid ]]; then
        kill -0 "$pid" 2>/dev/null || { echo "bench: siterepd ($c) died" >&2; tail "$W/siterepd-$c.log" >&2; exit 1; }
        cpu=$(awk -v a="$t0" -v b="$(cpu_ticks "$pid")" -v t="$TICKS" 'BEGIN { printf "%.2f", (b - a) / t }')
        hwm=$(hwm_kib "$pid")
      fi
      if [[ $c == log ]]; then
        tracking=$("$BIN/siterep" -c "${CONF[log]}" status --json |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["vms"][0]["disks"][0]["tracking"])')
        if [[ $tracking != log ]]; then
          say "WARNING: the log disk fell back to '$tracking' during $job round $round;" \
            "from here on config c measures the fallback, not the log"
        fi
      fi
      printf '{"round": %d, "job": "%s", "config": "%s", "fio": "%s", "daemon_cpu_s": %s, "daemon_hwm_kib": %s}\n' \
        "$round" "$job" "$c" "$out" "$cpu" "$hwm" >>"$W/runs.jsonl"
      say "round $round $job $c: $(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f IOPS, %.1f MB/s" % (side["iops"], side["bw_bytes"] / 1e6))' "$out"), daemon cpu ${cpu}s"
    done
  done
done

# Log state of the tracked daemon at the end (did it stay on its log?).
"$BIN/siterep" -c "${CONF[log]}" status --json >"$W/status-log.json" || true

mkdir -p "$ROOT/bench/results"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
python3 "$ROOT/bench/summarize.py" --runs "$W/runs.jsonl" --status "$W/status-log.json" \
  --workdir "$W" --size "$SIZE" --span "$SPAN" --runtime "$RUNTIME" --ramp "$RAMP" \
  --rounds "$ROUNDS" --out "$ROOT/bench/results/$stamp.json"
