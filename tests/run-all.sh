#!/usr/bin/env bash
# make test's part in the test kernel: the selftests in one boot, the
# smallest real nested case in a second one (bounded: TCG can stall a CPU
# of the test kernel running nested SVM, and then only that boot is lost).
# Prints one closing line over both: "selftests: N passed, N failed, N skipped".
set -uo pipefail
here=$(dirname "$0")
total=(0 0 0) status=0
for mode in --test --nested-smoke; do
	out=$(mktemp /tmp/vmbeam-run.XXXXXX)
	if [ $mode = --nested-smoke ]; then
		# Measured here: TCG's nested SVM stalls a CPU of the test kernel or
		# resets an L1 (a triple fault: README, Known flakiness) in about a
		# third of the boots that run L2s (4 of 11 on 2026-11-30 evening: 3
		# resets, 1 L1 gone silent; the CI run before lost all 3 of its
		# boots, so 5 now: at 1 in 3, all 5 fail once in ~240 runs). Up
		# to VMBEAM_NESTED_BOOTS boots (5); the last one's result is the one
		# counted, all are shown. A boot that passes takes 80-230 s here, one
		# that loses an L1 stops at the loss (nested-test.sh bails out); each
		# gets 420 s before it counts as stalled.
		boots=${VMBEAM_NESTED_BOOTS:-5}
		for boot in $(seq "$boots"); do
			VMBEAM_RUN_TIMEOUT=${VMBEAM_NESTED_TIMEOUT:-420} "$here/run.sh" $mode | tee "$out"
			rc=${PIPESTATUS[0]}
			if [ "$rc" = 0 ] && ! grep -q '# SKIP the test kernel stopped answering' "$out"; then
				break
			fi
			[ "$boot" -lt "$boots" ] &&
				echo "# the real nested case failed or stalled in boot $boot of $boots: one more boot (see README, Tests)"
		done
	else
		"$here/run.sh" $mode | tee "$out"
		rc=${PIPESTATUS[0]}
	fi
	[ "$rc" = 0 ] || status=1
	read -r p f s < <(sed -n 's/^selftests: \([0-9]*\) passed, \([0-9]*\) failed, \([0-9]*\) skipped$/\1 \2 \3/p' "$out" | tail -n1)
	total=($((total[0] + ${p:-0})) $((total[1] + ${f:-1})) $((total[2] + ${s:-0})))
	rm -f "$out"
done
echo "selftests: ${total[0]} passed, ${total[1]} failed, ${total[2]} skipped"
exit $status
