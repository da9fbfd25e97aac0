#!/usr/bin/env bash
# Builds the vmbeam test kernel (Debian linux-source-6.12 + CONFIG_RUST) into
# the cache, keyed by package versions + config fragments: a second run with
# nothing changed returns at once. Prints the build directory on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

dir=$(kernel_dir)
mkdir -p "$(dirname "$dir")"
# One build per tree at a time: a second make (or a helper) waits for the
# first instead of deleting its half-built tree.
exec 9>"$dir.lock"
flock 9
if [ -f "$dir/.vmbeam-built" ]; then
	echo "$dir"
	exit 0
fi

log "building test kernel ($KCONFIG) in $dir"
rm -rf "$dir" "$dir.tmp"
mkdir -p "$dir.tmp"
tar -C "$dir.tmp" --strip-components=1 -xf /usr/src/linux-source-6.12.tar.xz
cd "$dir.tmp"

# shellcheck disable=SC2046
make $(kmake_flags) rustavailable >/dev/null
# shellcheck disable=SC2046
make $(kmake_flags) tinyconfig >/dev/null
mapfile -t fragments < <(kconfig_fragments)
scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null
# shellcheck disable=SC2046
make $(kmake_flags) olddefconfig >/dev/null

# Kconfig drops what it cannot satisfy without a word: check every request.
dropped=0
for f in "${fragments[@]}"; do
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*) want=$line ;;
		"# CONFIG_"*" is not set") want=$line ;;
		*) continue ;;
		esac
		opt=${want#\# }; opt=${opt%%[= ]*}
		if [[ $want == \#* ]]; then
			! grep -q "^$opt=" .config || { echo "dropped: $want" >&2; dropped=1; }
		else
			grep -qx "$want" .config || { echo "dropped: $want (have: $(grep "^$opt=\|^# $opt " .config))" >&2; dropped=1; }
		fi
	done <"$f"
done
((dropped == 0)) || die "kernel config lost options above"

start=$SECONDS
# shellcheck disable=SC2046
make $(kmake_flags) -j"$(nproc)" bzImage modules >build.log 2>&1 ||
	{ tail -40 build.log >&2; die "kernel build failed (log: $dir.tmp/build.log)"; }
log "kernel built in $((SECONDS - start)) s"

touch .vmbeam-built
cd /
mv "$dir.tmp" "$dir"
echo "$dir"
