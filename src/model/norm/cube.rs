//! The fused batch norm on Burn's GPU backends, as CubeCL kernels: the moments in one dispatch
//! (a workgroup per (view, channel) slot, two passes over its values), the normalization (and
//! the ReLU after it, where one follows) in one, and the backward pass in three (the slots' two
//! sums, dx, the parameters' gradients over the views); the running averages' update in one.
//! Written with Burn's tensor ops the same layer is about fifty dispatches a step, and a ReLU
//! four more.
//! Sums run in f32 (per thread, then a tree in shared memory), not in the CPU's f64: equal to
//! the CPU op to float tolerance (tested in `model`).
//!
//! Under SyncBN the slots' sums cross the host to be summed over the peers (`collective`'s
//! exchanges are host copies): three reads a layer a step, the CPU op's three exchanges.
//!
//! Over 500 lines on purpose: the kernels and their launches share the slot layout and the
//! workgroup's reduction, and each kernel is short; split, each half would need the other's.

use super::{over_batch, NormBackend, NormBackward};
use crate::collective::SyncBatchNorm;
use crate::model::cube::{elementwise, empty};
use burn::backend::ops::FloatTensorOps;
use burn::backend::TensorMetadata;
use burn::tensor::TensorData;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;
use cubecl::CubeDim;

/// The most threads of a slot's workgroup: the sums' tree in shared memory has this many leaves.
const THREADS: usize = 256;
/// Threads of a slot's workgroup unless each would walk more rows than [`ROWS_PER_THREAD`]. A
/// software GPU runs a barrier as a switch through every group of the workgroup's invocations:
/// natively on SwiftShader (`resnet-mini`, batch 8) the two sums kernels took 750 ms of a 1.8 s
/// step at 256 threads, 150 ms at 64.
const FEW_THREADS: usize = 64;
/// Rows of a slot per thread past which the workgroup takes [`THREADS`] (large batches, where
/// the parallelism pays more than the barriers cost).
const ROWS_PER_THREAD: usize = 16;

/// The sum of every thread's `value` in the workgroup, in each thread.
#[cube]
fn workgroup_sum(value: f32) -> f32 {
    let mut partial = Shared::<[f32]>::new_slice(THREADS);
    let unit = UNIT_POS_X as usize;
    partial[unit] = value;
    sync_cube();
    // The workgroup's width, a runtime value (see `per_slot`).
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

/// Where row `row` of slot (view, c) starts in x [B, C, H, W] (read by its strides: the
/// convolutions hand over their own layouts; copying them to one would cost a dispatch): the
/// slot's rows are its view's images' rows, image after image, each W values at x's last stride.
/// A thread walks whole rows, so the divisions (slow on the GPUs that emulate them) come once a
/// row, not once a value.
#[cube]
fn row_start(x: &Tensor<f32>, row: usize, view: usize, c: usize, per_view: usize) -> usize {
    let height = x.shape(2);
    let image = view * per_view + row / height;
    image * x.stride(0) + c * x.stride(1) + row % height * x.stride(2)
}

/// Per slot: the mean, then the biased variance about it, into moments [2, slots].
#[cube(launch)]
fn moments_kernel(x: &Tensor<f32>, moments: &mut Tensor<f32>, per_view: u32, channels: u32) {
    let per_view = per_view as usize;
    let channels = channels as usize;
    let slot = CUBE_POS_X as usize;
    let view = slot / channels;
    let c = slot % channels;
    let (rows, width, step) = (per_view * x.shape(2), x.shape(3), x.stride(3));
    let count = rows * width;
    let mut sum = 0.0f32;
    let mut row = UNIT_POS_X as usize;
    while row < rows {
        let start = row_start(x, row, view, c, per_view);
        for w in 0..width {
            sum += x[start + w * step];
        }
        row += CUBE_DIM_X as usize;
    }
    let mean = workgroup_sum(sum) / f32::cast_from(count);
    let mut squares = 0.0f32;
    let mut row = UNIT_POS_X as usize;
    while row < rows {
        let start = row_start(x, row, view, c, per_view);
        for w in 0..width {
            let d = x[start + w * step] - mean;
            squares += d * d;
        }
        row += CUBE_DIM_X as usize;
    }
    let var = workgroup_sum(squares) / f32::cast_from(count);
    if UNIT_POS_X == 0 {
        let slots = moments.len() / 2;
        moments[slot] = mean;
        moments[slots + slot] = var;
    }
}

/// The slot of x's element at memory position `j`, x dense in any order of its dimensions (see
/// [`dense`]): the elementwise kernels walk memory in order, whatever layout the convolution
/// chose, and write their outputs in the same layout.
#[cube]
fn slot_at(x: &Tensor<f32>, j: usize, per_view: u32) -> usize {
    let image = j / x.stride(0) % x.shape(0);
    let channels = x.shape(1);
    image / per_view as usize * channels + j / x.stride(1) % channels
}

/// Where the element of x at memory position `j` (x dense, in any order of its dimensions) lies
/// in `other`, a tensor of x's shape in a layout of its own.
#[cube]
fn same_place(x: &Tensor<f32>, other: &Tensor<f32>, j: usize) -> usize {
    let mut at = 0;
    #[unroll]
    for d in 0..4 {
        at += j / x.stride(d) % x.shape(d) * other.stride(d);
    }
    at
}

/// y = x * scale + shift, scale = gamma / sqrt(var + eps), shift = beta - mean * scale; plus
/// the residual when `add` (the kernel reads it where x's element lies in it); then the ReLU
/// when `relu`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn normalize_kernel(
    x: &Tensor<f32>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    moments: &Tensor<f32>,
    residual: &Tensor<f32>,
    y: &mut Tensor<f32>,
    per_view: u32,
    epsilon: f32,
    #[comptime] relu: bool,
    #[comptime] add: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let s = slot_at(x, i, per_view);
    let c = s % x.shape(1);
    let slots = moments.len() / 2;
    let scale = gamma[c] / f32::sqrt(moments[slots + s] + epsilon);
    let mut value = x[i] * scale + (beta[c] - moments[s] * scale);
    if add {
        value += residual[same_place(x, residual, i)];
    }
    y[i] = relu_of(value, relu);
}

