//! 2-D convolution on the CPU device as im2col + gemm, with its own backward pass.
//!
//! Burn 0.22.0-pre.3's flex backend takes the convolution's gradients the generic way: the input
//! gradient as a transposed convolution whose col2im scatter runs on one thread, one image after
//! another, and the weight gradient as a convolution of the swapped input with the output
//! gradient as a Ho x Wo kernel (gemm shapes with N = 9, a tenth of peak). A perf profile of a
//! `resnet-mini` training step put a quarter of it in those two outside gemm. Here a tile of
//! images (one image at 32x32, up to 32 at 4x4) is one rayon task: im2col, then one gemm forward;
//! im2col, two gemms and col2im backward, the weight gradient summed over fixed groups of images.
//! Stride-1 layers at 32x32 take the shifted path instead ([`Path::Shifted`]): no column matrix.
//! 3x3 layers of stride 1 and padding 1 on even-sized images with 16 channels or more take
//! Winograd's F(2x2, 3x3) ([`winograd`]): 2.25 times fewer multiplies.
//! On Burn's GPU backends the same convolution is [`cube`]'s: im2col as a kernel, then Burn's
//! matmul.
//! Tested equal to Burn's `conv2d` in value and gradients on every device.
//!
//! Over 500 lines on purpose: the op, its backward pass and its two paths share one tiling and
//! one scratch, and are tested together (a third of the file).

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Dispatch};
use burn::tensor::{Bytes, DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor, Layout};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use winograd::Winograd;

#[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
mod cube;
#[cfg(all(
    feature = "cube-kernels",
    not(feature = "fusion"),
    any(feature = "wgpu", feature = "webgpu")
))]
mod tiled;
mod winograd;
// The page's gemm (see its header); compiled natively for its test against the gemm crate.
#[cfg(any(test, target_arch = "wasm32"))]
mod packed;

/// How many partial sums the weight gradient is split into: the parallelism of the backward
/// pass (more than the cores of most CPUs), bounded so that the partials' memory stays small.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// Columns of a tile's column matrix (images x output pixels) that one gemm takes: the weight is
/// packed once per tile, so with 4x4 outputs a tile of 32 images packs it 32 times less often.
const TILE_COLUMNS: usize = 512;

/// Stride and zero padding, the same on both axes (all this project's convolutions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    /// Outputs along an axis of `n` inputs, for a kernel `kernel` wide.
    fn out(&self, n: usize, kernel: usize) -> usize {
        (n + 2 * self.padding - kernel) / self.stride + 1
    }
}

/// `conv2d(x, weight)` without bias: x [B, C, H, W], weight [Co, C, k, k] -> [B, Co, Ho, Wo].
/// On the CPU device and, in f32, on the GPU backends with dcl's kernels.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, geometry: Geometry) -> Tensor<4> {
    #[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
    if !crate::backend::has_fast_conv(&x.device()) {
        return cube::conv2d(x, weight, geometry);
    }
    let [stride, padding] = [geometry.stride, geometry.padding].map(|v| v as u32);
    Tensor::from_dispatch(<Dispatch as ConvBackend>::im2col_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        stride,
        padding,
    ))
}

#[backend_extension(Flex, Autodiff)]
pub trait ConvBackend: Backend {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: u32,
        padding: u32,
    ) -> FloatTensor<Self>;
}

impl ConvBackend for Flex {
    fn im2col_conv2d(x: FlexTensor, weight: FlexTensor, stride: u32, padding: u32) -> FlexTensor {
        Plan::new(&x, &weight, stride, padding).forward(&x, &weight)
    }
}

impl<C: CheckpointStrategy> ConvBackend for Autodiff<Flex, C> {
    fn im2col_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: u32,
        padding: u32,
    ) -> FloatTensor<Self> {
        let plan = Plan::new(&x.primitive, &weight.primitive, stride, padding);
        let output = plan.forward(&x.primitive, &weight.primitive);
        match ConvGrad
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((plan, x.primitive, weight.primitive), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}

#[derive(Debug)]
struct ConvGrad;

impl Backward<Flex, 2> for ConvGrad {
    type State = (Plan, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, w_node] = ops.parents;
        let (plan, x, weight) = ops.state;
        let output_grad = grads.consume::<Flex>(&ops.node);
        let (x_grad, w_grad) = plan.backward(&x, &weight, &output_grad, x_node.is_some());
        if let (Some(node), Some(grad)) = (x_node, x_grad) {
            grads.register::<Flex>(node.id, grad);
        }
        if let Some(node) = w_node {
            grads.register::<Flex>(node.id, w_grad);
        }
    }
}

/// How a convolution's products are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// A tile's column matrix (im2col), then one gemm: any stride, k*k copies of the input.
    Im2col,
    /// Stride 1 only: the tile zero-padded once into frames of (H + 2p) x (W + 2p), then one
    /// gemm per kernel tap over the frames shifted by that tap (no column matrix, no col2im). Its
    /// outputs fill the frames, padding included: (H + 2p)(W + 2p) / (Ho Wo) times the work.
    Shifted,
    /// Winograd's F(2x2, 3x3) ([`winograd`]): 3x3, stride 1, padding 1, even sizes.
    Winograd,
}

/// The shifted path's frames ([`Path::Shifted`]) beyond this share of padding cost more in
/// wasted multiply-adds and per-tap packing than im2col's copies: measured per layer on one
/// thread (`path_timings`), 32x32 images with 3x3 kernels (1.13) were faster shifted (16 channels:
/// forward 19.2 against 22.5 ms, backward 45.1 against 62.9 ms, batch 128), 16x16 ones (1.27)
/// slower (128 channels: 114 against 110 ms, 245 against 206 ms, batch 64).
const MAX_FRAME_OVERHEAD: f64 = 1.2;

