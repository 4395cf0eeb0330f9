//! Training-mode batch norm as one fused op with its own backward pass: on the CPU here, on the
//! GPU backends as CubeCL kernels (`cube`), one autodiff op over both.
//!
//! Written with Burn's tensor ops, a batch norm is a chain of element-wise passes (mean, centre,
//! square, mean, scale, shift), each with its own backward and its own allocation: a perf
//! profile of a `resnet-mini` step on flex put a quarter of it in element-wise kernels. Here the
//! statistics read the input once (each plane's mean, then its variance about that mean while the
//! plane is in cache; the GPU kernels take two passes over the batch), the normalization once, and
//! the backward twice (the per-channel sums of the gradient and of the gradient times the
//! normalized input, then the input gradient), with no intermediate tensors. Sums run per channel
//! in f64 in a fixed order, so a run repeats bit for bit. The CPU device takes
//! this path (see `backend::has_fast_conv`), the GPU devices `cube`'s (`has_cube_kernels`); both
//! are tested equal to Burn's `BatchNorm`.
//!
//! A batch may stack several views (the trainer sends both views of its images through the
//! encoder at once): each view's images are then normalized by their own statistics, as if it
//! had passed alone. The statistics are kept per (view, channel) slot.
//!
//! Over 500 lines on purpose: one autodiff op (its recording, its backward) over both backends,
//! and the CPU kernels it dispatches to, which share one layout (`Shape`) and one summation order.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::{backend_extension, tensor::FloatTensor, AutodiffBackend, Backend, Dispatch};
use burn::tensor::Tensor;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::conv::{f32s, tensor, written, Uninit};
use crate::collective::SyncBatchNorm;
#[cfg(all(feature = "cube-kernels", not(feature = "fusion"), feature = "cuda"))]
use burn::backend::Cuda;
#[cfg(all(
    feature = "cube-kernels",
    not(feature = "fusion"),
    any(feature = "wgpu", feature = "webgpu")
))]
use burn::backend::Wgpu;

#[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
mod cube;

/// Per view and channel of x [B, C, H, W], stacked from `views` equal views: the mean and the
/// biased variance, as [2, views * C] (view after view), over every peer's images when `sync` is
/// set; without gradient (the gradient through them is part of [`batch_norm`]'s backward).
pub fn channel_moments(x: Tensor<4>, views: usize, sync: Option<SyncBatchNorm>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as NormBackend>::channel_moments(
        x.into_dispatch(),
        views,
        sync,
    ))
}

/// `gamma * (x - mean) / sqrt(var + epsilon) + beta` per channel, where `moments` are x's own
/// [`channel_moments`] (each view by its own), followed by a ReLU when `relu` (in the same
/// pass; the backward pass takes the ReLU's mask from the output); the gradient is the
/// training-mode one (through the batch statistics: the global batch's under `sync`, the
/// moments' own peers).
pub fn batch_norm(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    moments: Tensor<2>,
    epsilon: f64,
    relu: bool,
    sync: Option<SyncBatchNorm>,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NormBackend>::fused_batch_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        moments.into_dispatch(),
        epsilon as f32,
        relu,
        sync,
    ))
}

/// `relu(batch_norm(x) + residual)` ([`batch_norm`] with the ReLU), a residual block's end as
/// one op: `residual` has x's shape, in any layout; its gradient is dy where the ReLU passed it.
pub fn batch_norm_residual_relu(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    moments: Tensor<2>,
    residual: Tensor<4>,
    epsilon: f64,
    sync: Option<SyncBatchNorm>,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NormBackend>::fused_batch_norm_residual(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        moments.into_dispatch(),
        residual.into_dispatch(),
        epsilon as f32,
        sync,
    ))
}

/// The running averages after a batch with these [`channel_moments`]: each view's step
/// `r <- (1 - momentum) r + momentum batch_v` in turn (as passes per view would take them), for
/// the mean and the biased variance at once; without gradient.
pub fn running_update(
    mean: Tensor<1>,
    var: Tensor<1>,
    moments: Tensor<2>,
    momentum: f64,
) -> [Tensor<1>; 2] {
    let (mean, var) = <Dispatch as NormBackend>::running_update(
        mean.into_dispatch(),
        var.into_dispatch(),
        moments.into_dispatch(),
        momentum as f32,
    );
    [mean, var].map(Tensor::from_dispatch)
}