/// As Burn's ReLU: zero where the value is <= 0 (a NaN passes through).
// The outer `if` is decided when the kernel is compiled (`relu` is comptime): not collapsible.
#[allow(clippy::collapsible_if)]
#[cube]
fn relu_of(value: f32, #[comptime] relu: bool) -> f32 {
    let mut out = value;
    if relu {
        if value <= 0.0 {
            out = 0.0;
        }
    }
    out
}

/// The gradient reaching the batch norm: dy, zeroed where the ReLU after it cut its output.
// The outer `if` is decided when the kernel is compiled (`relu` is comptime): not collapsible.
#[allow(clippy::collapsible_if)]
#[cube]
fn masked(dy: f32, relu_output: f32, #[comptime] relu: bool) -> f32 {
    let mut out = dy;
    if relu {
        if relu_output <= 0.0 {
            out = 0.0;
        }
    }
    out
}

/// Per slot: sum(dy * x_hat) and sum(dy), into sums [2, slots].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_sums_kernel(
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    relu_output: &Tensor<f32>,
    moments: &Tensor<f32>,
    sums: &mut Tensor<f32>,
    per_view: u32,
    channels: u32,
    epsilon: f32,
    #[comptime] relu: bool,
) {
    let per_view = per_view as usize;
    let channels = channels as usize;
    let slot = CUBE_POS_X as usize;
    let view = slot / channels;
    let c = slot % channels;
    let slots = moments.len() / 2;
    let mean = moments[slot];
    let inv_std = 1.0 / f32::sqrt(moments[slots + slot] + epsilon);
    let mut dgamma = 0.0f32;
    let mut dbeta = 0.0f32;
    let (rows, width) = (per_view * x.shape(2), x.shape(3));
    let mut row = UNIT_POS_X as usize;
    while row < rows {
        let (x_start, dy_start) = (
            row_start(x, row, view, c, per_view),
            row_start(dy, row, view, c, per_view),
        );
        for w in 0..width {
            let i = x_start + w * x.stride(3);
            let g = masked(dy[dy_start + w * dy.stride(3)], relu_output[i], relu);
            dgamma += g * (x[i] - mean) * inv_std;
            dbeta += g;
        }
        row += CUBE_DIM_X as usize;
    }
    let dgamma = workgroup_sum(dgamma);
    let dbeta = workgroup_sum(dbeta);
    if UNIT_POS_X == 0 {
        sums[slot] = dgamma;
        sums[slots + slot] = dbeta;
    }
}

/// dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), the means over the slot's
/// `count` values (every peer's under SyncBN).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dx_kernel(
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    relu_output: &Tensor<f32>,
    gamma: &Tensor<f32>,
    moments: &Tensor<f32>,
    sums: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    d_residual: &mut Tensor<f32>,
    per_view: u32,
    count: f32,
    epsilon: f32,
    #[comptime] relu: bool,
    #[comptime] residual: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let s = slot_at(x, i, per_view);
    let c = s % x.shape(1);
    let slots = moments.len() / 2;
    let inv_std = 1.0 / f32::sqrt(moments[slots + s] + epsilon);
    let x_hat = (x[i] - moments[s]) * inv_std;
    let g = masked(dy[i], relu_output[i], relu);
    dx[i] = gamma[c] * inv_std * (g - sums[slots + s] / count - x_hat * sums[s] / count);
    if residual {
        d_residual[i] = g;
    }
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

