//! `src/kernel_params.rs` is bindgen's output for `kernels/params.h`,
//! committed so that building the crate needs no libclang. This test (the
//! only thing that needs libclang) regenerates it and fails when the
//! committed file is stale; `PLATYPUS_UPDATE_BINDINGS=1` rewrites it.

use std::path::Path;

#[test]
fn committed_bindings_match_params_h() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = root.join("kernels/params.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_str().unwrap())
        .allowlist_type(".*Params|PlatypusEmuLaunch")
        .allowlist_var("PLATYPUS_EMU_.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .use_core()
        .generate()
        .expect("bindgen could not read kernels/params.h (it needs libclang: apt-get install libclang1-14)");
    let mut fresh = Vec::new();
    bindings.write(Box::new(&mut fresh)).unwrap();
    let committed_path = root.join("src/kernel_params.rs");
    let committed = std::fs::read(&committed_path).unwrap();
    if fresh == committed {
        return;
    }
    if std::env::var("PLATYPUS_UPDATE_BINDINGS").is_ok_and(|v| v == "1") {
        let tmp = root.join("src/.kernel_params.rs.tmp");
        std::fs::write(&tmp, &fresh).unwrap();
        std::fs::rename(&tmp, &committed_path).unwrap();
        return;
    }
    panic!(
        "src/kernel_params.rs is not bindgen's output for kernels/params.h: \
         rerun with PLATYPUS_UPDATE_BINDINGS=1 to regenerate it"
    );
}
