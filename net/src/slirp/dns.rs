//! Forwards the guest's UDP DNS queries to the DNS alias (10.0.2.3:53, [fec0::3]:53) to a DNS
//! server the user names, e.g. one on 127.0.0.1:5353. libslirp 4.7 can only redirect the alias
//! to the first `nameserver` in `/etc/resolv.conf` on port 53, so when a server is configured
//! the backend answers these frames itself and slirp never sees them.
//!
//! Each query gets its own connected host socket (so only the server's answer is accepted),
//! kept until the answer or [`QUERY_TIMEOUT`]; at most [`MAX_QUERIES`] wait at once, the oldest
//! give way (the guest's resolver retries).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::packet;

pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_QUERIES: usize = 64;
const DNS_PORT: u16 = 53;
/// The largest answer taken: EDNS0 answers reach 4096 bytes in practice; UDP's maximum.
const MAX_ANSWER: usize = 65507;

struct Query {
    socket: UdpSocket,
    guest_mac: [u8; 6],
    guest: SocketAddr,
    alias: SocketAddr,
    deadline: Instant,
}

pub struct DnsForwarder {
    server: SocketAddr,
    alias4: Ipv4Addr,
    alias6: Option<Ipv6Addr>,
    /// The MAC slirp puts on its own IPv4 frames (`52:55:` + the gateway's address).
    gateway_mac: [u8; 6],
    queries: VecDeque<Query>,
    buf: Vec<u8>,
}

impl DnsForwarder {
    pub fn new(
        server: SocketAddr,
        alias4: Ipv4Addr,
        alias6: Option<Ipv6Addr>,
        gateway_mac: [u8; 6],
    ) -> DnsForwarder {
        DnsForwarder {
            server,
            alias4,
            alias6,
            gateway_mac,
            queries: VecDeque::new(),
            buf: vec![0; MAX_ANSWER],
        }
    }

    /// Takes `frame` if it is a UDP query to the DNS alias (and forwards it): `true` means the
    /// frame is consumed, `false` that it is slirp's.
    pub fn intercept(&mut self, frame: &[u8], now: Instant) -> bool {
        let Some(udp) = packet::parse_udp(frame) else { return false };
        let to_alias = match udp.dst.ip() {
            IpAddr::V4(a) => a == self.alias4,
            IpAddr::V6(a) => Some(a) == self.alias6,
        };
        if !to_alias || udp.dst.port() != DNS_PORT {
            return false;
        }
        if let Err(e) = self.forward(udp.src_mac, udp.src, udp.dst, udp.payload, now) {
            log::warn!("DNS query to {} not forwarded to {}: {e}", udp.dst, self.server);
        }
        true
    }

    fn forward(
        &mut self,
        guest_mac: [u8; 6],
        guest: SocketAddr,
        alias: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) -> io::Result<()> {
        let local: SocketAddr = match self.server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        socket.connect(self.server)?;
        socket.send(payload)?;
        if self.queries.len() >= MAX_QUERIES {
            self.queries.pop_front();
        }
        self.queries.push_back(Query {
            socket,
            guest_mac,
            guest,
            alias,
            deadline: now + QUERY_TIMEOUT,
        });
        Ok(())
    }

    /// Adds the descriptors of waiting queries to the poll set.
    pub fn add_pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        fds.extend(self.queries.iter().map(|q| libc::pollfd {
            fd: q.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
    }

    /// When the next query expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queries.iter().map(|q| q.deadline).min()
    }

    /// Turns the answers that arrived into frames for the guest (`deliver`) and forgets
    /// answered and expired queries.
    pub fn poll(&mut self, now: Instant, mut deliver: impl FnMut(Vec<u8>)) {
        let buf = &mut self.buf;
        let server = self.server;
        let gateway_mac = self.gateway_mac;
        self.queries.retain(|q| {
            match q.socket.recv(buf) {
                Ok(n) => {
                    let src_mac = match q.alias.ip() {
                        IpAddr::V4(_) => gateway_mac,
                        // slirp's in6_compute_ethaddr: 52:56 and the address's last 4 bytes.
                        IpAddr::V6(a) => {
                            let o = a.octets();
                            [0x52, 0x56, o[12], o[13], o[14], o[15]]
                        }
                    };
                    let answer = buf.get(..n).unwrap_or_default();
                    match packet::udp_frame(src_mac, q.guest_mac, q.alias, q.guest, answer) {
                        Some(frame) => deliver(frame),
                        None => log::warn!("DNS answer of {n} bytes from {server} dropped"),
                    }
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => now < q.deadline,
                // ECONNREFUSED (no server there) and the like: the guest retries or gives up.
                Err(e) => {
                    log::debug!("DNS query to {server}: {e}");
                    false
                }
            }
        });
    }
}
