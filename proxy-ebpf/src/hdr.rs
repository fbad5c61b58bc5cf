//! Wire headers. Fields are raw (network order); read them with `get!` through a pointer that
//! was bounds-checked once for the whole header.

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtcfl: u32,
    pub payload_len: u16,
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub csum: u16,
    pub urg: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub csum: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub csum: u16,
    pub unused: u32,
}

/// An IPv6 extension header's first bytes (fragment headers add offset and id).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Ext {
    pub next: u8,
    pub len: u8,
    pub frag_off: u16,
    pub frag_id: u32,
}

/// Reads a field through a header pointer. The packet is only byte-aligned, hence unaligned.
macro_rules! get {
    ($ptr:expr, $field:ident) => {
        unsafe { core::ptr::read_unaligned(core::ptr::addr_of!((*$ptr).$field)) }
    };
}
pub(crate) use get;
