//! The process allocator: slabs for tokio's cache-line-aligned objects, the system
//! allocator for everything else.
//!
//! Every client holds two objects that tokio aligns to 128 bytes on x86-64 (to keep them
//! on cache lines of their own): its task (a 384-byte cell holding the session's future)
//! and its socket's readiness state (256 bytes). glibc serves such an aligned request by
//! cutting it out of a larger free chunk, and the pieces it cuts off cost every idle client
//! about 150 bytes besides its chunk headers. Here, requests aligned to exactly 128 bytes
//! and of at most 512 bytes come instead from per-size free lists carved out of 64 kB blocks:
//! no header, no fragments, a push or pop under an uncontended lock (once per connection,
//! not per transaction). It is what PgBouncer does for its clients and servers (slab
//! caches). Freed pieces are kept for the next connections and never go back to the
//! system, as with PgBouncer's caches: after a peak of N clients, about N × 640 bytes stay
//! reserved.
//!
//! `main.rs` installs it as the `#[global_allocator]`; the library itself does not depend
//! on it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::Mutex;

/// The alignment served from slabs (tokio's `CachePadded` on x86-64 and aarch64).
const ALIGN: usize = 128;
/// Size classes: 128, 256, 384 and 512 bytes.
const CLASSES: usize = 4;
/// Slabs are carved out of blocks of this size, taken from the system allocator.
const BLOCK: usize = 64 * 1024;

/// The allocator. See the module documentation.
pub struct SlabAlloc {
    classes: [Mutex<Class>; CLASSES],
}

/// One size class: a free list, and what is not carved yet of its newest block.
struct Class {
    /// The first free piece; each free piece's first word holds the next (null ends it).
    free: *mut u8,
    /// The next piece to carve, and how many bytes of its block are left from there.
    next: *mut u8,
    left: usize,
}

// SAFETY: the pointers in a `Class` designate memory that belongs to the allocator alone
// (free pieces and uncarved block space: never handed out while listed here). They are
// only read or written under the class's mutex, so moving a `Class` to another thread
// (what `Mutex<Class>: Sync` needs) cannot create unsynchronised access.
unsafe impl Send for Class {}

impl SlabAlloc {
    pub const fn new() -> SlabAlloc {
        const fn empty() -> Mutex<Class> {
            Mutex::new(Class {
                free: ptr::null_mut(),
                next: ptr::null_mut(),
                left: 0,
            })
        }
        SlabAlloc {
            classes: [empty(), empty(), empty(), empty()],
        }
    }

    /// A piece of class `c` (size `(c + 1) * ALIGN`, aligned to `ALIGN`), or null when the
    /// system allocator has no block to give.
    fn take(&self, c: usize) -> *mut u8 {
        let size = (c + 1) * ALIGN;
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        if !class.free.is_null() {
            let piece = class.free;
            // SAFETY: `piece` is on the free list, so it is a piece of this class that
            // `give_back` wrote the next free piece's address into (its first word; pieces
            // are ALIGN-aligned, so the read is aligned), and nothing else uses it.
            class.free = unsafe { piece.cast::<*mut u8>().read() };
            return piece;
        }
        if class.left < size {
            // SAFETY: the layout's size is non-zero, as `alloc` requires.
            let block = unsafe { System.alloc(Layout::from_size_align(BLOCK, ALIGN).unwrap()) };
            if block.is_null() {
                return ptr::null_mut();
            }
            // The rest of the previous block (less than one piece) is left unused.
            class.next = block;
            class.left = BLOCK;
        }
        let piece = class.next;
        // SAFETY: `left >= size`, so `next + size` stays inside the block (or one past its
        // end), which `add` allows; the block is ALIGN-aligned and sizes are multiples of
        // ALIGN, so every piece is ALIGN-aligned.
        class.next = unsafe { piece.add(size) };
        class.left -= size;
        piece
    }

    /// Puts a piece of class `c` back on its free list.
    ///
    /// # Safety
    /// `piece` came from `take(c)` and is no longer used by anyone.
    unsafe fn give_back(&self, c: usize, piece: *mut u8) {
        let mut class = self.classes[c].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller gives up `piece`, which is at least ALIGN (>= 8) bytes and
        // ALIGN-aligned: its first word can hold the list's link.
        unsafe { piece.cast::<*mut u8>().write(class.free) };
        class.free = piece;
    }
}

impl Default for SlabAlloc {
    fn default() -> SlabAlloc {
        SlabAlloc::new()
    }
}

/// The slab class of a layout: aligned to exactly `ALIGN`, 1 to `CLASSES * ALIGN` bytes.
/// Depends on the layout alone, so `dealloc` (called with the layout `alloc` got) finds
/// the same answer and frees the memory where it came from.
fn class_of(layout: Layout) -> Option<usize> {
    (layout.align() == ALIGN && layout.size() > 0 && layout.size() <= CLASSES * ALIGN)
        .then(|| (layout.size() - 1) / ALIGN)
}

