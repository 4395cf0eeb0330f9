//! Winograd's F(2x2, 3x3) (Lavin and Gray, CVPR 2016) for the CPU's 3x3 convolutions of stride 1
//! and padding 1 on even-sized images: every 2x2 block of outputs from a 4x4 block of inputs with
//! 16 multiplies a channel pair instead of 36. Each of the 16 points of the transformed blocks is
//! one gemm over channels, [Co, C] x [C, blocks], so the products stay gemm's. The forward pass
//! and the input gradient (the same convolution with the weight flipped and transposed) take it,
//! and so does the weight gradient, as the algorithm's adjoint in the weight: one gemm a point
//! over the blocks, [Co, blocks] x [blocks, C], then G^T (.) G per channel pair.

use super::{gemm, sum_in_order, with_scratch, written, Mat, Plan, Uninit};
use rayon::prelude::*;

/// Entries of a transformed 4x4 block: the gemms per tile.
const POINTS: usize = 16;

/// Channels in and out below which the transforms cost what the saved multiplies do
/// (`path_timings`, batch 128, two threads): at 16 channels and 32x32 natively level with the
/// shifted frames (forward 4.02 against 4.55 ms, backward 8.57 against 8.77; the whole step the
/// same at 16 and 32 in four interleaved pairs), at 32 channels and 16x16 faster than im2col
/// (forward 2.98 against 4.45, backward 7.11 against 10.19). In the page's wasm (SIMD128, no fused
/// multiply-add) multiplies cost more: its CPU step was 6% faster from 16 channels than from 32,
/// and no faster with the 3-channel stem too (`scripts/bench-page.mjs --device cpu`).
const MIN_CHANNELS: usize = 16;

/// Whether F(2x2, 3x3) computes this layer: 3x3, stride 1, padding 1, even height and width, and
/// [`MIN_CHANNELS`] in and out.
pub(super) fn fits(plan: &Plan) -> bool {
    let even = |n: usize| n >= 2 && n.is_multiple_of(2);
    let wide = plan.c_in.min(plan.c_out) >= MIN_CHANNELS;
    wide && plan.kernel == 3
        && plan.stride == 1
        && plan.padding == 1
        && even(plan.height)
        && even(plan.width)
}

/// A layer in F(2x2, 3x3)'s blocks: `c_in` to `c_out` channels on `height` x `width` images.
#[derive(Clone, Copy)]
struct Blocks {
    c_in: usize,
    c_out: usize,
    height: usize,
    width: usize,
}

/// A convolution with its weight already transformed: `u` [16, c_out, c_in].
pub(super) struct Winograd {
    blocks: Blocks,
    u: Vec<f32>,
}

impl Winograd {
    /// The layer's own convolution, weight [Co, C, 3, 3].
    pub(super) fn forward(plan: &Plan, weight: &[f32]) -> Self {
        let (c_out, c_in) = (plan.c_out, plan.c_in);
        Self::with(plan, c_in, c_out, |o, i, a, b| {
            weight[((o * c_in + i) * 3 + a) * 3 + b]
        })
    }

    /// The convolution that maps the output's gradient to the input's: the weight turned by 180
    /// degrees with its channel axes swapped, [C, Co, 3, 3].
    pub(super) fn input_gradient(plan: &Plan, weight: &[f32]) -> Self {
        let (c_out, c_in) = (plan.c_in, plan.c_out);
        Self::with(plan, c_in, c_out, |o, i, a, b| {
            weight[((i * c_out + o) * 3 + 2 - a) * 3 + 2 - b]
        })
    }

    /// U = G g G^T for each channel pair, g(o, i, row, column) the 3x3 kernel.
    fn with(
        plan: &Plan,
        c_in: usize,
        c_out: usize,
        g: impl Fn(usize, usize, usize, usize) -> f32,
    ) -> Self {
        let mut u = vec![0f32; POINTS * c_out * c_in];
        for o in 0..c_out {
            for i in 0..c_in {
                // (G g)[a][j] by columns of g, then (G g G^T)[a][b] by rows of that.
                let columns: [[f32; 4]; 3] =
                    std::array::from_fn(|j| kernel_transform([0, 1, 2].map(|a| g(o, i, a, j))));
                for a in 0..4 {
                    let row = kernel_transform([0, 1, 2].map(|j| columns[j][a]));
                    for (b, value) in row.into_iter().enumerate() {
                        u[((4 * a + b) * c_out + o) * c_in + i] = value;
                    }
                }
            }
        }
        let blocks = Blocks::of(plan, c_in, c_out);
        Self { blocks, u }
    }

