#!/usr/bin/env bash
# Where, in the test kernel's KVM, the nested tests' L1 history looks
# (tests/nested-test.sh): the VMRUN instruction's offset in __svm_vcpu_run
# and the VMCB fields' offsets (CR3, RIP, nested CR3, exit code), read from
# vmlinux's debug info. Run on the host by tests/run.sh: objdump and
# pahole over the 140 MB vmlinux took ~30 s under TCG, in every boot.
#   svm-fields.sh VMLINUX   prints "vmrun_off=N o_vmcb=N ..." (shell words)
set -uo pipefail
vmlinux=$1
start=$(nm "$vmlinux" 2>/dev/null | awk '$3 == "__svm_vcpu_run" { print $1; exit }')
[ -n "$start" ] || exit 0
vmrun=$(objdump -d --start-address="0x$start" --stop-address="$(printf '0x%x' $((0x$start + 0x400)))" \
	"$vmlinux" 2>/dev/null | awk '/\tvmrun/ { sub(":", "", $1); print $1; exit }')
[ -n "$vmrun" ] && echo -n "vmrun_off=$((0x$vmrun - 0x$start)) "
structs=$(pahole -C vcpu_svm,vmcb,vmcb_save_area,vmcb_control_area "$vmlinux" 2>/dev/null)
# The byte offset of member $2 in struct $1.
offset() { awk -v s="struct $1 {" -v m="$2" '$0 == s { in_s = 1; next } in_s && /^};/ { exit } in_s && $0 ~ "[ *]" m ";" { print $(NF-2); exit }' <<<"$structs"; }
echo "o_vmcb=$(offset vcpu_svm vmcb) o_save=$(offset vmcb save) o_cr3=$(offset vmcb_save_area cr3)" \
	"o_rip=$(offset vmcb_save_area rip) o_ncr3=$(offset vmcb_control_area nested_cr3)" \
	"o_code=$(offset vmcb_control_area exit_code)"
