//! User-mode NAT ("user" networking) on libslirp, as QEMU's `-netdev user`: DHCP (the guest
//! gets 10.0.2.15), a DNS forwarder at 10.0.2.3, IPv6 (fec0::/64), the gateway 10.0.2.2
//! reaching the host's 127.0.0.1 unless the VM is isolated from the host, and host port
//! forwards added and removed while the VM runs. No privileges needed.
//!
//! ```text
//!  device thread ── send ──▶ TX queue (bounded: full = drop) ─┐ wake pipe
//!                                                            ▼
//!                          net thread: slirp_input, slirp's poll loop and timers, commands
//!                                                            │ send_packet
//!  device thread ◀─ recv ── RX queue (bounded: full = drop) ◀┘ + RxNotify when it fills
//! ```
//!
//! libslirp is not thread-safe: one thread (the net thread) owns the instance and makes every
//! call into it; the rest of the VM talks to it through queues and commands.
//!
//! Snapshots: [`UserNet::save_state`] keeps what `slirp_state_save` keeps (the DHCP table and
//! IP id; NETWORKING.md §4) and the lease. NAT'd connections live in host sockets and are not
//! kept: after a restore, slirp answers the guest's segments on an old TCP connection with a
//! reset (tested below), and new connections work.

pub mod dhcp;
mod dns;
pub mod forward;
mod packet;
mod sys;
mod wake;

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

pub use forward::{Forward, ForwardSpecError, Proto};

use crate::{check_frame_len, NetBackend, NetError, RxNotify};
use sys::Slirp;
use wake::Waker;

/// The guest network and the addresses in it (QEMU's and VirtualBox's layout).
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The gateway, which is also the host's 127.0.0.1 to the guest (unless isolated).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The first (and, with one guest, the only) DHCP address.
pub const DHCP_START: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0);
pub const PREFIX6_LEN: u8 = 64;
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2);
pub const DNS6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3);
/// The source MAC of slirp's IPv4 frames: `52:55:` and the gateway's address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];
/// QEMU's default guest MAC; a VM should have its own, stable one.
pub const DEFAULT_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// libslirp's MTU limits (`if_mtu`/`if_mru`).
pub const MIN_MTU: usize = 68;
pub const MAX_MTU: usize = 65521;

/// Frames from the guest waiting for the net thread; beyond, `send` drops.
const TX_QUEUE_FRAMES: usize = 256;
/// Bytes of frames for the guest waiting for the device; beyond, slirp's frames are dropped.
const RX_QUEUE_BYTES: usize = 4 << 20;
/// Frames put into slirp per loop turn, so commands and host sockets are not starved.
const TX_BATCH: usize = 64;
/// How long `poll` sleeps when slirp asks for nothing sooner.
const IDLE_POLL_MS: u32 = 1000;
/// Our snapshot header: magic and format version 1.
const STATE_MAGIC: &[u8; 8] = b"HUTCHSL1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNetConfig {
    /// The guest NIC's MAC: DHCP replies to it update [`UserNet::lease`].
    pub guest_mac: [u8; 6],
    /// Where the DNS alias (10.0.2.3, fec0::3) sends UDP queries. `None`: libslirp's own
    /// redirect to the first `nameserver` of the host's `/etc/resolv.conf` (on macOS: the
    /// resolver's configuration). TCP DNS always takes libslirp's redirect.
    pub dns_server: Option<SocketAddr>,
    /// IPv6 in `fec0::/64` next to IPv4.
    pub ipv6: bool,
    /// The gateway stops reaching the host's loopback (`disable_host_loopback`): the guest
    /// still reaches the outside world, DNS and its forwards, not the host's local services
    /// (a connection to 10.0.2.2 gets an ICMP "unreachable").
    pub isolate_from_host: bool,
    /// The interface MTU slirp assumes (68..=65521).
    pub mtu: usize,
    /// Host port forwards set up at start.
    pub forwards: Vec<Forward>,
}