    /// The convolution of images x [B, c_in, H, W] -> [B, c_out, H, W], `tile` images a task.
    pub(super) fn apply(&self, x: &[f32], tile: usize) -> Vec<f32> {
        let (image_in, image_out) = (self.blocks.image_in(), self.blocks.image_out());
        // SAFETY: each tile's images are written whole: the output transform writes both entries
        // of each block's two lines, and even sizes leave no entry outside a block.
        unsafe {
            written(x.len() / image_in * image_out, |y| {
                y.par_chunks_mut(tile * image_out)
                    .zip(x.par_chunks(tile * image_in))
                    .for_each(|(y, x)| self.convolve(x, y))
            })
        }
    }

    /// One tile of images: V [16, C, blocks] from the inputs, M_p [Co, blocks] = U_p · V_p for
    /// each point p, then each block's 2x2 outputs out of M.
    fn convolve(&self, x: &[f32], y: &mut [Uninit]) {
        let Blocks { c_in, c_out, .. } = self.blocks;
        let columns = self.blocks.columns(x);
        with_scratch(
            [
                POINTS * c_in * columns,
                POINTS * c_out * columns,
                Parts::len(columns).max(12 * columns),
            ],
            |[v, m, work]| {
                self.blocks.transform_inputs(x, v, work, columns);
                for p in 0..POINTS {
                    let u = Mat::rows(&self.u[p * c_out * c_in..], c_in);
                    let v = Mat::rows(&v[p * c_in * columns..], columns);
                    let m = &mut m[p * c_out * columns..];
                    gemm(m, c_out, columns, c_in, false, u, v);
                }
                self.blocks.transform_outputs(m, y, work, columns);
            },
        );
    }
}

/// Blocks per image below which the weight gradient stays direct: its per-point products sum
/// over a group's blocks only (fixed groups of images, for exact repeats), and at 4x4 images that
/// is 32 blocks against accumulators of Co x C entries per point: 84.6 -> 126.1 ms backward at 512
/// channels, 8.9 -> 10.5 at 128 (batch 64 and 128, `path_timings`), while 8x8 images gained (50.8
/// -> 40.5 ms at 256 channels, 8.1 -> 7.5 at 64).
const MIN_BLOCKS_FOR_WEIGHT_GRADIENT: usize = 16;

/// Whether [`weight_gradient`] pays for this layer.
pub(super) fn fits_weight_gradient(plan: &Plan) -> bool {
    plan.height / 2 * (plan.width / 2) >= MIN_BLOCKS_FOR_WEIGHT_GRADIENT
}

/// The weight gradient [Co, C, 3, 3] of the layer `plan` (one F(2x2, 3x3) fits) from its input x
/// and the gradient of its output dy: with Y = A^T [U ⊙ V] A and U = G g G^T, dL/dg = G^T M G for
/// M = Σ over blocks of (A dY A^T) ⊙ V, each point's sum a gemm. Summed over fixed groups of
/// images in a fixed order, as the direct paths' ([`Plan::weight_grad_groups`]).
pub(super) fn weight_gradient(plan: &Plan, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let blocks = Blocks::of(plan, plan.c_in, plan.c_out);
    let (image_in, image_out) = (blocks.image_in(), blocks.image_out());
    let (group, tile) = plan.weight_grad_groups();
    let pairs = plan.c_out * plan.c_in;
    let partials: Vec<Vec<f32>> = (x.par_chunks(group * image_in))
        .zip(dy.par_chunks(group * image_out))
        .map(|(x, dy)| {
            let mut m = vec![0f32; POINTS * pairs];
            let tiles = x.chunks(tile * image_in).zip(dy.chunks(tile * image_out));
            tiles.for_each(|(x, dy)| blocks.weight_products(x, dy, &mut m));
            m
        })
        .collect();
    let m = sum_in_order(POINTS * pairs, partials);
    let mut dw = vec![0f32; pairs * 9];
    for (pair, dw) in dw.chunks_mut(9).enumerate() {
        // M G by rows of M, then G^T (M G) by columns of that.
        let rows: [[f32; 3]; 4] = std::array::from_fn(|a| {
            gradient_transform([0, 1, 2, 3].map(|b| m[(4 * a + b) * pairs + pair]))
        });
        for k in 0..3 {
            let column = gradient_transform([0, 1, 2, 3].map(|a| rows[a][k]));
            for (j, value) in column.into_iter().enumerate() {
                dw[3 * j + k] = value;
            }
        }
    }
    dw
}

