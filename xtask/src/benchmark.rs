//! `cargo xtask bench`: extproxy against kube-proxy's iptables and nftables layouts.

pub fn main(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("benchmarks are not written yet")
}
