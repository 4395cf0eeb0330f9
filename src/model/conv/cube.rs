//! The convolution on Burn's GPU backends: im2col as a CubeCL kernel, then Burn's matmul (on a
//! software GPU, [`super::tiled`]'s kernel instead).
//!
//! Burn's own convolution takes about twenty dispatches a layer a training step (the weight
//! gradient as a direct convolution, the input gradient as a transposed one through NCHW/NHWC
//! copies and a weight flip): most of the ~190 slices and copies of a 395-dispatch step. Here a
//! layer is two dispatches forward (im2col, matmul) and about three backward (Burn's matmul's
//! two, then col2im, im2col's gradient).
//!
//! Only im2col is an op of our own (with col2im its backward pass); the matmul, the reshapes and
//! their gradients are Burn's tensor ops, so its matmul kernels are compiled once, in Burn's
//! crates (calling them on CubeCL's tensors from here compiled a second copy: 2.2 MB of the
//! page's module). The column matrix is [C k k, B Ho Wo]: the matmul's output [Co, B Ho Wo] is
//! the convolution's [B, Co, Ho, Wo] with its first two dimensions swapped, handed on as that
//! strided view (the batch-norm kernels and im2col read their inputs by strides).

use super::Geometry;
use crate::model::cube::{elementwise, empty};
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
#[cfg(feature = "cuda")]
use burn::backend::Cuda;
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
use burn::backend::Wgpu;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Dispatch, TensorMetadata};
use burn::tensor::{Shape, Tensor as BurnTensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;

/// [`super::conv2d`] on a GPU backend: cols = im2col(x) [C k k, B Ho Wo], then
/// W [Co, C k k] · cols.
pub fn conv2d(x: BurnTensor<4>, weight: BurnTensor<4>, geometry: Geometry) -> BurnTensor<4> {
    let [batch, c_in, height, width] = x.dims();
    let [c_out, _, kernel, _] = weight.dims();
    let Geometry { stride, padding } = geometry;
    let cols = BurnTensor::<2>::from_dispatch(<Dispatch as ColumnsBackend>::im2col(
        x.into_dispatch(),
        kernel as u32,
        stride as u32,
        padding as u32,
    ));
    let y = product(weight.reshape([c_out, c_in * kernel * kernel]), cols);
    let [h_out, w_out] = [height, width].map(|n| geometry.out(n, kernel));
    y.reshape([c_out, batch, h_out, w_out]).swap_dims(0, 1)
}

/// W · cols: on a software GPU by [`super::tiled`]'s kernel, elsewhere by Burn's matmul.
fn product(weight: BurnTensor<2>, cols: BurnTensor<2>) -> BurnTensor<2> {
    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    if crate::backend::software_gpu(&cols.device()) {
        return super::tiled::matmul(weight, cols);
    }
    weight.matmul(cols)
}

#[backend_extension(
    Wgpu: cfg(any(feature = "wgpu", feature = "webgpu")),
    Cuda: cfg(feature = "cuda"),
    Autodiff
)]
pub trait ColumnsBackend: Backend {
    /// The column matrix [C k k, B Ho Wo] of x [B, C, H, W] for a k x k kernel.
    fn im2col(x: FloatTensor<Self>, kernel: u32, stride: u32, padding: u32) -> FloatTensor<Self>;
}

/// im2col's backward pass: each input pixel's gradient summed over the columns it went into.
pub trait ColumnsBackward: ColumnsBackend {
    fn col2im(dcols: FloatTensor<Self>, columns: &Columns) -> FloatTensor<Self>;
}

/// What im2col's backward pass needs to know of its input.
#[derive(Clone, Debug)]
pub struct Columns {
    input: Shape,
    kernel: usize,
    geometry: Geometry,
}

impl Columns {
    fn new(input: Shape, kernel: u32, stride: u32, padding: u32) -> Self {
        let [stride, padding] = [stride, padding].map(|v| v as usize);
        Self {
            input,
            kernel: kernel as usize,
            geometry: Geometry { stride, padding },
        }
    }

    fn out(&self, n: usize) -> usize {
        self.geometry.out(n, self.kernel)
    }
}

