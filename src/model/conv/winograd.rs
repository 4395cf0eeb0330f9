//! Winograd's F(2x2, 3x3) (Lavin and Gray, CVPR 2016) for the CPU's 3x3 convolutions of stride 1
//! and padding 1 on even-sized images: every 2x2 block of outputs from a 4x4 block of inputs with
//! 16 multiplies a channel pair instead of 36. Each of the 16 points of the transformed blocks is
//! one gemm over channels, [Co, C] x [C, blocks], so the products stay gemm's. The forward pass
//! and the input gradient (the same convolution with the weight flipped and transposed) take it;
//! the weight gradient stays with im2col or the shifted frames.

use super::{gemm, with_scratch, written, Mat, Plan, Uninit};
use rayon::prelude::*;

/// Entries of a transformed 4x4 block: the gemms per tile.
const POINTS: usize = 16;

/// Channels in and out below which the transforms cost what the saved multiplies do. Natively
/// on two threads (`path_timings`, batch 128), 16 channels at 32x32 were 6% faster forward but 4%
/// slower backward than the shifted frames; 32 at 16x16 14% and 7% faster than im2col; 64 at 32x32
/// 39% and 18%. In the page's wasm (SIMD128, no fused multiply-add) multiplies cost more: the
/// page's CPU step was 6% faster at 16 than at 32 (120.0-124.5 against 112.9-114.4 images/s,
/// `scripts/bench-page.mjs --device cpu`), and no faster with the 3-channel stem too.
#[cfg(not(target_arch = "wasm32"))]
const MIN_CHANNELS: usize = 32;
#[cfg(target_arch = "wasm32")]
const MIN_CHANNELS: usize = 16;

/// Whether F(2x2, 3x3) computes this layer: 3x3, stride 1, padding 1, even height and width, and
/// [`MIN_CHANNELS`] in and out.
pub(super) fn fits(plan: &Plan) -> bool {
    let even = |n: usize| n >= 2 && n % 2 == 0;
    let wide = plan.c_in.min(plan.c_out) >= MIN_CHANNELS;
    wide && plan.kernel == 3
        && plan.stride == 1
        && plan.padding == 1
        && even(plan.height)
        && even(plan.width)
}

