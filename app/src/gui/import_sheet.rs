//! The import sheet: files dropped on the window become entries (format, sizes, the VM name
//! to create, convert or use in place), imported one after the other on a worker thread
//! with a progress bar and a Cancel button.
//!
//! ```text
//!  dropped paths ─probe─▶ Entry{Ready | refused} ─Import─▶ Queued ─▶ Importing{done,total}
//!                                                              └─▶ Done | Failed | Cancelled
//!  worker: import::import(.., progress = |d,t| !cancel) ─▶ ImportEvent ─▶ sheet.on_event
//! ```
//! The state machine ([`ImportSheet`]) is plain data for the tests; [`sheet_ui`] draws it and
//! [`spawn_import`] runs it. Import leaves nothing behind on failure or cancel (see
//! [`crate::service::import::import`]), so the sheet only has to report.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use disk::ImageFormat;
use egui::{Color32, RichText};

use super::worker::{Event, EventSender};
use crate::library::{self, Library};
use crate::service::disk::{human, is_cancelled};
use crate::service::import::{import, sanitize_name, ImportOptions};

/// A raw "image" smaller than this, or not a whole number of sectors, is some other file:
/// detection calls everything it does not recognise raw.
pub const MIN_RAW_BYTES: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// How often the worker reports progress at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// What a dropped file turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// Being read on a worker thread (an OVA's manifest check reads the whole file).
    Probing,
    Image(ImageSummary),
    /// Not importable; the message says why.
    Refused(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageSummary {
    pub format: ImageFormat,
    pub subformat: Option<String>,
    pub virtual_size: u64,
    pub allocated_bytes: u64,
    /// An OVA's appliance name, the preferred VM name.
    pub ovf_name: Option<String>,
}

/// Looks at a dropped file: the headers, or all of an OVA (its manifest digests). Blocks.
pub fn probe(path: &Path) -> Probe {
    let file = path.file_name().unwrap_or(path.as_os_str()).to_string_lossy().into_owned();
    let read = || -> Result<(disk::ImageInfo, Option<String>), disk::DiskError> {
        if disk::detect(path)? == ImageFormat::Ova {
            let ova = disk::ova::Ova::open(path)?;
            return Ok((ova.info(), Some(ova.descriptor().name.clone())));
        }
        Ok((disk::image_info(path)?, None))
    };
    let (info, ovf_name) = match read() {
        Ok(r) => r,
        Err(e) => {
            let chain = anyhow::Error::from(e);
            return Probe::Refused(format!("Cannot read {file}: {chain:#}"));
        }
    };
    classify(
        &file,
        ImageSummary {
            format: info.format,
            subformat: info.subformat,
            virtual_size: info.virtual_size,
            allocated_bytes: info.allocated_bytes,
            ovf_name,
        },
    )
}

/// Refuses what detection let through but cannot be a VM's disk.
pub fn classify(file: &str, image: ImageSummary) -> Probe {
    match image.format {
        ImageFormat::Raw
            if image.virtual_size < MIN_RAW_BYTES || !image.virtual_size.is_multiple_of(SECTOR) =>
        {
            Probe::Refused(format!(
                "Not a disk image: {file} ({}) is in no disk format Hutch knows",
                human(image.virtual_size)
            ))
        }
        _ => Probe::Image(image),
    }
}

/// Where one entry is.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryState {
    Ready,
    Queued,
    Importing {
        done: u64,
        total: u64,
    },
    Done {
        name: String,
        warnings: Vec<String>,
    },
    /// The cause chain, outermost first.
    Failed(Vec<String>),
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub probe: Probe,
    /// The VM to create (editable).
    pub name: String,
    /// Use the image where it is (foreign formats get a qcow2 overlay) instead of converting.
    pub in_place: bool,
    pub state: EntryState,
}

impl Entry {
    pub fn image(&self) -> Option<&ImageSummary> {
        match &self.probe {
            Probe::Image(i) => Some(i),
            Probe::Probing | Probe::Refused(_) => None,
        }
    }

    /// Still to import: never tried, or tried and not done (a retry).
    fn pending(&self) -> bool {
        self.image().is_some()
            && matches!(
                self.state,
                EntryState::Ready | EntryState::Failed(_) | EntryState::Cancelled
            )
    }