/// cols [C k k, B Ho Wo] of x [B, C, H, W] (read by its strides): row (c, ky, kx), column
/// (b, oy, ox) holds x[b, c, oy s + ky - p, ox s + kx - p], zero in the padding. A thread a line
/// of Wo columns: the index arithmetic (integer divisions, slow on the GPUs that emulate them)
/// once a line, not once an entry.
#[cube(launch)]
fn im2col_kernel(
    x: &Tensor<f32>,
    cols: &mut Tensor<f32>,
    kernel: u32,
    stride: u32,
    padding: u32,
    h_out: u32,
    w_out: u32,
) {
    let line = ABSOLUTE_POS;
    let (kernel, stride, padding) = (kernel as usize, stride as usize, padding as usize);
    let (h_out, w_out) = (h_out as usize, w_out as usize);
    if line >= cols.len() / w_out {
        terminate!();
    }
    let per_row = x.shape(0) * h_out;
    let (row, rest) = (line / per_row, line % per_row);
    let (b, oy) = (rest / h_out, rest % h_out);
    let taps = kernel * kernel;
    let (c, tap) = (row / taps, row % taps);
    let (ky, kx) = (tap / kernel, tap % kernel);
    // In the padded image's coordinates, so that nothing goes below zero.
    let y = oy * stride + ky;
    let inside = y >= padding && y < x.shape(2) + padding;
    let start = b * x.stride(0) + c * x.stride(1) + (y - padding) * x.stride(2);
    let out = row * cols.shape(1) + rest * w_out;
    for ox in 0..w_out {
        let x_at = ox * stride + kx;
        let mut value = 0.0f32;
        if inside && x_at >= padding && x_at < x.shape(3) + padding {
            value = x[start + (x_at - padding) * x.stride(3)];
        }
        cols[out + ox] = value;
    }
}

/// dx [B, C, H, W] (contiguous) from dcols [C k k, B Ho Wo]: each input pixel gathers the
/// entries of the columns it was copied into (no scattered adds, no atomics). A thread a line
/// of W pixels, as in [`im2col_kernel`].
#[cube(launch)]
fn col2im_kernel(
    dcols: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    kernel: u32,
    stride: u32,
    padding: u32,
    h_out: u32,
    w_out: u32,
) {
    let line = ABSOLUTE_POS;
    let (kernel, stride, padding) = (kernel as usize, stride as usize, padding as usize);
    let (h_out, w_out) = (h_out as usize, w_out as usize);
    let (channels, height, width) = (dx.shape(1), dx.shape(2), dx.shape(3));
    if line >= dx.len() / width {
        terminate!();
    }
    let (image, y) = (line / height, line % height);
    let (b, c) = (image / channels, image % channels);
    // Padded coordinates again: the tap (ky, kx) of output (oy, ox) read y + p = oy s + ky.
    let y = y + padding;
    let columns = dcols.shape(1);
    let column = b * h_out * w_out;
    for x in 0..width {
        let x_at = x + padding;
        let mut sum = 0.0f32;
        for ky in 0..kernel {
            if y >= ky && (y - ky) % stride == 0 && (y - ky) / stride < h_out {
                let oy = (y - ky) / stride;
                for kx in 0..kernel {
                    if x_at >= kx && (x_at - kx) % stride == 0 && (x_at - kx) / stride < w_out {
                        let ox = (x_at - kx) / stride;
                        let row = (c * kernel + ky) * kernel + kx;
                        sum += dcols[row * columns + column + oy * w_out + ox];
                    }
                }
            }
        }
        dx[line * width + x] = sum;
    }
}

impl<R: CubeRuntime> ColumnsBackend for CubeBackend<R> {
    fn im2col(x: CubeTensor<R>, kernel: u32, stride: u32, padding: u32) -> CubeTensor<R> {
        let dims = x.shape();
        let columns = Columns::new(dims.clone(), kernel, stride, padding);
        let (h_out, w_out) = (columns.out(dims[2]), columns.out(dims[3]));
        let rows = dims[1] * columns.kernel * columns.kernel;
        let cols = empty(&x, &[rows, dims[0] * h_out * w_out]);
        let (count, dim) = elementwise(&x, rows * dims[0] * h_out);
        im2col_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            cols.clone().into_tensor_arg(),
            kernel,
            stride,
            padding,
            h_out as u32,
            w_out as u32,
        );
        cols
    }
}

impl<R: CubeRuntime> ColumnsBackward for CubeBackend<R> {
    fn col2im(dcols: CubeTensor<R>, columns: &Columns) -> CubeTensor<R> {
        let input = &columns.input;
        let dx = empty(&dcols, &input.to_vec());
        let (count, dim) = elementwise(&dcols, input.num_elements() / input[3]);
        let Geometry { stride, padding } = columns.geometry;
        col2im_kernel::launch(
            &dcols.client.clone(),
            count,
            dim,
            dcols.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            columns.kernel as u32,
            stride as u32,
            padding as u32,
            columns.out(input[2]) as u32,
            columns.out(input[3]) as u32,
        );
        dx
    }
}

impl<B: ColumnsBackward, C: CheckpointStrategy> ColumnsBackend for Autodiff<B, C> {
    fn im2col(x: FloatTensor<Self>, kernel: u32, stride: u32, padding: u32) -> FloatTensor<Self> {
        let columns = Columns::new(x.primitive.shape(), kernel, stride, padding);
        let cols = B::im2col(x.primitive, kernel, stride, padding);
        match Im2colGrad
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(columns, cols),
            OpsKind::UnTracked(prep) => prep.finish(cols),
        }
    }
}

#[derive(Debug)]
struct Im2colGrad;

impl<B: ColumnsBackward> Backward<B, 1> for Im2colGrad {
    type State = Columns;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let dcols = grads.consume::<B>(&ops.node);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::col2im(dcols, &ops.state));
        }
    }
}
