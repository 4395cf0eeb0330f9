//! 2-D convolution on the CPU device as im2col + gemm, with its own backward pass.
//!
//! Burn 0.22.0-pre.3's flex backend takes the convolution's gradients the generic way: the input
//! gradient as a transposed convolution whose col2im scatter runs on one thread, one image after
//! another, and the weight gradient as a convolution of the swapped input with the output
//! gradient as a Ho x Wo kernel (gemm shapes with N = 9, a tenth of peak). A perf profile of a
//! `resnet-mini` training step put a quarter of it in those two outside gemm. Here a tile of
//! images (one image at 32x32, up to 32 at 4x4) is one rayon task: im2col, then one gemm forward;
//! im2col, two gemms and col2im backward, the weight gradient summed over fixed groups of images.
//! Only the CPU device takes this path (see `backend::has_fast_conv`); it is tested equal to
//! Burn's `conv2d` in value and gradients.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Dispatch};
use burn::tensor::{Bytes, DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor, Layout};
use rayon::prelude::*;

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

/// `conv2d(x, weight)` without bias: x [B, C, H, W], weight [Co, C, k, k] -> [B, Co, Ho, Wo].
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, geometry: Geometry) -> Tensor<4> {
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
        let out = |n: usize| (n + 2 * padding - kernel) / stride + 1;
        Self {
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
        }
    }

    /// Rows of an image's column matrix: one per (input channel, kernel row, kernel column).
    fn patch(&self) -> usize {
        self.c_in * self.kernel * self.kernel
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
        let mut y = vec![0f32; self.batch * self.image_out()];
        y.par_chunks_mut(tile * self.image_out())
            .zip(x.par_chunks(tile * self.image_in()))
            .for_each_init(
                || Tile::new(self, tile),
                |buffers, (y, x)| {
                    let columns = self.im2col(x, &mut buffers.cols);
                    // Y [Co, t*P] = W [Co, CKK] · cols [CKK, t*P], then each image's block out.
                    let out = &mut buffers.out[..self.c_out * columns];
                    gemm(
                        out,
                        self.c_out,
                        columns,
                        self.patch(),
                        false,
                        Mat::rows(&weight, self.patch()),
                        Mat::rows(&buffers.cols, columns),
                    );
                    self.scatter_images(out, y, columns);
                },
            );
        tensor(y, &[self.batch, self.c_out, self.h_out, self.w_out])
    }

    /// The gradients of the input (when asked) and of the weight.
    fn backward(
        &self,
        x: &FlexTensor,
        weight: &FlexTensor,
        output_grad: &FlexTensor,
        want_x: bool,
    ) -> (Option<FlexTensor>, FlexTensor) {
        let (x, weight, dy) = (f32s(x), f32s(weight), f32s(output_grad));
        let patch = self.patch();
        let mut dx = vec![0f32; if want_x { x.len() } else { 0 }];
        // The weight gradient is summed over images in a fixed order, whatever the thread count:
        // each group of images its own partial sum, the partials added in order (so a run repeats
        // bit for bit, and resume is exact). Groups and tiles depend on the shapes alone.
        let group = self.batch.div_ceil(WEIGHT_GRAD_GROUPS);
        let tile = self.tile().min(group);
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
                let (mut dw, mut buffers) = (vec![0f32; self.c_out * patch], Tile::new(self, tile));
                let tiles = x
                    .chunks(tile * self.image_in())
                    .zip(dy.chunks(tile * self.image_out()));
                for (t, (x, dy)) in tiles.enumerate() {
                    let columns = self.im2col(x, &mut buffers.cols);
                    let dy_tile = &mut buffers.out[..self.c_out * columns];
                    self.gather_images(dy, dy_tile, columns);
                    // dW [Co, CKK] += dY [Co, t*P] · cols^T [t*P, CKK]
                    gemm(
                        &mut dw,
                        self.c_out,
                        patch,
                        columns,
                        true,
                        Mat::rows(dy_tile, columns),
                        Mat::cols(&buffers.cols, columns),
                    );
                    if let Some(dx) = dx.as_deref_mut() {
                        // dcols [CKK, t*P] = W^T [CKK, Co] · dY [Co, t*P], then scattered back.
                        gemm(
                            &mut buffers.cols,
                            patch,
                            columns,
                            self.c_out,
                            false,
                            Mat::cols(&weight, patch),
                            Mat::rows(dy_tile, columns),
                        );
                        let images = tile * self.image_in();
                        self.col2im(&buffers.cols, &mut dx[t * images..][..x.len()], columns);
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; self.c_out * patch];
        for partial in partials {
            dw.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
        }
        let k = self.kernel;
        let dx = want_x.then(|| tensor(dx, &[self.batch, self.c_in, self.height, self.width]));
        (dx, tensor(dw, &[self.c_out, self.c_in, k, k]))
    }

    /// Calls `f(cols_at, x_at, len)` for each run of an image's block of a column matrix with
    /// `columns` columns: `len` entries from `cols_at` on, taken from the input pixels
    /// `x_at, x_at + stride, ...` (the rest of the block is padding, zero).
    fn for_each_run(&self, columns: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (w, wo) = (self.width, self.w_out);
        for c in 0..self.c_in {
            for ki in 0..k {
                for kj in 0..k {
                    let row = (c * k + ki) * k + kj;
                    // Output columns whose input column ow * s + kj - p lies inside the image.
                    let first = p.saturating_sub(kj).div_ceil(s);
                    let last = (w + p - kj).div_ceil(s).min(wo);
                    if first >= last {
                        continue;
                    }
                    for oh in 0..self.h_out {
                        let Some(ih) = (oh * s + ki).checked_sub(p).filter(|&i| i < self.height)
                        else {
                            continue;
                        };
                        let x_at = (c * self.height + ih) * w + first * s + kj - p;
                        f(row * columns + oh * wo + first, x_at, last - first);
                    }
                }
            }
        }
    }

    /// Images [t, C, H, W] to their column matrix [C*k*k, t*Ho*Wo], image after image along the
    /// columns (zero where a patch is padding). Returns the number of columns.
    fn im2col(&self, images: &[f32], cols: &mut [f32]) -> usize {
        let columns = images.len() / self.image_in() * self.pixels_out();
        let cols = &mut cols[..self.patch() * columns];
        cols.fill(0.0);
        let s = self.stride;
        for (i, x) in images.chunks(self.image_in()).enumerate() {
            let block = i * self.pixels_out();
            self.for_each_run(columns, |at, x_at, len| {
                let out = &mut cols[block + at..][..len];
                match s {
                    1 => out.copy_from_slice(&x[x_at..x_at + len]),
                    _ => out
                        .iter_mut()
                        .zip(x[x_at..].iter().step_by(s))
                        .for_each(|(o, i)| *o = *i),
                }
            });
        }
        columns
    }

    /// The adjoint of [`Plan::im2col`]: adds each column-matrix entry back onto its input pixel.
    fn col2im(&self, cols: &[f32], images: &mut [f32], columns: usize) {
        let s = self.stride;
        for (i, dx) in images.chunks_mut(self.image_in()).enumerate() {
            let block = i * self.pixels_out();
            self.for_each_run(columns, |at, x_at, len| {
                let grad = &cols[block + at..][..len];
                match s {
                    1 => dx[x_at..x_at + len]
                        .iter_mut()
                        .zip(grad)
                        .for_each(|(d, g)| *d += g),
                    _ => dx[x_at..]
                        .iter_mut()
                        .step_by(s)
                        .zip(grad)
                        .for_each(|(d, g)| *d += g),
                }
            });
        }
    }

    /// A tile's output matrix [Co, t*P] to its images [t, Co, P].
    fn scatter_images(&self, matrix: &[f32], images: &mut [f32], columns: usize) {
        let pixels = self.pixels_out();
        for (i, image) in images.chunks_mut(self.image_out()).enumerate() {
            for (co, row) in image.chunks_mut(pixels).enumerate() {
                row.copy_from_slice(&matrix[co * columns + i * pixels..][..pixels]);
            }
        }
    }

    /// The inverse of [`Plan::scatter_images`]: images [t, Co, P] to the matrix [Co, t*P].
    fn gather_images(&self, images: &[f32], matrix: &mut [f32], columns: usize) {
        let pixels = self.pixels_out();
        for (i, image) in images.chunks(self.image_out()).enumerate() {
            for (co, row) in image.chunks(pixels).enumerate() {
                matrix[co * columns + i * pixels..][..pixels].copy_from_slice(row);
            }
        }
    }
}

