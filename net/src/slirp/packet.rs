//! The few Ethernet/IP/UDP frames the backend reads and writes itself (the DNS forwarder's
//! queries and answers), outside libslirp. Frames come from the guest: every read is bounds
//! checked and a malformed frame is simply "not ours".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const ETH_HEADER_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const IPPROTO_UDP: u8 = 17;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;

/// A UDP datagram in an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame<'a> {
    pub src_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// The UDP datagram in `frame` (IPv4 without fragmentation, or IPv6 with UDP as the first next
/// header), or `None` for anything else.
pub fn parse_udp(frame: &[u8]) -> Option<UdpFrame<'_>> {
    let src_mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let ip = frame.get(ETH_HEADER_LEN..)?;
    let (src, dst, udp) = match be16(frame, 12)? {
        ETHERTYPE_IPV4 => {
            let version_ihl = *ip.first()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            let total = usize::from(be16(ip, 2)?);
            if version_ihl >> 4 != 4 || ihl < IPV4_HEADER_LEN || total < ihl {
                return None;
            }
            // A fragment is not a whole datagram (and slirp reassembles those itself).
            if *ip.get(9)? != IPPROTO_UDP || be16(ip, 6)? & 0x3fff != 0 {
                return None;
            }
            let src = IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?));
            let dst = IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?));
            (src, dst, ip.get(ihl..total)?)
        }
        ETHERTYPE_IPV6 => {
            if *ip.first()? >> 4 != 6 || *ip.get(6)? != IPPROTO_UDP {
                return None;
            }
            let payload_len = usize::from(be16(ip, 4)?);
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?));
            (src, dst, ip.get(IPV6_HEADER_LEN..IPV6_HEADER_LEN + payload_len)?)
        }
        _ => return None,
    };
    let udp_len = usize::from(be16(udp, 4)?);
    if udp_len < UDP_HEADER_LEN {
        return None;
    }
    Some(UdpFrame {
        src_mac,
        src: SocketAddr::new(src, be16(udp, 0)?),
        dst: SocketAddr::new(dst, be16(udp, 2)?),
        payload: udp.get(UDP_HEADER_LEN..udp_len)?,
    })
}

/// An Ethernet frame with a UDP datagram from `src` to `dst` (both of one family), with every
/// checksum filled in (slirp and guests verify them). `None` when the families differ or the
/// payload does not fit one IP packet.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let udp_len = UDP_HEADER_LEN + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut frame = Vec::with_capacity(ETH_HEADER_LEN + IPV6_HEADER_LEN + udp_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            frame.extend_from_slice(&ipv4_header(s, d, IPPROTO_UDP, udp_len)?);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            frame.extend_from_slice(&ipv6_header(s, d, IPPROTO_UDP, udp_len)?);
        }
        _ => return None,
    }
    let mut sum = pseudo_header_sum(src.ip(), dst.ip(), IPPROTO_UDP, udp_len);
    sum = ones_sum(sum, &udp);
    // In UDP a computed 0 is sent as 0xffff: 0 means "no checksum" (and is illegal in IPv6).
    let check = match fold(sum) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&udp);
    Some(frame)
}

/// A 20-byte IPv4 header (no options, DF clear, TTL 64) with its checksum.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
) -> Option<[u8; 20]> {
    let total = u16::try_from(IPV4_HEADER_LEN + payload_len).ok()?;
    let mut h = [0u8; IPV4_HEADER_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let check = fold(ones_sum(0, &h));
    h[10..12].copy_from_slice(&check.to_be_bytes());
    Some(h)
}

/// A 40-byte IPv6 header (hop limit 64, no extension headers).
pub fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: usize) -> Option<[u8; 40]> {
    let len = u16::try_from(payload_len).ok()?;
    let mut h = [0u8; IPV6_HEADER_LEN];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    Some(h)
}

/// The ones'-complement sum of the TCP/UDP pseudo header (RFC 768, RFC 8200 §8.1).
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum = ones_sum(sum, &s.octets());
            sum = ones_sum(sum, &d.octets());
        }
        (s, d) => {
            sum = ones_sum(sum, &to_v6(s).octets());
            sum = ones_sum(sum, &to_v6(d).octets());
        }
    }
    // Lengths here are below 2^32: a header length field holds at most 16 bits.
    let len = len as u32;
    sum + (len >> 16) + (len & 0xffff) + u32::from(proto)
}

fn to_v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Adds `data` as big-endian 16-bit words (a trailing odd byte padded with zero) to `sum`.
pub fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        // Fold early so the sum never wraps, whatever the length.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// The checksum field for a ones'-complement `sum`.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    !(sum as u16)
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn udp_frames_parse_back_with_valid_checksums() {
        for (src, dst) in [("10.0.2.15:40000", "10.0.2.3:53"), ("[fec0::15]:40000", "[fec0::3]:53")]
        {
            let (src, dst): (SocketAddr, SocketAddr) =
                (src.parse().expect("literal"), dst.parse().expect("literal"));
            let frame = udp_frame(A, B, src, dst, b"query!").expect("same family");
            let udp = parse_udp(&frame).expect("a UDP frame");
            assert_eq!((udp.src_mac, udp.src, udp.dst, udp.payload), (A, src, dst, &b"query!"[..]));
            // Summing a datagram with its checksum over the pseudo header gives 0xffff.
            let ip_len = if src.is_ipv4() { 20 } else { 40 };
            let l4 = &frame[ETH_HEADER_LEN + ip_len..];
            let sum = ones_sum(pseudo_header_sum(src.ip(), dst.ip(), IPPROTO_UDP, l4.len()), l4);
            assert_eq!(fold(sum), 0, "{src}");
            if src.is_ipv4() {
                assert_eq!(fold(ones_sum(0, &frame[14..34])), 0, "IPv4 header checksum");
            }
        }
    }

    #[test]
    fn mixed_families_and_non_udp_frames_are_refused() {
        let v4: SocketAddr = "10.0.2.15:1".parse().expect("literal");
        let v6: SocketAddr = "[::1]:1".parse().expect("literal");
        assert_eq!(udp_frame(A, B, v4, v6, b""), None);
        let mut frame = udp_frame(A, B, v4, v4, b"x").expect("v4");
        frame[14 + 9] = 6; // TCP
        assert_eq!(parse_udp(&frame), None);
    }

    #[test]
    fn truncated_and_random_frames_never_panic() {
        let v6: SocketAddr = "[fec0::15]:1".parse().expect("literal");
        let frame = udp_frame(A, B, v6, v6, b"payload").expect("v6");
        for len in 0..frame.len() {
            assert_eq!(parse_udp(&frame[..len]), None, "cut at {len}");
        }
        let mut rng = testkit::Rng(7);
        for _ in 0..2000 {
            let mut f = frame.clone();
            let at = rng.below(f.len() as u64) as usize;
            f[at] = rng.next() as u8;
            let _ = parse_udp(&f);
        }
    }
}
