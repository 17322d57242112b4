#!/usr/bin/env bash
# qemu's own block layer on a protected disk: qemu-io with format=raw and -n (cache=none,
# O_DIRECT), writes with patterns, reads them back checked, flush, discard (write -z -u).
source "$(dirname "$0")/lib.sh"

command -v qemu-io >/dev/null || skip "qemu-io is not installed (qemu-utils)"

new_site east
add_vm "$CONF" vm1 'frequency = "continuous"'
add_disk "$CONF" d0 "$T/d0.img" 64M
start_ready "$CONF"
DISK=$MNT/vm1/d0

# qio ARGS...: runs qemu-io on the disk; fails on a non-zero exit or a "Pattern verification
# failed" / error line (qemu-io's exit code does not always say).
qio() {
  local out
  out=$(qemu-io -f raw -n "$@" "$DISK" 2>&1) || fail "qemu-io $*: $out"
  if grep -qiE 'fail|error|denied|invalid' <<<"$out"; then
    fail "qemu-io $*: $out"
  fi
  echo "$out" | grep -E '^(wrote|read)' | sed 's/^/    /'
}

step "write, read back with the pattern, flush"
qio -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' -c flush
qio -c 'write -P 0x11 4096 4096' -c 'read -P 0xab 0 4096' -c 'read -P 0x11 4096 4096' \
  -c 'read -P 0xab 8192 1040384'

step "unaligned offsets in the middle and at the end of the disk"
qio -c 'write -P 0x5c 12345k 3m' -c 'read -P 0x5c 12345k 3m'
qio -c 'write -P 0x77 63m 1m' -c 'read -P 0x77 63m 1m' -c flush

step "a write past the end is refused"
out=$(qemu-io -f raw -n -c 'write -P 0x99 64m 4k' "$DISK" 2>&1) || true
grep -qiE 'error|failed|out of range|No space|Input/output' <<<"$out" ||
  fail "a write past the end of the disk was not refused: $out"
[[ $(stat -c %s "$T/d0.img") -eq $((64 << 20)) ]] || fail "the image changed size"

step "discard (write -z -u) reads back as zeros"
qio -c 'write -P 0x33 2m 1m' -c 'write -z -u 2m 1m' -c 'read -P 0 2m 1m' -c flush

step "the image holds what qemu wrote"
cmp <(dd if="$T/d0.img" bs=1M count=1 status=none) <(head -c 4096 /dev/zero | tr '\0' '\253'; head -c 4096 /dev/zero | tr '\0' '\021'; head -c $(((1 << 20) - 8192)) /dev/zero | tr '\0' '\253') ||
  fail "image content differs from what qemu-io wrote"
stop_clean "$DAEMON_PID" "$CONF"
"$SITEREP_LOG" check "$T/d0.img.srlog" >/dev/null || fail "log check failed"
