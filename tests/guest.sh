#!/usr/bin/env bash
# Runs inside the test kernel (started by tests/run.sh):
#   guest.sh --test|--demo VMBEAM_KO BINDIR
# Loads vmbeam.ko, runs every selftest in the kselftest runner's TAP format,
# then fails the run on any kernel error report in dmesg. Prints
# "selftests: N passed, N failed, N skipped" and VMBEAM_GUEST_EXIT=<status>.
set -u
mode=$1 ko=$2 bin=$3
VMBEAM_TESTS=$(dirname "$0")

# VMBEAM_SELFTESTS="a b" runs only those (a quick loop while working on one).
read -r -a SELFTESTS <<<"${VMBEAM_SELFTESTS:-device_test access_test vmbeamctl_test kvm_guest_test transfer_test move_rule_test fuzz_test alloc_fail_test window_test process_owner_test huge_test huge_1g_test eager_grant_test migrate_test probe_test module_test}"
# What the harness treats as a kernel bug, whatever the tests said. Lockdep
# reports by their headers (the boot banner "RCU lockdep checking is
# enabled" is not one); "lockdep is turned off" means one was printed.
DMESG_ERRORS='BUG:|WARNING:|Oops|KASAN|UBSAN|kernel BUG|general protection|Call Trace:|unreferenced object'
DMESG_ERRORS+='|possible (circular|recursive) locking|inconsistent lock state|suspicious RCU usage|lockdep is turned off'

passed=0 failed=0 skipped=0 n=0
top_fail=0

report() { # status name
	n=$((n + 1))
	echo "$1 $n selftests: vmbeam: $2"
}

# One line per test case; one TAP line per selftest binary.
run_selftest() { # name [args...]
	local name=$1
	shift
	run_selftest_cmd "$name" "$bin/$name" "$@"
}

# make test's selftests each get $watch seconds (VMBEAM_SELFTEST_TIMEOUT,
# 240; the longest takes ~35 s here; 0 for the long modes): one that runs
# over has its threads' kernel stacks printed and is killed, so a hang
# shows where it was instead of the boot ending without a word (a
# move_rule_test hung once so, 2026-12-02; a stalled test kernel still
# prints nothing).
watch=0
watch_selftest() { # seconds command
	local p t i
	for ((i = 0; i < $1; i++)); do sleep 1; done # short sleeps: none outlives a kill
	for p in $(pgrep -f -- "$2( |$)"); do
		echo "# watchdog: $2 (pid $p) ran over $1 s; its threads in the kernel:"
		for t in /proc/"$p"/task/*; do
			echo "#   thread ${t##*/} $(cat "$t/comm" 2>/dev/null) state $(awk '{print $3}' "$t/stat" 2>/dev/null) wchan $(cat "$t/wchan" 2>/dev/null)"
			sed 's/^/#     /' "$t/stack" 2>/dev/null
		done
		kill_tree "$p" # its children too (VMMs, lab L1s): they hold the output open
	done
}
kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -9 "$1" 2>/dev/null; }

run_selftest_cmd() { # name command [args...]
	local name=$1 out rc log dog=
	shift
	echo "# selftests: vmbeam: $name"
	[ "$watch" -gt 0 ] && { watch_selftest "$watch" "$1" & dog=$!; }
	# Printed as it comes: a run that stalls (TCG) shows how far it got.
	log=$(mktemp)
	VMBEAM_KO=$ko "$@" 2>&1 | tee "$log" | sed -u 's/^/# /'
	rc=${PIPESTATUS[0]}
	[ -n "$dog" ] && { kill "$dog" 2>/dev/null; wait "$dog" 2>/dev/null; }
	out=$(cat "$log")
	rm -f "$log"
	passed=$((passed + $(grep -cE '^ok [0-9]+ [^#]*$' <<<"$out")))
	failed=$((failed + $(grep -cE '^not ok ' <<<"$out")))
	skipped=$((skipped + $(grep -cE '^ok [0-9]+ .*# SKIP' <<<"$out")))
	case $rc in
	0) report ok "$name" ;;
	4) report ok "$name # SKIP $(grep -m1 -o 'SKIP.*' <<<"$out")"; skipped=$((skipped + 1)) ;;
	*) report "not ok" "$name (exit $rc)"; top_fail=1
	   grep -qE '^not ok ' <<<"$out" || failed=$((failed + 1)) ;;
	esac
}