#[cfg_attr(
    all(feature = "cube-kernels", not(feature = "fusion")),
    backend_extension(
        Flex,
        Wgpu: cfg(any(feature = "wgpu", feature = "webgpu")),
        Cuda: cfg(feature = "cuda"),
        Autodiff
    )
)]
#[cfg_attr(
    not(all(feature = "cube-kernels", not(feature = "fusion"))),
    backend_extension(Flex, Autodiff)
)]
pub trait NormBackend: Backend {
    fn channel_moments(
        x: FloatTensor<Self>,
        views: usize,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self>;
    /// `sync` is for the backward pass (the forward's moments are already the global batch's).
    fn fused_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        epsilon: f32,
        relu: bool,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self>;
    fn fused_batch_norm_residual(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f32,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self>;
    fn running_update(
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        momentum: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// The backward pass of [`NormBackend::fused_batch_norm`] (and of the residual form) on a
/// backend with the forward op: `[dx, dgamma, dbeta]` from x, gamma, x's moments and the
/// output's gradient; with the ReLU, `relu_output` is the op's output, and dy counts only where
/// it is positive. With `residual`, also that masked dy: the residual's gradient. Under `sync`,
/// dx takes the sums over every peer's images.
pub trait NormBackward: NormBackend {
    #[allow(clippy::too_many_arguments)]
    fn fused_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        epsilon: f32,
        dy: FloatTensor<Self>,
        relu_output: Option<FloatTensor<Self>>,
        residual: bool,
        sync: Option<SyncBatchNorm>,
    ) -> ([FloatTensor<Self>; 3], Option<FloatTensor<Self>>);
}

impl NormBackend for Flex {
    fn channel_moments(x: FlexTensor, views: usize, sync: Option<SyncBatchNorm>) -> FlexTensor {
        let shape = Shape::of(&x, views);
        let moments = shape.moments(&f32s(&x), sync.as_ref());
        tensor(moments, &[2, shape.slots()])
    }

    fn fused_batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        moments: FlexTensor,
        epsilon: f32,
        relu: bool,
        _: Option<SyncBatchNorm>,
    ) -> FlexTensor {
        let shape = Shape::with_moments(&x, &moments);
        let coefficients =
            shape.coefficients(&f32s(&gamma), &f32s(&beta), &f32s(&moments), epsilon);
        let y = shape.apply(&f32s(&x), &coefficients, relu, None);
        tensor(y, &shape.dims())
    }

    fn fused_batch_norm_residual(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        moments: FlexTensor,
        residual: FlexTensor,
        epsilon: f32,
        _: Option<SyncBatchNorm>,
    ) -> FlexTensor {
        let shape = Shape::with_moments(&x, &moments);
        let coefficients =
            shape.coefficients(&f32s(&gamma), &f32s(&beta), &f32s(&moments), epsilon);
        let y = shape.apply(&f32s(&x), &coefficients, true, Some(&f32s(&residual)));
        tensor(y, &shape.dims())
    }

    fn running_update(
        mean: FlexTensor,
        var: FlexTensor,
        moments: FlexTensor,
        momentum: f32,
    ) -> (FlexTensor, FlexTensor) {
        let moments = f32s(&moments);
        let (batch_mean, batch_var) = moments.split_at(moments.len() / 2);
        let step = |running: &FlexTensor, batch: &[f32]| {
            let mut running = f32s(running).to_vec();
            let channels = running.len();
            for view in batch.chunks(channels) {
                for (r, b) in running.iter_mut().zip(view) {
                    *r = *r * (1.0 - momentum) + b * momentum;
                }
            }
            tensor(running, &[channels])
        };
        (step(&mean, batch_mean), step(&var, batch_var))
    }
}

impl NormBackward for Flex {
    fn fused_batch_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        moments: FlexTensor,
        epsilon: f32,
        dy: FlexTensor,
        relu_output: Option<FlexTensor>,
        residual: bool,
        sync: Option<SyncBatchNorm>,
    ) -> ([FlexTensor; 3], Option<FlexTensor>) {
        let shape = Shape::with_moments(&x, &moments);
        let dy = match relu_output {
            Some(y) => std::borrow::Cow::Owned(relu_backward(&f32s(&dy), &f32s(&y))),
            None => f32s(&dy),
        };
        let (x, gamma, moments) = (f32s(&x), f32s(&gamma), f32s(&moments));
        let [dx, dgamma, dbeta] = shape.backward(&x, &gamma, &moments, epsilon, &dy, sync.as_ref());
        let c = shape.channels;
        let grads = [
            tensor(dx, &shape.dims()),
            tensor(dgamma, &[c]),
            tensor(dbeta, &[c]),
        ];
        (
            grads,
            residual.then(|| tensor(dy.into_owned(), &shape.dims())),
        )
    }
}

/// The gradient through a ReLU from its output y: dy where y > 0, else zero. In slices of a
/// fixed length, each a plain loop (element by element, rayon's collect did not vectorize).
fn relu_backward(dy: &[f32], y: &[f32]) -> Vec<f32> {
    const SLICE: usize = 1 << 14;
    // SAFETY: every slice of the output is written whole, entry by entry.
    unsafe {
        written(dy.len(), |out| {
            (out.par_chunks_mut(SLICE)
                .zip(dy.par_chunks(SLICE).zip(y.par_chunks(SLICE))))
            .for_each(|(out, (dy, y))| {
                for ((out, &dy), &y) in out.iter_mut().zip(dy).zip(y) {
                    out.write(if y <= 0.0 { 0.0 } else { dy });
                }
            })
        })
    }
}

impl<B: NormBackward, C: CheckpointStrategy> NormBackend for Autodiff<B, C> {
    fn channel_moments(
        x: FloatTensor<Self>,
        views: usize,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::channel_moments(x.primitive, views, sync))
    }

