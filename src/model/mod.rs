//! ResNet encoders with the CIFAR stem and the SimCLR projection head.
//!
//! The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps 32x32 inputs at full resolution in the
//! first stage, as in the SimCLR paper's CIFAR experiments and lightly's benchmarks.
//!
//! Over 500 lines with its tests (about 230): batch norm's training paths are tested here, against
//! Burn's `BatchNorm`, on every device.

use crate::collective::SyncBatchNorm;
use burn::module::{Module, ModuleMapper, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor};

pub use crate::arch::{ModelName, ResNetArch, PROJECTION_DIM};

mod conv;
#[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
mod cube;
mod norm;
mod precision;

pub use precision::{Lowering, Precision};

/// How a pass through the encoder runs: `views` equal stacks of images, each with its own batch
/// statistics while training; the convolutions and linear layers lowered as `lowering` says (a
/// training step's precision); batch norm's statistics summed over the peers of `sync` (SyncBN)
/// when it is set.
#[derive(Clone, Debug)]
pub struct Pass {
    pub views: usize,
    pub lowering: Lowering,
    pub sync: Option<SyncBatchNorm>,
}

impl Pass {
    /// `views` stacked views in f32, batch statistics this device's own.
    pub fn of_views(views: usize) -> Self {
        Self {
            views,
            lowering: Lowering::None,
            sync: None,
        }
    }
}

fn conv3x3(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Conv2d {
    conv(c_in, c_out, 3, stride, device)
}

fn conv(c_in: usize, c_out: usize, kernel: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            kernel / 2,
            kernel / 2,
            kernel / 2,
            kernel / 2,
        ))
        .with_bias(false)
        // torchvision's init: kaiming normal, fan_out, for ReLU.
        .with_initializer(Initializer::KaimingNormal {
            gain: 2f64.sqrt(),
            fan_out_only: true,
        })
        .init(device)
}

/// A bias-free convolution's forward pass, at the step's precision: through [`conv::conv2d`]
/// (im2col, then gemm on the CPU or Burn's matmul on the GPU backends with dcl's kernels; backward
/// included) in f32, Burn's own elsewhere (bf16 on CUDA, fusion builds).
fn conv_forward(conv: &Conv2d, x: Tensor<4>, lowering: Lowering) -> Tensor<4> {
    let geometry = match (conv.padding.clone(), conv.stride, conv.kernel_size) {
        (PaddingConfig2d::Explicit(t, l, b, r), [s, s2], [k, k2])
            if [l, b, r] == [t; 3] && s == s2 && k == k2 && conv.bias.is_none() =>
        {
            (conv.groups == 1 && conv.dilation == [1, 1]).then_some(conv::Geometry {
                stride: s,
                padding: t,
            })
        }
        _ => None,
    };
    // Every convolution the models build has a geometry; this covers a hand-made one.
    let Some(geometry) = geometry else {
        return conv.forward(x);
    };
    let ours = own_kernels(&x.device());
    precision::lowered(x, conv.weight.val(), lowering, |x, weight| {
        match ours && x.dtype() == DType::F32 {
            true => conv::conv2d(x, weight, geometry),
            false => {
                let (s, p) = (geometry.stride, geometry.padding);
                burn::tensor::module::conv2d(
                    x,
                    weight,
                    None,
                    ConvOptions::new([s; 2], [p; 2], [1, 1], 1),
                )
            }
        }
    })
}

