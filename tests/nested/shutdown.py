#!/usr/bin/env python3
"""Explains L0's trace lines of an L1's end (nested-test.sh, on failure).

Reads kvm_exit (SHUTDOWN and SVM_EXIT_ERR only), kvm_userspace_exit
(KVM_EXIT_SHUTDOWN and KVM_EXIT_FAIL_ENTRY only) and kvm_nested_vmexit_inject
(SVM_EXIT_ERR only) lines on stdin. A SHUTDOWN exit is a triple fault: its
intr_info is the event (AMD's EXITINTINFO) whose delivery failed, e.g.
0x80000b0e with error code 0x10 = a #PF on an instruction fetch from a
not-present page. SVM_EXIT_ERR is a VMRUN that (TCG's) SVM refused.
"""
import re
import sys

VECTORS = {0: "#DE", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 12: "#SS", 10: "#TS", 11: "#NP"}
TYPES = {0: "interrupt", 2: "NMI", 3: "exception", 4: "software interrupt"}


def pf_error(code):
    what = "an instruction fetch" if code & 0x10 else ("a write" if code & 2 else "a read")
    page = "a present page (protection)" if code & 1 else "a not-present page"
    mode = "user" if code & 4 else "kernel"
    return f"{what} from {page} in {mode} mode"


def explain(line):
    if "kvm_nested_vmexit_inject" in line and "invalid_guest_state" in line:
        return "the L1's VMRUN of an L2 failed (SVM_EXIT_ERR), reflected to the L1"
    if "kvm_exit" in line and "invalid_guest_state" in line:
        return "L0's VMRUN of the L1 failed (SVM_EXIT_ERR): its VMCB's save area holds what TCG wrote there"
    if "KVM_EXIT_FAIL_ENTRY" in line:
        return "KVM returned KVM_EXIT_FAIL_ENTRY to the L1's QEMU (a failed VMRUN)"
    m = re.search(r"reason shutdown rip (0x[0-9a-f]+).*intr_info (0x[0-9a-f]+) error_code (0x[0-9a-f]+)", line)
    if not m:
        return "KVM returned KVM_EXIT_SHUTDOWN to the L1's QEMU" if "KVM_EXIT_SHUTDOWN" in line else None
    rip, info, err = (int(x, 16) for x in m.groups())
    if not info >> 31:
        return f"triple fault at rip {rip:#x} (no event in delivery recorded)"
    vector, kind = info & 0xFF, TYPES.get((info >> 8) & 7, "event")
    name = VECTORS.get(vector, f"vector {vector}")
    text = f"triple fault at rip {rip:#x}: delivering {kind} {name} failed"
    if vector == 14 and info & 0x800:
        text += f" (error code {err:#x}: {pf_error(err)})"
    return text


for raw in sys.stdin:
    print("#   " + raw.strip())
    why = explain(raw)
    if why:
        print("#     = " + why)
