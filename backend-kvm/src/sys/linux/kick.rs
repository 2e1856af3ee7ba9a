//! Kicking a vCPU out of KVM_RUN from another thread.
//!
//! A kick sets `immediate_exit` in the vCPU's `kvm_run` page, so a KVM_RUN that has not
//! started yet returns EINTR at once, and then signals the vCPU's thread with a real-time
//! signal whose handler does nothing, so a KVM_RUN blocked in the kernel (in-kernel HLT)
//! returns EINTR too. Either way no kick is lost.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use vmm::hypervisor::{HypervisorError, VcpuKicker};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Offset from SIGRTMIN of the signal that kicks vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler once per process.
pub fn install_kick_signal() -> Result<(), HypervisorError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), ignore_kick).map_err(|e| e.errno()))
        .map_err(|errno| HypervisorError::Os {
            op: "sigaction(vCPU kick signal)",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// Sets (or clears) `immediate_exit` through the raw pointer into the kvm_run page.
///
/// # Safety
/// `immediate_exit` must point into a live kvm_run mapping.
pub unsafe fn store_immediate_exit(immediate_exit: *mut u8, value: u8) {
    // SAFETY: the caller guarantees the pointer is live; it is a u8 (align 1). Using an atomic
    // store because the kick thread and the vCPU thread write the byte concurrently.
    unsafe { AtomicU8::from_ptr(immediate_exit) }.store(value, Ordering::SeqCst);
}

struct Target {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
    /// Kicks so far; lets a completing run tell whether a kick arrived meanwhile.
    kicks: u64,
}

/// What [`KvmKicker::begin_completion`] found, for [`KvmKicker::end_completion`].
pub struct Completion(Option<u64>);

/// The `Send + Sync` kick handle of one vCPU. Holding it after the vCPU is gone is harmless:
/// the vCPU clears the target (under the lock) before its kvm_run page is unmapped.
pub struct KvmKicker {
    target: Mutex<Option<Target>>,
}

// SAFETY: the raw pointer in `Target` is only dereferenced under the mutex while the vCPU that
// owns the mapping is alive (it empties `target` under the same mutex before it unmaps), and
// pthread_t is a plain thread handle valid from any thread.
unsafe impl Send for KvmKicker {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for KvmKicker {}

impl KvmKicker {
    /// A kicker for the calling thread's vCPU whose kvm_run `immediate_exit` byte is at
    /// `immediate_exit`.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid until [`KvmKicker::detach`] is called.
    pub unsafe fn for_current_thread(immediate_exit: *mut u8) -> KvmKicker {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        KvmKicker { target: Mutex::new(Some(Target { immediate_exit, thread, kicks: 0 })) }
    }

    /// Sets `immediate_exit` for a KVM_RUN that must only complete pending I/O. If a kick is
    /// already pending, it stays pending.
    pub fn begin_completion(&self) -> Completion {
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(target) = target.as_ref() else { return Completion(None) };
        // SAFETY: the target is present, so the kvm_run page is mapped (see `detach`).
        let pending =
            unsafe { AtomicU8::from_ptr(target.immediate_exit) }.swap(1, Ordering::SeqCst);
        Completion((pending == 0).then_some(target.kicks))
    }

    /// Clears `immediate_exit` again, unless a kick was pending before or arrived since.
    pub fn end_completion(&self, completion: Completion) {
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(target), Some(kicks)) = (target.as_ref(), completion.0) {
            if target.kicks == kicks {
                // SAFETY: the target is present, so the kvm_run page is mapped.
                unsafe { store_immediate_exit(target.immediate_exit, 0) };
            }
        }
    }

    /// Forgets the vCPU; later kicks do nothing. The vCPU calls it before it unmaps kvm_run.
    pub fn detach(&self) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let mut target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(target) = target.as_mut() else { return };
        target.kicks = target.kicks.wrapping_add(1);
        // SAFETY: the target is only present while the kvm_run mapping is alive (see `detach`),
        // and we hold the lock that `detach` takes.
        unsafe { store_immediate_exit(target.immediate_exit, 1) };
        // SAFETY: the vCPU thread is alive while the target is present (the vCPU is !Send and
        // detaches when dropped on that thread); the signal has a no-op handler installed.
        let rc = unsafe { libc::pthread_kill(target.thread, kick_signal()) };
        if rc != 0 {
            log::warn!("Could not signal vCPU thread: {}", std::io::Error::from_raw_os_error(rc));
        }
    }
}