    /// An OVA's disks are inside the archive: they can only be converted.
    pub fn can_use_in_place(&self) -> bool {
        self.image().is_some_and(|i| !matches!(i.format, ImageFormat::Ova | ImageFormat::Iso))
    }
}

/// One import for the worker.
#[derive(Debug, Clone)]
pub struct ImportItem {
    pub index: usize,
    pub path: PathBuf,
    pub options: ImportOptions,
}

/// What the worker reports.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportEvent {
    Probed {
        path: PathBuf,
        probe: Probe,
    },
    Progress {
        index: usize,
        done: u64,
        total: u64,
    },
    Done {
        index: usize,
        result: ImportResult,
    },
    /// The worker is done with every item.
    Finished,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImportResult {
    Imported { name: String, warnings: Vec<String> },
    Failed(Vec<String>),
    Cancelled,
}

/// The sheet's state: the dropped files and the running import.
#[derive(Debug, Default)]
pub struct ImportSheet {
    pub entries: Vec<Entry>,
    /// Set while the worker runs; storing true cancels.
    cancel: Option<Arc<AtomicBool>>,
}

impl ImportSheet {
    pub fn is_running(&self) -> bool {
        self.cancel.is_some()
    }

    /// Adds a dropped file (once per path: false if it is already here); `taken` are the
    /// library's VM names.
    pub fn add(&mut self, path: PathBuf, probe: Probe, taken: &[String]) -> bool {
        if self.entries.iter().any(|e| e.path == path) {
            return false;
        }
        let name = self.derive_name(&path, &probe, taken);
        self.entries.push(Entry { path, probe, name, in_place: false, state: EntryState::Ready });
        true
    }

    /// What the worker found out about a file added as [`Probe::Probing`].
    pub fn probed(&mut self, path: &Path, probe: Probe, taken: &[String]) {
        let Some(i) = self.entries.iter().position(|e| e.path == path) else { return };
        if self.entries[i].probe != Probe::Probing {
            return;
        }
        let name = self.derive_name(path, &probe, taken);
        let e = &mut self.entries[i];
        e.probe = probe;
        e.name = name;
    }

    /// The OVF's name or the file name, made unique.
    fn derive_name(&self, path: &Path, probe: &Probe, taken: &[String]) -> String {
        let Probe::Image(i) = probe else { return String::new() };
        let base = match &i.ovf_name {
            Some(n) if !n.trim().is_empty() => sanitize_name(n),
            _ => sanitize_name(&path.file_stem().unwrap_or_default().to_string_lossy()),
        };
        self.free_name(&base, taken)
    }

    /// `base`, or `base-2`, `base-3`... whichever neither the library nor this sheet uses.
    fn free_name(&self, base: &str, taken: &[String]) -> String {
        let used =
            |n: &str| taken.iter().any(|t| t == n) || self.entries.iter().any(|e| e.name == n);
        (1..)
            .map(|k| if k == 1 { base.to_string() } else { format!("{base}-{k}") })
            .find(|n| !used(n))
            .unwrap_or_else(|| base.to_string())
    }

    /// Why entry `index`'s name cannot be used, if it cannot.
    pub fn name_error(&self, index: usize, taken: &[String]) -> Option<String> {
        let e = self.entries.get(index)?;
        if !e.pending() {
            return None;
        }
        let name = e.name.trim();
        if let Err(err) = library::validate_name(name) {
            return Some(format!("{err:#}"));
        }
        if taken.iter().any(|t| t == name) {
            return Some(format!("A VM named '{name}' already exists"));
        }
        let twice = self
            .entries
            .iter()
            .enumerate()
            .any(|(j, o)| j != index && o.pending() && o.name.trim() == name);
        twice.then(|| format!("Another file here is also to become '{name}'"))
    }

    /// True when Import would start something.
    pub fn can_import(&self, taken: &[String]) -> bool {
        !self.is_running()
            && self.entries.iter().all(|e| e.probe != Probe::Probing)
            && self.entries.iter().any(Entry::pending)
            && (0..self.entries.len()).all(|i| self.name_error(i, taken).is_none())
    }