/// The shapes of one convolution; every buffer below is row-major f32.
#[derive(Clone, Copy, Debug)]
struct Plan {
    batch: usize,
    c_in: usize,
    height: usize,
    width: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    h_out: usize,
    w_out: usize,
    path: Path,
}

impl Plan {
    fn new(x: &FlexTensor, weight: &FlexTensor, stride: u32, padding: u32) -> Self {
        let [batch, c_in, height, width] = dims(x);
        let [c_out, w_in, kernel, kernel_w] = dims(weight);
        assert!(
            w_in == c_in && kernel == kernel_w && stride >= 1,
            "im2col conv2d: input {:?} and weight {:?} do not fit",
            x.layout().shape(),
            weight.layout().shape()
        );
        let (stride, padding) = (stride as usize, padding as usize);
        let out = |n: usize| Geometry { stride, padding }.out(n, kernel);
        let plan = Self {
            batch,
            c_in,
            height,
            width,
            c_out,
            kernel,
            stride,
            padding,
            h_out: out(height),
            w_out: out(width),
            path: Path::Im2col,
        };
        match winograd::fits(&plan) {
            true => plan.with_path(Path::Winograd),
            false => plan.with_path(plan.direct_path()),
        }
    }

    /// The path that forms every product itself: shifted frames where their padding is cheap.
    fn direct_path(&self) -> Path {
        let framed = self.frame_len() as f64 / self.pixels_out() as f64;
        match self.stride == 1 && framed <= MAX_FRAME_OVERHEAD {
            true => Path::Shifted,
            false => Path::Im2col,
        }
    }

    fn with_path(self, path: Path) -> Self {
        Self { path, ..self }
    }

    /// Rows of an image's column matrix: one per (input channel, kernel row, kernel column).
    fn patch(&self) -> usize {
        self.c_in * self.taps()
    }

    fn taps(&self) -> usize {
        self.kernel * self.kernel
    }

    fn pixels_out(&self) -> usize {
        self.h_out * self.w_out
    }

    fn image_in(&self) -> usize {
        self.c_in * self.height * self.width
    }

    fn image_out(&self) -> usize {
        self.c_out * self.pixels_out()
    }

    /// Images per gemm: enough that a tile's column matrix has about [`TILE_COLUMNS`] columns, so
    /// the late stages (4x4 and 8x8 outputs) pack each weight once per tile, not once per image.
    fn tile(&self) -> usize {
        (TILE_COLUMNS / self.pixels_out()).clamp(1, self.batch)
    }

    fn forward(&self, x: &FlexTensor, weight: &FlexTensor) -> FlexTensor {
        let (x, weight) = (f32s(x), f32s(weight));
        let tile = self.tile();
        let shape = [self.batch, self.c_out, self.h_out, self.w_out];
        if self.path == Path::Winograd {
            return tensor(Winograd::forward(self, &weight).apply(&x, tile), &shape);
        }
        // SAFETY: each tile's images are written whole: both paths end in `unframe`, which
        // copies every line of every output image.
        let y = unsafe {
            written(self.batch * self.image_out(), |y| {
                y.par_chunks_mut(tile * self.image_out())
                    .zip(x.par_chunks(tile * self.image_in()))
                    .for_each(|(y, x)| match self.path {
                        Path::Im2col => self.im2col_forward(x, &weight, y),
                        Path::Shifted => self.shifted_forward(x, &weight, y),
                        Path::Winograd => unreachable!("F(2x2, 3x3) tiles on its own"),
                    })
            })
        };
        tensor(y, &shape)
    }

    /// The gradients of the input (when asked) and of the weight.
    fn backward(
        &self,
        x: &FlexTensor,
        weight: &FlexTensor,
        output_grad: &FlexTensor,
        want_x: bool,
    ) -> (Option<FlexTensor>, FlexTensor) {
        if self.path == Path::Winograd {
            let dw = match winograd::fits_weight_gradient(self) {
                true => {
                    let dw = winograd::weight_gradient(self, &f32s(x), &f32s(output_grad));
                    tensor(dw, &[self.c_out, self.c_in, 3, 3])
                }
                false => {
                    let direct = self.with_path(self.direct_path());
                    direct.backward(x, weight, output_grad, false).1
                }
            };
            let dx = want_x.then(|| {
                let winograd = Winograd::input_gradient(self, &f32s(weight));
                let dx = winograd.apply(&f32s(output_grad), self.tile());
                tensor(dx, &[self.batch, self.c_in, self.height, self.width])
            });
            return (dx, dw);
        }
        let (x, weight, dy) = (f32s(x), f32s(weight), f32s(output_grad));
        let mut dx = zeros(if want_x { x.len() } else { 0 });
        let (group, tile) = self.weight_grad_groups();
        // The first convolution's input (the images) needs no gradient: skip its col2im.
        let mut dx_groups: Vec<Option<&mut [f32]>> = match want_x {
            true => dx.chunks_mut(group * self.image_in()).map(Some).collect(),
            false => (0..self.batch.div_ceil(group)).map(|_| None).collect(),
        };
        let partials: Vec<Vec<f32>> = dx_groups
            .par_iter_mut()
            .zip(x.par_chunks(group * self.image_in()))
            .zip(dy.par_chunks(group * self.image_out()))
            .map(|((dx, x), dy)| {
                let mut dw = vec![0f32; self.c_out * self.patch()];
                let tiles = x
                    .chunks(tile * self.image_in())
                    .zip(dy.chunks(tile * self.image_out()));
                for (t, (x, dy)) in tiles.enumerate() {
                    let images = tile * self.image_in();
                    let dx = dx.as_deref_mut().map(|dx| &mut dx[t * images..][..x.len()]);
                    match self.path {
                        Path::Im2col => self.im2col_backward(x, dy, &weight, dx, &mut dw),
                        Path::Shifted => self.shifted_backward(x, dy, &weight, dx, &mut dw),
                        Path::Winograd => unreachable!("F(2x2, 3x3) returned above"),
                    }
                }
                dw
            })
            .collect();
        let mut dw = sum_in_order(self.c_out * self.patch(), partials);
        if self.path == Path::Shifted {
            dw = self.taps_to_weight(&dw);
        }
        let k = self.kernel;
        let dx = want_x.then(|| tensor(dx, &[self.batch, self.c_in, self.height, self.width]));
        (dx, tensor(dw, &[self.c_out, self.c_in, k, k]))
    }