impl Blocks {
    /// A convolution of `c_in` to `c_out` channels on `plan`'s images.
    fn of(plan: &Plan, c_in: usize, c_out: usize) -> Self {
        Self {
            c_in,
            c_out,
            height: plan.height,
            width: plan.width,
        }
    }

    fn image_in(&self) -> usize {
        self.c_in * self.height * self.width
    }

    fn image_out(&self) -> usize {
        self.c_out * self.height * self.width
    }

    /// Blocks of 2x2 outputs per image.
    fn per_image(&self) -> usize {
        self.height / 2 * (self.width / 2)
    }

    /// Blocks in a tile of input images `x`.
    fn columns(&self, x: &[f32]) -> usize {
        x.len() / self.image_in() * self.per_image()
    }

    /// One tile's share of the weight gradient: m [16, Co, C] += (A dY A^T)_p · V_p^T per point.
    /// Both operands run along the blocks, so their rows are laid a cache line more than a power
    /// of two apart (see `Plan::im2col_backward`).
    fn weight_products(&self, x: &[f32], dy: &[f32], m: &mut [f32]) {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let columns = self.columns(x);
        let stride = columns + 16;
        with_scratch(
            [
                POINTS * c_in * stride,
                POINTS * c_out * stride,
                Parts::len(columns),
            ],
            |[v, d, work]| {
                self.transform_inputs(x, v, work, stride);
                self.transform_output_grads(dy, d, work, stride);
                for p in 0..POINTS {
                    let d = Mat::rows(&d[p * c_out * stride..], stride);
                    let v = Mat::cols(&v[p * c_in * stride..], stride);
                    let m = &mut m[p * c_out * c_in..];
                    gemm(m, c_out, c_in, columns, true, d, v);
                }
            },
        );
    }

    /// A dY A^T for every 2x2 block of the output gradient, into D [16, Co, blocks] with rows
    /// `stride` apart, A's rows (1, 0), (1, 1), (1, -1), (0, -1). As the inputs' transform, each
    /// channel's planes are first split into runs along all the tile's blocks (entry (i, j) of
    /// every block, lines 2r + i and columns 2q + j, at `(2 i + j) * blocks` + the block's
    /// index), then each of D's 16 points is one pass over them.
    fn transform_output_grads(&self, dy: &[f32], d: &mut [f32], lines: &mut [f32], stride: usize) {
        let (h, w, half, per_image) = (self.height, self.width, self.width / 2, self.per_image());
        let blocks = dy.len() / self.image_out() * per_image;
        let lines = &mut lines[..4 * blocks];
        for o in 0..self.c_out {
            for (image, dy) in dy.chunks(self.image_out()).enumerate() {
                let plane = &dy[o * h * w..][..h * w];
                for (l, line) in plane.chunks(w).enumerate() {
                    let at = 2 * (l % 2) * blocks + image * per_image + l / 2 * half;
                    let (even, odd) = lines[at..].split_at_mut(blocks);
                    split_parity(line, &mut even[..half], &mut odd[..half]);
                }
            }
            let part = |i: usize, j: usize| &lines[(2 * i + j) * blocks..][..blocks];
            let parts = [part(0, 0), part(0, 1), part(1, 0), part(1, 1)];
            for (a, [a0, a1]) in A.into_iter().enumerate() {
                for (b, [b0, b1]) in A.into_iter().enumerate() {
                    let at = ((4 * a + b) * self.c_out + o) * stride;
                    map_runs(&mut d[at..][..blocks], parts, |[p00, p01, p10, p11]| {
                        a0 * (b0 * p00 + b1 * p01) + a1 * (b0 * p10 + b1 * p11)
                    });
                }
            }
        }
    }

