//! Baselines for `cargo xtask bench`: rule sets exactly as kube-proxy programs
//! them today, for the same selector-less Services extproxy handles.
//!
//! * [`kubeproxy`]: the Service/node model and kube-proxy's chain-name hashing.
//! * [`iptables`]: kube-proxy iptables mode (`iptables-restore` input plus the
//!   jump rules it installs with `iptables -I`).
//! * [`nftables`]: kube-proxy nftables mode (`nft -f` transaction creating
//!   `table ip kube-proxy`).
//! * [`netns`]: a network-namespace guard that cleans up on drop.
//! * [`traffic`]: the traffic measurements through every contender (see `TRAFFIC.md`);
//!   [`cpu`] tells whether something else took the CPU meanwhile.
//!
//! The benchmark driver is not written yet, hence the allowance below.
#![allow(dead_code)]

pub mod cpu;
pub mod iptables;
pub mod kubeproxy;
pub mod netns;
pub mod nftables;
mod sha256;
pub mod traffic;
#[cfg(test)]
mod validate;