    /// The weight gradient's groups: (images a group, images a tile within a group). It is summed
    /// over images in a fixed order, whatever the thread count: each group of images its own
    /// partial sum, the partials added in order ([`sum_in_order`]), so a run repeats bit for bit
    /// and resume is exact. Groups and tiles depend on the shapes alone.
    fn weight_grad_groups(&self) -> (usize, usize) {
        let group = self.batch.div_ceil(WEIGHT_GRAD_GROUPS);
        (group, self.tile().min(group))
    }

    /// Y [Co, t*P] = W [Co, CKK] · cols [CKK, t*P], then each image's block out.
    fn im2col_forward(&self, x: &[f32], weight: &[f32], y: &mut [Uninit]) {
        let columns = x.len() / self.image_in() * self.pixels_out();
        with_scratch(
            [self.patch() * columns, self.c_out * columns],
            |[cols, out]| {
                self.im2col(x, cols, columns);
                let lhs = Mat::rows(weight, self.patch());
                gemm(
                    out,
                    self.c_out,
                    columns,
                    self.patch(),
                    false,
                    lhs,
                    Mat::rows(cols, columns),
                );
                unframe(out, y, self.dims_out(), self.column_framing(columns));
            },
        );
    }

    /// One tile's share of the backward pass: dW [Co, CKK] += dY [Co, t*P] · cols^T [t*P, CKK];
    /// dcols [CKK, t*P] = W^T [CKK, Co] · dY [Co, t*P], scattered back onto dX by col2im.
    fn im2col_backward(
        &self,
        x: &[f32],
        dy: &[f32],
        weight: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (patch, columns) = (self.patch(), x.len() / self.image_in() * self.pixels_out());
        // gemm packs dW's product by reading the column matrix's rows side by side: rows a power
        // of two apart (512 columns, 2 KiB) fall in a few of the L1 cache's sets and evict each
        // other (the packing was 15% of a step). A cache line more a row spreads them.
        let stride = columns + 16;
        with_scratch([patch * stride, self.c_out * columns], |[cols, dy_mat]| {
            self.im2col(x, cols, stride);
            frame(dy, dy_mat, self.dims_out(), self.column_framing(columns));
            let dy_mat = Mat::rows(dy_mat, columns);
            gemm(
                dw,
                self.c_out,
                patch,
                columns,
                true,
                dy_mat,
                Mat::cols(cols, stride),
            );
            if let Some(dx) = dx {
                gemm(
                    cols,
                    patch,
                    columns,
                    self.c_out,
                    false,
                    Mat::cols(weight, patch),
                    dy_mat,
                );
                self.col2im(cols, dx, columns);
            }
        });
    }

    /// Y [Co, frames] = sum over taps of W_tap [Co, C] · X [C, frames shifted by the tap].
    fn shifted_forward(&self, x: &[f32], weight: &[f32], y: &mut [Uninit]) {
        let f = self.frames(x.len() / self.image_in());
        with_scratch(
            [self.c_in * f.len, self.c_out * f.outputs],
            |[x_pad, out]| {
                self.pad(x, x_pad, f);
                for tap in 0..self.taps() {
                    let rhs = Mat::rows(&x_pad[f.shift(tap)..], f.len);
                    let lhs = self.weight_tap(weight, tap, false);
                    gemm(out, self.c_out, f.outputs, self.c_in, tap > 0, lhs, rhs);
                }
                unframe(out, y, self.dims_out(), f.framing(f.outputs, 0));
            },
        );
    }

    /// One tile's share of the backward pass, with dY framed as Y is: dW_tap [Co, C] += dY · X
    /// shifted^T (the frames' padding is zero in dY, so it adds nothing), and dX [C, frames] =
    /// sum over taps of W_tap^T [C, Co] · dY shifted back by the tap. `dw` is [k*k, Co, C].
    fn shifted_backward(
        &self,
        x: &[f32],
        dy: &[f32],
        weight: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let f = self.frames(x.len() / self.image_in());
        // dY's frames start `lead` entries into their rows: each tap's shift back stays inside.
        let (lead, inputs) = (f.shift(self.taps() - 1), f.inputs(self));
        let dy_row = lead + f.len;
        let dx_len = if dx.is_some() { self.c_in * inputs } else { 0 };
        with_scratch(
            [self.c_in * f.len, self.c_out * dy_row, dx_len],
            |[x_pad, dy_pad, dx_pad]| {
                self.pad(x, x_pad, f);
                dy_pad.fill(0.0);
                frame(dy, dy_pad, self.dims_out(), f.framing(dy_row, lead));
                let dw_tap = self.c_out * self.c_in;
                for (tap, dw) in dw.chunks_mut(dw_tap).enumerate() {
                    let lhs = Mat::rows(&dy_pad[lead..], dy_row);
                    let rhs = Mat::cols(&x_pad[f.shift(tap)..], f.len);
                    gemm(dw, self.c_out, self.c_in, f.outputs, true, lhs, rhs);
                }
                let Some(dx) = dx else { return };
                for tap in 0..self.taps() {
                    let rhs = Mat::rows(&dy_pad[lead - f.shift(tap)..], dy_row);
                    let lhs = self.weight_tap(weight, tap, true);
                    gemm(dx_pad, self.c_in, inputs, self.c_out, tap > 0, lhs, rhs);
                }
                let corner = self.padding * (f.wide + 1);
                unframe(dx_pad, dx, self.dims_in(), f.framing(inputs, corner));
            },
        );
    }

