#!/usr/bin/env bash
# The demo, inside the test kernel (tests/guest.sh --demo runs it):
#   demo.sh BINDIR
# Starts an aged lab L1 with four L2 VMs and an empty clean one, moves every
# L2 with `vmbeamctl migrate-all` (which checks each L2's data on the clean
# side and that the aged side can no longer read any of it), shows the
# regions, then stops both L1s and checks that vmbeam.ko holds nothing.
set -u
bin=$1
l2s=${VMBEAM_DEMO_L2S:-4} size=${VMBEAM_DEMO_L2_SIZE:-32M}
dir=$(mktemp -d /tmp/vmbeam-demo.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

wait_socket() { # path
	for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
	echo "demo: $1 did not appear (see $dir/*.log)"; cat "$dir"/*.log; return 1
}

step "two lab L1 hypervisors: 'aged' with $l2s L2 VMs of $size, 'clean' empty"
RUST_LOG=warn "$bin/vmbeam-lab" --socket "$dir/aged.sock" --name aged --l2 "$l2s" --l2-size "$size" 2>"$dir/aged.log" &
pids+=($!)
RUST_LOG=warn "$bin/vmbeam-lab" --socket "$dir/clean.sock" --name clean 2>"$dir/clean.log" &
pids+=($!)
wait_socket "$dir/aged.sock" && wait_socket "$dir/clean.sock" || exit 1
sleep 1 # let the workloads run a pass or two
"$bin/vmbeamctl" status --l1 "$dir/aged.sock" --l1 "$dir/clean.sock"

step "vmbeamctl migrate-all --dry-run"
"$bin/vmbeamctl" migrate-all --from "$dir/aged.sock" --to "$dir/clean.sock" --dry-run || exit 1

step "vmbeamctl migrate-all --trace (eBPF: downtime and faults as the kernel saw them)"
"$bin/vmbeamctl" migrate-all --from "$dir/aged.sock" --to "$dir/clean.sock" --trace
rc=$?

step "vmbeamctl regions"
"$bin/vmbeamctl" regions --l1 "$dir/aged.sock" --l1 "$dir/clean.sock"

step "stopping both L1s: every region must be freed"
kill -TERM "${pids[@]}"
wait "${pids[@]}" 2>/dev/null
pids=()
"$bin/vmbeamctl" status
regions=$("$bin/vmbeamctl" status --json | sed -n 's/.*"regions":\([0-9]*\).*/\1/p')
if [ "$regions" != 0 ]; then
	echo "demo: $regions regions still allocated after both L1s exited"
	rc=1
fi
for s in aged clean; do
	grep -E 'ERROR|WARN' "$dir/$s.log" | sed "s/^/$s: /"
done
echo
if [ "$rc" = 0 ]; then echo "demo: OK"; else echo "demo: FAILED"; fi
exit "$rc"
