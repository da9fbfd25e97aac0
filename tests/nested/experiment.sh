#!/usr/bin/env bash
# The nested recipe, end to end (a manual tool, not part of make test):
# boots the test kernel (L0) under TCG with vng; there tests/nested/l0.py
# starts an L1 (the same bzImage + the L1 image of scripts/l1-image.sh with
# tests/nested/l1-run.sh as its /l1/run.sh) with two ivshmem windows
# cold-plugged over QMP; in the L1 the L2 workload (guests/l2) runs with its
# RAM in window 0, is saved with QEMU migration (x-ignore-shared) and
# restored into a new QEMU, while L0 checks the window contents.
#
#   tests/nested/experiment.sh [L1_MEM]      (default 128M, the smallest that works)
# Output: the run's log, also kept in target/nested/experiment.log.
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"

l1mem=${1:-128M}
kdir=$("$VMBEAM_ROOT/scripts/kernel.sh")
stage=$VMBEAM_ROOT/target/nested/l1
mkdir -p "$stage"
clang -O2 -static -Wall -o "$stage/l1tool.tmp" "$VMBEAM_ROOT/tests/nested/l1tool.c"
# Same bytes, same mtime-independent cache key: only replace when changed.
cmp -s "$stage/l1tool.tmp" "$stage/l1tool" 2>/dev/null && rm "$stage/l1tool.tmp" || mv "$stage/l1tool.tmp" "$stage/l1tool"
cp "$VMBEAM_ROOT/tests/nested/l1-run.sh" "$stage/run.sh"
img=$(VMBEAM_L1_RUN=$stage "$VMBEAM_ROOT/scripts/l1-image.sh")
log "L1 image: $img"

out=$VMBEAM_ROOT/target/nested/experiment.log
start=$(date +%s.%N)
log "host wall clock at vng start: $start"
set +e
vng --run "$kdir/arch/x86/boot/bzImage" --disable-kvm --force-9p \
	--cpus 2 --memory 4G --qemu-opts="-cpu max" \
	--append "PATH=$VMBEAM_ROOT/tests/vng-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
	--cwd "$VMBEAM_ROOT" \
	--exec "/usr/bin/python3 $VMBEAM_ROOT/tests/nested/l0.py $kdir/arch/x86/boot/bzImage $img /tmp/vmbeam-nested $l1mem" \
	2>&1 </dev/null | cat | tee "$out"
set -e
log "host wall: $(echo "$(date +%s.%N) - $start" | bc) s"
grep -q '^VMBEAM_NESTED_EXIT=0' "$out"