/// One task's buffers for a tile of `t` images: the column matrix [C*k*k, t*P] (reused for its
/// gradient) and the output matrix [Co, t*P] (or its gradient).
struct Tile {
    cols: Vec<f32>,
    out: Vec<f32>,
}

impl Tile {
    fn new(plan: &Plan, images: usize) -> Self {
        let columns = images * plan.pixels_out();
        Self {
            cols: vec![0f32; plan.patch() * columns],
            out: vec![0f32; plan.c_out * columns],
        }
    }
}

/// A matrix operand: its data and the strides of its columns and rows.
struct Mat<'a> {
    data: &'a [f32],
    col_stride: isize,
    row_stride: isize,
}

impl<'a> Mat<'a> {
    /// Row-major with `width` columns.
    fn rows(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            col_stride: 1,
            row_stride: width as isize,
        }
    }

    /// The transpose of a row-major matrix with `width` columns.
    fn cols(data: &'a [f32], width: usize) -> Self {
        Self {
            data,
            col_stride: width as isize,
            row_stride: 1,
        }
    }
}

/// dst [m, n] (row-major) = lhs [m, k] · rhs [k, n], or += when `accumulate`. Single-threaded:
/// the parallelism is across images.
fn gemm(dst: &mut [f32], m: usize, n: usize, k: usize, accumulate: bool, lhs: Mat, rhs: Mat) {
    assert!(dst.len() >= m * n && lhs.data.len() >= m * k && rhs.data.len() >= k * n);
    // SAFETY: the asserts above bound every index gemm derives from (m, n, k) and the strides,
    // which describe row-major matrices of those shapes or their transposes.
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

/// The tensor's values, contiguous (a copy only when it is a strided view).
pub(super) fn f32s(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "im2col conv2d runs in f32");
    match t.as_slice::<f32>() {
        Some(values) => std::borrow::Cow::Borrowed(values),
        None => std::borrow::Cow::Owned(t.to_contiguous().storage::<f32>().to_vec()),
    }
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

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Value and both gradients against Burn's `conv2d`, for every kernel/stride/padding the
    /// ResNets use and a few they do not, on odd image sizes.
    #[test]
    fn equals_burns_conv2d_with_gradients() {
        let device = crate::backend::cpu().autodiff();
        device.seed(7);
        let random =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        // The second shape puts several images in a tile, and tiles of unequal size in a group.
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
        ] {
            let x = random(shape);
            let x = if x_grad { x.require_grad() } else { x };
            let weight = random([5, shape[1], kernel, kernel]).require_grad();
            let geometry = Geometry { stride, padding };
            let ours = conv2d(x.clone(), weight.clone(), geometry);
            let options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
            let burns = burn::tensor::module::conv2d(x.clone(), weight.clone(), None, options);
            assert_eq!(ours.dims(), burns.dims(), "k{kernel} s{stride} p{padding}");
            assert!(max_diff(ours.clone(), burns.clone()) < 1e-4);
            let r = random(ours.dims());
            let (g_ours, g_burn) = (
                (ours * r.clone()).sum().backward(),
                (burns * r).sum().backward(),
            );
            let (w_ours, w_burn) = (weight.grad(&g_ours).unwrap(), weight.grad(&g_burn).unwrap());
            assert!(
                max_diff(w_ours, w_burn) < 1e-3,
                "weight gradient, k{kernel} s{stride} p{padding}"
            );
            match x_grad {
                true => {
                    let (a, b) = (x.grad(&g_ours).unwrap(), x.grad(&g_burn).unwrap());
                    assert!(
                        max_diff(a, b) < 1e-4,
                        "input gradient, k{kernel} s{stride} p{padding}"
                    );
                }
                false => assert!(x.grad(&g_ours).is_none()),
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
