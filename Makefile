# vmbeam: every top-level target. The module itself is built by Kbuild
# (make -C $KDIR M=$PWD), driven from scripts/module.sh.
#
#   make demo      boot the test kernel, run the main job, print the report
#   make test      every test: lint, cargo test, selftests in the test kernel
#   make kernel    build (or find cached) the test kernel
#   make module    build vmbeam.ko          (CLIPPY=1 to lint it)
#   make lint      clippy + rustfmt on everything
#
# KCONFIG=debug selects the debug kernel (KASAN, lockdep, kmemleak, DEBUG_VM).

KCONFIG ?= default
export KCONFIG
CARGO ?= cargo

.PHONY: all deps kernel module userspace test demo lint clean

all: module userspace

deps:
	@scripts/deps.sh

kernel: deps
	@scripts/kernel.sh >/dev/null

module: kernel
	@scripts/module.sh $(if $(CLIPPY),CLIPPY=1)

userspace: deps
	$(CARGO) build --workspace --all-targets

test: lint module userspace
	$(CARGO) test --workspace
	@tests/run.sh

demo: module userspace
	@tests/run.sh --demo

lint: deps
	@scripts/module.sh CLIPPY=1
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check
	rustfmt --check --edition 2021 kmod/*.rs  # kmod/.rustfmt.toml: the kernel tree's style

clean:
	rm -f -- *.o *.ko *.mod *.mod.c .*.cmd Module.symvers modules.order .vmbeam-kdir \
		kmod/*.o kmod/.*.cmd kmod/*.d kmod/uapi_generated.rs
	$(CARGO) clean
