#!/usr/bin/python3
"""Where a silent L1's vCPUs are, seen from L0: the nested harnesses run it
when an L1's agent stops answering with its QEMU alive.

    l1-cpus.py QMP_SOCKET...

For each L1, three samples 0.5 s apart of every vCPU's RIP, CPL, HLT,
EFER and CR3, as L0's KVM has them: while the L1 runs an L2, these are
the L2's (the workload: no long mode, CR3 0), so a vCPU found in an L2
every time whose L1 never answers is an L1 that does not take its CPU
back; an RIP that never moves in the L1 kernel is a hang. Then its local
APIC (`info lapic`: is a timer armed, is one pending). Last, what L0's
KVM did for each VM over one second (its debugfs statistics, summed over
vCPUs): exits and nested runs still counting with an RIP that never moves
is a vCPU L0 keeps entering and leaving (a fault it cannot fix, an
interrupt it cannot deliver); nothing counting is a vCPU that never comes
out of the guest. Then which exits those are (`kvm_exit` reasons, half a
second, in a trace instance of its own).
"""
import glob, json, os, re, socket, subprocess, sys, time

TRACEFS = "/sys/kernel/tracing"


def hmp(path, command):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rw")
    f.readline()
    f.write('{"execute": "qmp_capabilities"}\n')
    f.flush()
    f.readline()
    f.write(json.dumps({"execute": "human-monitor-command", "arguments": {"command-line": command}}) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            return reply.get("return", str(reply.get("error")))


def sample(path):
    cpus = hmp(path, "info registers -a")
    out = []
    for block in re.split(r"\n(?=CPU#\d+)", cpus):
        fields = dict(re.findall(r"\b(RIP|EIP|CPL|HLT|EFER|CR3)=([0-9a-fA-F]+)", block))
        cpu = re.match(r"CPU#(\d+)", block)
        if fields:
            fields.setdefault("RIP", fields.get("EIP", "?"))
            out.append(f"cpu{cpu.group(1) if cpu else '?'} " + " ".join(f"{k}={fields.get(k, '?')}" for k in ("RIP", "CPL", "HLT", "EFER", "CR3")))
    return "; ".join(out)


for path in sys.argv[1:]:
    print(f"# L1 at {path}:")
    try:
        for i in range(3):
            print(f"#   {i * 0.5:.1f} s: {sample(path)}")
            time.sleep(0.5)
        for line in hmp(path, "info lapic").splitlines()[:12]:
            print(f"#   {line}")
    except Exception as e:  # a diagnostic: say why it could not look
        print(f"#   cannot look: {e}")


def kvm_stats():
    """{debugfs dir: {stat: value}} for every VM L0's KVM has (every plain
    counter of /sys/kernel/debug/kvm/PID-FD/, summed over its vCPUs)."""
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], capture_output=True)
    out = {}
    for d in glob.glob("/sys/kernel/debug/kvm/*-*"):
        values = {}
        for path in glob.glob(os.path.join(d, "*")):
            try:
                with open(path) as f:
                    values[os.path.basename(path)] = int(f.read())
            except (OSError, ValueError):
                pass
        out[d] = values
    return out


def exit_reasons(seconds):
    """{pid: {reason: count}} of L0's kvm_exit events over `seconds`, in a
    trace instance of its own (the harness's filtered trace stays as is)."""
    inst = os.path.join(TRACEFS, "instances", "l1-cpus")
    os.makedirs(inst, exist_ok=True)
    try:
        with open(os.path.join(inst, "events/kvm/kvm_exit/enable"), "w") as f:
            f.write("1")
        time.sleep(seconds)
        with open(os.path.join(inst, "events/kvm/kvm_exit/enable"), "w") as f:
            f.write("0")
        with open(os.path.join(inst, "trace")) as f:
            lines = f.read().splitlines()
    finally:
        os.rmdir(inst)
    counts = {}
    for line in lines:
        m = re.search(r"-(\d+)\s+\[.*kvm_exit: vcpu \d+ reason (\S+)", line)
        if m:
            by = counts.setdefault(m.group(1), {})
            by[m.group(2)] = by.get(m.group(2), 0) + 1
    return counts


def vm_name(d):
    pid = os.path.basename(d).split("-")[0]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return args[args.index(b"-name") + 1].decode() if b"-name" in args else args[0].decode()
    except (OSError, ValueError, IndexError):
        return "?"


try:
    before = kvm_stats()
    time.sleep(1)
    after = kvm_stats()
    for d in sorted(after):
        changed = {k: v - before.get(d, {}).get(k, 0) for k, v in after[d].items()}
        delta = " ".join(f"{k} +{n}" for k, n in sorted(changed.items()) if n > 0)
        print(f"# L0 KVM, VM {os.path.basename(d)} ({vm_name(d)}), over 1 s: {delta or 'nothing counted'}")
except Exception as e:  # a diagnostic: say why it could not look
    print(f"# L0 KVM statistics: cannot look: {e}")
try:
    for pid, reasons in sorted(exit_reasons(0.5).items()):
        top = sorted(reasons.items(), key=lambda r: -r[1])[:6]
        print(f"# L0 kvm_exit reasons in 0.5 s, thread {pid}: " + ", ".join(f"{r} {n}" for r, n in top))
except Exception as e:  # a diagnostic: say why it could not look
    print(f"# L0 kvm_exit reasons: cannot look: {e}")
