//! An authoritative DNS server for the tests, inside a topology's namespace: the test sets each
//! name's answer (addresses and TTL, or NXDOMAIN) while the agent runs, and can make it stop
//! answering. Messages are decoded and encoded with hickory-proto; names not set are NXDOMAIN.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::agent::in_netns;

/// What a name answers.
#[derive(Clone, Debug)]
pub enum Answer {
    Addresses { addrs: Vec<IpAddr>, ttl: u32 },
    NxDomain,
}

#[derive(Default)]
struct Zone {
    names: BTreeMap<String, Answer>,
    /// Queries received per name (silent or not).
    queries: BTreeMap<String, u64>,
}

pub struct DnsServer {
    zone: Arc<Mutex<Zone>>,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
}

/// The negative TTL (SOA minimum) of NXDOMAIN and no-data answers.
const NEGATIVE_TTL: u32 = 1;

impl DnsServer {
    /// Serves UDP on `addr` inside namespace `ns`.
    pub fn start(ns: &str, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let socket = in_netns(ns, || UdpSocket::bind(addr)).expect("bind the DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (zone, silent, stop) = (zone.clone(), silent.clone(), stop.clone());
            std::thread::spawn(move || serve(socket, zone, silent, stop))
        };
        DnsServer {
            zone,
            silent,
            stop,
            thread: Some(thread),
            addr,
        }
    }

    /// Sets what `name` answers from now on.
    pub fn set(&self, name: &str, answer: Answer) {
        self.zone
            .lock()
            .unwrap()
            .names
            .insert(name.to_owned(), answer);
    }

    pub fn set_addresses(&self, name: &str, addrs: &[&str], ttl: u32) {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        self.set(name, Answer::Addresses { addrs, ttl });
    }

    /// Queries are received and dropped (a resolver that stops answering), or answered again.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    /// Queries for `name` so far.
    pub fn queries(&self, name: &str) -> u64 {
        self.zone
            .lock()
            .unwrap()
            .queries
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    socket: UdpSocket,
    zone: Arc<Mutex<Zone>>,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(reply) = answer(&query, &zone) else {
            continue;
        };
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}

fn answer(query: &Message, zone: &Mutex<Zone>) -> Option<Message> {
    let q = query.queries.first()?;
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    let name = q
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let mut zone = zone.lock().unwrap();
    *zone.queries.entry(name.clone()).or_default() += 1;
    let soa = || {
        let apex = Name::from_str(
            name.split_once('.')
                .map_or(name.as_str(), |(_, parent)| parent),
        )
        .unwrap_or_else(|_| Name::root());
        Record::from_rdata(
            apex.clone(),
            NEGATIVE_TTL,
            RData::SOA(SOA::new(
                Name::from_str("ns.invalid.").unwrap(),
                Name::from_str("admin.invalid.").unwrap(),
                1,
                60,
                60,
                600,
                NEGATIVE_TTL,
            )),
        )
    };
    match zone.names.get(&name) {
        Some(Answer::Addresses { addrs, ttl }) => {
            let records: Vec<Record> = addrs
                .iter()
                .filter_map(|a| match (a, q.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                    _ => None,
                })
                .map(|rdata| Record::from_rdata(q.name().clone(), *ttl, rdata))
                .collect();
            if records.is_empty() {
                reply.add_authority(soa());
            } else {
                reply.add_answers(records);
            }
        }
        Some(Answer::NxDomain) | None => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(soa());
        }
    }
    Some(reply)
}
