#!/usr/bin/python3
"""L0 side of the nested experiment (tests/nested/experiment.sh runs it inside
the test kernel): starts an L1 QEMU with two ivshmem windows cold-plugged
over QMP before it runs, watches the L2 workload header in the window
files, and answers the L1's run.sh (tests/nested/l1-run.sh) over the
virtio-serial agent port.

    l0.py BZIMAGE INITRD WORKDIR [L1_MEM]
"""
import ctypes, hashlib, json, mmap, os, socket, struct, subprocess, sys, time

bz, initrd, work = sys.argv[1:4]
l1mem = sys.argv[4] if len(sys.argv) > 4 else "128M"
WIN = 16 << 20
HDR = 0x200000
K, M, MASK = 0x9E3779B9, 0x01000193, 0xFFFFFFFF
T0 = time.monotonic()
failures = []


def t():
    return time.monotonic() - T0


def say(*a):
    print(f"[L0 {t():7.3f}]", *a, flush=True)


def check(ok, what):
    say(("ok: " if ok else "FAIL: ") + what)
    if not ok:
        failures.append(what)


def header(path):
    with open(path, "rb") as f:
        f.seek(HDR)
        return struct.unpack("<9I", f.read(36))


def fmt(h):
    names = "magic seed pass dwords checksum errors bad_addr bad_value heartbeat".split()
    return " ".join(f"{n}={v:#x}" if n in ("magic", "seed", "checksum", "bad_addr", "bad_value") else f"{n}={v}"
                    for n, v in zip(names, h))


