//! `extproxy inspect`: what the kernel maps hold, joined with the names the agent published.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use proxy_common::{user::*, *};
use serde::Serialize;

use crate::{
    host::join_addrs,
    maps::{DatapathMaps, MapsError},
    state::{self, AgentState},
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub agent: Option<AgentState>,
    pub config: ConfigView,
    pub services: Vec<ServiceView>,
    pub frontends: Vec<FrontendView>,
    pub conntrack: Vec<FlowView>,
    pub drops: BTreeMap<String, u64>,
    pub events: BTreeMap<String, u64>,
    pub fill: Vec<FillView>,
    /// SNAT ports per egress address and destination: in use by open flows, held by closed ones.
    pub snat: Vec<SnatView>,
    /// DNS names of FQDN endpoints, as the agent last published them.
    pub dns: Option<crate::dns::report::DnsState>,
    /// Cluster egress addresses: who owns each (the data path's view, with the agent's names).
    pub cluster_egress: Vec<ClusterEgressView>,
    /// Nodes whose tunnelled flows this node serves when it owns a cluster egress address.
    pub tunnel_peers: Vec<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct ClusterEgressView {
    pub address: IpAddr,
    /// The owner's node address as the data path has it (None: nobody; new flows are refused).
    pub owner_address: Option<IpAddr>,
    /// The data path serves the address's flows itself.
    pub local: bool,
    /// The owner's node name (Kubernetes mode: the Lease holder), from the agent.
    pub owner: Option<String>,
    /// owner, fenced, follower (the agent's view of this node's part).
    pub role: Option<String>,
    pub lease: Option<String>,
    /// The uplink the address is on, when this node owns it.
    pub interface: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SnatView {
    pub egress: IpAddr,
    pub destination: String,
    pub protocol: &'static str,
    pub in_use: usize,
    /// Closed flows' ports the endpoint may still hold in TIME_WAIT (see DESIGN.md, "SNAT ports").
    pub held: usize,
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub abi_version: u32,
    pub snat_ports: String,
    pub timeouts: BTreeMap<&'static str, u32>,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub name: String,
    pub egress: Option<IpAddr>,
    /// With an egress pool: all its addresses, `egress` first (empty: one address).
    pub egress_pool: Vec<IpAddr>,
    pub affinity_timeout: u32,
    pub endpoints: Vec<EndpointView>,
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub backend_id: u32,
    pub address: String,
    pub state: &'static str,
    pub generation: u32,
    /// Health checking's verdict and why ("unhealthy: refused"), when the agent published one.
    pub health: Option<String>,
    /// New flows the endpoint answered and failed (passive health, from the data path).
    pub answered: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize)]
pub struct FrontendView {
    pub address: String,
    pub protocol: &'static str,
    pub kind: &'static str,
    pub service_id: u32,
    pub service: String,
    pub source_ranges: bool,
}

#[derive(Debug, Serialize)]
pub struct FlowView {
    pub protocol: &'static str,
    pub client: String,
    pub frontend: String,
    pub endpoint: String,
    pub snat: String,
    pub service: String,
    pub state: String,
    pub age_secs: u32,
    pub idle_secs: u32,
    pub expires_in_secs: i64,
}

#[derive(Debug, Serialize)]
pub struct FillView {
    pub map: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

fn sock(addr: &Addr, port_net: u16) -> String {
    match addr.to_ip() {
        IpAddr::V4(a) => format!("{a}:{}", port_host(port_net)),
        IpAddr::V6(a) => format!("[{a}]:{}", port_host(port_net)),
    }
}

fn backend_state(s: u8) -> &'static str {
    match s {
        x if x == BackendState::Active as u8 => "active",
        x if x == BackendState::Draining as u8 => "draining",
        _ => "free",
    }
}

fn flow_state(proto: u8, flags: u8) -> String {
    let mut parts = Vec::new();
    if proto == PROTO_TCP {
        if flags & CT_F_RST != 0 {
            parts.push("reset");
        } else if flags & (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN)
            == (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN)
        {
            parts.push("closed");
        } else if flags & (CT_F_CLIENT_FIN | CT_F_BACKEND_FIN) != 0 {
            parts.push("closing");
        } else if flags & CT_F_SEEN_REPLY != 0 {
            parts.push("established");
        } else {
            parts.push("syn-sent");
        }
    } else {
        parts.push(if flags & CT_F_SEEN_REPLY != 0 {
            "replied"
        } else {
            "unreplied"
        });
    }
    parts.join(",")
}

pub fn collect(pin_dir: &Path, state_dir: &Path) -> Result<Report, MapsError> {
    let maps = DatapathMaps::from_pinned(pin_dir)?;
    let agent = state::read(state_dir).ok();
    let names: BTreeMap<u32, String> = agent
        .iter()
        .flat_map(|a| a.services.iter().map(|s| (s.id, s.display())))
        .collect();
    let name_of = |id: u32| {
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("service #{id}"))
    };
    let cfg = maps.config()?;
    let snap = maps.snapshot()?;

    // Health verdicts by (service port, endpoint), as the agent published them.
    let verdicts: BTreeMap<(String, String), String> = agent
        .iter()
        .flat_map(|a| &a.health)
        .map(|h| {
            let port = if h.port_name.is_empty() {
                "-"
            } else {
                &h.port_name
            };
            let service = format!(
                "{}/{}:{port}/{}/{}",
                h.namespace, h.name, h.protocol, h.family
            );
            let verdict = if h.healthy { "healthy" } else { "unhealthy" };
            let text = match &h.cause {
                Some(cause) => format!("{verdict}: {cause}"),
                None => verdict.to_owned(),
            };
            ((service, h.endpoint.clone()), text)
        })
        .collect();
    let mut endpoints: BTreeMap<u32, Vec<EndpointView>> = BTreeMap::new();
    for (id, b) in &snap.backends {
        if b.state == BackendState::Free as u8 {
            continue;
        }
        let address = sock(&b.addr, b.port);
        let passive = maps.health_counters().get(*id).unwrap_or_default();
        endpoints
            .entry(b.service_id)
            .or_default()
            .push(EndpointView {
                backend_id: *id,
                health: verdicts
                    .get(&(name_of(b.service_id), address.clone()))
                    .cloned(),
                address,
                state: backend_state(b.state),
                generation: b.generation,
                answered: passive.answered,
                failed: passive.failed,
            });
    }
    let ids: Vec<u32> = snap.services.iter().map(|(id, _)| *id).collect();
    let stats: BTreeMap<u32, ServiceStats> = maps.service_stats(&ids)?.into_iter().collect();
    let pools: BTreeMap<u32, EgressPool> = maps.egress_pools()?.into_iter().collect();
    let services = snap
        .services
        .iter()
        .map(|(id, v)| {
            let s = stats.get(id).copied().unwrap_or_default();
            ServiceView {
                id: *id,
                name: name_of(*id),
                egress: (!v.egress.is_zero()).then(|| v.egress.to_ip()),
                egress_pool: pools
                    .get(id)
                    .filter(|_| v.flags & SVC_F_EGRESS_POOL != 0)
                    .map(|p| {
                        let n = (p.count as usize).min(p.addrs.len());
                        p.addrs[..n].iter().map(Addr::to_ip).collect()
                    })
                    .unwrap_or_default(),
                affinity_timeout: v.affinity_timeout,
                endpoints: endpoints.remove(id).unwrap_or_default(),
                fwd_packets: s.fwd_packets,
                fwd_bytes: s.fwd_bytes,
                rev_packets: s.rev_packets,
                rev_bytes: s.rev_bytes,
            }
        })
        .collect();
    let mut frontends: Vec<FrontendView> = snap
        .frontends
        .iter()
        .map(|(k, v)| FrontendView {
            address: sock(&k.addr, k.port),
            protocol: proto_name(k.proto),
            kind: FrontendKind::from_u8(v.kind).map_or("?", FrontendKind::name),
            service_id: v.service_id,
            service: name_of(v.service_id),
            source_ranges: v.flags & FE_F_SOURCE_RANGES != 0,
        })
        .collect();
    frontends.sort_by(|a, b| (a.service_id, &a.address).cmp(&(b.service_id, &b.address)));

    let now = crate::host::datapath_secs();
    let ct = maps.conntrack()?;
    let conntrack = ct
        .iter()
        .map(|(k, v)| FlowView {
            protocol: proto_name(k.proto),
            client: sock(&k.src, k.sport),
            frontend: sock(&k.dst, k.dport),
            endpoint: sock(&v.backend, v.backend_port),
            snat: sock(&v.snat, v.snat_port),
            service: name_of(v.service_id),
            state: flow_state(k.proto, v.flags),
            age_secs: now.wrapping_sub(v.created),
            idle_secs: now.wrapping_sub(v.last_seen),
            expires_in_secs: cfg.ct_timeout(k.proto, v.flags) as i64
                - now.wrapping_sub(v.last_seen) as i64,
        })
        .collect();

    let mut drops = BTreeMap::new();
    let mut events = BTreeMap::new();
    for (c, n) in maps.counters()? {
        let target = if c.is_drop() { &mut drops } else { &mut events };
        target.insert(c.name().to_owned(), n);
    }
    let revnat_entries = maps.reverse_nat()?;
    let revnat = revnat_entries.len();
    let mut snat_counts: BTreeMap<(IpAddr, String, u8), (usize, usize)> = BTreeMap::new();
    for (k, v) in &revnat_entries {
        let c = snat_counts
            .entry((k.snat.to_ip(), sock(&k.backend, k.backend_port), k.proto))
            .or_default();
        if v.is_closed() {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
    }
    let snat = snat_counts
        .into_iter()
        .map(|((egress, destination, proto), (in_use, held))| SnatView {
            egress,
            destination,
            protocol: proto_name(proto),
            in_use,
            held,
        })
        .collect();
    let egress_state = crate::egress::read_state(state_dir).ok();
    let mut cluster_egress: Vec<ClusterEgressView> = maps
        .cluster_egress()?
        .into_iter()
        .map(|(addr, ce)| {
            let address = addr.to_ip();
            let named = egress_state
                .as_ref()
                .and_then(|s| s.addresses.iter().find(|a| a.address == address));
            ClusterEgressView {
                address,
                owner_address: (!ce.owner.is_zero()).then(|| ce.owner.to_ip()),
                local: ce.flags & CE_F_LOCAL != 0,
                owner: named.and_then(|n| n.owner.clone()),
                role: named.map(|n| n.role.clone()),
                lease: named.and_then(|n| n.lease.clone()),
                interface: named.and_then(|n| n.interface.clone()),
            }
        })
        .collect();
    cluster_egress.sort_by_key(|c| c.address);
    let mut tunnel_peers: Vec<IpAddr> = maps.tunnel_peers()?.iter().map(Addr::to_ip).collect();
    tunnel_peers.sort();
    let (ct_established, ct_new) = maps.conntrack_counts();
    let live_backends = snap
        .backends
        .iter()
        .filter(|(_, b)| b.state != BackendState::Free as u8)
        .count();
    let fill = [
        (MAP_CT, ct_established),
        (MAP_CT_NEW, ct_new),
        (MAP_REVNAT, revnat),
        (MAP_SERVICES, snap.services.len()),
        (MAP_FRONTENDS, snap.frontends.len()),
        (MAP_BACKENDS, live_backends),
    ]
    .into_iter()
    .map(|(map, entries)| FillView {
        map,
        entries,
        max_entries: maps.max_entries(map),
    })
    .collect();
    Ok(Report {
        dns: crate::dns::report::read(state_dir).filter(|d| !d.names.is_empty()),
        agent,
        config: ConfigView {
            abi_version: cfg.abi_version,
            snat_ports: cfg
                .snat_ranges
                .iter()
                .filter(|r| !r.is_empty())
                .map(|r| format!("{}-{}", r.min, r.max))
                .collect::<Vec<_>>()
                .join(","),
            timeouts: BTreeMap::from([
                ("tcp_syn", cfg.tcp_syn_timeout),
                ("tcp_established", cfg.tcp_established_timeout),
                ("tcp_closing", cfg.tcp_closing_timeout),
                ("udp", cfg.udp_timeout),
                ("udp_stream", cfg.udp_stream_timeout),
            ]),
        },
        services,
        frontends,
        conntrack,
        drops,
        events,
        fill,
        snat,
        cluster_egress,
        tunnel_peers,
    })
}

/// Columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  ").trim_end());
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if let Some(a) = &report.agent {
        let _ = writeln!(
            out,
            "agent pid {} ({}) on {}; egress {}; NodePort addresses {}",
            a.pid,
            a.source,
            a.interfaces.join(","),
            join_addrs(&a.egress, ",", "-"),
            join_addrs(&a.node_addresses, ",", "-")
        );
    } else {
        let _ = writeln!(
            out,
            "no agent state file: names unknown (is extproxy running?)"
        );
    }
    let _ = writeln!(
        out,
        "SNAT ports {}, ABI {}\n\nSERVICES",
        report.config.snat_ports, report.config.abi_version
    );
    let rows: Vec<Vec<String>> = report
        .services
        .iter()
        .map(|s| {
            let active = s.endpoints.iter().filter(|e| e.state == "active").count();
            let eps: Vec<String> = s
                .endpoints
                .iter()
                .map(|e| {
                    if e.state == "active" {
                        e.address.clone()
                    } else if e
                        .health
                        .as_deref()
                        .is_some_and(|h| h.starts_with("unhealthy"))
                    {
                        format!("{} (unhealthy)", e.address)
                    } else {
                        format!("{} ({})", e.address, e.state)
                    }
                })
                .collect();
            vec![
                s.id.to_string(),
                s.name.clone(),
                if s.egress_pool.is_empty() {
                    s.egress.map_or("NONE (rejects)".into(), |e| e.to_string())
                } else {
                    join_addrs(&s.egress_pool, ",", "-")
                },
                if active == 0 {
                    "none (rejects)".into()
                } else {
                    eps.join(" ")
                },
                if s.affinity_timeout == 0 {
                    "-".into()
                } else {
                    format!("ClientIP {}s", s.affinity_timeout)
                },
                format!("{}/{}", s.fwd_packets, s.fwd_bytes),
                format!("{}/{}", s.rev_packets, s.rev_bytes),
            ]
        })
        .collect();
    out += &table(
        &[
            "ID",
            "SERVICE",
            "EGRESS",
            "ENDPOINTS",
            "AFFINITY",
            "PKTS/BYTES OUT",
            "PKTS/BYTES BACK",
        ],
        &rows,
    );
    let _ = writeln!(out, "\nFRONTENDS");
    let rows: Vec<Vec<String>> = report
        .frontends
        .iter()
        .map(|f| {
            vec![
                format!("{}/{}", f.address, f.protocol),
                f.kind.to_owned(),
                f.service.clone(),
                if f.source_ranges {
                    "source ranges".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    out += &table(&["FRONTEND", "KIND", "SERVICE", ""], &rows);
    if let Some(dns) = &report.dns {
        let _ = writeln!(out, "\nDNS NAMES ({})", dns.title());
        out += &table(
            &["NAME", "TYPE", "STATE", "TTL", "NEXT", "ADDRESSES"],
            &dns.rows(),
        );
    }
    let _ = writeln!(out, "\nENDPOINT HEALTH");
    let rows: Vec<Vec<String>> = report
        .services
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(|e| {
                vec![
                    s.name.clone(),
                    e.address.clone(),
                    e.health.clone().unwrap_or_else(|| "-".into()),
                    format!("{}/{}", e.answered, e.failed),
                ]
            })
        })
        .collect();
    out += &table(
        &["SERVICE", "ENDPOINT", "HEALTH", "NEW FLOWS ANSWERED/FAILED"],
        &rows,
    );
    let _ = writeln!(out, "\nCONNTRACK ({} flows)", report.conntrack.len());
    let rows: Vec<Vec<String>> = report
        .conntrack
        .iter()
        .map(|c| {
            vec![
                c.protocol.to_owned(),
                c.client.clone(),
                c.frontend.clone(),
                c.snat.clone(),
                c.endpoint.clone(),
                c.state.clone(),
                format!("{}s", c.age_secs),
                format!("{}s", c.expires_in_secs.max(0)),
            ]
        })
        .collect();
    out += &table(
        &[
            "PROTO", "CLIENT", "FRONTEND", "SNAT", "ENDPOINT", "STATE", "AGE", "EXPIRES",
        ],
        &rows,
    );
    let counts = |counts: &BTreeMap<String, u64>, keep_zero: bool| -> Vec<Vec<String>> {
        counts
            .iter()
            .filter(|(_, v)| keep_zero || **v > 0)
            .map(|(k, v)| vec![k.clone(), v.to_string()])
            .collect()
    };
    if !report.snat.is_empty() {
        let _ = writeln!(out, "\nSNAT PORTS");
        let rows: Vec<Vec<String>> = report
            .snat
            .iter()
            .map(|s| {
                vec![
                    s.egress.to_string(),
                    format!("{} {}", s.destination, s.protocol),
                    s.in_use.to_string(),
                    s.held.to_string(),
                ]
            })
            .collect();
        out += &table(&["EGRESS", "DESTINATION", "IN USE", "HELD"], &rows);
    }
    if !report.cluster_egress.is_empty() {
        let _ = writeln!(out, "\nCLUSTER EGRESS");
        let rows: Vec<Vec<String>> = report
            .cluster_egress
            .iter()
            .map(|c| {
                let owner = match (&c.owner, c.owner_address) {
                    (Some(n), Some(a)) if n != &a.to_string() => format!("{n} ({a})"),
                    (_, Some(a)) => a.to_string(),
                    (Some(n), None) => format!("{n} (address unknown: refused)"),
                    (None, None) => "nobody (refused)".to_owned(),
                };
                let here = match (c.local, c.role.as_deref()) {
                    (true, Some("fenced")) => "fenced (off the uplink)".to_owned(),
                    (true, _) => format!(
                        "this node{}",
                        c.interface
                            .as_ref()
                            .map_or(String::new(), |i| format!(", on {i}"))
                    ),
                    (false, _) => "tunnelled".to_owned(),
                };
                vec![
                    c.address.to_string(),
                    owner,
                    here,
                    c.lease.clone().unwrap_or_else(|| "-".to_owned()),
                ]
            })
            .collect();
        out += &table(&["ADDRESS", "OWNER", "HERE", "LEASE"], &rows);
        let _ = writeln!(
            out,
            "  tunnel peers: {}",
            if report.tunnel_peers.len() > 8 {
                format!("{} nodes", report.tunnel_peers.len())
            } else {
                join_addrs(&report.tunnel_peers, ", ", "none")
            }
        );
    }
    let _ = writeln!(out, "\nDROPS");
    out += &table(&["REASON", "PACKETS"], &counts(&report.drops, true));
    let _ = writeln!(out, "\nEVENTS");
    out += &table(&["EVENT", "COUNT"], &counts(&report.events, false));
    let _ = writeln!(out, "\nMAP FILL");
    let rows: Vec<Vec<String>> = report
        .fill
        .iter()
        .map(|f| {
            vec![
                f.map.to_owned(),
                format!("{} / {}", f.entries, f.max_entries),
            ]
        })
        .collect();
    out += &table(&["MAP", "ENTRIES"], &rows);
    if let Some(a) = &report.agent
        && !a.diagnostics.is_empty()
    {
        let _ = writeln!(out, "\nDIAGNOSTICS");
        for d in &a.diagnostics {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}
