#!/usr/bin/env bash
# Builds the initramfs of an L1 hypervisor (the test kernel's bzImage is its
# kernel): busybox-static, Debian's qemu-system-x86_64 with its shared
# libraries and the firmware it loads for the L2 (-M pc -kernel multiboot),
# the L2 test guest at /l2/workload.elf, /init = scripts/l1-init.sh.
#
#   VMBEAM_AGENT=/path/to/binary   installed as /bin/vmbeam-agent (+ libs)
#   VMBEAM_L1_RUN=/path/to/script  installed as /l1/run.sh (experiments: init
#                                  runs it when there is no agent); or a
#                                  directory with a run.sh, copied to /l1/
#
# It unpacks to ~51 MB: boot the L1 with `rootfstype=ramfs` below ~192 MiB
# of RAM (a tmpfs rootfs is capped at half of RAM: "Initramfs unpacking
# failed: write error"). 128 MiB works that way; 96 MiB runs out of memory
# while unpacking.
#
# Cached under $VMBEAM_CACHE/l1-image-<key>/, the key covering this script,
# the init, the package versions and every file the image carries; a
# second run with nothing changed returns at once. Prints the image's path
# (initramfs.cpio.gz) on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

QEMU=/usr/bin/qemu-system-x86_64
BUSYBOX=/usr/bin/busybox
INIT=$VMBEAM_ROOT/scripts/l1-init.sh
# What QEMU 7.2 opens for `-M pc|q35 -nodefaults -kernel` (strace): the BIOS,
# the kvmvapic option ROM (not with -global kvm-apic.vapic=false, which an L2
# that is restored into absent memory needs), the multiboot / Linux / PVH
# loader option ROMs.
FIRMWARE=(
	/usr/share/seabios/bios-256k.bin
	/usr/share/qemu/kvmvapic.bin
	/usr/share/qemu/multiboot_dma.bin
	/usr/share/qemu/linuxboot_dma.bin
	/usr/share/qemu/pvh.bin
)
AGENT=${VMBEAM_AGENT:-}
RUN=${VMBEAM_L1_RUN:-}

[ -x "$QEMU" ] && [ -x "$BUSYBOX" ] || die "qemu-system-x86 and busybox-static are needed: scripts/deps.sh"
[ -z "$AGENT" ] || [ -x "$AGENT" ] || die "VMBEAM_AGENT=$AGENT is not an executable"
[ -z "$RUN" ] || [ -f "$RUN" ] || [ -f "$RUN/run.sh" ] ||
	die "VMBEAM_L1_RUN=$RUN is neither a file nor a directory with a run.sh"
l2=$("$VMBEAM_ROOT/scripts/l2-guest.sh")

# The shared libraries of a binary, the dynamic loader among them.
libs_of() {
	ldd "$1" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' || true
}

files=("$QEMU" "$BUSYBOX" "${FIRMWARE[@]}" "$l2")
mapfile -t qlibs < <(libs_of "$QEMU")
files+=("${qlibs[@]}")
if [ -n "$AGENT" ]; then
	mapfile -t alibs < <(libs_of "$AGENT")
	files+=("$AGENT" "${alibs[@]}")
fi
if [ -d "$RUN" ]; then
	mapfile -t runfiles < <(find "$RUN" -type f | LC_ALL=C sort)
	files+=("${runfiles[@]}")
elif [ -n "$RUN" ]; then
	files+=("$RUN")
fi

key=$({
	cat "$0" "$INIT"
	dpkg-query -W -f '${Package} ${Version}\n' qemu-system-x86 qemu-system-data seabios busybox-static
	echo "agent=$AGENT run=$RUN"
	sha256sum "${files[@]}"
} | sha256sum | cut -c1-16)
dir=$VMBEAM_CACHE/l1-image-$key
img=$dir/initramfs.cpio.gz
if [ -f "$img" ]; then
	echo "$img"
	exit 0
fi

log "building the L1 image in $dir"
rm -rf "$dir.tmp"
root=$dir.tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,l1,l2,var/tmp}

# put SRC [DEST]: copy a file (dereferenced) to the same path in the image.
put() {
	local dest=$root${2:-$1}
	mkdir -p "$(dirname "$dest")"
	cp -L "$1" "$dest"
}

put "$BUSYBOX" /bin/busybox
while read -r applet; do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$BUSYBOX" --list-full)

put "$QEMU"
for f in "${qlibs[@]}" "${FIRMWARE[@]}"; do put "$f"; done
put "$l2" /l2/workload.elf
if [ -n "$AGENT" ]; then
	put "$AGENT" /bin/vmbeam-agent
	for f in "${alibs[@]}"; do put "$f"; done
fi
if [ -d "$RUN" ]; then
	cp -rL "$RUN/." "$root/l1/"
	chmod +x "$root/l1/run.sh"
elif [ -n "$RUN" ]; then
	put "$RUN" /l1/run.sh
	chmod +x "$root/l1/run.sh"
fi
put "$INIT" /init
chmod +x "$root/init"
# glibc programs look these up; an empty passwd/group is enough.
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
	gzip -1 >"$dir.tmp/initramfs.cpio.gz"
rm -rf "$root"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
log "L1 image: $(du -h "$img" | cut -f1)"
echo "$img"
