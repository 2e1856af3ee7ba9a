//! Hutch's own bindings to the part of libslirp (≥ 4.7, `libslirp.h`) the user-mode backend
//! uses. Hand-written rather than the `libslirp-sys` crate, whose callback table lacks the
//! config-version-4 fields libslirp reads when `version >= 4` (NETWORKING.md §1.1).
//!
//! Layouts follow the C header field by field; the tests pin the LP64 sizes gcc reports for
//! libslirp 4.7.0 so a mistake shows as a failing test, not as slirp reading a wrong field.

use std::ffi::{c_char, c_int, c_void};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// The config version we fill in: 4 is the newest bookworm's 4.7.0 accepts (5 makes
/// `slirp_new` return NULL there), and 4.8/4.9 still accept it.
pub const SLIRP_CONFIG_VERSION: u32 = 4;

pub const SLIRP_POLL_IN: c_int = 1 << 0;
pub const SLIRP_POLL_OUT: c_int = 1 << 1;
pub const SLIRP_POLL_PRI: c_int = 1 << 2;
pub const SLIRP_POLL_ERR: c_int = 1 << 3;
pub const SLIRP_POLL_HUP: c_int = 1 << 4;

pub const SLIRP_HOSTFWD_UDP: c_int = 1;

/// The opaque `Slirp` instance.
#[repr(C)]
pub struct Slirp {
    _private: [u8; 0],
}

/// `SlirpTimerId` (a C enum: `int`-sized). Only `SLIRP_TIMER_RA` (0) exists in 4.7–4.9; slirp
/// hands the value back to us and we hand it back to `slirp_handle_timer` unchanged.
pub type SlirpTimerId = c_int;

pub type SlirpReadCb =
    unsafe extern "C" fn(buf: *mut c_void, len: usize, opaque: *mut c_void) -> isize;
pub type SlirpWriteCb =
    unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize;
pub type SlirpTimerCb = unsafe extern "C" fn(opaque: *mut c_void);
pub type SlirpAddPollCb =
    unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
pub type SlirpGetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

/// `SlirpCb` with the version-4 fields (`init_completed`, `timer_new_opaque`).
#[repr(C)]
pub struct SlirpCb {
    pub send_packet: Option<SlirpWriteCb>,
    pub guest_error: Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>,
    pub clock_get_ns: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    pub timer_new: Option<
        unsafe extern "C" fn(
            cb: SlirpTimerCb,
            cb_opaque: *mut c_void,
            opaque: *mut c_void,
        ) -> *mut c_void,
    >,
    pub timer_free: Option<unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void)>,
    pub timer_mod:
        Option<unsafe extern "C" fn(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void)>,
    pub register_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub unregister_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    pub notify: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    pub init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    pub timer_new_opaque: Option<
        unsafe extern "C" fn(
            id: SlirpTimerId,
            cb_opaque: *mut c_void,
            opaque: *mut c_void,
        ) -> *mut c_void,
    >,
}

/// `SlirpConfig` up to version 4 (`disable_dhcp`). C `bool` is Rust `bool`.
#[repr(C)]
pub struct SlirpConfig {
    pub version: u32,
    pub restricted: c_int,
    pub in_enabled: bool,
    pub vnetwork: libc::in_addr,
    pub vnetmask: libc::in_addr,
    pub vhost: libc::in_addr,
    pub in6_enabled: bool,
    pub vprefix_addr6: libc::in6_addr,
    pub vprefix_len: u8,
    pub vhost6: libc::in6_addr,
    pub vhostname: *const c_char,
    pub tftp_server_name: *const c_char,
    pub tftp_path: *const c_char,
    pub bootfile: *const c_char,
    pub vdhcp_start: libc::in_addr,
    pub vnameserver: libc::in_addr,
    pub vnameserver6: libc::in6_addr,
    pub vdnssearch: *const *const c_char,
    pub vdomainname: *const c_char,
    pub if_mtu: usize,
    pub if_mru: usize,
    pub disable_host_loopback: bool,
    pub enable_emu: bool,
    /// Kept by slirp as a pointer, not copied: it must outlive the instance.
    pub outbound_addr: *const libc::sockaddr_in,
    pub outbound_addr6: *const libc::sockaddr_in6,
    pub disable_dns: bool,
    pub disable_dhcp: bool,
}

