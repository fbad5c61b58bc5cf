//! The data path's life: load and verify, attach to the uplinks and pods, detach on exit.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aya::Ebpf;
use extproxy::{
    agent::Agent,
    host,
    loader::{self, Attached, Limits, XdpAttach},
    maps::DatapathMaps,
    metrics::Telemetry,
    pins::{self, Pinned},
    podlinks::{LinkEvent, Patterns, PodLinks},
    reconcile::{self, Reconciler},
    refusals::EventStream,
    snat,
    state::AgentState,
    upgrade::FlowMigration,
};
use proxy_common::Config;

use crate::cli::{DatapathArgs, Toggle, XdpArg};

/// The loaded data path and the agent programming it, shared by both modes.
pub struct Running {
    ebpf: Ebpf,
    pub agent: Agent,
    attached: Vec<Attached>,
    pub pods: PodLinks,
}

impl Running {
    /// Attaches to the uplinks and, per `--pod-ifaces` (default `pod_default`), the pods'
    /// interfaces. Across an upgrade that replaced the flow tables, the previous agent's flows are
    /// copied into ours just before our programs take over and once more right after.
    pub fn attach(
        loaded: Loaded,
        agent: Agent,
        ifaces: &[String],
        dp: &DatapathArgs,
        pod_default: &str,
        telemetry: &Telemetry,
    ) -> anyhow::Result<Running> {
        let Loaded {
            mut ebpf,
            mut migration,
        } = loaded;
        if let Some(m) = &mut migration {
            m.copy(&dp.pin_dir, &agent.config())
                .context("copying the previous agent's flows")?;
        }
        let attached = attach_all(&mut ebpf, ifaces, dp)?;
        let pods = attach_pods(&mut ebpf, ifaces, dp, pod_default)?;
        if let Some(m) = migration {
            finish_migration(m, dp, &agent.config())?;
        }
        telemetry.set_pod_interfaces(pods.count());
        Ok(Running {
            ebpf,
            agent,
            attached,
            pods,
        })
    }

    pub fn pod_events(&mut self, events: Vec<LinkEvent>, telemetry: &Telemetry) {
        self.pods.handle(&mut self.ebpf, events);
        telemetry.set_pod_interfaces(self.pods.count());
    }
}

/// The data path's programs, being verified on other threads; the maps are usable meanwhile.
pub struct Verifying {
    thread: std::thread::JoinHandle<Result<Ebpf, loader::LoadError>>,
    started: Instant,
    migration: Option<FlowMigration>,
}

/// The verified data path, ready to attach.
pub struct Loaded {
    ebpf: Ebpf,
    /// The previous agent's flow tables, to copy from while our programs take over.
    migration: Option<FlowMigration>,
}

