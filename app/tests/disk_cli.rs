//! `hutch disk ...` and `hutch import` as a user runs them, on images qemu-img makes, checked
//! with qemu-img (compare, check). Without qemu-img they skip (`testkit::skip`: a failure in CI
//! unless HUTCH_TEST_ABSENT lists it).
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed test.

mod common;

use common::{assert_error, assert_ok, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;

fn have_tools() -> bool {
    testkit::require_tools(&["qemu-img", "qemu-io", "python3"])
}

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let s = Sandbox { dir: tempfile::tempdir().unwrap() };
        std::fs::create_dir(s.home()).unwrap();
        std::fs::write(s.path("vmlinuz"), b"not really a kernel").unwrap();
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    fn hutch(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(args)
            .current_dir(self.dir.path())
            .env("HUTCH_HOME", self.home())
            // No demo guest: the kernel must come from the command line.
            .env("HUTCH_GUEST_DIR", self.path("no-guest"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A `HUTCH_FIRMWARE_DIR` with stand-ins for OVMF, SeaBIOS and its VGA BIOS (import
    /// only checks that they are there).
    fn fake_firmware(&self) -> PathBuf {
        let dir = self.path("firmware");
        std::fs::create_dir(&dir).unwrap();
        for name in ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "bios.bin", "vgabios-bochs-display.bin"]
        {
            std::fs::write(dir.join(name), vec![0u8; 128 << 10]).unwrap();
        }
        dir
    }

    fn qemu_img(&self, args: &[&str]) -> Output {
        let out =
            Command::new("qemu-img").args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
        out
    }

    /// A 64 MiB qcow2 with 3 MiB of data at 1 MiB, 1 MiB at 40 MiB and an explicit zero
    /// range, plus the same disk in every other format qemu-img writes.
    fn fixtures(&self) {
        self.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "64M"]);
        let io = Command::new("qemu-io")
            .args([
                "-c",
                "write -P 0xab 1M 3M",
                "-c",
                "write -P 0x5c 40M 1M",
                "-c",
                "write -z 8M 1M",
                "src.qcow2",
            ])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(io.status.success(), "{}", stderr(&io));
        for (fmt, ext) in FORMATS {
            if *ext != "qcow2" {
                self.qemu_img(&["convert", "-O", fmt, "src.qcow2", &format!("src.{ext}")]);
            }
        }
    }
}

/// qemu-img format names and the extensions used here.
const FORMATS: &[(&str, &str)] = &[
    ("qcow2", "qcow2"),
    ("raw", "raw"),
    ("vmdk", "vmdk"),
    ("vdi", "vdi"),
    ("vpc", "vhd"),
    ("vhdx", "vhdx"),
];

fn json(o: &Output) -> serde_json::Value {
    assert_ok(o);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `qemu-img compare` says the guest-visible contents are equal (sizes may differ: VHD
/// rounds its size up to a CHS geometry).
#[track_caller]
fn assert_same_content(s: &Sandbox, a: &str, b: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", a, b])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{a} and {b} differ: {}{}", stdout(&out), stderr(&out));
}

#[track_caller]
fn assert_qcow2_clean(s: &Sandbox, path: &str) {
    let out =
        Command::new("qemu-img").args(["check", path]).current_dir(s.dir.path()).output().unwrap();
    assert!(out.status.success(), "qemu-img check {path}: {}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("No errors"), "{}", stdout(&out));
}

fn no_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp-"))
}

#[test]
fn info_names_every_format_and_its_size() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    for (_, ext) in FORMATS {
        let file = format!("src.{ext}");
        let v = json(&s.hutch(&["disk", "info", &file, "--json"]));
        let want = *ext;
        assert_eq!(v["format"], want, "{file}: {v}");
        let size = v["virtual_size"].as_u64().unwrap();
        // VHD rounds up to its CHS geometry.
        assert!((64 * MIB..65 * MIB).contains(&size), "{file}: {size}");
        assert!(v["allocated_bytes"].as_u64().unwrap() > 0, "{file}: {v}");
        assert!(v["problems"].as_array().unwrap().is_empty(), "{file}: {v}");
        assert!(v["backing_chain"].as_array().unwrap().is_empty(), "{file}: {v}");
        let text = s.hutch(&["disk", "info", &file]);
        assert_ok(&text);
        let text = stdout(&text);
        assert!(text.contains(&format!("format:       {want}")), "{text}");
        assert!(text.contains("virtual size: 64 MiB") || *ext == "vhd", "{text}");
        assert!(text.contains("problems:     none"), "{text}");
    }
    let v = json(&s.hutch(&["disk", "info", "src.qcow2", "--json"]));
    assert_eq!(v["subformat"], "v3");
    assert_eq!(v["check"]["corruptions"], 0);
    assert_eq!(v["check"]["leaked_clusters"], 0);
    let v = json(&s.hutch(&["disk", "info", "src.vmdk", "--json"]));
    assert_eq!(v["subformat"], "monolithicSparse");
}

#[test]
fn info_follows_the_backing_chain() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "16M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    let v = json(&s.hutch(&["disk", "info", "top.qcow2", "--json"]));
    let chain = v["backing_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{v}");
    assert_eq!(chain[0]["format"], "qcow2");
    assert_eq!(chain[1]["format"], "raw");
    assert!(chain[1]["path"].as_str().unwrap().ends_with("base.raw"));
    let text = stdout(&s.hutch(&["disk", "info", "top.qcow2"]));
    assert!(text.contains("backing file:") && text.contains("mid.qcow2"), "{text}");
}