impl Default for UserNetConfig {
    fn default() -> UserNetConfig {
        UserNetConfig {
            guest_mac: DEFAULT_GUEST_MAC,
            dns_server: None,
            ipv6: true,
            isolate_from_host: false,
            mtu: 1500,
            forwards: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error("MTU {mtu} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu { mtu: usize },
    #[error("libslirp {version} refused the configuration (slirp_new failed)")]
    Create { version: String },
    #[error("Cannot make the net thread's wake pipe")]
    Waker(#[source] io::Error),
    #[error("Cannot start the net thread")]
    Thread(#[source] io::Error),
    #[error("The user-mode network stopped")]
    Stopped,
    #[error("Port forward {forward}: cannot listen on {} port {}", forward.proto, forward.host())]
    ForwardBusy {
        forward: Forward,
        #[source]
        source: io::Error,
    },
    #[error("Port forward {forward}: {} port {} is already forwarded", existing.proto, existing.host())]
    ForwardExists { forward: Forward, existing: Forward },
    #[error("Port forward {forward}: IPv6 host addresses are not supported (libslirp 4.7 cannot carry an IPv6 host connection to the guest's IPv4 address)")]
    ForwardIpv6 { forward: Forward },
    #[error("Port forward {forward}: no such forward")]
    ForwardNotFound { forward: Forward },
    #[error("Saved network state is not Hutch's user-mode state")]
    StateFormat,
    #[error("Saved network state has slirp state version {saved}; this libslirp reads up to {supported}")]
    StateVersion { saved: i32, supported: i32 },
    #[error("libslirp refused the saved network state")]
    StateLoad(#[source] io::Error),
    #[error("Saved network state is {why}")]
    StateLength { why: &'static str },
}

impl From<UserNetError> for NetError {
    fn from(e: UserNetError) -> NetError {
        match e {
            UserNetError::Stopped => NetError::Stopped { backend: BACKEND },
            e => NetError::Backend { backend: BACKEND, source: Box::new(e) },
        }
    }
}

const BACKEND: &str = "user";

/// Frames the backend dropped because a queue was full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserNetStats {
    pub tx_dropped: u64,
    pub rx_dropped: u64,
}

/// What the device thread and the net thread share.
struct Shared {
    guest_mac: [u8; 6],
    waker: Waker,
    stop: AtomicBool,
    /// Set when the net thread has ended (stopped, or died).
    exited: AtomicBool,
    /// A new RX notify was set: the net thread calls it if frames already wait.
    renotify: AtomicBool,
    rx: Mutex<RxQueue>,
    rx_notify: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    lease: Mutex<Option<Ipv4Addr>>,
    forwards: Mutex<Vec<Forward>>,
    tx_dropped: AtomicU64,
    rx_dropped: AtomicU64,
}

#[derive(Default)]
struct RxQueue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent across a panic (plain pushes and stores).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn new(guest_mac: [u8; 6]) -> io::Result<Shared> {
        Ok(Shared {
            guest_mac,
            waker: Waker::new()?,
            stop: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            renotify: AtomicBool::new(false),
            rx: Mutex::default(),
            rx_notify: Mutex::new(None),
            lease: Mutex::new(None),
            forwards: Mutex::default(),
            tx_dropped: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
        })
    }

    /// Calls the RX notify (outside the queue's lock).
    fn notify_rx(&self) {
        let notify = lock(&self.rx_notify).clone();
        if let Some(notify) = notify {
            notify();
        }
    }

    /// A frame for the guest: notes a DHCP lease, queues it and wakes the device.
    fn deliver(&self, frame: Vec<u8>) {
        if let Some(event) = dhcp::lease_event(&frame, self.guest_mac) {
            *lock(&self.lease) = match event {
                dhcp::LeaseEvent::Acked(addr) => Some(addr),
                dhcp::LeaseEvent::Refused => None,
            };
        }
        let was_empty = {
            let mut rx = lock(&self.rx);
            if rx.bytes + frame.len() > RX_QUEUE_BYTES {
                self.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            rx.bytes += frame.len();
            rx.frames.push_back(frame);
            rx.frames.len() == 1
        };
        if was_empty {
            self.notify_rx();
        }
    }
}

enum Command {
    AddForward(Forward, Sender<Result<(), UserNetError>>),
    RemoveForward(Forward, Sender<Result<(), UserNetError>>),
    SaveState(Sender<Vec<u8>>),
    LoadState { version: i32, blob: Vec<u8>, reply: Sender<Result<(), UserNetError>> },
}

/// The user-mode network backend of one NIC. Dropping it stops the net thread.
///
/// The RX notify runs on the net thread, so it must not wait for anything that waits for
/// the net thread (a lock held around [`UserNet::add_forward`], say): signalling an eventfd
/// is what it is for.
pub struct UserNet {
    shared: Arc<Shared>,
    frames: SyncSender<Vec<u8>>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for UserNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserNet")
            .field("lease", &self.lease())
            .field("forwards", &self.forwards())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl UserNet {
    /// Starts libslirp on its own thread with `config`, its forwards included (a busy host
    /// port is an error here too).
    pub fn new(config: UserNetConfig) -> Result<UserNet, UserNetError> {
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(UserNetError::Mtu { mtu: config.mtu });
        }
        let shared = Arc::new(Shared::new(config.guest_mac).map_err(UserNetError::Waker)?);
        let (frames, frames_rx) = mpsc::sync_channel(TX_QUEUE_FRAMES);
        let (commands, commands_rx) = mpsc::channel();
        let (ready, ready_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("net-user".into())
            .spawn(move || {
                let exited = ExitFlag(Arc::clone(&thread_shared));
                match NetLoop::new(&config, thread_shared, frames_rx, commands_rx) {
                    Ok(mut net) => {
                        let _ = ready.send(Ok(()));
                        net.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
                drop(exited);
            })
            .map_err(UserNetError::Thread)?;
        let net = UserNet { shared, frames, commands, thread: Some(thread) };
        // A thread that died before answering (a panic) reads as stopped.
        ready_rx.recv().map_err(|_| UserNetError::Stopped)??;
        Ok(net)
    }

    /// The guest's IPv4 address once slirp's DHCP server acknowledged one to the guest's MAC.
    pub fn lease(&self) -> Option<Ipv4Addr> {
        *lock(&self.shared.lease)
    }

    /// The forwards in place now.
    pub fn forwards(&self) -> Vec<Forward> {
        lock(&self.shared.forwards).clone()
    }

    pub fn stats(&self) -> UserNetStats {
        UserNetStats {
            tx_dropped: self.shared.tx_dropped.load(Ordering::Relaxed),
            rx_dropped: self.shared.rx_dropped.load(Ordering::Relaxed),
        }
    }

    /// Starts listening on the forward's host socket, now; connections go to the guest's
    /// DHCP address at `guest_port`.
    pub fn add_forward(&self, forward: Forward) -> Result<(), UserNetError> {
        self.call(|reply| Command::AddForward(forward, reply))?
    }

    /// Stops a forward and closes its host socket (connections already made stay).
    pub fn remove_forward(&self, forward: Forward) -> Result<(), UserNetError> {
        self.call(|reply| Command::RemoveForward(forward, reply))?
    }

    /// The state for a snapshot: our header, the lease and slirp's own blob.
    pub fn save(&self) -> Result<Vec<u8>, UserNetError> {
        let blob = self.call(Command::SaveState)?;
        let mut state = Vec::with_capacity(STATE_MAGIC.len() + 9 + blob.len());
        state.extend_from_slice(STATE_MAGIC);
        state.extend_from_slice(&sys::state_version().to_le_bytes());
        match self.lease() {
            Some(addr) => {
                state.push(1);
                state.extend_from_slice(&addr.octets());
            }
            None => state.extend_from_slice(&[0; 5]),
        }
        state.extend_from_slice(&blob);
        Ok(state)
    }

    /// Loads what [`UserNet::save`] returned (untrusted bytes from a snapshot file).
    pub fn restore(&self, state: &[u8]) -> Result<(), UserNetError> {
        let rest = state.strip_prefix(STATE_MAGIC).ok_or(UserNetError::StateFormat)?;
        let (version, rest) = rest.split_first_chunk::<4>().ok_or(UserNetError::StateFormat)?;
        let (lease, blob) = rest.split_first_chunk::<5>().ok_or(UserNetError::StateFormat)?;
        let version = i32::from_le_bytes(*version);
        let supported = sys::state_version();
        if !(1..=supported).contains(&version) {
            return Err(UserNetError::StateVersion { saved: version, supported });
        }
        let lease = match lease {
            [0, 0, 0, 0, 0] => None,
            [1, a, b, c, d] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
            _ => return Err(UserNetError::StateFormat),
        };
        let blob = blob.to_vec();
        self.call(|reply| Command::LoadState { version, blob, reply })??;
        *lock(&self.shared.lease) = lease;
        Ok(())
    }

    /// Runs a command on the net thread and waits for its answer.
    fn call<R>(&self, command: impl FnOnce(Sender<R>) -> Command) -> Result<R, UserNetError> {
        let (reply, answer) = mpsc::channel();
        self.commands.send(command(reply)).map_err(|_| UserNetError::Stopped)?;
        self.shared.waker.wake();
        answer.recv().map_err(|_| UserNetError::Stopped)
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the user-mode net thread panicked");
            }
        }
    }
}

impl UserNet {
    fn send_frame(&self, frame: &[u8]) -> Result<(), NetError> {
        check_frame_len(frame.len())?;
        match self.frames.try_send(frame.to_vec()) {
            Ok(()) => {}
            // Full: like a busy wire, the frame is lost and TCP retransmits.
            Err(TrySendError::Full(_)) => {
                self.shared.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(NetError::Stopped { backend: BACKEND })
            }
        }
        self.shared.waker.wake();
        Ok(())
    }

    fn recv_frame(&self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let frame = {
            let mut rx = lock(&self.shared.rx);
            let frame = rx.frames.pop_front();
            if let Some(f) = &frame {
                rx.bytes -= f.len();
            }
            frame
        };
        match frame {
            Some(frame) => {
                let max = buf.len();
                let dst = buf
                    .get_mut(..frame.len())
                    .ok_or(NetError::FrameLength { len: frame.len(), max })?;
                dst.copy_from_slice(&frame);
                Ok(Some(frame.len()))
            }
            None if self.shared.exited.load(Ordering::SeqCst) => {
                Err(NetError::Stopped { backend: BACKEND })
            }
            None => Ok(None),
        }
    }

    fn set_notify(&self, notify: RxNotify) {
        *lock(&self.shared.rx_notify) = Some(Arc::from(notify));
        // Frames may already wait: the net thread calls the new notify for them. Not here:
        // the caller may hold the lock its notify takes.
        self.shared.renotify.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
    }
}

/// The NIC's backend is a `UserNet` or, when the VM also manages its forwards and reads its
/// lease while the device owns the backend, an `Arc<UserNet>` shared with it.
macro_rules! user_net_backend {
    ($ty:ty) => {
        impl NetBackend for $ty {
            fn name(&self) -> &'static str {
                BACKEND
            }

            fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
                self.send_frame(frame)
            }

            fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
                self.recv_frame(buf)
            }

            fn set_rx_notify(&mut self, notify: RxNotify) {
                self.set_notify(notify)
            }

            fn save_state(&mut self) -> Result<Vec<u8>, NetError> {
                Ok(self.save()?)
            }

            fn restore_state(&mut self, state: &[u8]) -> Result<(), NetError> {
                Ok(self.restore(state)?)
            }
        }
    };
}
user_net_backend!(UserNet);
user_net_backend!(Arc<UserNet>);

/// Marks the net thread as ended however it ends, and wakes the device so it sees it.
struct ExitFlag(Arc<Shared>);

impl Drop for ExitFlag {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::SeqCst);
        self.0.notify_rx();
    }
}

/// What slirp's callbacks reach through their `opaque` pointer. Lives in an `Rc` on the net
/// thread for as long as the `Slirp` instance; callbacks run on that thread only, so plain
/// `Cell`/`RefCell` suffice (never borrowed across a call into slirp).
struct CbState {
    shared: Arc<Shared>,
    clock_base: Instant,
    timers: RefCell<Vec<*mut Timer>>,
}

impl CbState {
    fn now_ns(&self) -> i64 {
        i64::try_from(self.clock_base.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    fn now_ms(&self) -> i64 {
        self.now_ns() / 1_000_000
    }

    /// When the next armed timer is due (ms on `clock_get_ns`'s clock).
    fn next_timer_ms(&self) -> Option<i64> {
        let timers = self.timers.borrow();
        // SAFETY: every pointer in the list is a live Box<Timer> (removed before it is freed).
        timers.iter().filter_map(|&t| unsafe { &*t }.expire_ms.get()).min()
    }

    /// Runs the timers that are due, once each (they disarm; slirp re-arms what repeats).
    /// `slirp` is the instance `Handle` timers belong to.
    fn fire_due_timers(&self, slirp: *mut Slirp) {
        let now = self.now_ms();
        let due: Vec<*mut Timer> = {
            let timers = self.timers.borrow();
            timers
                .iter()
                .copied()
                // SAFETY: live timers, as in next_timer_ms.
                .filter(|&t| unsafe { &*t }.expire_ms.get().is_some_and(|e| e <= now))
                .collect()
        };
        for timer in due {
            // An earlier timer's callback may have freed this one.
            if !self.timers.borrow().contains(&timer) {
                continue;
            }
            // SAFETY: still in the list, so still live.
            let timer = unsafe { &*timer };
            timer.expire_ms.set(None);
            match timer.action {
                // SAFETY: slirp gave us this callback and argument for exactly this call.
                TimerAction::Callback { cb, cb_opaque } => unsafe { cb(cb_opaque) },
                // SAFETY: the id and opaque slirp gave timer_new_opaque, on its live instance.
                TimerAction::Handle { id, cb_opaque } => unsafe {
                    sys::slirp_handle_timer(slirp, id, cb_opaque)
                },
            }
        }
    }
}

#[derive(Clone, Copy)]
enum TimerAction {
    /// `timer_new`: slirp's callback and its argument.
    Callback { cb: sys::SlirpTimerCb, cb_opaque: *mut c_void },
    /// `timer_new_opaque` (config version 4): handed back through `slirp_handle_timer`.
    Handle { id: sys::SlirpTimerId, cb_opaque: *mut c_void },
}

struct Timer {
    action: TimerAction,
    /// When it fires, in ms on `clock_get_ns`'s clock; `None` when not armed.
    expire_ms: Cell<Option<i64>>,
}

/// The net thread's side: the slirp instance and everything only that thread touches.
struct NetLoop {
    slirp: *mut Slirp,
    cb: Rc<CbState>,
    shared: Arc<Shared>,
    frames: Receiver<Vec<u8>>,
    commands: Receiver<Command>,
    dns: Option<dns::DnsForwarder>,
    pollfds: Vec<libc::pollfd>,
}

impl NetLoop {
    fn new(
        config: &UserNetConfig,
        shared: Arc<Shared>,
        frames: Receiver<Vec<u8>>,
        commands: Receiver<Command>,
    ) -> Result<NetLoop, UserNetError> {
        let cfg = sys::SlirpConfig {
            version: sys::SLIRP_CONFIG_VERSION,
            restricted: 0,
            in_enabled: true,
            vnetwork: sys::in_addr(NETWORK),
            vnetmask: sys::in_addr(NETMASK),
            vhost: sys::in_addr(GATEWAY),
            in6_enabled: config.ipv6,
            vprefix_addr6: sys::in6_addr(PREFIX6),
            vprefix_len: PREFIX6_LEN,
            vhost6: sys::in6_addr(GATEWAY6),
            vhostname: std::ptr::null(),
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: sys::in_addr(DHCP_START),
            vnameserver: sys::in_addr(DNS),
            vnameserver6: sys::in6_addr(DNS6),
            vdnssearch: std::ptr::null(),
            vdomainname: std::ptr::null(),
            if_mtu: config.mtu,
            if_mru: config.mtu,
            disable_host_loopback: config.isolate_from_host,
            enable_emu: false,
            outbound_addr: std::ptr::null(),
            outbound_addr6: std::ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let cb = Rc::new(CbState {
            shared: Arc::clone(&shared),
            clock_base: Instant::now(),
            timers: RefCell::new(Vec::new()),
        });
        // SAFETY: `cfg` is a fully initialised version-4 config whose pointers are NULL (slirp
        // copies what it keeps of the rest); CALLBACKS is a static, so it outlives the
        // instance as slirp requires; the opaque `cb` is an Rc (a stable address) and is
        // dropped only after slirp_cleanup (NetLoop's Drop).
        let slirp = unsafe { sys::slirp_new(&cfg, &CALLBACKS, Rc::as_ptr(&cb).cast_mut().cast()) };
        if slirp.is_null() {
            free_timers(&cb);
            return Err(UserNetError::Create { version: sys::version_string() });
        }
        let dns = config.dns_server.map(|server| {
            dns::DnsForwarder::new(server, DNS, config.ipv6.then_some(DNS6), GATEWAY_MAC)
        });
        let mut net =
            NetLoop { slirp, cb, shared, frames, commands, dns, pollfds: Vec::with_capacity(16) };
        for forward in &config.forwards {
            // On an error `net` is dropped, which cleans slirp up.
            net.add_forward(*forward)?;
        }
        Ok(net)
    }

    fn run(&mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.shared.waker.drain();
            if self.shared.renotify.swap(false, Ordering::SeqCst)
                && !lock(&self.shared.rx).frames.is_empty()
            {
                self.shared.notify_rx();
            }
            let mut worked = false;
            while let Ok(command) = self.commands.try_recv() {
                self.command(command);
                worked = true;
            }
            for _ in 0..TX_BATCH {
                let Ok(frame) = self.frames.try_recv() else { break };
                self.input(&frame);
                worked = true;
            }
            // After input, slirp_pollfds_poll must run at once, not after a sleep: only there
            // does slirp send what it holds back (if_start), e.g. packets that waited for the
            // guest's ARP reply just fed in, which slirp drops 1 s after asking.
            self.poll_once(worked);
        }
    }

    /// One turn of slirp's poll loop; `no_sleep` polls the descriptors without waiting.
    fn poll_once(&mut self, no_sleep: bool) {
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: self.shared.waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut slirp_timeout = IDLE_POLL_MS;
        // SAFETY: `self.slirp` is live (owned by this thread); add_poll's opaque is our
        // pollfd vector, which nothing else touches during the call.
        unsafe {
            sys::slirp_pollfds_fill(
                self.slirp,
                &mut slirp_timeout,
                add_poll,
                (&mut self.pollfds as *mut Vec<libc::pollfd>).cast(),
            );
        }
        if let Some(dns) = &self.dns {
            dns.add_pollfds(&mut self.pollfds);
        }
        let mut timeout = i64::from(slirp_timeout);
        if let Some(expire) = self.cb.next_timer_ms() {
            timeout = timeout.min(expire.saturating_sub(self.cb.now_ms()).max(0));
        }
        if let Some(deadline) = self.dns.as_ref().and_then(|d| d.next_deadline()) {
            let left = deadline.saturating_duration_since(Instant::now()).as_millis() + 1;
            timeout = timeout.min(i64::try_from(left).unwrap_or(i64::MAX));
        }
        if no_sleep {
            timeout = 0;
        }
        // At most IDLE_POLL_MS: fits a c_int.
        let timeout = c_int::try_from(timeout).unwrap_or(c_int::MAX);
        // SAFETY: a valid, exclusively borrowed pollfd array of the given length.
        let ready = unsafe {
            libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as libc::nfds_t, timeout)
        };
        // SAFETY: as for fill; get_revents reads the same vector, now filled by poll.
        unsafe {
            sys::slirp_pollfds_poll(
                self.slirp,
                c_int::from(ready < 0),
                get_revents,
                (&mut self.pollfds as *mut Vec<libc::pollfd>).cast(),
            );
        }
        if let Some(dns) = &mut self.dns {
            let shared = &self.shared;
            dns.poll(Instant::now(), |frame| shared.deliver(frame));
        }
        self.cb.fire_due_timers(self.slirp);
    }

    fn input(&mut self, frame: &[u8]) {
        if let Some(dns) = &mut self.dns {
            if dns.intercept(frame, Instant::now()) {
                return;
            }
        }
        // send() checked the length against MAX_FRAME_LEN, which fits a c_int.
        let len = c_int::try_from(frame.len()).unwrap_or(c_int::MAX);
        // SAFETY: `frame` is valid for `len` bytes for the call; slirp copies what it keeps.
        unsafe { sys::slirp_input(self.slirp, frame.as_ptr(), len) };
    }

    fn command(&mut self, command: Command) {
        // A caller that went away does not care about the answer.
        match command {
            Command::AddForward(forward, reply) => {
                let _ = reply.send(self.add_forward(forward));
            }
            Command::RemoveForward(forward, reply) => {
                let _ = reply.send(self.remove_forward(forward));
            }
            Command::SaveState(reply) => {
                let _ = reply.send(self.save_state());
            }
            Command::LoadState { version, blob, reply } => {
                let _ = reply.send(self.load_state(version, &blob));
            }
        }
    }

    fn add_forward(&mut self, forward: Forward) -> Result<(), UserNetError> {
        // Measured: slirp 4.7 accepts on an IPv6 listener but then speaks IPv6 to the guest's
        // IPv4 address (tcp_connect copies the listener's family), so no SYN ever arrives.
        if forward.host_addr.is_ipv6() {
            return Err(UserNetError::ForwardIpv6 { forward });
        }
        let existing =
            lock(&self.shared.forwards).iter().find(|f| f.same_host_socket(&forward)).copied();
        if let Some(existing) = existing {
            return Err(UserNetError::ForwardExists { forward, existing });
        }
        let (host, host_len) = sys::sockaddr(forward.host());
        // Guest address 0.0.0.0: slirp substitutes its DHCP start address (10.0.2.15).
        let (guest, guest_len) =
            sys::sockaddr(SocketAddr::from((Ipv4Addr::UNSPECIFIED, forward.guest_port)));
        // SAFETY: both addresses are valid sockaddr_storage values of the given lengths for
        // the call; slirp copies them.
        let ret = unsafe {
            sys::slirp_add_hostxfwd(
                self.slirp,
                (&host as *const libc::sockaddr_storage).cast(),
                host_len,
                (&guest as *const libc::sockaddr_storage).cast(),
                guest_len,
                forward_flags(&forward),
            )
        };
        if ret < 0 {
            // slirp keeps bind()'s errno for us (tcpx_listen/udpx_listen restore it).
            let source = io::Error::last_os_error();
            return Err(UserNetError::ForwardBusy { forward, source });
        }
        lock(&self.shared.forwards).push(forward);
        Ok(())
    }

    fn remove_forward(&mut self, forward: Forward) -> Result<(), UserNetError> {
        let mut forwards = lock(&self.shared.forwards);
        let at = forwards.iter().position(|f| *f == forward);
        let Some(at) = at else { return Err(UserNetError::ForwardNotFound { forward }) };
        let (host, host_len) = sys::sockaddr(forward.host());
        // SAFETY: a valid address for the call; slirp closes the listener it finds.
        let ret = unsafe {
            sys::slirp_remove_hostxfwd(
                self.slirp,
                (&host as *const libc::sockaddr_storage).cast(),
                host_len,
                forward_flags(&forward),
            )
        };
        forwards.remove(at);
        if ret < 0 {
            // Our list and slirp's disagree: ours follows slirp (the listener is gone).
            return Err(UserNetError::ForwardNotFound { forward });
        }
        Ok(())
    }

    fn save_state(&mut self) -> Vec<u8> {
        let mut blob = Vec::new();
        // SAFETY: the opaque is `blob`, exclusively ours for the call; write_state only
        // appends to it.
        unsafe {
            sys::slirp_state_save(self.slirp, write_state, (&mut blob as *mut Vec<u8>).cast());
        }
        blob
    }

    fn load_state(&mut self, version: i32, blob: &[u8]) -> Result<(), UserNetError> {
        let mut cursor = StateCursor { rest: blob, short: false };
        // SAFETY: the opaque is `cursor`, exclusively ours for the call; read_state only
        // copies out of it and advances it.
        let ret = unsafe {
            sys::slirp_state_load(
                self.slirp,
                version,
                read_state,
                (&mut cursor as *mut StateCursor<'_>).cast(),
            )
        };
        if ret < 0 {
            return Err(UserNetError::StateLoad(io::Error::from_raw_os_error(-ret)));
        }
        // slirp reads a short field as zero and carries on: the length is ours to check.
        if cursor.short {
            return Err(UserNetError::StateLength { why: "truncated" });
        }
        if !cursor.rest.is_empty() {
            return Err(UserNetError::StateLength { why: "followed by stray bytes" });
        }
        Ok(())
    }
}

impl Drop for NetLoop {
    fn drop(&mut self) {
        // SAFETY: the instance is live and this is its last use; cleanup frees its timers
        // through our callbacks, whose opaque (`self.cb`) is dropped only after this.
        unsafe { sys::slirp_cleanup(self.slirp) };
        free_timers(&self.cb);
    }
}

/// Frees timers slirp did not free itself.
fn free_timers(cb: &CbState) {
    for timer in cb.timers.borrow_mut().drain(..) {
        // SAFETY: each pointer came from Box::into_raw in a timer_new callback and leaves
        // the list here, so it is freed once.
        drop(unsafe { Box::from_raw(timer) });
    }
}

fn forward_flags(forward: &Forward) -> c_int {
    let mut flags = 0;
    if forward.proto == Proto::Udp {
        flags |= sys::SLIRP_HOSTFWD_UDP;
    }
    flags
}

// ---- slirp's callbacks. None may unwind into C: each body runs under catch_unwind. ----

fn guarded<T>(what: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        log::error!("panic in libslirp callback {what}");
        fallback
    })
}

/// # Safety
/// `opaque` must be the `CbState` given to slirp_new (it is, for every callback below).
unsafe fn cb_state<'a>(opaque: *mut c_void) -> &'a CbState {
    // SAFETY: per the contract; shared access only.
    unsafe { &*opaque.cast::<CbState>() }
}

static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(register_poll_fd),
    unregister_poll_fd: Some(register_poll_fd),
    notify: Some(notify),
    init_completed: None,
    timer_new_opaque: Some(timer_new_opaque),
};

unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    guarded("send_packet", -1, || {
        // SAFETY: slirp passes our opaque and a frame valid for `len` bytes during the call.
        let (state, frame) =
            unsafe { (cb_state(opaque), std::slice::from_raw_parts(buf.cast::<u8>(), len)) };
        state.shared.deliver(frame.to_vec());
        isize::try_from(len).unwrap_or(isize::MAX)
    })
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    guarded("guest_error", (), || {
        if msg.is_null() {
            return;
        }
        // SAFETY: slirp passes a NUL-terminated message valid during the call.
        let msg = unsafe { std::ffi::CStr::from_ptr(msg) };
        log::warn!("user-mode network: guest error: {}", msg.to_string_lossy());
    })
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: our opaque.
    guarded("clock_get_ns", 0, || unsafe { cb_state(opaque) }.now_ns())
}

