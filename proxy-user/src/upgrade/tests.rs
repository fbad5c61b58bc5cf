use proxy_common::*;

use super::{Table, abi2};

fn addr(last: u8) -> Addr {
    std::net::Ipv4Addr::new(10, 0, 0, last).into()
}

fn flow_v2(flags: u8) -> abi2::CtValueV2 {
    abi2::CtValueV2 {
        backend: addr(2),
        snat: addr(3),
        backend_id: 7,
        backend_generation: 2,
        service_id: 4,
        created: 100,
        last_seen: 120,
        backend_port: 8080u16.to_be(),
        snat_port: 61_234u16.to_be(),
        flags,
        kind: FrontendKind::ClusterIp as u8,
        pad: [0; 2],
        reserved: 0,
        to_backend: NextHop {
            ifindex: 3,
            stamp: 119,
            smac: [1; 6],
            dmac: [2; 6],
        },
        to_client: NextHop::default(),
    }
}

fn port_v2() -> abi2::RevNatValueV2 {
    abi2::RevNatValueV2 {
        client: addr(9),
        frontend: addr(10),
        client_port: 40_000u16.to_be(),
        frontend_port: 80u16.to_be(),
        service_id: 4,
    }
}

/// An ABI 2 flow keeps everything it had (endpoint, SNAT port, stamps, next hops) and goes to
/// the table ABI 3 keeps it in: answered flows are established, the others wait in CT_NEW.
#[test]
fn abi2_flows_keep_their_translation_and_go_to_the_right_table() {
    let answered = flow_v2(CT_F_SEEN_REPLY | CT_F_CLIENT_FIN);
    let (v, table) = abi2::ct(&answered);
    assert_eq!(table, Table::Established);
    assert_eq!(
        v.flags,
        CT_F_SEEN_REPLY | CT_F_CLIENT_FIN | CT_F_ESTABLISHED
    );
    assert_eq!(
        (v.backend, v.snat, v.backend_port, v.snat_port),
        (addr(2), addr(3), 8080u16.to_be(), 61_234u16.to_be())
    );
    assert_eq!(
        (v.backend_id, v.backend_generation, v.service_id),
        (7, 2, 4)
    );
    assert_eq!((v.created, v.last_seen, v.kind), (100, 120, 1));
    assert_eq!(v.to_backend, answered.to_backend);
    assert_eq!((v.ts_offset, v.tunnel_peer), (0, Addr::default()));

    let (v, table) = abi2::ct(&flow_v2(0));
    assert_eq!(table, Table::New);
    assert_eq!(v.flags, 0);
}

/// ABI 2 held a closed flow's port through its CT entry; ABI 3 holds it in REVNAT. Open flows
/// stay open, closed ones are held from the upgrade on (TIME_WAIT's longer hold where the
/// endpoint may hold it), a gone UDP flow frees its port.
#[test]
fn abi2_ports_of_closed_flows_are_held_and_open_ones_stay_open() {
    let now = 5_000;
    let open = abi2::revnat(&port_v2(), PROTO_TCP, Some(CT_F_SEEN_REPLY), now).unwrap();
    assert_eq!((open.closed_at, open.flags), (0, 0));
    assert_eq!(
        (
            open.client,
            open.client_port,
            open.frontend,
            open.frontend_port
        ),
        (addr(9), 40_000u16.to_be(), addr(10), 80u16.to_be())
    );
    assert_eq!(open.service_id, 4);

    let both_fins = CT_F_SEEN_REPLY | CT_F_CLIENT_FIN | CT_F_BACKEND_FIN;
    let closed = abi2::revnat(&port_v2(), PROTO_TCP, Some(both_fins), now).unwrap();
    assert_eq!(closed.closed_at, now | 1);
    assert_eq!(closed.flags, RN_F_ENDPOINT_TIME_WAIT);

    let reset = abi2::revnat(&port_v2(), PROTO_TCP, Some(CT_F_RST), now).unwrap();
    assert_eq!((reset.closed_at, reset.flags), (now | 1, 0));

    let gone = abi2::revnat(&port_v2(), PROTO_TCP, None, now).unwrap();
    assert_eq!(
        (gone.closed_at, gone.flags),
        (now | 1, RN_F_ENDPOINT_TIME_WAIT)
    );
    assert_eq!(abi2::revnat(&port_v2(), PROTO_UDP, None, now), None);
    let udp = abi2::revnat(&port_v2(), PROTO_UDP, Some(CT_F_SEEN_REPLY), now).unwrap();
    assert_eq!(udp.closed_at, 0);
}

#[test]
fn the_flow_tables_of_abi_2_and_this_version_are_readable_others_not() {
    assert_eq!(super::flow_layout(2, MAP_CT), Some(Some((40, 104))));
    assert_eq!(super::flow_layout(2, MAP_REVNAT), Some(Some((40, 40))));
    assert_eq!(super::flow_layout(2, MAP_CT_NEW), Some(None));
    assert_eq!(
        super::flow_layout(ABI_VERSION, MAP_CT),
        Some(user::map_layout(MAP_CT))
    );
    assert_eq!(super::flow_layout(1, MAP_CT), None);
}
