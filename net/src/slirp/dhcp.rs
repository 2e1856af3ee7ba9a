//! Learns the guest's IPv4 lease by looking at the DHCP replies slirp sends it: libslirp has
//! no API for its lease table, and the frames are ours to read anyway.

use std::net::Ipv4Addr;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const BOOTPS_PORT: u16 = 67;
const BOOTPC_PORT: u16 = 68;
const BOOTREPLY: u8 = 2;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Where the options start in a BOOTP message: the fixed fields, then the cookie.
const OPTIONS_OFFSET: usize = 240;
const YIADDR_OFFSET: usize = 16;
const CHADDR_OFFSET: usize = 28;
const OPT_PAD: u8 = 0;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_END: u8 = 255;

/// What a frame for the guest says about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A DHCPACK: the guest now holds this address.
    Acked(Ipv4Addr),
    /// A DHCPNAK: whatever the guest asked for, it does not hold.
    Refused,
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Offer,
    Ack,
    Nak,
    Other(u8),
}

/// A DHCP reply as far as lease tracking needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    /// `yiaddr`: the address offered or acknowledged.
    pub addr: Ipv4Addr,
    /// `chaddr`: the client the reply is for.
    pub client_mac: [u8; 6],
}

/// The message type, `yiaddr` and `chaddr` of a DHCP reply (server port 67 to client port 68)
/// in an Ethernet frame, or `None` for any other frame.
pub fn parse_reply(frame: &[u8]) -> Option<Reply> {
    if be16(frame, 12)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(14..)?;
    let version_ihl = *ip.first()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || *ip.get(9)? != IPPROTO_UDP {
        return None;
    }
    // A fragment's payload is not a whole UDP datagram: DHCP replies are never fragmented.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    if be16(udp, 0)? != BOOTPS_PORT || be16(udp, 2)? != BOOTPC_PORT {
        return None;
    }
    let bootp = udp.get(8..)?;
    if *bootp.first()? != BOOTREPLY || bootp.get(236..240)? != MAGIC_COOKIE {
        return None;
    }
    let yiaddr: [u8; 4] = bootp.get(YIADDR_OFFSET..YIADDR_OFFSET + 4)?.try_into().ok()?;
    let client_mac: [u8; 6] = bootp.get(CHADDR_OFFSET..CHADDR_OFFSET + 6)?.try_into().ok()?;
    let mut options = bootp.get(OPTIONS_OFFSET..)?;
    while let Some((&code, rest)) = options.split_first() {
        match code {
            OPT_PAD => options = rest,
            OPT_END => return None,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(len))?;
                if code == OPT_MESSAGE_TYPE {
                    let kind = match *value.first()? {
                        2 => MessageType::Offer,
                        5 => MessageType::Ack,
                        6 => MessageType::Nak,
                        other => MessageType::Other(other),
                    };
                    return Some(Reply { kind, addr: Ipv4Addr::from(yiaddr), client_mac });
                }
                options = rest.get(usize::from(len)..)?;
            }
        }
    }
    None
}

/// The lease change a frame for the guest announces to the client `guest_mac`, if any.
pub fn lease_event(frame: &[u8], guest_mac: [u8; 6]) -> Option<LeaseEvent> {
    let reply = parse_reply(frame)?;
    if reply.client_mac != guest_mac {
        return None;
    }
    match reply.kind {
        MessageType::Ack if !reply.addr.is_unspecified() => Some(LeaseEvent::Acked(reply.addr)),
        MessageType::Nak => Some(LeaseEvent::Refused),
        _ => None,
    }
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// An Ethernet/IPv4/UDP frame carrying a BOOTP reply for [`MAC`] with the given options.
    fn reply(yiaddr: [u8; 4], options: &[u8]) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = BOOTREPLY;
        bootp[16..20].copy_from_slice(&yiaddr);
        bootp[CHADDR_OFFSET..CHADDR_OFFSET + 6].copy_from_slice(&MAC);
        bootp[236..240].copy_from_slice(&MAGIC_COOKIE);
        bootp.extend_from_slice(options);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip =
            vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, IPPROTO_UDP, 0, 0, 10, 0, 2, 2, 255, 255, 255, 255];
        let total = (20 + 8 + bootp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&BOOTPS_PORT.to_be_bytes());
        frame.extend_from_slice(&BOOTPC_PORT.to_be_bytes());
        frame.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&bootp);
        frame
    }

    #[test]
    fn an_ack_gives_the_lease_and_an_offer_does_not() {
        let ack = reply(
            [10, 0, 2, 15],
            &[OPT_PAD, 1, 4, 255, 255, 255, 0, OPT_MESSAGE_TYPE, 1, 5, OPT_END],
        );
        assert_eq!(lease_event(&ack, MAC), Some(LeaseEvent::Acked(Ipv4Addr::new(10, 0, 2, 15))));
        let offer = reply([10, 0, 2, 15], &[OPT_MESSAGE_TYPE, 1, 2, OPT_END]);
        assert_eq!(
            parse_reply(&offer),
            Some(Reply {
                kind: MessageType::Offer,
                addr: Ipv4Addr::new(10, 0, 2, 15),
                client_mac: MAC
            })
        );
        assert_eq!(lease_event(&offer, MAC), None);
        let nak = reply([0; 4], &[OPT_MESSAGE_TYPE, 1, 6, OPT_END]);
        assert_eq!(lease_event(&nak, MAC), Some(LeaseEvent::Refused));
    }

    #[test]
    fn an_ack_for_another_client_is_not_our_lease() {
        let ack = reply([10, 0, 2, 16], &[OPT_MESSAGE_TYPE, 1, 5, OPT_END]);
        assert_eq!(lease_event(&ack, [0x52, 0x54, 0, 0, 0, 1]), None);
    }

    #[test]
    fn truncated_and_malformed_replies_are_ignored() {
        let ack = reply([10, 0, 2, 15], &[OPT_MESSAGE_TYPE, 1, 5, OPT_END]);
        for len in 0..ack.len() - 2 {
            assert_eq!(lease_event(&ack[..len], MAC), None, "cut at {len}");
        }
        // An option whose length runs past the end.
        assert_eq!(lease_event(&reply([10, 0, 2, 15], &[12, 200, b'x']), MAC), None);
        // No message type at all.
        assert_eq!(lease_event(&reply([10, 0, 2, 15], &[OPT_END]), MAC), None);
        // A request (op 1) from a client, not a reply.
        let mut request = ack.clone();
        request[14 + 20 + 8] = 1;
        assert_eq!(lease_event(&request, MAC), None);
    }

    #[test]
    fn random_frames_never_panic() {
        let mut rng = testkit::Rng(0x5eed);
        let ack = reply([10, 0, 2, 15], &[OPT_MESSAGE_TYPE, 1, 5, OPT_END]);
        for _ in 0..2000 {
            let mut frame = ack.clone();
            for _ in 0..4 {
                let at = rng.below(frame.len() as u64) as usize;
                frame[at] = rng.next() as u8;
            }
            let _ = lease_event(&frame, MAC);
        }
    }
}
