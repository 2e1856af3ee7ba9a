//! Tier-1 tests: a real libslirp driven with hand-built Ethernet frames, the test acting as the
//! guest. THE NETWORK RULE: each test runs on a thread moved into a fresh network namespace
//! that has nothing but loopback, so neither the test nor slirp can reach anything off the
//! machine; DNS goes to a responder the test runs on 127.0.0.1. A namespace that cannot be
//! made fails the test (root or CAP_SYS_ADMIN is needed; CI runs as root).

#![cfg(target_os = "linux")]

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::packet::{self, ETHERTYPE_IPV4, ETH_HEADER_LEN};
use super::*;
use crate::MAX_FRAME_LEN;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const BROADCAST: [u8; 6] = [0xff; 6];
const IPPROTO_TCP: u8 = 6;
const ETHERTYPE_ARP: u16 = 0x0806;
const WAIT: Duration = Duration::from_secs(3);

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// Runs `body` on a thread in a fresh network namespace with only `lo`, brought up.
fn in_fresh_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread (and the threads it
        // starts later) into a new namespace; it touches no memory of ours.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "cannot create a network namespace for the slirp tests (they need root or \
                 CAP_SYS_ADMIN, and never run on the host's network): {}",
                io::Error::last_os_error()
            );
        }
        loopback_up().expect("bring lo up in the test namespace");
        let devices = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
        let names: Vec<&str> =
            devices.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
        assert_eq!(names, ["lo"], "the test namespace must have nothing but loopback");
        body()
    });
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `ip link set lo up`, by ioctl.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket call; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass, which is valid.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn config() -> UserNetConfig {
    UserNetConfig { guest_mac: MAC, ..UserNetConfig::default() }
}

/// The test's side of the NIC: sends frames, and reads slirp's, answering ARP for the guest.
struct Guest {
    net: UserNet,
    woken: mpsc::Receiver<()>,
    buf: Vec<u8>,
}

impl Guest {
    fn new(config: UserNetConfig) -> Guest {
        let mut net = UserNet::new(config).expect("start slirp");
        let (wake, woken) = mpsc::channel();
        net.set_rx_notify(Box::new(move || {
            let _ = wake.send(());
        }));
        Guest { net, woken, buf: vec![0; MAX_FRAME_LEN] }
    }

    fn send(&mut self, frame: &[u8]) {
        self.net.send(frame).expect("send");
    }

    /// The frames slirp sends until `stop` says so or `wait` passes (ARP requests for the
    /// guest are answered and not returned).
    fn frames(&mut self, wait: Duration, mut stop: impl FnMut(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            while let Some(len) = self.net.recv(&mut self.buf).expect("recv") {
                let frame = self.buf[..len].to_vec();
                if let Some(reply) = arp_reply(&frame) {
                    self.send(&reply);
                    continue;
                }
                let done = stop(&frame);
                frames.push(frame);
                if done {
                    return frames;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return frames;
            }
            // The notify fires when the queue goes non-empty; recv drained it above.
            let _ = self.woken.recv_timeout(left);
        }
    }

    fn expect(&mut self, what: &str, mut matches: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let frames = self.frames(WAIT, &mut matches);
        match frames.last() {
            Some(last) if matches(last) => last.clone(),
            _ => panic!("no {what} within {WAIT:?}; got {} other frames", frames.len()),
        }
    }

    /// DISCOVER, OFFER, REQUEST, ACK.
    fn dhcp(&mut self) -> Ipv4Addr {
        self.send(&dhcp_request(1, None));
        let offer = self.expect("DHCP offer", |f| {
            dhcp::parse_reply(f).is_some_and(|r| r.kind == dhcp::MessageType::Offer)
        });
        let offered = dhcp::parse_reply(&offer).expect("offer").addr;
        assert_eq!(self.net.lease(), None, "an offer is not a lease");
        self.send(&dhcp_request(3, Some(offered)));
        self.expect("DHCP ack", |f| {
            dhcp::parse_reply(f).is_some_and(|r| r.kind == dhcp::MessageType::Ack)
        });
        offered
    }
}

/// The guest's answer to slirp's ARP request for 10.0.2.15.
fn arp_reply(frame: &[u8]) -> Option<Vec<u8>> {
    let arp = frame.get(ETH_HEADER_LEN..ETH_HEADER_LEN + 28)?;
    if frame[12..14] != ETHERTYPE_ARP.to_be_bytes() || arp[6..8] != [0, 1] {
        return None;
    }
    if arp[24..28] != DHCP_START.octets() {
        return None;
    }
    let (sha, spa) = (&arp[8..14], &arp[14..18]);
    let mut reply = Vec::with_capacity(42);
    reply.extend_from_slice(sha);
    reply.extend_from_slice(&MAC);
    reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&MAC);
    reply.extend_from_slice(&DHCP_START.octets());
    reply.extend_from_slice(sha);
    reply.extend_from_slice(spa);
    Some(reply)
}

