//! The real `hutch` binary against a throwaway library (HUTCH_HOME) and runtime dir.
//! No guest ever boots here: the machine is exercised in the nested-KVM lab.
#![allow(clippy::unwrap_used)] // A failed unwrap is a failed test.

mod common;

use common::{assert_error, assert_ok, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Sandbox {
    home: tempfile::TempDir,
    runtime: tempfile::TempDir,
    files: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let s = Sandbox {
            home: tempfile::tempdir().unwrap(),
            runtime: tempfile::tempdir().unwrap(),
            files: tempfile::tempdir().unwrap(),
        };
        std::fs::write(s.kernel(), b"not really a kernel").unwrap();
        std::fs::write(s.file("disk.img"), vec![0u8; 4096]).unwrap();
        s
    }

    fn file(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    fn kernel(&self) -> PathBuf {
        self.file("vmlinuz")
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.home.path().join("vms").join(name)
    }

    fn hutch(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(args)
            .current_dir(self.files.path())
            .env("HUTCH_HOME", self.home.path())
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env_remove("HUTCH_BACKEND")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `hutch` with `HUTCH_FIRMWARE_DIR` set to `dir`.
    fn hutch_with_firmware_dir(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(args)
            .current_dir(self.files.path())
            .env("HUTCH_HOME", self.home.path())
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("HUTCH_FIRMWARE_DIR", dir)
            .env_remove("HUTCH_BACKEND")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A stand-in for Debian's OVMF pair in `files/ovmf`: a CODE page that halts at the reset
    /// vector, and a VARS template.
    fn fake_ovmf(&self) -> PathBuf {
        let dir = self.file("ovmf");
        std::fs::create_dir_all(&dir).unwrap();
        let mut code = vec![0u8; 4096];
        code[0xff0..0xff3].copy_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to it
        std::fs::write(dir.join("OVMF_CODE_4M.fd"), code).unwrap();
        std::fs::write(dir.join("OVMF_VARS_4M.fd"), vec![0x5au8; 8192]).unwrap();
        dir
    }

    fn create(&self, name: &str) -> Output {
        self.hutch(&["create", name, "--kernel", self.kernel().to_str().unwrap()])
    }
}

#[test]
fn create_list_status_delete_round_trip() {
    let s = Sandbox::new();
    let o = s.hutch(&[
        "create",
        "web-1",
        "--kernel",
        "vmlinuz",
        "--disk",
        "disk.img,readonly",
        "--cpus",
        "2",
        "--memory",
        "256",
        "--cmdline",
        "console=ttyS0 quiet",
    ]);
    assert_ok(&o);

    // Stored with absolute paths even though they were given relative to the cwd.
    let toml = std::fs::read_to_string(s.vm_dir("web-1").join("vm.toml")).unwrap();
    let kernel = s.kernel();
    assert!(toml.contains(&format!("kernel = \"{}\"", kernel.display())), "{toml}");
    assert!(toml.contains("readonly = true"), "{toml}");
    assert!(toml.contains("cmdline = \"console=ttyS0 quiet\""), "{toml}");

    let o = s.hutch(&["list"]);
    assert_ok(&o);
    let table = stdout(&o);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "STATE", "CPUS", "MEMORY"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, ["web-1", "stopped", "2", "256", "MiB"]);

    let o = s.hutch(&["list", "--json"]);
    assert_ok(&o);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list[0]["name"], "web-1");
    assert_eq!(list[0]["state"], "stopped");

    let o = s.hutch(&["status", "web-1", "--json"]);
    assert_ok(&o);
    let st: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((st["state"].as_str(), st["cpus"].as_u64()), (Some("stopped"), Some(2)));
    assert_eq!(st["memory_mib"], 256);

    let o = s.hutch(&["status", "web-1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("state:   stopped"), "{}", stdout(&o));

    assert_ok(&s.hutch(&["delete", "web-1"]));
    assert!(!s.vm_dir("web-1").exists());
    let o = s.hutch(&["list", "--json"]);
    assert_eq!(stdout(&o).trim(), "[]");
}

#[test]
fn duplicate_create_is_refused_and_keeps_the_first() {
    let s = Sandbox::new();
    assert_ok(&s.create("vm"));
    let before = std::fs::read(s.vm_dir("vm").join("vm.toml")).unwrap();
    let o = s.hutch(&["create", "vm", "--kernel", "vmlinuz", "--cpus", "4"]);
    assert_error(&o, &["already exists", "'vm'"]);
    assert_eq!(std::fs::read(s.vm_dir("vm").join("vm.toml")).unwrap(), before);
}

#[test]
fn bad_names_are_refused() {
    let s = Sandbox::new();
    for name in [".hidden", "a/b", "with space", &"x".repeat(65)] {
        assert_error(&s.create(name), &["Invalid VM name"]);
    }
    assert_error(&s.hutch(&["status", "../etc"]), &["Invalid VM name"]);
    assert_error(&s.hutch(&["delete", ".."]), &["Invalid VM name"]);
    assert_eq!(stdout(&s.hutch(&["list", "--json"])).trim(), "[]");
}

#[test]
fn create_with_a_missing_file_is_refused_naming_it() {
    let s = Sandbox::new();
    let missing = s.file("nope.img");
    let o = s.hutch(&["create", "vm", "--kernel", "vmlinuz", "--disk", missing.to_str().unwrap()]);
    assert_error(&o, &[missing.to_str().unwrap()]);
    assert!(!s.vm_dir("vm").exists());
}

#[test]
fn run_with_a_missing_kernel_fails_naming_the_path() {
    let s = Sandbox::new();
    let missing = s.file("no-such-kernel");
    let o = s.hutch(&["run", "--kernel", missing.to_str().unwrap()]);
    assert_error(&o, &["kernel", missing.to_str().unwrap(), "No such file"]);
}

#[test]
fn without_uefi_firmware_run_and_create_name_the_package_and_the_paths_searched() {
    let s = Sandbox::new();
    let empty = s.file("no-ovmf");
    std::fs::create_dir(&empty).unwrap();
    let code = empty.join("OVMF_CODE_4M.fd");
    let vars = empty.join("OVMF_VARS.fd");
    let want = ["'ovmf' package", code.to_str().unwrap(), vars.to_str().unwrap()];
    let o = s.hutch_with_firmware_dir(&empty, &["run", "--firmware", "uefi"]);
    assert_error(&o, &want);
    let o = s.hutch_with_firmware_dir(&empty, &["create", "vm", "--firmware", "uefi"]);
    assert_error(&o, &want);
    assert!(!s.vm_dir("vm").exists());
    // Only the keyword: a library VM does not keep a firmware path; and no kernel with it.
    for (args, needle) in [
        (&["create", "vm", "--firmware", "code.fd"][..], "possible values: uefi, bios"),
        (&["create", "vm", "--firmware", "uefi", "--kernel", "k"], "--kernel"),
    ] {
        let o = s.hutch_with_firmware_dir(&empty, args);
        assert!(!o.status.success() && stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn without_seabios_run_and_create_name_the_package_and_the_path_searched() {
    let s = Sandbox::new();
    let empty = s.file("no-seabios");
    std::fs::create_dir(&empty).unwrap();
    let image = empty.join("bios.bin");
    let want = ["'seabios' package", image.to_str().unwrap()];
    let o = s.hutch_with_firmware_dir(&empty, &["run", "--firmware", "bios"]);
    assert_error(&o, &want);
    let o = s.hutch_with_firmware_dir(&empty, &["create", "vm", "--firmware", "bios"]);
    assert_error(&o, &want);
    assert!(!s.vm_dir("vm").exists());
    // With it but without the VGA BIOS, a VM with a screen (the default) is refused too.
    std::fs::write(&image, vec![0u8; 128 << 10]).unwrap();
    let vga_bios = empty.join("vgabios-bochs-display.bin");
    let o = s.hutch_with_firmware_dir(&empty, &["create", "vm", "--firmware", "bios"]);
    assert_error(&o, &["'seabios' package", vga_bios.to_str().unwrap()]);
    assert!(!s.vm_dir("vm").exists());
    // With both, the VM says what it boots and has no kernel.
    std::fs::write(&vga_bios, vec![0u8; 28 << 10]).unwrap();
    let o = s.hutch_with_firmware_dir(&empty, &["create", "vm", "--firmware", "bios"]);
    assert_ok(&o);
    let toml = std::fs::read_to_string(s.vm_dir("vm").join("vm.toml")).unwrap();
    assert!(toml.contains("boot = \"bios\"") && !toml.contains("kernel"), "{toml}");
}

#[test]
fn a_uefi_vm_gets_its_own_variable_store_on_first_start_and_keeps_it() {
    let s = Sandbox::new();
    let ovmf = s.fake_ovmf();
    let o =
        s.hutch_with_firmware_dir(&ovmf, &["create", "vm", "--firmware", "uefi", "--net", "none"]);
    assert_ok(&o);
    let toml = std::fs::read_to_string(s.vm_dir("vm").join("vm.toml")).unwrap();
    assert!(toml.contains("boot = \"uefi\"") && !toml.contains("kernel"), "{toml}");
    let nvram = s.vm_dir("vm").join("vars.fd");
    assert!(!nvram.exists(), "made before the first start");

    // Whether this host can run the VM or not, its store is made before the machine is.
    let start = |s: &Sandbox| {
        let _ = s.hutch_with_firmware_dir(&ovmf, &["start", "vm"]);
        let _ = s.hutch_with_firmware_dir(&ovmf, &["stop", "vm", "--force", "--timeout", "20"]);
    };
    start(&s);
    assert_eq!(std::fs::read(&nvram).unwrap(), vec![0x5au8; 8192]);
    // What the guest wrote is there at the next start.
    std::fs::write(&nvram, vec![0xa5u8; 8192]).unwrap();
    start(&s);
    assert_eq!(std::fs::read(&nvram).unwrap(), vec![0xa5u8; 8192]);
    let leftovers: Vec<_> = std::fs::read_dir(s.vm_dir("vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vars") && n != "vars.fd")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn memory_zero_and_absurd_memory_are_refused() {
    let s = Sandbox::new();
    for mem in ["0", "99999999999"] {
        let o = s.hutch(&["run", "--kernel", "vmlinuz", "--memory", mem]);
        assert_error(&o, &["memory", mem]);
        let o = s.hutch(&["create", "vm", "--kernel", "vmlinuz", "--memory", mem]);
        assert_error(&o, &["memory"]);
    }
    assert!(!s.vm_dir("vm").exists());
}

#[test]
fn cpus_zero_and_too_many_cpus_are_refused() {
    let s = Sandbox::new();
    for cpus in ["0", "256"] {
        let o = s.hutch(&["run", "--kernel", "vmlinuz", "--cpus", cpus]);
        assert_error(&o, &["cpus", "1 to 254"]);
    }
}

#[test]
fn run_reports_a_hypervisor_or_machine_failure_as_an_error() {
    // Whatever this host offers, a text file is not a bootable kernel: run must fail cleanly,
    // naming either the kernel (a hypervisor was found) or the hypervisor (none was).
    let s = Sandbox::new();
    let o = s.hutch(&["run", "--kernel", "vmlinuz", "--memory", "64"]);
    assert_error(&o, &[]);
    let err = stderr(&o);
    assert!(
        err.contains("is not a Linux kernel image") || err.contains("Cannot open KVM"),
        "{err}"
    );
}

#[test]
fn run_with_a_new_disk_makes_a_scratch_disk_and_removes_it_when_the_run_ends() {
    let s = Sandbox::new();
    let tmp = tempfile::tempdir().unwrap();
    let run = |size: &str| {
        Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(["run", "--kernel", "vmlinuz", "--memory", "64", "--new-disk", size])
            .current_dir(s.files.path())
            .env("HUTCH_HOME", s.home.path())
            .env("XDG_RUNTIME_DIR", s.runtime.path())
            .env("TMPDIR", tmp.path())
            .env_remove("HUTCH_BACKEND")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The text file is no kernel: the run fails after making its disk, which must go too.
    let o = run("1G");
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.starts_with("hutch: a new 1024 MiB disk for this run"), "{err}");
    assert!(err.contains("\nhutch: error: "), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the run left {left:?}");
    assert_error(&run("0"), &["0 bytes", "multiple of 512"]);
}

#[test]
fn start_of_a_vm_whose_kernel_was_deleted_reports_the_path() {
    let s = Sandbox::new();
    assert_ok(&s.create("vm"));
    std::fs::remove_file(s.kernel()).unwrap();
    let o = s.hutch(&["start", "vm"]);
    assert_error(&o, &["Cannot start VM 'vm'", s.kernel().to_str().unwrap()]);
    assert!(!s.vm_dir("vm").join("pid.json").exists());
}

#[test]
fn start_of_an_unbootable_vm_shows_the_vm_process_error_and_records_it() {
    let s = Sandbox::new();
    assert_ok(&s.create("vm"));
    let o = s.hutch(&["start", "vm"]);
    assert_error(&o, &["VM 'vm' failed to start", "hutch.log", "hutch: error:"]);

    let o = s.hutch(&["status", "vm", "--json"]);
    assert_ok(&o);
    let st: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(st["state"], "crashed", "{st}");
    assert_eq!(st["last_exit"]["reason"], "failed");
    assert_eq!(st["last_exit"]["clean"], false);
    assert!(!s.vm_dir("vm").join("pid.json").exists());
    // The runtime directory of the VM is gone again.
    let leftovers: Vec<_> = walk(s.runtime.path());
    assert!(leftovers.iter().all(|p| !p.ends_with("control.sock")), "{leftovers:?}");
    // A failed run does not keep the VM from being deleted.
    assert_ok(&s.hutch(&["delete", "vm"]));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn commands_on_unknown_vms_error() {
    let s = Sandbox::new();
    for cmd in ["delete", "status", "start", "stop", "console"] {
        assert_error(&s.hutch(&[cmd, "ghost"]), &["No VM named 'ghost'"]);
    }
}

#[test]
fn stop_and_console_of_a_stopped_vm_are_clear_errors() {
    let s = Sandbox::new();
    assert_ok(&s.create("vm"));
    assert_error(&s.hutch(&["stop", "vm"]), &["VM 'vm' is not running"]);
    assert_error(&s.hutch(&["stop", "vm", "--force"]), &["is not running"]);
    assert_error(&s.hutch(&["console", "vm"]), &["is not running"]);
}

#[test]
fn an_unknown_backend_is_a_clear_error() {
    let s = Sandbox::new();
    let o = Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args(["run", "--kernel", "vmlinuz", "--memory", "64"])
        .current_dir(s.files.path())
        .env("HUTCH_BACKEND", "bochs")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_error(&o, &["Unknown hypervisor backend 'bochs'"]);
}

#[test]
fn help_documents_the_defaults() {
    let s = Sandbox::new();
    let o = s.hutch(&["run", "--help"]);
    assert_ok(&o);
    let help = stdout(&o);
    for needle in ["console=ttyS0 reboot=k panic=-1", "[default: 1]", "[default: 512]", "--serial"]
    {
        assert!(help.contains(needle), "{needle} not in {help}");
    }
    assert!(!stdout(&s.hutch(&["--help"])).contains("__vm-process"));
}

mod running {
    //! A "running" VM faked inside the test process: it holds the VM lock, writes pid.json
    //! and serves the real control server, so the binary's client side is exercised for real.
    use super::*;
    use hutch::control::protocol::RunState;
    use hutch::control::protocol::{ControlTarget, StatusReply};
    use hutch::control::server::{ConsoleTarget, ControlServer};
    use hutch::library::{Library, PidFile, VmLock};
    use hutch::serial_hub::{SerialHub, SerialSubscription};
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    struct FakeVm {
        lock: Mutex<Option<VmLock>>,
        hub: SerialHub,
        obeys_power_button: bool,
    }

    impl FakeVm {
        fn exit(&self) {
            self.hub.close();
            self.lock.lock().unwrap().take();
        }
    }

    impl ControlTarget for FakeVm {
        fn status(&self) -> anyhow::Result<StatusReply> {
            Ok(StatusReply {
                name: "vm".into(),
                state: RunState::Running,
                pid: std::process::id(),
                cpus: 1,
                memory_mib: 512,
                uptime_secs: 5,
                instance: 1,
                display: None,
                net: None,
                cd: None,
            })
        }
        fn pause(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn resume(&self) -> anyhow::Result<()> {
            Ok(())
        }
        fn shutdown(&self) -> anyhow::Result<()> {
            if self.obeys_power_button {
                self.exit();
            }
            Ok(())
        }
        fn poweroff(&self) -> anyhow::Result<()> {
            self.exit();
            Ok(())
        }
        fn input(&self, _events: Vec<display::InputEvent>) -> anyhow::Result<()> {
            Ok(())
        }
        fn display_size(&self, _width: u32, _height: u32) -> anyhow::Result<()> {
            Ok(())
        }
    }

    impl ConsoleTarget for FakeVm {
        fn console_output(&self) -> SerialSubscription {
            self.hub.subscribe()
        }
        fn console_input(&self, bytes: &[u8]) {
            // A guest that echoes what it is typed, loudly.
            self.hub.publish(&bytes.to_ascii_uppercase());
        }
    }

    fn start_fake(s: &Sandbox, obeys_power_button: bool) -> (Arc<FakeVm>, ControlServer) {
        assert_ok(&s.create("vm"));
        let vm = Library::at(s.home.path().to_path_buf()).existing("vm").unwrap();
        let lock = vm.try_lock().unwrap().unwrap();
        let fake = Arc::new(FakeVm {
            lock: Mutex::new(Some(lock)),
            hub: SerialHub::new(None),
            obeys_power_button,
        });
        let socket = s.runtime.path().join("vm/control.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let server = ControlServer::bind(&socket, fake.clone()).unwrap();
        vm.write_pid_file(&PidFile { pid: std::process::id(), socket, started_at: 0 }).unwrap();
        (fake, server)
    }

    #[test]
    fn status_list_start_and_delete_see_a_running_vm() {
        let s = Sandbox::new();
        let (_fake, _server) = start_fake(&s, true);
        let o = s.hutch(&["status", "vm", "--json"]);
        assert_ok(&o);
        let st: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(st["state"], "running");
        assert_eq!(st["pid"], std::process::id());
        assert_eq!(st["uptime_secs"], 5);
        let row = stdout(&s.hutch(&["list"]));
        assert!(row.lines().nth(1).unwrap().contains("running"), "{row}");
        assert_error(&s.hutch(&["start", "vm"]), &["VM 'vm' is already running"]);
        assert_error(&s.hutch(&["delete", "vm"]), &["VM 'vm' is running; stop it first"]);
    }

    #[test]
    fn console_with_a_pipe_sends_input_and_shows_output_until_eof() {
        let s = Sandbox::new();
        let (_fake, _server) = start_fake(&s, true);
        let mut child = Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(["console", "vm"])
            .env("HUTCH_HOME", s.home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"uname\n").unwrap();
        let o = child.wait_with_output().unwrap();
        assert_ok(&o);
        assert_eq!(stdout(&o), "UNAME\n");
    }

    #[test]
    fn console_ends_when_the_vm_stops() {
        let s = Sandbox::new();
        let (fake, _server) = start_fake(&s, true);
        let mut child = Command::new(env!("CARGO_BIN_EXE_hutch"))
            .args(["console", "vm"])
            .env("HUTCH_HOME", s.home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"x").unwrap();
        // The echo proves the console is attached; then the VM goes away.
        let mut out = child.stdout.take().unwrap();
        let mut echo = [0u8; 1];
        std::io::Read::read_exact(&mut out, &mut echo).unwrap();
        assert_eq!(&echo, b"X");
        fake.hub.publish(b"reboot: Power down\r\n");
        fake.exit();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert_eq!(rest, "reboot: Power down\r\n");
        let o = child.wait_with_output().unwrap();
        assert_ok(&o);
        assert!(stderr(&o).contains("vm stopped"), "{}", stderr(&o));
        drop(stdin);
    }

    #[test]
    fn stop_presses_the_power_button_and_waits_for_the_exit() {
        let s = Sandbox::new();
        let (_fake, _server) = start_fake(&s, true);
        let o = s.hutch(&["stop", "vm", "--timeout", "5"]);
        assert_ok(&o);
        assert_eq!(stdout(&o), "VM 'vm' stopped\n");
    }

    #[test]
    fn stop_times_out_on_a_guest_that_ignores_the_button_and_force_works() {
        let s = Sandbox::new();
        let (_fake, _server) = start_fake(&s, false);
        let o = s.hutch(&["stop", "vm", "--timeout", "1"]);
        assert_error(&o, &["did not stop within 1 s", "--force"]);
        assert_ok(&s.hutch(&["stop", "vm", "--force"]));
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let home = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
        .arg("list")
        .env("HUTCH_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of stdout before hutch writes: its write gets EPIPE.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
