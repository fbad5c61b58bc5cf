//! Zeroing and copying that stay a few loads and stores. LLVM merges neighbouring zero stores
//! into a `memset` call and a struct's copy into a `memmove` call, which on BPF are byte loops:
//! clearing one address that way ran about a hundred instructions on every packet, and a new
//! flow copied addresses so nine times. Volatile accesses are never merged.

use proxy_common::{Addr, NextHop};

#[inline(always)]
pub fn zero<T: Copy + Default>(p: &mut T) {
    unsafe { core::ptr::write_volatile(p, T::default()) };
}

#[inline(always)]
pub fn zero_addr(a: &mut Addr) {
    for w in a.words.iter_mut() {
        zero(w);
    }
}

/// A copy of `a`, word by word.
#[inline(always)]
pub fn addr(a: &Addr) -> Addr {
    let w = &a.words;
    unsafe {
        Addr {
            words: [
                core::ptr::read_volatile(&w[0]),
                core::ptr::read_volatile(&w[1]),
                core::ptr::read_volatile(&w[2]),
                core::ptr::read_volatile(&w[3]),
            ],
        }
    }
}

/// No next hop cached ([`NextHop::stamp`] 0), and no stale addresses left in the entry.
#[inline(always)]
pub fn zero_hop(h: &mut NextHop) {
    zero(&mut h.ifindex);
    zero(&mut h.stamp);
    // The two MAC addresses: 12 bytes from a 4-byte aligned offset.
    let macs = h.smac.as_mut_ptr() as *mut u32;
    for i in 0..3 {
        unsafe { core::ptr::write_volatile(macs.add(i), 0) };
    }
}