#[test]
fn info_reports_leaked_clusters_as_problems() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "leaky.qcow2", "16M"]);
    // Bump the refcount of an unused cluster far past the end of the metadata: a leak.
    let script = r#"
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(72)
cluster_bits = struct.unpack(">I", hdr[20:24])[0]
rt_off = struct.unpack(">Q", hdr[48:56])[0]
f.seek(rt_off); block = struct.unpack(">Q", f.read(8))[0]
cs = 1 << cluster_bits
f.seek(0, 2); end = (f.tell() + cs - 1) // cs * cs
f.truncate(end + cs)
f.seek(block + 2 * (end // cs)); f.write(struct.pack(">H", 1))
"#;
    let out = Command::new("python3").args(["-c", script, &s.p("leaky.qcow2")]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&s.hutch(&["disk", "info", "leaky.qcow2", "--json"]));
    assert_eq!(v["check"]["leaked_clusters"], 1, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("leaked"), "{v}");
}

#[test]
fn convert_from_every_format_to_qcow2_and_raw_keeps_the_content() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    for (_, ext) in FORMATS {
        let src = format!("src.{ext}");
        let q = format!("out-{ext}.qcow2");
        assert_ok(&s.hutch(&["disk", "convert", &src, &q]));
        assert_same_content(&s, "src.qcow2", &q);
        assert_qcow2_clean(&s, &q);
        let v = json(&s.hutch(&["disk", "info", &q, "--json"]));
        assert_eq!(v["format"], "qcow2");
        // Only the 4 MiB of data (and metadata) got allocated.
        let alloc = v["allocated_bytes"].as_u64().unwrap();
        assert!(alloc < 6 * MIB, "{q}: {alloc} bytes allocated");

        let r = format!("out-{ext}.raw");
        assert_ok(&s.hutch(&["disk", "convert", "--format", "raw", &src, &r]));
        assert_same_content(&s, "src.qcow2", &r);
        let v = json(&s.hutch(&["disk", "info", &r, "--json"]));
        assert_eq!(v["format"], "raw");
    }
    assert!(no_temp_files(s.dir.path()));
}

#[test]
fn convert_refuses_to_overwrite_without_force() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    std::fs::write(s.path("taken.qcow2"), b"precious").unwrap();
    let out = s.hutch(&["disk", "convert", "src.vmdk", "taken.qcow2"]);
    assert_error(&out, &["taken.qcow2", "already exists", "--force"]);
    assert_eq!(std::fs::read(s.path("taken.qcow2")).unwrap(), b"precious");
    assert_ok(&s.hutch(&["disk", "convert", "--force", "src.vmdk", "taken.qcow2"]));
    assert_same_content(&s, "src.qcow2", "taken.qcow2");
    assert!(no_temp_files(s.dir.path()));
}

#[test]
fn convert_of_an_ova_points_to_import() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    build_ova(&s);
    let out = s.hutch(&["disk", "convert", "appliance.ova", "x.qcow2"]);
    assert_error(&out, &["OVA", "hutch import"]);
    assert!(!s.path("x.qcow2").exists());
}

