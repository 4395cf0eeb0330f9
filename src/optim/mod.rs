//! Optimizers for pretraining: SGD with momentum, LARS and Adam, behind Burn's one `ModuleOptimizer`
//! type, so the trainer and its checkpoints need not care which. SGD's and Adam's updates run as
//! one kernel a tensor on the GPU (`update`); their states are recorded as Burn's.

mod update;

use crate::model::Encoder;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::{Momentum, MomentumConfig, MomentumState};
use burn::optim::{
    join_path, AdamConfig, AdamState, AdaptiveMomentumState, GradientsParams, LearningRate,
    ModuleOptimizer, Optimizer, OptimizerRecord, RecordState, StateSink, StateSource,
};
use burn::tensor::{Bytes, Device, Tensor};
use update::{AdamStep, SgdStep};

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

/// Burn's SGD with momentum (dampening and all), its update one kernel a tensor on the GPU.
#[derive(Clone)]
pub struct Sgd {
    momentum: Momentum,
    config: MomentumConfig,
    weight_decay: f32,
}

impl Sgd {
    fn new(momentum: f64, weight_decay: f64) -> Self {
        let config = MomentumConfig::new().with_momentum(momentum);
        Self {
            momentum: Momentum::new(&config),
            config,
            weight_decay: weight_decay as f32,
        }
    }
}

/// SGD's velocity, recorded under the names of Burn's `SgdState` (`momentum.velocity`), so a
/// checkpoint written by Burn's SGD resumes here.
#[derive(Clone)]
pub struct Velocity<const D: usize>(Tensor<D>);

impl<const D: usize> RecordState for Velocity<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        let data = self.0.clone().into_data();
        out.push_tensor(&join_path(prefix, "momentum"), "velocity", data);
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let data = src.take_tensor(&join_path(prefix, "momentum"), "velocity")?;
        Some(Self(Tensor::from_data(data, device)))
    }
}

impl Optimizer for Sgd {
    type State<const D: usize> = Velocity<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        weight: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if update::fused(&weight) {
            let history = state.is_some();
            let velocity = state.map_or_else(|| grad.clone(), |v| v.0);
            let (momentum, dampening) = (self.config.momentum, self.config.dampening);
            let step = SgdStep::new(lr, self.weight_decay, momentum, dampening, history);
            let (weight, velocity) = update::sgd(weight, grad, velocity, step);
            return (weight, Some(Velocity(velocity)));
        }
        // Burn's `Sgd::step`, op for op.
        let grad = weight.clone().mul_scalar(self.weight_decay).add(grad);
        let state = state.map(|v| MomentumState::new(v.0));
        let (velocity, _) = self.momentum.transform(grad, state);
        let weight = weight - velocity.clone().mul_scalar(lr);
        (weight, Some(Velocity(velocity)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        Velocity(state.0.to_device(device))
    }
}

/// Burn's Adam (no AMSGrad), its update one kernel a tensor on the GPU; its state is Burn's.
#[derive(Clone)]
pub struct Adam {
    burn: burn::optim::Adam,
    weight_decay: f32,
}

impl Adam {
    const BETA_1: f32 = 0.9;
    const BETA_2: f32 = 0.999;
    const EPSILON: f32 = 1e-5;

