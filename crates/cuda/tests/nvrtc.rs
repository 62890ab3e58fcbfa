//! The kernels compile with NVRTC (no GPU needed). These tests fail, rather than skip, when
//! NVRTC is missing: set `EFFNET_NVRTC_DIR` (see `effnet_cuda::NVRTC_HELP`).

use effnet_cuda::{
    compile, compile_all, compile_cubin, ensure_nvrtc, kernel_names, nvrtc_version, twin_tag, units,
};

/// Fails with directions when NVRTC cannot be had from `EFFNET_NVRTC_DIR`.
fn require_nvrtc() {
    if std::env::var_os(effnet_cuda::NVRTC_DIR_ENV).is_none() {
        panic!(
            "{} is not set: these tests need NVRTC.\n{}",
            effnet_cuda::NVRTC_DIR_ENV,
            effnet_cuda::NVRTC_HELP
        );
    }
    if let Err(e) = ensure_nvrtc() {
        panic!("{e}");
    }
}

#[test]
fn every_kernel_compiles_to_a_ptx_entry() {
    require_nvrtc();
    let (major, minor) = nvrtc_version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let compiled = compile_all().unwrap_or_else(|e| panic!("{e}"));
    let units = units();
    assert_eq!(compiled.len(), units.len());
    let mut kernels = 0;
    for ((file, ptx), (name, source)) in compiled.iter().zip(&units) {
        assert_eq!(file, name);
        let names = kernel_names(source);
        assert!(!names.is_empty(), "{file} declares no kernels");
        for kernel in &names {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "{file}: no .entry for {kernel} in the PTX"
            );
        }
        // Nothing else is exported: every entry point was parsed from a declaration.
        assert_eq!(
            ptx.matches(".entry ").count(),
            names.len(),
            "{file}: entries {names:?}"
        );
        kernels += names.len();
    }
    eprintln!("{kernels} kernels in {} sources", compiled.len());
}

#[test]
fn a_syntax_error_fails_with_nvrtcs_message_and_line() {
    require_nvrtc();
    let source = "extern \"C\" __global__ void broken(float* x) {\n\
                  \x20   float v = x[0];\n\
                  \x20   x[0] = v +;\n\
                  }\n";
    let err = compile("broken.cu", source).expect_err("a syntax error must not compile");
    assert!(err.contains("broken.cu(3)"), "{err}");
    assert!(err.contains("error"), "{err}");
}

/// What the device loads: machine code for its exact chip (an ELF image), here for Hopper.
#[test]
fn every_source_compiles_to_a_cubin_for_hopper() {
    require_nvrtc();
    for (name, source) in &units() {
        let cubin = compile_cubin(name, source, (9, 0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: not an ELF image");
        // Every kernel's name is in the image's symbol table.
        for kernel in kernel_names(source) {
            let found = cubin.windows(kernel.len()).any(|w| w == kernel.as_bytes());
            assert!(found, "{name}: {kernel} missing from the CUBIN");
        }
    }
    let err = compile_cubin(
        "broken.cu",
        "extern \"C\" __global__ void f() { x; }",
        (9, 0),
    )
    .expect_err("an undeclared name must not compile");
    assert!(
        err.contains("broken.cu(1)") && err.contains("sm_90"),
        "{err}"
    );
}

/// Volta (V100, compute capability 7.0) runs f32 and f16 mixed precision: every unit but the
/// bf16 twins (bf16 conversions need 8.0) compiles for it.
#[test]
fn all_but_the_bf16_twins_compile_for_volta() {
    require_nvrtc();
    for (name, source) in units().iter().filter(|(n, _)| twin_tag(n) != Some("bf16")) {
        let cubin = compile_cubin(name, source, (7, 0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: not an ELF image");
    }
}
