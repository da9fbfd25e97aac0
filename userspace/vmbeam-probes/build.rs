//! Compiles `bpf/impact.bpf.c` (clang, BPF target) and generates its
//! libbpf-rs skeleton into OUT_DIR.

use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

fn main() {
    let bpf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bpf");
    let src = bpf.join("impact.bpf.c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("impact.skel.rs");
    SkeletonBuilder::new()
        .source(&src)
        .clang_args([format!("-I{}", bpf.display()), "-Wall".into(), "-Werror".into()])
        .build_and_generate(&out)
        .unwrap_or_else(|e| panic!("building {}: {e:#}", src.display()));
    for f in ["impact.bpf.c", "impact.h", "vmlinux.h"] {
        println!("cargo:rerun-if-changed={}", bpf.join(f).display());
    }
}
