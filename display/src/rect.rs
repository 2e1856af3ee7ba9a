//! Rectangles and dirty regions: the unit in which screen changes travel from a display device
//! to the shared frame and on to the GUI's texture.
//!
//! Coordinates come from the guest (virtio-gpu transfer/flush rects), so every edge is computed
//! in `u64` and `x + width` can never overflow.

/// A rectangle of pixels; empty when `width` or `height` is 0.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect { x, y, width, height }
    }

    /// The rectangle covering a whole `width`×`height` screen.
    pub const fn full(width: u32, height: u32) -> Rect {
        Rect::new(0, 0, width, height)
    }

    pub const fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// One past the right edge, which may lie beyond `u32::MAX` for a hostile rect.
    pub const fn right(&self) -> u64 {
        self.x as u64 + self.width as u64
    }

    /// One past the bottom edge, which may lie beyond `u32::MAX` for a hostile rect.
    pub const fn bottom(&self) -> u64 {
        self.y as u64 + self.height as u64
    }

    pub const fn area(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    pub const fn contains_point(&self, x: u32, y: u32) -> bool {
        x >= self.x && (x as u64) < self.right() && y >= self.y && (y as u64) < self.bottom()
    }

    /// Whether every pixel of `other` lies inside `self` (an empty `other` always does).
    pub fn contains(&self, other: &Rect) -> bool {
        other.is_empty()
            || (other.x >= self.x
                && other.y >= self.y
                && other.right() <= self.right()
                && other.bottom() <= self.bottom())
    }

    /// The overlap of two rects; empty (all zero) when they don't overlap.
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = self.right().min(other.right());
        let y1 = self.bottom().min(other.bottom());
        if x1 <= x0 as u64 || y1 <= y0 as u64 {
            return Rect::default();
        }
        // Both extents are at most the smaller rect's width/height, so they fit u32.
        Rect::new(x0, y0, (x1 - x0 as u64) as u32, (y1 - y0 as u64) as u32)
    }

    /// The bounding box of both rects; an empty rect contributes nothing. Extents that would
    /// pass `u32::MAX` saturate.
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = self.right().max(other.right());
        let y1 = self.bottom().max(other.bottom());
        Rect::new(x0, y0, saturate(x1 - x0 as u64), saturate(y1 - y0 as u64))
    }

    /// The part of `self` inside a `width`×`height` screen.
    pub fn clip(&self, width: u32, height: u32) -> Rect {
        self.intersect(&Rect::full(width, height))
    }

    /// Whether the two rects overlap or share an edge (so their union wastes nothing along it).
    pub fn touches(&self, other: &Rect) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && (self.x as u64) <= other.right()
            && (other.x as u64) <= self.right()
            && (self.y as u64) <= other.bottom()
            && (other.y as u64) <= self.bottom()
    }
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A set of changed rectangles, kept small: overlapping or touching rects are merged, and past
/// [`DirtyRegion::MAX_RECTS`] the pair whose bounding box adds the least area is merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyRegion {
    rects: Vec<Rect>,
}

impl DirtyRegion {
    pub const MAX_RECTS: usize = 16;

    pub fn new() -> DirtyRegion {
        DirtyRegion::default()
    }

    pub fn add(&mut self, rect: Rect) {
        if rect.is_empty() {
            return;
        }
        if self.rects.iter().any(|r| r.contains(&rect)) {
            return;
        }
        // Merging can make the grown rect touch others, so repeat until it stands alone.
        let mut rect = rect;
        while let Some(i) = self.rects.iter().position(|r| r.touches(&rect)) {
            rect = rect.union(&self.rects.swap_remove(i));
        }
        self.rects.push(rect);
        while self.rects.len() > Self::MAX_RECTS {
            self.merge_cheapest_pair();
        }
    }

