//! Generates the uAPI types and ioctl numbers from the module's one header.

use std::{env, path::PathBuf};

/// Lets the CLI print uAPI structs as JSON without a hand-written mirror.
#[derive(Debug)]
struct SerializeStructs;

impl bindgen::callbacks::ParseCallbacks for SerializeStructs {
    fn add_derives(&self, info: &bindgen::callbacks::DeriveInfo<'_>) -> Vec<String> {
        match info.kind {
            bindgen::callbacks::TypeKind::Struct => vec!["serde::Serialize".into()],
            _ => vec![],
        }
    }
}

fn main() {
    let include = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../kmod/include");
    let input = include.join("vmbeam_bindgen.h");
    println!("cargo:rerun-if-changed={}", input.display());
    println!("cargo:rerun-if-changed={}", include.join("uapi/vmbeam.h").display());

    bindgen::Builder::default()
        .header(input.to_string_lossy())
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_type("vmbeam_.*")
        .allowlist_var("VMBEAM_.*")
        .constified_enum("vmbeam_ioctl")
        .prepend_enum_name(false)
        .derive_default(true)
        .parse_callbacks(Box::new(SerializeStructs))
        .generate()
        .expect("bindgen failed on kmod/include/uapi/vmbeam.h")
        .write_to_file(PathBuf::from(env::var("OUT_DIR").unwrap()).join("uapi.rs"))
        .expect("cannot write uapi.rs");
}
