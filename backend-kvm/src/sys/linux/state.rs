//! Encoding of KVM state structs as the named blobs of `VcpuState` / `VmState`.
//!
//! A blob is the struct's raw bytes as the kernel defines them (x86_64, little endian), the
//! same bytes kvm-bindings' serde support writes, but decoded strictly: a blob of the wrong
//! length is `InvalidState`, never padded or truncated. `kvm_fpu` has no byte view in
//! kvm-bindings, so it is written field by field in its C layout. MSRs are a run of 16-byte
//! `kvm_msr_entry` records; XSAVE is the 4 KiB legacy area plus any KVM_GET_XSAVE2 tail.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_fpu, kvm_msr_entry};
use vmm::hypervisor::{HypervisorError, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

pub const BACKEND: &str = "kvm";

pub fn invalid(message: String) -> HypervisorError {
    HypervisorError::InvalidState(message)
}

pub fn check_backend(backend: &str) -> Result<()> {
    if backend == BACKEND {
        Ok(())
    } else {
        Err(invalid(format!("State belongs to backend {backend:?}, not {BACKEND:?}")))
    }
}

pub fn blob<'a>(blobs: &'a BTreeMap<String, Vec<u8>>, key: &str) -> Result<&'a [u8]> {
    blobs.get(key).map(Vec::as_slice).ok_or_else(|| invalid(format!("Missing {key} blob")))
}

pub fn encode<T: IntoBytes + Immutable>(value: &T) -> Vec<u8> {
    value.as_bytes().to_vec()
}

pub fn decode<T: FromBytes>(key: &str, bytes: &[u8]) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| {
        invalid(format!(
            "{key} blob is {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        ))
    })
}

pub fn decode_key<T: FromBytes>(blobs: &BTreeMap<String, Vec<u8>>, key: &str) -> Result<T> {
    decode(key, blob(blobs, key)?)
}

pub fn encode_msrs(entries: &[kvm_msr_entry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.as_bytes().iter().copied()).collect()
}

pub fn decode_msrs(key: &str, bytes: &[u8]) -> Result<Vec<kvm_msr_entry>> {
    let size = std::mem::size_of::<kvm_msr_entry>();
    if bytes.len() % size != 0 {
        return Err(invalid(format!("{key} blob is {} bytes, not whole MSR entries", bytes.len())));
    }
    bytes.chunks_exact(size).map(|chunk| decode(key, chunk)).collect()
}

const FPU_SIZE: usize = std::mem::size_of::<kvm_fpu>();

pub fn encode_fpu(fpu: &kvm_fpu) -> Vec<u8> {
    let mut out = Vec::with_capacity(FPU_SIZE);
    fpu.fpr.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&fpu.fcw.to_le_bytes());
    out.extend_from_slice(&fpu.fsw.to_le_bytes());
    out.push(fpu.ftwx);
    out.push(fpu.pad1);
    out.extend_from_slice(&fpu.last_opcode.to_le_bytes());
    out.extend_from_slice(&fpu.last_ip.to_le_bytes());
    out.extend_from_slice(&fpu.last_dp.to_le_bytes());
    fpu.xmm.iter().for_each(|r| out.extend_from_slice(r));
    out.extend_from_slice(&fpu.mxcsr.to_le_bytes());
    out.extend_from_slice(&fpu.pad2.to_le_bytes());
    out
}

/// Reads little-endian fields off the front of a slice whose length was checked up front.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        out[..head.len()].copy_from_slice(head);
        self.0 = rest;
        out
    }
}

pub fn decode_fpu(key: &str, bytes: &[u8]) -> Result<kvm_fpu> {
    if bytes.len() != FPU_SIZE {
        return Err(invalid(format!("{key} blob is {} bytes, expected {FPU_SIZE}", bytes.len())));
    }
    let mut f = Fields(bytes);
    let mut fpu = kvm_fpu::default();
    fpu.fpr.iter_mut().for_each(|r| *r = f.take());
    fpu.fcw = u16::from_le_bytes(f.take());
    fpu.fsw = u16::from_le_bytes(f.take());
    fpu.ftwx = f.take::<1>()[0];
    fpu.pad1 = f.take::<1>()[0];
    fpu.last_opcode = u16::from_le_bytes(f.take());
    fpu.last_ip = u64::from_le_bytes(f.take());
    fpu.last_dp = u64::from_le_bytes(f.take());
    fpu.xmm.iter_mut().for_each(|r| *r = f.take());
    fpu.mxcsr = u32::from_le_bytes(f.take());
    fpu.pad2 = u32::from_le_bytes(f.take());
    Ok(fpu)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_lapic_state, kvm_pit_state2};

    use super::*;

    #[test]
    fn fpu_blob_round_trips_every_field() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0xaa,
            last_opcode: 0x7ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x8877_6655_4433_2211,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[7][15] = 0x5a;
        fpu.xmm[15][0] = 0xa5;
        let bytes = encode_fpu(&fpu);
        assert_eq!(bytes.len(), FPU_SIZE);
        assert_eq!(decode_fpu("fpu", &bytes).expect("decodes"), fpu);
    }

    #[test]
    fn fpu_blob_of_wrong_length_is_invalid_state() {
        let bytes = encode_fpu(&kvm_fpu::default());
        let err = decode_fpu("fpu", &bytes[1..]).expect_err("short blob must fail");
        assert!(matches!(err, HypervisorError::InvalidState(_)), "{err}");
    }

    #[test]
    fn struct_blob_must_have_the_exact_size() {
        let lapic = kvm_lapic_state::default();
        let mut bytes = encode(&lapic);
        assert!(decode::<kvm_lapic_state>("lapic", &bytes).is_ok());
        bytes.push(0);
        assert!(matches!(
            decode::<kvm_lapic_state>("lapic", &bytes),
            Err(HypervisorError::InvalidState(_))
        ));
        assert!(decode::<kvm_pit_state2>("pit2", &[]).is_err());
    }

    #[test]
    fn msr_blob_round_trips_and_rejects_partial_entries() {
        let entries = vec![
            kvm_msr_entry { index: 0x10, reserved: 0, data: 0x1234 },
            kvm_msr_entry { index: 0xc000_0082, reserved: 0, data: u64::MAX },
        ];
        let bytes = encode_msrs(&entries);
        assert_eq!(decode_msrs("msrs", &bytes).expect("decodes"), entries);
        assert!(decode_msrs("msrs", &bytes[..20]).is_err());
    }

    #[test]
    fn missing_blob_and_foreign_backend_are_invalid_state() {
        let blobs = BTreeMap::new();
        assert!(matches!(blob(&blobs, "lapic"), Err(HypervisorError::InvalidState(_))));
        assert!(check_backend("hvf").is_err());
        assert!(check_backend(BACKEND).is_ok());
    }
}
