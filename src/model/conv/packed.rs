//! The page's gemm (wasm32): packed blocks and a 4x8 microkernel on SIMD128, with relaxed SIMD's
//! fused multiply-add where the module is built with it (www/pkg-relaxed).
//!
//! The gemm crate's wasm kernel keeps 12 accumulators, 3 operand vectors and a broadcast live at
//! once, unrolled twice along k: V8 compiles wasm for x86-64's 16 vector registers and spills
//! its accumulators to the stack on every step of the loop (`node --no-liftoff
//! --print-wasm-code-function-index=N`). It was 53% of the page's step
//! (`scripts/profile-page.mjs`). This one keeps 8 accumulators, 2 operand vectors and a
//! broadcast live, all in registers; yet with SIMD128 alone it is no faster, both being bound by
//! the separate multiply and add. Its point is `f32x4.relaxed_madd`, which the gemm crate does not
//! use and V8 compiles to one FMA: the page's step 8-16% faster (results/bench). Natively the gemm
//! crate's AVX kernels stay; this module is compiled there for its tests only, on arrays in place
//! of SIMD128 vectors.

#[cfg(all(
    target_arch = "wasm32",
    feature = "relaxed-simd",
    not(target_feature = "relaxed-simd")
))]
compile_error!(
    "the relaxed-simd feature builds with `-C target-feature=+relaxed-simd` (scripts/web.sh)"
);

use super::Mat;
use std::ops::Range;

/// Rows of a tile: lhs entries broadcast, one at a time.
const MR: usize = 4;
/// Columns of a tile: two 4-lane vectors of rhs.
const NR: usize = 8;
/// Depth of a block: a tile's operands (KC * (MR + NR) floats, 12 KiB) stay in L1.
const KC: usize = 256;

/// dst [m, n] (row-major) = lhs [m, k] · rhs [k, n], or += when `accumulate`. lhs is packed
/// (it is the small operand: weights, or the output gradient of a weight gradient); rhs is read
/// in place where its rows are contiguous and packed where they are not (a weight gradient's).
pub(super) fn gemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let (mut a, mut b): (Vec<[f32; MR]>, Vec<[f32; NR]>) = (Vec::new(), Vec::new());
    let in_place = rhs.col_stride == 1;
    let rhs_rows = rhs.row_stride as usize;
    for p0 in (0..k).step_by(KC) {
        let depth = p0..KC.min(k - p0) + p0;
        let kc = depth.len();
        let add = accumulate || p0 > 0;
        pack(&mut a, lhs, 0..m, depth.clone());
        if !in_place {
            // rhs's columns are the lines of its transpose.
            pack(&mut b, rhs.t(), 0..n, depth.clone());
        }
        for (jp, j) in (0..n).step_by(NR).enumerate() {
            let cols = NR.min(n - j);
            let mut edge: Vec<[f32; NR]> = Vec::new();
            let (panel, stride) = match (in_place, cols == NR) {
                (true, true) => (&rhs.data[p0 * rhs_rows + j..], rhs_rows),
                (true, false) => {
                    pack(&mut edge, rhs.t(), j..n, depth.clone());
                    (edge.as_flattened(), NR)
                }
                (false, _) => (b[jp * kc..][..kc].as_flattened(), NR),
            };
            for (i, a) in (0..m).step_by(MR).zip(a.chunks_exact(kc)) {
                let tile = Tile {
                    row: i,
                    col: j,
                    rows: MR.min(m - i),
                    cols,
                };
                kernel(a, panel, stride, &tile, dst, n, add);
            }
        }
    }
}

/// `lines` of `mat` (its rows) over `depth` (its columns) as panels of W lines, each panel
/// [depth][W]: what a kernel reads in order. Lines past the end are zero.
fn pack<const W: usize>(
    out: &mut Vec<[f32; W]>,
    mat: Mat,
    lines: Range<usize>,
    depth: Range<usize>,
) {
    let (rs, cs) = (mat.row_stride as usize, mat.col_stride as usize);
    out.clear();
    out.resize(lines.len().div_ceil(W) * depth.len(), [0.0; W]);
    for (first, panel) in lines
        .clone()
        .step_by(W)
        .zip(out.chunks_exact_mut(depth.len()))
    {
        let count = W.min(lines.end - first);
        if cs == 1 {
            // Each line is contiguous along the depth.
            for r in 0..count {
                let line = &mat.data[(first + r) * rs + depth.start..][..depth.len()];
                for (slot, &v) in panel.iter_mut().zip(line) {
                    slot[r] = v;
                }
            }
        } else if rs == 1 && count == W {
            // The panel's lines are adjacent at each depth. (A copy of a fixed length: one of
            // a run-time length is wasm's `memory.copy`, a call in V8 that costs more than the
            // 32 bytes it moves.)
            for (p, slot) in depth.clone().zip(panel.iter_mut()) {
                *slot = mat.data[first + p * cs..][..W]
                    .try_into()
                    .expect("W entries");
            }
        } else {
            for (p, slot) in depth.clone().zip(panel.iter_mut()) {
                for (r, v) in slot.iter_mut().take(count).enumerate() {
                    *v = mat.data[(first + r) * rs + p * cs];
                }
            }
        }
    }
}