    fn running_update(
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        momentum: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (primitive_mean, primitive_var) = (mean.primitive, var.primitive);
        let (mean, var) =
            B::running_update(primitive_mean, primitive_var, moments.primitive, momentum);
        (Self::from_inner(mean), Self::from_inner(var))
    }

    fn fused_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        epsilon: f32,
        relu: bool,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self> {
        let norm = Recorded {
            moments: moments.primitive,
            epsilon,
            relu,
            sync,
        };
        record::<B, C, 3>([&x, &gamma, &beta], norm, |[x, gamma, beta], moments| {
            B::fused_batch_norm(x, gamma, beta, moments, epsilon, relu, None)
        })
    }

    fn fused_batch_norm_residual(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        moments: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f32,
        sync: Option<SyncBatchNorm>,
    ) -> FloatTensor<Self> {
        let norm = Recorded {
            moments: moments.primitive,
            epsilon,
            relu: true,
            sync,
        };
        let parents = [&x, &gamma, &beta, &residual];
        record::<B, C, 4>(parents, norm, |[x, gamma, beta, residual], moments| {
            B::fused_batch_norm_residual(x, gamma, beta, moments, residual, epsilon, None)
        })
    }
}

/// What a fused batch norm's backward pass needs besides its parents and output.
struct Recorded<B: Backend> {
    moments: FloatTensor<B>,
    epsilon: f32,
    relu: bool,
    sync: Option<SyncBatchNorm>,
}

