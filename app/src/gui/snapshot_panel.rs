//! The snapshots panel of a VM: its snapshot tree (children indented under their parent, the
//! one the running state descends from marked "You are here"), each with its thumbnail,
//! name, age and size, and the Take / Restore / Delete buttons. The list and thumbnails are
//! read by the worker ([`super::worker::SnapshotJob`]); this module draws them and owns the
//! pure parts: tree order, the latest snapshot, ages and sizes, thumbnail decoding.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use egui::{Color32, ColorImage, RichText, TextureHandle, Ui};

use crate::snapshots::{SnapshotInfo, SnapshotList};

/// Thumbnail size in the panel (points).
const THUMB: egui::Vec2 = egui::vec2(96.0, 60.0);
/// Indentation per tree level (points).
const INDENT: f32 = 16.0;
/// Largest thumbnail accepted (a thumbnail is small; anything bigger is not one).
const MAX_THUMB_SIDE: u32 = 4096;
const MAX_THUMB_FILE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotPanelError {
    #[error("Cannot read the thumbnail {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Bad thumbnail {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: png::DecodingError,
    },
    #[error("Thumbnail {path} is too large ({width}×{height})")]
    TooLarge { path: PathBuf, width: u32, height: u32 },
}

/// One line of the tree: the snapshot at `index` in the list, `depth` levels deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeRow {
    pub index: usize,
    pub depth: usize,
    /// The running state descends from it ("You are here").
    pub current: bool,
}

/// The list as a tree, depth first: each snapshot followed by its children (oldest first).
/// A snapshot whose parent is not in the list is a root; a parent loop (a bad file) cannot
/// hide or repeat anything.
pub fn tree_rows(list: &SnapshotList) -> Vec<TreeRow> {
    let snaps = &list.snapshots;
    let ids: HashMap<&str, usize> =
        snaps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); snaps.len()];
    let mut roots = Vec::new();
    for (i, s) in snaps.iter().enumerate() {
        match s.parent.as_deref().and_then(|p| ids.get(p)) {
            Some(&p) if p != i => children[p].push(i),
            _ => roots.push(i),
        }
    }
    let mut rows = Vec::with_capacity(snaps.len());
    let mut seen = HashSet::new();
    let current = list.current.as_deref();
    let mut visit = |start: usize, rows: &mut Vec<TreeRow>| {
        let mut stack = vec![(start, 0usize)];
        while let Some((i, depth)) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            rows.push(TreeRow { index: i, depth, current: current == Some(snaps[i].id.as_str()) });
            stack.extend(children[i].iter().rev().map(|&c| (c, depth + 1)));
        }
    };
    for r in roots {
        visit(r, &mut rows);
    }
    // Only a loop of parents leaves anything unvisited: show it at the top level.
    for i in 0..snaps.len() {
        visit(i, &mut rows);
    }
    rows
}

/// The newest snapshot (the last taken), what "Restore Latest" restores.
pub fn latest(list: &SnapshotList) -> Option<&SnapshotInfo> {
    // Oldest first: on equal times the later entry is the newer (max_by_key keeps the last).
    list.snapshots.iter().max_by_key(|s| s.created)
}

/// "just now", "5 min ago", "3 h ago", "2 days ago".
pub fn format_age(created: u64, now: u64) -> String {
    let secs = now.saturating_sub(created);
    match secs {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{} h ago", secs / 3600),
        _ => {
            let days = secs / 86400;
            format!("{days} day{} ago", if days == 1 { "" } else { "s" })
        }
    }
}

/// Bytes on disk, in the largest unit that keeps the number ≥ 1 ("420 MiB").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// Decodes a thumbnail PNG (any colour type, 8 or 16 bits) into opaque-or-not egui pixels.
pub fn decode_thumbnail(path: &Path) -> Result<ColorImage, SnapshotPanelError> {
    let open_err = |source| SnapshotPanelError::Open { path: path.to_path_buf(), source };
    let decode_err = |source| SnapshotPanelError::Decode { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    if len > MAX_THUMB_FILE {
        return Err(open_err(std::io::Error::other("file too large")));
    }
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(decode_err)?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > MAX_THUMB_SIDE || height > MAX_THUMB_SIDE {
        return Err(SnapshotPanelError::TooLarge { path: path.to_path_buf(), width, height });
    }
    let size = reader.output_buffer_size().ok_or(SnapshotPanelError::TooLarge {
        path: path.to_path_buf(),
        width,
        height,
    })?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(decode_err)?;
    let (w, h) = (out.width as usize, out.height as usize);
    let data = &buf[..out.buffer_size()];
    let channels = match out.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        // Indexed is expanded to RGB(A) by the transformation.
        png::ColorType::Rgba | png::ColorType::Indexed => 4,
    };
    let line = out.line_size;
    let mut pixels = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = data.get(y * line..y * line + w * channels).unwrap_or(&[]);
        for p in row.chunks_exact(channels) {
            pixels.push(match *p {
                [g] => Color32::from_gray(g),
                [g, a] => Color32::from_rgba_unmultiplied(g, g, g, a),
                [r, g, b] => Color32::from_rgb(r, g, b),
                [r, g, b, a] => Color32::from_rgba_unmultiplied(r, g, b, a),
                _ => Color32::BLACK,
            });
        }
    }
    // A short buffer (cannot happen with a decoded frame) is padded rather than trusted.
    pixels.resize(w * h, Color32::BLACK);
    Ok(ColorImage::new([w, h], pixels))
}

