#!/bin/sh
# /init of the L1 hypervisor image (scripts/l1-image.sh copies it in).
# Mounts the pseudo filesystems, names the virtio-serial ports under
# /dev/virtio-ports/, then runs, in this order of preference:
#   /bin/vmbeam-agent            if the image carries one (VMBEAM_AGENT=)
#   l1run=<path> from the kernel command line, or /l1/run.sh if present
#   a shell on the console
# and powers the L1 off when that returns (with -no-reboot QEMU exits).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run /var/tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# The agent marks each L2's downtime with the L1 kernel's kvm events.
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up 2>/dev/null

mkdir -p /dev/virtio-ports
for port in /sys/class/virtio-ports/*; do
	[ -r "$port/name" ] || continue
	name=$(cat "$port/name")
	[ -n "$name" ] && ln -sf "../${port##*/}" "/dev/virtio-ports/$name"
done

run=
for arg in $(cat /proc/cmdline); do
	case $arg in l1run=*) run=${arg#l1run=} ;; esac
done
[ -z "$run" ] && [ -x /l1/run.sh ] && run=/l1/run.sh

echo "vmbeam-l1: init up $(cut -d' ' -f1 /proc/uptime) s"
if [ -x /bin/vmbeam-agent ]; then
	/bin/vmbeam-agent
	echo "vmbeam-l1: vmbeam-agent exited with $?"
elif [ -n "$run" ]; then
	"$run"
	echo "vmbeam-l1: $run exited with $?"
else
	setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
fi
sync
poweroff -f
reboot -f
