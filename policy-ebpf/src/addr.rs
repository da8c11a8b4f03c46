//! Address copies and comparisons a word at a time.
//!
//! `Addr` is a byte array (alignment 1), so LLVM turns a plain copy into a
//! call to a byte-wise `memcpy` subprogram. Every address the classifier
//! copies sits at a 4-aligned offset of a 4-aligned struct (see the layouts in
//! policy-common), so it is moved as four words instead.

use policy_common::{Addr, PeerCidrData};

#[inline(always)]
fn words(a: &Addr) -> *const u32 {
    a.as_ptr().cast()
}

/// `dst = src`. Both must be 4-aligned.
#[inline(always)]
pub fn copy(dst: &mut Addr, src: &Addr) {
    let (d, s) = (dst.as_mut_ptr().cast::<u32>(), words(src));
    // SAFETY: callers pass fields at 4-aligned offsets of 4-aligned structs.
    unsafe {
        *d = *s;
        *d.add(1) = *s.add(1);
        *d.add(2) = *s.add(2);
        *d.add(3) = *s.add(3);
    }
}

/// `dst = [0; 16]`. Must be 4-aligned.
#[inline(always)]
pub fn zero(dst: &mut Addr) {
    let d = dst.as_mut_ptr().cast::<u32>();
    // SAFETY: as for `copy`.
    unsafe {
        *d = 0;
        *d.add(1) = 0;
        *d.add(2) = 0;
        *d.add(3) = 0;
    }
}

/// `a == b`. Both must be 4-aligned.
#[inline(always)]
pub fn eq(a: &Addr, b: &Addr) -> bool {
    let (a, b) = (words(a), words(b));
    // SAFETY: as for `copy`.
    unsafe {
        (*a ^ *b) | (*a.add(1) ^ *b.add(1)) | (*a.add(2) ^ *b.add(2)) | (*a.add(3) ^ *b.add(3)) == 0
    }
}

/// An LPM trie key laid out as aya's (packed) `lpm_trie::Key<PeerCidrData>`,
/// but 4-aligned so the address moves as words.
#[repr(C, align(4))]
pub struct LpmKey {
    pub prefix_len: u32,
    pub data: PeerCidrData,
}
