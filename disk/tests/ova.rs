//! A real OVA (descriptor, qemu-img streamOptimized VMDK, sha256 manifest, tarred by Python's
//! tarfile in ustar format) opens, describes the machine and gives back the disk byte for byte.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::path::Path;
use std::process::Command;

use disk::ova::Ova;

fn have_tools() -> bool {
    testkit::require_tools(&["qemu-img", "python3"])
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:id="file1" ovf:href="appliance-disk1.vmdk"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="16"
          ovf:capacityAllocationUnits="byte * 2^20"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <Name>Test Appliance</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>2 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>2048MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>2048</rasd:VirtualQuantity>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

/// Builds `appliance.ova` in `dir`; `corrupt_manifest` writes a wrong digest for the disk.
fn build_ova(dir: &Path, corrupt_manifest: bool) -> std::path::PathBuf {
    let raw = dir.join("disk.raw");
    let mut data: Vec<u8> = (0..16usize << 20).map(|i| ((i / 512) % 251 + 1) as u8).collect();
    data[4 << 20..12 << 20].fill(0);
    std::fs::write(&raw, &data).unwrap();
    let vmdk = dir.join("appliance-disk1.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw.to_str().unwrap(),
            vmdk.to_str().unwrap(),
        ],
    );
    std::fs::write(dir.join("appliance.ovf"), OVF).unwrap();
    let script = r#"
import hashlib, sys, tarfile, os
d, bad = sys.argv[1], sys.argv[2] == "1"
names = ["appliance.ovf", "appliance-disk1.vmdk"]
with open(os.path.join(d, "appliance.mf"), "w") as mf:
    for n in names:
        h = hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
        if bad and n.endswith(".vmdk"):
            h = "0" * 64
        mf.write("SHA256(%s)= %s\n" % (n, h))
with tarfile.open(os.path.join(d, "appliance.ova"), "w", format=tarfile.USTAR_FORMAT) as t:
    for n in names + ["appliance.mf"]:
        t.add(os.path.join(d, n), arcname=n)
"#;
    run(
        "python3",
        &["-c", script, dir.to_str().unwrap(), if corrupt_manifest { "1" } else { "0" }],
    );
    dir.join("appliance.ova")
}

#[test]
fn ova_descriptor_and_disk_member_come_out_intact() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = build_ova(dir.path(), false);
    let ova = Ova::open(&path).unwrap();
    assert!(ova.problems().is_empty(), "{:?}", ova.problems());
    let d = ova.descriptor();
    assert_eq!(d.name, "Test Appliance");
    assert_eq!(d.cpus, 2);
    assert_eq!(d.memory_mib, 2048);
    assert_eq!(d.disks.len(), 1);
    assert_eq!(d.disks[0].file_name, "appliance-disk1.vmdk");
    assert_eq!(d.disks[0].capacity, 16 << 20);
    let vmdk = std::fs::read(dir.path().join("appliance-disk1.vmdk")).unwrap();
    assert_eq!(d.disks[0].member_size, vmdk.len() as u64);
    let out = dir.path().join("extracted.vmdk");
    ova.extract_member("appliance-disk1.vmdk", &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == vmdk);
    let info = ova.info();
    assert_eq!(info.format, disk::ImageFormat::Ova);
    assert_eq!(info.virtual_size, 16 << 20);
    assert_eq!(info.subformat.as_deref(), Some("ovf1"));
}

#[test]
fn manifest_mismatch_is_reported_as_a_problem() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = build_ova(dir.path(), true);
    let ova = Ova::open(&path).unwrap();
    assert_eq!(ova.problems().len(), 1, "{:?}", ova.problems());
    assert!(ova.problems()[0].contains("appliance-disk1.vmdk"), "{:?}", ova.problems());
}

#[test]
fn extracting_a_missing_member_fails() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ova = Ova::open(&build_ova(dir.path(), false)).unwrap();
    let err = ova.extract_member("nope.vmdk", &dir.path().join("x")).unwrap_err();
    assert_eq!(err.kind(), disk::DiskErrorKind::Io);
}