/// The fused batch norm's output, `forward` of its parents' values and the moments, recorded for
/// autodiff with its parents: x, gamma, beta and, in the residual form, the residual. The
/// backward pass keeps the output only with the ReLU. (The inner op gets no peers: its moments
/// are already the global batch's.)
fn record<B: NormBackward, C: CheckpointStrategy, const N: usize>(
    parents: [&FloatTensor<Autodiff<B, C>>; N],
    norm: Recorded<B>,
    forward: impl FnOnce([FloatTensor<B>; N], FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let output = forward(parents.map(|p| p.primitive.clone()), norm.moments.clone());
    let nodes = parents.map(|p| p.node.clone());
    match BatchNormGrad::<N>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (x, gamma) = (parents[0].primitive.clone(), parents[1].primitive.clone());
            let relu_output = norm.relu.then(|| output.clone());
            let state = (x, gamma, norm.moments, norm.epsilon, relu_output, norm.sync);
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// The fused batch norm's backward pass, for its 3 parents (x, gamma, beta) or 4 (and the
/// residual, whose gradient is dy where the ReLU passed it).
#[derive(Debug)]
struct BatchNormGrad<const N: usize>;

impl<B: NormBackward, const N: usize> Backward<B, N> for BatchNormGrad<N> {
    /// x, gamma, moments, epsilon, with the ReLU the output, and SyncBN's peers.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f32,
        Option<FloatTensor<B>>,
        Option<SyncBatchNorm>,
    );

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, moments, epsilon, relu_output, sync) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let residual = N == 4;
        let (grads_of, d_residual) = B::fused_batch_norm_backward(
            x,
            gamma,
            moments,
            epsilon,
            dy,
            relu_output,
            residual,
            sync,
        );
        let grads_of = grads_of.into_iter().chain(d_residual);
        for (node, grad) in ops.parents.into_iter().zip(grads_of) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The sums of `terms` over the entries of `inputs` (slices of one length), in eight interleaved
/// f32 partial sums: one running sum is an add per value in sequence (bound by the add's latency,
/// a tenth of a step in batch norm's sums), eight vectorize. Inputs are taken eight entries at a
/// time as arrays, so the lanes compile to vector adds (indexing each entry kept them scalar: 6%
/// of a step, `perf annotate`). The order is fixed, so a run still repeats bit for bit; plane
/// sums stay short (a plane's values), and the planes are added in f64.
fn lane_sums<const N: usize, const K: usize>(
    inputs: [&[f32]; N],
    terms: impl Fn([f32; N]) -> [f32; K],
) -> [f32; K] {
    const LANES: usize = 8;
    let len = inputs[0].len();
    let split = inputs.map(|s| s[..len].as_chunks::<LANES>());
    let mut partial = [[0f32; LANES]; K];
    for c in 0..split[0].0.len() {
        let chunk: [&[f32; LANES]; N] = std::array::from_fn(|n| &split[n].0[c]);
        for lane in 0..LANES {
            let terms = terms(chunk.map(|values| values[lane]));
            for (partial, term) in partial.iter_mut().zip(terms) {
                partial[lane] += term;
            }
        }
    }
    let mut sums = partial.map(|p| p.iter().sum::<f32>());
    for i in 0..split[0].1.len() {
        for (sum, term) in sums.iter_mut().zip(terms(split.map(|(_, tail)| tail[i]))) {
            *sum += term;
        }
    }
    sums
}

/// Per-slot sums of `count` values each on this device, over the whole batch: under `sync`, summed
/// over every peer's images, the count with them. Returns the sums and the count they cover.
fn over_batch(mut sums: Vec<f64>, count: f64, sync: Option<&SyncBatchNorm>) -> (Vec<f64>, f64) {
    let Some(sync) = sync else {
        return (sums, count);
    };
    sums.push(count);
    sync.sum(&mut sums);
    let count = sums.pop().expect("pushed above");
    (sums, count)
}

/// One plane's share of its slot's moments: its sum, and its squares about `shift` (its mean,
/// rounded to f32).
struct PlaneMoments {
    len: f64,
    sum: f64,
    shift: f64,
    squares: f64,
}

impl PlaneMoments {
    fn of(plane: &[f32]) -> Self {
        let sum = lane_sums([plane], |[v]| [v])[0];
        let shift = sum / plane.len() as f32;
        let squares = lane_sums([plane], |[v]| [(v - shift) * (v - shift)])[0];
        Self {
            len: plane.len() as f64,
            sum: sum as f64,
            shift: shift as f64,
            squares: squares as f64,
        }
    }

    /// Σ (v - mean)² = Σ (v - shift)² + 2 (shift - mean) Σ (v - shift) + len (shift - mean)².
    fn squares_about(&self, mean: f64) -> f64 {
        let d = self.shift - mean;
        self.squares + 2.0 * d * (self.sum - self.len * self.shift) + self.len * d * d
    }
}

/// x as `views` equal stacks of images of `channels` planes of `pixels` values each.
#[derive(Clone, Copy, Debug)]
struct Shape {
    images: usize,
    channels: usize,
    height: usize,
    width: usize,
    views: usize,
}

/// Per slot (view, channel): `y = x * scale + shift`.
struct Coefficients {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Shape {
    fn of(x: &FlexTensor, views: usize) -> Self {
        let shape = x.layout().shape();
        assert_eq!(shape.num_dims(), 4, "fused batch norm takes [B, C, H, W]");
        assert!(
            views > 0 && shape[0].is_multiple_of(views),
            "{} images do not split into {views} views",
            shape[0]
        );
        Self {
            images: shape[0],
            channels: shape[1],
            height: shape[2],
            width: shape[3],
            views,
        }
    }

    /// x's shape with as many views as its [2, views * C] `moments` have.
    fn with_moments(x: &FlexTensor, moments: &FlexTensor) -> Self {
        let channels = x.layout().shape()[1];
        Self::of(x, moments.layout().shape()[1] / channels)
    }

    fn dims(&self) -> Vec<usize> {
        vec![self.images, self.channels, self.height, self.width]
    }

    fn pixels(&self) -> usize {
        self.height * self.width
    }

    /// Statistics are kept per slot: view after view, each with its channels.
    fn slots(&self) -> usize {
        self.views * self.channels
    }

    fn images_per_view(&self) -> usize {
        self.images / self.views
    }

    /// The values one slot's statistics cover.
    fn count(&self) -> f64 {
        (self.images_per_view() * self.pixels()) as f64
    }

    /// The slot of `image`'s channel `c`.
    fn slot(&self, image: usize, c: usize) -> usize {
        image / self.images_per_view() * self.channels + c
    }

    /// Slot `s`'s planes, image after image of its view.
    fn planes<'a>(&self, values: &'a [f32], s: usize) -> impl Iterator<Item = &'a [f32]> {
        let (pixels, image) = (self.pixels(), self.channels * self.pixels());
        let (view, c) = (s / self.channels, s % self.channels);
        let per_view = self.images_per_view() * image;
        values[view * per_view..][..per_view]
            .chunks(image)
            .map(move |image| &image[c * pixels..][..pixels])
    }

    /// Per slot, in parallel: `f(s)` -> k sums, returned as k vectors of `slots` values.
    fn per_slot<const K: usize>(
        &self,
        f: impl Fn(usize) -> [f64; K] + Sync + Send,
    ) -> [Vec<f64>; K] {
        let sums: Vec<[f64; K]> = (0..self.slots()).into_par_iter().map(f).collect();
        std::array::from_fn(|k| sums.iter().map(|s| s[k]).collect())
    }

    /// Per-slot sums over the whole batch: this device's images, and under `sync` every
    /// peer's. Returns them with the count of values each slot covers.
    fn over_batch(&self, sums: Vec<f64>, sync: Option<&SyncBatchNorm>) -> (Vec<f64>, f64) {
        over_batch(sums, self.count(), sync)
    }

    /// [mean..., biased variance...] per slot. Each plane's sum, and its squares about its own
    /// mean, are taken while the plane is in cache (two passes over it: exact for inputs far from
    /// zero mean, where one-pass sums of squares cancel), then moved to the slot's mean: x is
    /// read from memory once.
    fn moments(&self, x: &[f32], sync: Option<&SyncBatchNorm>) -> Vec<f32> {
        let planes: Vec<Vec<PlaneMoments>> = (0..self.slots())
            .into_par_iter()
            .map(|s| self.planes(x, s).map(PlaneMoments::of).collect())
            .collect();
        let sums = planes
            .iter()
            .map(|p| p.iter().map(|p| p.sum).sum())
            .collect();
        let (sums, n) = self.over_batch(sums, sync);
        let mean: Vec<f64> = sums.iter().map(|s| s / n).collect();
        let squares = (planes.iter().zip(&mean))
            .map(|(planes, &mean)| planes.iter().map(|p| p.squares_about(mean)).sum())
            .collect();
        let (squares, _) = self.over_batch(squares, sync);
        let var = squares.iter().map(|s| s / n);
        mean.iter().copied().chain(var).map(|v| v as f32).collect()
    }

    /// Per slot: the mean and 1 / sqrt(var + eps).
    fn normalization<'a>(&self, moments: &'a [f32], eps: f32) -> (&'a [f32], Vec<f32>) {
        let (mean, var) = moments.split_at(self.slots());
        (mean, var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect())
    }

    fn coefficients(&self, gamma: &[f32], beta: &[f32], moments: &[f32], eps: f32) -> Coefficients {
        let (mean, inv_std) = self.normalization(moments, eps);
        let c = self.channels;
        let scale: Vec<f32> = (0..self.slots())
            .map(|s| gamma[s % c] * inv_std[s])
            .collect();
        let shift = (0..self.slots())
            .map(|s| beta[s % c] - mean[s] * scale[s])
            .collect();
        Coefficients { scale, shift }
    }

    /// `y = x * scale + shift` per slot, plus `residual` (laid out as x) when given, then the
    /// ReLU when `relu`; images in parallel.
    fn apply(&self, x: &[f32], k: &Coefficients, relu: bool, residual: Option<&[f32]>) -> Vec<f32> {
        let image = self.channels * self.pixels();
        // SAFETY: every image's planes are written whole, entry by entry.
        unsafe {
            written(x.len(), |y| {
                (y.par_chunks_mut(image).zip(x.par_chunks(image)))
                    .enumerate()
                    .for_each(|(i, (y, x))| {
                        let residual = residual.map(|r| &r[i * image..][..image]);
                        self.apply_image(i, x, k, relu, residual, y)
                    })
            })
        }
    }

    /// [`Shape::apply`] on image `i`'s planes.
    fn apply_image(
        &self,
        i: usize,
        x: &[f32],
        k: &Coefficients,
        relu: bool,
        residual: Option<&[f32]>,
        y: &mut [Uninit],
    ) {
        let pixels = self.pixels();
        let planes = y.chunks_mut(pixels).zip(x.chunks(pixels)).enumerate();
        for (c, (y, x)) in planes {
            let s = self.slot(i, c);
            let (scale, shift) = (k.scale[s], k.shift[s]);
            // As Burn's ReLU: zero where v <= 0, so a NaN passes through.
            let activate = |v: f32| if relu && v <= 0.0 { 0.0 } else { v };
            match residual {
                Some(r) => {
                    let r = &r[c * pixels..][..pixels];
                    for ((y, x), r) in y.iter_mut().zip(x).zip(r) {
                        y.write(activate(x * scale + shift + r));
                    }
                }
                None => {
                    for (y, x) in y.iter_mut().zip(x) {
                        y.write(activate(x * scale + shift));
                    }
                }
            }
        }
    }

    /// [dx, dgamma, dbeta] of the training-mode batch norm, with x̂ = (x - mean) / std per slot:
    /// dbeta = Σ dy, dgamma = Σ dy x̂, dx = gamma / std (dy - (dbeta + x̂ dgamma) / N), where dx
    /// takes its view's sums and the parameters' gradients add every view's. Under SyncBN dx
    /// takes the sums over all peers' images, while dgamma and dbeta stay this device's share:
    /// the peers' gradients are summed afterwards with every other weight's.
    fn backward(
        &self,
        x: &[f32],
        gamma: &[f32],
        moments: &[f32],
        eps: f32,
        dy: &[f32],
        sync: Option<&SyncBatchNorm>,
    ) -> [Vec<f32>; 3] {
        let (mean, inv_std) = self.normalization(moments, eps);
        let [dgamma, dbeta] = self.per_slot(|s| {
            let (mean, inv_std) = (mean[s], inv_std[s]);
            let planes = self.planes(x, s).zip(self.planes(dy, s));
            planes.fold([0f64; 2], |[dgamma, dbeta], (x, dy)| {
                let [plane_dgamma, plane_dbeta] =
                    lane_sums([x, dy], |[x, dy]| [dy * (x - mean) * inv_std, dy]);
                [dgamma + plane_dgamma as f64, dbeta + plane_dbeta as f64]
            })
        });
        let (global, n) = self.over_batch([dgamma.clone(), dbeta.clone()].concat(), sync);
        let to_f32 = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (sum_dgamma, sum_dbeta) = global.split_at(self.slots());
        let (sum_dgamma, sum_dbeta, n) = (to_f32(sum_dgamma), to_f32(sum_dbeta), n as f32);
        let pixels = self.pixels();
        let image = self.channels * pixels;
        let write = |dx: &mut [Uninit]| {
            (dx.par_chunks_mut(image)
                .zip(x.par_chunks(image).zip(dy.par_chunks(image))))
            .enumerate()
            .for_each(|(i, (dx, (x, dy)))| {
                let planes = dx
                    .chunks_mut(pixels)
                    .zip(x.chunks(pixels).zip(dy.chunks(pixels)));
                for (c, (dx, (x, dy))) in planes.enumerate() {
                    let s = self.slot(i, c);
                    let (mean, inv_std) = (mean[s], inv_std[s]);
                    let scale = gamma[c] * inv_std;
                    let (mean_dy, mean_dgamma) = (sum_dbeta[s] / n, sum_dgamma[s] / n);
                    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                        let x_hat = (x - mean) * inv_std;
                        dx.write(scale * (dy - mean_dy - x_hat * mean_dgamma));
                    }
                }
            })
        };
        // SAFETY: every image's planes are written whole, entry by entry.
        let dx = unsafe { written(x.len(), write) };
        [dx, self.over_views(&dgamma), self.over_views(&dbeta)]
    }

    /// A per-slot share summed over the views, per channel.
    fn over_views(&self, per_slot: &[f64]) -> Vec<f32> {
        let c = self.channels;
        (0..c)
            .map(|ch| (0..self.views).map(|v| per_slot[v * c + ch]).sum::<f64>() as f32)
            .collect()
    }
}
