#!/usr/bin/env bash
# Fault classes "corruption": bytes flipped where replicated data rests or travels, under
# write load, one pair of sites for all of them (tests/faults/common.sh). Each must be
# detected and recovered from without losing an acknowledged write and without applying
# bad data:
#
#   corrupt_primary_cow       the link is cut at the proxy (close) while the load runs, so
#       the cut cycle waits unshipped at east (pacing), and the load's overwrites of its
#       blocks save their content at the cut to the cycle's copy-on-write file
#       ("<n>.cow" in east's log folder); a byte of one saved block (in the block's data or
#       in its CRC32C, half each) is flipped, the link healed. The shipper reads the cycle
#       from the copy-on-write, checking each saved block's CRC32C: the damaged block is
#       never sent, the disk drops its log for the dirty bitmap with the cut's blocks
#       marked ("resync required", reason "change log: damaged copy-on-write block B of
#       <file> (CRC32C mismatch)"), and the automatic resync (resync = "auto", the default)
#       compares those blocks with the replica. Checks: detected (east's log says the disk
#       fell back naming that block of that file), not_shipped (west never committed that
#       cycle from the log: no refusal of its segment in west's log, and the cycle after
#       west's received one came by the resync), prefix_before (before the heal,
#       siterep-check finds the replica a prefix of the archived log at its applied
#       cycle), recovered (the resync ended, the disk logs again and is no longer resync
#       required). A flipped bit of the saved-block bitmap itself is not detected (as a
#       flipped byte of the image is not): the class does not flip those.
#   corrupt_received_segment  the applier is held on west (failpoint applier.before_apply=
#       error) while the load runs, so committed cycles wait in west's received/ folder; a
#       byte of one of those segment files (in a record's header or payload, half each) is
#       flipped, the applier released. The applier's check (applier/segment_check.cc)
#       refuses the segment: the apply stops before that cycle with the reason persisted.
#       The primary has released the segment (it was acknowledged), so it cannot be sent
#       again: the operator's `siterep resync vm1 --wait` (at east; the replica's apply
#       error makes it compare every block) repairs it.
#       Checks: detected (west's status: apply stopped, naming that segment), not_applied
#       (west's applied cycle stayed below the damaged cycle, and siterep-check finds the
#       replica a prefix at exactly that cycle), recovered (the resync ended, west applies
#       again past the damaged cycle).
#   corrupt_frame             failpoint receiver.corrupt_frame=trigger@K*1 on west: one
#       frame after decryption gets a flipped byte. Checks: detected (a new "CRC mismatch"
#       in west's log), resent (east reconnected and the replica acknowledged a cycle past
#       the one acknowledged at the fault).
#   corrupt_replica_image     1-3 bytes flipped in west's replica images, in 64 KiB blocks
#       of the marker area, which the load does not write. Checks: detected (`siterep
#       verify vm1` exits 1 naming exactly the damaged blocks), repaired (`siterep resync
#       vm1 --full --wait` exits 0), clean (verify exits 0 afterwards).
# And after every iteration (common.sh): acked (every marker and numbered block
# acknowledged by fsync reads back at the primary), then the load stops and the replica
# catches up, prefix (siterep-check PRE ARCHIVE REPLICA passes at west's applied cycle)
# and sha256 (the images of both sites hash the same).
#
# The pre-image and the resync. siterep-check replays the archived log (east runs with
# --archive-logs) over the pre-image. A resync after corrupt_primary_cow breaks that
# log: the damaged disk's unshipped cuts are dropped by the fall back (never archived),
# and the replica becomes "the primary at the sync's cut" rather than "the pre-image plus a
# log". So in that class the replica is frozen right after the sync ends (applier.before_
# apply=error armed on west before the heal; a sync does not pass that point): the images
# are then exactly the sync's cut, and they become the pre-image; every archived segment of
# a cycle up to the sync's cycle is deleted. The failpoint is disarmed and the final check
# replays the cycles after the sync over that pre-image. (Before the heal, the replica is
# checked against the old pre-image and the archive, and rebased, as common.sh does.) The
# other classes keep the log whole: a resync of corrupt_received_segment and
# corrupt_replica_image archives the segments its snapshot covers, so the usual check
# applies.
#
#   bash tests/faults/corruption.sh BIN_DIR OUT_DIR
# Environment: FAULTS_CORRUPTIONS (iterations per class, default 10), FAULTS_SEED (every
# random choice; default a new one, printed), FAULTS_CORRUPTION_CLASSES (default all four,
# in the order above), FAULTS_CORRUPTION_MUTATE=1 (a check of the checks, not for
# figures: each class expects a wrong detail in its first iteration, whose detected check
# must then fail). Records go to OUT_DIR/corruption.jsonl.
CLASS_SCRIPT=corruption
OUT=$(realpath -m "$2")
FAULTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$FAULTS_DIR/../lib.sh"
source "$FAULTS_DIR/common.sh"