/// A DHCP DISCOVER (1) or REQUEST (3) from [`MAC`].
fn dhcp_request(kind: u8, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let mut bootp = vec![0u8; 240];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[28..34].copy_from_slice(&MAC);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, kind]);
    if let Some(addr) = requested {
        bootp.extend_from_slice(&[50, 4]);
        bootp.extend_from_slice(&addr.octets());
        bootp.extend_from_slice(&[54, 4]);
        bootp.extend_from_slice(&GATEWAY.octets());
    }
    bootp.push(255);
    let from = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
    let to = SocketAddr::from((Ipv4Addr::BROADCAST, 67));
    packet::udp_frame(MAC, BROADCAST, from, to, &bootp).expect("v4")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tcp {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// A TCP/IPv4 segment from the guest, checksums filled in.
fn tcp_frame(t: &Tcp) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + t.payload.len());
    tcp.extend_from_slice(&t.src.port().to_be_bytes());
    tcp.extend_from_slice(&t.dst.port().to_be_bytes());
    tcp.extend_from_slice(&t.seq.to_be_bytes());
    tcp.extend_from_slice(&t.ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, t.flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(&t.payload);
    let sum = packet::pseudo_header_sum(
        (*t.src.ip()).into(),
        (*t.dst.ip()).into(),
        IPPROTO_TCP,
        tcp.len(),
    );
    let check = packet::fold(packet::ones_sum(sum, &tcp));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(
        &packet::ipv4_header(*t.src.ip(), *t.dst.ip(), IPPROTO_TCP, tcp.len()).expect("small"),
    );
    frame.extend_from_slice(&tcp);
    frame
}

fn parse_tcp(frame: &[u8]) -> Option<Tcp> {
    if frame.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let ip = frame.get(ETH_HEADER_LEN..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
    if *ip.get(9)? != IPPROTO_TCP {
        return None;
    }
    let addr = |at: usize| Some(Ipv4Addr::from(<[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?));
    let tcp = ip.get(ihl..total)?;
    let be16 = |at: usize| Some(u16::from_be_bytes(tcp.get(at..at + 2)?.try_into().ok()?));
    let be32 = |at: usize| Some(u32::from_be_bytes(tcp.get(at..at + 4)?.try_into().ok()?));
    let data_off = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Tcp {
        src: SocketAddrV4::new(addr(12)?, be16(0)?),
        dst: SocketAddrV4::new(addr(16)?, be16(2)?),
        seq: be32(4)?,
        ack: be32(8)?,
        flags: *tcp.get(13)?,
        payload: tcp.get(data_off..)?.to_vec(),
    })
}

/// The destination of the IPv4/TCP packet an ICMP "destination unreachable" quotes.
fn icmp_unreachable_for(frame: &[u8]) -> Option<SocketAddrV4> {
    if frame.get(12..14)? != ETHERTYPE_IPV4.to_be_bytes() {
        return None;
    }
    let ip = frame.get(ETH_HEADER_LEN..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    const IPPROTO_ICMP: u8 = 1;
    if *ip.get(9)? != IPPROTO_ICMP || *ip.get(ihl)? != 3 {
        return None;
    }
    let quoted = ip.get(ihl + 8..)?;
    let quoted_ihl = usize::from(quoted.first()? & 0x0f) * 4;
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(quoted.get(16..20)?).ok()?);
    let port = u16::from_be_bytes(quoted.get(quoted_ihl + 2..quoted_ihl + 4)?.try_into().ok()?);
    Some(SocketAddrV4::new(dst, port))
}

fn guest_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(DHCP_START, port)
}