    /// The shifted path's frames for a tile of `images` images.
    fn frames(&self, images: usize) -> Frames {
        let wide = self.width + 2 * self.padding;
        let frame = self.frame_len();
        // The last image's trailing rows hold no output: every tap's shifted read stays in `len`.
        let last = (self.h_out - 1) * wide + self.w_out;
        Frames {
            wide,
            frame,
            len: images * frame,
            outputs: (images - 1) * frame + last,
            kernel: self.kernel,
        }
    }

    fn frame_len(&self) -> usize {
        (self.height + 2 * self.padding) * (self.width + 2 * self.padding)
    }

    /// Images [t, C, H, W] into zero-padded frames [C, t*(H+2p)*(W+2p)].
    fn pad(&self, x: &[f32], x_pad: &mut [f32], f: Frames) {
        x_pad.fill(0.0);
        let corner = self.padding * (f.wide + 1);
        frame(x, x_pad, self.dims_in(), f.framing(f.len, corner));
    }

    /// W_tap [Co, C] out of the weight [Co, C, k, k], or its transpose [C, Co].
    fn weight_tap<'a>(&self, weight: &'a [f32], tap: usize, transpose: bool) -> Mat<'a> {
        let mat = Mat {
            data: &weight[tap..],
            col_stride: self.taps() as isize,
            row_stride: self.patch() as isize,
        };
        match transpose {
            true => mat.t(),
            false => mat,
        }
    }

    /// The shifted path's weight gradient [k*k, Co, C] in the weight's layout [Co, C, k, k].
    fn taps_to_weight(&self, by_tap: &[f32]) -> Vec<f32> {
        let per_tap = self.c_out * self.c_in;
        (0..per_tap)
            .flat_map(|i| (0..self.taps()).map(move |tap| by_tap[tap * per_tap + i]))
            .collect()
    }

    fn dims_in(&self) -> [usize; 3] {
        [self.c_in, self.height, self.width]
    }

    fn dims_out(&self) -> [usize; 3] {
        [self.c_out, self.h_out, self.w_out]
    }

    /// Outputs in a column matrix with `columns` columns, image after image.
    fn column_framing(&self, columns: usize) -> Framing {
        Framing {
            row: columns,
            image: self.pixels_out(),
            line: self.w_out,
            offset: 0,
        }
    }

    /// Calls `f(to, from, len)` for each line of a tile's column matrix (`columns` columns,
    /// `images` images) whose inputs lie inside the image: its `len` entries from `to` take the
    /// input pixels `from, from + stride, ...` (the tile's images one after another). The rest
    /// is padding. Bounds are worked out once per row, not per line.
    fn for_each_run(&self, columns: usize, images: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (k, s, p, w, wo) = (
            self.kernel,
            self.stride,
            self.padding,
            self.width,
            self.w_out,
        );
        for row in 0..self.patch() {
            let (c, ki, kj) = (row / (k * k), row / k % k, row % k);
            let (top, bottom) = self.inside(ki, self.height, self.h_out);
            let (left, right) = self.inside(kj, w, wo);
            if left == right {
                continue;
            }
            for i in 0..images {
                let block = row * columns + i * self.pixels_out();
                let image = i * self.image_in() + c * self.height * w;
                for oh in top..bottom {
                    let from = image + (oh * s + ki - p) * w + left * s + kj - p;
                    f(block + oh * wo + left, from, right - left);
                }
            }
        }
    }

    /// Stride 1 with outputs as wide as the input (padding (k - 1) / 2): a column-matrix row's
    /// lines for one image are the input's lines shifted, so one run copies them all; the
    /// entries it takes across a line's edge (or from the next image) are padding, zeroed apart.
    fn whole_blocks(&self) -> bool {
        self.stride == 1 && self.w_out == self.width
    }

    /// With [`Plan::whole_blocks`]: calls `f(cols_range, x_at)` for each row of a tile's column
    /// matrix with `columns` columns and each of its `images` images: the entries over the lines
    /// that lie inside the image, equal to the inputs from `x_at` on (outside the padding).
    fn for_each_block(
        &self,
        images: usize,
        columns: usize,
        mut f: impl FnMut(Range<usize>, usize),
    ) {
        let (k, p, h, w) = (self.kernel, self.padding, self.height, self.width);
        let x_len = images * self.image_in();
        for c in 0..self.c_in {
            for ki in 0..k {
                // Output lines whose input line oh + ki - p lies inside the image.
                let (first, last) = (
                    p.saturating_sub(ki),
                    (h + p).saturating_sub(ki).min(self.h_out),
                );
                for kj in (0..k).filter(|_| first < last) {
                    let row = (c * k + ki) * k + kj;
                    for i in 0..images {
                        let at = row * columns + i * self.pixels_out() + first * w;
                        let x_at = i * self.image_in() + (c * h + first + ki - p) * w + kj;
                        // Where the run would start before the tile or end past it, those
                        // entries are padding: drop them from the run.
                        let skip = p.saturating_sub(x_at);
                        let len = ((last - first) * w)
                            .saturating_sub(skip)
                            .min((x_len + p).saturating_sub(x_at + skip));
                        f(at + skip..at + skip + len, x_at + skip - p);
                    }
                }
            }
        }
    }

    /// The outputs o (of `outputs` along an axis of `len` inputs) whose input o * stride + tap -
    /// padding lies inside the image: first..last.
    fn inside(&self, tap: usize, len: usize, outputs: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let first = p.saturating_sub(tap).div_ceil(s).min(outputs);
        let last = (len + p).saturating_sub(tap).div_ceil(s).min(outputs);
        (first, last.max(first))
    }

    /// Zeroes the entries of a tile's column matrix that are padding: per row and image, the
    /// output lines whose input line is padding as one run each above and below, and the edges of
    /// the others entry by entry across the lines (a call per line cost a tenth of a step).
    fn zero_padding(&self, cols: &mut [f32], columns: usize, images: usize) {
        let (k, wo) = (self.kernel, self.w_out);
        for row in 0..self.patch() {
            let (ki, kj) = (row / k % k, row % k);
            let (top, bottom) = self.inside(ki, self.height, self.h_out);
            let (left, right) = self.inside(kj, self.width, wo);
            for i in 0..images {
                let block = &mut cols[row * columns + i * self.pixels_out()..][..self.pixels_out()];
                if left == right {
                    block.fill(0.0);
                    continue;
                }
                block[..top * wo].fill(0.0);
                block[bottom * wo..].fill(0.0);
                let lines = &mut block[top * wo..bottom * wo];
                for j in (0..left).chain(right..wo) {
                    lines.iter_mut().skip(j).step_by(wo).for_each(|v| *v = 0.0);
                }
            }
        }
    }

    /// Images [t, C, H, W] to their column matrix [C*k*k, t*Ho*Wo], image after image along the
    /// columns (zero where a patch is padding).
    fn im2col(&self, x: &[f32], cols: &mut [f32], columns: usize) {
        let (images, s) = (x.len() / self.image_in(), self.stride);
        if self.whole_blocks() {
            self.for_each_block(images, columns, |to, from| {
                cols[to.clone()].copy_from_slice(&x[from..from + to.len()])
            });
            return self.zero_padding(cols, columns, images);
        }
        self.zero_padding(cols, columns, images);
        self.for_each_run(columns, images, |to, from, len| {
            let out = &mut cols[to..to + len];
            match s {
                1 => out.copy_from_slice(&x[from..from + len]),
                // Pairs of a known size, so the gather compiles to shuffles.
                2 => {
                    let (last, body) = out.split_last_mut().expect("runs are not empty");
                    let x = &x[from..][..2 * len - 1];
                    body.iter_mut()
                        .zip(x.chunks_exact(2))
                        .for_each(|(o, x)| *o = x[0]);
                    *last = x[2 * len - 2];
                }
                // By index: a strided iterator divides to find its length, on every line.
                _ => (out.iter_mut().enumerate()).for_each(|(j, o)| *o = x[from + j * s]),
            }
        });
    }

    /// The adjoint of [`Plan::im2col`]: adds each column-matrix entry back onto its input pixel.
    /// Zeroes the padding's entries of `cols` on the way.
    fn col2im(&self, cols: &mut [f32], dx: &mut [f32], columns: usize) {
        let (images, s) = (dx.len() / self.image_in(), self.stride);
        if self.whole_blocks() {
            self.zero_padding(cols, columns, images);
            return self.for_each_block(images, columns, |from, to| {
                let grad = &cols[from];
                let dx = &mut dx[to..to + grad.len()];
                dx.iter_mut().zip(grad).for_each(|(d, g)| *d += g);
            });
        }
        self.for_each_run(columns, images, |from, to, len| {
            let grad = &cols[from..from + len];
            match s {
                2 => {
                    let (last, body) = grad.split_last().expect("runs are not empty");
                    let dx = &mut dx[to..][..2 * len - 1];
                    body.iter()
                        .zip(dx.chunks_exact_mut(2))
                        .for_each(|(g, d)| d[0] += g);
                    dx[2 * len - 2] += last;
                }
                _ => (grad.iter().enumerate()).for_each(|(j, g)| dx[to + j * s] += g),
            }
        });
    }
}

