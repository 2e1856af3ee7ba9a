//! Whether this host's /dev/kvm is hardware-assisted, answered from the CPU flags and the
//! loaded KVM modules in microseconds, before any VM is built.
//!
//! A KVM without VT-x/AMD-V (here: the `kvm_pvm` module on a CPU without `vmx`/`svm`) runs
//! hand-assembled real-mode code, but emulates a guest kernel instruction by instruction and,
//! tens of seconds later, stops on the first instruction its emulator lacks. Telling the user
//! up front is the point of this module.

use std::path::Path;

/// The modules that drive /dev/kvm with the CPU's own virtualization extensions.
const HARDWARE_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

/// How /dev/kvm runs guest code on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmAcceleration {
    /// The CPU has `vmx`/`svm` and `module` (kvm_intel or kvm_amd) drives KVM.
    HardwareAssisted { module: String },
    /// Guest kernel code would be emulated; `reason` says what showed it.
    NotHardwareAssisted { reason: String },
    /// The host gave no answer (no x86 flags line, /proc unreadable); treated as assisted.
    Unknown,
}

/// Looks at `/proc/cpuinfo` and `/sys/module` (no ioctl, no guest): well under a millisecond.
pub fn kvm_acceleration() -> KvmAcceleration {
    if !cfg!(target_arch = "x86_64") {
        // KVM on other architectures has no emulating variant.
        return KvmAcceleration::Unknown;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(&cpuinfo, &kvm_modules(Path::new("/sys/module")))
}

/// The loaded modules (or built-in ones with parameters) whose names start with `kvm`.
fn kvm_modules(sys_module: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys_module) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("kvm"))
        .collect();
    names.sort();
    names
}

/// The verdict from the text of /proc/cpuinfo and the kvm* module names.
pub fn classify(cpuinfo: &str, modules: &[String]) -> KvmAcceleration {
    let Some(flags) = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags").and_then(|rest| rest.split_once(':')))
        .map(|(_, flags)| flags.split_whitespace().collect::<Vec<_>>())
    else {
        return KvmAcceleration::Unknown;
    };
    let hardware_module = modules.iter().find(|m| HARDWARE_MODULES.contains(&m.as_str()));
    let vendor_modules: Vec<&str> =
        modules.iter().map(String::as_str).filter(|m| *m != "kvm").collect();
    let loaded = if vendor_modules.is_empty() {
        "no kvm vendor module is loaded".to_string()
    } else {
        format!("KVM module: {}", vendor_modules.join(", "))
    };
    let has_extension = flags.iter().any(|f| *f == "vmx" || *f == "svm");
    match (has_extension, hardware_module) {
        (true, Some(module)) => KvmAcceleration::HardwareAssisted { module: module.clone() },
        (false, _) => KvmAcceleration::NotHardwareAssisted {
            reason: format!("the CPU has neither vmx nor svm in /proc/cpuinfo; {loaded}"),
        },
        // No module list at all (no /sys): the flags are all there is to go by.
        (true, None) if modules.is_empty() => KvmAcceleration::Unknown,
        (true, None) => KvmAcceleration::NotHardwareAssisted {
            reason: format!("KVM is not driven by kvm_intel or kvm_amd ({loaded})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const EMULATING_HOST: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae \
        hypervisor lahf_lm cmp_legacy avx2\nbugs\t\t: sysret_ss_attrs\n";
    const LAB_EPYC: &str = "processor\t: 0\nflags\t\t: fpu vme de svm npt lahf_lm\n";

    #[test]
    fn a_cpu_without_vmx_or_svm_under_kvm_pvm_is_not_hardware_assisted() {
        let verdict = classify(EMULATING_HOST, &names(&["kvm", "kvm_pvm"]));
        let KvmAcceleration::NotHardwareAssisted { reason } = verdict else {
            panic!("{verdict:?}");
        };
        assert!(reason.contains("neither vmx nor svm") && reason.contains("kvm_pvm"), "{reason}");
    }

    #[test]
    fn svm_with_kvm_amd_is_hardware_assisted() {
        assert_eq!(
            classify(LAB_EPYC, &names(&["kvm", "kvm_amd"])),
            KvmAcceleration::HardwareAssisted { module: "kvm_amd".into() }
        );
        let intel = "flags\t: fpu vmx ept\n";
        assert_eq!(
            classify(intel, &names(&["kvm", "kvm_intel"])),
            KvmAcceleration::HardwareAssisted { module: "kvm_intel".into() }
        );
    }

    #[test]
    fn vmx_with_another_kvm_module_is_not_hardware_assisted() {
        let verdict = classify("flags : vmx\n", &names(&["kvm", "kvm_pvm"]));
        assert!(
            matches!(&verdict, KvmAcceleration::NotHardwareAssisted { reason } if reason.contains("kvm_pvm")),
            "{verdict:?}"
        );
    }

    #[test]
    fn no_flags_line_or_no_module_list_is_unknown() {
        assert_eq!(classify("Features\t: fp asimd\n", &names(&["kvm"])), KvmAcceleration::Unknown);
        assert_eq!(classify("", &[]), KvmAcceleration::Unknown);
        assert_eq!(classify(LAB_EPYC, &[]), KvmAcceleration::Unknown);
    }

    #[test]
    fn this_host_answers_quickly() {
        let t0 = std::time::Instant::now();
        let verdict = kvm_acceleration();
        // Generous: reading two small pseudo-files; the point is "no guest, no minute".
        assert!(t0.elapsed() < std::time::Duration::from_secs(1), "{verdict:?}");
    }

    #[test]
    fn module_names_come_from_the_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["kvm", "kvm_amd", "virtio"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        assert_eq!(kvm_modules(dir.path()), names(&["kvm", "kvm_amd"]));
        assert!(kvm_modules(&dir.path().join("absent")).is_empty());
    }
}