    fn new(weight_decay: f64) -> Self {
        let config = AdamConfig::new()
            .with_beta_1(Self::BETA_1)
            .with_beta_2(Self::BETA_2)
            .with_epsilon(Self::EPSILON)
            .with_weight_decay(Some(WeightDecayConfig::new(weight_decay as f32)));
        Self {
            burn: config.build(),
            weight_decay: weight_decay as f32,
        }
    }
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        weight: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if !update::fused(&weight) {
            return self.burn.step(lr, weight, grad, state);
        }
        let (time, moment_1, moment_2) = match state {
            Some(AdamState { momentum: m }) => (m.time + 1, m.moment_1, m.moment_2),
            None => (1, grad.clone(), grad.clone()),
        };
        let (beta_1, beta_2) = (Self::BETA_1, Self::BETA_2);
        let step = AdamStep::new(lr, self.weight_decay, beta_1, beta_2, Self::EPSILON, time);
        let (weight, moment_1, moment_2) = update::adam(weight, grad, moment_1, moment_2, step);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (weight, Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <burn::optim::Adam as Optimizer>::to_device(state, device)
    }
}

/// The encoder's optimizer: Burn's `ModuleOptimizer` holds any of the three.
#[derive(Clone)]
pub struct EncoderOptimizer(ModuleOptimizer);

impl EncoderOptimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64, momentum: f64) -> Self {
        Self(match kind {
            OptimizerKind::Sgd => ModuleOptimizer::from(Sgd::new(momentum, weight_decay)),
            OptimizerKind::Lars => ModuleOptimizer::from(Lars::new(momentum, weight_decay)),
            OptimizerKind::Adam => ModuleOptimizer::from(Adam::new(weight_decay)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::SgdConfig;
    use burn::tensor::TensorData;
    use rand::{Rng, SeedableRng};

    /// Seeded normal-ish values (uniform in [-1, 1)), the same on every device.
    fn values(seed: u64, shape: [usize; 2], device: &Device) -> Tensor<2> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    fn host(t: &Tensor<2>) -> Vec<f32> {
        t.clone().into_data().try_to_vec::<f32>().unwrap()
    }

    /// Largest |a - b| / max(1, |b|) over the elements.
    fn error(a: &Tensor<2>, b: &Tensor<2>) -> f32 {
        let (a, b) = (host(a), host(b));
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f32::max)
    }

    /// Three steps of `ours` and `theirs` from one weight with the same gradients (the second
    /// laid out transposed in memory, as a convolution's weight gradient may be: the kernel reads
    /// a contiguous copy, measured cheaper on lavapipe than strided reads): the weights after
    /// each step, side by side.
    fn three_steps<A: Optimizer, B: Optimizer>(
        ours: &A,
        theirs: &B,
        device: &Device,
    ) -> Vec<(Tensor<2>, Tensor<2>)> {
        let shape = [37, 5];
        let (mut a, mut b) = (values(1, shape, device), values(1, shape, device));
        let (mut state_a, mut state_b) = (None, None);
        (0..3)
            .map(|step| {
                let grad = match step {
                    1 => values(10 + step, [shape[1], shape[0]], device).transpose(),
                    _ => values(10 + step, shape, device),
                };
                (a, state_a) = ours.step(0.05, a.clone(), grad.clone(), state_a.take());
                (b, state_b) = theirs.step(0.05, b.clone(), grad, state_b.take());
                (a.clone(), b.clone())
            })
            .collect()
    }

    #[cfg(feature = "wgpu")]
    fn wgpu() -> Device {
        crate::backend::device(crate::backend::DeviceKind::Wgpu)
            .expect("wgpu needs a Vulkan adapter: apt install mesa-vulkan-drivers (lavapipe)")
            .inner()
    }

    /// The one-kernel Adam on the GPU takes Burn's Adam's steps, to float rounding (the kernel
    /// may fuse a multiply-add that Burn rounds twice).
    #[cfg(feature = "wgpu")]
    #[test]
    fn fused_adam_on_the_gpu_equals_burns_adam() {
        let device = wgpu();
        assert!(update::fused(&values(0, [2, 2], &device)));
        let theirs = AdamConfig::new()
            .with_weight_decay(Some(WeightDecayConfig::new(0.01)))
            .build();
        for (step, (a, b)) in three_steps(&Adam::new(0.01), &theirs, &device)
            .iter()
            .enumerate()
        {
            let moved = error(b, &values(1, [37, 5], &device));
            assert!(
                moved > 0.01,
                "step {step}: the weights hardly moved ({moved})"
            );
            let e = error(a, b);
            assert!(
                e < 2e-6,
                "step {step}: fused Adam differs from Burn's by {e}"
            );
        }
    }

    /// The one-kernel SGD with momentum on the GPU takes Burn's SGD's steps, to float rounding.
    #[cfg(feature = "wgpu")]
    #[test]
    fn fused_sgd_on_the_gpu_equals_burns_sgd() {
        let device = wgpu();
        let theirs = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .with_weight_decay(Some(WeightDecayConfig::new(1e-4)))
            .build();
        for (step, (a, b)) in three_steps(&Sgd::new(0.9, 1e-4), &theirs, &device)
            .iter()
            .enumerate()
        {
            let e = error(a, b);
            assert!(
                e < 2e-6,
                "step {step}: fused SGD differs from Burn's by {e}"
            );
        }
    }

    /// On the CPU the optimizers are Burn's, bit for bit, and a checkpoint of Burn's SGD
    /// resumes in ours with the same next step.
    #[test]
    fn cpu_steps_are_burns_and_burns_sgd_state_resumes() {
        let device = crate::backend::cpu();
        assert!(!update::fused(&values(0, [2, 2], &device)));
        let theirs = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .with_weight_decay(Some(WeightDecayConfig::new(1e-4)))
            .build();
        for (a, b) in three_steps(&Sgd::new(0.9, 1e-4), &theirs, &device) {
            assert_eq!(host(&a), host(&b));
        }
        let adam = AdamConfig::new()
            .with_weight_decay(Some(WeightDecayConfig::new(0.01)))
            .build();
        for (a, b) in three_steps(&Adam::new(0.01), &adam, &device) {
            assert_eq!(host(&a), host(&b));
        }

        let device = device.autodiff();
        let model: Linear = LinearConfig::new(4, 3).init(&device);
        let step = |optimizer: &mut ModuleOptimizer, model: Linear| {
            let x = values(7, [5, 4], &device);
            let grads = model.forward(x).square().sum().backward();
            let grads = GradientsParams::from_grads(grads, &model);
            optimizer.step(0.1, model, grads)
        };
        let mut burns = SgdConfig::new()
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .with_weight_decay(Some(WeightDecayConfig::new(1e-4)))
            .init();
        let model = step(&mut burns, model);
        let bytes = burns.into_bytes().unwrap().to_vec();
        let mut ours = EncoderOptimizer::new(OptimizerKind::Sgd, 1e-4, 0.9)
            .from_bytes(bytes)
            .unwrap()
            .0;
        let (a, b) = (step(&mut ours, model.clone()), step(&mut burns, model));
        let weights = |m: Linear| {
            m.weight
                .val()
                .inner()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(
            weights(a),
            weights(b),
            "the resumed velocity was not Burn's"
        );
    }
}
