//! The global allocator: mimalloc, entered by its plain `mi_malloc` family
//! whenever mimalloc's natural alignment already covers the layout.
//!
//! The `mimalloc` crate hands every allocation to `mi_malloc_aligned`. That
//! costs a power-of-two check and a layer of calls on every allocation, and
//! above 1 KB (the request's future, hyper's 8 KB read buffers: three per
//! request) it falls to a generic aligned path before reaching the same page
//! queues `mi_malloc` goes to directly: ~50 instructions more each. Proxied
//! requests make about a dozen allocations, so this is ~1% of a pass-through
//! request's instructions (callgrind, benches/load/instructions.sh).
//!
//! Only the entry point differs; the heaps, their thread-local free lists and
//! `mi_free` are mimalloc's. Layouts mimalloc does not align naturally go to
//! its aligned functions as before.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

pub struct Mimalloc;

/// Whether a plain mimalloc block of `size` bytes is aligned enough for
/// `align`: every block is 8-aligned, and blocks of 16 bytes or more are
/// 16-aligned (`MI_MAX_ALIGN_SIZE`; mimalloc asserts this in `_mi_page_malloc`).
#[inline(always)]
fn natural(size: usize, align: usize) -> bool {
    align <= 8 || (align <= 16 && size >= 16)
}

// SAFETY: each function returns what mimalloc returns for the layout (null on
// failure), a block aligned for it: by `natural` or by asking mimalloc's
// aligned entry points. Every block, however allocated, is freed by `mi_free`.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: FFI calls with a size and a power-of-two alignment.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if natural(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the functions above.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from one of the functions above; the new block
        // is checked against the alignment as a fresh allocation would be.
        unsafe {
            if natural(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class up to a few pages, at each alignment, comes back
    /// aligned and usable, through alloc, zeroed alloc and realloc.
    #[test]
    fn blocks_are_aligned_for_their_layout() {
        let a = Mimalloc;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=64).chain([100, 1000, 1024, 1500, 4000, 8192, 70_000]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed once, by its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align), "zeroed {size}/{align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let grown = size * 3 + 5;
                    let r = a.realloc(p, layout, grown);
                    assert!((r as usize).is_multiple_of(align), "realloc {size}/{align}");
                    assert!(std::slice::from_raw_parts(r, size)
                        .iter()
                        .all(|&b| b == 0xa5));
                    a.dealloc(r, Layout::from_size_align(grown, align).unwrap());
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