fn new_timer(opaque: *mut c_void, action: TimerAction) -> *mut c_void {
    // SAFETY: our opaque.
    let state = unsafe { cb_state(opaque) };
    let timer = Box::into_raw(Box::new(Timer { action, expire_ms: Cell::new(None) }));
    state.timers.borrow_mut().push(timer);
    timer.cast()
}

unsafe extern "C" fn timer_new(
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    guarded("timer_new", std::ptr::null_mut(), || {
        new_timer(opaque, TimerAction::Callback { cb, cb_opaque })
    })
}

unsafe extern "C" fn timer_new_opaque(
    id: sys::SlirpTimerId,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    guarded("timer_new_opaque", std::ptr::null_mut(), || {
        new_timer(opaque, TimerAction::Handle { id, cb_opaque })
    })
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    guarded("timer_free", (), || {
        // SAFETY: our opaque.
        let state = unsafe { cb_state(opaque) };
        let timer = timer.cast::<Timer>();
        let mut timers = state.timers.borrow_mut();
        // Only a pointer we handed out is freed, and only once.
        if let Some(at) = timers.iter().position(|&t| t == timer) {
            timers.swap_remove(at);
            // SAFETY: it came from Box::into_raw in new_timer and just left the list.
            drop(unsafe { Box::from_raw(timer) });
        }
    })
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    guarded("timer_mod", (), || {
        // SAFETY: our opaque.
        let state = unsafe { cb_state(opaque) };
        let timer = timer.cast::<Timer>();
        if state.timers.borrow().contains(&timer) {
            // SAFETY: in the list, so a live timer of ours.
            unsafe { &*timer }.expire_ms.set(Some(expire_ms));
        }
    })
}

