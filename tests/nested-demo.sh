#!/usr/bin/env bash
# The demo (make demo), inside the test kernel (tests/guest.sh --demo runs
# it): a real rejuvenation. L0 here is the test kernel with vmbeam.ko; it
# boots an aged L1 (QEMU -enable-kvm: the test kernel again, with QEMU and
# vmbeam-agent inside) whose RAM and window are vmbeam regions, starts two
# L2 QEMUs in it (the checksum workload): vm0 on the window, vm1 on
# ordinary L1 memory as any QEMU would (THP-backed), then runs `vmbeamctl
# rejuvenate`: a clean L1 boots with empty windows, every L2 is saved (CPU +
# devices only), its pages move at L0 (VMBEAM_GATHER_INTO, no byte copied:
# vm0's window whole, vm1's pages gathered out of the aged L1's RAM) and it
# is restored in the clean L1; the aged L1 is shut down.
#   nested-demo.sh BINDIR
# Needs VMBEAM_L1_KERNEL and VMBEAM_L1_INITRD (tests/run.sh sets them).
set -u
bin=$1
l2s=${VMBEAM_DEMO_L2S:-2} size=${VMBEAM_DEMO_L2_SIZE:-16M}
dir=$(mktemp -d /tmp/vmbeam-nested.XXXXXX)
ctl=$bin/vmbeamctl
started=$SECONDS

step() { printf '\n== [%3d s] %s\n' $((SECONDS - started)) "$*"; }
cleanup() {
	for q in "$dir"/*.qmp; do
		[ -S "$q" ] && pkill -9 -f "$q" 2>/dev/null
	done
	sleep 0.5
}
trap cleanup EXIT
fail() {
	echo "demo: $*"
	python3 "$(dirname "$0")/nested/l1-cpus.py" $(ls "$dir"/*.qmp 2>/dev/null)
	for f in "$dir"/*.console "$dir"/*.log; do
		[ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
	done
	exit 1
}

step "boot the aged L1: QEMU + KVM at L0, its RAM a vmbeam region, one window of $size"
"$ctl" l1 start --name aged --dir "$dir" --windows "$size" || fail "the aged L1 did not boot"

step "start $l2s L2 VMs in it (QEMU inside the L1): vm0 on the window, the rest on ordinary L1 memory"
"$ctl" l1 start-l2 --qmp "$dir/aged.qmp" --name vm0 --window 0 >/dev/null || fail "L2 vm0 did not start"
for i in $(seq 1 $((l2s - 1))); do
	"$ctl" l1 start-l2 --qmp "$dir/aged.qmp" --name "vm$i" --memory "$size" --thp >/dev/null ||
		fail "L2 vm$i did not start"
done
sleep 2
"$ctl" l1 status --qmp "$dir/aged.qmp" || fail "status"

# VMBEAM_DEMO_HOLES=1: the gathered frames stay empty in the aged L1
# (no memory added at L0), which is then destroyed instead of shut down.
holes=; [ "${VMBEAM_DEMO_HOLES:-0}" = 1 ] && holes=--gather-holes
# VMBEAM_DEMO_TRACE=1: with the eBPF probes on both L1 QEMUs at L0.
trace=; [ "${VMBEAM_DEMO_TRACE:-0}" = 1 ] && trace=--trace
step "vmbeamctl rejuvenate --aged $dir/aged.qmp $holes $trace"
"$ctl" rejuvenate --aged "$dir/aged.qmp" --dir "$dir" $holes $trace || fail "rejuvenate failed"

step "the L2s run on in the clean L1"
"$ctl" l1 status --qmp "$dir/aged-clean.qmp" || fail "the clean L1 does not answer"
if pgrep -f "$dir/aged.qmp" >/dev/null; then fail "the aged L1's QEMU still runs"; fi
echo "aged L1: shut down"

step "stop the clean L1; vmbeam.ko must hold nothing"
pkill -9 -f "$dir/aged-clean.qmp"
sleep 1
"$ctl" status
regions=$("$ctl" status --json | sed -n 's/.*"regions": *\([0-9]*\).*/\1/p')
[ "$regions" = 0 ] || fail "$regions regions left after both L1s exited"
echo "demo wall time: $((SECONDS - started)) s"
echo OK