    /// V = B^T d B for every 4x4 input block d (lines and columns 2r - 1 .. 2r + 3, zero outside
    /// the image), into V [16, C, blocks] with rows `stride` apart. Each channel's planes, the
    /// tile's images one after another, are first split by the parity of their zero-padded lines
    /// and of their columns into [`Parts`]: entry (j, k) of every block of the tile is then one
    /// run, and each of V's 16 points one pass over runs as long as the tile's blocks (per line
    /// of blocks, or per plane of a small image, the runs were too short to pay for themselves).
    /// Padded columns 2q and 2q + 3 (a block's first and last) are the odd and even columns one
    /// entry earlier and later, but for the first and last block of each line, where they are
    /// padding: those entries are computed again without them.
    fn transform_inputs(&self, x: &[f32], v: &mut [f32], lines: &mut [f32], stride: usize) {
        let (h, w, half) = (self.height, self.width, self.width / 2);
        let images = x.len() / self.image_in();
        let parts = Parts::of(self, images);
        let n = parts.blocks;
        let lines = &mut lines[..Parts::len(n)];
        // Padded lines 0 and h + 1 (every image's first block's line 0, its last's line 3) are
        // zero, and no plane writes them.
        for columns in [Columns::Even, Columns::Odd] {
            for image in 0..images {
                lines[parts.at(columns, 0, 0, image)..][..half].fill(0.0);
                lines[parts.at(columns, 3, h / 2 - 1, image)..][..half].fill(0.0);
            }
        }
        for c in 0..self.c_in {
            for (image, x) in x.chunks(self.image_in()).enumerate() {
                let plane = &x[c * h * w..][..h * w];
                for (l, line) in plane.chunks(w).enumerate() {
                    // Padded line l + 1 = 2m + parity is line j = 2 (m - r) + parity of the
                    // blocks of rows r = m - 1 and m (those inside the image).
                    let (m, parity) = (l.div_ceil(2), (l + 1) % 2);
                    for r in m.saturating_sub(1)..(m + 1).min(h / 2) {
                        let j = 2 * (m - r) + parity;
                        let even = parts.at(Columns::Even, j, r, image);
                        let odd = parts.at(Columns::Odd, j, r, image);
                        let (head, tail) = lines.split_at_mut(odd);
                        split_parity(line, &mut head[even..][..half], &mut tail[..half]);
                    }
                }
            }
            let d = |j: usize, k: usize| &lines[parts.run(j, k)..][..n];
            for (a, &(a0, a1, sa)) in B_T.iter().enumerate() {
                for (b, &(b0, b1, sb)) in B_T.iter().enumerate() {
                    let out = &mut v[((4 * a + b) * self.c_in + c) * stride..][..n];
                    let [p, q, r, s] = [d(a0, b0), d(a1, b0), d(a0, b1), d(a1, b1)];
                    map_runs(out, [p, q, r, s], |[p, q, r, s]| {
                        (p + sa * q) + sb * (r + sa * s)
                    });
                    // The line ends, where column 0 or 3 is padding: only the other column's
                    // term, (r + sa s) scaled by sb or (p + sa q), is left.
                    let ends = match (b0, b1) {
                        (0, _) => Some((0, sb, (r, s))),
                        (_, 3) => Some((half - 1, 1.0, (p, q))),
                        _ => None,
                    };
                    if let Some((first, scale, (p, q))) = ends {
                        for i in (first..n).step_by(half) {
                            out[i] = scale * (p[i] + sa * q[i]);
                        }
                    }
                }
            }
        }
    }

    /// Y = A^T M A for every block: M [16, Co, columns] to images [t, Co, H, W]. Per output
    /// channel the combinations run along all the tile's blocks (M A into 8 runs of `work`, then
    /// A^T (M A) into 4 more); then each block's four outputs go to their places.
    fn transform_outputs(&self, m: &[f32], y: &mut [Uninit], work: &mut [f32], columns: usize) {
        let (h, w, half) = (self.height, self.width, self.width / 2);
        let (s, ys) = work[..12 * columns].split_at_mut(8 * columns);
        for o in 0..self.c_out {
            let point = |p: usize| &m[(p * self.c_out + o) * columns..][..columns];
            // (M A)'s row a is runs 2a and 2a + 1.
            for (a, s) in s.chunks_mut(2 * columns).enumerate() {
                let (s0, s1) = s.split_at_mut(columns);
                output_transform([0, 1, 2, 3].map(|b| point(4 * a + b)), s0, s1);
            }
            // Y's entry (i, b) is run b of `y0` (i = 0) or of `y1`.
            let (y0, y1) = ys.split_at_mut(2 * columns);
            for b in 0..2 {
                let column = [0, 1, 2, 3].map(|a| run(s, 2 * a + b, columns));
                let (y0, y1) = (&mut y0[b * columns..], &mut y1[b * columns..]);
                output_transform(column, &mut y0[..columns], &mut y1[..columns]);
            }
            for (image, y) in y.chunks_mut(self.image_out()).enumerate() {
                let plane = &mut y[o * h * w..][..h * w];
                for (r, lines) in plane.chunks_mut(2 * w).enumerate() {
                    let first = image * self.per_image() + r * half;
                    for (i, line) in lines.chunks_mut(w).enumerate() {
                        let ys = [0, 1].map(|b| &run(ys, 2 * i + b, columns)[first..][..half]);
                        for (q, pair) in line.chunks_exact_mut(2).enumerate() {
                            pair[0].write(ys[0][q]);
                            pair[1].write(ys[1][q]);
                        }
                    }
                }
            }
        }
    }
}