COUNT=${FAULTS_CORRUPTIONS:-10}
SEED=${FAULTS_SEED:-$(new_seed)}
ALL="corrupt_primary_cow corrupt_received_segment corrupt_frame corrupt_replica_image"
CLASSES=${FAULTS_CORRUPTION_CLASSES:-$ALL}
MUTATE=${FAULTS_CORRUPTION_MUTATE:-0}
[[ $COUNT =~ ^[0-9]+$ && $SEED =~ ^[0-9]+$ ]] || fail "FAULTS_CORRUPTIONS and FAULTS_SEED must be whole numbers"
for c in $CLASSES; do
  [[ " $ALL " == *" $c "* ]] || fail "FAULTS_CORRUPTION_CLASSES: no class $c (the classes: $ALL)"
done

# ---------------------------------------------------------------------------------------
# Helpers.

# seg_tool COMMAND ARGS: change-log segment files (tracker/log_format.h), read by hand.
#   cycles FILE...        "FILE CYCLE" per file: the cycle of the cut that ends it (0: none)
#   offset FILE PART REC_PICK BYTE_PICK
#                         a byte offset in the file: in the header (PART header) or the
#                         payload (PART payload; the header for a record without one) of
#                         record int(REC_PICK * records), at BYTE_PICK of its length
#   where FILE OFFSET     which record and field OFFSET falls in ("header.crc of the write
#                         record seq 12 at 4096", "payload of ...")
#   flip FILE OFFSET MASK XORs the byte at OFFSET with MASK, in place, and fsyncs
seg_tool() {
  python3 - "$@" <<'PY'
import os, struct, sys
HEAD = struct.Struct("<IHHIIQQQQ")  # magic version kind disk_id crc epoch seq offset length
FIELDS = [(0, "magic"), (4, "version"), (6, "kind"), (8, "disk_id"), (12, "crc"),
          (16, "epoch"), (24, "seq"), (32, "offset"), (40, "length")]
KINDS = {1: "write", 2: "discard", 3: "cut"}
def records(data):
    at = 0
    while at + 48 <= len(data):
        magic, _, kind, _, _, _, seq, off, length = HEAD.unpack_from(data, at)
        if magic != 0x474C5253 or kind not in KINDS:
            return
        size = 48 + (length if kind == 1 else 0 if kind == 2 else 24)
        yield at, size, kind, seq, off, data[at + 48:at + size]
        at += size
cmd = sys.argv[1]
if cmd == "cycles":
    for path in sys.argv[2:]:
        cycle = 0
        try:
            data = open(path, "rb").read()
        except OSError:
            continue
        for at, size, kind, seq, off, payload in records(data):
            cycle = struct.unpack_from("<Q", payload)[0] if kind == 3 and len(payload) >= 8 else 0
        print(path, cycle)
elif cmd == "offset":
    recs = list(records(open(sys.argv[2], "rb").read()))
    rec_pick, byte_pick = float(sys.argv[4]), float(sys.argv[5])
    at, size, kind, seq, off, payload = recs[min(len(recs) - 1, int(rec_pick * len(recs)))]
    if sys.argv[3] == "payload" and size > 48:
        print(at + 48 + min(size - 49, int(byte_pick * (size - 48))))
    else:
        print(at + min(47, int(byte_pick * 48)))
elif cmd == "where":
    data, pos = open(sys.argv[2], "rb").read(), int(sys.argv[3])
    for at, size, kind, seq, off, payload in records(data):
        if at <= pos < at + size:
            what = f"{KINDS[kind]} record seq {seq}" + (f" at disk offset {off}" if kind != 3 else "")
            if pos < at + 48:
                field = [name for start, name in FIELDS if start <= pos - at][-1]
                print(f"header.{field} of the {what}")
            else:
                print(f"payload byte {pos - at - 48} of the {what}")
            break
    else:
        print("no record")
elif cmd == "flip":
    fd = os.open(sys.argv[2], os.O_RDWR)
    at, mask = int(sys.argv[3]), int(sys.argv[4])
    b = os.pread(fd, 1, at)
    os.pwrite(fd, bytes([b[0] ^ mask]), at)
    os.fsync(fd)
    os.close(fd)
PY
}

