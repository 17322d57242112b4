#!/usr/bin/env bash
# A protected disk as a real block device: losetup on <mountpoint>/<vm>/<disk>, mkfs.ext4,
# mount, write files (with checksums), unmount, mount again and find them intact; then the
# same across a daemon restart, and e2fsck finds a clean file system. Two disks of the VM in
# use at once. Finally the logs replay onto the (empty) pre-images to give the images.
source "$(dirname "$0")/lib.sh"

command -v mkfs.ext4 >/dev/null || skip "e2fsprogs is not installed"

new_site east
# A budget far above what the test writes, so the logs can be replayed at the end.
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" root "$T/root.img" 256M
add_disk "$CONF" data "$T/data.img" 128M
cp --sparse=always "$T/root.img" "$T/root.pre"
cp --sparse=always "$T/data.img" "$T/data.pre"
start_ready "$CONF"
DISK=$MNT/vm1/root
FS=$T/fs

step "loop device + mkfs.ext4 on $DISK"
attach_loop "$DISK"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP"
mount_dev "$LOOP" "$FS"

step "write files"
mkdir -p "$FS/dir/sub"
head -c $((20 << 20)) /dev/urandom >"$FS/big.bin"
for i in $(seq 1 200); do
  head -c $((RANDOM * 4 + i)) /dev/urandom >"$FS/dir/sub/f$i"
done
head -c $((5 << 20)) /dev/urandom >"$FS/dir/blob"
(cd "$FS" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
log "$(wc -l <"$T/sums") files, $(du -sh "$FS" | cut -f1)"
sync -f "$FS/big.bin"

step "unmount, mount again, files intact"
umount "$FS"
mount "$LOOP" "$FS"
(cd "$FS" && sha256sum --quiet -c "$T/sums") || fail "files changed after unmount/mount"
# A second generation of writes over the first (overwrite, delete, rename).
for i in $(seq 1 50); do rm "$FS/dir/sub/f$i"; done
mv "$FS/dir/sub/f99" "$FS/renamed"
dd if=/dev/urandom of="$FS/big.bin" bs=64k count=64 seek=10 conv=notrunc status=none
(cd "$FS" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/sums"
umount "$FS"
detach_loop "$LOOP"

step "fsck of the unmounted file system"
e2fsck -fn "$DISK" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out" >&2; fail "e2fsck found errors"; }

step "restart the daemon, files intact"
stop_clean "$DAEMON_PID" "$CONF"
start_ready "$CONF"
attach_loop "$DISK"
mount_dev "$LOOP" "$FS"
(cd "$FS" && sha256sum --quiet -c "$T/sums") || fail "files changed across a daemon restart"
umount "$FS"
detach_loop "$LOOP"

step "a second disk of the VM, used at the same time as the first"
attach_loop "$MNT/vm1/data"
DATA_LOOP=$LOOP
mkfs.ext4 -q -F "$DATA_LOOP"
mount_dev "$DATA_LOOP" "$T/fs2"
attach_loop "$DISK"
mount_dev "$LOOP" "$FS"
cp "$FS/big.bin" "$T/fs2/big.bin" &
cp -a "$FS/dir" "$T/fs2/dir"
wait $!
sync
cmp "$FS/big.bin" "$T/fs2/big.bin" || fail "copy between the two disks differs"
umount "$T/fs2"
umount "$FS"
detach_loop "$DATA_LOOP"
detach_loop "$LOOP"
stop_clean "$DAEMON_PID" "$CONF"

step "the images hold clean file systems, and pre-image + replay equals each image"
e2fsck -fn "$T/root.img" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out" >&2; fail "e2fsck of root.img failed"; }
e2fsck -fn "$T/data.img" >"$T/fsck.out" 2>&1 || { cat "$T/fsck.out" >&2; fail "e2fsck of data.img failed"; }
for d in root data; do
  "$SITEREP_LOG" check "$T/$d.img.srlog" >/dev/null || fail "$d: log check failed"
  "$SITEREP_LOG" replay "$T/$d.img.srlog" "$T/$d.pre"
  cmp "$T/$d.pre" "$T/$d.img" || fail "$d: pre-image + replay differs from the image"
done
