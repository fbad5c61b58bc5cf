//! The per-packet flow shared by all hooks: classify, look up, translate, choose the exit.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::*;

use crate::{
    conntrack::{
        Table, completes, ct_flags, ct_lookup, ct_lookup_new_first, delete_flow, hold_port,
        hold_port_of, is_reopen, now_secs, now_ticks, promote, touch,
    },
    ctx::{Ctx, Hook, ptr_at},
    fwd::{Route, remember, route, route_cached, route_new},
    hdr::{IcmpHdr, get},
    health,
    lb::{self, Chosen},
    maps::{
        BACKENDS, CLUSTER_EGRESS, CONFIG, CT_NEW, EVENT_LIMIT, EVENTS, FRAGS, REVNAT, SCRATCH,
        Scratch, TUNNEL_PEERS,
    },
    mem,
    nat::{
        AllocError, icmp_error_source, in_snat_range, set_macs, snat_alloc, xlate,
        xlate_icmp_error_reply,
    },
    parse::{
        Frag, PULL_LEN, Parsed, Pkt, TCP_ACK, TCP_RST, TCP_SYN, headers_linear, parse, parse_inner,
    },
    reject,
    stats::{count, count_service},
    tcpts, tunnel,
};

/// What to do with the packet; each hook maps it to its own return codes and helpers.
///
/// Packed into one register: BPF subprograms return through r0 only, and a larger enum would be
/// returned through a hidden pointer argument, which counts against the five-argument limit.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Action(u64);

pub enum Verdict {
    /// Hand to the kernel: untouched, or translated where the stack should deliver it.
    Pass,
    Drop,
    /// Out of the device it arrived on (XDP_TX; TC redirects to its own device).
    Tx,
    /// bpf_redirect to a device's egress (TC).
    Redirect(u32),
    /// bpf_redirect_neigh: the kernel resolves the next hop's address (TC).
    RedirectNeigh(u32),
    /// Back into the device's ingress (TC egress answering a local sender).
    RedirectIngress(u32),
    /// bpf_redirect to a pod's interface: a reply the pod program's flow gets (TC ingress).
    RedirectPod(u32),
}

impl Action {
    pub const PASS: Action = Action(0);
    pub const DROP: Action = Action(1);
    pub const TX: Action = Action(2);
    /// Internal: answer the packet (RST / ICMP unreachable). Never leaves `forward`.
    const REJECT: Action = Action(6);
    /// Internal: another CPU created the flow first; follow its conntrack entry.
    const RACED: Action = Action(7);
    /// Internal: neither a tracked flow nor a frontend (the filter's false positive).
    const NOT_OURS: Action = Action(8);
    /// Internal: a new flow is set up in `Scratch::ct`, its route in `Scratch::route`; translate
    /// and send it (outside `new_flow`, whose stack frame is at its deepest).
    const SEND: Action = Action(9);
    /// Internal: `new_flow` chose an endpoint and a route; `open_flow` goes on.
    const OPEN: Action = Action(10);
    /// Internal: the flow belongs to a cluster egress address another node owns
    /// (`Scratch::tunnel_to`): send it there through the tunnel.
    const TUNNEL: Action = Action(11);
    /// Internal: go on processing the packet (after the tunnel's headers came off).
    const CONTINUE: Action = Action(12);

    #[inline(always)]
    pub const fn redirect(ifindex: u32) -> Action {
        Action(3 | (ifindex as u64) << 32)
    }
    #[inline(always)]
    pub const fn redirect_neigh(ifindex: u32) -> Action {
        Action(4 | (ifindex as u64) << 32)
    }
    #[inline(always)]
    pub const fn redirect_ingress(ifindex: u32) -> Action {
        Action(5 | (ifindex as u64) << 32)
    }
    #[inline(always)]
    pub const fn redirect_pod(ifindex: u32) -> Action {
        Action(13 | (ifindex as u64) << 32)
    }

    #[inline(always)]
    pub fn verdict(self) -> Verdict {
        let ifindex = (self.0 >> 32) as u32;
        match self.0 as u32 {
            1 => Verdict::Drop,
            2 => Verdict::Tx,
            3 => Verdict::Redirect(ifindex),
            4 => Verdict::RedirectNeigh(ifindex),
            5 => Verdict::RedirectIngress(ifindex),
            13 => Verdict::RedirectPod(ifindex),
            _ => Verdict::Pass,
        }
    }
}

#[inline(always)]
fn drop(reason: Counter) -> Action {
    count(reason);
    Action::DROP
}

/// Flow-hash seed of the endpoint choice (the SNAT candidates have their own, `nat::SEED_SNAT`).
const SEED_SELECT: u32 = 0x5eed_0001;