/// A linear layer lowered as asked (the bias added in f32).
fn linear_forward(linear: &Linear, x: Tensor<2>, lowering: Lowering) -> Tensor<2> {
    let y = precision::lowered(x, linear.weight.val(), lowering, |x, weight| {
        burn::tensor::module::linear(x, weight, None)
    });
    match &linear.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

/// Batch norm of feature maps [B, C, H, W], as Burn's `BatchNorm::forward` computes it (batch
/// statistics with gradient while training, biased variance into the running averages; running
/// statistics in eval). Training takes [`norm`]'s fused op (two passes forward, two backward,
/// instead of a chain of element-wise ops and their gradients). In eval it is
/// `x * scale + shift` with the coefficients laid out [B, C, 1, 1], contiguous: burn-flex 0.21
/// walked Burn's [1, C, 1, 1] broadcast one element at a time, and the GPU backends do not mind.
/// The projection head's BatchNorm1d runs here too, as [B, C, 1, 1], so that every running
/// statistic is committed the same way.
///
/// While training, x may stack `views` equal batches (both views of the same images, in one
/// encoder pass): each is normalized by its own statistics, and the running averages take them
/// one view after the other, which is what separate passes would compute, with half the
/// dispatches on a GPU and larger matrices for the CPU's gemm.
fn batch_norm(bn: &BatchNorm, x: Tensor<4>, pass: &Pass) -> Tensor<4> {
    let c = x.dims()[1];
    let device = x.device();
    match device.is_autodiff() {
        true if own_kernels(&device) => fused_batch_norm(bn, x, pass, Then::Nothing),
        true => batch_norm_from_tensor_ops(bn, x, pass.views),
        false => {
            let stat = |state: &RunningState<Tensor<1>>| state.value().reshape([1, c]);
            let (mean, var) = (stat(&bn.running_mean), stat(&bn.running_var));
            normalize(bn, x, mean, var)
        }
    }
}

/// [`batch_norm`], then a ReLU: in the same op where batch norm trains fused.
fn batch_norm_relu(bn: &BatchNorm, x: Tensor<4>, pass: &Pass) -> Tensor<4> {
    match x.device().is_autodiff() && own_kernels(&x.device()) {
        true => fused_batch_norm(bn, x, pass, Then::Relu),
        false => relu(batch_norm(bn, x, pass)),
    }
}

/// `relu(batch_norm(x) + residual)`, a residual block's end: one op where batch norm trains
/// fused.
fn batch_norm_residual_relu(
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Tensor<4>,
    pass: &Pass,
) -> Tensor<4> {
    match x.device().is_autodiff() && own_kernels(&x.device()) {
        true => fused_batch_norm(bn, x, pass, Then::AddRelu(Box::new(residual))),
        false => relu(batch_norm(bn, x, pass) + residual),
    }
}

/// What the fused batch norm applies after normalizing.
enum Then {
    Nothing,
    Relu,
    /// A residual added, then the ReLU (boxed: a tensor handle is half a kilobyte).
    AddRelu(Box<Tensor<4>>),
}

/// Whether `device` trains through dcl's own ops ([`conv`]'s convolution, [`norm`]'s fused batch
/// norm): on the CPU, and on the GPU backends that have their kernels (not under Burn's fusion).
fn own_kernels(device: &Device) -> bool {
    crate::backend::has_fast_conv(device) || crate::backend::has_cube_kernels(device)
}

/// Training mode on the CPU device and the GPU devices: [`norm`]'s fused op, with what comes
/// after it (`then`).
fn fused_batch_norm(bn: &BatchNorm, x: Tensor<4>, pass: &Pass, then: Then) -> Tensor<4> {
    let sync = pass.sync.clone();
    let moments = norm::channel_moments(x.clone(), pass.views, sync.clone());
    let device = moments.device();
    let running = [&bn.running_mean, &bn.running_var].map(|s| s.value_sync().to_device(&device));
    let [mean, var] = running;
    let updated = norm::running_update(mean, var, moments.clone(), bn.momentum);
    for (state, value) in [&bn.running_mean, &bn.running_var].into_iter().zip(updated) {
        commit(state, value);
    }
    let (gamma, beta, epsilon) = (bn.gamma.val(), bn.beta.val(), bn.epsilon);
    match then {
        Then::Nothing => norm::batch_norm(x, gamma, beta, moments, epsilon, false, sync),
        Then::Relu => norm::batch_norm(x, gamma, beta, moments, epsilon, true, sync),
        Then::AddRelu(residual) => {
            norm::batch_norm_residual_relu(x, gamma, beta, moments, *residual, epsilon, sync)
        }
    }
}

/// Training mode elsewhere (a GPU build with fusion, whose peers keep their own statistics): batch
/// statistics with Burn's tensor ops, the gradient by autodiff. x is seen as [views, N, C, H*W], so each view's statistics broadcast
/// over its own images: no coefficients copied out per image, which on a GPU cost a dispatch
/// forward and a reduction backward for every one.
fn batch_norm_from_tensor_ops(bn: &BatchNorm, x: Tensor<4>, views: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let x = x.reshape([views, b / views, c, h * w]);
    // Per view and channel: the mean over images of the mean over pixels, [views, 1, C, 1].
    let channel_mean = |t: Tensor<4>| t.mean_dim(3).mean_dim(1);
    let mean = channel_mean(x.clone());
    let centered = x - mean.clone();
    let var = channel_mean(centered.clone().square());
    update_running(
        bn,
        mean.reshape([views, c]),
        var.clone().reshape([views, c]),
    );
    let gamma = bn.gamma.val().reshape([1, 1, c, 1]);
    let beta = bn.beta.val().reshape([1, 1, c, 1]);
    let scale = gamma / var.add_scalar(bn.epsilon).sqrt();
    (centered * scale + beta).reshape([b, c, h, w])
}

/// The running averages' momentum steps from the batch's [views, C] means and biased
/// variances, view after view, folded into one update per statistic:
/// r <- (1-m)^V r + sum_v m (1-m)^(V-1-v) batch_v (a GPU's dispatches are per op, not per view).
fn update_running(bn: &BatchNorm, mean: Tensor<2>, var: Tensor<2>) {
    let [views, _] = mean.dims();
    let m = bn.momentum;
    let decay = |steps: usize| (1.0 - m).powi(steps as i32);
    let weights: Vec<f32> = (0..views)
        .map(|v| (m * decay(views - 1 - v)) as f32)
        .collect();
    let weights = Tensor::<1>::from_floats(weights.as_slice(), &mean.device()).reshape([views, 1]);
    for (state, batch) in [(&bn.running_mean, mean), (&bn.running_var, var)] {
        let old = state.value_sync().to_device(&batch.device());
        let batch = (batch.detach() * weights.clone()).sum_dim(0).squeeze_dim(0);
        commit(state, old.mul_scalar(decay(views)).add(batch));
    }
}

/// A running statistic's new value, set where saving and evaluation read it. Not through
/// `RunningState::update`: that keeps a value per thread and averages them at the next read, a
/// division by one here, and on a GPU a dispatch a statistic a step (26 of a `resnet-mini` step).
/// `Module::map` sets the value itself, and a clone of the state shares it (its fields are `Arc`s).
fn commit(state: &RunningState<Tensor<1>>, value: Tensor<1>) {
    struct Set(Option<Tensor<1>>);
    impl ModuleMapper for Set {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, old, mapper) = param.consume();
            let value = self.0.take().expect("a running state holds one tensor");
            Param::from_mapped_value(id, value.reshape(old.dims()), mapper)
        }
    }
    let _ = state.clone().map(&mut Set(Some(value.detach())));
}

