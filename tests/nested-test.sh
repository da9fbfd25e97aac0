#!/usr/bin/env bash
# Real nested selftest (TAP 13), inside the test kernel: real L1s (QEMU at
# L0 with -enable-kvm, Linux + KVM + QEMU + vmbeam-agent inside), real L2
# QEMUs in them on vmbeam windows.
#   nested-test.sh BINDIR L2S
# With L2S=1 it is the smallest case `make test` runs; `make test-nested`
# runs it with 2 and a failure injected after the transfer.
# Needs VMBEAM_L1_KERNEL and VMBEAM_L1_INITRD (tests/run.sh sets them).
set -u
bin=$1 l2s=${2:-1} size=16M
ctl=$bin/vmbeamctl
dir=$(mktemp -d /tmp/vmbeam-nested-test.XXXXXX)
n=0 failed=0
cleanup() { pkill -9 -f "$dir/" 2>/dev/null; sleep 0.5; }
trap cleanup EXIT

ok() { n=$((n + 1)); echo "ok $n $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n $1"; shift; printf '# %s\n' "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
status_json() { "$ctl" l1 status --qmp "$dir/$1.qmp" --json; }
# pass of L2 $2 on L1 $1, or -1
pass_of() { status_json "$1" | json "next((v['workload'] or {}).get('pass',-1) for v in d['vms'] if v['name']=='$2' and v['state']=='running')" 2>/dev/null || echo -1; }
pages_at_l0() { "$ctl" l1 status --qmp "$dir/$1.qmp" | sed -n "s/.*window $2 .* \([0-9]*\) pages at L0.*/\1/p"; }

# The vmbeam:fault tracepoint shows any page a VMM touched that is not
# there (printed when a test fails).
# (VMBEAM_TRACE_FAULTS=1: enabling a tracepoint patches kernel text, which
# under TCG is best done before any L1 runs.)
tracefs=/sys/kernel/tracing
if [ "${VMBEAM_TRACE_FAULTS:-0}" = 1 ]; then
	[ -d $tracefs/events ] || mount -t tracefs nodev $tracefs 2>/dev/null
	echo > $tracefs/trace 2>/dev/null
	echo 'ret != 0' > $tracefs/events/vmbeam/fault/filter 2>/dev/null
	echo 1 > $tracefs/events/vmbeam/fault/enable 2>/dev/null
fi

echo "TAP version 13"
windows=$(printf "$size,%.0s" $(seq "$l2s")); windows=${windows%,}

if "$ctl" l1 start --name aged --dir "$dir" --windows "$windows" >/dev/null &&
	"$ctl" l1 start --name clean --dir "$dir" --windows "$windows" --empty >/dev/null; then
	ok "two_real_l1s_boot_with_vmbeam_windows"
else
	not_ok "two_real_l1s_boot_with_vmbeam_windows" "$(tail -5 "$dir"/*.log "$dir"/*.console 2>/dev/null)"
	echo "1..$n"; exit 1
fi

started=1
for i in $(seq 0 $((l2s - 1))); do
	"$ctl" l1 start-l2 --qmp "$dir/aged.qmp" --name "vm$i" --window "$i" >/dev/null || started=0
done
# The first pass ends after the workload's first fill of its RAM.
for _ in $(seq 60); do
	p0=$(pass_of aged vm0)
	[ "$p0" -ge 1 ] && break
	sleep 0.5
done
if [ "$started" = 1 ] && [ "$p0" -ge 1 ]; then ok "l2_qemus_run_the_workload_on_windows"
else not_ok "l2_qemus_run_the_workload_on_windows" "vm0 pass $p0"; fi

# After a failed migration every L2 runs on in the aged L1, its window's
# pages back there; the clean L1's window is empty again.
rolled_back() { # name rc out
	local name=$1 rc=$2 out=$3 p1 back clean0
	sleep 2
	p1=$(pass_of aged vm1) back=$(pages_at_l0 aged 1) clean0=$(pages_at_l0 "${4:-clean}" 1)
	if [ "$rc" = 1 ] && [ "$p1" -gt "$p0" ] && [ "$back" = 4096 ] && [ "${clean0:-0}" = 0 ] &&
		echo "$out" | json "d['rolled_back']" | grep -q resumed; then
		ok "$name"
	else
		not_ok "$name" "rc $rc, pass $p0 -> $p1, pages aged $back clean $clean0" "$out"
	fi
	p0=$(pass_of aged vm1)
}

if [ "$l2s" -gt 1 ]; then
	p0=$(pass_of aged vm1)
	for step in pause transfer; do
		out=$("$ctl" migrate-all --from "$dir/aged.qmp" --to "$dir/clean.qmp" --inject-failure $step --json)
		rolled_back "failure_after_${step}_leaves_the_l2s_running_on_the_aged_l1" $? "$out"
	done

	# The clean L1 dies after the transfer: the pages come back (vmbeamctl
	# holds the clean windows' regions), the L2s resume on the aged L1.
	"$ctl" migrate-all --from "$dir/aged.qmp" --to "$dir/clean.qmp" --stop-at transfer --json >"$dir/killed.json" &
	mig=$!
	for _ in $(seq 200); do
		[ "$(ps -o stat= -p $mig 2>/dev/null | cut -c1)" = T ] && break
		sleep 0.1
	done
	pkill -9 -f "unix:$dir/clean.qmp"
	sleep 1
	kill -CONT $mig
	wait $mig
	rolled_back "clean_l1_killed_after_the_transfer_l2s_back_on_the_aged_l1" $? "$(cat "$dir/killed.json")" none
	"$ctl" l1 start --name clean2 --dir "$dir" --windows "$windows" --empty >/dev/null ||
		not_ok "a_second_clean_l1_boots" "$(tail -5 "$dir"/clean2.log)"
	clean=clean2
else
	clean=clean
fi

before=$(pass_of aged vm0)
out=$("$ctl" migrate-all --from "$dir/aged.qmp" --to "$dir/$clean.qmp" --json)
rc=$?
echo "$out" | json "'\n'.join('# %s: %d/%d frames same, copied %s, downtime %.0f ms, passes %s -> %s, checksum ok %s' % (l['name'], l['frames_same'], l['frames_compared'], l['bytes_copied'], l['downtime_ms'] or -1, l['passes_at_pause'], l['passes_after'], l['checksum_ok']) for l in d['l2'])" 2>/dev/null
if [ $rc = 0 ] && echo "$out" | json "d['ok'] and d['totals']['bytes_copied']==0 and len(d['l2'])==$l2s and all(l['frames_compared']>0 and l['frames_same']==l['frames_compared'] and l['bytes_copied']==0 and l['checksum_ok'] and l['passes_after']>l['passes_at_pause'] for l in d['l2'])" | grep -q True; then
	ok "migrate_all_moves_every_l2_same_frames_zero_copied"
else
	not_ok "migrate_all_moves_every_l2_same_frames_zero_copied" "rc $rc" "$out"
fi

sleep 2
after=$(pass_of $clean vm0)
aged0=$(pages_at_l0 aged 0)
if [ "$after" -gt "$before" ] && [ "$aged0" = 0 ] && [ "$(pass_of aged vm0)" = -1 ]; then
	ok "l2_runs_on_in_the_clean_l1_and_the_aged_l1_holds_nothing"
else
	not_ok "l2_runs_on_in_the_clean_l1_and_the_aged_l1_holds_nothing" "pass $before -> $after; aged window 0 has $aged0 pages"
fi

# A malformed message to an agent gets an error object; the agent goes on.
reply=$(python3 - "$dir/$clean.agent" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.write(b'{"execute": "greeting", "id": 7}\n'); f.flush(); f.readline()
for line in (b"this is not json\n", b'{"execute": "no-such-command"}\n', b'{"execute": "save-l2", "arguments": {"nam": 1}}\n', b'{"execute": "query-commands"}\n'):
    f.write(line); f.flush(); print(json.loads(f.readline()))
EOF
)
if [ "$(grep -c "'error'" <<<"$reply")" = 3 ] && grep -q "'return'" <<<"$reply"; then
	ok "malformed_agent_messages_get_error_objects"
else
	not_ok "malformed_agent_messages_get_error_objects" "$reply"
fi

pkill -9 -f "$dir/" ; sleep 1
cp "$dir"/*.log "$dir"/*.console /tmp/ 2>/dev/null
regions=$("$ctl" status --json | json "d['stats']['regions']" 2>/dev/null || "$ctl" status --json)
if [ "$regions" = 0 ]; then ok "no_region_outlives_the_l1s"; else not_ok "no_region_outlives_the_l1s" "regions: $regions"; fi
if [ "$failed" = 1 ]; then
	echo "# L0 kernel log, last lines:"
	dmesg | tail -n 8 | sed 's/^/#   /'
	echo "# refused faults on regions (vmbeam:fault, ret != 0):"
	grep -v '^#' $tracefs/trace 2>/dev/null | head -n 10 | sed 's/^/#   /'
	for f in "$dir"/*.log "$dir"/*.console; do
		[ -s "$f" ] && { echo "# --- $f"; tail -n 15 "$f" | sed 's/^/# /'; }
	done
fi
echo "1..$n"
exit $failed