#[inline(always)]
pub fn process<C: Ctx>(ctx: &C) -> Action {
    let Some(cfg) = CONFIG.get(0) else {
        return Action::PASS;
    };
    // Until the agent has written its configuration nothing is ours.
    if cfg.abi_version == 0 {
        return Action::PASS;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Action::PASS;
    };
    let s = unsafe { &mut *s };
    match parse_packet(ctx, &mut s.pkt) {
        Parsed::Pkt => {}
        Parsed::Other => return Action::PASS,
        Parsed::Unparsed => {
            count(Counter::UnparsedPassed);
            return Action::PASS;
        }
        Parsed::Malformed(why) => {
            count(why);
            return Action::PASS;
        }
    }
    mem::zero_addr(&mut s.tunnel_peer);
    if tunnel::is_tunnel(&s.pkt) {
        // Only TC can take the tunnel's headers off; XDP hands such packets on.
        if C::HOOK != Hook::TcIngress {
            return Action::PASS;
        }
        let action = from_tunnel(ctx, s);
        if action != Action::CONTINUE {
            return action;
        }
    }
    if s.pkt.icmp_error {
        // Errors about our flows come from the endpoint side, i.e. in through the uplink.
        if !C::HOOK.sees_replies() {
            return Action::PASS;
        }
        return icmp_error(ctx, cfg, s);
    }
    if s.pkt.frag == Frag::Later {
        s.frag_key = frag_key(&s.pkt);
        match unsafe { FRAGS.get(&s.frag_key) } {
            Some(ports) => {
                s.pkt.tuple.sport = ports.sport;
                s.pkt.tuple.dport = ports.dport;
            }
            None => {
                count(Counter::FragmentUntracked);
                return Action::PASS;
            }
        }
    }
    let pkt = &s.pkt;
    let frontend_at = if lb::maybe_frontend(&pkt.tuple.dst, pkt.tuple.dport, pkt.tuple.proto) {
        Some(pkt.tuple.dst)
    } else {
        peer_node_address(cfg, s)
    };
    if let Some(at) = frontend_at {
        let action = forward(ctx, cfg, s, &at);
        if action != Action::NOT_OURS {
            return action;
        }
    }
    let pkt = &s.pkt;
    // Replies arrive through the uplink; only ports we hand out can be ours.
    if C::HOOK.sees_replies() && in_snat_range(cfg, pkt.tuple.dport) {
        s.rn_key = RevNatKey {
            backend: pkt.tuple.src,
            snat: pkt.tuple.dst,
            backend_port: pkt.tuple.sport,
            snat_port: pkt.tuple.dport,
            proto: pkt.tuple.proto,
            pad: 0,
            pad16: 0,
        };
        if let Some(rn) = REVNAT.get_ptr_mut(&s.rn_key) {
            return reply(ctx, cfg, s, unsafe { &mut *rn });
        }
        // Only our flows use a cluster egress address's SNAT ports: a packet matching none is
        // not for the stack, whose RST would end a flow the client's next packet rebuilds after
        // a failover.
        if unsafe { CLUSTER_EGRESS.get(&s.pkt.tuple.dst) }.is_some() {
            return drop(Counter::DropClusterEgressUnmatched);
        }
    }
    if !s.tunnel_peer.is_zero() {
        return tunnelled_reply(ctx, s);
    }
    Action::PASS
}

/// A tunnelled packet for a NodePort of the node that sent it (a client outside called that
/// node's address) is for the same Service's NodePort here, nodePorts being cluster-wide: this
/// node's address, if its port may be a frontend. IPv4 only: the tunnel knows this node by its
/// IPv4 address.
#[inline(always)]
fn peer_node_address(cfg: &Config, s: &Scratch) -> Option<Addr> {
    let pkt = &s.pkt;
    if s.tunnel_peer.is_zero() || pkt.v6 || cfg.tunnel_src_v4 == 0 {
        return None;
    }
    let here = Addr::from_v4_raw(cfg.tunnel_src_v4);
    lb::maybe_frontend(&here, pkt.tuple.dport, pkt.tuple.proto).then_some(here)
}

/// The NodePort at `at` (this node's address standing for a peer's) the packet is for.
#[inline(always)]
fn node_port_at(at: &Addr, pkt: &Pkt) -> Option<&'static FrontendValue> {
    lb::lookup_frontend(at, pkt.tuple.dport, pkt.tuple.proto)
        .filter(|fe| fe.kind == FrontendKind::NodePort as u8)
}

/// A reply the owner sent back through the tunnel, for a client of this node: straight to it.
/// The stack would drop one whose source is this node's own address (a NodePort's answer to a
/// client outside) as a martian.
#[inline(never)]
fn tunnelled_reply<C: Ctx>(ctx: &C, s: &mut Scratch) -> Action {
    let pkt = &s.pkt;
    // A reply comes from one of our frontends (a NodePort of this node, a cluster IP, an
    // endpoint pods call directly); anything else a peer sent is not to be relayed.
    if !lb::maybe_frontend(&pkt.tuple.src, pkt.tuple.sport, pkt.tuple.proto) {
        return drop(Counter::DropTunnelNotOurs);
    }
    match route(ctx, &mut s.fib, pkt.v6, &pkt.tuple.src, &pkt.tuple.dst) {
        Route::Out => {
            if set_macs(ctx, &s.fib.smac, &s.fib.dmac).is_err() {
                return drop(Counter::DropMalformed);
            }
            Action::redirect(s.fib.ifindex)
        }
        Route::NoNeigh => Action::redirect_neigh(s.fib.ifindex),
        // For this node itself (a host process's flow): the stack delivers it.
        Route::Local | Route::None => Action::PASS,
    }
}