// SAFETY: every pointer returned is either the system allocator's answer for the same
// layout, or a slab piece that is ALIGN-aligned, at least `layout.size()` bytes (its
// class's size is `layout.size()` rounded up to ALIGN) and handed out to one owner at a
// time (it leaves the free list or the uncarved space under the class's mutex, and comes
// back only through `dealloc` with the same layout). Memory is freed where it came from,
// because `class_of` depends on the layout alone.
unsafe impl GlobalAlloc for SlabAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(c) => self.take(c),
            // SAFETY: the caller's contract for `alloc` is passed on unchanged.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            // SAFETY: with this layout, `alloc` took `ptr` from class `c`; the caller
            // no longer uses it.
            Some(c) => unsafe { self.give_back(c, ptr) },
            // SAFETY: with this layout, `alloc` got `ptr` from the system allocator.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(c) => {
                let piece = self.take(c);
                if !piece.is_null() {
                    // SAFETY: the piece is at least `layout.size()` bytes and ours.
                    unsafe { piece.write_bytes(0, layout.size()) };
                }
                piece
            }
            // SAFETY: the caller's contract is passed on unchanged.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, does not
        // overflow isize, which is what this constructor needs.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            (None, None) => {
                // SAFETY: `ptr` is the system allocator's, for `layout`.
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            // The piece already has room for the new size.
            (Some(a), Some(b)) if a == b => return ptr,
            _ => {}
        }
        // SAFETY: `new_layout` has a non-zero size (the caller's contract).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and distinct (the old one
            // is still allocated); the old one is freed with the layout it was given.
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn classes() {
        assert_eq!(class_of(layout(384, 128)), Some(2));
        assert_eq!(class_of(layout(256, 128)), Some(1));
        assert_eq!(class_of(layout(1, 128)), Some(0));
        assert_eq!(class_of(layout(512, 128)), Some(3));
        assert_eq!(class_of(layout(640, 128)), None);
        assert_eq!(class_of(layout(384, 64)), None);
        assert_eq!(class_of(layout(384, 256)), None);
        assert_eq!(class_of(layout(0, 128)), None);
    }

    #[test]
    fn pieces_are_aligned_distinct_and_reused() {
        let a = SlabAlloc::new();
        let l = layout(384, 128);
        // More than a block's worth, so a second block is taken.
        let pieces: Vec<*mut u8> = (0..400).map(|_| unsafe { a.alloc(l) }).collect();
        for (i, &p) in pieces.iter().enumerate() {
            assert!(!p.is_null());
            assert_eq!(p as usize % 128, 0);
            unsafe { p.write_bytes(i as u8, 384) };
        }
        for (i, &p) in pieces.iter().enumerate() {
            let s = unsafe { std::slice::from_raw_parts(p, 384) };
            assert!(s.iter().all(|&b| b == i as u8), "piece {i} was overwritten");
        }
        let mut sorted: Vec<usize> = pieces.iter().map(|&p| p as usize).collect();
        sorted.sort();
        assert!(sorted.windows(2).all(|w| w[1] - w[0] >= 384));
        let last = pieces[399];
        for &p in &pieces {
            unsafe { a.dealloc(p, l) };
        }
        // Last freed, first reused.
        assert_eq!(unsafe { a.alloc(l) }, last);
        // A zeroed piece is zero even when reused.
        unsafe { a.dealloc(last, l) };
        let z = unsafe { a.alloc_zeroed(l) };
        assert_eq!(z, last);
        assert!(
            unsafe { std::slice::from_raw_parts(z, 384) }
                .iter()
                .all(|&b| b == 0)
        );
        unsafe { a.dealloc(z, l) };
    }

    #[test]
    fn realloc_moves_between_slabs_and_the_system() {
        let a = SlabAlloc::new();
        unsafe {
            let p = a.alloc(layout(200, 128));
            p.write_bytes(7, 200);
            // Within its class a piece stays where it is.
            assert_eq!(a.realloc(p, layout(200, 128), 250), p);
            let p = a.realloc(p, layout(250, 128), 200);
            // To a bigger class, then out of the slabs, then back.
            let p = a.realloc(p, layout(200, 128), 500);
            assert_eq!(p as usize % 128, 0);
            assert!(std::slice::from_raw_parts(p, 200).iter().all(|&b| b == 7));
            let p = a.realloc(p, layout(500, 128), 4096);
            assert_eq!(p as usize % 128, 0);
            assert!(std::slice::from_raw_parts(p, 200).iter().all(|&b| b == 7));
            let p = a.realloc(p, layout(4096, 128), 100);
            assert!(std::slice::from_raw_parts(p, 100).iter().all(|&b| b == 7));
            a.dealloc(p, layout(100, 128));
            // Everything else is the system's.
            let v = a.alloc(layout(24, 8));
            let v = a.realloc(v, layout(24, 8), 48);
            a.dealloc(v, layout(48, 8));
        }
    }

    #[test]
    fn threads_take_and_give_back() {
        let a = std::sync::Arc::new(SlabAlloc::new());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let l = layout(256, 128);
                    for round in 0..200 {
                        let ps: Vec<usize> = (0..50)
                            .map(|_| {
                                let p = unsafe { a.alloc(l) };
                                unsafe { p.write_bytes(t as u8, 256) };
                                p as usize
                            })
                            .collect();
                        for &p in &ps {
                            let s = unsafe { std::slice::from_raw_parts(p as *const u8, 256) };
                            assert!(s.iter().all(|&b| b == t as u8), "round {round}");
                            unsafe { a.dealloc(p as *mut u8, l) };
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