/// A snapshot as the actions name it: the id to act on, the name to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub id: String,
    pub name: String,
}

impl SnapshotRef {
    pub fn of(info: &SnapshotInfo) -> SnapshotRef {
        SnapshotRef { id: info.id.clone(), name: info.name.clone() }
    }
}

/// What the panel's buttons asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanelAction {
    Take,
    Restore(SnapshotRef),
    Delete(SnapshotRef),
    Refresh,
    Close,
}

/// The panel's state: which VM, and its list as last read.
#[derive(Debug)]
pub struct SnapshotPanel {
    pub vm: String,
    /// None until the first list arrives; the error is the whole cause chain.
    pub list: Option<Result<SnapshotList, String>>,
}

impl SnapshotPanel {
    pub fn new(vm: String) -> SnapshotPanel {
        SnapshotPanel { vm, list: None }
    }
}

/// Thumbnail textures, one per PNG path; None for a file that did not decode.
#[derive(Default)]
pub struct ThumbCache {
    textures: HashMap<PathBuf, Option<TextureHandle>>,
}

impl ThumbCache {
    pub fn known(&self) -> HashSet<PathBuf> {
        self.textures.keys().cloned().collect()
    }

    pub fn insert(&mut self, ctx: &egui::Context, path: PathBuf, image: Option<ColorImage>) {
        let texture = image.map(|i| {
            ctx.load_texture(
                format!("snapshot-thumb-{}", path.display()),
                i,
                egui::TextureOptions::LINEAR,
            )
        });
        self.textures.insert(path, texture);
    }

    fn get(&self, path: &Path) -> Option<&TextureHandle> {
        self.textures.get(path).and_then(Option::as_ref)
    }
}

/// Draws the panel's contents. `live`: the VM runs (a snapshot can be taken); `busy`: an
/// operation is in flight (the buttons wait).
pub fn panel_ui(
    ui: &mut Ui,
    panel: &SnapshotPanel,
    thumbs: &ThumbCache,
    live: bool,
    busy: bool,
    now: u64,
) -> Option<PanelAction> {
    let mut action = None;
    ui.horizontal(|ui| {
        ui.heading("Snapshots");
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.small_button("Close").clicked() {
                action = Some(PanelAction::Close);
            }
            if ui.small_button("Refresh").clicked() {
                action = Some(PanelAction::Refresh);
            }
        });
    });
    ui.label(RichText::new(&panel.vm).strong());
    let take = ui
        .add_enabled(live && !busy, egui::Button::new("Take Snapshot"))
        .on_disabled_hover_text("Only a running VM can be snapshotted");
    if take.clicked() {
        action = Some(PanelAction::Take);
    }
    ui.separator();
    let list = match &panel.list {
        None => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Reading the snapshots…");
            });
            return action;
        }
        Some(Err(e)) => {
            ui.label(
                RichText::new(format!("Cannot list the snapshots: {e}")).color(Color32::LIGHT_RED),
            );
            return action;
        }
        Some(Ok(list)) => list,
    };
    if list.snapshots.is_empty() {
        ui.label("No snapshots");
        return action;
    }
    egui::ScrollArea::vertical().auto_shrink([false, true]).show(ui, |ui| {
        for row in tree_rows(list) {
            let Some(s) = list.snapshots.get(row.index) else { continue };
            ui.horizontal(|ui| {
                ui.add_space(row.depth as f32 * INDENT);
                let (rect, _) = ui.allocate_exact_size(THUMB, egui::Sense::hover());
                ui.painter().rect_filled(rect, 3.0, Color32::from_gray(25));
                match s.thumbnail.as_deref().and_then(|p| thumbs.get(p)) {
                    Some(t) => {
                        let uv =
                            egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0));
                        ui.painter().image(
                            t.id(),
                            super::views::fit_rect(rect, t.size()),
                            uv,
                            Color32::WHITE,
                        );
                    }
                    None => {
                        ui.painter().text(
                            rect.center(),
                            egui::Align2::CENTER_CENTER,
                            "no picture",
                            egui::FontId::proportional(11.0),
                            Color32::GRAY,
                        );
                    }
                }
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(&s.name).strong());
                        if row.current {
                            ui.label(
                                RichText::new("You are here")
                                    .color(Color32::from_rgb(80, 200, 120)),
                            );
                        }
                    });
                    ui.label(
                        RichText::new(format!(
                            "{} · {}",
                            format_age(s.created, now),
                            format_bytes(s.disk_bytes)
                        ))
                        .small(),
                    );
                    ui.horizontal(|ui| {
                        if ui.add_enabled(!busy, egui::Button::new("Restore…").small()).clicked()
                        {
                            action = Some(PanelAction::Restore(SnapshotRef::of(s)));
                        }
                        if ui.add_enabled(!busy, egui::Button::new("Delete…").small()).clicked() {
                            action = Some(PanelAction::Delete(SnapshotRef::of(s)));
                        }
                    });
                });
            });
            ui.add_space(4.0);
        }
    });
    action
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test.
mod tests {
    use super::*;

