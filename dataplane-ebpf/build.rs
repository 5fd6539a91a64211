//! Rebuild the object when the linker changes: bpf-linker is not a cargo
//! dependency, so cargo would not notice on its own.
use std::{env, path::PathBuf};

fn main() {
    let path = env::var_os("PATH").unwrap_or_default();
    for dir in env::split_paths(&path) {
        let linker: PathBuf = dir.join("bpf-linker");
        if linker.exists() {
            println!("cargo:rerun-if-changed={}", linker.display());
            break;
        }
    }
}