# cow_tool: a cut's copy-on-write file (tracker/snapshot.h, persistent layout), by hand.
#   candidates LOG_DIR DISK_SIZE RECEIVED
#                         "COW CYCLE SAVED" per copy-on-write file of a cut of a cycle after
#                         RECEIVED that has saved blocks
#   offset COW DISK_SIZE PART BLOCK_PICK BYTE_PICK
#                         "OFFSET BLOCK": a byte of saved block int(BLOCK_PICK * saved), in
#                         its data (PART payload) or its CRC32C (PART header)
cow_tool() {
  python3 - "$@" <<'PY'
import os, struct, sys
def layout(size):
    blocks = (size + 4095) // 4096
    words = (blocks + 63) // 64
    bits = (size + 4095) // 4096 * 4096
    crcs = (bits + words * 8 + 4095) // 4096 * 4096
    return blocks, words, bits, crcs
def saved(path, size):
    blocks, words, bits, _ = layout(size)
    with open(path, "rb") as f:
        f.seek(bits)
        raw = f.read(words * 8)
    out = []
    for w in range(len(raw) // 8):
        v = struct.unpack_from("<Q", raw, w * 8)[0]
        out += [64 * w + b for b in range(64) if v >> b & 1]
    return [b for b in out if b < blocks]
cmd = sys.argv[1]
if cmd == "candidates":
    log_dir, size, received = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for name in sorted(os.listdir(log_dir)):
        if not name.endswith(".cow"):
            continue
        cut = os.path.join(log_dir, name[:20] + ".cut")
        try:
            with open(cut, "rb") as f:
                cycle = struct.unpack_from("<Q", f.read(16), 8)[0]
            n = len(saved(os.path.join(log_dir, name), size))
        except OSError:
            continue
        if cycle > received and n > 0:
            print(os.path.join(log_dir, name), cycle, n)
elif cmd == "offset":
    path, size, part = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    pick, byte_pick = float(sys.argv[5]), float(sys.argv[6])
    blocks = saved(path, size)
    block = blocks[min(len(blocks) - 1, int(pick * len(blocks)))]
    if part == "payload":
        print(block * 4096 + min(4095, int(byte_pick * 4096)), block)
    else:
        print(layout(size)[3] + 4 * block + min(3, int(byte_pick * 4)), block)
PY
}

east_field() { vm_field "$EAST_CONF" vm1 "$1"; }
west_field() { vm_field "$WEST_CONF" vm1 "$1"; }
west_failpoint() { "$SITEREP" -c "$WEST_CONF" failpoint "$1" >>"$LIBLOG" 2>&1; }
now_ns() { date +%s%N; }
since() { python3 -c "import time; print(round((time.time_ns() - $1) / 1e9, 2))"; }

# wait_until TIMEOUT_S COMMAND...: runs COMMAND every 0.2 s until it succeeds, for at
# most TIMEOUT_S seconds.
wait_until() {
  local end=$((SECONDS + $1))
  shift
  while ((SECONDS < end)); do
    "$@" && return 0
    sleep 0.2
  done
  "$@"
}

# Predicates for wait_until (globals as arguments).
west_applied_all_received() { [[ $(west_field "v['applied_cycle'] == v['received_cycle']") == true ]]; }
west_applied_is() { [[ $(west_field "v['applied_cycle']") == "$1" ]]; }
# west_stopped_on TEXT: west's apply stopped with a reason that contains TEXT.
west_stopped_on() { [[ $(west_field "v['health_reason']") == *"apply stopped: "*"$1"* ]]; }
# west_applying_past CYCLE: west replicates (no apply error, no sync) past CYCLE.
west_applying_past() {
  local s a
  read -r s a <<<"$(west_field "f\"{v['state'].replace(' ', '_')} {v['applied_cycle']}\"")"
  [[ $s == replicating && $a -gt $1 ]]
}
log_count_at_least() { (($(grep -c "$1" "$2" || true) >= $3)); }
# link_past ACKED CONNECTS: east is connected again (more connects) and acked past ACKED.
link_past() {
  local s a c
  read -r s a c <<<"$(east_field "f\"{v['link']['state']} {v.get('acked_cycle', 0)} {v['link']['connects']}\"")"
  [[ $s == connected && $a -gt $1 && $c -gt $2 ]]
}

# Per-iteration checks beyond common.sh's (acked, prefix, sha256): name=pass|fail|skip.
declare -A CK
CK_NAMES=()
ck() {
  [[ -v CK[$1] ]] || CK_NAMES+=("$1")
  CK[$1]=$2
  [[ -n ${3:-} ]] && add_msg "$1: $3"
  return 0
}
ck_reset() {
  CK=()
  CK_NAMES=()
  reset_checks
}
ck_json() {
  local name out="{" sep=""
  for name in "${CK_NAMES[@]}"; do
    out+="$sep\"$name\": \"${CK[$name]}\""
    sep=", "
  done
  for name in acked prefix sha256; do
    local v="CHECK_$name"
    out+="$sep\"$name\": \"${!v}\""
  done
  echo "$out}"
}
ck_verdict() {
  local name
  for name in "${CK_NAMES[@]}"; do [[ ${CK[$name]} == fail ]] && { echo fail; return; }; done
  verdict
}

# PRE_CYCLE: the cycle the pre-image is (set at each rebase; "" before the first).
PRE_CYCLE=""