/// The shifted path's layout: each image a frame of (H + 2p) x (W + 2p), `wide` per line, the
/// tile's frames one after another along a row of `len` (one row per channel).
#[derive(Clone, Copy, Debug)]
struct Frames {
    wide: usize,
    frame: usize,
    len: usize,
    /// Output columns computed: up to the tile's last output pixel.
    outputs: usize,
    kernel: usize,
}

impl Frames {
    /// How far along a frame kernel tap `tap` (row-major in the kernel) reads.
    fn shift(&self, tap: usize) -> usize {
        tap / self.kernel * self.wide + tap % self.kernel
    }

    /// Pixels framed in rows of `row`, from `offset` on.
    fn framing(&self, row: usize, offset: usize) -> Framing {
        Framing {
            row,
            image: self.frame,
            line: self.wide,
            offset,
        }
    }

    /// Columns of the input gradient's frames: up to the tile's last input pixel.
    fn inputs(&self, plan: &Plan) -> usize {
        let p = plan.padding;
        self.len - self.frame + (plan.height - 1 + p) * self.wide + plan.width + p
    }
}

/// Where pixel (line r, column c) of channel `ch` of image `i` lies in a matrix with a row per
/// channel: `offset + ch * row + i * image + r * line + c`.
#[derive(Clone, Copy, Debug)]
struct Framing {
    row: usize,
    image: usize,
    line: usize,
    offset: usize,
}

impl Framing {
    /// For each line of `t` images [t, C, h, w]: where it starts there and in the matrix.
    fn lines(self, t: usize, [c, h, w]: [usize; 3]) -> impl Iterator<Item = (usize, usize)> {
        (0..t * c * h).map(move |n| {
            let (i, ch, r) = (n / (c * h), n / h % c, n % h);
            (
                n * w,
                self.offset + ch * self.row + i * self.image + r * self.line,
            )
        })
    }
}

