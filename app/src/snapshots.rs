//! A VM's snapshot tree on disk, and taking, restoring and deleting snapshots.
//!
//! ```text
//!  vms/NAME/vm.toml            disks = the active layers the VM writes
//!  vms/NAME/snapshots/index.json   the tree: id, name, time, parent, frozen disk layers
//!  vms/NAME/snapshots/ID.hsnap     machine state + guest RAM (vmm::snapshot)
//!  vms/NAME/snapshots/ID.png       thumbnail of the screen
//!  vms/NAME/layers/*.qcow2         overlays: each snapshot freezes the active layer and the
//!                                  VM goes on in a new overlay on top of it
//! ```
//! A snapshot's disks are the layers frozen when it was taken; the chain of backing files is
//! the tree. Restoring puts a fresh overlay on the snapshot's layers (the snapshot itself never
//! changes) and drops the abandoned active layer. Deleting pulls the snapshot's layer into
//! each layer built on it, then removes it; a layer the running VM writes is merged when the
//! VM is next started or stopped (it cannot be rewritten under the running machine).
//! The index is written atomically; every change to it happens under the VM lock (the VM
//! process, or the CLI when the VM is stopped).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use vmm::machine::MachineHandle;
use vmm::snapshot::SnapshotFile;

use crate::library::{CdDrive, DiskEntry, VmConfig, VmDir};

/// One snapshot as the CLI, GUI and control protocol show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// Unix time it was taken.
    pub created: u64,
    /// The snapshot this one was taken after (its parent in the tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The thumbnail PNG, when the VM had a screen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<PathBuf>,
    /// Bytes the snapshot's state file takes on disk.
    #[serde(default)]
    pub disk_bytes: u64,
}

/// A VM's snapshots, oldest first, and the one the VM's current state descends from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

/// `snapshots/index.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    snapshots: Vec<Entry>,
    #[serde(default)]
    current: Option<String>,
    /// Layers of deleted snapshots still backing the active layer of a running VM: merged
    /// when the VM is not running.
    #[serde(default)]
    pending_merges: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    name: String,
    created: u64,
    parent: Option<String>,
    cpus: u32,
    memory_mib: u64,
    display: bool,
    /// The layers frozen by this snapshot, one per disk of the VM.
    disks: Vec<DiskEntry>,
    /// The ISO in the VM's CD drive (snapshots from before CDs have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iso: Option<PathBuf>,
    /// The CD came before the disks in the machine (a restore keeps that order).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cd_first: bool,
    /// The machine had a CD drive (empty without `iso`). Snapshots from before empty drives
    /// have none: theirs had a drive exactly when they had an ISO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cd_drive: Option<bool>,
}

impl Entry {
    fn cd(&self) -> CdDrive {
        CdDrive {
            present: self.cd_drive.unwrap_or(self.iso.is_some()),
            first: self.cd_first,
            iso: self.iso.clone(),
        }
    }
}

fn snapshots_dir(vm: &VmDir) -> PathBuf {
    vm.dir().join("snapshots")
}

fn layers_dir(vm: &VmDir) -> PathBuf {
    vm.dir().join("layers")
}

fn index_path(vm: &VmDir) -> PathBuf {
    snapshots_dir(vm).join("index.json")
}

fn state_path(vm: &VmDir, id: &str) -> PathBuf {
    snapshots_dir(vm).join(format!("{id}.hsnap"))
}

fn thumbnail_path(vm: &VmDir, id: &str) -> PathBuf {
    snapshots_dir(vm).join(format!("{id}.png"))
}

fn load_index(vm: &VmDir) -> anyhow::Result<Index> {
    let path = index_path(vm);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("The snapshot index {} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
        Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
    }
}

fn save_index(vm: &VmDir, index: &Index) -> anyhow::Result<()> {
    let path = index_path(vm);
    let mut bytes = serde_json::to_vec_pretty(index)?;
    bytes.push(b'\n');
    crate::fsutil::write_atomic(&path, &bytes)
        .with_context(|| format!("Cannot write {}", path.display()))
}

impl Entry {
    fn info(&self, vm: &VmDir) -> SnapshotInfo {
        let thumbnail = thumbnail_path(vm, &self.id);
        let disk_bytes = std::fs::metadata(state_path(vm, &self.id))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            created: self.created,
            parent: self.parent.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            thumbnail: thumbnail.exists().then_some(thumbnail),
            disk_bytes,
        }
    }
}

