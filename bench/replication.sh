#!/usr/bin/env bash
# make bench, part 2: replication between two siterepd daemons on loopback (mutual TLS).
# East protects VM "vm" (one disk of BENCH_SIZE, prefilled over BENCH_SPAN, frequency
# continuous) and replicates it to west.
#
#  A. Guest cost of replication: fio 4k randwrite QD32 on the protected disk, side by side
#     in each round: with the shipper paused, and with replication running (after the
#     backlog of the paused run has drained). Target: running/paused >= 0.85.
#  B. Shipping throughput: with the shipper paused, fio writes BENCH_SHIP of 1 MiB random
#     blocks; then resume, and time until west has acknowledged (received durably) and
#     until it has applied the last cycle. Against a raw TLS 1.3 stream of the same number
#     of bytes between two processes on loopback with the same certificates and TLS layer
#     (bin/siterep-tlsbench). Target: acknowledged throughput >= 0.8 of the raw stream.
#  C. RPO under steady load: fio 4k randwrite at half the IOPS that A measured with
#     replication running, for BENCH_RPO_TIME s; `siterep status --json` is sampled every
#     0.5 s. Target: p99 of rpo_seconds <= 5 s.
# Results: a table on stdout and bench/results/<UTC time>-replication.json.
#
# Usage: bash bench/replication.sh [BIN_DIR]
# Environment: BENCH_RUNTIME (s, 20), BENCH_RAMP (s, 5), BENCH_ROUNDS (3), BENCH_SIZE (4G),
#   BENCH_SPAN (1G), BENCH_SHIP (2G), BENCH_RPO_TIME (s, 60), BENCH_DIR (/var/tmp).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
RUNTIME=${BENCH_RUNTIME:-20}
RAMP=${BENCH_RAMP:-5}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-4G}
SPAN=${BENCH_SPAN:-1G}
SHIP=${BENCH_SHIP:-2G}
RPO_TIME=${BENCH_RPO_TIME:-60}