# prefix_now: siterep-check of the replica as it is now (quiet: nothing being applied)
# against PRE and the archive. Sets PREFIX_RAW (the cycle siterep-check names; 0 is the
# pre-image itself; empty: not consistent), PREFIX_CYCLE (the same, with 0 read as
# PRE_CYCLE), LOG_END, and returns 0 when the replica is consistent at WEST_APPLIED.
prefix_now() {
  local rc=0
  WEST_APPLIED=$(west_field "v['applied_cycle']")
  "$BIN/siterep-check" --work-dir "$T/work" \
    "$T/pre/d0.img" "$T/archive/vm1/d0" "$WEST_STATE/replicas/vm1/d0.img" \
    "$T/pre/d1.img" "$T/archive/vm1/d1" "$WEST_STATE/replicas/vm1/d1.img" \
    >"$T/check.out" 2>&1 || rc=$?
  PREFIX_RAW=$(sed -n 's/^consistent: .* through cycle \([0-9]*\)$/\1/p' "$T/check.out")
  PREFIX_CYCLE=$PREFIX_RAW
  [[ $PREFIX_RAW == 0 && -n $PRE_CYCLE ]] && PREFIX_CYCLE=$PRE_CYCLE
  LOG_END=$(sed -n 's/.*(log ends at cycle \([0-9]*\))$/\1/p' "$T/check.out" | sort -n | head -1)
  [[ $rc -eq 0 && -n $PREFIX_CYCLE && $PREFIX_CYCLE == "$WEST_APPLIED" ]]
}