impl Index {
    /// The snapshot called `key` (an id, or a name that only one snapshot has).
    fn find(&self, key: &str) -> anyhow::Result<&Entry> {
        if let Some(e) = self.snapshots.iter().find(|e| e.id == key) {
            return Ok(e);
        }
        let mut named = self.snapshots.iter().filter(|e| e.name == key);
        match (named.next(), named.next()) {
            (Some(e), None) => Ok(e),
            (Some(_), Some(_)) => bail!("Several snapshots are named '{key}'; use the id"),
            (None, _) => bail!("No snapshot '{key}'"),
        }
    }

    /// Every layer file something still needs: snapshots' frozen layers, the VM's active
    /// layers (`config`), and layers waiting to be merged.
    fn layers_in_use(&self, config: &VmConfig) -> Vec<PathBuf> {
        self.snapshots
            .iter()
            .flat_map(|e| e.disks.iter().map(|d| d.path.clone()))
            .chain(config.disks.iter().map(|d| d.path.clone()))
            .chain(self.pending_merges.iter().cloned())
            .collect()
    }

    /// The most recently taken snapshot.
    fn latest(&self) -> Option<&Entry> {
        self.snapshots.iter().max_by_key(|e| (e.created, e.id.clone()))
    }
}

/// The VM's snapshots (reads the index; no lock needed).
pub fn list(vm: &VmDir) -> anyhow::Result<SnapshotList> {
    let index = load_index(vm)?;
    Ok(SnapshotList {
        snapshots: index.snapshots.iter().map(|e| e.info(vm)).collect(),
        current: index.current.clone(),
    })
}

/// Snapshot `key` (an id, or a name only one snapshot has).
pub fn find(vm: &VmDir, key: &str) -> anyhow::Result<SnapshotInfo> {
    Ok(load_index(vm)?.find(key)?.info(vm))
}

/// The id of the latest snapshot, for "restore the latest".
pub fn latest(vm: &VmDir) -> anyhow::Result<Option<String>> {
    Ok(load_index(vm)?.latest().map(|e| e.id.clone()))
}

/// A new id: time-ordered and unique within the VM.
fn new_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}", nanos / 1000)
}

fn layer_path(vm: &VmDir, id: &str, disk: usize) -> PathBuf {
    layers_dir(vm).join(format!("{id}-disk{disk}.qcow2"))
}

/// Creates a qcow2 overlay at `path` over `backing`, of the backing's size.
fn create_overlay(path: &Path, backing: &Path) -> anyhow::Result<()> {
    let info = disk::image_info(backing)
        .with_context(|| format!("Cannot read the disk {}", backing.display()))?;
    let image = disk::convert::NewImage::create_with_backing(
        path,
        disk::ImageFormat::Qcow2,
        info.virtual_size,
        Some((backing, info.format)),
    )
    .with_context(|| format!("Cannot create the disk layer {}", path.display()))?;
    image.commit(false).with_context(|| format!("Cannot create {}", path.display()))?;
    Ok(())
}

