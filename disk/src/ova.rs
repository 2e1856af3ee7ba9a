//! OVA appliances: a POSIX/GNU tar holding an OVF descriptor (DMTF OVF 1.x/2.x), the disk
//! files it references (usually streamOptimized VMDKs) and optionally a `.mf` manifest of
//! SHA-1/SHA-256 digests. This module reads the tar's member table, parses the descriptor
//! into the few facts `hutch import` needs and copies members out; converting the disks is
//! the importer's job.
//!
//! ```text
//!   [ustar hdr][appliance.ovf ...][hdr][disk1.vmdk ........][hdr][appliance.mf][0 x 1024]
//! ```
//! Everything in the file is untrusted: tar sizes are checked against the file size and the
//! OVF's numbers against sane limits (clamped, with a problem noted).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha1::Digest;

use crate::mapped::{err_at, file_allocated_bytes, pread};
use crate::types::{ImageFormat, ImageInfo};
use crate::{DiskError, DiskErrorKind};

const BLOCK: u64 = 512;
/// Largest descriptor, manifest or long name read into memory.
const MAX_DESCRIPTOR: u64 = 16 << 20;
const MAX_MANIFEST: u64 = 1 << 20;
const MAX_LONG_NAME: u64 = 64 * 1024;
const MAX_PAX: u64 = 1 << 20;
/// Most vCPUs and memory an imported machine gets before the OVF's claim is clamped.
pub const MAX_CPUS: u32 = 256;
pub const MAX_MEMORY_MIB: u64 = 4 << 20;
/// Largest disk capacity believed (the VHDX limit, far above anything real).
const MAX_CAPACITY: u64 = 64 << 40;
const COPY_CHUNK: usize = 1 << 20;

/// One regular file in the tar: its name and where its bytes are in the OVA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaMember {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// A disk the descriptor declares, and where its file is in the OVA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// The tar member (References/File href).
    pub file_name: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    pub member_offset: u64,
    pub member_size: u64,
}

/// What the descriptor says about the (first) virtual system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDescriptor {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<OvfDisk>,
    /// The firmware the appliance was made with, when its writer says: VirtualBox's
    /// `<Firmware type="EFI|BIOS">`, VMware's `<vmw:Config vmw:key="firmware" vmw:value=...>`.
    pub firmware: Option<crate::BootFirmware>,
}

/// An opened OVA.
#[derive(Debug)]
pub struct Ova {
    file: File,
    path: PathBuf,
    members: Vec<OvaMember>,
    descriptor: OvfDescriptor,
    ovf_version: &'static str,
    problems: Vec<String>,
}

impl Ova {
    /// Reads the tar, parses the descriptor and verifies the manifest when there is one
    /// (reading every member it lists; mismatches become problems, not errors).
    pub fn open(path: &Path) -> Result<Ova, DiskError> {
        let file = File::open(path).map_err(|e| DiskError::io("open", e).with_path(path))?;
        let file_size =
            file.metadata().map_err(|e| DiskError::io("open", e).with_path(path))?.len();
        let members = read_tar(&file, path, file_size)?;
        // The spec puts the descriptor first; accept it anywhere.
        let Some(ovf) = members.iter().find(|m| m.name.to_ascii_lowercase().ends_with(".ovf"))
        else {
            return Err(DiskError::new(DiskErrorKind::InvalidFormat, "find the OVF descriptor in")
                .with_path(path));
        };
        if ovf.size > MAX_DESCRIPTOR {
            return Err(err_at(
                DiskErrorKind::UnsupportedFeature,
                "read an OVF descriptor this large in",
                path,
                ovf.offset,
            ));
        }
        let mut text = vec![0u8; ovf.size as usize];
        pread(&file, path, &mut text, ovf.offset)?;
        let mut problems = Vec::new();
        let (descriptor, ovf_version) =
            parse_ovf(&text, &members, path, ovf.offset, &mut problems)?;
        let mut ova =
            Ova { file, path: path.to_path_buf(), members, descriptor, ovf_version, problems };
        ova.verify_manifest()?;
        Ok(ova)
    }

    pub fn descriptor(&self) -> &OvfDescriptor {
        &self.descriptor
    }

    /// Every regular file in the tar, in order.
    pub fn members(&self) -> &[OvaMember] {
        &self.members
    }