/// Per channel: each view's momentum step of the running mean and variance, in turn.
#[cube(launch)]
fn running_kernel(
    mean: &Tensor<f32>,
    var: &Tensor<f32>,
    moments: &Tensor<f32>,
    new_mean: &mut Tensor<f32>,
    new_var: &mut Tensor<f32>,
    momentum: f32,
) {
    let c = ABSOLUTE_POS;
    let channels = mean.len();
    if c >= channels {
        terminate!();
    }
    let slots = moments.len() / 2;
    let mut m = mean[c];
    let mut v = var[c];
    let mut s = c;
    while s < slots {
        m = m * (1.0 - momentum) + moments[s] * momentum;
        v = v * (1.0 - momentum) + moments[slots + s] * momentum;
        s += channels;
    }
    new_mean[c] = m;
    new_var[c] = v;
}

/// The normalize kernel's launch (see [`normalize_kernel`]); y is laid out as the dense x.
fn normalize<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: CubeTensor<R>,
    moments: CubeTensor<R>,
    residual: Option<CubeTensor<R>>,
    epsilon: f32,
    relu: bool,
) -> CubeTensor<R> {
    let [gamma, beta, moments] = [gamma, beta, moments].map(into_contiguous);
    let x = dense(x);
    let (per_view, _, _) = layout(&x, moments.shape()[1]);
    let y = empty_like(&x);
    let add = residual.is_some();
    // Without a residual the kernel never reads it: x stands in.
    let residual = residual.unwrap_or_else(|| x.clone());
    let (count, dim) = elementwise(&x, x.shape().num_elements());
    normalize_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        moments.into_tensor_arg(),
        residual.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        per_view,
        epsilon,
        relu,
        add,
    );
    y
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

/// x as it is when its buffer is dense in some order of its dimensions, else a contiguous copy.
fn dense<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    match x.is_contiguous_buffer() && x.is_nonoverlapping() {
        true => x,
        false => into_contiguous(x),
    }
}

/// A fresh tensor laid out as the dense `x`.
fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    let handle = x.client.empty(x.handle.size() as usize);
    let (client, device) = (x.client.clone(), x.device.clone());
    CubeTensor::new(client, handle, x.meta.as_ref().clone(), device, x.dtype)
}

/// A workgroup per slot of x, whose slots hold `per_view` images' rows each.
fn per_slot<R: CubeRuntime>(
    x: &CubeTensor<R>,
    slots: usize,
    per_view: u32,
) -> (CubeCount, CubeDim) {
    let rows = per_view as usize * x.shape()[2];
    let threads = match rows > FEW_THREADS * ROWS_PER_THREAD {
        true => THREADS,
        false => FEW_THREADS,
    };
    (
        CubeCount::Static(slots as u32, 1, 1),
        CubeDim::new_1d(threads as u32),
    )
}

/// A small tensor's values on the host (natively only: SyncBN's peers never train in a page).
fn read<R: CubeRuntime>(t: CubeTensor<R>) -> Vec<f32> {
    let data = futures_lite::future::block_on(CubeBackend::<R>::float_into_data(t));
    let data = data.expect("the GPU read back a batch norm's sums");
    data.try_to_vec().expect("f32 sums")
}

fn upload<R: CubeRuntime>(values: Vec<f32>, like: &CubeTensor<R>) -> CubeTensor<R> {
    let dims = like.shape().to_vec();
    CubeBackend::<R>::float_from_data(TensorData::new(values, dims), &like.device)
}

/// This device's [2, slots] moments of `count` values a slot turned into the global batch's:
/// its sums (count x mean) over the peers give the mean; its squares about that mean
/// (count x (var + (mean - global mean)^2), what the CPU's second pass sums) the variance.
fn over_peers<R: CubeRuntime>(
    moments: CubeTensor<R>,
    count: f64,
    sync: &SyncBatchNorm,
) -> CubeTensor<R> {
    let local = read(moments.clone());
    let (mean, var) = local.split_at(local.len() / 2);
    let sums = mean.iter().map(|&m| m as f64 * count).collect();
    let (sums, n) = over_batch(sums, count, Some(sync));
    let global_mean: Vec<f64> = sums.iter().map(|s| s / n).collect();
    let squares = (mean.iter().zip(var).zip(&global_mean))
        .map(|((&m, &v), g)| count * (v as f64 + (m as f64 - g).powi(2)))
        .collect();
    let (squares, _) = over_batch(squares, count, Some(sync));
    let var = squares.into_iter().map(|q| q / n);
    let values = global_mean.into_iter().chain(var).map(|v| v as f32);
    upload(values.collect(), &moments)
}

