#!/usr/bin/env bash
# Builds the L2 test guest (guests/l2/workload.S: a multiboot v1 ELF that
# QEMU -kernel loads at 1 MiB) into target/l2/workload.elf, only when a
# source is newer than it. Prints the ELF's path on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

src=$VMBEAM_ROOT/guests/l2
out=$VMBEAM_ROOT/target/l2
elf=$out/workload.elf

if [ -f "$elf" ] && [ "$elf" -nt "$src/workload.S" ] && [ "$elf" -nt "$src/workload.ld" ] &&
	[ "$elf" -nt "$0" ]; then
	echo "$elf"
	exit 0
fi

log "building the L2 test guest ($elf)"
mkdir -p "$out"
clang --target=i386-unknown-none -c -o "$out/workload.o" "$src/workload.S"
ld.lld -m elf_i386 -n --build-id=none -T "$src/workload.ld" -o "$elf.tmp" "$out/workload.o"
mv "$elf.tmp" "$elf"
echo "$elf"