    /// Queues every pending entry; the items go to [`spawn_import`] with the cancel flag.
    pub fn start(&mut self, taken: &[String]) -> Option<(Vec<ImportItem>, Arc<AtomicBool>)> {
        if !self.can_import(taken) {
            return None;
        }
        let mut items = Vec::new();
        for (index, e) in self.entries.iter_mut().enumerate() {
            if !e.pending() {
                continue;
            }
            e.state = EntryState::Queued;
            let options = ImportOptions {
                name: Some(e.name.trim().to_string()),
                in_place: e.in_place && e.can_use_in_place(),
                ..ImportOptions::default()
            };
            items.push(ImportItem { index, path: e.path.clone(), options });
        }
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancel = Some(cancel.clone());
        Some((items, cancel))
    }

    /// Asks the worker to stop; its current import cleans up and the rest are skipped.
    pub fn cancel(&self) {
        if let Some(c) = &self.cancel {
            c.store(true, Ordering::Relaxed);
        }
    }

    pub fn on_event(&mut self, event: ImportEvent, taken: &[String]) {
        match event {
            ImportEvent::Probed { path, probe } => self.probed(&path, probe, taken),
            ImportEvent::Progress { index, done, total } => {
                if let Some(e) = self.entries.get_mut(index) {
                    if matches!(e.state, EntryState::Queued | EntryState::Importing { .. }) {
                        e.state = EntryState::Importing { done, total };
                    }
                }
            }
            ImportEvent::Done { index, result } => {
                if let Some(e) = self.entries.get_mut(index) {
                    e.state = match result {
                        ImportResult::Imported { name, warnings } => {
                            e.name = name.clone();
                            EntryState::Done { name, warnings }
                        }
                        ImportResult::Failed(chain) => EntryState::Failed(chain),
                        ImportResult::Cancelled => EntryState::Cancelled,
                    };
                }
            }
            ImportEvent::Finished => {
                self.cancel = None;
                // Anything the worker never reached (it died) is not left "queued" forever.
                for e in &mut self.entries {
                    if matches!(e.state, EntryState::Queued | EntryState::Importing { .. }) {
                        e.state = EntryState::Cancelled;
                    }
                }
            }
        }
    }
}

/// Probes `paths` on a worker thread, reporting [`ImportEvent::Probed`] for each.
pub fn spawn_probe(paths: Vec<PathBuf>, events: EventSender) {
    let send = events.clone();
    let spawned = std::thread::Builder::new().name("gui-probe".into()).spawn(move || {
        for path in paths {
            let probe = probe(&path);
            send.send(Event::Import(ImportEvent::Probed { path, probe }));
        }
    });
    if let Err(e) = spawned {
        log::error!("Cannot start the probe thread: {e}");
    }
}

/// Imports `items` one after the other on a worker thread, reporting [`Event::Import`].
pub fn spawn_import(
    library: Library,
    items: Vec<ImportItem>,
    cancel: Arc<AtomicBool>,
    events: EventSender,
    poke: Option<Sender<()>>,
) {
    let send = events.clone();
    let spawned = std::thread::Builder::new().name("gui-import".into()).spawn(move || {
        for item in items {
            let index = item.index;
            let result = if cancel.load(Ordering::Relaxed) {
                ImportResult::Cancelled
            } else {
                import_one(&library, &item, &cancel, &send)
            };
            send.send(Event::Import(ImportEvent::Done { index, result }));
            if let Some(p) = &poke {
                let _ = p.send(());
            }
        }
        send.send(Event::Import(ImportEvent::Finished));
    });
    if let Err(e) = spawned {
        log::error!("Cannot start the import thread: {e}");
        events.send(Event::Import(ImportEvent::Finished));
    }
}

fn import_one(
    library: &Library,
    item: &ImportItem,
    cancel: &AtomicBool,
    events: &EventSender,
) -> ImportResult {
    let index = item.index;
    let last = Cell::new(None::<Instant>);
    let progress = |done: u64, total: u64| {
        let due = last.get().is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) || done == total;
        if due {
            last.set(Some(Instant::now()));
            events.send(Event::Import(ImportEvent::Progress { index, done, total }));
        }
        !cancel.load(Ordering::Relaxed)
    };
    match import(library, &item.path, &item.options, &progress) {
        Ok(o) => ImportResult::Imported { name: o.name, warnings: o.warnings },
        Err(e) if is_cancelled(&e) => ImportResult::Cancelled,
        Err(e) => ImportResult::Failed(e.chain().map(|c| c.to_string()).collect()),
    }
}

/// What the user asked of the sheet this frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SheetAction {
    None,
    Import,
    Cancel,
    Close,
}