    /// Problems found while opening (manifest mismatches, clamped numbers, skipped disks).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Copies member `name`'s bytes to a new file at `dest` (replacing it).
    pub fn extract_member(&self, name: &str, dest: &Path) -> Result<(), DiskError> {
        let Some(member) = self.members.iter().find(|m| m.name == name) else {
            let e = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(DiskError::io("find the member in", e).with_path(&self.path));
        };
        let mut out = File::create(dest).map_err(|e| DiskError::io("create", e).with_path(dest))?;
        self.for_each_chunk(member, |chunk| {
            out.write_all(chunk).map_err(|e| DiskError::io("write", e).with_path(dest))
        })?;
        out.sync_all().map_err(|e| DiskError::io("flush", e).with_path(dest))
    }

    /// What `hutch disk info` shows: the virtual size is the disks' total capacity.
    pub fn info(&self) -> ImageInfo {
        let total = self.descriptor.disks.iter().fold(0u64, |t, d| t.saturating_add(d.capacity));
        ImageInfo {
            path: self.path.clone(),
            format: ImageFormat::Ova,
            subformat: Some(self.ovf_version.to_string()),
            virtual_size: total,
            allocated_bytes: file_allocated_bytes(&self.file),
            backing: None,
            problems: self.problems.clone(),
        }
    }

    fn for_each_chunk(
        &self,
        member: &OvaMember,
        mut f: impl FnMut(&[u8]) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let mut buf = vec![0u8; COPY_CHUNK.min(member.size as usize)];
        let mut done = 0u64;
        while done < member.size {
            let n = (member.size - done).min(buf.len() as u64) as usize;
            pread(&self.file, &self.path, &mut buf[..n], member.offset + done)?;
            f(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn verify_manifest(&mut self) -> Result<(), DiskError> {
        let Some(mf) =
            self.members.iter().find(|m| m.name.to_ascii_lowercase().ends_with(".mf")).cloned()
        else {
            return Ok(());
        };
        if mf.size > MAX_MANIFEST {
            self.problems.push(format!("manifest {} is too large to check", mf.name));
            return Ok(());
        }
        let mut raw = vec![0u8; mf.size as usize];
        pread(&self.file, &self.path, &mut raw, mf.offset)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // "SHA256(disk.vmdk)= 0123abcd..."
            let parsed = line.split_once('(').and_then(|(algo, rest)| {
                let (name, digest) = rest.rsplit_once(")=")?;
                Some((
                    algo.trim().to_ascii_uppercase(),
                    name.to_string(),
                    digest.trim().to_ascii_lowercase(),
                ))
            });
            let Some((algo, name, expected)) = parsed else {
                self.problems.push(format!("manifest line not understood: {line}"));
                continue;
            };
            let Some(member) = self.members.iter().find(|m| m.name == name).cloned() else {
                self.problems.push(format!("manifest lists {name}, which is not in the OVA"));
                continue;
            };
            let actual = match algo.as_str() {
                "SHA1" => self.digest::<sha1::Sha1>(&member)?,
                "SHA256" => self.digest::<sha2::Sha256>(&member)?,
                "SHA512" => self.digest::<sha2::Sha512>(&member)?,
                _ => {
                    self.problems.push(format!("manifest digest {algo} for {name} not supported"));
                    continue;
                }
            };
            if actual != expected {
                self.problems.push(format!("{algo} digest of {name} does not match the manifest"));
            }
        }
        Ok(())
    }

    fn digest<D: Digest>(&self, member: &OvaMember) -> Result<String, DiskError> {
        let mut hasher = D::new();
        self.for_each_chunk(member, |chunk| {
            hasher.update(chunk);
            Ok(())
        })?;
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Parses a tar number: octal text, or GNU base-256 (high bit of the first byte set).
fn tar_number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return None; // negative
            }
            let mut v = u64::from(b & 0x3f);
            for &x in &field[1..] {
                v = v.checked_mul(256)?.checked_add(u64::from(x))?;
            }
            Some(v)
        }
        _ => {
            let text = std::str::from_utf8(field).ok()?;
            let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
            if text.is_empty() {
                return Some(0);
            }
            u64::from_str_radix(text, 8).ok()
        }
    }
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Reads the tar's headers: the regular files, with long names (GNU 'L', pax 'x') resolved.
fn read_tar(file: &File, path: &Path, file_size: u64) -> Result<Vec<OvaMember>, DiskError> {
    let mut members = Vec::new();
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    loop {
        if pos == file_size {
            break; // some writers omit the two zero blocks
        }
        if pos + BLOCK > file_size {
            return Err(err_at(DiskErrorKind::CorruptImage, "read the tar header in", path, pos));
        }
        let mut h = [0u8; BLOCK as usize];
        pread(file, path, &mut h, pos)?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored = tar_number(&h[148..156]);
        let unsigned: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) })
            .sum();
        let signed: i64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) })
            .sum();
        if stored != Some(unsigned) && stored.map(|s| s as i64) != Some(signed) {
            let kind =
                if pos == 0 { DiskErrorKind::InvalidFormat } else { DiskErrorKind::CorruptImage };
            return Err(err_at(kind, "verify the tar header checksum in", path, pos));
        }
        let size = match pax_size.take() {
            Some(s) => s,
            None => tar_number(&h[124..136]).ok_or_else(|| {
                err_at(DiskErrorKind::CorruptImage, "read the tar member size in", path, pos + 124)
            })?,
        };
        let data_at = pos + BLOCK;
        if data_at.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "find the tar member's data in",
                path,
                pos,
            ));
        }
        let read_small = |limit: u64| -> Result<Vec<u8>, DiskError> {
            if size > limit {
                return Err(err_at(
                    DiskErrorKind::CorruptImage,
                    "read the tar extension header in",
                    path,
                    pos,
                ));
            }
            let mut v = vec![0u8; size as usize];
            pread(file, path, &mut v, data_at)?;
            Ok(v)
        };
        match h[156] {
            b'L' => long_name = Some(cstr(&read_small(MAX_LONG_NAME)?)),
            b'x' => {
                for (key, value) in pax_records(&read_small(MAX_PAX)?) {
                    match key.as_str() {
                        "path" => long_name = Some(value),
                        "size" => pax_size = value.parse().ok(),
                        _ => {}
                    }
                }
            }
            b'0' | 0 | b'7' => {
                let name = long_name.take().unwrap_or_else(|| {
                    let name = cstr(&h[0..100]);
                    let prefix =
                        if &h[257..262] == b"ustar" { cstr(&h[345..500]) } else { String::new() };
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                });
                let name = name.trim_start_matches("./").to_string();
                members.push(OvaMember { name, offset: data_at, size });
            }
            _ => long_name = None, // directories, links, global pax headers: nothing to read
        }
        pos = data_at + size.div_ceil(BLOCK) * BLOCK;
    }
    Ok(members)
}