/// A convolution of `c_in` to `c_out` channels on `height` x `width` images with its weight
/// already transformed: `u` [16, c_out, c_in].
pub(super) struct Winograd {
    c_in: usize,
    c_out: usize,
    height: usize,
    width: usize,
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
        Self {
            c_in,
            c_out,
            height: plan.height,
            width: plan.width,
            u,
        }
    }

    fn image_in(&self) -> usize {
        self.c_in * self.height * self.width
    }

    fn image_out(&self) -> usize {
        self.c_out * self.height * self.width
    }

    /// Blocks of 2x2 outputs per image.
    fn blocks(&self) -> usize {
        self.height / 2 * (self.width / 2)
    }

    /// The convolution of images x [B, c_in, H, W] -> [B, c_out, H, W], `tile` images a task.
    pub(super) fn apply(&self, x: &[f32], tile: usize) -> Vec<f32> {
        written(x.len() / self.image_in() * self.image_out(), |y| {
            y.par_chunks_mut(tile * self.image_out())
                .zip(x.par_chunks(tile * self.image_in()))
                .for_each(|(y, x)| self.convolve(x, y))
        })
    }

    /// One tile of images: V [16, C, blocks] from the inputs, M_p [Co, blocks] = U_p · V_p for
    /// each point p, then each block's 2x2 outputs out of M.
    fn convolve(&self, x: &[f32], y: &mut [Uninit]) {
        let columns = x.len() / self.image_in() * self.blocks();
        let lines = 8 * (self.width / 2 + 1);
        with_scratch(
            [
                POINTS * self.c_in * columns,
                POINTS * self.c_out * columns,
                lines.max(12 * columns),
            ],
            |[v, m, work]| {
                self.transform_inputs(x, v, work, columns);
                for p in 0..POINTS {
                    let u = Mat::rows(&self.u[p * self.c_out * self.c_in..], self.c_in);
                    let v = Mat::rows(&v[p * self.c_in * columns..], columns);
                    let m = &mut m[p * self.c_out * columns..];
                    gemm(m, self.c_out, columns, self.c_in, false, u, v);
                }
                self.transform_outputs(m, y, work, columns);
            },
        );
    }

    /// V = B^T d B for every 4x4 input block d (lines and columns 2r - 1 .. 2r + 3, zero outside
    /// the image), into V [16, C, columns]. Per line of blocks: the four lines' even and odd
    /// columns apart, combined across lines (B^T), then along them (B): contiguous runs only.
    fn transform_inputs(&self, x: &[f32], v: &mut [f32], lines: &mut [f32], columns: usize) {
        let (h, w, half) = (self.height, self.width, self.width / 2);
        let n = half + 1;
        let (even, odd) = lines[..8 * n].split_at_mut(4 * n);
        for (image, x) in x.chunks(self.image_in()).enumerate() {
            for (c, plane) in x.chunks(h * w).enumerate() {
                for r in 0..h / 2 {
                    // Padded line j holds input line 2r + j - 1: its entries 2k and 2k + 1 are
                    // the input's columns 2k - 1 and 2k, zero outside.
                    for j in 0..4 {
                        let (e, o) = (&mut even[j * n..][..n], &mut odd[j * n..][..n]);
                        match (2 * r + j).checked_sub(1).filter(|&l| l < h) {
                            Some(l) => deinterleave(&plane[l * w..][..w], e, o),
                            None => (e.fill(0.0), o.fill(0.0)).0,
                        }
                    }
                    for parity in [&mut *even, &mut *odd] {
                        combine_lines(parity, n);
                    }
                    let first = image * self.blocks() + r * half;
                    for a in 0..4 {
                        let (e, o) = (&even[a * n..][..n], &odd[a * n..][..n]);
                        let at = |b: usize| ((4 * a + b) * self.c_in + c) * columns + first;
                        // d's columns 2q .. 2q + 4 are e[q], o[q], e[q + 1], o[q + 1].
                        let runs: [(&[f32], &[f32], f32); 4] = [
                            (&e[..half], &e[1..], -1.0),
                            (&e[1..], &o[..half], 1.0),
                            (&e[1..], &o[..half], -1.0),
                            (&o[..half], &o[1..], -1.0),
                        ];
                        for (b, (p, q, sign)) in runs.into_iter().enumerate() {
                            let out = &mut v[at(b)..][..half];
                            for i in 0..half {
                                out[i] = p[i] + sign * q[i];
                            }
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
                    let first = image * self.blocks() + r * half;
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

/// Run `n` of `columns` entries in `runs`.
fn run(runs: &[f32], n: usize, columns: usize) -> &[f32] {
    &runs[n * columns..][..columns]
}

/// The even entries of a padded line (zero, then the input's odd columns) and its odd ones (the
/// even columns, then zero): padded entry j is input column j - 1.
fn deinterleave(line: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let half = line.len() / 2;
    even[0] = 0.0;
    odd[half] = 0.0;
    for (k, pair) in line.chunks_exact(2).enumerate() {
        odd[k] = pair[0];
        even[k + 1] = pair[1];
    }
}

/// B^T across four lines of `n` entries each, in place.
fn combine_lines(lines: &mut [f32], n: usize) {
    let (l0, rest) = lines.split_at_mut(n);
    let (l1, rest) = rest.split_at_mut(n);
    let (l2, l3) = rest.split_at_mut(n);
    for i in 0..n {
        let d = [l0[i], l1[i], l2[i], l3[i]];
        [l0[i], l1[i], l2[i], l3[i]] = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
    }
}

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
