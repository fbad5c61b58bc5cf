//! Minimal SHA-256 (FIPS 180-4) and RFC 4648 base32, just enough to reproduce
//! kube-proxy's chain-name hashing without adding crates (and without touching
//! the workspace `Cargo.lock`).
//!
//! kube-proxy computes `base32.StdEncoding.EncodeToString(sha256.Sum256(..))`
//! and keeps a prefix (16 chars for iptables, 8 for nftables).

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

// Additions go through u64 + mask (inline arithmetic instead of
// `wrapping_add` calls) to keep unoptimised test builds reasonably fast:
// kube-proxy layouts for 10k+ Services need ~10^5 hashes.
#[inline(always)]
fn add(a: u32, b: u32) -> u32 {
    ((a as u64 + b as u64) & 0xffff_ffff) as u32
}

fn compress(state: &mut [u32; 8], block: &[u8; 64]) {
    let mut w = [0u32; 64];
    let mut i = 0;
    while i < 16 {
        w[i] = (block[4 * i] as u32) << 24
            | (block[4 * i + 1] as u32) << 16
            | (block[4 * i + 2] as u32) << 8
            | block[4 * i + 3] as u32;
        i += 1;
    }
    while i < 64 {
        let x = w[i - 15];
        let y = w[i - 2];
        let s0 = x.rotate_right(7) ^ x.rotate_right(18) ^ (x >> 3);
        let s1 = y.rotate_right(17) ^ y.rotate_right(19) ^ (y >> 10);
        w[i] = ((w[i - 16] as u64 + s0 as u64 + w[i - 7] as u64 + s1 as u64) & 0xffff_ffff) as u32;
        i += 1;
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    i = 0;
    while i < 64 {
        let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
        let ch = (e & f) ^ (!e & g);
        let t1 =
            ((h as u64 + s1 as u64 + ch as u64 + K[i] as u64 + w[i] as u64) & 0xffff_ffff) as u32;
        let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
        let maj = (a & b) ^ (a & c) ^ (b & c);
        h = g;
        g = f;
        f = e;
        e = add(d, t1);
        d = c;
        c = b;
        b = a;
        a = ((t1 as u64 + s0 as u64 + maj as u64) & 0xffff_ffff) as u32;
        i += 1;
    }
    state[0] = add(state[0], a);
    state[1] = add(state[1], b);
    state[2] = add(state[2], c);
    state[3] = add(state[3], d);
    state[4] = add(state[4], e);
    state[5] = add(state[5], f);
    state[6] = add(state[6], g);
    state[7] = add(state[7], h);
}

/// SHA-256 of `parts` concatenated (saves the caller an allocation: kube-proxy
/// hashes `servicePortName + protocol [+ endpoint]`).
pub fn sha256_concat(parts: &[&[u8]]) -> [u8; 32] {
    let mut state = H0;
    let mut buf = [0u8; 64];
    let mut filled = 0usize;
    let mut total: u64 = 0;
    for part in parts {
        total += part.len() as u64;
        let mut data = *part;
        while !data.is_empty() {
            let take = (64 - filled).min(data.len());
            buf[filled..filled + take].copy_from_slice(&data[..take]);
            filled += take;
            data = &data[take..];
            if filled == 64 {
                compress(&mut state, &buf);
                filled = 0;
            }
        }
    }
    // Padding: 0x80, zeros, 64-bit big-endian bit length.
    buf[filled] = 0x80;
    filled += 1;
    if filled > 56 {
        buf[filled..].fill(0);
        compress(&mut state, &buf);
        filled = 0;
    }
    buf[filled..56].fill(0);
    buf[56..].copy_from_slice(&(total * 8).to_be_bytes());
    compress(&mut state, &buf);

    let mut out = [0u8; 32];
    for (chunk, s) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&s.to_be_bytes());
    }
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha256_concat(&[data])
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// First `n` characters of the RFC 4648 standard base32 encoding of `data`
/// (Go's `base32.StdEncoding.EncodeToString(data)[:n]`). `n` must not exceed the
/// number of unpadded characters (`ceil(len*8/5)`).
pub fn base32_prefix(data: &[u8], n: usize) -> String {
    assert!(n <= (data.len() * 8).div_ceil(5), "base32 prefix too long");
    let mut out = String::with_capacity(n);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut bytes = data.iter();
    while out.len() < n {
        if bits < 5 {
            match bytes.next() {
                Some(&b) => {
                    acc = (acc << 8) | u32::from(b);
                    bits += 8;
                }
                None => {
                    // Final partial group is zero-padded on the right.
                    acc <<= 5 - bits;
                    bits = 5;
                }
            }
        }
        let idx = (acc >> (bits - 5)) & 0x1f;
        bits -= 5;
        acc &= (1 << bits) - 1;
        out.push(B32[idx as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Two-block message (56 bytes forces an extra padding block).
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(&sha256(&million_a)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        // Split input gives the same digest as contiguous input.
        assert_eq!(sha256_concat(&[b"ab", b"", b"c"]), sha256(b"abc"));
    }

    #[test]
    fn base32_known_vectors() {
        // RFC 4648 section 10 test vectors (without padding).
        assert_eq!(base32_prefix(b"f", 2), "MY");
        assert_eq!(base32_prefix(b"fo", 4), "MZXQ");
        assert_eq!(base32_prefix(b"foo", 5), "MZXW6");
        assert_eq!(base32_prefix(b"foob", 7), "MZXW6YQ");
        assert_eq!(base32_prefix(b"fooba", 8), "MZXW6YTB");
        assert_eq!(base32_prefix(b"foobar", 10), "MZXW6YTBOI");
        assert_eq!(base32_prefix(b"foobar", 3), "MZX");
    }
}
