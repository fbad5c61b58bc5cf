/// Build inputs cargo cannot see, and codegen options for bpf-linker (which does the LLVM codegen).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // Headers sit at 2 mod 4 behind a 14-byte Ethernet header. Without this LLVM splits every u32
    // read of an address into four byte loads; the verifier accepts misaligned packet access on
    // architectures with efficient unaligned access (x86_64, arm64).
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    }
}