/// Images [t, C, h, w] into a matrix laid out by `framing` (what it leaves out is untouched).
fn frame(images: &[f32], matrix: &mut [f32], dims: [usize; 3], framing: Framing) {
    let (w, t) = (dims[2], images.len() / dims.iter().product::<usize>());
    for (at, to) in framing.lines(t, dims) {
        matrix[to..to + w].copy_from_slice(&images[at..at + w]);
    }
}

/// The inverse of [`frame`]: images [t, C, h, w] out of a matrix laid out by `framing`. Writes
/// every entry of `images`.
fn unframe<S: Slot>(matrix: &[f32], images: &mut [S], dims: [usize; 3], framing: Framing) {
    let (w, t) = (dims[2], images.len() / dims.iter().product::<usize>());
    for (at, from) in framing.lines(t, dims) {
        let line = images[at..at + w].iter_mut();
        line.zip(&matrix[from..from + w])
            .for_each(|(s, v)| s.set(*v));
    }
}

/// An output entry not yet written.
pub(super) type Uninit = std::mem::MaybeUninit<f32>;

/// Where an op writes a value: an entry already set, or one never yet written.
trait Slot {
    fn set(&mut self, value: f32);
}

impl Slot for f32 {
    fn set(&mut self, value: f32) {
        *self = value;
    }
}

impl Slot for Uninit {
    fn set(&mut self, value: f32) {
        self.write(value);
    }
}

/// An op's output of `len` entries that `write` fills, each once (the conv forward passes, batch
/// norm's outputs and gradients): no zeroing first, which was half the step's memset (`perf`).
///
/// # Safety
/// `write` must write every one of the `len` entries.
pub(super) unsafe fn written(len: usize, write: impl FnOnce(&mut [Uninit])) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    write(&mut values.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `write` wrote every entry.
    unsafe { values.set_len(len) };
    values
}

thread_local! {
    /// Each thread's scratch, kept across calls and steps: after the first step it has the
    /// largest layer's size, and no tile allocates (or page-faults on) a fresh buffer again.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on buffers of `lens` from this thread's scratch. They hold what an earlier call left:
/// every user writes each entry before reading it. `f` must not run rayon tasks (a task of the
/// same kind could be stolen into this thread while the scratch is lent).
fn with_scratch<const N: usize, R>(lens: [usize; N], f: impl FnOnce([&mut [f32]; N]) -> R) -> R {
    SCRATCH.with_borrow_mut(|scratch| {
        let total = lens.iter().sum();
        if scratch.len() < total {
            scratch.resize(total, 0.0);
        }
        let mut rest = &mut scratch[..];
        f(lens.map(|len| {
            let (buffer, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            buffer
        }))
    })
}

/// A matrix operand: its data and the strides of its columns and rows.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    col_stride: isize,
    row_stride: isize,
}

impl<'a> Mat<'a> {
    /// Row-major, rows `stride` apart.
    fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            col_stride: 1,
            row_stride: stride as isize,
        }
    }

    /// The transpose of a row-major matrix with rows `stride` apart.
    fn cols(data: &'a [f32], stride: usize) -> Self {
        Self::rows(data, stride).t()
    }

    fn t(self) -> Self {
        Self {
            col_stride: self.row_stride,
            row_stride: self.col_stride,
            ..self
        }
    }

    /// Whether the data holds every entry of a `rows` x `cols` matrix with these strides.
    #[cfg(any(test, not(target_arch = "wasm32")))]
    fn holds(&self, rows: usize, cols: usize) -> bool {
        let last = (rows.max(1) - 1) * self.row_stride as usize
            + (cols.max(1) - 1) * self.col_stride as usize;
        self.data.len() > last
    }
}

/// dst [m, n] (row-major) = lhs [m, k] · rhs [k, n], or += when `accumulate`. Single-threaded:
/// the parallelism is across images. The page multiplies with [`packed`]'s kernel, natively
/// the gemm crate's.
fn gemm(dst: &mut [f32], m: usize, n: usize, k: usize, accumulate: bool, lhs: Mat, rhs: Mat) {
    #[cfg(target_arch = "wasm32")]
    packed::gemm(dst, m, n, k, accumulate, lhs, rhs);
    #[cfg(not(target_arch = "wasm32"))]
    crate_gemm(dst, m, n, k, accumulate, lhs, rhs);
}

/// [`gemm`] by the gemm crate.
#[cfg(any(test, not(target_arch = "wasm32")))]
fn crate_gemm(dst: &mut [f32], m: usize, n: usize, k: usize, accumulate: bool, lhs: Mat, rhs: Mat) {
    assert!(dst.len() >= m * n && lhs.holds(m, k) && rhs.holds(k, n));
    // SAFETY: the asserts above bound every index gemm derives from (m, n, k) and the strides
    // (non-negative: every Mat is built from usize strides).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride,
            lhs.row_stride,
            rhs.data.as_ptr(),
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn dims(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    assert_eq!(shape.num_dims(), 4, "im2col conv2d takes 4-d tensors");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// The weight gradient's per-group partial sums ([`Plan::weight_grad_groups`]) added in order.
fn sum_in_order(len: usize, partials: Vec<Vec<f32>>) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for partial in partials {
        sum.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
    sum
}

/// The tensor's values, contiguous (a copy only when it is a strided view).
pub(super) fn f32s(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "im2col conv2d runs in f32");
    match t.as_slice::<f32>() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(t.to_contiguous().storage::<f32>().to_vec()),
    }
}