finish() {
	local errors
	if [ -w /sys/kernel/debug/kmemleak ]; then
		echo scan >/sys/kernel/debug/kmemleak
		cat /sys/kernel/debug/kmemleak >>/dev/kmsg 2>/dev/null
	fi
	errors=$(dmesg | grep -E "$DMESG_ERRORS")
	if [ -n "$errors" ]; then
		echo "# kernel reported errors in dmesg:"
		sed 's/^/# dmesg error: /' <<<"$errors" | head -n 20
		dmesg | sed 's/^/# dmesg: /' | tail -n 80
		report "not ok" "dmesg_clean"
		failed=$((failed + 1)) top_fail=1
	else
		report ok "dmesg_clean"
		passed=$((passed + 1))
	fi
	echo "selftests: $passed passed, $failed failed, $skipped skipped"
	echo "VMBEAM_GUEST_EXIT=$top_fail"
	exit "$top_fail"
}

echo "TAP version 13"
echo "# kernel $(uname -r), $(nproc) CPUs, kvm: $(ls /sys/module | grep -E '^kvm_(amd|intel)$' | tr '\n' ' ')"

# The 1 GiB pool, taken at load while memory is least fragmented: two GiBs
# for huge_1g_test (its gather breaks one up) and for the bench's 1 GiB
# rows at 2 GiB.
case $mode in --test | --bench) pool=2 ;; *) pool=0 ;; esac
if insmod "$ko" gigantic_pool=$pool 2>/tmp/insmod.err; then
	echo "# $(dmesg | grep -o 'vmbeam: loaded.*' | tail -1)"
	report ok "insmod_vmbeam"; passed=$((passed + 1))
else
	echo "# insmod $ko: $(cat /tmp/insmod.err)"
	report "not ok" "insmod_vmbeam"; failed=$((failed + 1)) top_fail=1
	finish
fi

case $mode in
--test)
	watch=${VMBEAM_SELFTEST_TIMEOUT:-240}
	for t in "${SELFTESTS[@]}"; do
		run_selftest "$t"
	done
	;;
--stress) # the transfer and migration selftests again and again, one boot
	runs=${VMBEAM_STRESS_RUNS:-50}
	start=$(date +%s)
	for ((run = 1; run <= runs; run++)); do
		for t in transfer_test move_rule_test migrate_test; do
			run_selftest_cmd "$t run $run/$runs" "$bin/$t"
		done
	done
	echo "# stress: $runs runs in $(($(date +%s) - start)) s"
	;;
--bench) # make bench: results into the shared results/ directory
	run_selftest_cmd bench "$bin/bench" "$(dirname "$VMBEAM_TESTS")/results"
	;;
--fuzz) # the long fuzz run (make fuzz)
	run_selftest_cmd fuzz_test "$bin/fuzz_test" --ioctls "${VMBEAM_FUZZ_IOCTLS:-1000000}"
	;;
--nested) # two L2s on windows and one on ordinary L1 memory (gathered)
	run_selftest_cmd nested_test "$VMBEAM_TESTS/nested-test.sh" "$bin" "${VMBEAM_NESTED_L2S:-2}" "${VMBEAM_NESTED_GATHER:-1}"
	;;
--nested-smoke) # the smallest real nested case: one L2 between two real L1s
	# The aged L1's window in 2 MiB blocks, the clean one's in 4 KiB pages:
	# both kinds, and a move across them, in the one case make test runs.
	# (Not huge L1 RAM: under TCG such L1s hang in VMRUN too often.)
	export VMBEAM_NESTED_HUGE=${VMBEAM_NESTED_HUGE:-1}
	run_selftest_cmd nested_test "$VMBEAM_TESTS/nested-test.sh" "$bin" 1
	;;
--demo)
	"$VMBEAM_TESTS/nested-demo.sh" "$bin" || top_fail=1
	;;
--demo-lab)
	"$VMBEAM_TESTS/demo.sh" "$bin" || top_fail=1
	;;
esac

if rmmod vmbeam 2>/tmp/rmmod.err; then
	report ok "rmmod_vmbeam"; passed=$((passed + 1))
else
	echo "# rmmod: $(cat /tmp/rmmod.err)"
	report "not ok" "rmmod_vmbeam"; failed=$((failed + 1)) top_fail=1
fi
finish