    fn snap(id: &str, parent: Option<&str>, created: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: format!("Snapshot {id}"),
            created,
            parent: parent.map(Into::into),
            cpus: 1,
            memory_mib: 256,
            thumbnail: None,
            disk_bytes: 0,
        }
    }

    fn rows(list: &SnapshotList) -> Vec<(&str, usize, bool)> {
        tree_rows(list)
            .into_iter()
            .map(|r| (list.snapshots[r.index].id.as_str(), r.depth, r.current))
            .collect()
    }

    #[test]
    fn children_follow_their_parent_indented_oldest_first() {
        // 1 ─┬─ 2 ── 4
        //    └─ 3        5 (a second root, after a restore of nothing)
        let list = SnapshotList {
            snapshots: vec![
                snap("1", None, 10),
                snap("2", Some("1"), 20),
                snap("3", Some("1"), 30),
                snap("4", Some("2"), 40),
                snap("5", None, 50),
            ],
            current: Some("4".into()),
        };
        assert_eq!(
            rows(&list),
            vec![
                ("1", 0, false),
                ("2", 1, false),
                ("4", 2, true),
                ("3", 1, false),
                ("5", 0, false)
            ]
        );
    }

    #[test]
    fn orphans_are_roots_and_parent_loops_show_each_snapshot_once() {
        let list = SnapshotList {
            snapshots: vec![
                snap("a", Some("gone"), 1),
                snap("b", Some("c"), 2),
                snap("c", Some("b"), 3),
                snap("d", Some("d"), 4),
            ],
            current: None,
        };
        let got = rows(&list);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], ("a", 0, false));
        assert_eq!(got[1], ("d", 0, false), "its own parent is a root");
        let mut ids: Vec<&str> = got.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert!(tree_rows(&SnapshotList::default()).is_empty());
    }

    #[test]
    fn the_latest_is_the_newest_even_when_it_is_not_current() {
        let list = SnapshotList {
            snapshots: vec![
                snap("1", None, 10),
                snap("2", Some("1"), 30),
                snap("3", Some("1"), 20),
            ],
            current: Some("1".into()),
        };
        assert_eq!(latest(&list).unwrap().id, "2");
        let tie =
            SnapshotList { snapshots: vec![snap("x", None, 5), snap("y", None, 5)], current: None };
        assert_eq!(latest(&tie).unwrap().id, "y");
        assert!(latest(&SnapshotList::default()).is_none());
    }

    #[test]
    fn ages_and_sizes_read_naturally() {
        assert_eq!(format_age(100, 130), "just now");
        assert_eq!(format_age(100, 100 + 5 * 60), "5 min ago");
        assert_eq!(format_age(0, 3 * 3600 + 5), "3 h ago");
        assert_eq!(format_age(0, 86400), "1 day ago");
        assert_eq!(format_age(0, 3 * 86400), "3 days ago");
        assert_eq!(format_age(200, 100), "just now", "a clock that went back");
        assert_eq!(format_bytes(512), "512 bytes");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(420 << 20), "420 MiB");
        assert_eq!(format_bytes(3 << 30), "3.0 GiB");
    }

    fn write_png(path: &Path, width: u32, height: u32, color: png::ColorType, data: &[u8]) {
        let file = std::fs::File::create(path).unwrap();
        let mut e = png::Encoder::new(std::io::BufWriter::new(file), width, height);
        e.set_color(color);
        e.set_depth(png::BitDepth::Eight);
        let mut w = e.write_header().unwrap();
        w.write_image_data(data).unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn thumbnails_decode_rgb_and_rgba_and_bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let rgb = dir.path().join("rgb.png");
        write_png(&rgb, 2, 1, png::ColorType::Rgb, &[255, 0, 0, 0, 0, 255]);
        let image = decode_thumbnail(&rgb).unwrap();
        assert_eq!(image.size, [2, 1]);
        assert_eq!(image.pixels, vec![Color32::from_rgb(255, 0, 0), Color32::from_rgb(0, 0, 255)]);
        let rgba = dir.path().join("rgba.png");
        write_png(&rgba, 1, 2, png::ColorType::Rgba, &[1, 2, 3, 255, 4, 5, 6, 255]);
        assert_eq!(decode_thumbnail(&rgba).unwrap().pixels[1], Color32::from_rgb(4, 5, 6));
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not a png").unwrap();
        assert!(matches!(decode_thumbnail(&bad), Err(SnapshotPanelError::Decode { .. })));
        let missing = dir.path().join("missing.png");
        assert!(matches!(decode_thumbnail(&missing), Err(SnapshotPanelError::Open { .. })));
    }
}