/// `len` zeros, written by the rayon pool. An op's output made with `vec![0.0; len]` was zeroed
/// by calloc on the calling thread while the pool waited: 2.4% of a step's CPU samples, on the
/// main thread alone (`perf script`, per thread). With one thread (the page) calloc stays: it
/// skips memory the allocator knows to be zero, and the page's step was 1-4% slower without it.
pub(super) fn zeros(len: usize) -> Vec<f32> {
    if rayon::current_num_threads() == 1 {
        return vec![0.0; len];
    }
    let mut values = Vec::with_capacity(len);
    (values.spare_capacity_mut().par_chunks_mut(1 << 14))
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the loop above wrote each of the first `len` entries.
    unsafe { values.set_len(len) };
    values
}

pub(super) fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(Shape::from(shape.to_vec())),
        DType::F32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::Distribution;

    /// The largest difference of `a` (on any device) from `b` (on the CPU).
    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let a = Tensor::<4>::from_data(a.into_data(), &b.device());
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Value and both gradients against Burn's `conv2d` on the CPU, for every kernel/stride/padding
    /// the ResNets use and a few they do not, on odd image sizes: on the CPU device (im2col or
    /// shifted, then gemm) and on wgpu (the im2col kernel, then Burn's matmul). The reference is the
    /// CPU's because Burn's wgpu convolution (this pin, autotuned) gives a zero input gradient
    /// for the 1x1 stride-2 case below (the ResNets' shortcuts).
    #[test]
    fn equals_burns_conv2d_with_gradients() {
        for device in crate::model::tests::training_devices() {
            equals_burns_conv2d_on(&device);
        }
    }

    fn equals_burns_conv2d_on(device: &burn::tensor::Device) {
        let cpu = crate::backend::cpu().autodiff();
        cpu.seed(7);
        let random =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &cpu);
        let on = |t: &Tensor<4>, grad: bool| {
            let t = Tensor::<4>::from_data(t.to_data(), device);
            if grad {
                t.require_grad()
            } else {
                t
            }
        };
        // The second shape puts several images in a tile, and tiles of unequal size in a group;
        // the last has a padding wider than its images.
        for (kernel, stride, padding, x_grad, shape) in [
            (3, 1, 1, true, [3, 4, 9, 7]),
            (3, 2, 1, true, [3, 4, 9, 7]),
            (1, 2, 0, true, [3, 4, 9, 7]),
            (1, 1, 0, true, [3, 4, 9, 7]),
            (3, 1, 0, true, [3, 4, 9, 7]),
            (5, 2, 2, true, [3, 4, 9, 7]),
            (3, 1, 1, false, [3, 4, 9, 7]),
            (3, 1, 1, true, [40, 2, 11, 11]),
            (3, 2, 1, true, [21, 4, 5, 4]),
            (1, 1, 0, false, [21, 4, 4, 4]),
            (5, 1, 2, true, [3, 2, 5, 1]),
        ] {
            let x = random(shape);
            let x = if x_grad { x.require_grad() } else { x };
            let weight = random([5, shape[1], kernel, kernel]).require_grad();
            let (x_ours, w_ours) = (on(&x, x_grad), on(&weight, true));
            let ours = conv2d(x_ours.clone(), w_ours.clone(), Geometry { stride, padding });
            let options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
            let burns = burn::tensor::module::conv2d(x.clone(), weight.clone(), None, options);
            let case = format!("{device:?}: k{kernel} s{stride} p{padding} {shape:?}");
            assert_eq!(ours.dims(), burns.dims(), "{case}");
            assert!(
                max_diff(ours.clone(), burns.clone()) < 1e-4,
                "value, {case}"
            );
            let r = random(ours.dims());
            let (g_ours, g_burn) = (
                (ours * on(&r, false)).sum().backward(),
                (burns * r).sum().backward(),
            );
            let (dw_ours, dw_burn) = (w_ours.grad(&g_ours).unwrap(), weight.grad(&g_burn).unwrap());
            assert!(max_diff(dw_ours, dw_burn) < 1e-3, "weight gradient, {case}");
            match x_grad {
                true => {
                    let (a, b) = (x_ours.grad(&g_ours).unwrap(), x.grad(&g_burn).unwrap());
                    assert!(max_diff(a, b) < 1e-4, "input gradient, {case}");
                }
                false => assert!(x_ours.grad(&g_ours).is_none()),
            }
        }
    }

    fn random(shape: &[usize], seed: u64) -> FlexTensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let len = shape.iter().product();
        tensor((0..len).map(|_| rng.gen_range(-1.0..1.0)).collect(), shape)
    }

    /// Largest difference over largest magnitude of `reference`.
    fn relative_error(reference: &FlexTensor, other: &FlexTensor) -> f32 {
        let (a, b) = (f32s(reference), f32s(other));
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.5, "a reference of zeros proves nothing");
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// `other`'s value, weight gradient and input gradient against `reference`'s, each within its
    /// relative tolerance; returns `other`'s weight gradient.
    fn assert_paths_agree(
        [reference, other]: [Plan; 2],
        [x, weight, dy]: [&FlexTensor; 3],
        [value, weight_grad, input_grad]: [f32; 3],
        case: &str,
    ) -> FlexTensor {
        let y = [reference, other].map(|p| p.forward(x, weight));
        assert!(relative_error(&y[0], &y[1]) < value, "value, {case}");
        let [(dx_a, dw_a), (dx_b, dw_b)] =
            [reference, other].map(|p| p.backward(x, weight, dy, true));
        assert!(
            relative_error(&dw_a, &dw_b) < weight_grad,
            "weight gradient, {case}"
        );
        let (dx_a, dx_b) = (dx_a.unwrap(), dx_b.unwrap());
        assert!(
            relative_error(&dx_a, &dx_b) < input_grad,
            "input gradient, {case}"
        );
        dw_b
    }

    /// The shifted path (stride 1) against im2col, itself tested against Burn above: value and
    /// both gradients, on odd shapes and paddings, with one image per tile and with several.
    #[test]
    fn shifted_path_equals_im2col() {
        for (kernel, padding, shape) in [
            (3, 1, [3, 5, 9, 7]),
            (3, 0, [2, 3, 8, 11]),
            (5, 2, [3, 2, 7, 6]),
            (1, 0, [3, 4, 5, 3]),
            (3, 2, [2, 3, 4, 5]),
            (3, 1, [40, 3, 5, 4]),
            (3, 1, [2, 17, 32, 32]),
        ] {
            let x = random(&shape, 1);
            let weight = random(&[6, shape[1], kernel, kernel], 2);
            let plan = Plan::new(&x, &weight, 1, padding as u32);
            let (reference, shifted) =
                (plan.with_path(Path::Im2col), plan.with_path(Path::Shifted));
            let dy = random(&[shape[0], 6, plan.h_out, plan.w_out], 3);
            let case = format!("k{kernel} p{padding} {shape:?}");
            let tolerances = [1e-6; 3];
            let dw_b =
                assert_paths_agree([reference, shifted], [&x, &weight, &dy], tolerances, &case);
            let (_, dw_c) = shifted.backward(&x, &weight, &dy, false);
            assert_eq!(
                f32s(&dw_b),
                f32s(&dw_c),
                "without the input gradient, {case}"
            );
        }
    }

    /// Winograd's F(2x2, 3x3) against im2col: value and both gradients, with one image per tile
    /// and with several, channels in and out unequal, down to 2x2 images, the weight gradient
    /// both by F(2x2, 3x3)'s adjoint (16 blocks an image or more) and directly. The errors are
    /// F(2x2, 3x3)'s own rounding: 1.3e-7 to 6.2e-7 of the reference's largest entry here.
    #[test]
    fn winograd_path_equals_im2col() {
        for (c_out, shape) in [
            (6, [3, 5, 8, 6]),
            (5, [3, 4, 8, 10]),
            (4, [40, 3, 4, 4]),
            (3, [2, 7, 2, 2]),
            (16, [2, 16, 32, 32]),
            (40, [9, 33, 8, 8]),
        ] {
            let x = random(&shape, 1);
            let weight = random(&[c_out, shape[1], 3, 3], 2);
            let plan = Plan::new(&x, &weight, 1, 1);
            let (reference, winograd) =
                (plan.with_path(Path::Im2col), plan.with_path(Path::Winograd));
            let case = format!("{c_out} <- {shape:?}");
            let dy = random(&[shape[0], c_out, plan.h_out, plan.w_out], 3);
            let tolerances = [1e-5, 1e-6, 1e-5];
            assert_paths_agree([reference, winograd], [&x, &weight, &dy], tolerances, &case);
        }
        // Only 3x3 layers of stride 1 and padding 1, even sizes and 16 channels or more take it.
        for (shape, c_out, stride, padding, expected) in [
            ([2, 32, 8, 8], 32, 1, 1, true),
            ([2, 32, 8, 8], 8, 1, 1, false),
            ([2, 32, 9, 8], 32, 1, 1, false),
            ([2, 32, 8, 8], 32, 2, 1, false),
            ([2, 32, 8, 8], 32, 1, 0, false),
        ] {
            let x = random(&shape, 1);
            let weight = random(&[c_out, shape[1], 3, 3], 2);
            let plan = Plan::new(&x, &weight, stride, padding);
            let case = format!("{c_out} <- {shape:?} s{stride} p{padding}");
            assert_eq!(plan.path == Path::Winograd, expected, "{case}");
        }
    }

    /// Per-layer times of both paths on the ResNets' stride-1 shapes (run with --ignored).
    #[test]
    #[ignore]
    fn path_timings() {
        for (batch, c, hw) in [
            (128, 3, 32),
            (128, 16, 32),
            (128, 32, 16),
            (128, 64, 8),
            (128, 128, 4),
            (64, 64, 32),
            (64, 128, 16),
            (64, 256, 8),
            (64, 512, 4),
        ] {
            let x = random(&[batch, c, hw, hw], 1);
            let c_out = if c == 3 { 16 } else { c };
            let weight = random(&[c_out, c, 3, 3], 2);
            let plan = Plan::new(&x, &weight, 1, 1);
            let dy = random(&[batch, c_out, hw, hw], 3);
            for path in [Path::Im2col, Path::Shifted, Path::Winograd] {
                let p = plan.with_path(path);
                let time = |f: &dyn Fn()| {
                    (0..5)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            f();
                            t.elapsed().as_secs_f64() * 1e3
                        })
                        .fold(f64::MAX, f64::min)
                };
                let fwd = time(&|| {
                    p.forward(&x, &weight);
                });
                let bwd = time(&|| {
                    p.backward(&x, &weight, &dy, c != 3);
                });
                println!(
                    "b{batch} c{c} {hw}x{hw} {path:?}: forward {fwd:.2} ms, backward {bwd:.2} ms"
                );
            }
        }
    }

    /// Without autodiff (evaluation) the same forward runs.
    #[test]
    fn runs_without_autodiff() {
        let device = crate::backend::cpu();
        let x = Tensor::<4>::ones([2, 3, 5, 5], &device);
        let weight = Tensor::<4>::ones([2, 3, 3, 3], &device);
        let y = conv2d(
            x,
            weight,
            Geometry {
                stride: 1,
                padding: 1,
            },
        );
        let values: Vec<f32> = y.into_data().try_to_vec().unwrap();
        // A corner sees 2x2 of the 3x3 window, the centre all of it, over 3 channels.
        assert_eq!((values[0], values[6]), (12.0, 27.0));
    }
}