/// Pax extended header records: "LEN key=value\n".
fn pax_records(data: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(space) = rest.iter().position(|&b| b == b' ') else { break };
        let Some(len) =
            std::str::from_utf8(&rest[..space]).ok().and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= space + 1 || len > rest.len() {
            break;
        }
        let record = String::from_utf8_lossy(&rest[space + 1..len]);
        if let Some((k, v)) = record.trim_end_matches('\n').split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
        rest = &rest[len..];
    }
    out
}

/// Bytes per unit for an OVF allocation-units string ("byte * 2^20", "MegaBytes", "KB"...).
fn unit_bytes(units: &str) -> Option<u64> {
    let t: String =
        units.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    let named = match t.as_str() {
        "b" | "byte" | "bytes" => Some(1),
        "kb" | "kib" | "kilobyte" | "kilobytes" => Some(1 << 10),
        "mb" | "mib" | "megabyte" | "megabytes" => Some(1 << 20),
        "gb" | "gib" | "gigabyte" | "gigabytes" => Some(1 << 30),
        "tb" | "tib" | "terabyte" | "terabytes" => Some(1 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let rest = t.strip_prefix("bytes*").or_else(|| t.strip_prefix("byte*"))?;
    rest.split('*').try_fold(1u64, |acc, factor| {
        let f = match factor.split_once('^') {
            Some((base, exp)) => {
                let base: u64 = base.parse().ok()?;
                let exp: u32 = exp.parse().ok()?;
                base.checked_pow(exp)?
            }
            None => factor.parse().ok()?,
        };
        acc.checked_mul(f)
    })
}

fn attr<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes().find(|a| a.name() == name).map(|a| a.value())
}

fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children().find(|c| c.tag_name().name() == name).and_then(|c| c.text()).map(str::trim)
}