/// Draws the sheet as a modal. Enter imports, Escape cancels a running import or closes.
pub fn sheet_ui(ctx: &egui::Context, sheet: &mut ImportSheet, taken: &[String]) -> SheetAction {
    let mut action = SheetAction::None;
    let running = sheet.is_running();
    let can_import = sheet.can_import(taken);
    // Taken before the name fields see them, so Enter always means Import.
    let (enter, escape) = ctx.input_mut(|i| {
        (
            i.consume_key(egui::Modifiers::NONE, egui::Key::Enter),
            i.consume_key(egui::Modifiers::NONE, egui::Key::Escape),
        )
    });
    if enter && can_import {
        action = SheetAction::Import;
    }
    if escape {
        action = if running { SheetAction::Cancel } else { SheetAction::Close };
    }
    let count = sheet.entries.len();
    let errors: Vec<Option<String>> = (0..count).map(|i| sheet.name_error(i, taken)).collect();
    egui::Modal::new(egui::Id::unique("hutch-import-sheet")).show(ctx, |ui| {
        ui.set_width(560.0);
        ui.heading(if count == 1 {
            "Import 1 file".to_string()
        } else {
            format!("Import {count} files")
        });
        egui::ScrollArea::vertical().max_height(ctx.content_rect().height() * 0.7).show(ui, |ui| {
            for (i, e) in sheet.entries.iter_mut().enumerate() {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    entry_ui(ui, i, e, running, errors[i].as_deref());
                });
            }
        });
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            if running {
                if ui.button("Cancel").on_hover_text("Esc").clicked() {
                    action = SheetAction::Cancel;
                }
            } else {
                let any_pending = sheet.entries.iter().any(Entry::pending);
                if any_pending
                    && ui
                        .add_enabled(can_import, egui::Button::new("Import"))
                        .on_hover_text("Enter")
                        .clicked()
                {
                    action = SheetAction::Import;
                }
                let close = if any_pending { "Cancel" } else { "Close" };
                if ui.button(close).on_hover_text("Esc").clicked() {
                    action = SheetAction::Close;
                }
            }
        });
    });
    action
}

fn entry_ui(ui: &mut egui::Ui, i: usize, e: &mut Entry, running: bool, name_error: Option<&str>) {
    let file = e.path.file_name().unwrap_or(e.path.as_os_str()).to_string_lossy().into_owned();
    ui.label(RichText::new(&file).strong());
    ui.label(RichText::new(e.path.display().to_string()).small().weak());
    let image = match &e.probe {
        Probe::Probing => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Reading…");
            });
            return;
        }
        Probe::Refused(why) => {
            ui.label(RichText::new(why).color(Color32::from_rgb(240, 170, 60)));
            return;
        }
        Probe::Image(image) => image.clone(),
    };
    let format = match &image.subformat {
        Some(s) => format!("{} ({s})", image.format.name().to_uppercase()),
        None => image.format.name().to_uppercase(),
    };
    ui.label(format!(
        "{format} · {} virtual · {} on disk",
        human(image.virtual_size),
        human(image.allocated_bytes)
    ));
    let editable = !running && e.pending();
    ui.horizontal(|ui| {
        ui.label("VM name");
        ui.add_enabled(
            editable,
            egui::TextEdit::singleline(&mut e.name)
                .id_salt(("import-name", i))
                .desired_width(260.0),
        );
    });
    if let Some(msg) = name_error {
        ui.label(RichText::new(msg).color(Color32::LIGHT_RED));
    }
    let in_place_text = match image.format {
        ImageFormat::Raw | ImageFormat::Qcow2 => "Use in place",
        _ => "Use in place (with an overlay)",
    };
    ui.add_enabled_ui(editable, |ui| {
        ui.radio_value(&mut e.in_place, false, "Convert to qcow2 (recommended)");
        if e.can_use_in_place() {
            ui.radio_value(&mut e.in_place, true, in_place_text);
        }
    });
    match &e.state {
        EntryState::Ready => {}
        EntryState::Queued => {
            ui.label("Waiting…");
        }
        EntryState::Importing { done, total } => {
            let fraction = if *total == 0 { 0.0 } else { *done as f32 / *total as f32 };
            ui.add(egui::ProgressBar::new(fraction).show_percentage().animate(true));
            ui.label(format!("Importing… {} of {}", human(*done), human(*total)));
        }
        EntryState::Done { name, warnings } => {
            ui.label(
                RichText::new(format!("Imported as VM '{name}'"))
                    .color(Color32::from_rgb(80, 200, 120)),
            );
            for w in warnings {
                ui.label(format!("Warning: {w}"));
            }
        }
        EntryState::Failed(chain) => {
            for (k, cause) in chain.iter().enumerate() {
                let text = if k == 0 {
                    format!("Import failed: {cause}")
                } else {
                    format!("Caused by: {cause}")
                };
                ui.label(RichText::new(text).color(Color32::LIGHT_RED));
            }
        }
        EntryState::Cancelled => {
            ui.label("Cancelled; nothing was kept");
        }
    }
}