/// slirp's sockets are re-collected by slirp_pollfds_fill on every turn, so registering and
/// unregistering need no bookkeeping.
unsafe extern "C" fn register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

/// slirp has output for a socket: the loop's next turn (on this same thread) polls it.
unsafe extern "C" fn notify(_opaque: *mut c_void) {}

unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    guarded("add_poll", -1, || {
        // SAFETY: the opaque given to slirp_pollfds_fill is our pollfd vector.
        let fds = unsafe { &mut *opaque.cast::<Vec<libc::pollfd>>() };
        let mut wanted = 0;
        if events & sys::SLIRP_POLL_IN != 0 {
            wanted |= libc::POLLIN;
        }
        if events & sys::SLIRP_POLL_OUT != 0 {
            wanted |= libc::POLLOUT;
        }
        if events & sys::SLIRP_POLL_PRI != 0 {
            wanted |= libc::POLLPRI;
        }
        fds.push(libc::pollfd { fd, events: wanted, revents: 0 });
        c_int::try_from(fds.len() - 1).unwrap_or(-1)
    })
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    guarded("get_revents", 0, || {
        // SAFETY: the opaque given to slirp_pollfds_poll is our pollfd vector.
        let fds = unsafe { &*opaque.cast::<Vec<libc::pollfd>>() };
        let Some(pfd) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else { return 0 };
        let mut events = 0;
        if pfd.revents & libc::POLLIN != 0 {
            events |= sys::SLIRP_POLL_IN;
        }
        if pfd.revents & libc::POLLOUT != 0 {
            events |= sys::SLIRP_POLL_OUT;
        }
        if pfd.revents & libc::POLLPRI != 0 {
            events |= sys::SLIRP_POLL_PRI;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            events |= sys::SLIRP_POLL_ERR;
        }
        if pfd.revents & libc::POLLHUP != 0 {
            events |= sys::SLIRP_POLL_HUP;
        }
        events
    })
}

