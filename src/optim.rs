//! Optimizers for pretraining: SGD with momentum, LARS and Adam, behind one type so the trainer
//! and its checkpoints need not care which.

use crate::model::Encoder;
use crate::weights::BytesRecorder;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{
    adaptor::OptimizerAdaptor, Adam, AdamConfig, GradientsParams, Optimizer, Sgd, SgdConfig,
    SimpleOptimizer,
};
use burn::record::{Record, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Lars,
    Adam,
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(Self::Sgd),
            "lars" => Ok(Self::Lars),
            "adam" => Ok(Self::Adam),
            other => Err(format!(
                "unknown optimizer '{other}': expected sgd, lars or adam"
            )),
        }
    }
}

/// LARS (You et al. 2017) as SimCLR uses it: SGD with momentum whose step for each weight
/// matrix is scaled by `eta |w| / |g + wd w|`. Biases and batch-norm vectors are not adapted and
/// not decayed, the usual exclusion.
#[derive(Clone, Debug)]
pub struct Lars {
    pub momentum: f64,
    pub weight_decay: f64,
    pub eta: f64,
}

#[derive(Record, Clone)]
pub struct LarsState<B: Backend, const D: usize> {
    pub velocity: Tensor<B, D>,
}

impl<B: Backend> SimpleOptimizer<B> for Lars {
    type State<const D: usize> = LarsState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        weight: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let update = if D > 1 {
            let update = grad + weight.clone().mul_scalar(self.weight_decay);
            let w_norm = weight.clone().square().sum().sqrt();
            let u_norm = update.clone().square().sum().sqrt();
            let adaptable = w_norm
                .clone()
                .greater_elem(0.0)
                .bool_and(u_norm.clone().greater_elem(0.0));
            let ratio = (w_norm * self.eta) / (u_norm + 1e-12);
            let trust = ratio.clone().ones_like().mask_where(adaptable, ratio);
            update * trust.reshape([1; D])
        } else {
            grad
        };
        let velocity = match state {
            Some(s) => s.velocity.mul_scalar(self.momentum) + update,
            None => update,
        };
        let weight = weight - velocity.clone().mul_scalar(lr);
        (weight, Some(LarsState { velocity }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        LarsState {
            velocity: state.velocity.to_device(device),
        }
    }
}

type Adapted<O, B> = OptimizerAdaptor<O, Encoder<B>, B>;

pub enum EncoderOptimizer<B: AutodiffBackend> {
    Sgd(Adapted<Sgd<B::InnerBackend>, B>),
    Lars(Adapted<Lars, B>),
    Adam(Adapted<Adam, B>),
}

impl<B: AutodiffBackend> EncoderOptimizer<B> {
    pub fn new(kind: OptimizerKind, weight_decay: f64, momentum: f64) -> Self {
        match kind {
            OptimizerKind::Sgd => Self::Sgd(
                SgdConfig::new()
                    .with_momentum(Some(MomentumConfig::new().with_momentum(momentum)))
                    .with_weight_decay(Some(WeightDecayConfig::new(weight_decay as f32)))
                    .init(),
            ),
            OptimizerKind::Lars => Self::Lars(OptimizerAdaptor::from(Lars {
                momentum,
                weight_decay,
                eta: 0.001,
            })),
            OptimizerKind::Adam => Self::Adam(
                AdamConfig::new()
                    .with_weight_decay(Some(WeightDecayConfig::new(weight_decay as f32)))
                    .init(),
            ),
        }
    }

    pub fn step(&mut self, lr: f64, encoder: Encoder<B>, grads: GradientsParams) -> Encoder<B> {
        match self {
            Self::Sgd(o) => o.step(lr, encoder, grads),
            Self::Lars(o) => o.step(lr, encoder, grads),
            Self::Adam(o) => o.step(lr, encoder, grads),
        }
    }

    /// The optimizer state (momenta, Adam moments) as bytes, for exact resume.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        fn save<B: Backend, R: Record<B>>(r: R) -> anyhow::Result<Vec<u8>> {
            Ok(Recorder::<B>::record(&BytesRecorder::default(), r, ())?)
        }
        match self {
            Self::Sgd(o) => save::<B, _>(o.to_record()),
            Self::Lars(o) => save::<B, _>(o.to_record()),
            Self::Adam(o) => save::<B, _>(o.to_record()),
        }
    }

    pub fn from_bytes(self, bytes: Vec<u8>, device: &B::Device) -> anyhow::Result<Self> {
        fn load<B: Backend, R: Record<B>>(bytes: Vec<u8>, device: &B::Device) -> anyhow::Result<R> {
            Recorder::<B>::load(&BytesRecorder::default(), bytes, device)
                .map_err(|e| anyhow::anyhow!("optimizer state does not fit: {e}"))
        }
        Ok(match self {
            Self::Sgd(o) => Self::Sgd(o.load_record(load::<B, _>(bytes, device)?)),
            Self::Lars(o) => Self::Lars(o.load_record(load::<B, _>(bytes, device)?)),
            Self::Adam(o) => Self::Adam(o.load_record(load::<B, _>(bytes, device)?)),
        })
    }
}