/// Takes the tunnel's headers off a packet from another node (TC ingress) and parses what was
/// inside: a flow for a cluster egress address this node owns, or a reply on its way to a client
/// of this node (passed to the stack). Action::CONTINUE when processing goes on.
#[inline(never)]
fn from_tunnel<C: Ctx>(ctx: &C, s: &mut Scratch) -> Action {
    let peer = s.pkt.tuple.src;
    // Anyone could send such packets; what they carry leaves with the allow-listed address.
    if unsafe { TUNNEL_PEERS.get(&peer) }.is_none() {
        return drop(Counter::DropTunnelUnknownPeer);
    }
    // The tunnel's own headers, and the inner packet's behind them.
    ctx.pull(PULL_LEN);
    if let Err(why) = tunnel::decap(ctx, &s.pkt) {
        return drop(why);
    }
    count(Counter::TunnelReceived);
    match parse_packet(ctx, &mut s.pkt) {
        Parsed::Pkt => {}
        Parsed::Other | Parsed::Unparsed => return Action::PASS,
        Parsed::Malformed(why) => {
            count(why);
            return Action::PASS;
        }
    }
    s.tunnel_peer = peer;
    Action::CONTINUE
}

#[inline(always)]
fn frag_key(pkt: &Pkt) -> FragKey {
    FragKey {
        src: pkt.tuple.src,
        dst: pkt.tuple.dst,
        id: pkt.frag_id,
        proto: pkt.tuple.proto,
        pad: 0,
        pad16: 0,
    }
}

/// Its own frame: parsing's temporaries are dead before the heavy paths run.
///
/// A TC program reads what the skb has linear, and pulls more only when the headers it reads
/// are not all there (`headers_linear`). Pulling a fixed length brought payload into the linear
/// part of every segment with data, and a segment a local TCP sent is a clone, which the kernel
/// then copies whole (`pskb_expand_head`): 8% of the programs' time in a short-connection load.
#[inline(never)]
fn parse_packet<C: Ctx>(ctx: &C, pkt: &mut Pkt) -> Parsed {
    if C::HOOK != Hook::Xdp && !headers_linear(ctx) {
        ctx.pull(PULL_LEN);
    }
    parse(ctx, pkt)
}

/// Remembers a first fragment's ports so the later fragments can follow it.
#[inline(always)]
fn track_fragment(pkt: &Pkt, key: &mut FragKey) {
    if pkt.frag == Frag::First {
        let ports = FragValue {
            sport: pkt.tuple.sport,
            dport: pkt.tuple.dport,
        };
        *key = frag_key(pkt);
        let _ = FRAGS.insert(&*key, &ports, 0);
    } else if pkt.frag == Frag::Later {
        count(Counter::FragmentTranslated);
    }
}