for tool in siterepd siterep siterep-certs siterep-tlsbench; do
  [[ -x $BIN/$tool ]] || { echo "bench: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
command -v fio >/dev/null || { echo "bench: fio is not installed (make deps)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root" >&2; exit 1; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/siterep-rbench.XXXXXX")
declare -A PID
SERVER_PID=""
say() { echo "[rbench +${SECONDS}s] $*"; }
source "$ROOT/bench/sites.sh"

cleanup() {
  local rc=$? s
  set +e
  trap - EXIT INT TERM
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  for s in east west; do
    if [[ -n ${PID[$s]:-} ]] && kill -0 "${PID[$s]}" 2>/dev/null; then
      kill -TERM "${PID[$s]}"
      wait "${PID[$s]}"
    fi
    if findmnt -rn --mountpoint "$W/$s/mnt" >/dev/null 2>&1; then
      fusermount3 -u "$W/$s/mnt" || fusermount3 -uz "$W/$s/mnt"
    fi
  done
  bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

east() { "$BIN/siterep" -c "$W/east.toml" "$@"; }
vm_json() { east status vm --json; }
field() { vm_json | python3 -c "import json,sys; v=json.load(sys.stdin)['vms'][0]; print($1)"; }

bench_certs "$W"
EAST_PORT=$(free_port)
WEST_PORT=$(free_port)
bench_site_configs "$W" "$EAST_PORT" "$WEST_PORT"
cat >>"$W/east.toml" <<TOML

[[vms]]
name = "vm"
frequency = "continuous"
  [[vms.disks]]
  name = "disk0"
  image = "$W/east/disk0.img"
TOML
truncate -s "$SIZE" "$W/east/disk0.img"
fio --name=prefill --filename="$W/east/disk0.img" --ioengine=io_uring --direct=1 --rw=write \
  --bs=1M --iodepth=8 --size="$SPAN" --output=/dev/null
# The replica starts as the same seed, so the replica equals the primary from the start.
mkdir -p "$W/west/state/replicas/vm"
cp --sparse=always "$W/east/disk0.img" "$W/west/state/replicas/vm/disk0.img"
# Drop both files from the page cache: the copy's sequential read leaves the primary image
# in large folios, and 4 KiB guest writes into large folios cost far more in ext4 than
# into the small ones a guest's own writes create (part 1's images are never read so).
python3 - "$W/east/disk0.img" "$W/west/state/replicas/vm/disk0.img" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDWR)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY

for s in west east; do
  "$BIN/siterepd" -c "$W/$s.toml" 2>"$W/siterepd-$s.log" &
  PID[$s]=$!
  for _ in $(seq 1 100); do
    "$BIN/siterep" -c "$W/$s.toml" status >/dev/null 2>&1 && break
    kill -0 "${PID[$s]}" 2>/dev/null || { tail "$W/siterepd-$s.log" >&2; exit 1; }
    sleep 0.1
  done
done
east enable vm --to west --wait >/dev/null
say "two sites up (work folder $W on $(findmnt -n -o FSTYPE --target "$W")); disk of $SIZE, span $SPAN"
DISK=$W/east/mnt/vm/disk0

# caught_up [TIMEOUT]: cut, then wait until west has applied that cycle.
caught_up() {
  local target i
  target=$(east cut vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
  for ((i = 0; i < ${1:-600} * 10; i++)); do
    [[ $(field "v.get('applied_cycle', 0)") -ge $target ]] && return 0
    sleep 0.1
  done
  echo "bench: west did not catch up" >&2
  return 1
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)
iops_of() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$1"
}

: >"$W/a.jsonl"
say "A: 4k randwrite QD32, shipper paused vs replication running; $ROUNDS rounds"
for ((round = 1; round <= ROUNDS; round++)); do
  order=(paused running)
  ((round % 2 == 0)) && order=(running paused)
  for mode in "${order[@]}"; do
    if [[ $mode == paused ]]; then
      east pause vm >/dev/null
    else
      east resume vm >/dev/null
      caught_up
    fi
    out=$W/a.$mode.$round.json
    e0=$(cpu_ticks "${PID[east]}") w0=$(cpu_ticks "${PID[west]}")
    fio --name=a --filename="$DISK" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
      --iodepth=32 --size="$SPAN" --time_based --ramp_time="$RAMP" --runtime="$RUNTIME" \
      --norandommap --randrepeat=0 --output-format=json --output="$out"
    iops=$(iops_of "$out")
    ecpu=$(awk -v a="$e0" -v b="$(cpu_ticks "${PID[east]}")" -v t="$TICKS" 'BEGIN { printf "%.2f", (b - a) / t }')
    wcpu=$(awk -v a="$w0" -v b="$(cpu_ticks "${PID[west]}")" -v t="$TICKS" 'BEGIN { printf "%.2f", (b - a) / t }')
    echo "{\"round\": $round, \"mode\": \"$mode\", \"iops\": $iops, \"east_cpu_s\": $ecpu, \"west_cpu_s\": $wcpu}" >>"$W/a.jsonl"
    say "A round $round $mode: $(printf '%.0f' "$iops") IOPS; CPU seconds east $ecpu, west $wcpu"
  done
  east resume vm >/dev/null
  caught_up
done

say "B: shipping $SHIP written while paused"
east pause vm >/dev/null
fio --name=b --filename="$DISK" --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 \
  --size="$SHIP" --refill_buffers --output=/dev/null
target=$(east cut vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
pending=$(field "v['pending_bytes']")
sent0=$(field "v['link']['bytes_sent']")
# Polled with grep, not python: the poll must not eat the CPU it measures.
num() { grep -o "\"$1\": [0-9]*" | head -n 1 | grep -o '[0-9]*$'; }
say "B: resume: shipping $pending bytes"
t0=$(date +%s.%N)
east resume vm >/dev/null
t_ack="" t_applied=""
while [[ -z $t_applied ]]; do
  st=$("$BIN/siterep" -c "$W/east.toml" status vm --json)
  now=$(date +%s.%N)
  [[ -z $t_ack && $(num acked_cycle <<<"$st") -ge $target ]] && t_ack=$now
  [[ $(num applied_cycle <<<"$st") -ge $target ]] && t_applied=$now
  sleep 0.05
done
sent1=$(field "v['link']['bytes_sent']")
say "B: $pending log bytes; acknowledged after $(python3 -c "print('%.2f' % ($t_ack - $t0))") s, applied after $(python3 -c "print('%.2f' % ($t_applied - $t0))") s"

# The raw TLS 1.3 stream of the same number of bytes between two processes, with the same
# certificates and TLS layer (bin/siterep-tlsbench), nothing else.
SPORT=$(free_port)
"$BIN/siterep-tlsbench" serve "127.0.0.1:$SPORT" "$W/certs/ca.pem" "$W/certs/west.pem" \
  "$W/certs/west.key" east >"$W/tlsbench.out" &
SERVER_PID=$!
for _ in $(seq 1 50); do
  grep -q listening "$W/tlsbench.out" && break
  sleep 0.1
done
s0=$(date +%s.%N)
"$BIN/siterep-tlsbench" send "127.0.0.1:$SPORT" "$W/certs/ca.pem" "$W/certs/east.pem" \
  "$W/certs/east.key" west "$pending"
wait "$SERVER_PID"
SERVER_PID=""
s1=$(date +%s.%N)
say "B: raw TLS stream of the same bytes: $(python3 -c "print('%.2f' % ($s1 - $s0))") s ($(tail -n 1 "$W/tlsbench.out"))"

running_iops=$(python3 -c '
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(r["iops"] for r in runs if r["mode"] == "running"))' "$W/a.jsonl")
rate=$(python3 -c "print(int($running_iops / 2))")
say "C: 4k randwrite at $rate IOPS (half of $(printf '%.0f' "$running_iops")) for ${RPO_TIME}s; RPO sampled every 0.5 s"
fio --name=c --filename="$DISK" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
  --size="$SPAN" --time_based --runtime="$RPO_TIME" --rate_iops="$rate" --norandommap \
  --randrepeat=0 --output-format=json --output="$W/c.json" &
FIO=$!
: >"$W/rpo.txt"
sleep 2
while kill -0 "$FIO" 2>/dev/null; do
  field "v['rpo_seconds'] if v['rpo_seconds'] is not None else -1" >>"$W/rpo.txt" || true
  sleep 0.5
done
wait "$FIO"
caught_up

mkdir -p "$ROOT/bench/results"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
python3 - "$W" "$ROOT/bench/results/$stamp-replication.json" <<PY
import json, statistics, sys
w, out = sys.argv[1], sys.argv[2]
a = [json.loads(l) for l in open(w + "/a.jsonl")]
paused = statistics.median(r["iops"] for r in a if r["mode"] == "paused")
running = statistics.median(r["iops"] for r in a if r["mode"] == "running")
pending, t0, t_ack, t_applied, s0, s1 = $pending, $t0, $t_ack, $t_applied, $s0, $s1
sent = $sent1 - $sent0
ship_ack = pending / (t_ack - t0)
ship_applied = pending / (t_applied - t0)
raw = pending / (s1 - s0)
rpo = sorted(float(x) for x in open(w + "/rpo.txt") if x.strip() and float(x) >= 0)
def pct(p):
    return rpo[min(len(rpo) - 1, int(round(p / 100 * (len(rpo) - 1))))] if rpo else None
c = json.load(open(w + "/c.json"))["jobs"][0]["write"]["iops"]
cpu = lambda mode, site: statistics.median(r[site + "_cpu_s"] for r in a if r["mode"] == mode)
res = {
  "params": {"size": "$SIZE", "span": "$SPAN", "ship": "$SHIP", "runtime": $RUNTIME,
             "ramp": $RAMP, "rounds": $ROUNDS, "rpo_time": $RPO_TIME},
  "a_runs": a,
  "a": {"paused_iops": paused, "running_iops": running, "ratio": running / paused, "target": 0.85,
        "east_cpu_s": {"paused": cpu("paused", "east"), "running": cpu("running", "east")},
        "west_cpu_s": {"paused": cpu("paused", "west"), "running": cpu("running", "west")}},
  "b": {"log_bytes": pending, "wire_bytes": sent, "ack_s": t_ack - t0, "applied_s": t_applied - t0,
        "raw_tls_s": s1 - s0, "ship_ack_mb_s": ship_ack / 1e6, "ship_applied_mb_s": ship_applied / 1e6,
        "raw_tls_mb_s": raw / 1e6, "ratio": ship_ack / raw, "target": 0.8},
  "c": {"rate_iops": $rate, "achieved_iops": c, "samples": len(rpo), "rpo_p50_s": pct(50),
        "rpo_p99_s": pct(99), "rpo_max_s": rpo[-1] if rpo else None, "target_p99_s": 5.0},
}
json.dump(res, open(out, "w"), indent=2)
ok = lambda b: "met" if b else "MISSED"
print()
print("replication bench (medians over %d rounds)" % $ROUNDS)
print("  A  4k randwrite QD32   paused %8.0f IOPS   running %8.0f IOPS   running/paused %.2f (target 0.85, %s)"
      % (paused, running, running / paused, ok(running / paused >= 0.85)))
print("     daemon CPU seconds per run: east %.1f paused, %.1f running; west %.1f paused, %.1f running"
      % (cpu("paused", "east"), cpu("running", "east"), cpu("paused", "west"), cpu("running", "west")))
print("  B  shipping %.0f MiB    acknowledged %.1f MB/s, applied %.1f MB/s; raw TLS stream %.1f MB/s;"
      " ack/raw %.2f (target 0.80, %s); wire bytes %.0f MiB"
      % (pending / 2**20, ship_ack / 1e6, ship_applied / 1e6, raw / 1e6, ship_ack / raw,
         ok(ship_ack / raw >= 0.8), sent / 2**20))
print("  C  RPO at %d IOPS (achieved %.0f): p50 %.2f s, p99 %.2f s, max %.2f s over %d samples (target p99 <= 5 s, %s)"
      % ($rate, c, pct(50), pct(99), rpo[-1], len(rpo), ok(pct(99) <= 5.0)))
print("  results: " + out)
PY
