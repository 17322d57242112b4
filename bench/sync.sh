#!/usr/bin/env bash
# make bench, part 3: syncs (initial replication, seeded enable) between two siterepd
# daemons on loopback (mutual TLS, zstd on the link as configured by default).
#
#  D. Initial copy: a 4 GiB disk holding 2 GiB of random data (the rest a hole) is enabled;
#     time from `enable` to the end of the sync. Against `openssl s_client` piping the same
#     2 GiB of data over TLS on loopback to `openssl s_server` (same certificates), in the
#     same run. Target: siterep's data throughput >= 0.7 of openssl's.
#  E. Seeded enable: a 4 GiB disk full of random data, whose copy at the replica site
#     differs in 1% of its 64 KiB blocks. Target: data sent <= 1.1% of the disk (hashes
#     counted apart), and a time well under G, the full initial copy of an equal disk
#     (caches dropped before both; both sites share this machine's one disk, so the
#     comparison reads 8 GiB where a copy reads 4 and writes 4).
#  F. Sparse disk: 10 GiB holding 100 MiB of data in ten pieces. Target: data sent about
#     100 MiB.
# Results: a table on stdout and bench/results/<UTC time>-sync.json.
#
# Usage: bash bench/sync.sh [BIN_DIR]
# Environment: BENCH_DIR (/var/tmp), BENCH_SYNC_ROUNDS (2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/build/bin}")
ROUNDS=${BENCH_SYNC_ROUNDS:-2}
for tool in siterepd siterep siterep-certs; do
  [[ -x $BIN/$tool ]] || { echo "bench: $BIN/$tool is missing; run 'make build' first" >&2; exit 1; }