/// [views, C] coefficients laid out [B, C, 1, 1], each view's row for its images (see
/// [`batch_norm`]).
fn per_image(t: Tensor<2>, images: usize) -> Tensor<4> {
    let [views, c] = t.dims();
    t.reshape([views, 1, c])
        .repeat_dim(1, images / views)
        .reshape([images, c, 1, 1])
}

/// `x * scale + shift` from the [views, C] means and variances.
fn normalize(bn: &BatchNorm, x: Tensor<4>, mean: Tensor<2>, var: Tensor<2>) -> Tensor<4> {
    let [b, c, _, _] = x.dims();
    let views = mean.dims()[0];
    let gamma = bn.gamma.val().reshape([1, c]).repeat_dim(0, views);
    let beta = bn.beta.val().reshape([1, c]).repeat_dim(0, views);
    let scale = gamma / var.add_scalar(bn.epsilon).sqrt();
    let shift = beta - mean * scale.clone();
    x * per_image(scale, b) + per_image(shift, b)
}

/// The 1x1 strided projection of the residual when a block changes shape.
#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

#[derive(Module, Debug)]
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| Downsample {
            conv: conv(c_in, c_out, 1, stride, device),
            bn: bn(c_out, device),
        });
        Self {
            conv1: conv3x3(c_in, c_out, stride, device),
            bn1: bn(c_out, device),
            conv2: conv3x3(c_out, c_out, 1, device),
            bn2: bn(c_out, device),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<4>, pass: &Pass) -> Tensor<4> {
        let conv = |conv: &Conv2d, x: Tensor<4>| conv_forward(conv, x, pass.lowering);
        let identity = match &self.downsample {
            Some(d) => batch_norm(&d.bn, conv(&d.conv, x.clone()), pass),
            None => x.clone(),
        };
        let out = batch_norm_relu(&self.bn1, conv(&self.conv1, x), pass);
        batch_norm_residual_relu(&self.bn2, conv(&self.conv2, out), identity, pass)
    }
}

