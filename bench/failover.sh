#!/usr/bin/env bash
# make bench, part 4: failover between two siterepd daemons on loopback (mutual TLS).
# East protects VM "vm": three sparse disks of BENCH_FAILOVER_DISK, the first
# BENCH_FAILOVER_SPAN of each holding random data, replicated to west (frequency
# continuous). Every round starts from fresh sites and runs H, then I and J:
#
#  H. Planned failover east -> west with BENCH_FAILOVER_PENDING MiB pending: replication is
#     paused, that much is written in 1 MiB pieces spread over the three disks at east
#     (O_DIRECT through the FUSE disks), then `resume` and at once `failover --planned`
#     (from one helper process: the backlog ships in a fraction of a second, so any delay
#     between the two would let it go before the failover starts; the resume's own time is
#     reported apart). Measured: from the failover's start until a direct 4 KiB write to
#     <west mnt>/vm/d0 succeeds (polled from outside, every 5 ms), and the command's own
#     "rto_seconds" and "seconds". The probe writes back the bytes that block already
#     holds, so the check stands: the sha256 of the three disks at west after the failover
#     equals their sha256 at east before it.
#  I. Unplanned failover west -> east: west is now primary (east its replica); once east
#     has applied everything, west's replication is paused, west writes E MiB that are
#     never shipped (for J), and west's siterepd is killed with SIGKILL. Measured: from the start
#     of `failover --unplanned --point latest` at east until a direct 4 KiB write to
#     <east mnt>/vm/d0 succeeds, and the command's "rto_seconds". The probe writes inside
#     the first piece J writes at east, so it adds no divergence of its own.
#  J. Reverse replication: east writes D MiB of random data on the failed-over disks; west
#     starts again (it must come up fenced); `reverse --wait` at east. Both sites wrote
#     1 MiB pieces at random 64 KiB-aligned offsets inside the data span (so that no
#     divergent block is all zeros at east, which would go as a zero extent and not count
#     as data sent); the divergent bytes are the union of both sets of pieces in 64 KiB
#     blocks, the unit the sync compares. Reported: bytes_sent / divergent (target <= 1.2),
#     bytes_wire, the bytes compared (the blocks either site changed since the fork) and
#     their hash metadata (blocks x 8 bytes).
#     Checked: east's disks equal west's replica images at the end, they hold east's pieces,
#     and west's unshipped pieces are gone (where east wrote nothing over them).
# Results: a table on stdout and bench/results/<UTC time>-failover.json. Exits non-zero
# when the data does not end up equal, or a step fails.
#
# Usage: bash bench/failover.sh [BIN_DIR]
# Environment: BENCH_DIR (/var/tmp), BENCH_FAILOVER_ROUNDS (2), BENCH_FAILOVER_DISK (1G),
#   BENCH_FAILOVER_SPAN (128M), BENCH_FAILOVER_PENDING (MiB, 64), BENCH_FAILOVER_D (MiB, 32),
#   BENCH_FAILOVER_E (MiB, 16).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
ROUNDS=${BENCH_FAILOVER_ROUNDS:-2}
DISK_SIZE=${BENCH_FAILOVER_DISK:-1G}
SPAN=${BENCH_FAILOVER_SPAN:-128M}
PENDING_MIB=${BENCH_FAILOVER_PENDING:-64}
D_MIB=${BENCH_FAILOVER_D:-32}
E_MIB=${BENCH_FAILOVER_E:-16}
DISKS=(d0 d1 d2)
for tool in siterepd siterep siterep-certs; do
  [[ -x $BIN/$tool ]] || { echo "bench: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
command -v openssl >/dev/null || { echo "bench: openssl is not installed (make deps)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root" >&2; exit 1; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/siterep-fbench.XXXXXX")
declare -A PID
say() { echo "[fbench +${SECONDS}s] $*"; }
source "$ROOT/bench/sites.sh"

unmount_site() {
  if findmnt -rn --mountpoint "$W/$1/mnt" >/dev/null 2>&1; then
    fusermount3 -u "$W/$1/mnt" || fusermount3 -uz "$W/$1/mnt"
  fi
}
stop_sites() {
  local s
  for s in east west; do
    if [[ -n ${PID[$s]:-} ]] && kill -0 "${PID[$s]}" 2>/dev/null; then
      kill -TERM "${PID[$s]}"
      wait "${PID[$s]}" || true
    fi
    PID[$s]=""
    unmount_site "$s"
  done
}
cleanup() {
  local rc=$? f
  set +e
  trap - EXIT INT TERM
  if [[ $rc -ne 0 ]]; then
    for f in "$W"/siterepd-*.log; do
      [[ -s $f ]] || continue
      echo "---- last lines of $f ----" >&2
      tail -n 30 "$f" >&2
    done
  fi
  stop_sites
  bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
  echo "bench: $*" >&2
  exit 1
}
site() { # site NAME ARGS...: siterep against that site
  local s=$1
  shift
  "$BIN/siterep" -c "$W/$s.toml" "$@"
}
field() { # field SITE EXPR: a Python expression over vm's status object (v)
  site "$1" status vm --json |
    python3 -c "import json,sys; vs=json.load(sys.stdin)['vms']; v=vs[0] if vs else {}; print($2)"
}
# wait_for SITE EXPR SECONDS WHAT: until EXPR is True at SITE.
wait_for() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    [[ $(field "$1" "$2") == True ]] && return 0
    sleep 0.1
  done
  die "$4 not reached at $1 within $3 s: $(field "$1" "v.get('state'), v.get('health_reason')")"
}
# caught_up SITE: cuts vm at SITE (its primary) and waits until the replica applied it.
caught_up() {
  local target
  target=$(site "$1" cut vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cycle"])')
  wait_for "$1" "v.get('applied_cycle', 0) >= $target" 300 "replica applied cycle $target"
}
start_site() {
  local s=$1
  "$BIN/siterepd" -c "$W/$s.toml" 2>>"$W/siterepd-$s.log" &
  PID[$s]=$!
  for _ in $(seq 1 100); do
    site "$s" status >/dev/null 2>&1 && return 0
    kill -0 "${PID[$s]}" 2>/dev/null || { tail "$W/siterepd-$s.log" >&2; die "siterepd at $s exited"; }
    sleep 0.1
  done
  die "siterepd at $s does not answer"
}
# disk_paths SITE: the vm's disks at SITE's FUSE mount.
disk_paths() {
  local d
  for d in "${DISKS[@]}"; do echo "$W/$1/mnt/vm/$d"; done
}

# The piece plans, the O_DIRECT writer, the timed probe, the divergence count, sha256.
cat >"$W/fo.py" <<'PY'
import hashlib, json, mmap, os, random, subprocess, sys, time

MIB = 1 << 20
BLOCK = 64 << 10

def plan(out, seed, count, align, limit, ndisks):
    """count 1 MiB pieces, piece k on disk k % ndisks, at random align-aligned offsets
    below limit, none overlapping another of the same plan."""
    rng = random.Random(seed)
    taken = [set() for _ in range(ndisks)]
    pieces = []
    for k in range(count):
        d = k % ndisks
        while True:
            off = rng.randrange(0, (limit - MIB) // align + 1) * align
            blocks = set(range(off // BLOCK, (off + MIB + BLOCK - 1) // BLOCK))
            if not blocks & taken[d]:
                taken[d] |= blocks
                break
        pieces.append([d, off, MIB])
    json.dump(pieces, open(out, "w"))

def write(plan_file, *paths):
    """Writes the plan's pieces with random data; their sha256 go to plan_file.written."""
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
    fds = [os.open(p, os.O_WRONLY | os.O_DIRECT) for p in paths]
    written = []
    for d, off, length in json.load(open(plan_file)):
        data = os.urandom(length)
        buf.seek(0)
        buf.write(data)
        if os.pwrite(fds[d], memoryview(buf)[:length], off) != length:
            sys.exit(f"short write to {paths[d]} at {off}")
        written.append(hashlib.sha256(data).hexdigest())
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    json.dump(written, open(plan_file + ".written", "w"))

def digests(plan_file, paths):
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    out = [hashlib.sha256(os.pread(fds[d], length, off)).hexdigest()
           for d, off, length in json.load(open(plan_file))]
    for fd in fds:
        os.close(fd)
    return out

def before(plan_file, *paths):
    """The sha256 of each piece of the plan as the disks hold it now: plan_file.before."""
    json.dump(digests(plan_file, paths), open(plan_file + ".before", "w"))

def check(lost_plan, kept_plan, *paths):
    """After reverse replication: every piece of kept_plan holds what was written there,
    and every piece of lost_plan that no kept piece overlaps holds what it held before
    lost_plan was written (those writes were made on the losing site)."""
    kept = json.load(open(kept_plan))
    bad = [f"disk {d} offset {off}: not what the new primary wrote"
           for (d, off, _), now, want in zip(kept, digests(kept_plan, paths),
                                             json.load(open(kept_plan + ".written"))) if now != want]
    for (d, off, length), now, want in zip(json.load(open(lost_plan)), digests(lost_plan, paths),
                                           json.load(open(lost_plan + ".before"))):
        if any(kd == d and ko < off + length and off < ko + kl for kd, ko, kl in kept):
            continue
        if now != want:
            bad.append(f"disk {d} offset {off}: holds the old primary's unshipped write")
    if bad:
        sys.exit("; ".join(bad))

def timed(out, path, offset, source, *cmds):
    """timed OUT PATH OFFSET SOURCE [FIRST... --then] CMD...: runs FIRST to its end (if
    given), then at once CMD; from CMD's start, tries a direct 4 KiB write at PATH+OFFSET
    every 5 ms. SOURCE: a file whose 4 KiB at OFFSET the probe writes (the block's own
    bytes), or 'zero'. Writes {"writable_s", "command_s", "first_s", "rc", "attempts",
    "last_errno"} to OUT (seconds from CMD's start; first_s: FIRST's own time), CMD's
    stdout to OUT.out, its stderr to OUT.err."""
    offset = int(offset)
    buf = mmap.mmap(-1, 4096)
    if source != "zero":
        with open(source, "rb") as f:
            f.seek(offset)
            data = f.read(4096)
        assert len(data) == 4096
        buf.write(data)
    first, cmd = [], list(cmds)
    if "--then" in cmd:
        first, cmd = cmd[:cmd.index("--then")], cmd[cmd.index("--then") + 1:]
    first_s = None
    if first:
        t = time.monotonic()
        subprocess.run(first, check=True, stdout=subprocess.DEVNULL)
        first_s = time.monotonic() - t
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=open(out + ".out", "w"), stderr=open(out + ".err", "w"))
    writable = command = None
    attempts = 0
    last_errno = 0
    while writable is None:
        attempts += 1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            try:
                if os.pwrite(fd, buf, offset) == 4096:
                    writable = time.monotonic() - t0
            finally:
                os.close(fd)
        except OSError as e:
            last_errno = e.errno
        if command is None and p.poll() is not None:
            command = time.monotonic() - t0
        if writable is None:
            if command is not None and (p.returncode != 0 or time.monotonic() - t0 > command + 30):
                break
            time.sleep(0.005)
    if command is None:
        p.wait()
        command = time.monotonic() - t0
    json.dump({"writable_s": writable, "command_s": command, "first_s": first_s, "rc": p.returncode,
               "attempts": attempts, "last_errno": last_errno}, open(out, "w"))

def divergent(*args):
    """divergent DISK_PATH... -- PLAN...: the 64 KiB blocks the plans touch (their union),
    and how many of them are all zeros in the given disks now. Prints 'bytes zero_blocks'."""
    cut = args.index("--")
    paths, plans = args[:cut], args[cut + 1:]
    blocks = set()
    for p in plans:
        for d, off, length in json.load(open(p)):
            blocks |= {(d, b) for b in range(off // BLOCK, (off + length + BLOCK - 1) // BLOCK)}
    zero = bytes(BLOCK)
    zeros = 0
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    for d, b in blocks:
        if os.pread(fds[d], BLOCK, b * BLOCK) == zero:
            zeros += 1
    print(len(blocks) * BLOCK, zeros)

def sha(*paths):
    """The sha256 of each file, on one line (hashlib: several times sha256sum's speed here)."""
    buf = bytearray(4 * MIB)
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        out.append(h.hexdigest())
    print(" ".join(out))

def first_piece(plan_file):
    d, off, _ = json.load(open(plan_file))[0]
    assert d == 0
    print(off)

{"plan": lambda out, seed, count, align, limit, n: plan(out, int(seed), int(count), int(align), int(limit), int(n)),
 "write": write, "timed": timed, "divergent": divergent, "sha": sha, "first_piece": first_piece,
 "before": before, "check": check}[sys.argv[1]](*sys.argv[2:])
PY
fo() { python3 "$W/fo.py" "$@"; }
# json_get FILE EXPR: a Python expression over the JSON document in FILE (d).
json_get() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

bench_certs "$W"
EAST_PORT=$(free_port)
WEST_PORT=$(free_port)
DISK_BYTES=$(numfmt --from=iec "$DISK_SIZE")
SPAN_BYTES=$(numfmt --from=iec "$SPAN")
((SPAN_BYTES <= DISK_BYTES)) || die "BENCH_FAILOVER_SPAN is larger than the disk"
MIB=$((1024 * 1024))

say "preparing three disks of $DISK_SIZE ($SPAN of random data each) in $W ($(findmnt -n -o FSTYPE --target "$W"))"
mkdir -p "$W/template"
set +o pipefail  # the generator ends on SIGPIPE when head has enough
for d in "${DISKS[@]}"; do
  truncate -s "$DISK_SIZE" "$W/template/$d.img"
  openssl enc -aes-128-ctr -pass "pass:$d" -nosalt -pbkdf2 </dev/zero 2>/dev/null |
    head -c "$SPAN_BYTES" | dd of="$W/template/$d.img" bs=1M conv=notrunc status=none iflag=fullblock
done
set -o pipefail

RESULTS=()
for ((round = 1; round <= ROUNDS; round++)); do
  say "round $round: fresh sites, initial replication"
  stop_sites
  rm -rf "$W/east" "$W/west" "$W"/*.json* "$W"/*.out
  bench_site_configs "$W" "$EAST_PORT" "$WEST_PORT"
  {
    echo
    echo "[[vms]]"
    echo "name = \"vm\""
    echo "frequency = \"continuous\""
    for d in "${DISKS[@]}"; do
      cp --sparse=always "$W/template/$d.img" "$W/east/$d.img"
      echo "  [[vms.disks]]"
      echo "  name = \"$d\""
      echo "  image = \"$W/east/$d.img\""
    done
  } >>"$W/east.toml"
  start_site west
  start_site east
  site east enable vm --to west --wait >/dev/null
  mapfile -t EAST_DISKS < <(disk_paths east)
  mapfile -t WEST_DISKS < <(disk_paths west)

  # H: planned failover east -> west with PENDING_MIB written while paused.
  site east pause vm >/dev/null
  fo plan "$W/h.json" $((round * 100 + 1)) "$PENDING_MIB" "$MIB" "$DISK_BYTES" "${#DISKS[@]}"
  fo write "$W/h.json" "${EAST_DISKS[@]}"
  pending=$(field east "v['pending_bytes']")
  sha_east=$(fo sha "${EAST_DISKS[@]}")
  probe_h=$(fo first_piece "$W/h.json")
  say "H: $PENDING_MIB MiB written while paused ($pending bytes pending); resume, failover --planned"
  # Resume and failover from one process, so that the backlog is still there when the
  # failover starts (64 MiB ship in about 0.1 s on loopback).
  fo timed "$W/h.timed.json" "${WEST_DISKS[0]}" "$probe_h" "${EAST_DISKS[0]}" \
    "$BIN/siterep" -c "$W/east.toml" resume vm --then \
    "$BIN/siterep" -c "$W/east.toml" --json failover vm --planned
  [[ $(json_get "$W/h.timed.json" "d['rc']") == 0 ]] ||
    die "H: failover --planned failed: $(cat "$W/h.timed.json.err" "$W/h.timed.json.out")"
  [[ $(json_get "$W/h.timed.json" "d['writable_s'] is not None") == True ]] ||
    die "H: west's d0 never took a write ($(cat "$W/h.timed.json"))"
  h_rto=$(json_get "$W/h.timed.json.out" "d['rto_seconds']")
  h_seconds=$(json_get "$W/h.timed.json.out" "d['seconds']")
  h_drain=$(json_get "$W/h.timed.json.out" "d['drain_seconds']")
  h_writable=$(json_get "$W/h.timed.json" "round(d['writable_s'], 3)")
  h_command=$(json_get "$W/h.timed.json" "round(d['command_s'], 3)")
  h_resume=$(json_get "$W/h.timed.json" "round(d['first_s'], 3)")
  [[ $(field west "v['role']") == primary ]] || die "H: west is not primary after the planned failover"
  sha_west=$(fo sha "${WEST_DISKS[@]}")
  [[ $sha_west == "$sha_east" ]] ||
    die "H: the disks at west differ from east's before the failover (east: $sha_east; west: $sha_west)"
  say "H: resume ${h_resume} s, then: writable at west after ${h_writable} s (outside), command ${h_command} s; rto_seconds $h_rto (the promotion at west), drain_seconds $h_drain, seconds $h_seconds; disks equal"

  # I: west is primary now, east its replica. West writes E_MIB that are never shipped.
  wait_for west "v['state'] == 'reverse replicating'" 60 "reverse replication to east"
  caught_up west
  site west pause vm >/dev/null
  fo plan "$W/e.json" $((round * 100 + 2)) "$E_MIB" $((64 * 1024)) "$SPAN_BYTES" "${#DISKS[@]}"
  fo plan "$W/d.json" $((round * 100 + 3)) "$D_MIB" $((64 * 1024)) "$SPAN_BYTES" "${#DISKS[@]}"
  fo before "$W/e.json" "${WEST_DISKS[@]}"
  fo write "$W/e.json" "${WEST_DISKS[@]}"
  kill -KILL "${PID[west]}"
  wait "${PID[west]}" 2>/dev/null || true
  PID[west]=""
  unmount_site west
  wait_for east "v.get('link', {}).get('state') != 'connected'" 30 "the link down"
  probe_i=$(fo first_piece "$W/d.json")  # inside D's first piece: overwritten by J
  say "I: west killed with $E_MIB MiB unshipped; failover --unplanned --point latest at east"
  fo timed "$W/i.timed.json" "${EAST_DISKS[0]}" "$probe_i" zero \
    "$BIN/siterep" -c "$W/east.toml" --json failover vm --unplanned --point latest
  [[ $(json_get "$W/i.timed.json" "d['rc']") == 0 ]] ||
    die "I: failover --unplanned failed: $(cat "$W/i.timed.json.err" "$W/i.timed.json.out")"
  [[ $(json_get "$W/i.timed.json" "d['writable_s'] is not None") == True ]] ||
    die "I: east's d0 never took a write ($(cat "$W/i.timed.json"))"
  i_rto=$(json_get "$W/i.timed.json.out" "d['rto_seconds']")
  i_writable=$(json_get "$W/i.timed.json" "round(d['writable_s'], 3)")
  i_command=$(json_get "$W/i.timed.json" "round(d['command_s'], 3)")
  say "I: writable at east after ${i_writable} s (outside), command ${i_command} s; rto_seconds $i_rto"

  # J: east writes D_MIB; west comes back fenced; reverse at east.
  fo write "$W/d.json" "${EAST_DISKS[@]}"
  start_site west
  wait_for west "v['state'] == 'fenced'" 60 "west fenced"
  t0=$(date +%s.%N)
  site east reverse vm --wait >"$W/reverse.out" 2>&1 ||
    die "J: reverse --wait failed: $(tail -n 5 "$W/reverse.out")"
  t1=$(date +%s.%N)
  j_seconds=$(python3 -c "print(round($t1 - $t0, 3))")
  [[ $(field west "v['role']") == replica ]] || die "J: west is not the replica after reverse"
  caught_up east
  sync_kind=$(field east "v['last_sync']['kind']")
  j_sent=$(field east "v['last_sync']['bytes_sent']")
  j_wire=$(field east "v['last_sync']['bytes_wire']")
  j_total=$(field east "v['last_sync']['bytes_total']")
  divergence=$(fo divergent "${EAST_DISKS[@]}" -- "$W/e.json" "$W/d.json")
  read -r j_divergent j_zero <<<"$divergence"
  for i in "${!DISKS[@]}"; do
    cmp "${EAST_DISKS[i]}" "$W/west/state/replicas/vm/${DISKS[i]}.img" ||
      die "J: disk ${DISKS[i]} differs between east and west's replica after reverse replication"
  done
  fo check "$W/e.json" "$W/d.json" "${EAST_DISKS[@]}" || die "J: east's disks are wrong after reverse replication"
  say "J: reverse ($sync_kind sync) ${j_seconds} s: $j_sent data bytes for $j_divergent divergent" \
    "($j_zero of its blocks all zeros), $j_wire on the wire, $j_total compared; disks equal"

  RESULTS+=("{\"round\": $round, \"h_pending_bytes\": $pending, \"h_writable_s\": $h_writable, \"h_command_s\": $h_command, \"h_resume_s\": $h_resume, \"h_rto_seconds\": $h_rto, \"h_drain_seconds\": $h_drain, \"h_seconds\": $h_seconds, \"i_writable_s\": $i_writable, \"i_command_s\": $i_command, \"i_rto_seconds\": $i_rto, \"j_reverse_s\": $j_seconds, \"j_divergent_bytes\": $j_divergent, \"j_divergent_zero_blocks\": $j_zero, \"j_bytes_sent\": $j_sent, \"j_bytes_wire\": $j_wire, \"j_bytes_total\": $j_total}")
done
stop_sites

mkdir -p "$ROOT/bench/results"
OUT=$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-failover.json
(IFS=,; echo "{\"rounds\": [${RESULTS[*]}]}") >"$OUT"
python3 - "$OUT" "$DISK_BYTES" "${#DISKS[@]}" "$SPAN" "$PENDING_MIB" "$D_MIB" "$E_MIB" <<'PY'
import json, statistics, sys
out, disk_bytes, ndisks, span, pending, d_mib, e_mib = sys.argv[1:]
disk_bytes, ndisks = int(disk_bytes), int(ndisks)
rounds = json.load(open(out))["rounds"]
med = lambda k: statistics.median(r[k] for r in rounds)
compared = int(statistics.median(r["j_bytes_total"] for r in rounds))
hash_bytes = compared // (64 << 10) * 8  # one 8-byte hash per compared 64 KiB block
ratio = statistics.median(r["j_bytes_sent"] / r["j_divergent_bytes"] for r in rounds)
wire_ratio = statistics.median(r["j_bytes_wire"] / r["j_divergent_bytes"] for r in rounds)
print()
print(f"failover bench (medians over {len(rounds)} rounds; VM of {ndisks} disks of {disk_bytes >> 20} MiB)")
print(f"{'measure':64} {'value':>12} {'target':>8}")
def row(name, value, target="-"):
    print(f"{name:64} {value:>12} {target:>8}")
row(f"H planned, {pending} MiB pending: writable at the new primary (outside)", f"{med('h_writable_s'):.2f} s")
row(f"H planned: the command's rto_seconds / drain_seconds / seconds",
    f"{med('h_rto_seconds'):.2f} / {med('h_drain_seconds'):.2f} / {med('h_seconds'):.2f} s")
row(f"I unplanned (latest point): writable at the new primary (outside)", f"{med('i_writable_s'):.2f} s")
row(f"I unplanned: command rto_seconds", f"{med('i_rto_seconds'):.2f} s")
row(f"J reverse, {e_mib} + {d_mib} MiB written apart: divergent bytes", f"{med('j_divergent_bytes') / 2**20:.1f} MiB")
row(f"J reverse: data sent / divergent", f"{ratio:.3f}", "<= 1.20")
row(f"J reverse: all bytes on the wire / divergent", f"{wire_ratio:.3f}")
row(f"J reverse: compared (blocks changed since the fork at either site)",
    f"{compared / 2**20:.1f} MiB")
row(f"J reverse: hash metadata ({compared // (64 << 10)} blocks x 8 B)", f"{hash_bytes / 2**10:.0f} KiB")
row(f"J reverse --wait: time ({ndisks * disk_bytes >> 20} MiB of disks)", f"{med('j_reverse_s'):.2f} s")
print(f"target met: {'yes' if ratio <= 1.2 else 'NO'}; data equal after every failover: yes")
json.dump({"params": {"disk_bytes": disk_bytes, "disks": ndisks, "span": span,
                      "pending_mib": int(pending), "d_mib": int(d_mib), "e_mib": int(e_mib)},
           "rounds": rounds,
           "summary": {"h_writable_s": med("h_writable_s"), "h_rto_seconds": med("h_rto_seconds"),
                       "h_drain_seconds": med("h_drain_seconds"), "h_seconds": med("h_seconds"), "i_writable_s": med("i_writable_s"),
                       "i_rto_seconds": med("i_rto_seconds"), "j_sent_vs_divergent": ratio,
                       "j_wire_vs_divergent": wire_ratio, "j_hash_bytes": hash_bytes,
                       "j_reverse_s": med("j_reverse_s"), "j_target": 1.2}},
          open(out, "w"), indent=1)
print(f"\nresults: {out}")
PY
