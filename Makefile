# vmbeam: every top-level target. The module itself is built by Kbuild
# (make -C $KDIR M=$PWD), driven from scripts/module.sh.
#
#   make demo      boot the test kernel; in it, rejuvenate a real L1 (QEMU +
#                  KVM + two L2 QEMUs) into a clean one; print the report
#   make demo-lab  the same flow between lab L1s (vmbeam-lab)
#   make test      every test: lint, cargo test, selftests in the test kernel
#                  (the smallest real nested case among them)
#   make test-debug   make test on the debug kernel (KASAN, lockdep,
#                  kmemleak, DEBUG_VM): KCONFIG=debug
#   make test-nested  the real nested tests alone (two L2s, failures)
#   make fuzz      the uAPI fuzzer in the test kernel, 1,000,000 ioctls
#                  (VMBEAM_FUZZ_IOCTLS=N for another count)
#   make stress    transfer, move-rule and migrate selftests 50 times in one
#                  boot (VMBEAM_STRESS_RUNS=N for another count)
#   make bench     in the test kernel: vmbeam vs memcpy vs memfd hand-over vs
#                  QEMU's migrations vs lab migrate-all, 64 MiB..1 GiB; writes
#                  results/bench.{md,json,png} (VMBEAM_BENCH_SIZES, _RUNS)
#   make l1-image  build (or find cached) the L1 hypervisor's initramfs
#   make kernel    build (or find cached) the test kernel
#   make module    build vmbeam.ko          (CLIPPY=1 to lint it)
#   make lint      clippy + rustfmt on everything
#   make vmlinux-h regenerate bpf/vmlinux.h (committed) from the test
#                  kernel's BTF, for the eBPF probes in bpf/
#
# KCONFIG=debug selects the debug kernel (KASAN, lockdep, kmemleak, DEBUG_VM).

KCONFIG ?= default
export KCONFIG
CARGO ?= cargo

.PHONY: all deps kernel module userspace test test-debug test-nested fuzz stress bench demo demo-lab l1-image lint vmlinux-h clean

all: module userspace

# A fresh clone's target/ starts from the dependencies an earlier build
# compiled (scripts/cargo-cache.sh; cargo's fingerprints still decide).
deps:
	@scripts/deps.sh
	@scripts/cargo-cache.sh restore

kernel: deps
	@scripts/kernel.sh >/dev/null

module: kernel
	@scripts/module.sh $(if $(CLIPPY),CLIPPY=1)

userspace: deps
	$(CARGO) build --workspace --all-targets
	@scripts/cargo-cache.sh save

test: lint module userspace l1-image
	$(CARGO) test --workspace
	@tests/run-all.sh

test-debug:
	@$(MAKE) --no-print-directory test KCONFIG=debug

# Bounded, and a second boot when the first fails: TCG's nested SVM
# stalls the test kernel or resets an L1 now and then (README, Tests);
# the second boot's result counts, both are shown.
test-nested: module userspace l1-image
	@VMBEAM_RUN_TIMEOUT=$${VMBEAM_RUN_TIMEOUT:-900} tests/run.sh --nested || \
	{ echo "# the real nested tests failed in this boot: one more boot (see README, Tests)"; \
	  VMBEAM_RUN_TIMEOUT=$${VMBEAM_RUN_TIMEOUT:-900} tests/run.sh --nested; }

fuzz: module userspace l1-image
	@VMBEAM_RUN_TIMEOUT=$${VMBEAM_RUN_TIMEOUT:-7200} tests/run.sh --fuzz

stress: module userspace l1-image
	@VMBEAM_RUN_TIMEOUT=$${VMBEAM_RUN_TIMEOUT:-7200} tests/run.sh --stress

bench: module userspace l1-image
	@tests/run.sh --bench

demo: module userspace l1-image
	@tests/run.sh --demo

demo-lab: module userspace
	@tests/run.sh --demo-lab

# The L1 image carries the agent: build it first, then the image (cached,
# keyed by what it holds).
l1-image: userspace
	@VMBEAM_AGENT=$(CURDIR)/target/debug/vmbeam-agent scripts/l1-image.sh >/dev/null

vmlinux-h: kernel
	bpftool btf dump file "$$(scripts/kernel.sh)/vmlinux" format c >bpf/vmlinux.h.tmp
	mv bpf/vmlinux.h.tmp bpf/vmlinux.h

lint: deps
	@scripts/module.sh CLIPPY=1
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check
	rustfmt --check --edition 2021 kmod/*.rs  # kmod/.rustfmt.toml: the kernel tree's style

clean:
	rm -f -- *.o *.ko *.mod *.mod.c .*.cmd Module.symvers modules.order .vmbeam-kdir \
		kmod/*.o kmod/.*.cmd kmod/*.d kmod/uapi_generated.rs
	$(CARGO) clean
