//! ResNet encoders with the CIFAR stem and the SimCLR projection head.
//!
//! The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps 32x32 inputs at full resolution in the
//! first stage, as in the SimCLR paper's CIFAR experiments and lightly's benchmarks.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{backend::Backend, Tensor};
use serde::Serialize;

pub use crate::arch::{ModelName, ResNetArch, PROJECTION_DIM};

fn conv3x3<B: Backend>(c_in: usize, c_out: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    conv(c_in, c_out, 3, stride, device)
}

fn conv<B: Backend>(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    device: &B::Device,
) -> Conv2d<B> {
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

fn bn<B: Backend>(channels: usize, device: &B::Device) -> BatchNorm<B> {
    BatchNormConfig::new(channels).init(device)
}

/// The 1x1 strided projection of the residual when a block changes shape.
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm<B>,
}

#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub conv2: Conv2d<B>,
    pub bn2: BatchNorm<B>,
    pub downsample: Option<Downsample<B>>,
}

impl<B: Backend> BasicBlock<B> {
    fn new(c_in: usize, c_out: usize, stride: usize, device: &B::Device) -> Self {
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

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x.clone())),
            None => x.clone(),
        };
        let out = relu(self.bn1.forward(self.conv1.forward(x)));
        let out = self.bn2.forward(self.conv2.forward(out));
        relu(out + identity)
    }
}

/// The backbone: images [B, 3, H, W] to features [B, widths[3]].
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub layers: Vec<Vec<BasicBlock<B>>>,
}

impl<B: Backend> ResNet<B> {
    pub fn new(arch: ResNetArch, device: &B::Device) -> Self {
        let mut c_in = arch.widths[0];
        let layers = (0..4)
            .map(|stage| {
                let c_out = arch.widths[stage];
                (0..arch.blocks[stage])
                    .map(|i| {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let block = BasicBlock::new(c_in, c_out, stride, device);
                        c_in = c_out;
                        block
                    })
                    .collect()
            })
            .collect();
        Self {
            conv1: conv3x3(3, arch.widths[0], 1, device),
            bn1: bn(arch.widths[0], device),
            layers,
        }
    }

    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = relu(self.bn1.forward(self.conv1.forward(images)));
        for block in self.layers.iter().flatten() {
            x = block.forward(x);
        }
        let [b, c, h, w] = x.dims();
        // Global average pooling.
        x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c])
    }
}

/// SimCLR's projection head: Linear-BN-ReLU-Linear to 128-d.
#[derive(Module, Debug)]
pub struct ProjectionHead<B: Backend> {
    pub linear1: Linear<B>,
    pub bn: BatchNorm<B>,
    pub linear2: Linear<B>,
}

impl<B: Backend> ProjectionHead<B> {
    pub fn new(d_in: usize, device: &B::Device) -> Self {
        Self {
            linear1: LinearConfig::new(d_in, d_in).with_bias(false).init(device),
            bn: bn(d_in, device),
            linear2: LinearConfig::new(d_in, PROJECTION_DIM).init(device),
        }
    }

    pub fn forward(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear2
            .forward(relu(self.bn.forward(self.linear1.forward(features))))
    }
}

/// Backbone plus projection head: what self-supervised pretraining trains.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub backbone: ResNet<B>,
    pub head: ProjectionHead<B>,
}

impl<B: Backend> Encoder<B> {
    pub fn new(name: ModelName, device: &B::Device) -> Self {
        let arch = name.arch();
        Self {
            backbone: ResNet::new(arch, device),
            head: ProjectionHead::new(arch.feature_dim(), device),
        }
    }

    /// The embedding the contrastive loss sees.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(self.backbone.forward(images))
    }
}

/// Parameter counts, as `dcl model info` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub backbone: usize,
    pub head: usize,
    pub total: usize,
    pub feature_dim: usize,
    pub projection_dim: usize,
}

/// Trainable parameters only: batch-norm running statistics are buffers, as PyTorch counts them.
pub fn param_counts<B: Backend>(encoder: &Encoder<B>, name: ModelName) -> ParamCounts {
    let tensors = crate::weights::torchvision_tensors(encoder);
    let count = |head: bool| -> usize {
        tensors
            .iter()
            .filter(|t| t.name.starts_with("head.") == head && !t.name.contains(".running_"))
            .map(|t| t.data.len())
            .sum()
    };
    let (backbone, head) = (count(false), count(true));
    ParamCounts {
        backbone,
        head,
        total: backbone + head,
        feature_dim: name.arch().feature_dim(),
        projection_dim: PROJECTION_DIM,
    }
}