def expected_checksum(seed, n, p):
    base = (seed + (p - 1) * M) & MASK
    tri = (n * (n - 1) // 2) & MASK
    return (n * base + K * tri) & MASK


def data_state(path, h):
    """A stopped workload: dwords [0, i) hold B(p), [i, n) B(p-1)."""
    _, seed, p, n = h[:4]
    with open(path, "rb") as f:
        f.seek(HDR + 4096)
        raw = f.read(4 * n)
    import array
    a = array.array("I")
    a.frombytes(raw)
    bp, bq = (seed + p * M) & MASK, (seed + (p - 1) * M) & MASK
    i = 0
    while i < n and a[i] == (bp + i * K) & MASK:
        i += 1
    j = i
    while j < n and a[j] == (bq + j * K) & MASK:
        j += 1
    return i, j == n


def resident(path):
    """Pages of the file in the page cache (mincore over a shared mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), WIN)
        buf = (ctypes.c_char * WIN).from_buffer(m)
        vec = (ctypes.c_ubyte * (WIN // 4096))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(WIN), vec)
        del buf
        m.close()
    assert rc == 0, ctypes.get_errno()
    return [i for i, v in enumerate(vec) if v & 1]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def wait_header(path, cond, timeout, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = header(path)
        if cond(h):
            return h
        time.sleep(step)
    return None


class Qmp:
    def __init__(self, path):
        for _ in range(600):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                say(f"qmp {name} {json.dumps(args) if args else ''} -> {json.dumps(r)[:300]}")
                return r


say(f"L0 up: wall clock {time.time():.3f}, uptime {open('/proc/uptime').read().split()[0]} s, {os.cpu_count()} CPUs, kvm: "
    f"{[m for m in os.listdir('/sys/module') if m.startswith('kvm')]}")
os.makedirs(work, exist_ok=True)
w0, w1 = "/dev/shm/vmbeam-win0", "/dev/shm/vmbeam-win1"
for w in (w0, w1):
    if os.path.exists(w):
        os.unlink(w)
    with open(w, "wb") as f:
        f.truncate(WIN)
with open(w1, "r+b") as f:
    f.seek(HDR)
    f.write(b"TOUCHME!" * 8)
say(f"windows: win0 resident pages {len(resident(w0))}, win1 resident pages {resident(w1)}")

serial, qmp_path, agent_path = f"{work}/l1-serial.log", f"{work}/l1.qmp", f"{work}/agent.sock"
for p in (serial, qmp_path, agent_path):
    if os.path.exists(p):
        os.unlink(p)
l1 = [
    "timeout", "900", "qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-tsc-deadline", "-M", "q35",
    "-m", l1mem, "-smp", os.environ.get("L1_SMP", "1"), "-nographic", "-nodefaults", "-no-reboot",
    "-serial", f"file:{serial}",
    "-kernel", bz, "-initrd", initrd, "-append", "quiet console=ttyS0 panic=-1 rootfstype=ramfs",
    "-S", "-qmp", f"unix:{qmp_path},server=on,wait=off",
    "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x10",
    "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x11",
    "-device", "virtio-serial-pci,id=vs0",
    "-chardev", f"socket,id=agent0,path={agent_path},server=on,wait=off",
    "-device", "virtserialport,chardev=agent0,name=vmbeam.agent",
]
say("L1: " + " ".join(l1))
out = open(f"{work}/l1-qemu.log", "w")
proc = subprocess.Popen(l1, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
q = Qmp(qmp_path)
say("L1 QMP up")
q.cmd("object-add", **{"qom-type": "memory-backend-file", "id": "win0", "mem-path": w0, "share": True, "size": WIN})
q.cmd("device_add", driver="ivshmem-plain", memdev="win0", bus="rp0", id="iv0")
q.cmd("object-add", **{"qom-type": "memory-backend-file", "id": "win1", "mem-path": w1, "share": True, "size": WIN})
q.cmd("device_add", driver="ivshmem-plain", memdev="win1", bus="rp1", id="iv1")
t_cont = t()
q.cmd("cont")


def serial_wait(text, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return None
        try:
            s = open(serial, errors="replace").read()
        except FileNotFoundError:
            s = ""
        if text in s:
            return s
        time.sleep(0.05)
    return None


for mark in ("SeaBIOS", "Booting from ROM", "kvm_intel"):
    if serial_wait(mark, 300) is not None:
        say(f"L1 serial shows {mark!r} {t() - t_cont:.3f} s after cont")
s = serial_wait("vmbeam-l1: init up", 300)
check(s is not None, f"L1 reached init {t() - t_cont:.3f} s after cont")
if s is None:
    print(open(serial, errors="replace").read())
    print(open(f"{work}/l1-qemu.log").read())
    sys.exit(1)
say("L1 serial: " + [l for l in s.splitlines() if "init up" in l][0])
s = serial_wait("VPORT-WAITING", 120)
check(s is not None, "L1 probed the agent port unconnected")
time.sleep(2)
a = socket.socket(socket.AF_UNIX)
a.connect(agent_path)
say("connected to the agent socket")
af = a.makefile("rw")
line = af.readline()
say(f"from L1: {line.strip()!r}")
af.write("hello from L0\n")
af.flush()
line = af.readline()
say(f"from L1: {line.strip()!r}; disconnecting")
af.close()
a.close()
time.sleep(3)
a = socket.socket(socket.AF_UNIX)
a.connect(agent_path)
af = a.makefile("rw")
af.write("sent while the port was closed\n")
af.flush()
say("reconnected, wrote a line while the L1 has the port closed")

def answer(what):
    global saved
    if what == "l1-up":
        r = resident(w1)
        check(r == [HDR // 4096], f"win1 after L1 boot: resident pages {r}")
        check(len(resident(w0)) == 0, "win0 untouched after L1 boot")
    elif what == "l2-running":
        h = header(w0)
        check(h[0] == 0x324C4D56 and h[5] == 0, "win0 at L0: " + fmt(h))
        p = h[2]
        h1 = wait_header(w0, lambda h: h[2] >= p + 1, 120, 0.002)
        ta = t()
        time.sleep(3)
        h2 = wait_header(w0, lambda h: h[2] > h1[2], 120, 0.002)
        tb = t()
        n = h2[2] - h1[2]
        check(n > 0, f"{n} passes in {tb - ta:.3f} s: {(tb - ta) / n:.3f} s per pass of {h2[3] * 4 >> 20} MiB "
              f"(heartbeat {(h2[8] - h1[8]) / (tb - ta):.0f}/s)")
        check(h2[4] == expected_checksum(h2[1], h2[3], h2[2] - 1), "checksum of the last pass as expected")
        say(f"win0 resident pages {len(resident(w0))} of {WIN // 4096}")
    elif what == "saved":
        h = header(w0)
        time.sleep(1)
        hb = header(w0)
        check(h == hb, "L2 stopped (header still for 1 s): " + fmt(hb))
        i, ok = data_state(w0, hb)
        check(ok and hb[5] == 0, f"window consistent mid-pass: {i} dwords rewritten for pass {hb[2]}, rest from pass {hb[2] - 1}")
        saved = hb, i, sha(w0)
    elif what == "touch-check":
        r = resident(w1)
        h = open(w1, "rb").read()[HDR:HDR + 64]
        check(r == [HDR // 4096], f"-incoming defer QEMU (before migrate-incoming): win1 resident pages {r}")
        check(h == b"TOUCHME!" * 8, "win1 marked header unchanged")
        check(sha(w0) == saved[2], "win0 unchanged since the save")
    elif what == "touch-check-loaded":
        r = resident(w1)
        h = open(w1, "rb").read()[HDR:HDR + 64]
        check(r == [HDR // 4096], f"after migrate-incoming (state loaded, not cont): win1 resident pages {r}")
        check(h == b"TOUCHME!" * 8, "win1 marked header unchanged")
    elif what == "incoming-up":
        check(sha(w0) == saved[2], "win0 unchanged with the restoring QEMU up, before migrate-incoming")
    elif what == "restored":
        hs = saved[0]
        h = header(w0)
        say("after cont: " + fmt(h))
        h1 = wait_header(w0, lambda h: h[2] >= hs[2] + 1 or h[5], 120)
        check(h1 is not None and h1[5] == 0, "the interrupted pass completed: " + (fmt(h1) if h1 else "timeout"))
        check(h1 and h1[1] == hs[1] and h1[3] == hs[3], "same seed and dwords")
        check(h1 and h1[4] == expected_checksum(hs[1], hs[3], hs[2]),
              f"checksum of the interrupted pass {hs[2]} = the full expected sum (registers and RAM both carried on)")
        h2 = wait_header(w0, lambda h: h[2] >= hs[2] + 3 or h[5], 120)
        check(h2 and h2[5] == 0 and h2[4] == expected_checksum(hs[1], hs[3], h2[2] - 1),
              "two more passes, checksums as expected: " + (fmt(h2) if h2 else "timeout"))


saved = None
while True:
    line = af.readline()
    if not line:
        check(False, "the agent channel closed")
        break
    line = line.rstrip("\n")
    if line.startswith("LOG "):
        say("  L1| " + line[4:])
        continue
    say("L1: " + line)
    if not line.startswith("ASK "):
        continue
    what = line[4:]
    try:
        answer(what)
        reply = "GO"
    except Exception as e:
        check(False, f"{what}: {type(e).__name__}: {e}")
        reply = "STOP"
    af.write(reply + "\n")
    af.flush()
    if what == "done":
        break

rc = proc.wait(timeout=120)
say(f"L1 QEMU exited {rc}")
say("L1 serial log:\n" + open(serial, errors="replace").read())
say("L1 QEMU output:\n" + open(f"{work}/l1-qemu.log").read())
say(f"failures: {len(failures)}")
for f in failures:
    say("  " + f)
print(f"VMBEAM_NESTED_EXIT={1 if failures else 0}")
sys.exit(1 if failures else 0)