# rebase_at CYCLE: the replica images (which are the primary's disks as of CYCLE) become
# the pre-image, and every archived segment of a cycle up to CYCLE is deleted.
rebase_at() {
  local d f c
  for d in d0 d1; do
    cp --sparse=always "$WEST_STATE/replicas/vm1/$d.img" "$T/pre/$d.img.new"
    mv "$T/pre/$d.img.new" "$T/pre/$d.img"
  done
  PRE_CYCLE=$1
  while read -r f c; do
    [[ -n $f && $c -le $1 ]] && rm -f "$f"
  done < <(seg_tool cycles "$T"/archive/vm1/d[01]/*.seg 2>/dev/null)
  return 0
}

# The plan: one line per iteration, from FAULTS_SEED alone.
#   CLASS N LOAD_S SLOT ARGS...
#   corrupt_primary_cow      HOLD_S DISK COW_PICK PART:BLOCK_PICK:BYTE_PICK MASK
# (PART: header (the CRC32C) or payload (the data), half each; see cow_tool offset)
#   corrupt_received_segment HOLD_S DISK SEG_PICK PART:REC_PICK:BYTE_PICK MASK
# (PART: header or payload, half each; see seg_tool offset)
#   corrupt_frame            SKIP
#   corrupt_replica_image    FLIPS(d:block:byte:mask,...)
python3 - "$SEED" "$COUNT" $CLASSES >"$T/corruption.plan" <<'PY'
import random, sys
seed, count, classes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rng = random.Random(seed)
for c in classes:
    for n in range(1, count + 1):
        load = rng.uniform(0.5, 1.5)
        slot = rng.randrange(64)
        if c in ("corrupt_primary_cow", "corrupt_received_segment"):
            part = rng.choice(["header", "payload"])
            args = [f"{rng.uniform(2.0, 4.0):.2f}", rng.choice(["d0", "d1"]), f"{rng.random():.4f}",
                    f"{part}:{rng.random():.4f}:{rng.random():.6f}", str(rng.randrange(1, 256))]
        elif c == "corrupt_frame":
            args = [str(rng.randrange(0, 40))]
        else:
            blocks = rng.sample([(d, b) for d in ("d0", "d1") for b in range(64) if b != slot],
                                rng.randint(1, 3))
            args = [",".join(f"{d}:{b}:{rng.randrange(65536)}:{rng.randrange(1, 256)}"
                             for d, b in sorted(blocks))]
        print(c, n, f"{load:.2f}", slot, *args)
PY

for c in $CLASSES; do
  case $c in
    corrupt_primary_cow)
      injected="a byte of a block saved in the copy-on-write file of an unshipped cut in east's log folder flipped (random cut of a random disk, random saved block: its data or its CRC32C, random byte and XOR mask) while the link is cut at the proxy under write load; then the link healed"
      checked='["detected: reading the cycle for shipping finds the block (CRC32C mismatch) and the disk falls back to the bitmap, resync required with reason change log: damaged copy-on-write block B of FILE", "not_shipped: west never received the damaged cycle from the log (no refusal of its segment in west log)", "prefix_before: before the heal siterep-check finds the replica a prefix of the archived log at its applied cycle", "recovered: the automatic resync ended; the disk logs again, not resync required", "acked, prefix (over the pre-image taken at the sync end), sha256"]' ;;
    corrupt_received_segment)
      injected="a byte of a received, committed but not yet applied segment in west's received/ folder flipped (applier held with failpoint applier.before_apply=error under write load); then the applier released"
      checked='["detected: west stops the apply naming that segment (status apply failed)", "not_applied: west applied cycle stays below the damaged cycle and siterep-check finds the replica a prefix at exactly that cycle", "recovered: siterep resync vm1 by the operator ends and west applies past the damaged cycle", "acked, prefix, sha256"]' ;;
    corrupt_frame)
      injected="one byte of one frame flipped after decryption on west (failpoint receiver.corrupt_frame=trigger@K*1, K random 0-39) under write load"
      checked='["detected: a new CRC mismatch in west log", "resent: east reconnected and the replica acknowledged a cycle past the one acknowledged at the fault", "acked, prefix, sha256"]' ;;
    corrupt_replica_image)
      injected="1-3 bytes flipped in west's replica images (random 64 KiB blocks of the 4 MiB marker area of random disks, random byte and XOR mask) under write load"
      checked='["detected: siterep verify vm1 exits 1 and names exactly the damaged 64 KiB blocks", "repaired: siterep resync vm1 --full --wait exits 0", "clean: siterep verify vm1 exits 0 afterwards", "acked, prefix, sha256"]' ;;
  esac
  python3 "$TOOL" record "$RECORDS" kind=class_info class="$c" injected="$injected" checked="$checked"
done

# ---------------------------------------------------------------------------------------
# The classes. Each runs with the load on and its marker written; sets CK, DETAIL (what
# was done, for the record) and WHAT (one line).

# corrupt_primary_cow HOLD_S DISK COW_PICK PART:BLOCK_PICK:BYTE_PICK MASK
corrupt_primary_cow() {
  local hold=$1 disk=$2 cow_pick=$3 mask=$5 part block_pick byte_pick
  IFS=: read -r part block_pick byte_pick <<<"$4"
  local received cand=() f c n file size off block where t_heal line reason sync_id=""
  proxy_mode close >>"$LIBLOG"
  sleep "$hold"
  wait_until 15 west_applied_all_received || add_msg "west did not apply what it received within 15 s"
  received=$(west_field "v['received_cycle']")
  size=$(stat -c %s "$T/$disk.img")
  # The copy-on-write of a cut the replica has not received, with a block saved (with the
  # link closed, pacing keeps the cut before the cut of the link waiting; the load's
  # overwrites of its blocks save them).
  for ((i = 0; i < 50; i++)); do
    cand=()
    while read -r f c n; do
      [[ -n $f ]] && cand+=("$f")
    done < <(cow_tool candidates "$T/$disk.img.srlog" "$size" "$received" 2>/dev/null)
    ((${#cand[@]} > 0)) && break
    sleep 0.2
  done
  if ((${#cand[@]} == 0)); then
    ck detected fail "no unshipped cut of $disk with a saved block after ${hold}s + 10 s"
    proxy_mode pass >>"$LIBLOG"
    return
  fi
  # Before the heal: the replica is a prefix of the archived log; rebase on it.
  if prefix_now; then
    ck prefix_before pass
    [[ $PREFIX_RAW != 0 && $LOG_END == "$PREFIX_RAW" ]] && rebase_at "$PREFIX_RAW"
  elif [[ -n $LOG_END && $LOG_END -lt $WEST_APPLIED ]]; then
    ck prefix_before skip "the archive ends at cycle $LOG_END, before west's applied $WEST_APPLIED (an ack lost at the cut)"
  else
    ck prefix_before fail "$(tr '\n' ' ' <"$T/check.out" | head -c 400)"
  fi
  file=${cand[$(python3 -c "print(int($cow_pick * ${#cand[@]}))")]}
  read -r off block < <(cow_tool offset "$file" "$size" "$part" "$block_pick" "$byte_pick")
  if [[ $part == payload ]]; then where="data byte $((off - block * 4096)) of saved block $block"; else where="CRC32C of saved block $block"; fi
  seg_tool flip "$file" "$off" "$mask"
  DETAIL="{\"disk\": \"$disk\", \"cow\": \"$(basename "$file")\", \"offset\": $off, \"block\": $block, \"mask\": $mask, \"where\": \"$where\", \"replica_received\": $received, \"candidates\": ${#cand[@]}}"
  WHAT="link cut ${hold}s under load; flipped byte $off of $disk copy-on-write $(basename "$file") ($where; ${#cand[@]} unshipped cuts with saved blocks, replica received cycle $received) with mask $mask; link healed"
  local expect
  expect=$(basename "$file")
  ((MUTATE && N == 1)) && expect="0$expect"
  west_failpoint 'applier.before_apply=error'
  proxy_mode pass >>"$LIBLOG"
  t_heal=$(now_ns)
  # Detected: reading the cycle finds the block, and the disk falls back naming it. (The
  # status shows the reason until the resync has ended; then it is cleared.)
  local pattern="falling back to the dirty bitmap: change log: damaged copy-on-write block $block of [^ ]*/$expect"
  if wait_until 30 grep -q "$pattern" "$EAST_LOG"; then
    reason=$(grep -m1 "$pattern" "$EAST_LOG" | cut -c1-300)
    ck detected pass
    DETECTED_S=$(since "$t_heal")
  else
    ck detected fail "no '$pattern' in east's log within 30 s of the heal"
  fi
  DETECTION="${reason:-}"
  # Recovered: the resync ran and ended; the replica is frozen at its cut (failpoint).
  local t_sync=$(now_ns) st end=$((SECONDS + 90))
  while ((SECONDS < end)); do
    st=$(east_field "f\"{v['state'].replace(' ', '_')} {(v.get('last_sync') or {}).get('id', 0)} {int(any(x['resync_required'] for x in v['disks']))} {[x['tracking'] for x in v['disks']]}\"" 2>/dev/null) || st="? 0 1 ?"
    read -r state sync_id resync_left tracking <<<"$st"
    [[ $state == replicating && $sync_id -gt $received && $resync_left == 0 ]] && break
    sleep 0.2
  done
  if [[ $state == replicating && $sync_id -gt $received && $resync_left == 0 ]] &&
    wait_until 30 west_applied_is "$sync_id"; then
    ck recovered pass
    RECOVERY_S=$(since "$t_sync")
    rebase_at "$sync_id"
    SYNC_ID=$sync_id
  else
    ck recovered fail "east: state $state, last sync ${sync_id:-none}, resync still required: $resync_left, tracking $tracking; west applied $(west_field "v['applied_cycle']")"
  fi
  west_failpoint 'applier.before_apply=off'
  # Not shipped: west never saw the damaged cycle's segment as data.
  local number=$((10#$(basename "$file" .cow)))
  if grep -q "segment $number of disk $disk refused" "$WEST_LOG"; then
    ck not_shipped fail "west refused segment $number of $disk: it was shipped"
  else
    ck not_shipped pass
  fi
}

# corrupt_received_segment HOLD_S DISK SEG_PICK PART:REC_PICK:BYTE_PICK MASK
corrupt_received_segment() {
  local hold=$1 disk=$2 seg_pick=$3 mask=$5 part rec_pick byte_pick
  IFS=: read -r part rec_pick byte_pick <<<"$4"
  local dir=$WEST_STATE/replicas/vm1/received/$disk files=() f c file size off where cycle
  local applied_before applied reason t_release st state applied_now
  west_failpoint 'applier.before_apply=error'
  sleep "$hold"
  applied_before=$(west_field "v['applied_cycle']")
  for ((i = 0; i < 50; i++)); do
    mapfile -t files < <(ls "$dir"/*.seg 2>/dev/null | sort)
    ((${#files[@]} > 0)) && break
    sleep 0.2
  done
  if ((${#files[@]} == 0)); then
    ck detected fail "no received segment of $disk waiting after ${hold}s + 10 s"
    west_failpoint 'applier.before_apply=off'
    return
  fi
  file=${files[$(python3 -c "print(int($seg_pick * ${#files[@]}))")]}
  cycle=$(seg_tool cycles "$file" | cut -d' ' -f2)
  size=$(stat -c %s "$file")
  off=$(seg_tool offset "$file" "$part" "$rec_pick" "$byte_pick")
  where=$(seg_tool where "$file" "$off")
  seg_tool flip "$file" "$off" "$mask"
  local number=$((10#$(basename "$file" .seg)))
  DETAIL="{\"disk\": \"$disk\", \"segment\": \"$(basename "$file")\", \"cycle\": $cycle, \"segment_bytes\": $size, \"offset\": $off, \"mask\": $mask, \"where\": \"$where\", \"waiting_segments\": ${#files[@]}, \"applied_before\": $applied_before}"
  WHAT="applier held ${hold}s under load; flipped byte $off of received $disk segment $(basename "$file") of cycle $cycle ($where; ${#files[@]} waiting) with mask $mask; applier released"
  local expect="segment $number:"
  ((MUTATE && N == 1)) && expect="segment $((number + 1000)):"
  west_failpoint 'applier.before_apply=off'
  t_release=$(now_ns)
  # Detected: the apply stops, naming the segment.
  if wait_until 60 west_stopped_on "$expect"; then
    ck detected pass
    DETECTED_S=$(since "$t_release")
  else
    ck detected fail "west did not stop the apply naming '$expect' within 60 s: $(west_field "v['state'] + ': ' + v['health_reason']" | head -c 300)"
  fi
  reason=$(west_field "v['health_reason']" | cut -c1-400)
  DETECTION="west: $(west_field "v['state']"): $reason"
  # Not applied: west stopped right before that cycle, and the replica is a clean prefix.
  applied=$(west_field "v['applied_cycle']")
  if [[ ${CK[detected]} == pass ]]; then
    if ((applied >= cycle)); then
      ck not_applied fail "west applied cycle $applied >= the damaged cycle $cycle"
    elif ! prefix_now; then
      ck not_applied fail "siterep-check at the stop: $(tr '\n' ' ' <"$T/check.out" | head -c 400)"
    elif ((applied != cycle - 1)); then
      ck not_applied fail "west stopped at cycle $applied, not right before the damaged cycle $cycle"
    else
      ck not_applied pass
    fi
  else
    ck not_applied skip
  fi
  # Recovered: the operator resyncs (the segment is gone from the primary).
  local t_sync=$(now_ns) out rc=0
  out=$(timeout 120 "$SITEREP" -c "$EAST_CONF" resync vm1 --wait 2>&1) || rc=$?
  echo "$out" | tail -n 3 >>"$LIBLOG"
  if ((rc == 0)) && wait_until 30 west_applying_past "$cycle"; then
    ck recovered pass
    RECOVERY_S=$(since "$t_sync")
  else
    ck recovered fail "resync exit $rc ($(echo "$out" | tail -n 1 | head -c 200)); west: $(west_field "v['state'] + ' applied ' + str(v['applied_cycle'])")"
  fi
}

# corrupt_frame SKIP
corrupt_frame() {
  local skip=$1 before acked connects t0 n_after
  before=$(grep -c 'CRC mismatch' "$WEST_LOG" || true)
  read -r acked connects <<<"$(east_field "f\"{v.get('acked_cycle', 0)} {v['link']['connects']}\"")"
  DETAIL="{\"skip\": $skip, \"acked_before\": $acked, \"connects_before\": $connects}"
  WHAT="receiver.corrupt_frame=trigger@$skip*1 armed on west under load (acked cycle $acked, $connects connects)"
  local want=$((before + 1))
  ((MUTATE && N == 1)) && want=$((before + 2))
  t0=$(now_ns)
  west_failpoint "receiver.corrupt_frame=trigger@$skip*1"
  if wait_until 30 log_count_at_least 'CRC mismatch' "$WEST_LOG" "$want"; then
    ck detected pass
    DETECTED_S=$(since "$t0")
    DETECTION=$(grep 'CRC mismatch' "$WEST_LOG" | tail -n 1 | cut -c1-300)
  else
    ck detected fail "no new 'CRC mismatch' in west's log within 30 s"
    west_failpoint 'receiver.corrupt_frame=off'
  fi
  if wait_until 30 link_past "$acked" "$connects"; then
    ck resent pass
    RECOVERY_S=$(since "$t0")
  else
    ck resent fail "east: $(east_field "f\"link {v['link']['state']}, acked {v.get('acked_cycle')}, {v['link']['connects']} connects\"")"
  fi
}

# corrupt_replica_image FLIPS
corrupt_replica_image() {
  local flips=$1 spec d b byte mask expected rc out
  local -a parts
  IFS=, read -r -a parts <<<"$flips"
  for spec in "${parts[@]}"; do
    IFS=: read -r d b byte mask <<<"$spec"
    seg_tool flip "$WEST_STATE/replicas/vm1/$d.img" $((MARK_MIB * 1048576 + b * 65536 + byte)) "$mask"
  done
  expected=$(python3 - "$flips" "$MARK_MIB" "$MUTATE" "$N" <<'PY'
import json, sys
flips, mark, mutate, n = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blocks = {"d0": set(), "d1": set()}
for f in flips:
    d, b, _, _ = f.split(":")
    blocks[d].add(mark * 16 + int(b))
if mutate and n == 1:
    blocks["d0"].add(0)
out = {}
for d, bs in blocks.items():
    ranges = []
    for b in sorted(bs):
        if ranges and ranges[-1][0] + ranges[-1][1] == b * 65536:
            ranges[-1][1] += 65536
        else:
            ranges.append([b * 65536, 65536])
    out[d] = ranges
print(json.dumps(out, sort_keys=True))
PY
)
  DETAIL="{\"flips\": \"$flips\", \"expected_ranges\": $expected}"
  WHAT="flipped $((${#parts[@]})) byte(s) of west's replica images ($flips: disk:block of the marker area:byte:mask) under load"
  local t0
  t0=$(now_ns)
  rc=0
  timeout 200 "$SITEREP" -c "$EAST_CONF" verify vm1 --json >"$T/verify.json" 2>"$T/verify.err" || rc=$?
  out=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({x["name"]: [[r["offset"], r["length"]] for r in x["ranges"]] for x in d["disks"]}, sort_keys=True))
' "$T/verify.json" 2>/dev/null || echo "unreadable: $(head -c 200 "$T/verify.json" "$T/verify.err")")
  if ((rc == 1)) && [[ $out == "$expected" ]]; then
    ck detected pass
    DETECTED_S=$(since "$t0")
  else
    ck detected fail "verify exit $rc (want 1), ranges $out (want $expected)"
  fi
  DETECTION="verify exit $rc: $out"
  local t_sync
  t_sync=$(now_ns)
  rc=0
  timeout 120 "$SITEREP" -c "$EAST_CONF" resync vm1 --full --wait >"$T/resync.out" 2>&1 || rc=$?
  if ((rc == 0)); then
    ck repaired pass
    RECOVERY_S=$(since "$t_sync")
  else
    ck repaired fail "resync --full --wait exit $rc: $(tail -n 1 "$T/resync.out" | head -c 200)"
  fi
  rc=0
  timeout 200 "$SITEREP" -c "$EAST_CONF" verify vm1 --json >"$T/verify2.json" 2>"$T/verify.err" || rc=$?
  if ((rc == 0)) && [[ $(jq_py "d['equal']" <"$T/verify2.json") == true ]]; then
    ck clean pass
  else
    ck clean fail "verify after the resync: exit $rc, $(head -c 300 "$T/verify2.json" "$T/verify.err")"
  fi
}

# ---------------------------------------------------------------------------------------
PROXY_PORT=$(free_port)
setup_sites "$PROXY_PORT" >>"$LIBLOG"
ilog "seed $SEED (FAULTS_SEED=$SEED replays the choices); $COUNT iteration(s) of: $CLASSES; east pid $EAST_PID replicates vm1 (2 x $DISK_MIB MiB) to west pid $WEST_PID through a proxy on port $PROXY_PORT; load $RATE/s per disk"

total=$(wc -l <"$T/corruption.plan")
failed_in_row=0
while read -r class N load_s slot a1 a2 a3 a4 a5; do
  t0_ns=$(now_ns)
  ck_reset
  DETAIL="{}" WHAT="" DETECTION="" DETECTED_S="" RECOVERY_S="" SYNC_ID="" note=""
  start_load || note="no numbered write acknowledged within 10 s of starting the load"
  sleep "$load_s"
  write_markers "$slot" || note+="${note:+; }a marker write failed before the fault"
  case $class in
    corrupt_primary_cow | corrupt_received_segment) "$class" "$a1" "$a2" "$a3" "$a4" "$a5" ;;
    *) "$class" "$a1" ;;
  esac
  wait_load TERM
  check_acked
  if converge 120; then
    check_replica
    ((REBASED)) && PRE_CYCLE=$CHECK_CYCLE
  else
    CHECK_prefix=fail CHECK_sha256=fail
    add_msg "$CONV_MSG"
  fi
  result=$(ck_verdict)
  artifacts=""
  if [[ $result == fail ]]; then
    artifacts=$(save_failure "$class-$N")
    failed_in_row=$((failed_in_row + 1))
  else
    failed_in_row=0
  fi
  secs=$(since "$t0_ns")
  checks=$(ck_json)
  summary="$class $N/$COUNT: $WHAT; checks $(tr -d '{}"' <<<"$checks")${DETECTED_S:+; detected in ${DETECTED_S}s}${RECOVERY_S:+; recovered in ${RECOVERY_S}s}${SYNC_ID:+ (sync $SYNC_ID)}; caught up at cycle ${CONV_TARGET:-?}${CHECK_CYCLE:+, checked at cycle $CHECK_CYCLE}"
  [[ -n $note ]] && summary+="; note: $note"
  [[ -n $CHECK_MSG ]] && summary+="; why: $CHECK_MSG"
  ilog "$summary -> ${result^^} (${secs}s)"
  python3 "$TOOL" record "$RECORDS" kind=iteration class="$class" n="$N" \
    seed_choice="{\"load_s\": $load_s, \"marker_slot\": $slot, \"args\": \"$a1 ${a2:-} ${a3:-} ${a4:-} ${a5:-}\"}" \
    action="$WHAT" detail="$DETAIL" detection="$DETECTION" checks="$checks" result="$result" \
    seconds="$secs" detected_seconds="${DETECTED_S:-null}" recovery_seconds="${RECOVERY_S:-null}" \
    sync_id="${SYNC_ID:-null}" acked_writes="$ACKED_WRITES" cycle="${CHECK_CYCLE:-null}" \
    caught_up_cycle="${CONV_TARGET:-null}" rebased="$REBASED" summary="$summary" why="$CHECK_MSG" \
    note="$note" artifacts="$artifacts" mutated="$([[ $MUTATE == 1 && $N == 1 ]] && echo true || echo false)"
  ((MUTATE)) || give_up_after "$failed_in_row" "$class" "$class $N"
done <"$T/corruption.plan"

ilog "done: $total corruption iteration(s)"
stop_clean "$EAST_PID" "$EAST_CONF" >>"$LIBLOG"
stop_clean "$WEST_PID" "$WEST_CONF" >>"$LIBLOG"