/// Client to frontend. A tracked flow goes on straight from conntrack, without the FRONTENDS
/// lookup (one hash lookup less per packet; like netfilter's conntrack, a flow outlives a removed
/// frontend while its endpoint lives). Anything else starts a flow if it is for a frontend,
/// looked up at `at`: the destination, or this node's address for a peer's NodePort.
#[inline(always)]
fn forward<C: Ctx>(ctx: &C, cfg: &Config, s: &mut Scratch, at: &Addr) -> Action {
    let pkt = &s.pkt;
    // Without XDP_TX, XDP could not send any of these (nor their rejects): TC does it all.
    let xdp_defers = C::HOOK == Hook::Xdp && !xdp_tx_allowed(cfg);
    let now = now_secs(cfg);
    // A flow that ended, to tear down once the packet is known to start a new one. Plain
    // initialised values, not an Option of them: LLVM spills the parts of a None it never
    // wrote, and the verifier refuses to read uninitialised registers.
    let mut tracked: *mut CtValue = core::ptr::null_mut();
    let mut tracked_in = Table::New;
    let mut why = FlowEnd::Expired;
    if !xdp_defers
        && !pkt.bad_len
        && let Some((ct, table)) = ct_lookup(&pkt.tuple)
    {
        let c = unsafe { &mut *ct };
        match ended(cfg, pkt, c, now) {
            None => {
                track_fragment(pkt, &mut s.frag_key);
                return established(ctx, cfg, s, c, table, now);
            }
            Some(end) => {
                tracked = ct;
                tracked_in = table;
                why = end;
            }
        }
    }
    let fe = if *at == pkt.tuple.dst {
        // The filter's false positives fall back on a peer's NodePort too.
        lb::lookup_frontend(at, pkt.tuple.dport, pkt.tuple.proto)
            .or_else(|| peer_node_address(cfg, s).and_then(|here| node_port_at(&here, pkt)))
    } else {
        node_port_at(at, pkt)
    };
    let Some(fe) = fe else {
        return Action::NOT_OURS;
    };
    // An endpoint's own address is a frontend for pods only (and for their packets tunnelled
    // here): anything else to it, the owner's own translated packets included, is not ours.
    if fe.kind == FrontendKind::Endpoint as u8
        && C::HOOK != Hook::PodIngress
        && s.tunnel_peer.is_zero()
    {
        return Action::NOT_OURS;
    }
    if xdp_defers {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    if pkt.bad_len {
        return drop(Counter::DropMalformed);
    }
    track_fragment(pkt, &mut s.frag_key);
    s.ct_key = s.pkt.tuple;
    if !tracked.is_null() {
        delete_flow(&s.ct_key, unsafe { &*tracked }, tracked_in, now_ticks(cfg));
        match why {
            FlowEnd::Expired => {}
            FlowEnd::Reopened => count(Counter::CtReopened),
            // Its endpoint was removed: end the connection now rather than let it hang.
            FlowEnd::EndpointGone if s.pkt.tuple.proto == PROTO_TCP => {
                count(Counter::DropEndpointRemoved);
                return answer(ctx, &s.pkt);
            }
            FlowEnd::EndpointGone => count(Counter::UdpRebalanced),
        }
    }
    let action = match new_flow(ctx, cfg, s, fe, now) {
        Action::OPEN => open_flow(cfg, s, now, C::HOOK == Hook::PodIngress),
        action => action,
    };
    if action == Action::TUNNEL {
        if C::HOOK == Hook::Xdp {
            count(Counter::XdpPassToTc);
            return Action::PASS;
        }
        return to_tunnel(ctx, cfg, s);
    }
    match action {
        Action::SEND => send_to_endpoint(ctx, s, s.route, &s.ct),
        Action::REJECT => answer(ctx, &s.pkt),
        Action::RACED => match ct_lookup(&s.ct_key) {
            Some((ct, table)) => established(ctx, cfg, s, unsafe { &mut *ct }, table, now),
            None => drop(Counter::DropMapUpdate),
        },
        action => action,
    }
}

/// Sends the packet through the tunnel to node `Scratch::tunnel_to`: a client's packet,
/// untranslated, to the owner of its Service's cluster egress address (which serves the flow), or
/// a reply, translated back, to the node of its client. The SYN's (and SYN-ACK's) MSS is clamped
/// to fit the tunnel.
#[inline(never)]
fn to_tunnel<C: Ctx>(ctx: &C, cfg: &Config, s: &mut Scratch) -> Action {
    tunnel::clamp_mss(ctx, cfg, &s.pkt);
    let entropy = lb::flow_hash(&s.pkt.tuple, SEED_SELECT);
    match tunnel::encap(ctx, cfg, &mut s.fib, &s.tunnel_to, entropy) {
        Ok(r) => via(ctx, s, r),
        Err(why) => drop(why),
    }
}

/// How a packet that was put in the tunnel leaves, by the route to the peer `r` found.
#[inline(always)]
fn via<C: Ctx>(ctx: &C, s: &Scratch, r: Route) -> Action {
    let out = s.fib.ifindex;
    match r {
        // Leaving by the device it is on already: let it go on.
        Route::Out if out == ctx.ifindex() && C::HOOK == Hook::TcEgress => Action::PASS,
        Route::Out => Action::redirect(out),
        _ => Action::redirect_neigh(out),
    }
}

/// Why a tracked flow does not go on as it is.
#[derive(Clone, Copy)]
enum FlowEnd {
    Expired,
    /// A SYN on a closed flow's tuple: a new connection.
    Reopened,
    /// Its endpoint was removed (or replaced).
    EndpointGone,
}

/// None while the flow `ct` goes on; else why it ends.
#[inline(always)]
fn ended(cfg: &Config, pkt: &Pkt, ct: &CtValue, now: u32) -> Option<FlowEnd> {
    if cfg.ct_expired(pkt.tuple.proto, ct, now) {
        Some(FlowEnd::Expired)
    } else if is_reopen(pkt.tuple.proto, pkt.tcp_flags, ct) {
        Some(FlowEnd::Reopened)
    } else if !backend_alive(ct) {
        Some(FlowEnd::EndpointGone)
    } else {
        None
    }
}

#[inline(always)]
fn backend_alive(ct: &CtValue) -> bool {
    match BACKENDS.get(ct.backend_id) {
        Some(b) => b.generation == ct.backend_generation && b.state != BackendState::Free as u8,
        None => false,
    }
}

#[inline(always)]
fn established<C: Ctx>(
    ctx: &C,
    cfg: &Config,
    s: &mut Scratch,
    ct: &mut CtValue,
    table: Table,
    now: u32,
) -> Action {
    let flags = ct_flags(s.pkt.tuple.proto, s.pkt.tcp_flags, false);
    if table == Table::New {
        if completes(s.pkt.tuple.proto, s.pkt.tcp_flags, ct) {
            return complete(ctx, cfg, s, ct, now);
        }
        // The client resends its SYN: the endpoint did not answer the first one in time.
        if s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && cfg.health_syn_timeout != 0
            && now.wrapping_sub(ct.created) >= cfg.health_syn_timeout
        {
            health::failed(ct, HF_TIMEOUT, now_ticks(cfg));
        }
    }
    let r = route_cached(
        ctx,
        &mut s.fib,
        &mut ct.to_backend,
        now,
        s.pkt.v6,
        &ct.snat,
        &ct.backend,
    );
    if C::HOOK == Hook::Xdp && !xdp_can_send(ctx, s, r) {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    if let Some(how) = touch(ct, now, flags) {
        closed_by_client(ctx, cfg, s, ct, how);
    }
    send_to_endpoint(ctx, s, r, ct)
}

/// The client's packet that completes a new flow: it moves to the established table, which a
/// flood of new flows cannot evict it from.
#[inline(never)]
fn complete<C: Ctx>(ctx: &C, cfg: &Config, s: &mut Scratch, ct: &CtValue, now: u32) -> Action {
    s.ct = *ct;
    let flags = ct_flags(s.pkt.tuple.proto, s.pkt.tcp_flags, false);
    let r = route_cached(
        ctx,
        &mut s.fib,
        &mut s.ct.to_backend,
        now,
        s.pkt.v6,
        &s.ct.snat,
        &s.ct.backend,
    );
    if C::HOOK == Hook::Xdp && !xdp_can_send(ctx, s, r) {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    if let Some(how) = touch(&mut s.ct, now, flags) {
        closed_by_client(ctx, cfg, s, &s.ct, how);
    }
    s.ct_key = s.pkt.tuple;
    if !promote(&s.ct_key, &mut s.ct) {
        // No room in CT: the flow goes on from CT_NEW.
        let _ = CT_NEW.insert(&s.ct_key, &s.ct, 0);
    }
    send_to_endpoint(ctx, s, r, &s.ct)
}

/// XDP sends a packet itself only back out of the device it came in on. Whether the agent
/// allows XDP_TX at all was settled before `forward` (`xdp_tx_allowed`).
#[inline(always)]
fn xdp_can_send<C: Ctx>(ctx: &C, s: &Scratch, r: Route) -> bool {
    r == Route::Out && s.fib.ifindex == ctx.ifindex()
}

#[inline(always)]
fn xdp_tx_allowed(cfg: &Config) -> bool {
    cfg.flags & CFG_F_XDP_TX != 0
}

/// A new flow, first half: the Service, its checks, the endpoint and the route. Leaves them in
/// the scratch for [`open_flow`] (Action::OPEN). Two sibling subprograms rather than one: the
/// call chain has 512 bytes of stack, and the port allocation's tries run one level deeper.
#[inline(never)]
fn new_flow<C: Ctx>(
    ctx: &C,
    cfg: &Config,
    s: &mut Scratch,
    fe: &FrontendValue,
    now: u32,
) -> Action {
    let pkt = &s.pkt;
    let Some(svc) = lb::lookup_service(fe.service_id) else {
        return drop(Counter::DropNoService);
    };
    // A cluster egress address: its owner serves the flow (and applies the Service's rules);
    // any other node only sends it there, keeping no state of its own.
    if svc.flags & SVC_F_CLUSTER_EGRESS != 0 {
        let Some(ce) = (unsafe { CLUSTER_EGRESS.get(&svc.egress) }) else {
            count(Counter::DropNoEgressAddress);
            return Action::REJECT;
        };
        if ce.flags & CE_F_LOCAL == 0 {
            if ce.owner.is_zero() || cfg.tunnel_src_v4 == 0 {
                count(Counter::DropNoEgressAddress);
                return Action::REJECT;
            }
            // From the tunnel, yet not ours (ownership moved): never send it on, which could
            // bounce between two nodes; the client's next packet finds the new owner.
            if !s.tunnel_peer.is_zero() {
                return drop(Counter::DropTunnelNotOurs);
            }
            s.tunnel_to = mem::addr(&ce.owner);
            return Action::TUNNEL;
        }
    }
    if pkt.tuple.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        count(Counter::CtMissMidstream);
    }
    // A pod connecting to an endpoint directly: that endpoint, whatever its state.
    let direct = fe.kind == FrontendKind::Endpoint as u8;
    if !direct
        && fe.flags & FE_F_SOURCE_RANGES != 0
        && !lb::source_allowed(fe.service_id, &pkt.tuple.src)
    {
        return drop(Counter::DropSourceRange);
    }
    if !direct && svc.backend_count == 0 {
        count(Counter::DropNoEndpoints);
        return Action::REJECT;
    }
    // No SNAT address for this family: refuse rather than leak the client's address outward.
    if svc.egress.is_zero() || svc.egress.is_v4() == pkt.v6 {
        count(Counter::DropNoEgressAddress);
        return Action::REJECT;
    }
    let chosen = if direct {
        lb::direct_backend(fe, &pkt.tuple.dst, pkt.tuple.dport)
    } else {
        choose(fe.service_id, svc, &s.ct_key, now)
    };
    let Some(chosen) = chosen else {
        count(Counter::DropNoEndpoints);
        return Action::REJECT;
    };
    let r = route_new(
        ctx,
        &mut s.fib,
        now,
        pkt.v6,
        &svc.egress,
        &chosen.addr,
        chosen.id,
    );
    if C::HOOK == Hook::Xdp && !xdp_can_send(ctx, s, r) {
        // Nothing is allocated yet: the TC program starts this flow from scratch.
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    // The SYN's timestamp: a closed flow's port can go to it at once (see nat::judge).
    s.syn_has_ts = false;
    if pkt.tuple.proto == PROTO_TCP
        && let Some(off) = tcpts::find(ctx, pkt)
        && let Some(ts) = tcpts::tsval(ctx, off)
    {
        s.syn_ts = ts;
        s.syn_has_ts = true;
    }
    // Cluster egress flows keep their timestamps: a new owner rebuilding the flow after a
    // failover could not know a shift.
    if svc.flags & SVC_F_CLUSTER_EGRESS != 0 {
        s.syn_has_ts = false;
    }
    s.svc_flags = svc.flags;
    s.route = r;
    s.chosen = chosen;
    s.fe = *fe;
    s.affinity_timeout = svc.affinity_timeout;
    s.egress = mem::addr(&svc.egress);
    Action::OPEN
}

/// A new flow, second half: its SNAT port and conntrack entry (Action::SEND), from what
/// [`new_flow`] left in the scratch; `from_pod`: the pod program opens it.
#[inline(never)]
fn open_flow(cfg: &Config, s: &mut Scratch, now: u32, from_pod: bool) -> Action {
    let pkt = &s.pkt;
    let chosen = &s.chosen;
    // Field by field: whole-struct literals are built on the stack first, and the call chain
    // has 512 bytes of it in all.
    let rn = &mut s.rn;
    rn.client = pkt.tuple.src;
    rn.frontend = pkt.tuple.dst;
    rn.client_port = pkt.tuple.sport;
    rn.frontend_port = pkt.tuple.dport;
    rn.service_id = s.fe.service_id;
    rn.closed_at = 0;
    rn.flags = if from_pod { RN_F_FROM_POD } else { 0 };
    rn.pad = 0;
    rn.pad16 = 0;
    rn.tunnel_v4 = s.tunnel_peer.v4_raw();
    let rk = &mut s.rn_key;
    rk.backend = chosen.addr;
    rk.snat = s.egress;
    rk.backend_port = chosen.port;
    rk.snat_port = 0;
    rk.proto = pkt.tuple.proto;
    rk.pad = 0;
    rk.pad16 = 0;
    let ticks = now_ticks(cfg);
    let syn_ts = s.syn_has_ts.then_some(s.syn_ts);
    let ts_offset = match snat_alloc(cfg, now, ticks, syn_ts) {
        Ok(offset) => offset,
        Err(e) => {
            let (counter, kind) = match e {
                AllocError::Exhausted => (Counter::DropSnatExhausted, EV_SNAT_EXHAUSTED),
                AllocError::TableFull => (Counter::DropNatTableFull, EV_NAT_TABLE_FULL),
            };
            count(counter);
            report(s, kind);
            // Refused at once: the client must not wait for its SYN to time out.
            return Action::REJECT;
        }
    };
    let pkt = &s.pkt;
    let chosen = &s.chosen;
    let ct = &mut s.ct;
    ct.backend = chosen.addr;
    ct.snat = s.rn_key.snat;
    ct.backend_id = chosen.id;
    ct.backend_generation = chosen.generation;
    ct.service_id = s.fe.service_id;
    ct.created = now;
    ct.last_seen = now;
    ct.backend_port = chosen.port;
    ct.snat_port = s.rn_key.snat_port;
    ct.flags = ct_flags(pkt.tuple.proto, pkt.tcp_flags, false);
    if ts_offset != 0 {
        ct.flags |= CT_F_TS_OFFSET;
    }
    if from_pod {
        ct.flags |= CT_F_FROM_POD;
    }
    ct.kind = s.fe.kind;
    ct.pad = [0; 2];
    ct.ts_offset = ts_offset;
    mem::zero_hop(&mut ct.to_backend);
    mem::zero_hop(&mut ct.to_client);
    ct.tunnel_peer = s.tunnel_peer;
    remember(&mut s.ct.to_backend, s.route, now, &s.fib);
    if CT_NEW.insert(&s.ct_key, &s.ct, BPF_NOEXIST as u64).is_err() {
        // Another CPU created this flow first: give our port back and follow its choice.
        let _ = REVNAT.remove(&s.rn_key);
        return Action::RACED;
    }
    if s.affinity_timeout != 0 {
        lb::affinity_record(s.fe.service_id, &s.pkt.tuple.src, &s.chosen, now);
    }
    count(Counter::CtCreated);
    Action::SEND
}

#[inline(always)]
fn choose(service_id: u32, svc: &ServiceValue, key: &CtKey, now: u32) -> Option<Chosen> {
    if svc.affinity_timeout != 0
        && let Some(c) = lb::affinity_backend(service_id, svc.affinity_timeout, &key.src, now)
    {
        count(Counter::AffinityHit);
        return Some(c);
    }
    lb::select_backend(service_id, svc, lb::flow_hash(key, SEED_SELECT))
}

/// Translates client -> frontend into egress -> endpoint and picks the exit `r` found.
#[inline(always)]
fn send_to_endpoint<C: Ctx>(ctx: &C, s: &Scratch, r: Route, ct: &CtValue) -> Action {
    let out = s.fib.ifindex;
    let action = match r {
        Route::Out if out == ctx.ifindex() => {
            if C::HOOK == Hook::TcEgress {
                Action::PASS
            } else {
                Action::TX
            }
        }
        Route::Out => Action::redirect(out),
        Route::NoNeigh => Action::redirect_neigh(out),
        Route::Local | Route::None => return drop(Counter::DropNoRoute),
    };
    if xlate(
        ctx,
        &s.pkt,
        &ct.snat,
        ct.snat_port,
        &ct.backend,
        ct.backend_port,
    )
    .is_err()
    {
        return drop(Counter::DropMalformed);
    }
    if r == Route::Out && set_macs(ctx, &s.fib.smac, &s.fib.dmac).is_err() {
        return drop(Counter::DropMalformed);
    }
    // A flow on a reused port: its timestamps continue after the previous flow's.
    if ct.flags & CT_F_TS_OFFSET != 0
        && let Some(off) = tcpts::find(ctx, &s.pkt)
        && tcpts::shift(ctx, s.pkt.l4_off, off, ct.ts_offset).is_err()
    {
        return drop(Counter::DropMalformed);
    }
    count_service(ct.service_id, s.pkt.l3_len, false);
    action
}

/// How the flow `ct` closed with the client's packet `s.pkt` (`how`, from `touch`), with the
/// timestamp the endpoint saw last, for the SNAT port's next flow (see nat::judge).
#[inline(always)]
fn closed_by_client<C: Ctx>(ctx: &C, cfg: &Config, s: &Scratch, ct: &CtValue, how: u8) {
    let mut how = how;
    let mut ts_last = 0;
    if let Some(off) = tcpts::find(ctx, &s.pkt)
        && let Some(ts) = tcpts::tsval(ctx, off)
    {
        // As the endpoint sees it: shifted where the flow's timestamps are.
        ts_last = if ct.flags & CT_F_TS_OFFSET != 0 {
            ts.wrapping_add(ct.ts_offset)
        } else {
            ts
        };
        how |= RN_F_TIMESTAMPS;
    }
    hold_port_of(&s.pkt.tuple, ct, now_ticks(cfg), how, ts_last);
}

/// Endpoint to client (through its SNAT port). `rn` may belong to a flow that has closed: late
/// packets of a closed flow still reach its client while the port is held for it.
#[inline(never)]
fn reply<C: Ctx>(ctx: &C, cfg: &Config, s: &mut Scratch, rn: &mut RevNatValue) -> Action {
    if s.pkt.bad_len {
        return drop(Counter::DropMalformed);
    }
    // A pod's flow goes straight back to the pod's interface, and a flow that came through the
    // tunnel back through it: only TC can send them there (see `toward_client`).
    let tunnelled = rn.tunnel_v4 != 0;
    if C::HOOK == Hook::Xdp && (tunnelled || rn.flags & RN_F_FROM_POD != 0) {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    s.ct_key = rn.ct_key(s.pkt.tuple.proto);
    let now = now_secs(cfg);
    // A handshake's answer is for a flow that has not completed it: CT_NEW first.
    let ct = if s.pkt.tuple.proto == PROTO_TCP && s.pkt.tcp_flags & TCP_SYN != 0 {
        ct_lookup_new_first(&s.ct_key)
    } else {
        ct_lookup(&s.ct_key)
    };
    // Conntrack says so too, for a reverse NAT entry written before its flag existed.
    let to_pod = rn.flags & RN_F_FROM_POD != 0
        || ct.is_some_and(|(ct, _)| unsafe { (*ct).flags } & CT_F_FROM_POD != 0);
    if to_pod && C::HOOK == Hook::Xdp {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    let r = match ct {
        _ if tunnelled => Route::None,
        Some((ct, _)) => {
            let ct = unsafe { &mut *ct };
            route_cached(
                ctx,
                &mut s.fib,
                &mut ct.to_client,
                now,
                s.pkt.v6,
                &rn.frontend,
                &rn.client,
            )
        }
        None => route(ctx, &mut s.fib, s.pkt.v6, &rn.frontend, &rn.client),
    };
    if C::HOOK == Hook::Xdp && needs_tx(ctx, s, r) && !xdp_tx_allowed(cfg) {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    track_fragment(&s.pkt, &mut s.frag_key);
    let pkt = &s.pkt;
    // Offsets and values as plain integers (0: none), not Options: LLVM spills the payload of a
    // None it never wrote, and the verifier refuses to read uninitialised registers.
    let ts = if pkt.tuple.proto == PROTO_TCP {
        tcpts::find(ctx, pkt).unwrap_or(0)
    } else {
        0
    };
    let mut ts_offset = 0;
    match ct {
        Some((ct, _)) => {
            let ct = unsafe { &mut *ct };
            // A new flow's first answer: the endpoint's health (see `health`).
            if ct.flags & CT_F_SEEN_REPLY == 0 {
                if pkt.tuple.proto == PROTO_TCP && pkt.tcp_flags & TCP_RST != 0 {
                    health::failed(ct, HF_REFUSED, now_ticks(cfg));
                } else {
                    health::answered(ct);
                }
            }
            let flags = CT_F_SEEN_REPLY | ct_flags(pkt.tuple.proto, pkt.tcp_flags, true);
            if let Some(how) = touch(ct, now, flags)
                && !rn.is_closed()
            {
                // The endpoint's TSecr echoes the last timestamp it took from the client.
                let mut how = how;
                let mut ts_last = 0;
                if ts != 0
                    && let Some(t) = tcpts::tsval(ctx, ts + 4)
                {
                    how |= RN_F_TIMESTAMPS;
                    ts_last = t;
                }
                hold_port(rn, now_ticks(cfg), how, ts_last);
            }
            if ct.flags & CT_F_TS_OFFSET != 0 {
                ts_offset = ct.ts_offset;
            }
        }
        None => count(Counter::CtMissReply),
    }
    if xlate(
        ctx,
        &s.pkt,
        &rn.frontend,
        rn.frontend_port,
        &rn.client,
        rn.client_port,
    )
    .is_err()
    {
        return drop(Counter::DropMalformed);
    }
    // The client gets its own timestamps echoed, not the shifted ones.
    if ts_offset != 0
        && ts != 0
        && tcpts::shift(ctx, s.pkt.l4_off, ts + 4, ts_offset.wrapping_neg()).is_err()
    {
        return drop(Counter::DropMalformed);
    }
    count_service(rn.service_id, s.pkt.l3_len, true);
    if tunnelled {
        s.tunnel_to = Addr::from_v4_raw(rn.tunnel_v4);
        return to_tunnel(ctx, cfg, s);
    }
    toward_client(ctx, s, r, to_pod)
}

/// The client is out of the device the reply came in on: the packet must be sent back out.
#[inline(always)]
fn needs_tx<C: Ctx>(ctx: &C, s: &Scratch, r: Route) -> bool {
    matches!(r, Route::Out | Route::NoNeigh) && s.fib.ifindex == ctx.ifindex()
}

/// A translated reply: back out of the uplink ourselves (hairpin: the client is outside), to
/// the pod's interface for a flow the pod program opened (`to_pod`), or to the kernel, which
/// delivers it to a local socket or forwards it to a pod.
#[inline(always)]
fn toward_client<C: Ctx>(ctx: &C, s: &Scratch, r: Route, to_pod: bool) -> Action {
    let out = s.fib.ifindex;
    let hairpin = out == ctx.ifindex();
    // Only TC sends a pod's flow to the pod: a veth takes frames redirected from XDP only with
    // XDP or GRO of its own (XDP leaves a pod's flow to TC).
    if !hairpin && !(to_pod && C::HOOK == Hook::TcIngress) {
        return Action::PASS;
    }
    match r {
        Route::Out => {
            if set_macs(ctx, &s.fib.smac, &s.fib.dmac).is_err() {
                return drop(Counter::DropMalformed);
            }
            if hairpin {
                Action::TX
            } else {
                Action::redirect_pod(out)
            }
        }
        // The kernel drops a packet from a local address (a NodePort frontend) arriving on the
        // uplink as a martian; TC hands it to the neighbour code instead.
        Route::NoNeigh if hairpin && C::HOOK != Hook::Xdp => Action::redirect_neigh(out),
        // A pod's unresolved neighbour: the kernel resolves it, for the next reply.
        _ => Action::PASS,
    }
}

/// ICMP errors from the endpoint side about a translated flow.
#[inline(never)]
fn icmp_error<C: Ctx>(ctx: &C, cfg: &Config, s: &mut Scratch) -> Action {
    if parse_inner(ctx, &s.pkt, &mut s.inner).is_none() {
        return Action::PASS;
    }
    let inner = &s.inner;
    // The quoted packet is one we sent: egress:snat_port -> endpoint.
    s.rn_key = RevNatKey {
        backend: inner.dst,
        snat: inner.src,
        backend_port: inner.dport,
        snat_port: inner.sport,
        proto: inner.proto,
        pad: 0,
        pad16: 0,
    };
    let Some(rn) = (unsafe { REVNAT.get(&s.rn_key) }) else {
        return Action::PASS;
    };
    // The endpoint (or a router) says it cannot be reached: a failure of a flow it never
    // answered. Packet-too-big and fragmentation-needed are not.
    if let Some(icmp) = ptr_at::<C, IcmpHdr>(ctx, s.pkt.l4_off) {
        let (ty, code) = (get!(icmp, ty), get!(icmp, code));
        let unreachable = if s.pkt.v6 {
            ty == 1
        } else {
            ty == 3 && code != 4
        };
        s.ct_key = rn.ct_key(inner.proto);
        if unreachable && let Some((ct, _)) = ct_lookup(&s.ct_key) {
            health::failed(unsafe { &mut *ct }, HF_UNREACHABLE, now_ticks(cfg));
        }
    }
    if rn.tunnel_v4 != 0 && C::HOOK == Hook::Xdp {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    let inner = &s.inner;
    let new_src = icmp_error_source(&s.pkt, inner, rn);
    let r = route(ctx, &mut s.fib, s.pkt.v6, &new_src, &rn.client);
    if C::HOOK == Hook::Xdp && needs_tx(ctx, s, r) && !xdp_tx_allowed(cfg) {
        count(Counter::XdpPassToTc);
        return Action::PASS;
    }
    if xlate_icmp_error_reply(ctx, &s.pkt, &s.inner, rn, &new_src).is_err() {
        return drop(Counter::DropMalformed);
    }
    count(Counter::IcmpErrorTranslated);
    if rn.tunnel_v4 != 0 {
        s.tunnel_to = Addr::from_v4_raw(rn.tunnel_v4);
        return to_tunnel(ctx, cfg, s);
    }
    toward_client(ctx, s, r, false)
}

/// Rejects the packet by turning it into its answer, sent back the way it came.
#[inline(never)]
fn answer<C: Ctx>(ctx: &C, pkt: &Pkt) -> Action {
    // Later fragments carry no header to answer with; the first fragment got the answer.
    if !pkt.has_l4() {
        return Action::DROP;
    }
    let built = if pkt.tuple.proto == PROTO_TCP {
        reject::tcp_reset(ctx, pkt)
    } else {
        reject::icmp_unreachable(ctx, pkt)
    };
    if built.is_err() {
        return drop(Counter::DropRejectFailed);
    }
    match C::HOOK {
        Hook::Xdp => Action::TX,
        // Back out of the device the packet came in by: to the outside, or into the pod.
        Hook::TcIngress | Hook::PodIngress => Action::redirect(ctx.ifindex()),
        Hook::TcEgress => Action::redirect_ingress(ctx.ifindex()),
    }
}

/// Tells the agent about a refused new flow (`Scratch::chosen`, `fe`, `rn_key`): at most once a
/// second per CPU and backend bucket, with the count of those it stood for.
#[inline(always)]
fn report(s: &mut Scratch, kind: u32) {
    let chosen = &s.chosen;
    let (Some(cfg), Some(limit)) = (
        CONFIG.get(0),
        EVENT_LIMIT.get_ptr_mut(chosen.id % EVENT_LIMIT_SLOTS),
    ) else {
        return;
    };
    let ticks = now_ticks(cfg);
    let limit = unsafe { &mut *limit };
    if limit.last != 0 && ticks.wrapping_sub(limit.last) < cfg.hz {
        limit.suppressed += 1;
        return;
    }
    s.event = Event {
        kind,
        count: limit.suppressed + 1,
        service_id: s.fe.service_id,
        backend_id: chosen.id,
        egress: s.egress,
        backend: chosen.addr,
        backend_port: chosen.port,
        proto: s.pkt.tuple.proto,
        pad: 0,
        egress_count: s.alloc.addrs,
    };
    if EVENTS.output::<Event>(&s.event, 0).is_err() {
        count(Counter::EventsLost);
        limit.suppressed += 1;
        return;
    }
    limit.last = ticks;
    limit.suppressed = 0;
}