/// The guest's SYN to `dst` and slirp's answer (SYN-ACK, RST, or `None`).
fn syn(guest: &mut Guest, from_port: u16, dst: SocketAddrV4, wait: Duration) -> Option<Tcp> {
    let syn =
        Tcp { src: guest_addr(from_port), dst, seq: 1000, ack: 0, flags: SYN, payload: vec![] };
    guest.send(&tcp_frame(&syn));
    let frames = guest.frames(wait, |f| parse_tcp(f).is_some_and(|t| t.dst == syn.src));
    frames.iter().filter_map(|f| parse_tcp(f)).find(|t| t.dst == syn.src)
}

/// A DNS responder on 127.0.0.1 that answers `queries` queries: the same id with QR set, the
/// question echoed and a marker after it.
fn dns_responder(queries: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let server = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS responder");
    let addr = server.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..queries {
            let (n, from) = server.recv_from(&mut buf).expect("a query");
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80;
            answer.extend_from_slice(b"answer");
            server.send_to(&answer, from).expect("answer");
        }
    });
    (addr, thread)
}

/// A DNS query from the guest's `from` to the alias `to`, and its answer.
fn resolve(guest: &mut Guest, from: SocketAddr, to: SocketAddr) {
    let query = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    guest.send(&packet::udp_frame(MAC, GATEWAY_MAC, from, to, &query).expect("frame"));
    let answer = guest.expect("DNS answer", |f| {
        packet::parse_udp(f).is_some_and(|u| u.dst == from && u.src == to)
    });
    assert_eq!(answer[..6], MAC, "to the guest's MAC");
    let udp = packet::parse_udp(&answer).expect("udp");
    assert_eq!(udp.payload[..2], query[..2], "same id");
    assert_eq!(udp.payload[2] & 0x80, 0x80, "a response");
    assert!(udp.payload.ends_with(b"answer"));
}

#[test]
fn dhcp_gives_the_guest_10_0_2_15_and_lease_reports_it() {
    in_fresh_netns(|| {
        let mut guest = Guest::new(config());
        assert_eq!(guest.dhcp(), DHCP_START);
        assert_eq!(guest.net.lease(), Some(DHCP_START));
        assert_eq!(guest.net.stats(), UserNetStats::default());
    });
}

#[test]
fn dns_queries_to_the_alias_reach_the_configured_server_and_the_answers_come_back() {
    in_fresh_netns(|| {
        let (server_addr, responder) = dns_responder(2);
        let mut guest = Guest::new(UserNetConfig { dns_server: Some(server_addr), ..config() });
        resolve(
            &mut guest,
            "10.0.2.15:40000".parse().expect("literal"),
            SocketAddr::from((DNS, 53)),
        );
        resolve(
            &mut guest,
            "[fec0::15]:40001".parse().expect("literal"),
            SocketAddr::from((DNS6, 53)),
        );
        responder.join().expect("responder");
    });
}

#[test]
fn the_gateway_reaches_the_hosts_loopback() {
    in_fresh_netns(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut guest = Guest::new(config());
        let answer =
            syn(&mut guest, 40000, SocketAddrV4::new(GATEWAY, port), WAIT).expect("an answer");
        assert_eq!(answer.flags & (SYN | ACK), SYN | ACK, "{answer:?}");
        assert_eq!(answer.ack, 1001);
        assert_eq!(answer.src, SocketAddrV4::new(GATEWAY, port));
        let (_, peer) = listener.accept().expect("slirp's connection");
        assert!(peer.ip().is_loopback());
    });
}

#[test]
fn isolate_from_host_keeps_the_gateway_away_from_the_hosts_loopback_but_not_dns() {
    in_fresh_netns(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let (dns_server, responder) = dns_responder(1);
        let mut guest = Guest::new(UserNetConfig {
            isolate_from_host: true,
            dns_server: Some(dns_server),
            ..config()
        });
        let server = SocketAddrV4::new(GATEWAY, port);
        let syn = Tcp {
            src: guest_addr(40000),
            dst: server,
            seq: 1000,
            ack: 0,
            flags: SYN,
            payload: vec![],
        };
        guest.send(&tcp_frame(&syn));
        // slirp's connect() fails (EPERM): the guest gets "unreachable", not a connection.
        let frames = guest.frames(WAIT, |f| icmp_unreachable_for(f).is_some());
        assert!(
            frames.iter().all(|f| parse_tcp(f).is_none_or(|t| t.flags & SYN == 0)),
            "a SYN-ACK came back"
        );
        let quoted = frames.iter().find_map(|f| icmp_unreachable_for(f));
        assert_eq!(quoted, Some(server), "an ICMP unreachable quoting the SYN");
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the host listener was reached: {accepted:?}"
        );
        // The DNS alias still answers, as libslirp's own redirect does when isolated.
        resolve(
            &mut guest,
            "10.0.2.15:40002".parse().expect("literal"),
            SocketAddr::from((DNS, 53)),
        );
        responder.join().expect("responder");
    });
}