fn parse_ovf(
    text: &[u8],
    members: &[OvaMember],
    path: &Path,
    at: u64,
    problems: &mut Vec<String>,
) -> Result<(OvfDescriptor, &'static str), DiskError> {
    let invalid = || err_at(DiskErrorKind::InvalidFormat, "parse the OVF descriptor in", path, at);
    // Some writers start with a UTF-8 byte-order mark.
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let text = std::str::from_utf8(text).map_err(|_| invalid())?;
    // roxmltree refuses DTDs by default, so entity expansion bombs can't blow up.
    let doc = roxmltree::Document::parse(text).map_err(|_| invalid())?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(invalid());
    }
    let version = match root.tag_name().namespace() {
        Some(ns) if ns.ends_with("/envelope/2") => "ovf2",
        _ => "ovf1",
    };
    let files: Vec<_> = root
        .children()
        .filter(|n| n.tag_name().name() == "References")
        .flat_map(|r| r.children().filter(|n| n.tag_name().name() == "File"))
        .collect();

    let mut disks = Vec::new();
    for disk in root.descendants().filter(|n| n.tag_name().name() == "Disk") {
        let id = attr(disk, "diskId").unwrap_or("?");
        let capacity = disk_capacity(disk).ok_or_else(|| {
            err_at(DiskErrorKind::CorruptImage, "read the OVF disk capacity in", path, at)
        })?;
        let Some(file_ref) = attr(disk, "fileRef") else {
            problems.push(format!("disk {id} has no file (an empty disk): skipped"));
            continue;
        };
        let Some(file) = files.iter().find(|f| attr(**f, "id") == Some(file_ref)) else {
            return Err(err_at(
                DiskErrorKind::CorruptImage,
                "find the OVF file reference in",
                path,
                at,
            ));
        };
        if attr(*file, "compression").is_some_and(|c| c != "identity")
            || attr(*file, "chunkSize").is_some()
        {
            return Err(err_at(
                DiskErrorKind::UnsupportedFeature,
                "read a compressed or chunked OVF disk file in",
                path,
                at,
            ));
        }
        let href = attr(*file, "href").unwrap_or("");
        let Some(member) = members.iter().find(|m| m.name == href) else {
            return Err(err_at(DiskErrorKind::CorruptImage, "find the OVF disk file in", path, at));
        };
        disks.push(OvfDisk {
            file_name: member.name.clone(),
            capacity,
            member_offset: member.offset,
            member_size: member.size,
        });
    }

    let system = root.descendants().find(|n| n.tag_name().name() == "VirtualSystem");
    let name = system
        .and_then(|s| child_text(s, "Name").filter(|t| !t.is_empty()).or_else(|| attr(s, "id")))
        .unwrap_or("imported")
        .to_string();
    let mut cpus = None;
    let mut memory = None;
    let hardware = system
        .and_then(|s| s.descendants().find(|n| n.tag_name().name() == "VirtualHardwareSection"));
    for item in hardware.iter().flat_map(|h| h.children().filter(|n| n.tag_name().name() == "Item"))
    {
        let quantity = child_text(item, "VirtualQuantity").and_then(|q| q.parse::<u64>().ok());
        match child_text(item, "ResourceType") {
            Some("3") if cpus.is_none() => cpus = Some(quantity),
            Some("4") if memory.is_none() => {
                // Memory without units is in MiB (what every writer means).
                let units = child_text(item, "AllocationUnits").map_or(Some(1 << 20), unit_bytes);
                // An overflowing product is absurdly large: it gets clamped below.
                memory = Some(quantity.zip(units).map(|(q, u)| q.saturating_mul(u)));
            }
            _ => {}
        }
    }
    let cpus = match cpus.flatten() {
        Some(n) if (1..=u64::from(MAX_CPUS)).contains(&n) => n as u32,
        Some(n) if n > u64::from(MAX_CPUS) => {
            problems.push(format!("OVF asks for {n} CPUs: clamped to {MAX_CPUS}"));
            MAX_CPUS
        }
        _ => {
            problems.push("OVF CPU count missing or invalid: using 1".into());
            1
        }
    };
    let memory_mib = match memory.flatten().map(|b| b >> 20) {
        Some(m) if (1..=MAX_MEMORY_MIB).contains(&m) => m,
        Some(m) if m > MAX_MEMORY_MIB => {
            problems.push(format!("OVF asks for {m} MiB of memory: clamped to {MAX_MEMORY_MIB}"));
            MAX_MEMORY_MIB
        }
        _ => {
            problems.push("OVF memory size missing or invalid: using 1024 MiB".into());
            1024
        }
    };
    let firmware = system.and_then(ovf_firmware);
    Ok((OvfDescriptor { name, cpus, memory_mib, disks, firmware }, version))
}