/// The backbone: images [B, 3, H, W] to features [B, widths[3]].
#[derive(Module, Debug)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub layers: Vec<Vec<BasicBlock>>,
}

impl ResNet {
    pub fn new(arch: ResNetArch, device: &Device) -> Self {
        let mut layers: Vec<Vec<BasicBlock>> = (0..4).map(|_| Vec::new()).collect();
        for b in arch.block_specs() {
            layers[b.stage].push(BasicBlock::new(b.c_in, b.c_out, b.stride, device));
        }
        Self {
            conv1: conv3x3(3, arch.widths[0], 1, device),
            bn1: bn(arch.widths[0], device),
            layers,
        }
    }

    /// The description this backbone was built from.
    pub fn arch(&self) -> ResNetArch {
        let stage = |s: usize| &self.layers[s];
        ResNetArch {
            widths: [0, 1, 2, 3].map(|s| stage(s)[0].bn1.gamma.val().dims()[0]),
            blocks: [0, 1, 2, 3].map(|s| stage(s).len()),
        }
    }

    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward_stacked(images, &Pass::of_views(1))
    }

    /// [`ResNet::forward`] of the stacked views of `pass` (see [`batch_norm`]).
    fn forward_stacked(&self, images: Tensor<4>, pass: &Pass) -> Tensor<2> {
        let stem = conv_forward(&self.conv1, images, pass.lowering);
        let mut x = batch_norm_relu(&self.bn1, stem, pass);
        for block in self.layers.iter().flatten() {
            x = block.forward(x, pass);
        }
        let [b, c, h, w] = x.dims();
        // Global average pooling.
        x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
    }
}

/// SimCLR's projection head: Linear-BN-ReLU-Linear to 128-d.
#[derive(Module, Debug)]
pub struct ProjectionHead {
    pub linear1: Linear,
    pub bn: BatchNorm,
    pub linear2: Linear,
}

impl ProjectionHead {
    pub fn new(d_in: usize, device: &Device) -> Self {
        Self {
            linear1: LinearConfig::new(d_in, d_in).with_bias(false).init(device),
            bn: bn(d_in, device),
            linear2: LinearConfig::new(d_in, PROJECTION_DIM).init(device),
        }
    }

    pub fn forward(&self, features: Tensor<2>) -> Tensor<2> {
        self.forward_stacked(features, &Pass::of_views(1))
    }

    fn forward_stacked(&self, features: Tensor<2>, pass: &Pass) -> Tensor<2> {
        let hidden = linear_forward(&self.linear1, features, pass.lowering);
        let [b, c] = hidden.dims();
        let hidden = batch_norm_relu(&self.bn, hidden.reshape([b, c, 1, 1]), pass);
        linear_forward(&self.linear2, hidden.reshape([b, c]), pass.lowering)
    }
}

/// Backbone plus projection head: what self-supervised pretraining trains.
#[derive(Module, Debug)]
pub struct Encoder {
    pub backbone: ResNet,
    pub head: ProjectionHead,
}

impl Encoder {
    pub fn new(name: ModelName, device: &Device) -> Self {
        let arch = name.arch();
        Self {
            backbone: ResNet::new(arch, device),
            head: ProjectionHead::new(arch.feature_dim(), device),
        }
    }