#[test]
fn a_host_forward_added_at_run_time_reaches_the_guest_port() {
    in_fresh_netns(|| {
        let mut guest = Guest::new(config());
        let tcp: Forward = "tcp::2222-:22".parse().expect("spec");
        let udp: Forward = "udp:127.0.0.1:5353-:53".parse().expect("spec");
        guest.net.add_forward(tcp).expect("tcp forward");
        guest.net.add_forward(udp).expect("udp forward");
        assert_eq!(guest.net.forwards(), [tcp, udp]);

        let _client = TcpStream::connect("127.0.0.1:2222").expect("connect to the forward");
        let syn = guest.expect("SYN to the guest", |f| {
            parse_tcp(f).is_some_and(|t| t.dst == guest_addr(22) && t.flags & SYN != 0)
        });
        assert_eq!(parse_tcp(&syn).expect("tcp").flags & ACK, 0, "a bare SYN");

        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client.send_to(b"hello guest", "127.0.0.1:5353").expect("send");
        let datagram = guest.expect("UDP datagram to the guest", |f| {
            packet::parse_udp(f).is_some_and(|u| u.dst == SocketAddr::V4(guest_addr(53)))
        });
        assert_eq!(packet::parse_udp(&datagram).expect("udp").payload, b"hello guest");

        // An IPv6 host address is refused up front rather than listening in vain.
        let v6: Forward = "tcp:[::1]:2224-:80".parse().expect("spec");
        let err = guest.net.add_forward(v6).expect_err("IPv6 host address");
        assert!(matches!(err, UserNetError::ForwardIpv6 { .. }), "{err:?}");
        assert!(TcpListener::bind("[::1]:2224").is_ok(), "nothing listens there");
    });
}

#[test]
fn a_busy_host_port_is_an_error_naming_it() {
    in_fresh_netns(|| {
        let busy = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = busy.local_addr().expect("addr").port();
        let forward = Forward::new(Proto::Tcp, port, 22);
        let guest = Guest::new(config());
        let err = guest.net.add_forward(forward).expect_err("the port is taken");
        let text = err.to_string();
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        let UserNetError::ForwardBusy { source, .. } = &err else { panic!("{err:?}") };
        assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
        assert!(guest.net.forwards().is_empty());

        // The same at start.
        let err = UserNet::new(UserNetConfig { forwards: vec![forward], ..config() })
            .expect_err("the port is taken");
        assert!(matches!(err, UserNetError::ForwardBusy { .. }), "{err:?}");

        // And a second forward on one host socket is refused before slirp is asked.
        drop(busy);
        guest.net.add_forward(forward).expect("free now");
        let again = Forward { guest_port: 23, ..forward };
        let err = guest.net.add_forward(again).expect_err("already forwarded");
        assert!(matches!(err, UserNetError::ForwardExists { .. }), "{err:?}");
    });
}

#[test]
fn remove_forward_frees_the_host_port() {
    in_fresh_netns(|| {
        let guest = Guest::new(config());
        let forward: Forward = "tcp::2222-:22".parse().expect("spec");
        guest.net.add_forward(forward).expect("add");
        assert!(TcpListener::bind("127.0.0.1:2222").is_err(), "slirp listens");
        guest.net.remove_forward(forward).expect("remove");
        assert!(guest.net.forwards().is_empty());
        TcpListener::bind("127.0.0.1:2222").expect("the port is free again");
        let err = guest.net.remove_forward(forward).expect_err("gone");
        assert!(matches!(err, UserNetError::ForwardNotFound { .. }), "{err:?}");

        // Dropping the backend stops its thread and closes what slirp listened on.
        let kept: Forward = "udp::2223-:53".parse().expect("spec");
        guest.net.add_forward(kept).expect("add");
        assert!(UdpSocket::bind("127.0.0.1:2223").is_err(), "slirp listens");
        drop(guest);
        UdpSocket::bind("127.0.0.1:2223").expect("freed by drop");
    });
}