    fn merge_cheapest_pair(&mut self) {
        let mut best: Option<(u64, usize, usize)> = None;
        for i in 0..self.rects.len() {
            for j in i + 1..self.rects.len() {
                let (a, b) = (self.rects[i], self.rects[j]);
                // Non-touching rects don't overlap, so the added area is exact.
                let cost = a.union(&b).area().saturating_sub(a.area() + b.area());
                if best.is_none_or(|(c, _, _)| cost < c) {
                    best = Some((cost, i, j));
                }
            }
        }
        if let Some((_, i, j)) = best {
            let merged = self.rects[i].union(&self.rects[j]);
            // j > i, so removing j first leaves i in place.
            self.rects.swap_remove(j);
            self.rects.swap_remove(i);
            self.add(merged);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rects.is_empty()
    }

    pub fn rects(&self) -> &[Rect] {
        &self.rects
    }

    /// The rects, leaving the region empty.
    pub fn take(&mut self) -> Vec<Rect> {
        std::mem::take(&mut self.rects)
    }

    /// The bounding box of everything in the region.
    pub fn bounds(&self) -> Rect {
        self.rects.iter().fold(Rect::default(), |acc, r| acc.union(r))
    }
}

impl Extend<Rect> for DirtyRegion {
    fn extend<T: IntoIterator<Item = Rect>>(&mut self, iter: T) {
        for r in iter {
            self.add(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_of_disjoint_rects_is_empty() {
        let a = Rect::new(0, 0, 10, 10);
        assert!(a.intersect(&Rect::new(10, 0, 5, 5)).is_empty());
        assert_eq!(a.intersect(&Rect::new(5, 5, 10, 10)), Rect::new(5, 5, 5, 5));
    }

    #[test]
    fn union_is_bounding_box_and_ignores_empty() {
        let a = Rect::new(0, 0, 2, 2);
        assert_eq!(a.union(&Rect::new(8, 8, 2, 2)), Rect::new(0, 0, 10, 10));
        assert_eq!(a.union(&Rect::new(100, 100, 0, 5)), a);
        assert_eq!(Rect::default().union(&a), a);
    }

    #[test]
    fn hostile_extents_never_overflow() {
        let huge = Rect::new(u32::MAX - 1, u32::MAX - 1, u32::MAX, u32::MAX);
        assert_eq!(huge.right(), u32::MAX as u64 * 2 - 1);
        assert_eq!(huge.clip(1920, 1080), Rect::default());
        let wide = Rect::new(100, 0, u32::MAX, u32::MAX);
        assert_eq!(wide.clip(1920, 1080), Rect::new(100, 0, 1820, 1080));
        assert_eq!(Rect::new(0, 0, 1, 1).union(&huge), Rect::new(0, 0, u32::MAX, u32::MAX));
        assert!(huge.contains_point(u32::MAX, u32::MAX));
        assert!(!huge.contains_point(0, 0));
        assert_eq!(huge.area(), u32::MAX as u64 * u32::MAX as u64);
    }

    #[test]
    fn clip_keeps_the_part_on_screen() {
        assert_eq!(Rect::new(1900, 1000, 100, 100).clip(1920, 1080), Rect::new(1900, 1000, 20, 80));
        assert!(Rect::new(1920, 0, 1, 1).clip(1920, 1080).is_empty());
    }

    #[test]
    fn contains_point_excludes_far_edges() {
        let r = Rect::new(10, 10, 5, 5);
        assert!(r.contains_point(10, 10));
        assert!(r.contains_point(14, 14));
        assert!(!r.contains_point(15, 10));
        assert!(!r.contains_point(9, 12));
    }

    #[test]
    fn overlapping_and_touching_rects_merge() {
        let mut d = DirtyRegion::new();
        d.add(Rect::new(0, 0, 10, 10));
        d.add(Rect::new(10, 0, 10, 10)); // shares an edge
        assert_eq!(d.rects(), &[Rect::new(0, 0, 20, 10)]);
        d.add(Rect::new(5, 5, 2, 2)); // inside
        assert_eq!(d.rects(), &[Rect::new(0, 0, 20, 10)]);
        d.add(Rect::new(100, 100, 1, 1)); // apart
        assert_eq!(d.rects().len(), 2);
        d.add(Rect::new(0, 0, 0, 50)); // empty
        assert_eq!(d.rects().len(), 2);
    }

    #[test]
    fn merge_cascades_when_grown_rect_reaches_another() {
        let mut d = DirtyRegion::new();
        d.add(Rect::new(0, 0, 10, 10));
        d.add(Rect::new(30, 0, 10, 10));
        d.add(Rect::new(5, 0, 30, 2)); // touches both
        assert_eq!(d.rects(), &[Rect::new(0, 0, 40, 10)]);
    }

    #[test]
    fn region_is_capped_by_merging_the_cheapest_pair() {
        let mut d = DirtyRegion::new();
        for i in 0..DirtyRegion::MAX_RECTS as u32 {
            d.add(Rect::new(i * 100, 0, 10, 10));
        }
        assert_eq!(d.rects().len(), DirtyRegion::MAX_RECTS);
        // Closest to the rect at x=0: merging those two costs least.
        d.add(Rect::new(0, 12, 10, 10));
        assert_eq!(d.rects().len(), DirtyRegion::MAX_RECTS);
        assert!(d.rects().contains(&Rect::new(0, 0, 10, 22)));
        let covered: u64 = d.rects().iter().map(Rect::area).sum();
        assert_eq!(covered, 15 * 100 + 220);
    }

    #[test]
    fn take_empties_the_region() {
        let mut d = DirtyRegion::new();
        d.add(Rect::new(1, 2, 3, 4));
        assert_eq!(d.take(), vec![Rect::new(1, 2, 3, 4)]);
        assert!(d.is_empty());
        assert_eq!(d.bounds(), Rect::default());
    }
}
