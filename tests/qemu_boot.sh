#!/usr/bin/env bash
# A real guest: qemu-system-x86_64 (TCG, no KVM needed) boots the host's Debian kernel with
# a tiny busybox initramfs and the protected disk as a virtio disk with cache=none
# (-drive file=<mountpoint>/<vm>/<disk>,format=raw,cache=none). The guest checks data the
# host put on the disk, writes its own pattern with O_DIRECT + fsync, and powers off; the
# host then finds the pattern on the disk and in the image, and the change log replays.
# Skips (77) when no kernel image or qemu is installed.
source "$(dirname "$0")/lib.sh"

command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 is not installed"
command -v busybox >/dev/null || skip "busybox is not installed (busybox-static)"
command -v cpio >/dev/null || skip "cpio is not installed"
KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n $KERNEL && -r $KERNEL ]] || skip "no kernel image in /boot (linux-image-amd64)"
KVER=${KERNEL#/boot/vmlinuz-}
MODDIR=/lib/modules/$KVER
[[ -f $MODDIR/modules.dep ]] || skip "no modules for $KVER"
file -L /usr/bin/busybox 2>/dev/null | grep -q 'dynamically' && skip "busybox is not static"

step "build a busybox initramfs with the virtio modules of $KVER"
ROOT=$T/initramfs
mkdir -p "$ROOT"/{bin,dev,proc,sys,modules}
cp /usr/bin/busybox "$ROOT/bin/busybox"
# The modules for virtio-blk over PCI, dependencies first (from modules.dep).
order=()
add_module() {
  local name=$1 line dep path
  line=$(grep -E "(^|/)$name\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -n 1) || return 0
  path=${line%%:*}
  for dep in ${line#*:}; do
    dep=$(basename "$dep")
    add_module "${dep%%.ko*}"
  done
  for m in "${order[@]}"; do [[ $m == "$path" ]] && return 0; done
  order+=("$path")
}
for m in virtio_pci virtio_blk; do add_module "$m"; done
builtin=0
[[ ${#order[@]} -eq 0 ]] && builtin=1
: >"$ROOT/modules/order"
for path in "${order[@]}"; do
  name=$(basename "$path")
  case $name in
    *.ko) cp "$MODDIR/$path" "$ROOT/modules/$name" ;;
    *.ko.xz) xz -dc "$MODDIR/$path" >"$ROOT/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$MODDIR/$path" >"$ROOT/modules/${name%.zst}"; name=${name%.zst} ;;
    *) skip "module format of $path" ;;
  esac
  echo "$name" >>"$ROOT/modules/order"
done
log "modules: $(tr '\n' ' ' <"$ROOT/modules/order") (builtin: $builtin)"
cat >"$ROOT/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/modules/$m" || echo "GUEST: insmod $m failed"; done </modules/order
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  echo "GUEST: vda $(cat /sys/block/vda/size) sectors"
  echo "GUEST: host-md5 $(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum)"
  dd if=/pattern of=/dev/vda bs=1M seek=8 oflag=direct conv=fsync 2>/dev/null && echo "GUEST: wrote pattern"
  echo "GUEST: back-md5 $(dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | md5sum)"
else
  echo "GUEST: no /dev/vda"
fi
echo GUEST-DONE
poweroff -f
INIT
chmod +x "$ROOT/init"
head -c $((4 << 20)) /dev/urandom >"$ROOT/pattern"
(cd "$ROOT" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$T/initrd.gz"

new_site east
# A budget far above what the test writes: the whole log must stay for the replay.
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" vda "$T/vda.img" 64M
cp --sparse=always "$T/vda.img" "$T/vda.pre"
start_ready "$CONF"
DISK=$MNT/vm1/vda

step "host writes 1 MiB at the start of the disk"
head -c $((1 << 20)) /dev/urandom >"$T/host-data"
dd if="$T/host-data" of="$DISK" bs=1M oflag=direct conv=notrunc,fsync status=none
host_md5=$(md5sum <"$T/host-data" | cut -d' ' -f1)

step "boot the guest (TCG) with the disk as virtio, cache=none"
start=$SECONDS
timeout 120 qemu-system-x86_64 -machine q35,accel=tcg -m 256 -smp 1 -nodefaults -nographic \
  -no-reboot -serial stdio -kernel "$KERNEL" -initrd "$T/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1" \
  -drive "file=$DISK,format=raw,cache=none,if=virtio,aio=threads" </dev/null >"$T/console" 2>&1 ||
  { tail -n 30 "$T/console" >&2; fail "qemu failed or timed out"; }
log "guest ran for $((SECONDS - start)) s"
grep '^GUEST' "$T/console" | tr -d '\r' | sed 's/^/    /'
grep -q 'GUEST-DONE' "$T/console" || { tail -n 30 "$T/console" >&2; fail "the guest did not finish"; }
grep -q "GUEST: vda $((64 << 11)) sectors" "$T/console" || fail "the guest sees a disk of the wrong size"
grep -q "GUEST: host-md5 $host_md5" "$T/console" || fail "the guest read different data than the host wrote"
grep -q 'GUEST: wrote pattern' "$T/console" || fail "the guest could not write"
pattern_md5=$(md5sum <"$ROOT/pattern" | cut -d' ' -f1)
grep -q "GUEST: back-md5 $pattern_md5" "$T/console" || fail "the guest read back different data"

step "the host sees the guest's writes on the disk and in the image"
cmp <(dd if="$DISK" bs=1M skip=8 count=4 iflag=direct status=none) "$ROOT/pattern" ||
  fail "the disk does not hold the guest's pattern"
stop_clean "$DAEMON_PID" "$CONF"
cmp <(dd if="$T/vda.img" bs=1M skip=8 count=4 status=none) "$ROOT/pattern" ||
  fail "the image does not hold the guest's pattern"
"$SITEREP_LOG" replay "$T/vda.img.srlog" "$T/vda.pre"
cmp "$T/vda.pre" "$T/vda.img" || fail "pre-image + replay differs from the image"