#[test]
fn compact_reclaims_zeroed_space_in_qcow2_and_raw() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    // qcow2: data written, then overwritten with zeroes as data (as a guest would).
    s.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "32M"]);
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 0x11 0 16M", "-c", "write -P 0 2M 12M", "c.qcow2"])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(io.status.success(), "{}", stderr(&io));
    s.qemu_img(&["convert", "-O", "qcow2", "c.qcow2", "c-before.qcow2"]);
    let before = std::fs::metadata(s.path("c.qcow2")).unwrap().len();
    let out = s.hutch(&["disk", "compact", "c.qcow2"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("reclaimed"), "{}", stdout(&out));
    let after = std::fs::metadata(s.path("c.qcow2")).unwrap().len();
    assert!(after + 10 * MIB < before, "{before} -> {after}");
    assert_same_content(&s, "c.qcow2", "c-before.qcow2");
    assert_qcow2_clean(&s, "c.qcow2");

    // raw: a fully allocated file with a zeroed middle gets holes.
    let mut data = vec![0x42u8; 16 * MIB as usize];
    data[(2 * MIB) as usize..(14 * MIB) as usize].fill(0);
    std::fs::write(s.path("c.raw"), &data).unwrap();
    let out = s.hutch(&["disk", "compact", "c.raw"]);
    if stderr(&out).contains("cannot punch holes") {
        testkit::skip("holes", "this file system cannot punch holes");
    } else {
        assert_ok(&out);
        assert_eq!(std::fs::read(s.path("c.raw")).unwrap(), data);
        let v = json(&s.hutch(&["disk", "info", "c.raw", "--json"]));
        assert!(v["allocated_bytes"].as_u64().unwrap() < 6 * MIB, "{v}");
    }

    let out = s.hutch(&["disk", "compact", "src.vdi"]);
    assert_error(&out, &["vdi", "convert it to qcow2 first"]);
    assert!(no_temp_files(s.dir.path()));
}

#[test]
fn resize_grows_qcow2_and_raw_and_shrinks_only_when_asked() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    assert_ok(&s.hutch(&["disk", "resize", "src.qcow2", "+1G"]));
    let v = json(&s.hutch(&["disk", "info", "src.qcow2", "--json"]));
    assert_eq!(v["virtual_size"].as_u64().unwrap(), 1024 * MIB + 64 * MIB);
    assert_qcow2_clean(&s, "src.qcow2");
    // The data is still there: compare against the raw copy, grown alike.
    assert_ok(&s.hutch(&["disk", "resize", "src.raw", "1088M"]));
    assert_eq!(std::fs::metadata(s.path("src.raw")).unwrap().len(), 1088 * MIB);
    assert_same_content(&s, "src.qcow2", "src.raw");

    let out = s.hutch(&["disk", "resize", "src.raw", "32M"]);
    assert_error(&out, &["--shrink"]);
    assert_ok(&s.hutch(&["disk", "resize", "src.raw", "-1056M", "--shrink"]));
    assert_eq!(std::fs::metadata(s.path("src.raw")).unwrap().len(), 32 * MIB);

    let out = s.hutch(&["disk", "resize", "src.vmdk", "1G"]);
    assert_error(&out, &["vmdk", "qcow2 and raw"]);
    let out = s.hutch(&["disk", "resize", "src.qcow2", "12X"]);
    assert_error(&out, &["Invalid size"]);
}

