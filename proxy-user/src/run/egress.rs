//! Cluster egress's control plane started from the command line (`extproxy::egress`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use extproxy::egress::{
    ClusterEgress, KubeSetup, ManifestSetup, Setup,
    config::{ClusterEgressConfig, Timing},
};
use extproxy::metrics::Telemetry;
use ipnet::IpNet;

use crate::cli::{EgressArgs, RunArgs};

/// The declared addresses and who may use them, as the translation needs them.
pub fn config(args: &EgressArgs) -> anyhow::Result<ClusterEgressConfig> {
    Ok(ClusterEgressConfig::new(
        &args.cluster_egress_ips,
        &args.cluster_egress_defaults,
    )?)
}

/// The cluster egress flags, checked once at start, before the pins or the network are touched.
pub struct Parsed {
    pub config: ClusterEgressConfig,
    timing: Timing,
}

pub fn parse(args: &EgressArgs) -> anyhow::Result<Parsed> {
    Ok(Parsed {
        config: config(args)?,
        timing: Timing::new(
            args.cluster_egress_lease_duration,
            args.cluster_egress_renew_interval,
        )?,
    })
}

fn setup(args: &RunArgs, parsed: &Parsed, ifaces: &[String]) -> Setup {
    let e = &args.egress;
    Setup {
        config: parsed.config.clone(),
        timing: parsed.timing,
        fencing: e.cluster_egress_fencing,
        announce: e.cluster_egress_announce,
        uplinks: ifaces.to_vec(),
        pin_dir: args.datapath.pin_dir.clone(),
        state_dir: args.datapath.state_dir.clone(),
    }
}

/// Kubernetes mode: Leases in extproxy's namespace, candidates from the Node label.
pub fn start_kube(
    args: &RunArgs,
    parsed: &Parsed,
    ifaces: &[String],
    client: kube::Client,
    node_name: &str,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<Option<ClusterEgress>> {
    let e = &args.egress;
    if e.egress_gateway || !e.cluster_egress_owners.is_empty() || !e.tunnel_peers.is_empty() {
        bail!(
            "--egress-gateway, --cluster-egress-owner and --tunnel-peer are for manifest mode; in \
             Kubernetes mode label the gateway Nodes extproxy.io/egress-gateway=true, the Leases \
             elect the owners and every Node is a tunnel peer"
        );
    }
    let setup = setup(args, parsed, ifaces);
    Ok(ClusterEgress::start_kube(
        setup,
        KubeSetup {
            client,
            namespace: e.namespace.clone(),
            node_name: node_name.to_owned(),
            tunnel_ip: e.tunnel_ip,
        },
        telemetry.clone(),
    )?)
}

/// Manifest mode: owners and peers from flags.
pub fn start_manifest(
    args: &RunArgs,
    parsed: &Parsed,
    ifaces: &[String],
    iface_addrs: &[IpAddr],
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<Option<ClusterEgress>> {
    let setup = setup(args, parsed, ifaces);
    if setup.config.is_empty() {
        return Ok(None);
    }
    let e = &args.egress;
    let first_v4 = |addrs: &[IpAddr]| {
        addrs.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    };
    let tunnel_ip: Ipv4Addr = e
        .tunnel_ip
        .or_else(|| first_v4(&args.node.node_ips))
        .or_else(|| first_v4(iface_addrs))
        .context(
            "cluster egress needs this node's IPv4 address for the tunnel: pass --tunnel-ip or \
             give the uplink an IPv4 address",
        )?;
    let peers = expand_peers(&e.tunnel_peers)?;
    if peers.is_empty() {
        tracing::warn!(
            "cluster egress: no --tunnel-peer: when this node owns an address, flows tunnelled \
             from other nodes are dropped (tunnel_unknown_peer)"
        );
    }
    Ok(ClusterEgress::start_manifest(
        setup,
        ManifestSetup {
            gateway: e.egress_gateway,
            owners: e.cluster_egress_owners.clone(),
            peers,
            tunnel_ip,
        },
        telemetry.clone(),
    )?)
}

/// The peer addresses of `--tunnel-peer` (IPv4: the tunnel runs between IPv4 node addresses).
fn expand_peers(nets: &[IpNet]) -> anyhow::Result<BTreeSet<IpAddr>> {
    let max = proxy_common::DEFAULT_MAX_TUNNEL_PEERS as usize;
    let mut peers = BTreeSet::new();
    for net in nets {
        let IpNet::V4(v4) = net else {
            bail!("--tunnel-peer {net}: the tunnel runs between the nodes' IPv4 addresses");
        };
        // Without the network and broadcast addresses, but for /31 and /32.
        for h in v4.hosts() {
            peers.insert(IpAddr::V4(h));
            if peers.len() > max {
                bail!("--tunnel-peer: more than {max} addresses (the data path's table)");
            }
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_peers_expand_to_ipv4_hosts() {
        let nets: Vec<IpNet> = vec![
            "10.0.0.0/30".parse().unwrap(),
            IpNet::from("10.0.1.7".parse::<IpAddr>().unwrap()),
        ];
        let peers = expand_peers(&nets).unwrap();
        let want: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.1.7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(peers, want);
        assert!(expand_peers(&["fd00::/120".parse().unwrap()]).is_err());
        assert!(expand_peers(&["10.0.0.0/8".parse().unwrap()]).is_err());
    }
}