unsafe extern "C" fn write_state(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    guarded("state write", -1, || {
        // SAFETY: the opaque given to slirp_state_save is our Vec; `buf` holds `len` bytes.
        let (out, data) = unsafe {
            (&mut *opaque.cast::<Vec<u8>>(), std::slice::from_raw_parts(buf.cast::<u8>(), len))
        };
        out.extend_from_slice(data);
        isize::try_from(len).unwrap_or(-1)
    })
}

/// The saved state slirp_state_load reads from.
struct StateCursor<'a> {
    rest: &'a [u8],
    /// A read asked for more than was left.
    short: bool,
}

unsafe extern "C" fn read_state(buf: *mut c_void, len: usize, opaque: *mut c_void) -> isize {
    guarded("state read", -1, || {
        // SAFETY: the opaque given to slirp_state_load is our cursor.
        let cursor = unsafe { &mut *opaque.cast::<StateCursor<'_>>() };
        let Some((head, rest)) = cursor.rest.split_at_checked(len) else {
            cursor.short = true;
            return -1;
        };
        // SAFETY: slirp's buffer has room for `len` bytes; `head` is exactly that long and
        // does not overlap it (it is our copy of the state).
        unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), buf.cast::<u8>(), len) };
        cursor.rest = rest;
        isize::try_from(len).unwrap_or(-1)
    })
}