/// New active layers over `disks` (read-only disks are kept as they are: nothing writes
/// them). Returns the new disk entries; on failure removes what it created.
fn new_layers(vm: &VmDir, id: &str, disks: &[DiskEntry]) -> anyhow::Result<Vec<DiskEntry>> {
    std::fs::create_dir_all(layers_dir(vm))
        .with_context(|| format!("Cannot create {}", layers_dir(vm).display()))?;
    let mut created = Vec::new();
    let mut out = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        if disk.readonly {
            out.push(disk.clone());
            continue;
        }
        let path = layer_path(vm, id, i);
        if let Err(e) = create_overlay(&path, &disk.path) {
            for p in &created {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        created.push(path.clone());
        out.push(DiskEntry { path, readonly: false });
    }
    Ok(out)
}

/// Takes a snapshot of the running machine (in the VM process, which holds the VM lock).
/// `screen` is the shared frame, for the thumbnail.
pub fn take(
    vm: &VmDir,
    machine: &MachineHandle,
    name: Option<&str>,
    screen: Option<&Path>,
    cd: &CdDrive,
) -> anyhow::Result<SnapshotInfo> {
    let mut index = load_index(vm)?;
    let config = vm.load_config()?;
    let id = new_id();
    let created = crate::library::unix_now();
    let name = match name.map(str::trim) {
        Some("") | None => format!("Snapshot {}", index.snapshots.len() + 1),
        Some(n) => n.to_string(),
    };
    std::fs::create_dir_all(snapshots_dir(vm))
        .with_context(|| format!("Cannot create {}", snapshots_dir(vm).display()))?;
    let layers = new_layers(vm, &id, &config.disks)?;
    let entry = Entry {
        id: id.clone(),
        name,
        created,
        parent: index.current.clone(),
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        display: config.display,
        disks: config.disks.clone(),
        iso: cd.iso.clone(),
        cd_first: cd.first,
        cd_drive: Some(cd.present),
    };
    // The machine's disks in its order: the new layers, and the CD drive as it is now
    // (read-only: kept as is).
    let mut on_layers = config.clone();
    on_layers.disks = layers.clone();
    on_layers.set_cd(cd);
    let machine_disks = on_layers.to_machine_config().disks;
    let mut open_new = || {
        machine_disks
            .iter()
            .map(|d| {
                vmm::machine::disks::open_disk(d)
                    .map_err(|e| format!("{}: {e}", d.path.display()).into())
            })
            .collect::<Result<Vec<_>, vmm::machine::HostError>>()
    };
    let mut commit = || {
        let mut index = index.clone();
        index.snapshots.push(entry.clone());
        index.current = Some(entry.id.clone());
        save_index(vm, &index).map_err(|e| format!("{e:#}"))?;
        let mut config = config.clone();
        config.disks = layers.clone();
        vm.write_config(&config).map_err(|e| format!("{e:#}").into())
    };
    let result = machine.save_snapshot(&state_path(vm, &id), &mut open_new, &mut commit);
    let times = match result {
        Ok(times) => times,
        Err(e) => {
            for layer in layers.iter().filter(|l| !config.disks.contains(l)) {
                let _ = std::fs::remove_file(&layer.path);
            }
            return Err(anyhow::Error::new(e).context("Cannot take the snapshot"));
        }
    };
    log::info!(
        "snapshot {id}: guest stopped {} ms (pause {} ms, state {} ms, memory {} ms)",
        times.stopped.as_millis(),
        times.pause.as_millis(),
        times.state.as_millis(),
        times.memory.as_millis()
    );
    if let Some(frame) = screen {
        if let Err(e) = write_thumbnail(frame, &thumbnail_path(vm, &id)) {
            log::warn!("snapshot {id}: no thumbnail: {e:#}");
        }
    }
    index = load_index(vm)?;
    Ok(index.find(&id)?.info(vm))
}

/// Width of snapshot thumbnails (the height keeps the screen's aspect).
const THUMBNAIL_WIDTH: u32 = 240;

fn write_thumbnail(frame: &Path, out: &Path) -> anyhow::Result<()> {
    let reader = display::frame::FrameReader::open(frame).context("No screen")?;
    let image = reader.snapshot().context("Cannot read the screen")?;
    let small = scale_down(&image, THUMBNAIL_WIDTH);
    crate::screenshot::write_png(&small, out)
}

/// Nearest-neighbour downscale to `width` (images narrower than that are kept).
fn scale_down(image: &display::frame::FrameImage, width: u32) -> display::frame::FrameImage {
    if image.width <= width || image.width == 0 {
        return image.clone();
    }
    let height =
        (u64::from(image.height) * u64::from(width) / u64::from(image.width)).max(1) as u32;
    let mut rgba = Vec::with_capacity(width as usize * height as usize * 4);
    for y in 0..height {
        let sy = (u64::from(y) * u64::from(image.height) / u64::from(height)) as usize;
        for x in 0..width {
            let sx = (u64::from(x) * u64::from(image.width) / u64::from(width)) as usize;
            let at = (sy * image.width as usize + sx) * 4;
            rgba.extend_from_slice(image.rgba.get(at..at + 4).unwrap_or(&[0, 0, 0, 255]));
        }
    }
    display::frame::FrameImage { width, height, rgba }
}

/// Checks that snapshot `key` can be restored into this VM, changing nothing. Returns its id.
pub fn check_restore(vm: &VmDir, key: &str) -> anyhow::Result<String> {
    let index = load_index(vm)?;
    let entry = index.find(key)?;
    let file = SnapshotFile::open(&state_path(vm, &entry.id))?;
    let mut config = restored_config(&vm.load_config()?, entry);
    // A firmware VM's machine is the firmware board: find its firmware as a start would.
    config.resolve_firmware(&vm.nvram_path())?;
    vmm::machine::Machine::check_snapshot(&file, &config.to_machine_config(), config.display)?;
    for disk in &entry.disks {
        if !disk.path.exists() {
            bail!("The disk layer {} of snapshot '{}' is missing", disk.path.display(), entry.name);
        }
    }
    Ok(entry.id.clone())
}

fn restored_config(current: &VmConfig, entry: &Entry) -> VmConfig {
    let mut config = current.clone();
    config.cpus = entry.cpus;
    config.memory_mib = entry.memory_mib;
    config.display = entry.display;
    config.disks = entry.disks.clone();
    config.set_cd(&entry.cd());
    config
}

/// A snapshot put back by [`apply_restore`].
pub struct Restored {
    pub file: SnapshotFile,
    /// The CD drive the machine must have (`VmConfig::set_cd`).
    pub cd: CdDrive,
}

/// Puts the VM's disks and configuration at snapshot `id` (under the VM lock, the VM not
/// running) and returns the opened snapshot for `Machine::restore`.
pub fn apply_restore(vm: &VmDir, id: &str) -> anyhow::Result<Restored> {
    let mut index = load_index(vm)?;
    let entry = index.find(id)?.clone();
    let file = SnapshotFile::open(&state_path(vm, &entry.id))?;
    let current = vm.load_config()?;
    let mut config = restored_config(&current, &entry);
    config.resolve_firmware(&vm.nvram_path())?;
    vmm::machine::Machine::check_snapshot(&file, &config.to_machine_config(), config.display)?;
    let layer_id = new_id();
    config.disks = new_layers(vm, &layer_id, &entry.disks)?;
    index.current = Some(entry.id.clone());
    save_index(vm, &index)?;
    vm.write_config(&config)?;
    drop_unused_layers(vm, &index, &config)?;
    Ok(Restored { file, cd: entry.cd() })
}

/// Removes layer files that neither a snapshot nor the VM's config uses (the active layers
/// a restore abandoned), unless a kept layer is built on them.
fn drop_unused_layers(vm: &VmDir, index: &Index, config: &VmConfig) -> anyhow::Result<()> {
    let dir = layers_dir(vm);
    let Ok(read) = std::fs::read_dir(&dir) else { return Ok(()) };
    let used = index.layers_in_use(config);
    let mut candidates = Vec::new();
    for item in read.flatten() {
        let path = item.path();
        let is_layer = path.extension().is_some_and(|e| e == "qcow2");
        if is_layer && !used.contains(&path) {
            candidates.push(path);
        }
    }
    // A layer is only dropped when no kept layer backs onto it.
    let kept_backings: Vec<PathBuf> =
        used.iter().filter_map(|p| backing_of(p).ok().flatten()).collect();
    for path in candidates {
        if !kept_backings.contains(&path) {
            log::info!("dropping the unused disk layer {}", path.display());
            std::fs::remove_file(&path)
                .with_context(|| format!("Cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// A layer's backing file (from its header alone: a missing file further down the chain
/// does not matter here).
fn backing_of(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    disk::qcow2_backing(path).with_context(|| format!("Cannot read {}", path.display()))
}

/// Deletes snapshot `key` under the VM lock. `running` is the config of the running
/// machine (whose active layers must not be rewritten now), or None when it is stopped.
pub fn delete(vm: &VmDir, key: &str, running: Option<&VmConfig>) -> anyhow::Result<SnapshotInfo> {
    let mut index = load_index(vm)?;
    let entry = index.find(key)?.clone();
    let info = entry.info(vm);
    let config = vm.load_config()?;
    // Re-parent the children first: the tree stays whole whatever happens below.
    for e in index.snapshots.iter_mut().filter(|e| e.parent.as_deref() == Some(&entry.id)) {
        e.parent = entry.parent.clone();
    }
    if index.current.as_deref() == Some(&entry.id) {
        index.current = entry.parent.clone();
    }
    index.snapshots.retain(|e| e.id != entry.id);
    // The frozen layers we own (never the VM's original disks outside layers/) are merged
    // into the layers built on them, then removed.
    for disk in &entry.disks {
        if disk.path.starts_with(layers_dir(vm)) && !index.pending_merges.contains(&disk.path) {
            index.pending_merges.push(disk.path.clone());
        }
    }
    save_index(vm, &index)?;
    let _ = std::fs::remove_file(state_path(vm, &entry.id));
    let _ = std::fs::remove_file(thumbnail_path(vm, &entry.id));
    merge_pending(vm, running.unwrap_or(&config), running.is_some())?;
    Ok(info)
}

/// Merges the layers of deleted snapshots into the layers built on them and removes them.
/// With `running`, layers that back the VM's active layers wait for a later call.
pub fn merge_pending(vm: &VmDir, config: &VmConfig, running: bool) -> anyhow::Result<()> {
    let mut index = load_index(vm)?;
    if index.pending_merges.is_empty() {
        return Ok(());
    }
    let mut all_layers = index.layers_in_use(config);
    all_layers.sort();
    all_layers.dedup();
    let active: Vec<&PathBuf> = config.disks.iter().map(|d| &d.path).collect();
    let mut still_pending = Vec::new();
    for layer in index.pending_merges.clone() {
        let children: Vec<&PathBuf> = all_layers
            .iter()
            .filter(|p| **p != layer && backing_of(p).ok().flatten().as_ref() == Some(&layer))
            .collect();
        if running && children.iter().any(|c| active.contains(c)) {
            still_pending.push(layer);
            continue;
        }
        for child in &children {
            let report = disk::pull_backing_layer(child).with_context(|| {
                format!("Cannot merge {} into {}", layer.display(), child.display())
            })?;
            log::info!(
                "merged {} into {}: {} bytes",
                layer.display(),
                child.display(),
                report.bytes_copied
            );
        }
        std::fs::remove_file(&layer)
            .with_context(|| format!("Cannot remove the merged layer {}", layer.display()))?;
        // Recorded after each layer: a failure later leaves the index true.
        index.pending_merges.retain(|p| *p != layer);
        save_index(vm, &index)?;
    }
    index.pending_merges = still_pending;
    save_index(vm, &index)
}

/// Validates a user-given snapshot name.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.len() > 100 || name.chars().any(char::is_control) {
        return Err(anyhow!(
            "A snapshot name is at most 100 characters, without control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, created: u64) -> Entry {
        Entry {
            id: id.into(),
            name: name.into(),
            created,
            parent: None,
            cpus: 1,
            memory_mib: 64,
            display: false,
            disks: vec![],
            iso: None,
            cd_first: false,
            cd_drive: None,
        }
    }

    #[test]
    fn an_index_from_before_cds_loads_and_restores_with_no_cd() {
        let old = r#"{"snapshots":[{"id":"a1","name":"clean","created":1,"parent":null,
            "cpus":1,"memory_mib":64,"display":false,"disks":[]}],"current":"a1"}"#;
        let index: Index = serde_json::from_str(old).unwrap();
        let entry = index.find("a1").unwrap();
        assert_eq!((entry.iso.as_ref(), entry.cd_first), (None, false));
        let mut current = VmConfig::new("/k".into(), None, "c".into(), vec![], 1, 64);
        current.iso = Some("/later.iso".into());
        let config = restored_config(&current, entry);
        assert_eq!((config.iso, config.cd_first), (None, Some(false)));
        assert_eq!(config.cd_drive, Some(false), "no ISO then: no drive");
    }

    #[test]
    fn a_snapshot_taken_with_an_empty_drive_restores_the_drive_empty() {
        let mut taken = entry("a1", "ejected", 1);
        taken.cd_drive = Some(true);
        let back: Entry = serde_json::from_str(&serde_json::to_string(&taken).unwrap()).unwrap();
        let mut current = VmConfig::new("/k".into(), None, "c".into(), vec![], 1, 64);
        current.iso = Some("/later.iso".into());
        let config = restored_config(&current, &back);
        assert_eq!((config.iso.as_ref(), config.has_cd_drive()), (None, true));
        let disks = config.to_machine_config().disks;
        assert!(disks.len() == 1 && disks[0].is_empty_drive(), "{disks:?}");
    }

    #[test]
    fn a_snapshot_restores_the_cd_it_was_taken_with_in_its_place() {
        let mut taken = entry("a1", "installer", 1);
        taken.iso = Some("/inst.iso".into());
        taken.cd_first = true;
        let json = serde_json::to_string(&taken).unwrap();
        let back: Entry = serde_json::from_str(&json).unwrap();
        let current = VmConfig::new("/k".into(), None, "c".into(), vec![], 1, 64);
        let config = restored_config(&current, &back);
        assert_eq!(config.iso.as_deref(), Some(Path::new("/inst.iso")));
        assert_eq!(config.cd_first, Some(true));
    }

    #[test]
    fn snapshots_are_found_by_id_or_unique_name() {
        let index = Index {
            snapshots: vec![entry("a1", "clean", 1), entry("b2", "dup", 2), entry("c3", "dup", 3)],
            ..Default::default()
        };
        assert_eq!(index.find("clean").unwrap().id, "a1");
        assert_eq!(index.find("c3").unwrap().id, "c3");
        assert!(index.find("dup").unwrap_err().to_string().contains("Several"));
        assert!(index.find("nope").unwrap_err().to_string().contains("No snapshot 'nope'"));
        assert_eq!(index.latest().unwrap().id, "c3");
    }

    #[test]
    fn thumbnails_keep_the_aspect() {
        let image =
            display::frame::FrameImage { width: 960, height: 600, rgba: vec![7; 960 * 600 * 4] };
        let small = scale_down(&image, 240);
        assert_eq!((small.width, small.height), (240, 150));
        assert_eq!(small.rgba.len(), 240 * 150 * 4);
    }
}
