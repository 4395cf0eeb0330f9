//! Optimizers for pretraining: SGD with momentum, LARS and Adam, behind Burn's one `ModuleOptimizer`
//! type, so the trainer and its checkpoints need not care which.

use crate::model::Encoder;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::{Momentum, MomentumConfig, MomentumState};
use burn::optim::{
    AdamConfig, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, OptimizerRecord,
    SgdConfig,
};
use burn::tensor::{Bytes, Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Lars,
    Adam,
}

choice!(
    OptimizerKind,
    "optimizer",
    [Sgd = "sgd", Lars = "lars", Adam = "adam"]
);

/// LARS (You et al. 2017) as SimCLR uses it: SGD with momentum whose step for each weight
/// matrix is scaled by `eta |w| / |g + wd w|`. Biases and batch-norm vectors are not adapted and
/// not decayed, the usual exclusion. The velocity is Burn's momentum (no dampening), so its state
/// saves and loads like SGD's.
#[derive(Clone)]
pub struct Lars {
    pub momentum: Momentum,
    pub weight_decay: f64,
    pub eta: f64,
}

impl Lars {
    fn new(momentum: f64, weight_decay: f64) -> Self {
        let config = MomentumConfig::new()
            .with_momentum(momentum)
            .with_dampening(0.0);
        Self {
            momentum: Momentum::new(&config),
            weight_decay,
            eta: 0.001,
        }
    }
}

impl Optimizer for Lars {
    type State<const D: usize> = MomentumState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        weight: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
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
        let (velocity, state) = self.momentum.transform(update, state);
        (weight - velocity.mul_scalar(lr), Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.to_device(device)
    }
}

/// The encoder's optimizer: Burn's `ModuleOptimizer` holds any of the three.
#[derive(Clone)]
pub struct EncoderOptimizer(ModuleOptimizer);

impl EncoderOptimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64, momentum: f64) -> Self {
        let decay = Some(WeightDecayConfig::new(weight_decay as f32));
        Self(match kind {
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_momentum(momentum)))
                .with_weight_decay(decay)
                .init(),
            OptimizerKind::Lars => ModuleOptimizer::from(Lars::new(momentum, weight_decay)),
            OptimizerKind::Adam => AdamConfig::new().with_weight_decay(decay).init(),
        })
    }

    pub fn step(&mut self, lr: f64, encoder: Encoder, grads: GradientsParams) -> Encoder {
        self.0.step(lr, encoder, grads)
    }

    /// The optimizer state (momenta, Adam moments) as bytes, for exact resume.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.0.into_bytes()?.to_vec())
    }

    /// Restores [`EncoderOptimizer::to_bytes`]; the state moves to `device` on the next step.
    pub fn from_bytes(self, bytes: Vec<u8>) -> anyhow::Result<Self> {
        let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("optimizer state does not fit: {e}"))?;
        Ok(Self(self.0.load_record(record)))
    }
}
