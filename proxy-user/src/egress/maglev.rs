//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran and Cilium use it: a lookup
//! table of M slots, each naming an endpoint, that every node builds alike from the endpoints'
//! identities (address and port, never node-local ids). The data path picks the slot from the
//! flow's hash, so every node sends a flow to the same endpoint: a new owner of a cluster egress
//! address rebuilds a flow it never saw exactly as the old owner had it. When an endpoint comes
//! or goes, only about 1/N of the slots change.

use std::net::IpAddr;

use proxy_common::MAGLEV_M;

/// An endpoint as the table knows it.
pub type Endpoint = (IpAddr, u16);

/// FNV-1a over the endpoint's address bytes and port, salted: the same on every node and every
/// agent version (a change would move flows between owners).
fn hash(endpoint: &Endpoint, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let octets = match endpoint.0 {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    for b in octets.iter().chain(&endpoint.1.to_be_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly: finish with a murmur-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The table for `endpoints` (in any order: it is sorted first) with `m` slots (`m` prime):
/// slot -> index into the sorted endpoints. Empty without endpoints.
pub fn populate(endpoints: &[Endpoint], m: usize) -> (Vec<Endpoint>, Vec<u32>) {
    let mut sorted = endpoints.to_vec();
    sorted.sort();
    sorted.dedup();
    let n = sorted.len();
    if n == 0 {
        return (sorted, Vec::new());
    }
    // Each endpoint's permutation of the slots: offset + j * skip (mod m), skip in 1..m.
    let perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|e| {
            let offset = (hash(e, 1) % m as u64) as usize;
            let skip = (hash(e, 2) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    // Endpoints take turns claiming their next preferred free slot until all are taken.
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    (sorted, table)
}

/// The table with [`MAGLEV_M`] slots.
pub fn table(endpoints: &[Endpoint]) -> (Vec<Endpoint>, Vec<u32>) {
    populate(endpoints, MAGLEV_M)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| (IpAddr::from([203, 0, 113, 10 + i as u8]), 443))
            .collect()
    }

    /// The endpoint each slot names.
    fn owners(endpoints: &[Endpoint]) -> Vec<Endpoint> {
        let (sorted, t) = table(endpoints);
        t.iter().map(|i| sorted[*i as usize]).collect()
    }

    #[test]
    fn every_endpoint_gets_its_share() {
        for n in [1, 2, 3, 4, 7, 16, 40] {
            let (_, t) = table(&eps(n));
            assert_eq!(t.len(), MAGLEV_M);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let ideal = MAGLEV_M as f64 / n as f64;
            for c in counts {
                // Maglev's bound: within a few percent of an even share.
                assert!(
                    (c as f64 - ideal).abs() / ideal < 0.05,
                    "{n} endpoints: {c} slots, ideal {ideal:.0}"
                );
            }
        }
    }

    #[test]
    fn order_does_not_matter_and_every_node_builds_the_same_table() {
        let mut e = eps(5);
        let a = owners(&e);
        e.reverse();
        assert_eq!(owners(&e), a);
        // Pinned: the hashes must never change between versions (flows would move owners).
        assert_eq!(hash(&eps(1)[0], 1), hash(&eps(1)[0], 1));
        assert_ne!(hash(&eps(1)[0], 1), hash(&eps(1)[0], 2));
    }

    #[test]
    fn removing_or_adding_an_endpoint_moves_few_slots() {
        let before = owners(&eps(10));
        // One leaves: its slots move, and only a few others.
        let mut fewer = eps(10);
        let gone = fewer.remove(3);
        let after = owners(&fewer);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **b != gone)
            .count();
        assert!(
            (moved as f64) < 0.03 * MAGLEV_M as f64,
            "{moved} slots of staying endpoints moved"
        );
        // One joins: it takes about 1/11 of the slots, from everyone.
        let after = owners(&eps(11));
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let share = MAGLEV_M as f64 / 11.0;
        assert!(
            (changed as f64) < 1.15 * share,
            "{changed} slots changed for a share of {share:.0}"
        );
    }
}
