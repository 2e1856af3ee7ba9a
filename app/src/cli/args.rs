//! The command line (clap derive). Parsing only: the commands live next to this file, one
//! module per group.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use disk::ImageFormat;

use crate::library::{parse_disk, BootMode, DiskEntry, NetMode, VmConfig, DEFAULT_CMDLINE};
use crate::service::import::ImportOptions;
pub use crate::service::vm::SerialTarget;

#[derive(Debug, Parser)]
#[command(name = "hutch", version, about = "Run and manage small virtual machines")]
pub struct Cli {
    /// Without a subcommand, the GUI opens.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one VM in this process, headless, with its serial console on this terminal.
    ///
    /// Exits 0 when the guest powers off. When stdin is a terminal it is put in raw mode
    /// and Ctrl+] powers the VM off.
    Run(RunArgs),
    /// Create a VM in the library ($HUTCH_HOME, else $XDG_DATA_HOME/hutch, else
    /// ~/.local/share/hutch).
    Create(CreateArgs),
    /// List the VMs in the library.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a VM in the background and wait until it answers.
    Start { name: String },
    /// Attach to a running VM's serial console (Ctrl+] detaches; a piped stdin ends at EOF).
    Console { name: String },
    /// Stop a running VM: press its ACPI power button and wait for it to power off.
    Stop {
        name: String,
        /// Pull the plug instead of asking the guest.
        #[arg(long)]
        force: bool,
        /// How long to wait for the VM to stop.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Show a VM's state, pid, CPUs and memory.
    Status {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stopped VM and its directory.
    Delete { name: String },
    /// Save a running VM's screen as a PNG file.
    Screenshot {
        name: String,
        /// Where to write the PNG.
        output: PathBuf,
    },
    /// Take, list, restore and delete snapshots of a VM (running VMs are saved live).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Inspect, convert, compact and resize disk images.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Create a VM from a disk image (any format) or an OVA appliance.
    Import(ImportArgs),
    /// List, add and remove a VM's port forwards (host port → guest port); a running VM
    /// takes the change at once.
    Forward(ForwardArgs),
    /// Show, insert or eject a VM's CD (an ISO image); a running VM's drive changes at once.
    Media(MediaArgs),
    /// Open the graphical interface (also what `hutch` alone does).
    Gui,
    /// The background VM process (internal).
    #[command(name = "__vm-process", hide = true)]
    VmProcess {
        name: String,
        /// Start from this snapshot (an id) instead of booting.
        #[arg(long, value_name = "ID")]
        restore: Option<String>,
    },
}

/// What to boot and with how much (shared by `run` and `create`).
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// Guest kernel image.
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Disk image (virtio-blk); repeat for more disks; append ",readonly" for read-only.
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    pub disks: Vec<DiskEntry>,
    /// Installation media (an ISO), attached read-only: booted first while the first disk
    /// has no boot loader, after the disks once it has one.
    #[arg(long, value_name = "PATH")]
    pub iso: Option<PathBuf>,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u64,
    #[command(flatten)]
    pub net: NetArgs,
}

/// The network card (shared by `run` and `create`).
#[derive(Debug, Args)]
pub struct NetArgs {
    /// "user": a virtio-net card behind user-mode NAT (DHCP gives the guest 10.0.2.15, the
    /// host's own services are at 10.0.2.2); "none": no network card.
    #[arg(long, value_name = "user|none", default_value = "user")]
    pub net: NetMode,
    /// Forward a host port to the guest: tcp|udp:[HOSTADDR]:HOSTPORT-:GUESTPORT, e.g.
    /// tcp:127.0.0.1:2222-:22 (HOSTADDR defaults to 127.0.0.1); repeat for more.
    #[arg(long = "forward", value_name = "SPEC", value_parser = parse_forward)]
    pub forwards: Vec<String>,
    /// The guest cannot reach the host's own services through the gateway.
    #[arg(long)]
    pub isolate_from_host: bool,
}

impl MachineArgs {
    /// The configuration these options describe (not yet validated).
    pub fn to_config(&self) -> VmConfig {
        let mut config = VmConfig::new(
            self.kernel.clone().unwrap_or_default(),
            self.initrd.clone(),
            self.cmdline.clone(),
            self.disks.clone(),
            self.cpus,
            self.memory,
        );
        config.net = self.net.net;
        if config.net == NetMode::None {
            config.mac = None;
        }
        config.forwards = self.net.forwards.clone();
        config.isolate_from_host = self.net.isolate_from_host;
        config.iso = self.iso.clone();
        config
    }
}

/// A forward in its canonical spelling (what vm.toml keeps).
fn parse_forward(s: &str) -> Result<String, String> {
    s.parse::<net::slirp::Forward>().map(|f| f.to_string()).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
#[command(mut_arg("kernel", |a| a.required(false).required_unless_present("firmware")))]
pub struct RunArgs {
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Boot firmware on the Q35 board instead of a kernel: "uefi" finds the host's UEFI
    /// (Debian's ovmf package: /usr/share/OVMF/OVMF_CODE_4M.fd, or $HUTCH_FIRMWARE_DIR),
    /// "bios" its SeaBIOS (the seabios package: /usr/share/seabios/bios.bin), or give an
    /// image's path (./uefi for a file of that name).
    #[arg(long, value_name = "uefi|bios|IMAGE", conflicts_with = "kernel")]
    pub firmware: Option<PathBuf>,
    /// The firmware's variable store, which the guest writes (a copy of OVMF_VARS_4M.fd).
    /// Without it, "uefi" runs on a fresh copy of the firmware's template that is removed
    /// afterwards.
    #[arg(long, value_name = "VARS", requires = "firmware", conflicts_with = "kernel")]
    pub vars: Option<PathBuf>,
    /// Where the guest's serial console goes: "stdio" or a file to append to.
    #[arg(long, value_name = "stdio|PATH", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialTarget,
    /// An empty qcow2 disk of this size (e.g. 20G) as the first disk, for this run only: it
    /// is removed when the run ends (`hutch create --new-disk` keeps one in the VM).
    #[arg(long, value_name = "SIZE", value_parser = crate::service::disk::parse_new_size)]
    pub new_disk: Option<u64>,
}

#[derive(Debug, Args)]
#[command(mut_arg("kernel", |a| a.required(false).required_unless_present("firmware")))]
pub struct CreateArgs {
    /// VM name: 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.').
    pub name: String,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Boot the host's firmware on the Q35 board instead of a kernel: "uefi" (Debian's ovmf
    /// package; vm.toml: boot = "uefi"; the VM keeps its variables in its own vars.fd) or
    /// "bios" (the seabios package; boot = "bios").
    #[arg(long, value_name = "uefi|bios", value_parser = ["uefi", "bios"], conflicts_with_all = ["kernel", "initrd"])]
    pub firmware: Option<String>,
    /// Create an empty qcow2 disk of this size (e.g. 20G) in the VM's directory as its first
    /// disk, to install on.
    #[arg(long, value_name = "SIZE", value_parser = crate::service::disk::parse_new_size)]
    pub new_disk: Option<u64>,
}

impl CreateArgs {
    /// The configuration these options describe (not yet validated).
    pub fn to_config(&self) -> VmConfig {
        let mut config = self.machine.to_config();
        match self.firmware.as_deref() {
            Some("bios") => config.boot = BootMode::Bios,
            Some(_) => config.boot = BootMode::Uefi,
            None => {}
        }
        config
    }
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running VM (memory, CPUs, devices, disks) as a snapshot; it keeps running.
    Take {
        name: String,
        /// The snapshot's name (default: "Snapshot N").
        snapshot: Option<String>,
    },
    /// List a VM's snapshots as a tree.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Bring a VM back to a snapshot (a running VM is replaced; a stopped one starts).
    Restore { name: String, snapshot: String },
    /// Delete a snapshot; the others keep all their data.
    Delete { name: String, snapshot: String },
}

/// `hutch media NAME [insert ISO|eject]`.
#[derive(Debug, Args)]
pub struct MediaArgs {
    pub name: String,
    #[command(subcommand)]
    pub command: Option<MediaCommand>,
}

#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// Put an ISO in the VM's CD drive (it boots from it while its disk has no OS).
    Insert { iso: PathBuf },
    /// Empty the VM's CD drive.
    Eject,
}

/// `hutch forward NAME list|add|remove`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    pub name: String,
    #[command(subcommand)]
    pub command: ForwardCommand,
}

