//! The convolution on Burn's GPU backends: im2col as one kernel, then one matmul of Burn's.
//!
//! Burn's own convolution takes about twenty dispatches a layer a training step without
//! autotune (the page's build: the weight gradient as a direct convolution, the input gradient
//! as a transposed one through NCHW/NHWC copies and a weight flip), and most of the ~190 slices
//! and copies of a 395-dispatch step with it. Here a layer is two dispatches forward (im2col,
//! matmul) and five backward (im2col again, dY as a matrix, two matmuls, col2im).
//!
//! The column matrix is [C k k, B Ho Wo]: the matmul's output [Co, B Ho Wo] is the convolution's
//! [B, Co, Ho, Wo] with its first two dimensions swapped, handed on as that strided view (the
//! batch-norm kernels and im2col read their inputs by strides), and in the backward pass dY in
//! that same layout is a matrix without a copy.

use super::{ConvBackend, ConvBackward, Geometry};
use crate::model::cube::{elementwise, empty};
use burn::backend::ops::FloatTensorOps;
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;

type Gpu<R> = CubeBackend<R>;

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

/// The shapes of one convolution.
struct Layer {
    batch: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    h_out: usize,
    w_out: usize,
    geometry: Geometry,
}

impl Layer {
    fn of<R: CubeRuntime>(x: &CubeTensor<R>, weight: &CubeTensor<R>, geometry: Geometry) -> Self {
        let (dims, w) = (x.shape(), weight.shape());
        assert!(
            dims.num_dims() == 4 && w.num_dims() == 4 && w[1] == dims[1] && w[2] == w[3],
            "im2col conv2d: input {dims:?} and weight {w:?} do not fit"
        );
        let Geometry { stride, padding } = geometry;
        let out = |n: usize| (n + 2 * padding - w[2]) / stride + 1;
        Self {
            batch: dims[0],
            c_in: dims[1],
            c_out: w[0],
            kernel: w[2],
            h_out: out(dims[2]),
            w_out: out(dims[3]),
            geometry,
        }
    }

    fn patch(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    fn columns(&self) -> usize {
        self.batch * self.h_out * self.w_out
    }

    fn im2col<R: CubeRuntime>(&self, x: CubeTensor<R>) -> CubeTensor<R> {
        let cols = empty(&x, &[self.patch(), self.columns()]);
        let (count, dim) = elementwise(&x, self.patch() * self.batch * self.h_out);
        let Geometry { stride, padding } = self.geometry;
        im2col_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            cols.clone().into_tensor_arg(),
            self.kernel as u32,
            stride as u32,
            padding as u32,
            self.h_out as u32,
            self.w_out as u32,
        );
        cols
    }

    fn col2im<R: CubeRuntime>(&self, dcols: CubeTensor<R>, input: &Shape) -> CubeTensor<R> {
        let dx = empty(&dcols, &input.to_vec());
        let (count, dim) = elementwise(&dcols, input.num_elements() / input[3]);
        let Geometry { stride, padding } = self.geometry;
        col2im_kernel::launch(
            &dcols.client.clone(),
            count,
            dim,
            dcols.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            self.kernel as u32,
            stride as u32,
            padding as u32,
            self.h_out as u32,
            self.w_out as u32,
        );
        dx
    }

    /// The weight [Co, C, k, k] as the matrix [Co, C k k].
    fn weight_matrix<R: CubeRuntime>(&self, weight: CubeTensor<R>) -> CubeTensor<R> {
        Gpu::<R>::float_reshape(weight, Shape::new([self.c_out, self.patch()]))
    }
}

impl<R: CubeRuntime> ConvBackend for CubeBackend<R> {
    fn im2col_conv2d(
        x: CubeTensor<R>,
        weight: CubeTensor<R>,
        stride: u32,
        padding: u32,
    ) -> CubeTensor<R> {
        let geometry = Geometry {
            stride: stride as usize,
            padding: padding as usize,
        };
        let layer = Layer::of(&x, &weight, geometry);
        let cols = layer.im2col(x);
        let y = Gpu::<R>::float_matmul(layer.weight_matrix(weight), cols);
        let (b, co) = (layer.batch, layer.c_out);
        let y = Gpu::<R>::float_reshape(y, Shape::new([co, b, layer.h_out, layer.w_out]));
        Gpu::<R>::float_swap_dims(y, 0, 1)
    }
}

impl<R: CubeRuntime> ConvBackward for CubeBackend<R> {
    fn im2col_conv2d_backward(
        x: CubeTensor<R>,
        weight: CubeTensor<R>,
        output_grad: CubeTensor<R>,
        geometry: Geometry,
        want_x: bool,
    ) -> (Option<CubeTensor<R>>, CubeTensor<R>) {
        let layer = Layer::of(&x, &weight, geometry);
        let input = x.shape();
        let cols = layer.im2col(x);
        // dY [B, Co, Ho, Wo] as the matrix [Co, B Ho Wo]: free when dY has the forward's layout.
        let dy = Gpu::<R>::float_swap_dims(output_grad, 0, 1);
        let dy = Gpu::<R>::float_reshape(dy, Shape::new([layer.c_out, layer.columns()]));
        let dw = Gpu::<R>::float_matmul(dy.clone(), Gpu::<R>::float_swap_dims(cols, 0, 1));
        let dw = Gpu::<R>::float_reshape(dw, weight.shape());
        let dx = want_x.then(|| {
            let w_t = Gpu::<R>::float_swap_dims(layer.weight_matrix(weight), 0, 1);
            layer.col2im(Gpu::<R>::float_matmul(w_t, dy), &input)
        });
        (dx, dw)
    }
}
