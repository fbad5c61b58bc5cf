fn main() -> anyhow::Result<()> {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/extproxy"));
    let mut ebpf = aya::Ebpf::load(obj)?;
    for (name, _) in ebpf.programs_mut() { println!("{name}"); }
    Ok(())
}
