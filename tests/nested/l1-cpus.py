#!/usr/bin/python3
"""Where a silent L1's vCPUs are, seen from L0: the nested harnesses run it
when an L1's agent stops answering with its QEMU alive.

    l1-cpus.py QMP_SOCKET...

For each L1, three samples 0.5 s apart of every vCPU's RIP, CPL, HLT,
EFER and CR3, as L0's KVM has them: while the L1 runs an L2, these are
the L2's (the workload: no long mode, CR3 0), so a vCPU found in an L2
every time whose L1 never answers is an L1 that does not take its CPU
back; an RIP that never moves in the L1 kernel is a hang. Then its local
APIC (`info lapic`: is a timer armed, is one pending).
"""
import json, re, socket, sys, time


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
