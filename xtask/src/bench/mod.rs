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
//! * [`health`]: endpoints failing and recovering under health checks (issue 11).
//!
//! Parts of the model (some variants, the cleanup rules, [`netns`]) only serve the tests,
//! among them the root-only checks in `validate`, hence the allowance below.
#![allow(dead_code)]

pub mod cpu;
pub mod health;
pub mod iptables;
pub mod kubeproxy;
pub mod netns;
pub mod nftables;
pub mod sha256;
pub mod traffic;
#[cfg(test)]
mod validate;

/// Services shared by the rule generators' tests and the root-only checks in [`validate`].
#[cfg(test)]
mod testdata {
    use std::net::Ipv4Addr;
    use std::ops::RangeInclusive;
    use std::time::Instant;

    use super::kubeproxy::{BenchService, NodeConfig, Protocol, SyntheticSpec, synthetic_services};

    /// `bench/api:https` at 10.96.0.10:443 with endpoints 203.0.113.11-14:8443, listed out of
    /// order.
    pub fn four_endpoint_service() -> BenchService {
        BenchService {
            namespace: "bench".into(),
            name: "api".into(),
            port_name: "https".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 443,
            node_port: None,
            endpoints: vec![
                (Ipv4Addr::new(203, 0, 113, 14), 8443),
                (Ipv4Addr::new(203, 0, 113, 11), 8443),
                (Ipv4Addr::new(203, 0, 113, 13), 8443),
                (Ipv4Addr::new(203, 0, 113, 12), 8443),
            ],
        }
    }

    /// `count` Services `bench/svc-NNNNNN:https` from 10.96.0.10:443, four endpoints each taken
    /// in turn from 203.0.113.`pool`:8443, with NodePorts from `first_node_port` if given.
    pub fn https_services(
        count: usize,
        pool: RangeInclusive<u8>,
        first_node_port: Option<u16>,
    ) -> Vec<BenchService> {
        synthetic_services(&SyntheticSpec {
            count,
            namespace: "bench".into(),
            first_cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 443,
            port_name: "https".into(),
            protocol: Protocol::Tcp,
            endpoints_per_service: 4,
            endpoint_pool: pool
                .map(|i| (Ipv4Addr::new(203, 0, 113, i), 8443))
                .collect(),
            first_node_port,
        })
    }

    /// A Service of kube-proxy's own proxier tests: port `p80` on 80, endpoints on port 80.
    pub fn upstream_service(
        ns: &str,
        name: &str,
        ip: [u8; 4],
        node_port: Option<u16>,
        eps: &[[u8; 4]],
    ) -> BenchService {
        BenchService {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::from(ip),
            port: 80,
            node_port,
            endpoints: eps.iter().map(|e| (Ipv4Addr::from(*e), 80)).collect(),
        }
    }

    /// 10k Services (4 of 64 endpoints each) must generate well under a second (release build):
    /// `generate` is timed and must write `per_endpoint` once per endpoint.
    pub fn assert_10k_generation_fast(
        what: &str,
        generate: fn(&[BenchService], &NodeConfig) -> String,
        per_endpoint: &str,
    ) {
        let services = https_services(10_000, 1..=64, None);
        let node = NodeConfig::new(Ipv4Addr::new(192, 168, 0, 2));
        let t = Instant::now();
        let out = generate(&services, &node);
        let dt = t.elapsed();
        assert_eq!(out.matches(per_endpoint).count(), 40_000);
        // Release builds take ~0.1 s; unoptimised test builds (the default
        // `cargo test`) are ~5x slower, more on a loaded machine, so there we
        // only guard against accidental super-linear behaviour.
        let limit = if cfg!(debug_assertions) { 5.0 } else { 1.0 };
        println!("10k {what} generation: {dt:?}");
        assert!(
            dt.as_secs_f64() < limit,
            "10k {what} generation took {dt:?}"
        );
    }
}
