//! Host port forwards into the guest, in QEMU's `hostfwd` syntax:
//! `tcp:127.0.0.1:2222-:22`, `tcp::2222-:22` (host address 127.0.0.1), `udp:[::1]:5353-:53`.
//!
//! Unlike QEMU, whose default host address is 0.0.0.0, an omitted host address means 127.0.0.1,
//! so a forwarded ssh is not exposed to the LAN by accident. The guest end is always the guest's
//! DHCP address (10.0.2.15). IPv6 host addresses parse (the syntax is QEMU's), but the libslirp
//! backend refuses them for now: see `UserNetError::ForwardIpv6`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// The host address a forward listens on when the spec leaves it out.
pub const DEFAULT_HOST_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One host port forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Forward {
    pub proto: Proto,
    pub host_addr: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl Forward {
    /// A forward from `127.0.0.1:host_port`.
    pub fn new(proto: Proto, host_port: u16, guest_port: u16) -> Forward {
        Forward { proto, host_addr: DEFAULT_HOST_ADDR, host_port, guest_port }
    }

    /// The host socket address the forward listens on.
    pub fn host(&self) -> SocketAddr {
        SocketAddr::new(self.host_addr, self.host_port)
    }

    /// Whether two forwards would listen on the same host socket.
    pub fn same_host_socket(&self, other: &Forward) -> bool {
        self.proto == other.proto && self.host() == other.host()
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_addr {
            IpAddr::V4(a) => {
                write!(f, "{}:{a}:{}-:{}", self.proto, self.host_port, self.guest_port)
            }
            IpAddr::V6(a) => {
                write!(f, "{}:[{a}]:{}-:{}", self.proto, self.host_port, self.guest_port)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardSpecError {
    #[error("Forward {spec:?}: expected PROTO:[HOSTADDR]:HOSTPORT-:GUESTPORT, e.g. tcp:127.0.0.1:2222-:22")]
    Syntax { spec: String },
    #[error("Forward {spec:?}: unknown protocol {proto:?} (tcp or udp)")]
    Proto { spec: String, proto: String },
    #[error("Forward {spec:?}: bad host address {addr:?}")]
    HostAddr {
        spec: String,
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("Forward {spec:?}: bad {which} port {port:?} (1..=65535)")]
    Port {
        spec: String,
        which: &'static str,
        port: String,
        #[source]
        source: Option<std::num::ParseIntError>,
    },
    #[error("Forward {spec:?}: the guest address must be left out (forwards go to the guest's DHCP address)")]
    GuestAddr { spec: String },
}

impl FromStr for Forward {
    type Err = ForwardSpecError;

    fn from_str(spec: &str) -> Result<Forward, ForwardSpecError> {
        let syntax = || ForwardSpecError::Syntax { spec: spec.to_owned() };
        let (proto, rest) = spec.split_once(':').ok_or_else(syntax)?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => {
                return Err(ForwardSpecError::Proto {
                    spec: spec.to_owned(),
                    proto: proto.to_owned(),
                })
            }
        };
        let (host, guest) = rest.split_once('-').ok_or_else(syntax)?;
        // The host port follows the last colon; an IPv6 address sits in brackets before it.
        let (host_addr, host_port) = host.rsplit_once(':').ok_or_else(syntax)?;
        let host_addr = if host_addr.is_empty() {
            DEFAULT_HOST_ADDR
        } else {
            let bare = match host_addr.strip_prefix('[') {
                Some(inner) => inner.strip_suffix(']').ok_or_else(syntax)?,
                None if host_addr.contains(':') => return Err(syntax()),
                None => host_addr,
            };
            bare.parse::<IpAddr>().map_err(|source| ForwardSpecError::HostAddr {
                spec: spec.to_owned(),
                addr: host_addr.to_owned(),
                source,
            })?
        };
        let (guest_addr, guest_port) = guest.rsplit_once(':').ok_or_else(syntax)?;
        if !guest_addr.is_empty() {
            return Err(ForwardSpecError::GuestAddr { spec: spec.to_owned() });
        }
        Ok(Forward {
            proto,
            host_addr,
            host_port: parse_port(spec, "host", host_port)?,
            guest_port: parse_port(spec, "guest", guest_port)?,
        })
    }
}

fn parse_port(spec: &str, which: &'static str, text: &str) -> Result<u16, ForwardSpecError> {
    let error = |source| ForwardSpecError::Port {
        spec: spec.to_owned(),
        which,
        port: text.to_owned(),
        source,
    };
    match text.parse::<u16>() {
        Ok(0) => Err(error(None)),
        Ok(port) => Ok(port),
        Err(e) => Err(error(Some(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Forward {
        spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    #[test]
    fn qemu_style_specs_parse() {
        assert_eq!(parse("tcp:127.0.0.1:2222-:22"), Forward::new(Proto::Tcp, 2222, 22));
        assert_eq!(parse("tcp::2222-:22"), Forward::new(Proto::Tcp, 2222, 22));
        assert_eq!(parse("UDP::5353-:53"), Forward::new(Proto::Udp, 5353, 53));
        let any = parse("tcp:0.0.0.0:8080-:80");
        assert_eq!(any.host_addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let v6 = parse("udp:[::1]:5353-:53");
        assert_eq!(v6.host(), "[::1]:5353".parse::<SocketAddr>().expect("literal"));
        assert_eq!(v6.proto, Proto::Udp);
    }

    #[test]
    fn display_round_trips_through_parse() {
        for spec in ["tcp:127.0.0.1:2222-:22", "udp:10.1.2.3:65535-:1", "tcp:[::1]:8080-:80"] {
            assert_eq!(parse(spec).to_string(), spec);
            assert_eq!(parse(&parse(spec).to_string()), parse(spec));
        }
        assert_eq!(parse("tcp::2222-:22").to_string(), "tcp:127.0.0.1:2222-:22");
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        let err = |spec: &str| spec.parse::<Forward>().expect_err(spec);
        assert!(matches!(err(""), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("tcp"), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("tcp:2222:22"), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("tcp::2222-22"), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("tcp:::1:2222-:22"), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("tcp:[::1:2222-:22"), ForwardSpecError::Syntax { .. }));
        assert!(matches!(err("sctp::2222-:22"), ForwardSpecError::Proto { .. }));
        assert!(matches!(err("tcp:localhost:2222-:22"), ForwardSpecError::HostAddr { .. }));
        assert!(matches!(err("tcp:300.0.0.1:2222-:22"), ForwardSpecError::HostAddr { .. }));
        assert!(matches!(err("tcp::0-:22"), ForwardSpecError::Port { which: "host", .. }));
        assert!(matches!(err("tcp::2222-:0"), ForwardSpecError::Port { which: "guest", .. }));
        assert!(matches!(err("tcp::65536-:22"), ForwardSpecError::Port { which: "host", .. }));
        assert!(matches!(err("tcp::ssh-:22"), ForwardSpecError::Port { which: "host", .. }));
        assert!(matches!(err("tcp::2222-:"), ForwardSpecError::Port { which: "guest", .. }));
        assert!(matches!(err("tcp::2222-10.0.2.15:22"), ForwardSpecError::GuestAddr { .. }));
        assert!(err("tcp:1.2.3:2222-:22").to_string().contains("bad host address"));
    }

    #[test]
    fn forwards_on_one_host_socket_clash_whatever_their_guest_port() {
        let a = Forward::new(Proto::Tcp, 2222, 22);
        assert!(a.same_host_socket(&Forward::new(Proto::Tcp, 2222, 23)));
        assert!(!a.same_host_socket(&Forward::new(Proto::Udp, 2222, 22)));
        assert!(
            !a.same_host_socket(&Forward { host_addr: "127.0.0.2".parse().expect("literal"), ..a })
        );
    }
}