fn vm_toml(s: &Sandbox, name: &str) -> toml::Value {
    let text = std::fs::read_to_string(s.home().join("vms").join(name).join("vm.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

#[test]
fn import_of_a_vmdk_converts_it_into_the_vm_directory() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    let out =
        s.hutch(&["import", "src.vmdk", "--name", "web", "--kernel", "vmlinuz", "--cpus", "2"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("Imported VM 'web'"), "{}", stdout(&out));
    let t = vm_toml(&s, "web");
    assert_eq!(t["cpus"].as_integer(), Some(2));
    let disk = t["disk"][0]["path"].as_str().unwrap().to_string();
    assert_eq!(Path::new(&disk), s.home().join("vms/web/disk.qcow2"));
    assert_same_content(&s, "src.qcow2", &disk);
    assert_qcow2_clean(&s, &disk);
    assert!(stdout(&s.hutch(&["list"])).contains("web"));

    // The same name again is a clear error that names the VM; nothing new appears.
    let out = s.hutch(&["import", "src.vmdk", "--name", "web", "--kernel", "vmlinuz"]);
    assert_error(&out, &["'web' already exists"]);
    // Without --name the file name is used, then a free variant of it.
    assert_ok(&s.hutch(&["import", "src.vdi", "--kernel", "vmlinuz"]));
    assert_ok(&s.hutch(&["import", "src.vdi", "--kernel", "vmlinuz"]));
    let list = stdout(&s.hutch(&["list"]));
    assert!(list.contains("src ") && list.contains("src-2"), "{list}");
}

#[test]
fn import_in_place_uses_an_overlay_for_foreign_formats() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    assert_ok(&s.hutch(&[
        "import",
        "src.vhdx",
        "--name",
        "ov",
        "--in-place",
        "--kernel",
        "vmlinuz",
    ]));
    let t = vm_toml(&s, "ov");
    let disk = t["disk"][0]["path"].as_str().unwrap().to_string();
    let info = stdout(&s.qemu_img(&["info", "--output=json", &disk]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"].as_str().unwrap(), s.p("src.vhdx"));
    assert_same_content(&s, "src.qcow2", &disk);
    // raw is used directly.
    assert_ok(&s.hutch(&["import", "src.raw", "--name", "r", "--in-place", "--kernel", "vmlinuz"]));
    assert_eq!(vm_toml(&s, "r")["disk"][0]["path"].as_str().unwrap(), s.p("src.raw"));
}

#[test]
fn import_without_a_kernel_says_which_flag_is_needed_and_leaves_nothing() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    s.fixtures();
    let out = s.hutch(&["import", "src.vmdk", "--name", "nok"]);
    assert_error(&out, &["--kernel"]);
    assert!(!s.home().join("vms/nok").exists());
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
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="64"
          ovf:capacityAllocationUnits="byte * 2^20"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <Name>Test Appliance</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <Item>
        <rasd:ElementName>3 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>3</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>768MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>768</rasd:VirtualQuantity>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

/// `appliance.ova` (OVF + streamOptimized VMDK of src.qcow2, ustar by Python's tarfile).
fn build_ova(s: &Sandbox) {
    if !s.path("src.qcow2").exists() {
        s.fixtures();
    }
    s.qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "src.qcow2",
        "appliance-disk1.vmdk",
    ]);
    std::fs::write(s.path("appliance.ovf"), OVF).unwrap();
    let script = r#"
import os, sys, tarfile
d = sys.argv[1]
with tarfile.open(os.path.join(d, "appliance.ova"), "w", format=tarfile.USTAR_FORMAT) as t:
    for n in ["appliance.ovf", "appliance-disk1.vmdk"]:
        t.add(os.path.join(d, n), arcname=n)
"#;
    let out = Command::new("python3")
        .args(["-c", script, s.dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn import_of_an_ova_takes_name_cpus_and_memory_from_the_ovf() {
    if !have_tools() {
        return;
    }
    let s = Sandbox::new();
    build_ova(&s);
    let v = json(&s.hutch(&["disk", "info", "appliance.ova", "--json"]));
    assert_eq!(v["format"], "ova");
    let out = s.hutch(&["import", "appliance.ova", "--kernel", "vmlinuz"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("Imported VM 'Test-Appliance' (3 CPUs, 768 MiB)"),
        "{}",
        stdout(&out)
    );
    let t = vm_toml(&s, "Test-Appliance");
    assert_eq!(t["cpus"].as_integer(), Some(3));
    assert_eq!(t["memory_mib"].as_integer(), Some(768));
    let disk = t["disk"][0]["path"].as_str().unwrap().to_string();
    assert_same_content(&s, "src.qcow2", &disk);
    assert_qcow2_clean(&s, &disk);
    // No extraction leftovers.
    let entries: Vec<_> = std::fs::read_dir(s.home().join("vms/Test-Appliance"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(entries.iter().all(|n| !n.starts_with('.')), "{entries:?}");
    // A second import of the same appliance gets a free name.
    assert_ok(&s.hutch(&["import", "appliance.ova", "--kernel", "vmlinuz"]));
    assert!(s.home().join("vms/Test-Appliance-2/vm.toml").exists());
    let out = s.hutch(&["import", "appliance.ova", "--in-place", "--kernel", "vmlinuz"]);
    assert_error(&out, &["--in-place", "OVA"]);
}

/// An imported disk boots its own OS: the firmware comes from its partition table (a GPT with
/// an EFI system partition: UEFI; an MBR with boot code: BIOS), through every format.
#[test]
fn import_picks_the_firmware_from_the_partition_table() {
    let s = Sandbox::new();
    let firmware = s.fake_firmware();
    // GPT with an ESP, by sfdisk on a file; MBR with boot code written by hand.
    let gpt = s.path("uefi.raw");
    std::fs::write(&gpt, vec![0u8; 16 << 20]).unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", gpt.to_str().unwrap()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nsize=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=linux\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let mut mbr = vec![0u8; 16 << 20];
    mbr[..2].copy_from_slice(&[0xeb, 0x63]);
    mbr[446 + 4] = 0x83;
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(s.path("bios.raw"), mbr).unwrap();
    s.qemu_img(&["convert", "-O", "vdi", "bios.raw", "bios.vdi"]);
    s.qemu_img(&["convert", "-O", "vmdk", "uefi.raw", "uefi.vmdk"]);
    s.qemu_img(&["convert", "-O", "vhdx", "uefi.raw", "uefi.vhdx"]);
    let import = |file: &str, name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(["import", file, "--name", name])
            .current_dir(s.dir.path())
            .env("HUTCH_HOME", s.home())
            .env("HUTCH_GUEST_DIR", s.path("no-guest"))
            .env("HUTCH_FIRMWARE_DIR", &firmware)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ok(&out);
        let toml =
            std::fs::read_to_string(s.home().join("vms").join(name).join("vm.toml")).unwrap();
        (stdout(&out), toml)
    };
    for (file, boot, why) in [
        ("bios.vdi", "bios", "MBR has boot code"),
        ("uefi.vmdk", "uefi", "EFI system partition"),
        ("uefi.vhdx", "uefi", "EFI system partition"),
    ] {
        let name = file.replace('.', "-");
        let (said, toml) = import(file, &name);
        assert!(toml.contains(&format!("boot = \"{boot}\"")), "{file}: {toml}");
        assert!(!toml.contains("kernel"), "{file}: {toml}");
        assert!(said.contains(why), "{file}: {said}");
    }
}

/// An ISO becomes a VM that installs from it: the ISO as its read-only CD (left where it is),
/// a new blank qcow2 disk (20 GiB unless --disk-size says), UEFI unless --firmware says.
#[test]
fn import_of_an_iso_makes_a_vm_that_installs_from_it_onto_a_new_disk() {
    let s = Sandbox::new();
    let firmware = s.fake_firmware();
    let mut iso = vec![0u8; 1 << 20];
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(s.path("debian.iso"), &iso).unwrap();
    let import = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hutch"))
            .arg("import")
            .args(args)
            .current_dir(s.dir.path())
            .env("HUTCH_HOME", s.home())
            .env("HUTCH_FIRMWARE_DIR", &firmware)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let virtual_size = |vm: &str| {
        let disk = s.home().join("vms").join(vm).join("disk.qcow2");
        let out = s.qemu_img(&["info", "--output=json", disk.to_str().unwrap()]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["virtual-size"].as_u64().unwrap()
    };
    let out = import(&["debian.iso"]);
    assert_ok(&out);
    let toml = std::fs::read_to_string(s.home().join("vms/debian/vm.toml")).unwrap();
    assert!(toml.contains("boot = \"uefi\""), "{toml}");
    assert!(toml.contains(&format!("iso = \"{}\"", s.p("debian.iso"))), "{toml}");
    assert!(!toml.contains("kernel"), "{toml}");
    assert_eq!(virtual_size("debian"), 20 << 30);
    assert_eq!(std::fs::read(s.path("debian.iso")).unwrap(), iso, "the ISO is left as it was");

    assert_ok(&import(&[
        "debian.iso",
        "--name",
        "small",
        "--firmware",
        "bios",
        "--disk-size",
        "2G",
    ]));
    let toml = std::fs::read_to_string(s.home().join("vms/small/vm.toml")).unwrap();
    assert!(toml.contains("boot = \"bios\""), "{toml}");
    assert_eq!(virtual_size("small"), 2 << 30);

    // A kernel makes no sense for installation media; nothing is left behind.
    let out = import(&["debian.iso", "--name", "nok", "--kernel", "vmlinuz"]);
    assert_error(&out, &["ISO", "--kernel"]);
    assert!(!s.home().join("vms/nok").exists());
}