#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// The VM's forwards.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forward a host port: tcp|udp:[HOSTADDR]:HOSTPORT-:GUESTPORT (e.g. tcp::2222-:22).
    Add {
        #[arg(value_parser = parse_forward)]
        spec: String,
    },
    /// Stop forwarding a host port (the same SPEC as added).
    Remove {
        #[arg(value_parser = parse_forward)]
        spec: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Show an image's format, sizes, backing chain and any problems found.
    Info {
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert an image (qcow2, raw, VMDK, VDI, VHD, VHDX, Parallels, ISO) to qcow2 or raw.
    ///
    /// The output appears only once complete; Ctrl+C leaves nothing behind.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Qcow2)]
        format: OutputFormat,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Give back the host space that zeroed data occupies (qcow2 and raw images).
    Compact { file: PathBuf },
    /// Change an image's virtual size (qcow2 and raw images).
    Resize {
        file: PathBuf,
        /// New size (20G, 512M, 1T, bytes) or a change (+1G, -512M).
        #[arg(allow_hyphen_values = true)]
        size: String,
        /// Allow making the disk smaller (data past the new end is lost).
        #[arg(long)]
        shrink: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Qcow2,
    Raw,
}

impl OutputFormat {
    pub fn image_format(self) -> ImageFormat {
        match self {
            OutputFormat::Qcow2 => ImageFormat::Qcow2,
            OutputFormat::Raw => ImageFormat::Raw,
        }
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A disk image (qcow2, raw, VMDK, VDI, VHD, VHDX, Parallels), an OVA appliance, or an
    /// installer ISO (a new VM that installs from it onto a new blank disk).
    pub file: PathBuf,
    /// For an ISO: the size of the new disk to install on (default 20G).
    #[arg(long, value_name = "SIZE", value_parser = crate::service::disk::parse_new_size)]
    pub disk_size: Option<u64>,
    /// VM name (default: the OVF's name or the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// Use the disk where it is instead of converting a copy into the VM's directory
    /// (foreign formats get a qcow2 overlay that writes go to).
    #[arg(long)]
    pub in_place: bool,
    /// Boot this firmware (default: the one the OVF or the disk's partition table asks for:
    /// a GPT with an EFI system partition boots UEFI, an MBR with boot code BIOS).
    #[arg(long, value_name = "uefi|bios", value_parser = ["uefi", "bios"], conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    pub firmware: Option<String>,
    /// Boot this Linux kernel instead of the disk's own OS (default, when the disk has no
    /// boot loader Hutch recognises: the demo guest's, if built).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (default: the demo guest's, with the default kernel).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE")]
    pub cmdline: Option<String>,
    /// vCPUs (default: the OVF's, else 1).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB (default: the OVF's, else 1024).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
}

impl From<&ImportArgs> for ImportOptions {
    fn from(a: &ImportArgs) -> ImportOptions {
        ImportOptions {
            name: a.name.clone(),
            in_place: a.in_place,
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
            cpus: a.cpus,
            memory_mib: a.memory,
            firmware: a.firmware.as_deref().map(|f| match f {
                "bios" => BootMode::Bios,
                _ => BootMode::Uefi,
            }),
            new_disk_bytes: a.disk_size,
        }
    }
}

fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "" => Err("expected \"stdio\" or a file path".into()),
        "stdio" => Ok(SerialTarget::Stdio),
        path => Ok(SerialTarget::File(PathBuf::from(path))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn serial_target_parses() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialTarget::Stdio);
        assert_eq!(parse_serial("out.log").unwrap(), SerialTarget::File("out.log".into()));
        assert!(parse_serial("").is_err());
    }

    #[test]
    fn run_defaults_are_documented_values() {
        let cli = Cli::try_parse_from(["hutch", "run", "--kernel", "k"]).unwrap();
        let Some(Command::Run(args)) = cli.command else { panic!("not run") };
        assert_eq!((args.machine.cpus, args.machine.memory), (1, 512));
        assert_eq!(args.machine.cmdline, "console=tty0 console=ttyS0 reboot=k panic=-1");
        assert_eq!(args.serial, SerialTarget::Stdio);
        let help = Cli::command().find_subcommand_mut("run").unwrap().render_long_help();
        assert!(help.to_string().contains("console=tty0 console=ttyS0 reboot=k panic=-1"));
    }

    #[test]
    fn run_boots_firmware_without_a_kernel_and_everything_else_still_needs_one() {
        let cli =
            Cli::try_parse_from(["hutch", "run", "--firmware", "c.fd", "--vars", "v.fd"]).unwrap();
        let Some(Command::Run(args)) = cli.command else { panic!("not run") };
        assert_eq!(args.firmware, Some(PathBuf::from("c.fd")));
        assert_eq!(args.vars, Some(PathBuf::from("v.fd")));
        assert_eq!(args.machine.kernel, None);
        for refused in [
            &["hutch", "run"][..],
            &["hutch", "run", "--vars", "v.fd", "--kernel", "k"],
            &["hutch", "run", "--firmware", "c.fd", "--kernel", "k"],
            &["hutch", "create", "vm"],
        ] {
            assert!(Cli::try_parse_from(refused).is_err(), "{refused:?} parsed");
        }
    }

    #[test]
    fn repeated_disks_keep_their_order() {
        let cli = Cli::try_parse_from([
            "hutch",
            "create",
            "vm",
            "--kernel",
            "k",
            "--disk",
            "a",
            "--disk",
            "b,readonly",
        ])
        .unwrap();
        let Some(Command::Create(args)) = cli.command else { panic!("not create") };
        let disks: Vec<_> =
            args.machine.disks.iter().map(|d| (d.path.clone(), d.readonly)).collect();
        assert_eq!(disks, vec![("a".into(), false), ("b".into(), true)]);
    }

    #[test]
    fn forward_takes_the_vm_first_and_keeps_specs_canonical() {
        let cli = Cli::try_parse_from(["hutch", "forward", "web", "add", "tcp::2222-:22"]).unwrap();
        let Some(Command::Forward(args)) = cli.command else { panic!("not forward") };
        assert_eq!(args.name, "web");
        let ForwardCommand::Add { spec } = args.command else { panic!("not add") };
        assert_eq!(spec, "tcp:127.0.0.1:2222-:22");
        assert!(Cli::try_parse_from(["hutch", "forward", "web", "add", "tcp:2222"]).is_err());
        let cli = Cli::try_parse_from(["hutch", "run", "--kernel", "k"]).unwrap();
        let Some(Command::Run(args)) = cli.command else { panic!("not run") };
        assert_eq!(args.machine.to_config().net, NetMode::User);
        let cli = Cli::try_parse_from(["hutch", "run", "--kernel", "k", "--net", "none"]).unwrap();
        let Some(Command::Run(args)) = cli.command else { panic!("not run") };
        let config = args.machine.to_config();
        assert_eq!((config.net, config.mac), (NetMode::None, None));
    }

    #[test]
    fn no_subcommand_means_the_gui() {
        assert!(Cli::try_parse_from(["hutch"]).unwrap().command.is_none());
        let cli = Cli::try_parse_from(["hutch", "gui"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Gui)));
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