done
command -v openssl >/dev/null || { echo "bench: openssl is not installed (make deps)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root" >&2; exit 1; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/siterep-sbench.XXXXXX")
declare -A PID
SSL_PID=""
say() { echo "[sbench +${SECONDS}s] $*"; }
source "$ROOT/bench/sites.sh"

stop_sites() {
  local s
  for s in east west; do
    if [[ -n ${PID[$s]:-} ]] && kill -0 "${PID[$s]}" 2>/dev/null; then
      kill -TERM "${PID[$s]}"
      wait "${PID[$s]}" || true
    fi
    PID[$s]=""
    if findmnt -rn --mountpoint "$W/$s/mnt" >/dev/null 2>&1; then
      fusermount3 -u "$W/$s/mnt" || fusermount3 -uz "$W/$s/mnt"
    fi
  done
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [[ -n $SSL_PID ]] && kill "$SSL_PID" 2>/dev/null && wait "$SSL_PID" 2>/dev/null
  stop_sites
  bench_finish "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
east() { "$BIN/siterep" -c "$W/east.toml" "$@"; }
field() { # field VM EXPR
  east status "$1" --json | python3 -c "import json,sys; v=json.load(sys.stdin)['vms'][0]; print($2)"
}
drop_cache() {
  python3 - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}

bench_certs "$W"
EAST_PORT=$(free_port)
WEST_PORT=$(free_port)

# write_sites VM...: site configs; east protects the VMs (one disk each, <vm>.img).
write_sites() {
  local vm
  bench_site_configs "$W" "$EAST_PORT" "$WEST_PORT"
  for vm in "$@"; do
    cat >>"$W/east.toml" <<TOML

[[vms]]
name = "$vm"
frequency = "continuous"
  [[vms.disks]]
  name = "disk0"
  image = "$W/east/$vm.img"
TOML
  done
}
start_sites() {
  local s
  for s in west east; do
    "$BIN/siterepd" -c "$W/$s.toml" 2>>"$W/siterepd-$s.log" &
    PID[$s]=$!
    for _ in $(seq 1 100); do
      "$BIN/siterep" -c "$W/$s.toml" status >/dev/null 2>&1 && break
      kill -0 "${PID[$s]}" 2>/dev/null || { tail "$W/siterepd-$s.log" >&2; exit 1; }
      sleep 0.1
    done
  done
}
# sync_seconds VM [--seed]: enables VM and prints the seconds until its sync ended.
sync_seconds() {
  local vm=$1 t0 t1
  shift
  t0=$(now)
  east enable "$vm" --to west "$@" >/dev/null
  for ((i = 0; i < 36000; i++)); do
    [[ $(field "$vm" "'last_sync' in v and v['state'] == 'replicating'") == True ]] && break
    sleep 0.1
  done
  t1=$(now)
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
# openssl_seconds FILE BYTES: time to pipe the first BYTES of FILE through s_client to
# s_server over TLS 1.3 on loopback, until the server has written them all to a file (as
# the replica writes its image). s_server's stdin is a FIFO held open (at EOF it would
# close the connection); s_client with -quiet ignores its own EOF, so it is stopped once
# the bytes are there.
openssl_seconds() {
  local file=$1 bytes=$2 port t0 t1 client
  port=$(free_port)
  rm -f "$W/ssl.in" "$W/ssl.out"
  mkfifo "$W/ssl.in"
  exec 7<>"$W/ssl.in"
  openssl s_server -quiet -accept "$port" -tls1_3 -cert "$W/certs/west.pem" -key "$W/certs/west.key" \
    -CAfile "$W/certs/ca.pem" <"$W/ssl.in" >"$W/ssl.out" 2>"$W/s_server.log" &
  SSL_PID=$!
  for _ in $(seq 1 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" 2>/dev/null && break
    sleep 0.1
  done
  : >"$W/ssl.out"
  t0=$(now)
  head -c "$bytes" "$file" | openssl s_client -quiet -connect "127.0.0.1:$port" -tls1_3 \
    -cert "$W/certs/east.pem" -key "$W/certs/east.key" -CAfile "$W/certs/ca.pem" \
    >/dev/null 2>"$W/s_client.log" &
  client=$!
  while (($(stat -c %s "$W/ssl.out") < bytes)); do
    kill -0 "$SSL_PID" 2>/dev/null || { echo "bench: openssl s_server exited" >&2; exit 1; }
    sleep 0.01
  done
  t1=$(now)
  kill "$client" "$SSL_PID" 2>/dev/null
  wait "$client" "$SSL_PID" 2>/dev/null || true
  SSL_PID=""
  exec 7>&-
  rm -f "$W/ssl.in" "$W/ssl.out"
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}

GIB=$((1024 * 1024 * 1024))
MIB=$((1024 * 1024))
RESULTS=()

say "preparing the disks in $W ($(findmnt -n -o FSTYPE --target "$W"))"
set +o pipefail  # the generators below end on SIGPIPE when head has enough
# D: 4 GiB, 2 GiB of random data at the start.
mkdir -p "$W/east"
truncate -s 4G "$W/east/vmd.img"
openssl enc -aes-128-ctr -pass pass:d -nosalt -pbkdf2 </dev/zero 2>/dev/null |
  head -c $((2 * GIB)) | dd of="$W/east/vmd.img" bs=1M conv=notrunc status=none iflag=fullblock
# E: 4 GiB of random data; its seed at west differs in 1% of the 64 KiB blocks.
openssl enc -aes-128-ctr -pass pass:e -nosalt -pbkdf2 </dev/zero 2>/dev/null |
  head -c $((4 * GIB)) >"$W/east/vme.img"
cp "$W/east/vme.img" "$W/east/vmg.img"  # G: the same data, copied in full
# F: 10 GiB sparse with ten pieces of 10 MiB.
truncate -s 10G "$W/east/vmf.img"
for k in $(seq 0 9); do
  head -c $((10 * MIB)) "$W/east/vmd.img" |
    dd of="$W/east/vmf.img" bs=1M seek=$((k * 1000 + 37)) conv=notrunc status=none iflag=fullblock
done
set -o pipefail

for ((round = 1; round <= ROUNDS; round++)); do
  say "round $round: fresh sites"
  stop_sites
  rm -rf "$W/east/state" "$W/west" "$W/east/mnt"
  write_sites vmd vme vmf vmg
  mkdir -p "$W/west/state/replicas/vme"
  cp "$W/east/vme.img" "$W/west/state/replicas/vme/disk0.img"
  changed=$(python3 - "$W/west/state/replicas/vme/disk0.img" <<'PY'
import os, random, sys
block = 64 * 1024
fd = os.open(sys.argv[1], os.O_RDWR)
blocks = os.fstat(fd).st_size // block
rng = random.Random(7)
picked = rng.sample(range(blocks), blocks // 100)
for b in picked:
    os.pwrite(fd, os.urandom(block), b * block)
os.fsync(fd)
os.close(fd)
print(len(picked))
PY
)
  sync
  drop_cache "$W/east/vmd.img" "$W/east/vme.img" "$W/east/vmf.img" "$W/east/vmg.img" \
    "$W/west/state/replicas/vme/disk0.img"
  start_sites

  # D, paired in one round: siterep's initial copy and openssl over the same data.
  cat "$W/east/vmd.img" >/dev/null  # both read the data from the page cache
  t_ssl=$(openssl_seconds "$W/east/vmd.img" $((2 * GIB)))
  t_sync=$(sync_seconds vmd)
  sent_d=$(field vmd "v['last_sync']['bytes_sent']")
  wire_d=$(field vmd "v['last_sync']['bytes_wire']")
  say "D: initial copy ${t_sync} s ($sent_d data bytes, $wire_d on the wire); openssl ${t_ssl} s"

  # E: seeded enable.
  t_seed=$(sync_seconds vme --seed)
  sent_e=$(field vme "v['last_sync']['bytes_sent']")
  wire_e=$(field vme "v['last_sync']['bytes_wire']")
  say "E: seeded enable ${t_seed} s, $changed blocks changed, $sent_e data bytes, $wire_e on the wire"

  # F: sparse disk.
  t_sparse=$(sync_seconds vmf)
  sent_f=$(field vmf "v['last_sync']['bytes_sent']")
  wire_f=$(field vmf "v['last_sync']['bytes_wire']")
  say "F: sparse 10 GiB: ${t_sparse} s, $sent_f data bytes, $wire_f on the wire"

  # G: a full copy of a disk like E's, from a cold cache.
  t_full=$(sync_seconds vmg)
  say "G: full initial copy of 4 GiB of random data: ${t_full} s"

  for vm in vmd vme vmf vmg; do
    cmp "$W/east/$vm.img" "$W/west/state/replicas/$vm/disk0.img" ||
      { echo "bench: the replica of $vm differs from the primary" >&2; exit 1; }
  done
  RESULTS+=("{\"round\": $round, \"d_sync_s\": $t_sync, \"d_openssl_s\": $t_ssl, \"d_bytes_sent\": $sent_d, \"d_bytes_wire\": $wire_d, \"e_seed_s\": $t_seed, \"e_changed_blocks\": $changed, \"e_bytes_sent\": $sent_e, \"e_bytes_wire\": $wire_e, \"f_sync_s\": $t_sparse, \"f_bytes_sent\": $sent_f, \"f_bytes_wire\": $wire_f, \"g_full_copy_s\": $t_full}")
done
stop_sites

mkdir -p "$ROOT/bench/results"
OUT=$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-sync.json
(IFS=,; echo "{\"rounds\": [${RESULTS[*]}]}") >"$OUT"
python3 - "$OUT" <<'PY'
import json, statistics, sys
rounds = json.load(open(sys.argv[1]))["rounds"]
GIB = 1 << 30
med = lambda k: statistics.median(r[k] for r in rounds)
d_rate = 2 * GIB / med("d_sync_s")
ssl_rate = 2 * GIB / med("d_openssl_s")
ratio = d_rate / ssl_rate
e_sent = med("e_bytes_sent") / (4 * GIB)
e_wire = med("e_bytes_wire") / (4 * GIB)
full_copy_s = med("g_full_copy_s")
e_time = med("e_seed_s") / full_copy_s
f_ratio = med("f_bytes_sent") / (100 << 20)
print()
print(f"{'measure':58} {'value':>12} {'target':>10}  met")
def row(name, value, target, ok):
    print(f"{name:58} {value:>12} {target:>10}  {'yes' if ok else 'NO'}")
row(f"D initial copy / openssl s_client ({d_rate/2**20:.0f} vs {ssl_rate/2**20:.0f} MiB/s)", f"{ratio:.2f}", ">= 0.70", ratio >= 0.7)
row(f"E seeded: data sent / disk", f"{100*e_sent:.2f}%", "<= 1.10%", e_sent <= 0.011)
row(f"E seeded: all bytes on the wire / disk (hashes too)", f"{100*e_wire:.2f}%", "-", True)
row(f"E seeded: time / G full copy ({med('e_seed_s'):.1f} vs {full_copy_s:.1f} s)", f"{e_time:.2f}", "< 1", e_time < 1)
row(f"F sparse 10 GiB, 100 MiB data: data sent / data", f"{f_ratio:.3f}", "~1.0", 0.95 <= f_ratio <= 1.05)
json.dump({"rounds": rounds, "summary": {"d_ratio": ratio, "d_rate_mib_s": d_rate / 2**20,
          "openssl_rate_mib_s": ssl_rate / 2**20, "e_sent_share": e_sent, "e_wire_share": e_wire,
          "e_time_vs_full": e_time, "f_sent_vs_data": f_ratio}},
          open(sys.argv[1], "w"), indent=1)
print(f"\nresults: {sys.argv[1]}")
PY