#[test]
fn after_a_restore_old_connections_are_reset_new_ones_work_and_the_lease_stays() {
    in_fresh_netns(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let server = SocketAddrV4::new(GATEWAY, port);
        let mut guest = Guest::new(config());
        guest.dhcp();
        let synack = syn(&mut guest, 40000, server, WAIT).expect("SYN-ACK");
        assert_eq!(synack.flags & (SYN | ACK), SYN | ACK);
        let ack = Tcp {
            src: guest_addr(40000),
            dst: server,
            seq: 1001,
            ack: synack.seq.wrapping_add(1),
            flags: ACK,
            payload: vec![],
        };
        guest.send(&tcp_frame(&ack));
        let (mut host_side, _) = listener.accept().expect("accept");

        let state = guest.net.save_state().expect("save");
        drop(guest);
        let mut guest = Guest::new(config());
        guest.net.restore_state(&state).expect("restore");
        assert_eq!(guest.net.lease(), Some(DHCP_START));

        // Data on the old connection: slirp has no socket for it any more.
        let data = Tcp { flags: ACK | PSH, payload: b"still there?".to_vec(), ..ack.clone() };
        guest.send(&tcp_frame(&data));
        let reset = guest.expect("RST on the old connection", |f| {
            parse_tcp(f).is_some_and(|t| t.dst == ack.src && t.flags & RST != 0)
        });
        assert_eq!(parse_tcp(&reset).expect("tcp").src, server);
        // The host side of the old connection is gone with the old slirp.
        host_side.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut buf = [0u8; 16];
        assert!(matches!(host_side.read(&mut buf), Ok(0) | Err(_)), "old host socket closed");

        let synack = syn(&mut guest, 40001, server, WAIT).expect("a new connection's answer");
        assert_eq!(synack.flags & (SYN | ACK), SYN | ACK, "new connections work: {synack:?}");
    });
}

#[test]
fn foreign_or_damaged_saved_state_is_refused() {
    in_fresh_netns(|| {
        let mut guest = Guest::new(config());
        let state = guest.net.save_state().expect("save");
        let refuse = |net: &UserNet, bytes: &[u8]| net.restore(bytes).expect_err("refused");
        assert!(matches!(refuse(&guest.net, b""), UserNetError::StateFormat));
        assert!(matches!(refuse(&guest.net, b"not a state at all"), UserNetError::StateFormat));
        let mut future = state.clone();
        future[8..12].copy_from_slice(&1000i32.to_le_bytes());
        assert!(matches!(refuse(&guest.net, &future), UserNetError::StateVersion { .. }));
        let cut = &state[..state.len() - 10];
        assert!(matches!(refuse(&guest.net, cut), UserNetError::StateLength { .. }), "truncated");
        let mut longer = state.clone();
        longer.push(0);
        assert!(matches!(refuse(&guest.net, &longer), UserNetError::StateLength { .. }), "stray");
        // Through the trait: a backend error keeps its chain.
        let err = guest.net.restore_state(b"junk").expect_err("refused");
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.downcast_ref::<UserNetError>().is_some(), "{err}");
        guest.net.restore_state(&state).expect("its own state");
    });
}

#[test]
fn frames_outside_the_ethernet_limits_and_too_small_buffers_are_errors() {
    in_fresh_netns(|| {
        let mut guest = Guest::new(config());
        assert!(matches!(guest.net.send(&[0; 13]), Err(NetError::FrameLength { .. })));
        assert!(matches!(
            guest.net.send(&vec![0; MAX_FRAME_LEN + 1]),
            Err(NetError::FrameLength { .. })
        ));
        // Junk of a legal length is slirp's to drop, not an error.
        guest.net.send(&[0xee; 60]).expect("junk frame");
        // A too-small receive buffer is an error, not a silent cut.
        guest.send(&dhcp_request(1, None));
        let deadline = Instant::now() + WAIT;
        let mut small = [0u8; 20];
        let result = loop {
            match guest.net.recv(&mut small) {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => break other,
            }
        };
        assert!(matches!(result, Err(NetError::FrameLength { max: 20, .. })), "{result:?}");
    });
}