/// The input's columns by parity: padded columns 2q + 1 and 2q + 2 of block q.
#[derive(Clone, Copy)]
enum Columns {
    Even,
    Odd,
}

/// A tile's planes of one channel split by their blocks' lines and by column parity: line j of
/// block row r (padded line 2r + j) of `image`, its even or odd input columns, at
/// `at(Even or Odd, j, r, image)` + q for block column q, so that each (j, columns) is one run
/// along the tile's blocks. Each run has a spare entry before and after it, which the runs of
/// padded columns 0 and 3 read.
struct Parts {
    half: usize,
    per_image: usize,
    blocks: usize,
}

impl Parts {
    fn of(blocks: &Blocks, images: usize) -> Self {
        Self {
            half: blocks.width / 2,
            per_image: blocks.per_image(),
            blocks: images * blocks.per_image(),
        }
    }

    /// The scratch for a tile of `blocks` blocks.
    fn len(blocks: usize) -> usize {
        8 * (blocks + 2)
    }

    fn at(&self, columns: Columns, j: usize, r: usize, image: usize) -> usize {
        let run = 4 * columns as usize + j;
        1 + run * (self.blocks + 2) + image * self.per_image + r * self.half
    }

    /// Where entry (j, k) of the tile's first block starts its run: padded column 2q of block q
    /// is odd column q - 1, and 2q + 3 is even column q + 1.
    fn run(&self, j: usize, k: usize) -> usize {
        match k {
            0 => self.at(Columns::Odd, j, 0, 0) - 1,
            1 => self.at(Columns::Even, j, 0, 0),
            2 => self.at(Columns::Odd, j, 0, 0),
            _ => self.at(Columns::Even, j, 0, 0) + 1,
        }
    }
}

/// Run `n` of `columns` entries in `runs`.
fn run(runs: &[f32], n: usize, columns: usize) -> &[f32] {
    &runs[n * columns..][..columns]
}

/// A's rows: (A y)[a] = A[a][0] y0 + A[a][1] y1 for a pair y of outputs.
const A: [[f32; 2]; 4] = [[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, -1.0]];

/// B^T's rows: (B^T d)[n] = d[i] + sign * d[j] for (i, j, sign).
const B_T: [(usize, usize, f32); 4] = [(0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)];

/// A^T m along runs: out0 = m0 + m1 + m2, out1 = m1 - m2 - m3.
fn output_transform(m: [&[f32]; 4], out0: &mut [f32], out1: &mut [f32]) {
    let n = out0.len();
    let (m0, m1, m2, m3, out1) = (
        &m[0][..n],
        &m[1][..n],
        &m[2][..n],
        &m[3][..n],
        &mut out1[..n],
    );
    for i in 0..n {
        out0[i] = m0[i] + m1[i] + m2[i];
        out1[i] = m1[i] - m2[i] - m3[i];
    }
}

/// G^T m for a 4-vector m: the weight gradient's side of F(2, 3).
fn gradient_transform(m: [f32; 4]) -> [f32; 3] {
    let half = 0.5;
    [
        m[0] + half * (m[1] + m[2]),
        half * (m[1] - m[2]),
        half * (m[1] + m[2]) + m[3],
    ]
}

/// A line's even columns and its odd ones.
fn split_parity(line: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for (k, pair) in line.chunks_exact(2).enumerate() {
        even[k] = pair[0];
        odd[k] = pair[1];
    }
}

/// `out[i] = f(inputs' entries i)`.
fn map_runs<const N: usize>(out: &mut [f32], inputs: [&[f32]; N], f: impl Fn([f32; N]) -> f32) {
    let n = out.len();
    let inputs = inputs.map(|input| &input[..n]);
    for (i, out) in out.iter_mut().enumerate() {
        *out = f(inputs.map(|input| input[i]));
    }
}

/// G k for a 3-vector k: the kernel side of F(2, 3).
fn kernel_transform(k: [f32; 3]) -> [f32; 4] {
    let half = 0.5;
    [
        k[0],
        half * (k[0] + k[1] + k[2]),
        half * (k[0] - k[1] + k[2]),
        k[2],
    ]
}
