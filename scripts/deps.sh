#!/usr/bin/env bash
# Installs, idempotently, everything vmbeam builds and tests with on a bare
# Debian bookworm machine: apt packages, bindgen-cli, virtme-ng in a venv.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

APT_PACKAGES=(
	rustc-web rust-web-src rust-web-clippy clang lld llvm libclang-dev
	flex bison bc libelf-dev zlib1g-dev pkg-config libssl-dev dwarves cpio kmod bpftool fonts-dejavu-core
	qemu-system-x86 linux-source-6.12 python3-venv busybox-static
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	log "apt: installing ${missing[*]}"
	SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
		"${missing[@]}" >/dev/null
fi

# The kernel's Rust build needs bindgen; 0.66.x is rejected by this tree.
if ! "$CARGO_HOME/bin/bindgen" --version 2>/dev/null | grep -q " $BINDGEN_VERSION\$"; then
	log "cargo: installing bindgen-cli $BINDGEN_VERSION"
	cargo install --locked --quiet bindgen-cli --version "$BINDGEN_VERSION"
fi

if [ ! -x "$VENV/bin/vng" ]; then
	log "pip: installing virtme-ng into $VENV"
	mkdir -p "$VMBEAM_CACHE"
	/usr/bin/python3 -m venv "$VENV"
	"$VENV/bin/pip" install --quiet virtme-ng==1.42
fi