unsafe extern "C" fn count_call(opaque: *mut c_void) {
    // SAFETY: the test passes a live AtomicUsize as this timer's argument.
    unsafe { &*opaque.cast::<std::sync::atomic::AtomicUsize>() }.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn armed_timers_fire_once_when_due_and_freed_ones_never() {
    use std::sync::atomic::AtomicUsize;
    let state = Box::new(CbState {
        shared: Arc::new(Shared::new(MAC).expect("shared")),
        clock_base: Instant::now(),
        timers: RefCell::new(Vec::new()),
    });
    let opaque = (&*state as *const CbState).cast_mut().cast::<c_void>();
    let (due, later) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let arg = |c: &AtomicUsize| (c as *const AtomicUsize).cast_mut().cast::<c_void>();
    // SAFETY: the callbacks as slirp calls them: our opaque, then the handles they returned.
    unsafe {
        let t_due = timer_new(count_call, arg(&due), opaque);
        let t_later = timer_new(count_call, arg(&later), opaque);
        let now = clock_get_ns(opaque) / 1_000_000;
        timer_mod(t_due, now - 1, opaque);
        timer_mod(t_later, now + 100_000, opaque);
        assert_eq!(state.next_timer_ms(), Some(now - 1));
        state.fire_due_timers(std::ptr::null_mut());
        state.fire_due_timers(std::ptr::null_mut());
        assert_eq!((due.load(Ordering::SeqCst), later.load(Ordering::SeqCst)), (1, 0));
        assert_eq!(state.next_timer_ms(), Some(now + 100_000), "the fired timer disarmed");
        timer_free(t_later, opaque);
        // A freed handle is not ours any more: modifying or freeing it again does nothing.
        timer_mod(t_later, now - 1, opaque);
        timer_free(t_later, opaque);
        assert_eq!(state.next_timer_ms(), None);
        timer_mod(t_due, now - 1, opaque);
        state.fire_due_timers(std::ptr::null_mut());
        assert_eq!(due.load(Ordering::SeqCst), 2, "re-armed, it fires again");
    }
    free_timers(&state);
    assert!(state.timers.borrow().is_empty());
}

#[test]
fn a_full_tx_queue_drops_and_counts_instead_of_blocking() {
    in_fresh_netns(|| {
        let mut net = UserNet::new(config()).expect("start slirp");
        // The RX notify runs on the net thread: holding it there keeps the TX queue undrained.
        let (entered, is_blocked) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        net.set_rx_notify(Box::new(move || {
            let _ = entered.send(());
            let _ = lock(&released).recv();
        }));
        net.send(&dhcp_request(1, None)).expect("send");
        is_blocked.recv_timeout(WAIT).expect("the net thread delivers the offer");
        let junk = [0xee; 60];
        let extra = 10;
        for _ in 0..TX_QUEUE_FRAMES + extra {
            net.send(&junk).expect("send never blocks nor fails when full");
        }
        assert_eq!(net.stats().tx_dropped, extra as u64);
        drop(release);
        let mut buf = vec![0; MAX_FRAME_LEN];
        assert!(net.recv(&mut buf).expect("recv").is_some(), "the offer");
    });
}

#[test]
fn a_notify_set_after_frames_arrived_is_still_called() {
    in_fresh_netns(|| {
        let mut net = UserNet::new(config()).expect("start slirp");
        net.send(&dhcp_request(1, None)).expect("send");
        // The offer is queued long before this (slirp answers within microseconds).
        std::thread::sleep(Duration::from_millis(100));
        let (wake, woken) = mpsc::channel();
        net.set_rx_notify(Box::new(move || {
            let _ = wake.send(());
        }));
        woken.recv_timeout(WAIT).expect("the notify is called for the waiting offer");
        let mut buf = vec![0; MAX_FRAME_LEN];
        let len = net.recv(&mut buf).expect("recv").expect("the offer");
        assert!(dhcp::parse_reply(&buf[..len]).is_some_and(|r| r.kind == dhcp::MessageType::Offer));
    });
}