/// The firmware named anywhere in a VirtualSystem, by VirtualBox's or VMware's element.
fn ovf_firmware(system: roxmltree::Node<'_, '_>) -> Option<crate::BootFirmware> {
    let named = |value: &str| match value.to_ascii_lowercase().as_str() {
        "efi" | "efi32" | "efi64" | "uefi" => Some(crate::BootFirmware::Uefi),
        "bios" => Some(crate::BootFirmware::Bios),
        _ => None,
    };
    system.descendants().find_map(|node| match node.tag_name().name() {
        "Firmware" => attr(node, "type").and_then(named),
        "Config" if attr(node, "key") == Some("firmware") => attr(node, "value").and_then(named),
        _ => None,
    })
}

/// A Disk element's capacity in bytes (capacityAllocationUnits default to bytes).
fn disk_capacity(disk: roxmltree::Node<'_, '_>) -> Option<u64> {
    let capacity: u64 = attr(disk, "capacity")?.trim().parse().ok()?;
    let units = attr(disk, "capacityAllocationUnits").map_or(Some(1), unit_bytes)?;
    capacity.checked_mul(units).filter(|&c| c <= MAX_CAPACITY)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly on purpose.
mod tests {
    use super::*;

    /// A ustar header for `name` of `size` bytes with a correct checksum.
    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn member(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
        tar.extend(header(name, data.len() as u64, b'0'));
        tar.extend_from_slice(data);
        tar.resize(tar.len().next_multiple_of(512), 0);
    }

    fn ovf(cpus: &str, memory: &str, units: &str, capacity: &str) -> String {
        format!(
            r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References><File ovf:id="f1" ovf:href="disk.vmdk"/></References>
 <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte * 2^30"/></DiskSection>
 <VirtualSystem ovf:id="sys"><VirtualHardwareSection>
  <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity></Item>
  <Item><rasd:AllocationUnits>{units}</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity></Item>
 </VirtualHardwareSection></VirtualSystem>
</Envelope>"#
        )
    }

    fn ova(descriptor: &str) -> Vec<u8> {
        let mut tar = Vec::new();
        member(&mut tar, "vm.ovf", descriptor.as_bytes());
        member(&mut tar, "disk.vmdk", &[7u8; 1000]);
        tar.extend([0u8; 1024]);
        tar
    }

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("t.ova");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn descriptor_fields_come_from_the_ovf() {
        let dir = tempfile::tempdir().unwrap();
        let text = ovf("4", "8", "GigaBytes", "20");
        let ova = Ova::open(&write(dir.path(), &ova(&text))).unwrap();
        let d = ova.descriptor();
        let disk_at = 512 + text.len().next_multiple_of(512) as u64 + 512;
        assert_eq!((d.name.as_str(), d.cpus, d.memory_mib), ("sys", 4, 8192));
        assert_eq!(
            d.disks,
            vec![OvfDisk {
                file_name: "disk.vmdk".into(),
                capacity: 20 << 30,
                member_offset: disk_at,
                member_size: 1000
            }]
        );
        assert_eq!(ova.info().subformat.as_deref(), Some("ovf2"));
        assert!(ova.problems().is_empty(), "{:?}", ova.problems());
    }

    #[test]
    fn the_firmware_comes_from_virtualbox_or_vmware_elements_and_is_unknown_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let plain = ovf("1", "1024", "MegaBytes", "1");
        let firmware =
            |text: &str| Ova::open(&write(dir.path(), &ova(text))).unwrap().descriptor().firmware;
        assert_eq!(firmware(&plain), None);
        let vbox = plain.replace(
            "</VirtualHardwareSection>",
            r#"</VirtualHardwareSection><vbox:Machine xmlns:vbox="http://www.virtualbox.org/ovf/machine"><Hardware><Firmware type="EFI"/></Hardware></vbox:Machine>"#,
        );
        assert_eq!(firmware(&vbox), Some(crate::BootFirmware::Uefi));
        let vmware = plain.replace(
            "</VirtualHardwareSection>",
            r#"<vmw:Config xmlns:vmw="http://www.vmware.com/schema/ovf" vmw:key="firmware" vmw:value="bios"/></VirtualHardwareSection>"#,
        );
        assert_eq!(firmware(&vmware), Some(crate::BootFirmware::Bios));
    }

    #[test]
    fn absurd_cpu_and_memory_claims_are_clamped_with_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ova =
            Ova::open(&write(dir.path(), &ova(&ovf("100000", "99999999999", "byte * 2^40", "1"))))
                .unwrap();
        let d = ova.descriptor();
        assert_eq!((d.cpus, d.memory_mib), (MAX_CPUS, MAX_MEMORY_MIB));
        assert_eq!(ova.problems().len(), 2, "{:?}", ova.problems());
    }

    #[test]
    fn absurd_disk_capacity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ova::open(&write(dir.path(), &ova(&ovf("1", "1", "MB", "99999999999999"))))
            .unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
    }

    #[test]
    fn member_past_eof_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        member(&mut tar, "vm.ovf", ovf("1", "1", "MB", "1").as_bytes());
        let disk_at = tar.len() as u64;
        tar.extend(header("disk.vmdk", 1 << 30, b'0'));
        tar.extend([0u8; 512]);
        let err = Ova::open(&write(dir.path(), &tar)).unwrap_err();
        assert_eq!(err.kind(), DiskErrorKind::CorruptImage);
        assert_eq!(err.offset(), Some(disk_at));
    }

    #[test]
    fn bad_header_checksum_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = ova(&ovf("1", "1", "MB", "1"));
        tar[0] = b'x';
        assert_eq!(
            Ova::open(&write(dir.path(), &tar)).unwrap_err().kind(),
            DiskErrorKind::InvalidFormat
        );
    }

    #[test]
    fn gnu_long_names_and_base256_sizes_are_read() {
        assert_eq!(tar_number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(tar_number(b"00000001750\0"), Some(1000));
        assert_eq!(tar_number(&[0xff; 12]), None);
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}.ovf", "d/".repeat(80));
        let mut tar = Vec::new();
        tar.extend(header("././@LongLink", long.len() as u64, b'L'));
        tar.extend_from_slice(long.as_bytes());
        tar.resize(tar.len().next_multiple_of(512), 0);
        member(&mut tar, "short-name", ovf("1", "512", "byte * 2^20", "1").as_bytes());
        member(&mut tar, "disk.vmdk", &[1; 10]);
        let ova = Ova::open(&write(dir.path(), &tar)).unwrap();
        assert_eq!(ova.members()[0].name, long);
        assert_eq!(ova.descriptor().memory_mib, 512);
    }

    #[test]
    fn missing_descriptor_is_not_an_ova() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        member(&mut tar, "disk.vmdk", &[1; 10]);
        assert_eq!(
            Ova::open(&write(dir.path(), &tar)).unwrap_err().kind(),
            DiskErrorKind::InvalidFormat
        );
    }

    #[test]
    fn dtd_entity_bombs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><Envelope>&b;</Envelope>"#;
        assert_eq!(
            Ova::open(&write(dir.path(), &ova(bomb))).unwrap_err().kind(),
            DiskErrorKind::InvalidFormat
        );
    }

    #[test]
    fn allocation_units_are_understood() {
        assert_eq!(unit_bytes("byte * 2^20"), Some(1 << 20));
        assert_eq!(unit_bytes("byte*2^30"), Some(1 << 30));
        assert_eq!(unit_bytes("MegaBytes"), Some(1 << 20));
        assert_eq!(unit_bytes("byte * 1024"), Some(1024));
        assert_eq!(unit_bytes("byte * 2^99"), None);
        assert_eq!(unit_bytes("hertz * 10^6"), None);
    }

    #[test]
    fn manifest_with_a_wrong_digest_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        member(&mut tar, "vm.ovf", ovf("1", "1", "MB", "1").as_bytes());
        member(&mut tar, "disk.vmdk", b"abc");
        let mf = "SHA1(disk.vmdk)= a9993e364706816aba3e25717850c26c9cd0d89d\nSHA256(vm.ovf)= 00\n";
        member(&mut tar, "vm.mf", mf.as_bytes());
        let ova = Ova::open(&write(dir.path(), &tar)).unwrap();
        // sha1("abc") matches; the descriptor's digest is wrong.
        assert_eq!(ova.problems().len(), 1, "{:?}", ova.problems());
        assert!(ova.problems()[0].contains("vm.ovf"));
    }
}
