# Shared settings for the scripts/ helpers. Sourced, not run.
# shellcheck shell=bash

VMBEAM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VMBEAM_CACHE=${VMBEAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmbeam}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
VENV=$VMBEAM_CACHE/venv

# The kernel and the module must be built by the same rustc (E0514 otherwise),
# and rustup's toolchain here has no rust-src: Debian's rustc-web is the one.
KRUSTC=/usr/bin/rustc
KRUSTDOC=/usr/bin/rustdoc
BINDGEN_VERSION=0.69.5
KCONFIG=${KCONFIG:-default}

export PATH="$VENV/bin:$CARGO_HOME/bin:$PATH"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Make flags shared by the kernel build and every M= module build.
kmake_flags() {
	echo LLVM=1 RUSTC=$KRUSTC HOSTRUSTC=$KRUSTC RUSTDOC=$KRUSTDOC \
		BINDGEN=$CARGO_HOME/bin/bindgen CLIPPY_DRIVER=/usr/bin/clippy-driver
}

# Fragments merged over tinyconfig for a KCONFIG variant.
kconfig_fragments() {
	local f=("$VMBEAM_ROOT/kernel-config/vmbeam.config")
	case $KCONFIG in
	default) ;;
	debug) f+=("$VMBEAM_ROOT/kernel-config/debug.config") ;;
	*) die "unknown KCONFIG=$KCONFIG (default or debug)" ;;
	esac
	printf '%s\n' "${f[@]}"
}

# Everything the built tree depends on: kernel and toolchain package versions,
# the fragments and the script that builds it.
kernel_key() {
	{
		dpkg-query -W -f '${Package} ${Version}\n' linux-source-6.12 rustc-web \
			rust-web-src clang lld llvm dwarves 2>/dev/null
		echo "bindgen $BINDGEN_VERSION"
		# shellcheck disable=SC2046
		cat $(kconfig_fragments) "$VMBEAM_ROOT/scripts/kernel.sh"
	} | sha256sum | cut -c1-16
}

kernel_dir() { echo "$VMBEAM_CACHE/kernel-$KCONFIG-$(kernel_key)"; }