    /// The embedding the contrastive loss sees.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.backbone.forward(images))
    }

    /// The embeddings of several views of the same images in one pass: each view's batch
    /// statistics are its own, so this equals a pass per view (to float rounding), with half
    /// the kernel launches for two views.
    pub fn forward_views<const V: usize>(&self, views: [Tensor<4>; V]) -> [Tensor<2>; V] {
        let images = Tensor::cat(Vec::from(views), 0);
        let z = self.forward_stacked(images, &Pass::of_views(V));
        let mut chunks = z.chunk(V, 0).into_iter();
        std::array::from_fn(|_| chunks.next().expect("one chunk a view"))
    }

    /// [`Encoder::forward_views`] of views already stacked ([V·N, 3, H, W], view after view), as
    /// one tensor of embeddings in the same order ([V·N, D]), the way the fused loss kernel reads
    /// them; run as `pass` says (a training step's precision and SyncBN's peers).
    pub fn forward_stacked(&self, images: Tensor<4>, pass: &Pass) -> Tensor<2> {
        let features = self.backbone.forward_stacked(images, pass);
        self.head.forward_stacked(features, pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{AutodiffModule, Param};
    use burn::tensor::{Distribution, Gradients};

    /// A batch norm with the given affine parameters and fresh running statistics.
    fn batch_norm_with(gamma: &Tensor<1>, beta: &Tensor<1>) -> BatchNorm {
        let mut bn = bn(gamma.dims()[0], &gamma.device());
        bn.gamma = Param::from_tensor(gamma.clone().require_grad());
        bn.beta = Param::from_tensor(beta.clone().require_grad());
        bn
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// The CPU's autodiff device, seeded, and normal draws of shape [B, C, H, W] on it.
    fn seeded(seed: u64) -> (Device, impl Fn([usize; 4], f64, f64) -> Tensor<4>) {
        let device = crate::backend::cpu().autodiff();
        device.seed(seed);
        let on = device.clone();
        let random = move |shape, mean, std| {
            Tensor::<4>::random(shape, Distribution::Normal(mean, std), &on)
        };
        (device, random)
    }

    /// The autodiff devices batch norm trains on: the CPU and, where built, wgpu (lavapipe),
    /// whose fused batch norm is `norm`'s CubeCL kernels.
    pub(super) fn training_devices() -> Vec<Device> {
        let mut devices = vec![crate::backend::cpu().autodiff()];
        #[cfg(feature = "wgpu")]
        devices.push(
            crate::backend::device(crate::backend::DeviceKind::Wgpu)
                .expect("wgpu needs a Vulkan adapter: apt install mesa-vulkan-drivers"),
        );
        devices
    }

    fn to<const D: usize>(t: &Tensor<D>, device: &Device) -> Tensor<D> {
        Tensor::from_data(t.to_data(), device)
    }

    /// gamma and beta of `channels`, drawn around 1 and 0.
    fn affine(
        random: impl Fn([usize; 4], f64, f64) -> Tensor<4>,
        channels: usize,
    ) -> [Tensor<1>; 2] {
        [1.0, 0.0].map(|mean| random([1, 1, 1, channels], mean, 0.5).reshape([channels]))
    }

    /// Two batch norms' gamma and beta gradients and their running statistics agree.
    fn assert_parameters_agree(
        a: &BatchNorm,
        grads_a: &Gradients,
        b: &BatchNorm,
        grads_b: &Gradients,
    ) {
        for (pa, pb) in [(&a.gamma, &b.gamma), (&a.beta, &b.beta)] {
            let (ga, gb) = (pa.grad(grads_a).unwrap(), pb.grad(grads_b).unwrap());
            assert!(max_diff(ga, gb) < 1e-4);
        }
        let stats = |bn: &BatchNorm| [bn.running_mean.value_sync(), bn.running_var.value_sync()];
        for (sa, sb) in stats(a).into_iter().zip(stats(b)) {
            assert!(max_diff(sa, sb) < 1e-6);
        }
    }

    /// Both training paths (the fused op, the tensor ops of a GPU build with fusion) against
    /// Burn's `BatchNorm`, alone and followed by a ReLU: output, gradients of input, gamma and
    /// beta, running statistics; then eval. The second shape has enough rows a channel that
    /// the GPU kernels' workgroups take their wide form.
    #[test]
    fn batch_norm_equals_burns_in_training_and_in_eval() {
        for device in training_devices() {
            for shape in [[3, 5, 4, 6], [3, 5, 360, 3]] {
                batch_norm_equals_burns_on(&device, shape);
            }
        }
    }

    fn batch_norm_equals_burns_on(device: &Device, shape: [usize; 4]) {
        let (_, random) = seeded(11);
        let [gamma, beta] = affine(&random, shape[1]).map(|t| to(&t, device));
        let x_values = random(shape, 2.0, 3.0);
        // A weighted sum, so that every output's gradient differs.
        let weights = to(&random(shape, 0.0, 1.0), device);
        let device = device.clone();
        // x as given, and x channels-last in memory (as a GPU convolution may hand it over):
        // a leaf of either layout, and x the [B, C, H, W] view of it.
        type View = fn(Tensor<4>) -> Tensor<4>;
        let layouts: [(_, View); 2] = [
            (x_values.to_data(), |leaf| leaf),
            (x_values.clone().permute([0, 2, 3, 1]).into_data(), |leaf| {
                leaf.permute([0, 3, 1, 2])
            }),
        ];
        // Each path alone, and followed by a ReLU (fused into the op on the fused path).
        type Path = fn(&BatchNorm, Tensor<4>, usize, bool) -> Tensor<4>;
        let tensor_ops: Path = |bn, x, views, with_relu| {
            let y = batch_norm_from_tensor_ops(bn, x, views);
            if with_relu {
                relu(y)
            } else {
                y
            }
        };
        let fused: Path = |bn, x, views, with_relu| {
            let then = if with_relu { Then::Relu } else { Then::Nothing };
            fused_batch_norm(bn, x, &Pass::of_views(views), then)
        };
        let cases = [fused, tensor_ops]
            .into_iter()
            .flat_map(|path| [(path, false), (path, true)]);
        for (path, with_relu) in cases {
            for (data, view) in &layouts {
                // A fresh leaf each time: a backward pass consumes the graph of the one before.
                let leaf = Tensor::<4>::from_data(data.clone(), &device).require_grad();
                let (ours, burns) = (
                    batch_norm_with(&gamma, &beta),
                    batch_norm_with(&gamma, &beta),
                );
                // A view each: the first backward pass consumes the nodes it walks.
                let y_ours = path(&ours, view(leaf.clone()), 1, with_relu);
                let y_burn = burns.forward(view(leaf.clone()));
                let y_burn = if with_relu { relu(y_burn) } else { y_burn };
                assert!(max_diff(y_ours.clone(), y_burn.clone()) < 1e-5);

                let grads_ours = (y_ours * weights.clone()).sum().backward();
                let grads_burn = (y_burn * weights.clone()).sum().backward();
                let grad = |t: &Tensor<4>, g| t.grad(g).unwrap();
                assert!(max_diff(grad(&leaf, &grads_ours), grad(&leaf, &grads_burn)) < 1e-5);
                assert_parameters_agree(&ours, &grads_ours, &burns, &grads_burn);
            }
        }
        let x_values = x_values.into_data();
        let (ours, burns) = (
            batch_norm_with(&gamma, &beta),
            batch_norm_with(&gamma, &beta),
        );
        // One training step moves the running statistics off their initial values.
        let x = Tensor::<4>::from_data(x_values, &device);
        let _ = (
            batch_norm(&ours, x.clone(), &Pass::of_views(1)),
            burns.forward(x.clone()),
        );
        // Eval mode (no autodiff): the running statistics, the same on both.
        let (ours, burns) = (ours.valid(), burns.valid());
        let x = x.inner();
        assert!(
            max_diff(
                batch_norm(&ours, x.clone(), &Pass::of_views(1)),
                burns.forward(x)
            ) < 1e-5
        );
    }

    /// A residual block's end as one op, `relu(batch_norm(x) + residual)`, against Burn's
    /// `BatchNorm`, a sum and its ReLU: output and the gradients of x, the residual, gamma and
    /// beta, with the residual contiguous and channels-last (as a convolution may hand it over).
    #[test]
    fn batch_norm_residual_relu_equals_burns() {
        for device in training_devices() {
            let (_, random) = seeded(13);
            let [gamma, beta] = affine(&random, 5).map(|t| to(&t, &device));
            let [x_values, r_values, weights] =
                [(2.0, 3.0), (0.0, 1.5), (0.0, 1.0)].map(|(m, s)| random([3, 5, 4, 6], m, s));
            let weights = to(&weights, &device);
            type View = fn(Tensor<4>) -> Tensor<4>;
            let layouts: [(_, View); 2] = [
                (r_values.to_data(), |leaf| leaf),
                (r_values.clone().permute([0, 2, 3, 1]).into_data(), |leaf| {
                    leaf.permute([0, 3, 1, 2])
                }),
            ];
            for (data, view) in &layouts {
                let leaves = || {
                    let x = Tensor::<4>::from_data(x_values.to_data(), &device).require_grad();
                    let r = Tensor::<4>::from_data(data.clone(), &device).require_grad();
                    (x, r)
                };
                let ((x_ours, r_ours), (x_burn, r_burn)) = (leaves(), leaves());
                let (ours, burns) = (
                    batch_norm_with(&gamma, &beta),
                    batch_norm_with(&gamma, &beta),
                );
                let y_ours = batch_norm_residual_relu(
                    &ours,
                    x_ours.clone(),
                    view(r_ours.clone()),
                    &Pass::of_views(1),
                );
                let y_burn = relu(burns.forward(x_burn.clone()) + view(r_burn.clone()));
                assert!(max_diff(y_ours.clone(), y_burn.clone()) < 1e-5);
                let grads_ours = (y_ours * weights.clone()).sum().backward();
                let grads_burn = (y_burn * weights.clone()).sum().backward();
                for (a, b) in [(&x_ours, &x_burn), (&r_ours, &r_burn)] {
                    let (ga, gb) = (a.grad(&grads_ours).unwrap(), b.grad(&grads_burn).unwrap());
                    assert!(max_diff(ga, gb) < 1e-5, "{device:?}");
                }
                assert_parameters_agree(&ours, &grads_ours, &burns, &grads_burn);
            }
        }
    }

    /// Two views stacked in one batch norm equal a batch norm of each view alone, on both
    /// training paths: outputs, the gradients of the inputs, gamma and beta, and the running
    /// statistics after both.
    #[test]
    fn stacked_views_equal_one_batch_norm_per_view() {
        for device in training_devices() {
            stacked_views_equal_one_batch_norm_per_view_on(&device);
        }
    }

    fn stacked_views_equal_one_batch_norm_per_view_on(device: &Device) {
        let (_, random) = seeded(12);
        let [gamma, beta] = affine(&random, 3).map(|t| to(&t, device));
        // Views with different statistics, so that sharing them would show; more values a
        // channel (4 x 90) than a GPU workgroup has threads (256).
        let views = [
            random([4, 3, 9, 10], 1.0, 2.0),
            random([4, 3, 9, 10], -2.0, 0.5),
        ]
        .map(|v| to(&v, device));
        let weights = to(&random([8, 3, 9, 10], 0.0, 1.0), device);
        let device = device.clone();
        type Path = fn(&BatchNorm, Tensor<4>, usize) -> Tensor<4>;
        let fused: Path =
            |bn, x, views| fused_batch_norm(bn, x, &Pass::of_views(views), Then::Relu);
        for path in [fused, batch_norm_from_tensor_ops] {
            let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
            let (stacked_in, apart_in) = (
                views.clone().map(|v| leaf(&v)),
                views.clone().map(|v| leaf(&v)),
            );
            let (stacked, apart) = (
                batch_norm_with(&gamma, &beta),
                batch_norm_with(&gamma, &beta),
            );
            let y_stacked = path(&stacked, Tensor::cat(stacked_in.to_vec(), 0), 2);
            let y_apart = Tensor::cat(apart_in.clone().map(|x| path(&apart, x, 1)).to_vec(), 0);
            assert!(max_diff(y_stacked.clone(), y_apart.clone()) < 1e-5);

            let grads_stacked = (y_stacked * weights.clone()).sum().backward();
            let grads_apart = (y_apart * weights.clone()).sum().backward();
            for (a, b) in stacked_in.iter().zip(&apart_in) {
                let (ga, gb) = (
                    a.grad(&grads_stacked).unwrap(),
                    b.grad(&grads_apart).unwrap(),
                );
                assert!(max_diff(ga, gb) < 1e-5);
            }
            assert_parameters_agree(&stacked, &grads_stacked, &apart, &grads_apart);
        }
    }

    /// SyncBN: two peers with half a batch each, their statistics summed over both, compute one
    /// batch norm (and ReLU) of the whole batch: each half of the output and of the input's
    /// gradient, the peers' gamma and beta gradients summed, the running statistics; on every
    /// device (the GPU kernels' sums cross the host). Without the sums each half is off.
    #[test]
    fn peers_sharing_batch_statistics_equal_one_batch_norm() {
        for device in training_devices() {
            peers_sharing_batch_statistics_on(&device);
        }
    }

    fn peers_sharing_batch_statistics_on(device: &Device) {
        let (_, random) = seeded(13);
        let [gamma, beta] = affine(&random, 3).map(|t| to(&t, device));
        // Halves with different statistics, so that a peer's own would show.
        let halves = [
            random([3, 3, 5, 7], 1.0, 2.0),
            random([3, 3, 5, 7], -2.0, 0.5),
        ];
        let weights = random([6, 3, 5, 7], 0.0, 1.0);
        // A batch norm's output, input gradient, parameters' gradients and running statistics.
        let run = |x: Tensor<4>, weights: Tensor<4>, sync: Option<SyncBatchNorm>| {
            // Parameters of its own (copies, not clones): peers sharing a tensor would share
            // an autodiff graph, and one peer's backward pass would wait on the other's.
            let bn = batch_norm_with(&to(&gamma, device), &to(&beta, device));
            let x = to(&x, device).require_grad();
            let pass = Pass {
                sync,
                ..Pass::of_views(1)
            };
            let y = fused_batch_norm(&bn, x.clone(), &pass, Then::Relu);
            let grads = (y.clone() * to(&weights, device)).sum().backward();
            let running = [bn.running_mean.value_sync(), bn.running_var.value_sync()];
            // Gradients come on the inner device: back on this one, to compare.
            let [dgamma, dbeta] =
                [&bn.gamma, &bn.beta].map(|p| to(&p.grad(&grads).unwrap(), device));
            (
                y,
                to(&x.grad(&grads).unwrap(), device),
                [dgamma, dbeta],
                running,
            )
        };
        let (y, dx, dparams, running) = run(Tensor::cat(halves.to_vec(), 0), weights.clone(), None);
        let weight_halves = weights.chunk(2, 0);
        let peers: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = crate::collective::Collective::group(2)
                .into_iter()
                .zip(halves.clone().into_iter().zip(weight_halves.clone()))
                .map(|(peer, (x, w))| {
                    let run = &run;
                    scope.spawn(move || {
                        let (y, dx, dparams, running) = run(x, w, Some(SyncBatchNorm::over(&peer)));
                        // Tensors leave the thread as data.
                        let data =
                            |t: Vec<Tensor<4>>| t.iter().map(|t| t.to_data()).collect::<Vec<_>>();
                        let flat = |t: &Tensor<1>| t.clone().reshape([1, 1, 1, t.dims()[0]]);
                        let params = dparams.iter().chain(&running).map(flat).collect();
                        (data(vec![y, dx]), data(params))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let back = |d: &burn::tensor::TensorData| Tensor::<4>::from_data(d.clone(), device);
        let halves_of = |i: usize| Tensor::cat(peers.iter().map(|(t, _)| back(&t[i])).collect(), 0);
        assert!(max_diff(halves_of(0), y.clone()) < 1e-5, "output");
        assert!(max_diff(halves_of(1), dx) < 1e-5, "input gradient");
        let param = |peer: usize, i: usize| back(&peers[peer].1[i]).flatten::<1>(0, 3);
        for (i, whole) in dparams.into_iter().enumerate() {
            assert!(
                max_diff(param(0, i) + param(1, i), whole) < 1e-4,
                "gamma, beta"
            );
        }
        for (i, whole) in running.into_iter().enumerate() {
            for peer in 0..2 {
                assert!(
                    max_diff(param(peer, 2 + i), whole.clone()) < 1e-6,
                    "running"
                );
            }
        }
        let (own, ..) = run(halves[0].clone(), weight_halves[0].clone(), None);
        let first_half = y.narrow(0, 0, 3);
        assert!(max_diff(own, first_half) > 0.1, "a peer's own statistics");
    }
}