/// One tile of dst: a packed lhs panel times the rhs panel whose rows (NR entries each) are
/// `stride` apart in `b`, written or added.
#[inline(never)]
fn kernel(
    a: &[[f32; MR]],
    b: &[f32],
    stride: usize,
    tile: &Tile,
    dst: &mut [f32],
    n: usize,
    add: bool,
) {
    let mut acc = [[F4::splat(0.0); 2]; MR];
    for (p, a) in a.iter().enumerate() {
        let (lo, hi) = b[p * stride..][..NR].split_at(4);
        let b = [F4::load(lo), F4::load(hi)];
        for (acc, &a) in acc.iter_mut().zip(a) {
            let a = F4::splat(a);
            acc[0] = acc[0].mul_add(a, b[0]);
            acc[1] = acc[1].mul_add(a, b[1]);
        }
    }
    tile.write(dst, n, acc, add);
}

/// Where a kernel's tile lands in dst: its first row and column, and how many of each are real.
struct Tile {
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
}

impl Tile {
    #[inline(always)]
    fn write(&self, dst: &mut [f32], n: usize, tile: [[F4; 2]; MR], add: bool) {
        for (r, [lo, hi]) in tile.into_iter().take(self.rows).enumerate() {
            let out = &mut dst[(self.row + r) * n + self.col..];
            if self.cols == NR {
                let (l, h) = out[..NR].split_at_mut(4);
                let (lo, hi) = match add {
                    true => (lo.add(F4::load(l)), hi.add(F4::load(h))),
                    false => (lo, hi),
                };
                lo.store(l);
                hi.store(h);
            } else {
                let mut row = [0.0; NR];
                let (l, h) = row.split_at_mut(4);
                lo.store(l);
                hi.store(h);
                for (o, v) in out[..self.cols].iter_mut().zip(row) {
                    *o = if add { *o + v } else { v };
                }
            }
        }
    }
}

/// Four f32 lanes: a SIMD128 vector in the page, an array natively (for the tests).
#[derive(Clone, Copy)]
struct F4(Lanes);

#[cfg(target_arch = "wasm32")]
type Lanes = core::arch::wasm32::v128;
#[cfg(not(target_arch = "wasm32"))]
type Lanes = [f32; 4];

#[cfg(target_arch = "wasm32")]
impl F4 {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Self(core::arch::wasm32::f32x4_splat(x))
    }

    #[inline(always)]
    fn load(x: &[f32]) -> Self {
        let x: &[f32; 4] = x.try_into().expect("four lanes");
        // SAFETY: x is 16 readable bytes; wasm loads need no alignment.
        Self(unsafe { core::arch::wasm32::v128_load(x.as_ptr().cast()) })
    }

    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        let out: &mut [f32; 4] = out.try_into().expect("four lanes");
        // SAFETY: out is 16 writable bytes; wasm stores need no alignment.
        unsafe { core::arch::wasm32::v128_store(out.as_mut_ptr().cast(), self.0) }
    }

    /// self + a * b: SIMD128 has no fused multiply-add (relaxed SIMD's is not in every browser).
    #[cfg(not(target_feature = "relaxed-simd"))]
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        use core::arch::wasm32::f32x4_mul;
        self.add(Self(f32x4_mul(a.0, b.0)))
    }

    /// self + a * b, fused where the CPU can.
    #[cfg(target_feature = "relaxed-simd")]
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Self(core::arch::wasm32::f32x4_relaxed_madd(a.0, b.0, self.0))
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(core::arch::wasm32::f32x4_add(self.0, other.0))
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl F4 {
    fn splat(x: f32) -> Self {
        Self([x; 4])
    }

    fn load(x: &[f32]) -> Self {
        Self(x.try_into().expect("four lanes"))
    }

    fn store(self, out: &mut [f32]) {
        out.copy_from_slice(&self.0);
    }

    fn mul_add(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + a.0[l] * b.0[l]))
    }

    fn add(self, other: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + other.0[l]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal to the gemm crate's product (the native path's) on shapes with partial tiles and
    /// blocks in every dimension, operands row-major, column-major or neither (a weight tap's),
    /// overwritten and accumulated.
    #[test]
    fn packed_gemm_equals_the_gemm_crate() {
        let value = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
        for (m, n, k) in [
            (1, 1, 1),
            (5, 9, 3),
            (16, 144, 300),
            (130, 20, 7),
            (3, 4100, 2),
        ] {
            let data = |len: usize, seed: usize| -> Vec<f32> {
                (0..2 * len).map(|i| value(i + seed)).collect()
            };
            let (lhs_data, rhs_data) = (data(m * k, 0), data(k * n, 17));
            let start: Vec<f32> = (0..m * n).map(|i| value(i + 5)).collect();
            for lhs in layouts(&lhs_data, m, k) {
                for rhs in layouts(&rhs_data, k, n) {
                    for accumulate in [false, true] {
                        let (mut ours, mut theirs) = (start.clone(), start.clone());
                        gemm(&mut ours, m, n, k, accumulate, lhs, rhs);
                        super::super::crate_gemm(&mut theirs, m, n, k, accumulate, lhs, rhs);
                        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                            let tolerance = 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt();
                            assert!(
                                (a - b).abs() <= tolerance,
                                "m {m} n {n} k {k} strides {:?} {:?} accumulate {accumulate}: \
                                 entry {i}: {a} vs {b}",
                                (lhs.row_stride, lhs.col_stride),
                                (rhs.row_stride, rhs.col_stride),
                            );
                        }
                    }
                }
            }
        }
    }

    /// A [rows, cols] operand laid out three ways; the strided one uses every other entry.
    fn layouts(data: &[f32], rows: usize, cols: usize) -> [Mat<'_>; 3] {
        [
            Mat::rows(data, cols),
            Mat::cols(data, rows),
            Mat {
                data,
                col_stride: 2,
                row_stride: 2 * cols as isize,
            },
        ]
    }
}
