#!/bin/sh
# Runs inside the L1 of the nested experiment (tests/nested/experiment.sh),
# as /l1/run.sh of its image. Talks to the L0 side (tests/nested/l0.py)
# over the virtio-serial port vmbeam.agent: "EV ..." lines report, "ASK x"
# lines wait for L0's "GO" after it has checked the windows.
# Windows: win0 (the L2's RAM) below the root port 00:10.0, win1 (a sparse
# one for the touch test) below 00:11.0.
T=/l1/l1tool
PORT=/dev/virtio-ports/vmbeam.agent
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "$*"; }   # serial console: keep it short (~2 KB/s)

window() { # root port slot -> resource2 of the ivshmem device below it
	for d in /sys/bus/pci/devices/0000:00:$1.0/0000:*:00.0; do
		[ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1af4:0x1110 ] && { echo "$d"; return 0; }
	done
	return 1
}

say "L1 run.sh at $(up) s"
D0=$(window 10) || { say "FAIL: no ivshmem below 00:10.0"; ls /sys/bus/pci/devices; exit 1; }
D1=$(window 11) || { say "FAIL: no ivshmem below 00:11.0"; exit 1; }
R0=$D0/resource2 R1=$D1/resource2

# 1. The agent port: what poll() says with nobody at L0, then with a client.
$T vport $PORT
sleep 6   # L0 reconnects and writes a line while the port is closed here
exec 3<>$PORT
$T vport-wait 3 60 >/dev/null || { say "FAIL: L0 did not reconnect"; exit 1; }
read -t 10 -r early <&3; early_rc=$?
ev() { echo "EV $* up=$(up)" >&3; }
log() { "$@" 2>&1 | while IFS= read -r l; do echo "LOG $l" >&3; done; }
ask() {
	echo "ASK $*" >&3
	read -r reply <&3
	[ "$reply" = GO ] && return 0
	say "L0 said: $reply"
	for f in /tmp/l2*.log; do [ -f "$f" ] && log tail -n 20 "$f"; done
	log free
	log cat /proc/meminfo
	log dmesg
	echo "EV aborted" >&3
	exit 1
}

ev "early-line rc=$early_rc line=[$early]"
ev "ports $(for p in /sys/class/virtio-ports/*; do echo "${p##*/}=$(cat "$p/name")"; done) $(ls -l $PORT)"
ev "l1-up cpus=$(nproc) mem=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)kB"
for d in $D0 $D1; do
	ev "window ${d##*/} resource=$(sed -n 3p "$d/resource" | tr ' ' ,) enable=$(cat "$d/enable") cmd=$(od -An -tx2 -j4 -N2 "$d/config" | tr -d ' ')"
done
log grep -E '^(MemTotal|MemFree|MemAvailable|Shmem):' /proc/meminfo
log sh -c "dmesg | grep -E 'Unpacking initramfs|Freeing initrd|Run /init'"
log $T peek $R1
ask l1-up

L2="qemu-system-x86_64 -enable-kvm -cpu host -M pc -nodefaults -m 16M -display none -global kvm-apic.vapic=false -kernel /l2/workload.elf"
mem() { echo "-object memory-backend-file,id=mem0,mem-path=$1,share=on,size=16M -machine memory-backend=mem0"; }
CAP='{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}'

# 2. The L2 on win0.
ev "l2-start"
t=$(up)
timeout 900 $L2 $(mem $R0) -qmp unix:/tmp/l2a.qmp,server=on,wait=off >/tmp/l2a.log 2>&1 &
A=$!
$T qmp /tmp/l2a.qmp >/dev/null
ev "l2-qmp-up since-start=$(echo "$(up) - $t" | bc)"
log $T wait-pass $R0 1 120
ev "l2-filled since-start=$(echo "$(up) - $t" | bc)"
log $T wait-pass $R0 2 120
ev "l2-first-pass since-start=$(echo "$(up) - $t" | bc)"
log grep -E '^(VmRSS|VmHWM|RssAnon|RssFile|RssShmem):' /proc/$(pidof qemu-system-x86_64)/status
log grep -E '^(MemFree|MemAvailable):' /proc/meminfo
ask l2-running
log $T qmp /tmp/l2a.qmp '{"execute":"query-status"}'

# 3. Save: x-ignore-shared, stop, migrate to a file.
t=$(up)
log $T qmp /tmp/l2a.qmp "$CAP" '{"execute":"stop"}' '{"execute":"migrate","arguments":{"uri":"exec:cat > /tmp/l2.state"}}'
log $T wait-migrate /tmp/l2a.qmp 120
ev "saved secs=$(echo "$(up) - $t" | bc) state=$(stat -c %s /tmp/l2.state)"
log $T qmp /tmp/l2a.qmp '{"execute":"query-migrate"}'
log $T peek $R0
ask saved
log $T qmp /tmp/l2a.qmp '{"execute":"quit"}'
wait $A; ev "l2a-exit rc=$?"
log cat /tmp/l2a.log

# 4. Does a QEMU waiting with -incoming defer touch its RAM? win1 is sparse
# at L0 but for a marked header page.
timeout 900 $L2 $(mem $R1) -S -incoming defer -qmp unix:/tmp/l2t.qmp,server=on,wait=off >/tmp/l2t.log 2>&1 &
B=$!
log $T qmp /tmp/l2t.qmp '{"execute":"query-status"}' "$CAP"
sleep 3
ask touch-check
# And loading the saved state (x-ignore-shared) into it, without cont.
log $T qmp /tmp/l2t.qmp '{"execute":"migrate-incoming","arguments":{"uri":"exec:cat /tmp/l2.state"}}'
log $T wait-migrate /tmp/l2t.qmp 120
log $T wait-status /tmp/l2t.qmp paused 60
ask touch-check-loaded
log $T qmp /tmp/l2t.qmp '{"execute":"quit"}'
wait $B; ev "l2t-exit rc=$?"
log cat /tmp/l2t.log

# 5. Restore on win0 in a new QEMU.
t=$(up)
timeout 900 $L2 $(mem $R0) -S -incoming defer -qmp unix:/tmp/l2b.qmp,server=on,wait=off >/tmp/l2b.log 2>&1 &
C=$!
log $T qmp /tmp/l2b.qmp "$CAP" '{"execute":"query-status"}'
ev "incoming-up secs=$(echo "$(up) - $t" | bc)"
ask incoming-up
t=$(up)
log $T qmp /tmp/l2b.qmp '{"execute":"migrate-incoming","arguments":{"uri":"exec:cat /tmp/l2.state"}}'
log $T wait-migrate /tmp/l2b.qmp 120
log $T wait-status /tmp/l2b.qmp paused 60
t2=$(up)
log $T qmp /tmp/l2b.qmp '{"execute":"cont"}' '{"execute":"query-status"}'
ev "restored load-secs=$(echo "$t2 - $t" | bc) total-secs=$(echo "$(up) - $t" | bc)"
ask restored
log $T peek $R0
log $T qmp /tmp/l2b.qmp '{"execute":"quit"}'
wait $C; ev "l2b-exit rc=$?"
log cat /tmp/l2b.log
log free
ev "done"
ask done
