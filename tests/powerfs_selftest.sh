#!/usr/bin/env bash
# siterep-powerfs, the power-loss test file system (tests/powerfs/powerfs.cc), tested on its
# own: writes stay in memory until fsync (or msync), a "cut" drops them, and after the cut
# sequence (cut, kill -9, abort the FUSE connection, lazy unmount) a new mount of the same
# backing folder shows exactly what survived.
#   round 1, cut all: a synced file keeps its synced content and loses a later overwrite;
#     an unsynced new file keeps its name and (durable) metadata but none of its data, so
#     it is empty; a file written through a MAP_SHARED mapping and msync'ed survives; one
#     whose mapping was dirty but never msync'ed is lost (the kernel's dirty pages too).
#   round 2, cut random 7: each of 64 pending pages is its old or its new content, and the
#     number of new pages is the "kept" count the tool reported.
#   round 3, cut torn 11: each 512-byte sector is old or new, and exactly the reported torn
#     page is a prefix of new sectors over old ones. Also punch-hole and SEEK_HOLE/SEEK_DATA
#     over pending data, before the cut.
TESTS_DIR=$(cd "$(dirname "$0")" && pwd)
source "$TESTS_DIR/lib.sh"

BACK=$T/backing
PFMNT=$T/mnt
CTL=$T/powerfs.sock
source "$TESTS_DIR/powerfs/lib.sh"

# pages_old_or_new FILE OLD NEW UNIT: every UNIT-byte block of FILE equals OLD's or NEW's;
# prints "NEW_PAGES MIXED_PAGES" (4 KiB pages wholly new; pages with both) or fails.
pages_old_or_new() {
  python3 - "$@" <<'EOF'
import sys
got, old, new = (open(p, "rb").read() for p in sys.argv[1:4])
unit = int(sys.argv[4])
if len(got) != len(old):
    sys.exit(f"size {len(got)}, want {len(old)}")
new_pages = mixed = 0
for page in range(0, len(old), 4096):
    marks = ""
    for off in range(page, page + 4096, unit):
        blk = got[off:off + unit]
        if blk == new[off:off + unit]:
            marks += "n"
        elif blk == old[off:off + unit]:
            marks += "o"
        else:
            sys.exit(f"bytes {off}..{off + unit} are neither old nor new")
    if set(marks) == {"n"}:
        new_pages += 1
    elif "n" in marks:
        # A torn page is written from its start: new sectors, then old ones.
        if marks != "n" * marks.count("n") + "o" * marks.count("o"):
            sys.exit(f"page at {page} is torn out of order: {marks}")
        mixed += 1
print(new_pages, mixed)
EOF
}

step "round 1: mount, write synced, unsynced and mmap'ed data"
mount_powerfs
head -c 65536 /dev/urandom >"$T/X"
head -c 32768 /dev/urandom >"$T/Y"
head -c 4096 /dev/urandom >"$T/Z"
head -c 65536 /dev/urandom >"$T/Cdata"
head -c 16384 /dev/urandom >"$T/Ddata"
cp "$T/X" "$T/XZ"
dd if="$T/Z" of="$T/XZ" bs=4k seek=2 conv=notrunc status=none

dd if="$T/X" of="$PFMNT/A" bs=64k conv=fsync status=none
dd if="$T/Y" of="$PFMNT/B" bs=32k status=none
dd if="$T/Z" of="$PFMNT/A" bs=4k seek=2 conv=notrunc status=none
# C: written through a MAP_SHARED mapping and msync'ed (the size comes from ftruncate).
python3 - "$PFMNT/C" "$T/Cdata" <<'EOF'
import mmap, os, sys
data = open(sys.argv[2], "rb").read()
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, len(data))
m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[:] = data
m.flush()  # msync(MS_SYNC)
m.close()
os.close(fd)
EOF
# D: a process keeps a dirty MAP_SHARED mapping, never msync'ed, until the power goes.
python3 - "$PFMNT/D" "$T/Ddata" "$T/D.ready" <<'EOF' &
import mmap, os, sys, time
data = open(sys.argv[2], "rb").read()
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, len(data))
m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[:] = data
open(sys.argv[3], "w").close()
time.sleep(3600)
EOF
D_PID=$!
_PIDS+=("$D_PID")
for _ in $(seq 1 100); do
  [[ -e $T/D.ready ]] && break
  _alive "$D_PID" || fail "the mmap writer of D died"
  sleep 0.1
done
[[ -e $T/D.ready ]] || fail "the mmap writer of D did not start"

cmp "$PFMNT/A" "$T/XZ" || fail "A does not read back as X with Z over it"
cmp "$PFMNT/B" "$T/Y" || fail "B does not read back as Y"
cmp "$PFMNT/C" "$T/Cdata" || fail "C does not read back as the mmap'ed data"
cmp "$BACK/A" "$T/X" || fail "the unsynced Z already reached the backing file of A"
[[ $(stat -c %s "$BACK/B") -eq 0 ]] || fail "the unsynced B already reached its backing file"
cmp "$BACK/C" "$T/Cdata" || fail "msync did not write C to its backing file"
stats=$(ctl stats)
log "stats: $stats"
[[ $(field "$stats" files) -ge 2 ]] || fail "stats shows fewer than 2 files with pending data: $stats"
[[ $(field "$stats" bytes) -ge $((32768 + 4096)) ]] || fail "stats shows too few pending bytes: $stats"
[[ $(ctl bogus) == error* ]] || fail "an unknown command was not answered with an error"

