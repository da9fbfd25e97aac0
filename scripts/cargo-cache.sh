#!/usr/bin/env bash
# The compiled crates.io dependencies of the workspace, kept between clones
# (CI builds every commit in a fresh clone: ~55 s of its ~135 s of cargo
# were the same dependencies compiled again, for clippy and for the build).
#
#   cargo-cache.sh restore   a clone without target/: seed it from the cache
#   cargo-cache.sh save      after a build: keep its dependencies, once per key
#
# Only a head start: cargo's own fingerprints still decide what is rebuilt,
# so a stale or foreign cache costs a rebuild, never a wrong binary. The
# workspace's own crates are cleaned out of what is kept (their artifacts
# are named after the clone's path, so no other clone could reuse them).
# Kept under $VMBEAM_CACHE/cargo-target-<key>, the key covering the
# toolchain, Cargo.lock and every Cargo.toml (profiles, features); the
# newest two are kept.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

target=$VMBEAM_ROOT/target
cargo_key() {
	{
		rustc -vV
		cargo -V
		cd "$VMBEAM_ROOT" && cat Cargo.lock $(git ls-files '*Cargo.toml' 2>/dev/null || find . -name Cargo.toml -not -path './target/*' | sort)
	} | sha256sum | cut -c1-16
}
cache=$VMBEAM_CACHE/cargo-target-$(cargo_key)

case ${1:-} in
restore)
	[ -e "$target" ] && exit 0
	from=$cache
	# Another key's dependencies (one crate bumped) still save most of it.
	[ -d "$from" ] || from=$(ls -dt "$VMBEAM_CACHE"/cargo-target-* 2>/dev/null | grep -v '\.tmp' | head -n1 || true)
	[ -n "$from" ] && [ -d "$from" ] || exit 0
	log "seeding target/ with the dependencies built in $from"
	cp -a "$from" "$target.tmp.$$" && mv -T "$target.tmp.$$" "$target" || rm -rf "$target.tmp.$$"
	;;
save)
	# Once per key, and only after a build.
	if [ -d "$cache" ] || [ ! -d "$target/debug" ]; then exit 0; fi
	mkdir -p "$VMBEAM_CACHE"
	tmp=$cache.tmp.$$
	trap 'rm -rf "$tmp"' EXIT
	cp -a "$target" "$tmp"
	# The workspace's crates out: what is left is crates.io's.
	members=$(cd "$VMBEAM_ROOT" && cargo metadata --format-version 1 --no-deps --offline |
		python3 -c 'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
	# shellcheck disable=SC2086
	(cd "$VMBEAM_ROOT" && cargo clean --quiet --offline --target-dir "$tmp" $members)
	rm -rf "$tmp/debug/incremental" "$tmp/l2"
	mv -T "$tmp" "$cache" 2>/dev/null || true
	# The newest two keys stay.
	ls -dt "$VMBEAM_CACHE"/cargo-target-* | grep -v '\.tmp\.' | tail -n +3 | xargs -r rm -rf
	;;
*) die "usage: $0 restore|save" ;;
esac
