//! Internet checksum arithmetic (RFC 1071, RFC 1624).
//!
//! All values are raw: 16-bit words and checksum fields are loaded from the packet in native order
//! without byte swapping. One's-complement sums are byte-order independent, so a delta computed on
//! raw words applies to a raw checksum field unchanged.

use proxy_common::Addr;

/// One's-complement 32-bit addition with end-around carry.
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(carry as u32)
}

/// Folds a 32-bit partial sum to 16 bits.
#[inline(always)]
pub fn fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Delta for replacing a 32-bit word `old` by `new`.
#[inline(always)]
pub fn diff32(old: u32, new: u32) -> u32 {
    add(!old, new)
}

/// Delta for replacing a 16-bit word `old` by `new`.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// Delta for replacing a 16-byte address.
#[inline(always)]
pub fn diff_addr(old: &Addr, new: &Addr) -> u32 {
    let mut d = diff32(old.words[0], new.words[0]);
    d = add(d, diff32(old.words[1], new.words[1]));
    d = add(d, diff32(old.words[2], new.words[2]));
    add(d, diff32(old.words[3], new.words[3]))
}

/// Delta for replacing an address of the given family: IPv4 touches only the last word.
#[inline(always)]
pub fn diff_addr_family(v6: bool, old: &Addr, new: &Addr) -> u32 {
    if v6 {
        diff_addr(old, new)
    } else {
        diff32(old.words[3], new.words[3])
    }
}

/// Applies a delta to a checksum field (which holds the complement of the sum).
#[inline(always)]
pub fn apply(field: u16, delta: u32) -> u16 {
    !fold(add((!field) as u32, delta))
}

/// Sum of `n` 32-bit words (for checksums computed from scratch over headers we build).
#[inline(always)]
pub fn sum_words(words: &[u32]) -> u32 {
    let mut s = 0u32;
    for w in words {
        s = add(s, *w);
    }
    s
}