#[link(name = "slirp")]
extern "C" {
    pub fn slirp_new(
        cfg: *const SlirpConfig,
        callbacks: *const SlirpCb,
        opaque: *mut c_void,
    ) -> *mut Slirp;
    pub fn slirp_cleanup(slirp: *mut Slirp);
    pub fn slirp_pollfds_fill(
        slirp: *mut Slirp,
        timeout_ms: *mut u32,
        add_poll: SlirpAddPollCb,
        opaque: *mut c_void,
    );
    pub fn slirp_pollfds_poll(
        slirp: *mut Slirp,
        select_error: c_int,
        get_revents: SlirpGetREventsCb,
        opaque: *mut c_void,
    );
    pub fn slirp_input(slirp: *mut Slirp, pkt: *const u8, pkt_len: c_int);
    pub fn slirp_handle_timer(slirp: *mut Slirp, id: SlirpTimerId, cb_opaque: *mut c_void);
    pub fn slirp_add_hostxfwd(
        slirp: *mut Slirp,
        haddr: *const libc::sockaddr,
        haddrlen: libc::socklen_t,
        gaddr: *const libc::sockaddr,
        gaddrlen: libc::socklen_t,
        flags: c_int,
    ) -> c_int;
    pub fn slirp_remove_hostxfwd(
        slirp: *mut Slirp,
        haddr: *const libc::sockaddr,
        haddrlen: libc::socklen_t,
        flags: c_int,
    ) -> c_int;
    pub fn slirp_state_save(slirp: *mut Slirp, write_cb: SlirpWriteCb, opaque: *mut c_void);
    pub fn slirp_state_version() -> c_int;
    pub fn slirp_state_load(
        slirp: *mut Slirp,
        version_id: c_int,
        read_cb: SlirpReadCb,
        opaque: *mut c_void,
    ) -> c_int;
    pub fn slirp_version_string() -> *const c_char;
}

/// An IPv4 address as C's `struct in_addr` (network byte order).
pub fn in_addr(addr: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from(addr).to_be() }
}

/// An IPv6 address as C's `struct in6_addr`.
pub fn in6_addr(addr: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr { s6_addr: addr.octets() }
}

/// A socket address as C's `sockaddr_storage` plus the length of the part in use. The storage
/// is full-sized because slirp's `remove_hostxfwd` compares against a `sockaddr_storage`.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type
            // (POSIX), so viewing its start as a sockaddr_in is in bounds and aligned.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = in_addr(*v4.ip());
            set_sockaddr_len(&mut storage, std::mem::size_of::<libc::sockaddr_in>());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = in6_addr(*v6.ip());
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            set_sockaddr_len(&mut storage, std::mem::size_of::<libc::sockaddr_in6>());
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // Both sizes are a few dozen bytes: the cast cannot truncate.
    (storage, len as libc::socklen_t)
}

/// The BSDs (macOS) carry the address length in the first byte; Linux has no such field.
#[cfg(any(
    target_os = "macos",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd"
))]
fn set_sockaddr_len(storage: &mut libc::sockaddr_storage, len: usize) {
    storage.ss_len = len as u8;
}

#[cfg(not(any(
    target_os = "macos",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd"
)))]
fn set_sockaddr_len(_storage: &mut libc::sockaddr_storage, _len: usize) {}

/// libslirp's version, e.g. "4.7.0".
pub fn version_string() -> String {
    // SAFETY: slirp_version_string takes no arguments and returns a pointer to a static
    // NUL-terminated string (or NULL, checked).
    let ptr = unsafe { slirp_version_string() };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated and static (see above).
    unsafe { std::ffi::CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}

/// The version of slirp's saved-state format, stored next to the state.
pub fn state_version() -> i32 {
    // SAFETY: no arguments, no state: it returns a constant.
    unsafe { slirp_state_version() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn layouts_match_libslirp_4_7_on_lp64() {
        // gcc's sizeof/offsetof on bookworm's libslirp.h (x86_64).
        assert_eq!(std::mem::size_of::<SlirpConfig>(), 184);
        assert_eq!(std::mem::size_of::<SlirpCb>(), 88);
        assert_eq!(std::mem::offset_of!(SlirpConfig, vhostname), 64);
        assert_eq!(std::mem::offset_of!(SlirpConfig, if_mtu), 136);
        assert_eq!(std::mem::offset_of!(SlirpConfig, disable_host_loopback), 152);
        assert_eq!(std::mem::offset_of!(SlirpConfig, outbound_addr), 160);
        assert_eq!(std::mem::offset_of!(SlirpConfig, disable_dhcp), 177);
    }

    #[test]
    fn the_linked_library_is_4_7_or_newer_with_a_known_state_version() {
        let version = version_string();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        assert!((major, minor) >= (4, 7), "libslirp {version}");
        assert!(state_version() >= 4, "state version {}", state_version());
    }

    #[test]
    fn socket_addresses_are_in_network_byte_order() {
        let (storage, len) = sockaddr("127.0.0.1:2222".parse().expect("literal"));
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: filled as a sockaddr_in just above.
        let sin =
            unsafe { *(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(sin.sin_port), 2222);
        assert_eq!(u32::from_be(sin.sin_addr.s_addr), 0x7f00_0001);
        let (_, len6) = sockaddr("[::1]:22".parse().expect("literal"));
        assert_eq!(len6 as usize, std::mem::size_of::<libc::sockaddr_in6>());
    }
}
