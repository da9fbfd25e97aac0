#!/usr/bin/env bash
# Builds vmbeam.ko against the cached test kernel (make -C $KDIR M=$PWD).
# Extra arguments go to make (e.g. CLIPPY=1, clean).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kdir=$("$VMBEAM_ROOT/scripts/kernel.sh")
# Objects built against another kernel (default vs debug) must not be reused.
stamp="$VMBEAM_ROOT/.vmbeam-kdir"
if [ "$(cat "$stamp" 2>/dev/null)" != "$kdir" ]; then
	# Only the module's own objects: Kbuild's M= clean would also delete
	# every *.o under target/.
	(cd "$VMBEAM_ROOT" && rm -f -- *.o *.ko *.mod *.mod.c .*.cmd Module.symvers modules.order \
		kmod/*.o kmod/.*.cmd kmod/*.d kmod/uapi_generated.rs)
	echo "$kdir" >"$stamp"
fi
# shellcheck disable=SC2046
make -C "$kdir" M="$VMBEAM_ROOT" $(kmake_flags) -j"$(nproc)" "$@"
