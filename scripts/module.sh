#!/usr/bin/env bash
# Builds vmbeam.ko against the cached test kernel (make -C $KDIR M=$PWD).
# Extra arguments go to make (e.g. CLIPPY=1, clean).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kdir=$("$VMBEAM_ROOT/scripts/kernel.sh")
# shellcheck disable=SC2046
make -C "$kdir" M="$VMBEAM_ROOT" $(kmake_flags) -j"$(nproc)" "$@"