impl<R: CubeRuntime> NormBackend for CubeBackend<R> {
    fn channel_moments(
        x: CubeTensor<R>,
        views: usize,
        sync: Option<SyncBatchNorm>,
    ) -> CubeTensor<R> {
        let slots = views * x.shape()[1];
        let (per_view, channels, pixels) = layout(&x, slots);
        let moments = empty(&x, &[2, slots]);
        let (count, dim) = per_slot(&x, slots, per_view);
        moments_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            moments.clone().into_tensor_arg(),
            per_view,
            channels,
        );
        match sync {
            Some(sync) => over_peers(moments, (per_view * pixels) as f64, &sync),
            None => moments,
        }
    }

    fn fused_batch_norm(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        moments: CubeTensor<R>,
        epsilon: f32,
        relu: bool,
        _: Option<SyncBatchNorm>,
    ) -> CubeTensor<R> {
        normalize(x, gamma, beta, moments, None, epsilon, relu)
    }

    fn fused_batch_norm_residual(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        beta: CubeTensor<R>,
        moments: CubeTensor<R>,
        residual: CubeTensor<R>,
        epsilon: f32,
        _: Option<SyncBatchNorm>,
    ) -> CubeTensor<R> {
        normalize(x, gamma, beta, moments, Some(residual), epsilon, true)
    }

    fn running_update(
        mean: CubeTensor<R>,
        var: CubeTensor<R>,
        moments: CubeTensor<R>,
        momentum: f32,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let [mean, var, moments] = [mean, var, moments].map(into_contiguous);
        let channels = mean.shape().num_elements();
        let [new_mean, new_var] = [(); 2].map(|_| empty(&mean, &[channels]));
        let (count, dim) = elementwise(&mean, channels);
        running_kernel::launch(
            &mean.client.clone(),
            count,
            dim,
            mean.into_tensor_arg(),
            var.into_tensor_arg(),
            moments.into_tensor_arg(),
            new_mean.clone().into_tensor_arg(),
            new_var.clone().into_tensor_arg(),
            momentum,
        );
        (new_mean, new_var)
    }
}

impl<R: CubeRuntime> NormBackward for CubeBackend<R> {
    fn fused_batch_norm_backward(
        x: CubeTensor<R>,
        gamma: CubeTensor<R>,
        moments: CubeTensor<R>,
        epsilon: f32,
        dy: CubeTensor<R>,
        relu_output: Option<CubeTensor<R>>,
        residual: bool,
        sync: Option<SyncBatchNorm>,
    ) -> ([CubeTensor<R>; 3], Option<CubeTensor<R>>) {
        let [gamma, moments] = [gamma, moments].map(into_contiguous);
        // The elementwise dx walks x, dy and the ReLU's output in one memory order.
        let (x, dy) = match (dense(x), dense(dy)) {
            (x, dy) if x.meta.strides() == dy.meta.strides() => (x, dy),
            (x, dy) => (into_contiguous(x), into_contiguous(dy)),
        };
        let relu = relu_output.is_some();
        // Without the ReLU the kernels never read it: dy stands in.
        let relu_output = match relu_output {
            Some(y) if y.meta.strides() == x.meta.strides() => y,
            Some(y) => into_contiguous(y),
            None => dy.clone(),
        };
        let slots = moments.shape()[1];
        let (per_view, channels, pixels) = layout(&x, slots);
        let client = x.client.clone();
        let sums = empty(&x, &[2, slots]);
        let (count, dim) = per_slot(&x, slots, per_view);
        backward_sums_kernel::launch(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            relu_output.clone().into_tensor_arg(),
            moments.clone().into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            per_view,
            channels,
            epsilon,
            relu,
        );
        // dx takes the global batch's sums; the parameters' gradients stay this device's share
        // (summed over the peers with every other weight's).
        let local = (per_view * pixels) as f64;
        let (global_sums, values) = match &sync {
            Some(sync) => {
                let sums_f64 = read(sums.clone()).into_iter().map(f64::from).collect();
                let (global, count) = over_batch(sums_f64, local, Some(sync));
                let global = global.into_iter().map(|v| v as f32).collect();
                (upload(global, &sums), count)
            }
            None => (sums.clone(), local),
        };
        let dx = empty_like(&x);
        // Written only with a residual; a stand-in of one value otherwise.
        let d_residual = match residual {
            true => empty_like(&x),
            false => empty(&x, &[1]),
        };
        let (count, dim) = elementwise(&x, x.shape().num_elements());
        dx_kernel::launch(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            dy.into_tensor_arg(),
            relu_output.into_tensor_arg(),
            gamma.into_tensor_arg(),
            moments.into_tensor_arg(),
            global_sums.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            d_residual.clone().into_tensor_arg(),
            per_view,
            values as f32,
            epsilon,
            relu,
            residual,
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
        ([dx, dgamma, dbeta], residual.then_some(d_residual))
    }
}