/// The hint drawn over the window while files hover over it.
pub fn drop_hint(ctx: &egui::Context, count: usize) {
    let rect = ctx.content_rect();
    let painter = ctx
        .layer_painter(egui::LayerId::new(egui::Order::Foreground, egui::Id::unique("drop-hint")));
    painter.rect_filled(rect, 0.0, Color32::from_black_alpha(170));
    painter.rect_stroke(
        rect.shrink(12.0),
        8.0,
        egui::Stroke::new(3.0, Color32::from_rgb(120, 170, 240)),
        egui::StrokeKind::Inside,
    );
    let what = if count == 1 { "this file".to_string() } else { format!("these {count} files") };
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        format!("Drop {what} to import it as a VM"),
        egui::FontId::proportional(24.0),
        Color32::WHITE,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    fn vmdk(size: u64) -> Probe {
        Probe::Image(ImageSummary {
            format: ImageFormat::Vmdk,
            subformat: Some("monolithicSparse".into()),
            virtual_size: size,
            allocated_bytes: 4096,
            ovf_name: None,
        })
    }

    fn raw(size: u64) -> ImageSummary {
        ImageSummary {
            format: ImageFormat::Raw,
            subformat: None,
            virtual_size: size,
            allocated_bytes: size,
            ovf_name: None,
        }
    }

    #[test]
    fn small_or_unaligned_raw_files_are_not_disk_images() {
        for size in [0, 37, MIN_RAW_BYTES - SECTOR, MIN_RAW_BYTES + 1] {
            match classify("notes.txt", raw(size)) {
                Probe::Refused(why) => {
                    assert!(why.starts_with("Not a disk image: notes.txt"), "{why}")
                }
                p => panic!("{size} bytes accepted: {p:?}"),
            }
        }
        assert!(matches!(classify("disk.img", raw(MIN_RAW_BYTES)), Probe::Image(_)));
        // An ISO becomes a VM that installs from it.
        let iso = ImageSummary { format: ImageFormat::Iso, ..raw(MIN_RAW_BYTES) };
        assert!(matches!(classify("x.iso", iso), Probe::Image(_)));
    }

    #[test]
    fn names_come_from_the_file_or_the_ovf_and_avoid_collisions() {
        let taken = vec!["debian".to_string()];
        let mut s = ImportSheet::default();
        s.add("/a/debian.vmdk".into(), vmdk(1 << 30), &taken);
        s.add("/b/debian.vmdk".into(), vmdk(1 << 30), &taken);
        s.add("/c/My Server.vmdk".into(), vmdk(1 << 30), &taken);
        let ova = Probe::Image(ImageSummary {
            format: ImageFormat::Ova,
            ovf_name: Some("Appliance 1".into()),
            ..raw(1 << 30)
        });
        s.add("/d/x.ova".into(), ova, &taken);
        // The same file dropped twice is one entry.
        s.add("/a/debian.vmdk".into(), vmdk(1 << 30), &taken);
        let names: Vec<&str> = s.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["debian-2", "debian-3", "My-Server", "Appliance-1"]);
        assert!(s.can_import(&taken));
        assert!(!s.entries[3].can_use_in_place());
    }

    #[test]
    fn bad_or_duplicate_names_block_import() {
        let taken = vec!["vm".to_string()];
        let mut s = ImportSheet::default();
        s.add("/a/one.vmdk".into(), vmdk(1 << 20), &taken);
        s.add("/a/two.vmdk".into(), vmdk(1 << 20), &taken);
        s.entries[1].name = "one".into();
        assert!(s.name_error(1, &taken).unwrap().contains("also to become 'one'"));
        assert!(!s.can_import(&taken));
        s.entries[1].name = "vm".into();
        assert!(s.name_error(1, &taken).unwrap().contains("already exists"));
        s.entries[1].name = "a/b".into();
        assert!(s.name_error(1, &taken).is_some());
        assert!(s.start(&taken).is_none());
        s.entries[1].name = "two".into();
        assert!(s.can_import(&taken));
    }

    #[test]
    fn a_sheet_of_only_refused_files_cannot_import() {
        let mut s = ImportSheet::default();
        s.add("/n.txt".into(), classify("n.txt", raw(12)), &[]);
        assert_eq!(s.entries[0].name, "");
        assert_eq!(s.name_error(0, &[]), None);
        assert!(!s.can_import(&[]));
    }

    #[test]
    fn import_runs_through_progress_to_done_failed_or_cancelled() {
        let mut s = ImportSheet::default();
        for f in ["/a.vmdk", "/b.vmdk", "/c.vmdk"] {
            s.add(f.into(), vmdk(1 << 20), &[]);
        }
        s.add("/n.txt".into(), classify("n.txt", raw(3)), &[]);
        s.entries[1].in_place = true;
        let (items, cancel) = s.start(&[]).unwrap();
        assert!(s.is_running());
        assert!(!s.can_import(&[]));
        assert_eq!(items.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(items[0].options.name.as_deref(), Some("a"));
        assert!(items[1].options.in_place && !items[0].options.in_place);
        assert_eq!(s.entries[2].state, EntryState::Queued);

        s.on_event(ImportEvent::Progress { index: 0, done: 5, total: 10 }, &[]);
        assert_eq!(s.entries[0].state, EntryState::Importing { done: 5, total: 10 });
        let ok = ImportResult::Imported { name: "a".into(), warnings: vec![] };
        s.on_event(ImportEvent::Done { index: 0, result: ok }, &[]);
        // A late progress report does not undo "done".
        s.on_event(ImportEvent::Progress { index: 0, done: 10, total: 10 }, &[]);
        assert!(matches!(s.entries[0].state, EntryState::Done { .. }));
        let failed = ImportResult::Failed(vec!["boom".into()]);
        s.on_event(ImportEvent::Done { index: 1, result: failed }, &[]);

        s.cancel();
        assert!(cancel.load(Ordering::Relaxed));
        s.on_event(ImportEvent::Done { index: 2, result: ImportResult::Cancelled }, &[]);
        s.on_event(ImportEvent::Finished, &[]);
        assert!(!s.is_running());
        assert_eq!(s.entries[1].state, EntryState::Failed(vec!["boom".into()]));
        assert_eq!(s.entries[2].state, EntryState::Cancelled);

        // Failed and cancelled entries can be tried again; the done one is not redone.
        let (again, _) = s.start(&["a".to_string()]).unwrap();
        assert_eq!(again.iter().map(|i| i.index).collect::<Vec<_>>(), [1, 2]);
    }

    /// A library and a 2 MiB raw image with data, plus import options that need no guest.
    fn workspace() -> (tempfile::TempDir, Library, PathBuf, ImportOptions) {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::at(dir.path().join("home"));
        let image = dir.path().join("src.img");
        let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, data).unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, "k").unwrap();
        let options = ImportOptions {
            name: Some("vm".into()),
            kernel: Some(kernel),
            ..ImportOptions::default()
        };
        (dir, lib, image, options)
    }

    fn run_worker(lib: &Library, item: ImportItem, cancel: bool) -> Vec<ImportEvent> {
        let (events, rx) = EventSender::new(egui::Context::default());
        let flag = Arc::new(AtomicBool::new(cancel));
        spawn_import(lib.clone(), vec![item], flag, events, None);
        let mut got = Vec::new();
        while let Ok(ev) = rx.recv_timeout(Duration::from_secs(30)) {
            if let Event::Import(e) = ev {
                let last = e == ImportEvent::Finished;
                got.push(e);
                if last {
                    break;
                }
            }
        }
        got
    }

    #[test]
    fn the_worker_imports_and_reports_progress() {
        let (_dir, lib, image, options) = workspace();
        assert!(matches!(
            probe(&image),
            Probe::Image(ImageSummary { format: ImageFormat::Raw, .. })
        ));
        let got = run_worker(&lib, ImportItem { index: 3, path: image, options }, false);
        assert!(got.iter().any(|e| matches!(e, ImportEvent::Progress { index: 3, .. })), "{got:?}");
        let done = ImportEvent::Done {
            index: 3,
            result: ImportResult::Imported { name: "vm".into(), warnings: vec![] },
        };
        assert_eq!(&got[got.len() - 2..], [done, ImportEvent::Finished]);
        assert_eq!(lib.names().unwrap(), ["vm"]);
    }

    #[test]
    fn a_cancelled_import_leaves_no_vm_directory() {
        let (_dir, lib, image, options) = workspace();
        // Cancelled between items: skipped without touching the library.
        let item = ImportItem { index: 0, path: image.clone(), options: options.clone() };
        let got = run_worker(&lib, item.clone(), true);
        assert_eq!(got[0], ImportEvent::Done { index: 0, result: ImportResult::Cancelled });
        // Cancelled inside the copy: import() itself must clean up.
        let flag = AtomicBool::new(false);
        let (events, _rx) = EventSender::new(egui::Context::default());
        let dir = lib.root().join("vms/vm");
        let seen_dir = Cell::new(false);
        let progress = |_: u64, _: u64| {
            seen_dir.set(seen_dir.get() || dir.exists());
            flag.store(true, Ordering::Relaxed);
            false
        };
        let err = import(&lib, &image, &options, &progress).unwrap_err();
        assert!(is_cancelled(&err), "{err:#}");
        assert!(seen_dir.get(), "the import never claimed its directory");
        assert!(!dir.exists());
        assert!(lib.names().unwrap().is_empty());
        assert_eq!(import_one(&lib, &item, &flag, &events), ImportResult::Cancelled);
        assert!(!dir.exists());
    }

    #[test]
    fn a_failed_import_reports_the_cause() {
        let (dir, lib, image, mut options) = workspace();
        options.kernel = Some(dir.path().join("missing-kernel"));
        let item = ImportItem { index: 0, path: image, options };
        let got = run_worker(&lib, item, false);
        match &got[0] {
            ImportEvent::Done { result: ImportResult::Failed(chain), .. } => {
                assert!(chain.join(" / ").contains("missing-kernel"), "{chain:?}")
            }
            e => panic!("{e:?}"),
        }
        assert!(!lib.root().join("vms/vm").exists());
    }

    #[test]
    fn files_being_read_hold_import_and_get_their_name_when_read() {
        let taken = vec!["a".to_string()];
        let mut s = ImportSheet::default();
        assert!(s.add("/x/a.vmdk".into(), Probe::Probing, &taken));
        assert!(s.add("/y/a.vmdk".into(), Probe::Probing, &taken));
        assert!(!s.add("/x/a.vmdk".into(), Probe::Probing, &taken));
        assert_eq!(s.entries[0].name, "");
        s.on_event(ImportEvent::Probed { path: "/y/a.vmdk".into(), probe: vmdk(1 << 20) }, &taken);
        assert_eq!(s.entries[1].name, "a-2");
        assert!(!s.can_import(&taken), "one file is still being read");
        s.on_event(ImportEvent::Probed { path: "/x/a.vmdk".into(), probe: vmdk(1 << 20) }, &taken);
        assert_eq!(s.entries[0].name, "a-3");
        assert!(s.can_import(&taken));
        // A second answer for the same file changes nothing.
        s.probed(Path::new("/x/a.vmdk"), Probe::Refused("x".into()), &taken);
        assert!(s.entries[0].image().is_some());
    }

    #[test]
    fn a_text_file_on_disk_is_refused_as_not_a_disk_image() {
        let dir = tempfile::tempdir().unwrap();
        let notes = dir.path().join("notes.txt");
        std::fs::write(&notes, "hello\n").unwrap();
        match probe(&notes) {
            Probe::Refused(why) => assert!(why.starts_with("Not a disk image: notes.txt"), "{why}"),
            p => panic!("{p:?}"),
        }
        assert!(
            matches!(probe(&dir.path().join("gone")), Probe::Refused(w) if w.starts_with("Cannot read gone"))
        );
    }

    #[test]
    fn finishing_early_leaves_nothing_queued() {
        let mut s = ImportSheet::default();
        s.add("/a.vmdk".into(), vmdk(1 << 20), &[]);
        s.start(&[]).unwrap();
        s.on_event(ImportEvent::Finished, &[]);
        assert_eq!(s.entries[0].state, EntryState::Cancelled);
    }
}