step "round 1: cut all"
power_cut all -- "$D_PID"
[[ $(field "$CUT_REPLY" kept) -eq 0 ]] || fail "cut all kept pages: $CUT_REPLY"
[[ $(field "$CUT_REPLY" dropped) -ge 9 ]] || fail "cut all dropped fewer than B's 8 and A's 1 pages"
mount_powerfs
cmp "$PFMNT/A" "$T/X" || fail "A is not X after the power loss (the unsynced Z survived?)"
[[ -e $PFMNT/B ]] || fail "B's creation (metadata, durable) was lost"
[[ $(stat -c %s "$PFMNT/B") -eq 0 ]] || fail "B is not empty after the power loss"
cmp "$PFMNT/C" "$T/Cdata" || fail "C lost msync'ed data"
cmp "$PFMNT/D" <(head -c 16384 /dev/zero) || fail "D is not 16 KiB of zeros: dirty mmap pages survived"
[[ $(ctl stats) == "ok files=0 pages=0 bytes=0 cut=0" ]] || fail "a new mount has pending data"

step "round 2: 64 pending pages, cut random 7"
head -c 262144 /dev/urandom >"$T/old"
head -c 262144 /dev/urandom >"$T/new"
dd if="$T/old" of="$PFMNT/R" bs=256k conv=fsync status=none
dd if="$T/new" of="$PFMNT/R" bs=64k conv=notrunc status=none
cmp "$PFMNT/R" "$T/new" || fail "R does not read back its new content"
stats=$(ctl stats)
[[ $(field "$stats" pages) -eq 64 ]] || fail "want 64 pending pages: $stats"
power_cut random 7 --
kept=$(field "$CUT_REPLY" kept)
[[ $kept -gt 0 && $kept -lt 64 && $(field "$CUT_REPLY" dropped) -eq $((64 - kept)) ]] ||
  fail "cut random over 64 pages: $CUT_REPLY"
mount_powerfs
read -r new_pages mixed < <(pages_old_or_new "$PFMNT/R" "$T/old" "$T/new" 4096) ||
  fail "R after cut random"
log "R: $new_pages new pages, $mixed mixed"
[[ $new_pages -eq $kept && $mixed -eq 0 ]] || fail "R has $new_pages new pages, the tool kept $kept"

step "round 3: punch and SEEK_HOLE over pending data"
python3 - "$PFMNT/P" "$BACK/P" <<'EOF' || fail "punch/lseek over pending data"
import os, subprocess, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(fd, b"a" * 12288, 0)
subprocess.run(["fallocate", "-p", "-o", "4096", "-l", "4096", path], check=True)
want = b"a" * 4096 + bytes(4096) + b"a" * 4096
assert os.fstat(fd).st_size == 12288, os.fstat(fd).st_size
assert os.pread(fd, 12288, 0) == want, "punched range does not read as zeros"
assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096, os.lseek(fd, 0, os.SEEK_HOLE)
assert os.lseek(fd, 4096, os.SEEK_DATA) == 8192, os.lseek(fd, 4096, os.SEEK_DATA)
os.fsync(fd)
assert open(sys.argv[2], "rb").read() == want, "fsync did not write P to its backing file"
os.close(fd)
EOF

step "round 3: 64 pending pages, cut torn 11"
head -c 262144 /dev/urandom >"$T/old"
head -c 262144 /dev/urandom >"$T/new"
dd if="$T/old" of="$PFMNT/S" bs=256k conv=fsync status=none
dd if="$T/new" of="$PFMNT/S" bs=64k conv=notrunc status=none
power_cut torn 11 --
kept=$(field "$CUT_REPLY" kept)
torn=$(field "$CUT_REPLY" torn)
[[ $kept -gt 0 && $torn -eq 1 ]] || fail "cut torn over 64 pages: $CUT_REPLY"
mount_powerfs
read -r new_pages mixed < <(pages_old_or_new "$PFMNT/S" "$T/old" "$T/new" 512) ||
  fail "S after cut torn"
log "S: $new_pages new pages, $mixed torn"
[[ $new_pages -eq $((kept - torn)) && $mixed -eq $torn ]] ||
  fail "S has $new_pages new and $mixed torn pages; the tool kept $kept, torn $torn"

step "exit over the control socket unmounts"
[[ $(ctl exit) == "ok exit" ]] || fail "exit was not acknowledged"
for _ in $(seq 1 100); do
  _alive "$PF_PID" || break
  sleep 0.1
done
rc=0
wait "$PF_PID" || rc=$?
_forget_pid "$PF_PID"
[[ $rc -eq 0 ]] || fail "siterep-powerfs exited with $rc on exit"
! is_mounted "$PFMNT" || fail "$PFMNT is still mounted after exit"
