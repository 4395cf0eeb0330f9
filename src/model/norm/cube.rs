//! The fused batch norm on Burn's GPU backends, as CubeCL kernels: the moments in one dispatch
//! (a workgroup per (view, channel) slot, two passes over its values), the normalization in one,
//! and the backward pass in three (the slots' two sums, dx, the parameters' gradients over the
//! views). Written with Burn's tensor ops the same layer is about fifty dispatches a step.
//! Sums run in f32 (per thread, then a tree in shared memory), not in the CPU's f64: equal to
//! the CPU op to float tolerance (tested in `model`).

use super::{NormBackend, NormBackward};
use burn::backend::TensorMetadata;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// Threads of a slot's workgroup: the sums' tree in shared memory has this many leaves.
const THREADS: usize = 256;

/// The sum of every thread's `value` in the workgroup, in each thread.
#[cube]
fn workgroup_sum(value: f32) -> f32 {
    let mut partial = Shared::<[f32]>::new_slice(THREADS);
    let unit = UNIT_POS_X as usize;
    partial[unit] = value;
    sync_cube();
    // A runtime value (the workgroup is THREADS wide): a constant here would be folded at
    // compile time, loop and all.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let pair = partial[unit] + partial[unit + stride];
            partial[unit] = pair;
        }
        sync_cube();
        stride /= 2;
    }
    partial[0]
}

/// Where value `k` of slot (view, c) lies in x [B, C, H*W]: images of one view are consecutive.
#[cube]
fn at(k: usize, view: usize, c: usize, per_view: usize, channels: usize, pixels: usize) -> usize {
    let image = view * per_view + k / pixels;
    (image * channels + c) * pixels + k % pixels
}

/// Per slot: the mean, then the biased variance about it, into moments [2, slots].
#[cube(launch)]
fn moments_kernel(
    x: &Tensor<f32>,
    moments: &mut Tensor<f32>,
    per_view: u32,
    channels: u32,
    pixels: u32,
) {
    let per_view = per_view as usize;
    let channels = channels as usize;
    let pixels = pixels as usize;
    let slot = CUBE_POS_X as usize;
    let view = slot / channels;
    let c = slot % channels;
    let count = per_view * pixels;
    let mut sum = 0.0f32;
    let mut k = UNIT_POS_X as usize;
    while k < count {
        sum += x[at(k, view, c, per_view, channels, pixels)];
        k += THREADS;
    }
    let mean = workgroup_sum(sum) / f32::cast_from(count);
    let mut squares = 0.0f32;
    let mut k = UNIT_POS_X as usize;
    while k < count {
        let d = x[at(k, view, c, per_view, channels, pixels)] - mean;
        squares += d * d;
        k += THREADS;
    }
    let var = workgroup_sum(squares) / f32::cast_from(count);
    if UNIT_POS_X == 0 {
        let slots = moments.len() / 2;
        moments[slot] = mean;
        moments[slots + slot] = var;
    }
}

/// The slot of element `i` of x [B, C, H*W] (its channel is the slot modulo C).
#[cube]
fn slot_of(i: usize, per_view: u32, channels: u32, pixels: u32) -> usize {
    let channels = channels as usize;
    let plane = i / pixels as usize;
    (plane / channels) / per_view as usize * channels + plane % channels
}

/// y = x * scale + shift, scale = gamma / sqrt(var + eps), shift = beta - mean * scale.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn normalize_kernel(
    x: &Tensor<f32>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    moments: &Tensor<f32>,
    y: &mut Tensor<f32>,
    per_view: u32,
    channels: u32,
    pixels: u32,
    epsilon: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let s = slot_of(i, per_view, channels, pixels);
    let c = s % channels as usize;
    let slots = moments.len() / 2;
    let scale = gamma[c] / f32::sqrt(moments[slots + s] + epsilon);
    y[i] = x[i] * scale + (beta[c] - moments[s] * scale);
}

/// Per slot: sum(dy * x_hat) and sum(dy), into sums [2, slots].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_sums_kernel(
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    moments: &Tensor<f32>,
    sums: &mut Tensor<f32>,
    per_view: u32,
    channels: u32,
    pixels: u32,
    epsilon: f32,
) {
    let per_view = per_view as usize;
    let channels = channels as usize;
    let pixels = pixels as usize;
    let slot = CUBE_POS_X as usize;
    let view = slot / channels;
    let c = slot % channels;
    let slots = moments.len() / 2;
    let mean = moments[slot];
    let inv_std = 1.0 / f32::sqrt(moments[slots + slot] + epsilon);
    let mut dgamma = 0.0f32;
    let mut dbeta = 0.0f32;
    let mut k = UNIT_POS_X as usize;
    while k < per_view * pixels {
        let i = at(k, view, c, per_view, channels, pixels);
        dgamma += dy[i] * (x[i] - mean) * inv_std;
        dbeta += dy[i];
        k += THREADS;
    }
    let dgamma = workgroup_sum(dgamma);
    let dbeta = workgroup_sum(dbeta);
    if UNIT_POS_X == 0 {
        sums[slot] = dgamma;
        sums[slots + slot] = dbeta;
    }
}

/// dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the slot.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dx_kernel(
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    gamma: &Tensor<f32>,
    moments: &Tensor<f32>,
    sums: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    per_view: u32,
    channels: u32,
    pixels: u32,
    epsilon: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let s = slot_of(i, per_view, channels, pixels);
    let c = s % channels as usize;
    let slots = moments.len() / 2;
    let n = f32::cast_from(per_view * pixels);
    let inv_std = 1.0 / f32::sqrt(moments[slots + s] + epsilon);
    let x_hat = (x[i] - moments[s]) * inv_std;
    dx[i] = gamma[c] * inv_std * (dy[i] - sums[slots + s] / n - x_hat * sums[s] / n);
}

/// Per channel: the slots' sums added over the views (the parameters' gradients).
#[cube(launch)]
fn over_views_kernel(sums: &Tensor<f32>, dgamma: &mut Tensor<f32>, dbeta: &mut Tensor<f32>) {
    let c = ABSOLUTE_POS;
    let channels = dgamma.len();
    if c >= channels {
        terminate!();
    }
    let slots = sums.len() / 2;
    let mut g = 0.0f32;
    let mut b = 0.0f32;
    let mut s = c;
    while s < slots {
        g += sums[s];
        b += sums[slots + s];
        s += channels;
    }
    dgamma[c] = g;
    dbeta[c] = b;
}

/// x's layout: images per view, channels, pixels per plane.
fn layout<R: CubeRuntime>(x: &CubeTensor<R>, slots: usize) -> (u32, u32, u32) {
    let dims = x.shape();
    let (images, channels) = (dims[0], dims[1]);
    let views = slots / channels;
    assert!(
        dims.num_dims() == 4 && views > 0 && images % views == 0,
        "fused batch norm takes [B, C, H, W] with B a multiple of the views"
    );
    let pixels = dims[2] * dims[3];
    ((images / views) as u32, channels as u32, pixels as u32)
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, dims: &[usize]) -> CubeTensor<R> {
    let (client, device) = (like.client.clone(), like.device.clone());
    empty_device_dtype(client, device, dims.to_vec().into(), like.dtype)
}

fn elementwise<R: CubeRuntime>(x: &CubeTensor<R>, elements: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&x.client, elements);
    (calculate_cube_count_elemwise(&x.client, elements, dim), dim)
}

fn per_slot(slots: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(slots as u32, 1, 1),
        CubeDim::new_1d(THREADS as u32),
    )
}

impl<R: CubeRuntime> NormBackend for CubeBackend<R> {
    fn channel_moments(x: CubeTensor<R>, views: usize) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let slots = views * x.shape()[1];
        let (per_view, channels, pixels) = layout(&x, slots);
        let moments = empty(&x, &[2, slots]);
        let (count, dim) = per_slot(slots);
        moments_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            moments.clone().into_tensor_arg(),
            per_view,
            channels,
            pixels,
        );
        moments
    }

    fn fused_batch_norm(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        moments: CubeTensor<R>,
        epsilon: f32,
    ) -> CubeTensor<R> {
        let [x, gamma, beta, moments] = [x, gamma, beta, moments].map(into_contiguous);
        let (per_view, channels, pixels) = layout(&x, moments.shape()[1]);
        let y = empty(&x, &x.shape());
        let (count, dim) = elementwise(&x, x.shape().num_elements());
        normalize_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            moments.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            per_view,
            channels,
            pixels,
            epsilon,
        );
        y
    }
}

impl<R: CubeRuntime> NormBackward for CubeBackend<R> {
    fn fused_batch_norm_backward(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        moments: CubeTensor<R>,
        epsilon: f32,
        dy: CubeTensor<R>,
    ) -> [CubeTensor<R>; 3] {
        let [x, gamma, moments, dy] = [x, gamma, moments, dy].map(into_contiguous);
        let slots = moments.shape()[1];
        let (per_view, channels, pixels) = layout(&x, slots);
        let client = x.client.clone();
        let sums = empty(&x, &[2, slots]);
        let (count, dim) = per_slot(slots);
        backward_sums_kernel::launch(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            moments.clone().into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            per_view,
            channels,
            pixels,
            epsilon,
        );
        let dx = empty(&x, &x.shape());
        let (count, dim) = elementwise(&x, x.shape().num_elements());
        dx_kernel::launch(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            dy.into_tensor_arg(),
            gamma.into_tensor_arg(),
            moments.into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            per_view,
            channels,
            pixels,
            epsilon,
        );
        let [dgamma, dbeta] = [(); 2].map(|_| empty(&x, &[channels as usize]));
        let (count, dim) = elementwise(&x, channels as usize);
        over_views_kernel::launch(
            &client,
            count,
            dim,
            sums.into_tensor_arg(),
            dgamma.clone().into_tensor_arg(),
            dbeta.clone().into_tensor_arg(),
        );
        [dx, dgamma, dbeta]
    }
}