impl Verifying {
    /// The loaded object once every program is verified, and how long verifying took.
    pub fn wait(self) -> anyhow::Result<(Loaded, Duration)> {
        let ebpf = match self.thread.join() {
            Ok(result) => result.context("loading the data path")?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let loaded = Loaded {
            ebpf,
            migration: self.migration,
        };
        Ok((loaded, self.started.elapsed()))
    }
}

/// The last copy, once our programs forward: says what came over and what did not.
fn finish_migration(m: FlowMigration, dp: &DatapathArgs, clock: &Config) -> anyhow::Result<()> {
    let from = m.from_abi;
    let copied = m
        .finish(&dp.pin_dir, clock)
        .context("copying the previous agent's flows")?;
    tracing::info!(
        "upgrade from ABI {from}: {} tracked flow(s) and {} SNAT port(s) carried over",
        copied.flows,
        copied.ports
    );
    if copied.lost > 0 {
        tracing::warn!(
            "upgrade from ABI {from}: {} entries did not fit this version's tables (--ct-max): \
             those connections are lost",
            copied.lost
        );
    }
    Ok(())
}

/// Loads the data path (adopting compatible pinned maps) and builds the agent around it. The
/// kernel verifies the programs in the background: the maps can be programmed meanwhile, which
/// hides most of a cold start's verification time.
pub fn start(
    dp: &DatapathArgs,
    ifaces: &[String],
    state: AgentState,
    snat_ports: &[std::ops::RangeInclusive<u16>],
) -> anyhow::Result<(Verifying, Agent, EventStream)> {
    let limits = Limits {
        max_services: dp.max_services,
        max_frontends: dp.max_frontends,
        max_backends: dp.max_backends,
        max_slots: dp.max_backends,
        ct_max: dp.ct_max,
        ..Limits::default()
    };
    std::fs::create_dir_all(&dp.pin_dir)
        .with_context(|| format!("creating {}", dp.pin_dir.display()))?;
    let mut migration = None;
    let adopting = match pins::check(&dp.pin_dir, &limits) {
        Pinned::Absent => false,
        Pinned::Compatible => {
            tracing::info!(
                "adopting the maps pinned in {}: tracked flows continue",
                dp.pin_dir.display()
            );
            true
        }
        Pinned::Rebuild(maps) => {
            let why: Vec<&str> = maps.iter().map(|(_, why)| why.as_str()).collect();
            tracing::info!(
                "adopting the maps pinned in {}: tracked flows continue; creating anew the maps \
                 that hold no flow state and differ from this version ({})",
                dp.pin_dir.display(),
                why.join("; ")
            );
            pins::unpin(&dp.pin_dir, &maps)
                .with_context(|| format!("removing pins in {}", dp.pin_dir.display()))?;
            true
        }
        Pinned::Migrate {
            from_abi,
            rebuild,
            why,
        } => {
            tracing::info!(
                "upgrading the maps pinned in {} (ABI {from_abi}): tracked flows are copied into \
                 this version's flow tables, maps without flow state are created anew ({})",
                dp.pin_dir.display(),
                why.join("; ")
            );
            pins::unpin(&dp.pin_dir, &rebuild)
                .with_context(|| format!("removing pins in {}", dp.pin_dir.display()))?;
            migration = Some(
                FlowMigration::detach(&dp.pin_dir, from_abi)
                    .context("taking over the previous agent's flow tables")?,
            );
            true
        }
        Pinned::Incompatible(problems) => {
            let why = problems.join("; ");
            if !dp.replace_incompatible_pins {
                bail!(
                    "the maps pinned in {} do not match this agent ({why}). Adopting them could \
                     corrupt flows. Run `extproxy cleanup` (drops tracked connections) or start with \
                     --replace-incompatible-pins",
                    dp.pin_dir.display()
                );
            }
            tracing::warn!("replacing incompatible pinned maps ({why}); tracked flows are lost");
            pins::remove_all(&dp.pin_dir)?;
            std::fs::create_dir_all(&dp.pin_dir)?;
            false
        }
    };
    if adopting && migration.is_none() {
        migration = FlowMigration::interrupted(&dp.pin_dir);
        if let Some(m) = &migration {
            tracing::warn!(
                "an upgrade from ABI {} stopped before its flows were copied: copying them now",
                m.from_abi
            );
        }
    }
    let mut ebpf =
        loader::create_maps(&limits, Some(&dp.pin_dir)).context("loading the data path")?;
    let xdp_tx = match dp.xdp_tx {
        Toggle::On => true,
        Toggle::Off => false,
        Toggle::Auto => {
            // Only where XDP runs on a veth could XDP_TX stall.
            let veths: Vec<&String> = ifaces
                .iter()
                .filter(|i| is_veth(i) && xdp_attach(dp.xdp, true).0 != XdpAttach::Off)
                .collect();
            if !veths.is_empty() {
                tracing::info!(
                    "{} is a veth: XDP hands packets it would send back out to TC (--xdp-tx on \
                     overrides; then the veth's peer must run an XDP program)",
                    veths
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            veths.is_empty()
        }
    };
    let config = Config {
        tcp_established_timeout: dp.tcp_established_timeout,
        udp_stream_timeout: dp.udp_timeout,
        flags: if xdp_tx {
            proxy_common::CFG_F_XDP_TX
        } else {
            0
        },
        ..Config::DEFAULT
    }
    .with_snat_ranges(&snat::port_ranges(snat_ports));
    // The agent ages flows and held ports with the same clock factors the data path gets.
    let config = host::with_clock(&config);
    loader::write_config(&mut ebpf, &config)?;
    let maps = DatapathMaps::take_from(&mut ebpf)?;
    let events = ebpf
        .take_map(proxy_common::MAP_EVENTS)
        .context("the data path has no event ring")?;
    let events = EventStream::new(aya::maps::RingBuf::try_from(events)?)
        .context("reading the data path's events")?;
    let rlimits = reconcile::Limits {
        max_services: limits.max_services,
        max_backends: limits.max_backends,
    };
    let reconciler = if adopting {
        Reconciler::from_snapshot(maps.snapshot()?, rlimits)
    } else {
        Reconciler::new(rlimits)
    };
    let mut agent = Agent::new(maps, reconciler, config, dp.state_dir.clone(), state);
    agent.uplink_mtu = ifaces.first().map_or(1500, |i| host::mtu(i));
    let started = Instant::now();
    let thread = std::thread::Builder::new()
        .name("verifier".into())
        .spawn(move || loader::load_programs(&mut ebpf).map(|()| ebpf))
        .context("starting the program loader")?;
    let verifying = Verifying {
        thread,
        started,
        migration,
    };
    Ok((verifying, agent, events))
}

fn attach_all(
    ebpf: &mut Ebpf,
    ifaces: &[String],
    dp: &DatapathArgs,
) -> anyhow::Result<Vec<Attached>> {
    let mut attached = Vec::new();
    for iface in ifaces {
        let (xdp, why_off) = xdp_attach(dp.xdp, is_veth(iface));
        let a = loader::attach(ebpf, iface, xdp, Some(&dp.pin_dir))
            .with_context(|| format!("attaching to {iface}"))?;
        tracing::info!(
            "{} {iface}: XDP {}, TC ingress and egress",
            if a.adopted {
                "took over the programs on"
            } else {
                "attached to"
            },
            match a.xdp {
                Some(mode) => format!("{mode:?}").to_lowercase(),
                None => format!("off{why_off}"),
            }
        );
        attached.push(a);
    }
    Ok(attached)
}

fn is_veth(iface: &str) -> bool {
    host::driver(iface).as_deref() == Some("veth")
}

/// How XDP goes on an interface (`veth`: whether it is one), and why it is off when `auto` turns
/// it off. A veth's XDP receive
/// path copies every frame into a page of its own before the program runs (and the frames it
/// passes are rebuilt as skbs), which costs more than the program saves: TC ingress, which runs
/// the same code on the skb the kernel has anyway, is 10-35% faster there in new connections per
/// second (xtask/src/bench/TRAFFIC.md). Physical and virtio NICs keep XDP.
fn xdp_attach(arg: XdpArg, veth: bool) -> (XdpAttach, &'static str) {
    match arg {
        XdpArg::Auto if veth => (
            XdpAttach::Off,
            " (a veth: TC ingress is faster there; --xdp driver overrides)",
        ),
        XdpArg::Auto => (XdpAttach::Auto, ""),
        XdpArg::Driver => (XdpAttach::Driver, ""),
        XdpArg::Generic => (XdpAttach::Generic, ""),
        XdpArg::Off => (XdpAttach::Off, ""),
    }
}

/// Attaches the pod program per `--pod-ifaces` and starts following links as they come and go.
fn attach_pods(
    ebpf: &mut Ebpf,
    ifaces: &[String],
    dp: &DatapathArgs,
    default: &str,
) -> anyhow::Result<PodLinks> {
    let spec = dp.pod_ifaces.as_deref().unwrap_or(default);
    let patterns = if spec.trim() == "none" {
        Patterns::default()
    } else {
        Patterns::parse(spec)
    };
    if patterns.is_empty() {
        // A previous agent may have run with pod interfaces: its links must not linger.
        loader::prune_pod_pins(&dp.pin_dir, &|_| false);
        return Ok(PodLinks::disabled());
    }
    let pods = PodLinks::start(ebpf, patterns.clone(), ifaces, Some(&dp.pin_dir))
        .context("--pod-ifaces: watching network interfaces")?;
    let names = pods.names();
    tracing::info!(
        "pod interfaces ({patterns}): attached to {}{}",
        names.len(),
        if names.is_empty() || names.len() > 8 {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        }
    );
    Ok(pods)
}

/// Leaves everything for the next agent (`keep`) or detaches and removes the pins.
pub fn finish(running: Running, dp: &DatapathArgs, keep: bool) -> anyhow::Result<()> {
    if keep {
        // The pins keep links and maps alive after our file descriptors close.
        tracing::info!(
            "exiting; programs and maps stay in place for the next agent; `extproxy cleanup` \
             removes them"
        );
        return Ok(());
    }
    let Running {
        mut ebpf,
        agent,
        attached,
        pods,
    } = running;
    pods.detach_all(&mut ebpf);
    for a in attached {
        let iface = a.iface.clone();
        loader::detach(&mut ebpf, a).with_context(|| format!("detaching from {iface}"))?;
    }
    drop(agent);
    drop(ebpf);
    pins::remove_all(&dp.pin_dir)?;
    let _ = std::fs::remove_dir(&dp.pin_dir);
    let _ = std::fs::remove_file(extproxy::state::path(&dp.state_dir));
    tracing::info!("detached and cleaned up");
    Ok(())
}
