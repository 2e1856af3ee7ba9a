//! The command line (clap derive). Parsing only: the commands live in `commands.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::library::{DiskEntry, VmConfig, DEFAULT_CMDLINE};

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
    Snapshot(crate::snapshot_cmd::SnapshotCommand),
    /// Inspect, convert, compact and resize disk images.
    #[command(subcommand)]
    Disk(crate::disk_cmd::DiskCommand),
    /// Create a VM from a disk image (any format) or an OVA appliance.
    Import(crate::import::ImportArgs),
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
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "CMDLINE", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Disk image (virtio-blk); repeat for more disks; append ",readonly" for read-only.
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    pub disks: Vec<DiskEntry>,
    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub memory: u64,
}

impl MachineArgs {
    /// The configuration these options describe (not yet validated).
    pub fn to_config(&self) -> VmConfig {
        VmConfig::new(
            self.kernel.clone(),
            self.initrd.clone(),
            self.cmdline.clone(),
            self.disks.clone(),
            self.cpus,
            self.memory,
        )
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Where the guest's serial console goes: "stdio" or a file to append to.
    #[arg(long, value_name = "stdio|PATH", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialTarget,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name: 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.').
    pub name: String,
    #[command(flatten)]
    pub machine: MachineArgs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
}

fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "" => Err("expected \"stdio\" or a file path".into()),
        "stdio" => Ok(SerialTarget::Stdio),
        path => Ok(SerialTarget::File(PathBuf::from(path))),
    }
}

/// `PATH` or `PATH,readonly`. Anything else after the last comma is an error rather than
/// part of the path, so a typo (`,ro`, `,readonyl`) never silently makes a writable disk.
pub fn parse_disk(s: &str) -> Result<DiskEntry, String> {
    let (path, readonly) = match s.rsplit_once(',') {
        None => (s, false),
        Some((path, "readonly")) => (path, true),
        Some((_, opt)) => {
            return Err(format!("unknown disk option '{opt}' (expected PATH or PATH,readonly)"))
        }
    };
    if path.is_empty() {
        return Err("missing disk path (expected PATH or PATH,readonly)".into());
    }
    Ok(DiskEntry { path: PathBuf::from(path), readonly })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn disk_options_parse() {
        assert_eq!(
            parse_disk("/vm/a.img").unwrap(),
            DiskEntry { path: "/vm/a.img".into(), readonly: false }
        );
        assert_eq!(
            parse_disk("a.img,readonly").unwrap(),
            DiskEntry { path: "a.img".into(), readonly: true }
        );
        assert_eq!(
            parse_disk("my,disk.img,readonly").unwrap(),
            DiskEntry { path: "my,disk.img".into(), readonly: true }
        );
    }

    #[test]
    fn bad_disk_options_are_rejected() {
        for s in ["", ",readonly", "a.img,ro", "a.img,", "a.img,readonly,"] {
            assert!(parse_disk(s).is_err(), "{s:?}");
        }
    }

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
