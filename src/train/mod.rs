//! The trainer, one step at a time (`step()`, `end_epoch()`); [`Session`] drives it through a
//! run for the CLI, the page and experiments alike. Everything random is keyed by (seed, epoch,
//! sample), so a run resumed from an epoch checkpoint replays exactly what an uninterrupted run
//! would.

mod config;
mod session;

pub use config::RunConfig;
pub use session::{Event, Session, Sink};

use crate::augment::{view_pairs, ViewConfig};
use crate::data::{Split, IMAGE_LEN, SIDE};
use crate::loss::{ContrastiveLoss, LossKernel};
use crate::model::Encoder;
use crate::optim::EncoderOptimizer;
use crate::weights::{init_encoder, module_from_bytes, module_to_bytes};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use serde::Serialize;

/// One optimization step, as reported to the event sink.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepEvent {
    pub epoch: usize,
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainError {
    NonFiniteLoss {
        epoch: usize,
        step: usize,
        loss: f64,
    },
}

impl std::fmt::Display for TrainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NonFiniteLoss { epoch, step, loss } => write!(
                f,
                "loss became {loss} at epoch {epoch}, step {step}: training stopped before the \
                 weights were touched (try a lower --lr or a higher --temperature)"
            ),
        }
    }
}

impl std::error::Error for TrainError {}

pub struct Trainer {
    /// Private: the loss is built from it once, so a change afterwards would do nothing.
    config: RunConfig,
    loss: ContrastiveLoss,
    views: ViewConfig,
    /// `None` only inside `step`, while the optimizer owns the weights.
    encoder: Option<Encoder>,
    /// The WGSL kernel and its device, made on the first fused step (making it must be awaited).
    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    fused: Option<FusedPath>,
    optimizer: EncoderOptimizer,
    device: Device,
    train: Split,
    order: Vec<usize>,
    /// Epochs completed so far.
    pub epoch: usize,
    /// Steps taken in the current epoch.
    pub step_in_epoch: usize,
}

/// The fused loss kernel on Burn's own wgpu device (`backend::wgpu_context`). The embeddings
/// still cross through the host, a few hundred kilobytes a step: Burn's buffers are not handed
/// to the kernel.
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
struct FusedPath {
    gpu: std::sync::Arc<crate::gpu::GpuContext>,
    kernel: crate::gpu::loss::FusedLoss,
}

#[cfg(any(feature = "wgpu", feature = "webgpu"))]
impl FusedPath {
    fn new() -> anyhow::Result<Self> {
        let gpu = crate::backend::wgpu_context().ok_or_else(|| {
            anyhow::anyhow!(
                "the fused loss kernel runs on the wgpu device that backend::device makes"
            )
        })?;
        let kernel = crate::gpu::loss::FusedLoss::new(&gpu);
        Ok(Self { gpu, kernel })
    }
}

impl Trainer {
    /// A trainer on `device`, which must have autodiff enabled (see `backend::device`).
    pub fn new(config: RunConfig, train: Split, device: Device) -> anyhow::Result<Self> {
        config.validate()?;
        let loss = ContrastiveLoss::new(config.loss, config.temperature, config.sigma)?;
        anyhow::ensure!(
            train.len() >= config.batch_size,
            "{} training images are fewer than one batch of {}",
            train.len(),
            config.batch_size
        );
        let encoder = init_encoder(config.model, config.seed, &device)?;
        let optimizer =
            EncoderOptimizer::new(config.optimizer, config.weight_decay, config.momentum);
        let mut trainer = Self {
            loss,
            views: config.views.config(config.crop_min_scale),
            encoder: Some(encoder),
            #[cfg(any(feature = "wgpu", feature = "webgpu"))]
            fused: None,
            optimizer,
            device,
            train,
            order: vec![],
            epoch: 0,
            step_in_epoch: 0,
            config,
        };
        trainer.shuffle();
        Ok(trainer)
    }

    fn shuffle(&mut self) {
        let mut rng =
            crate::augment::sample_rng(self.config.seed ^ 0x005e_ed0f_0d3e, self.epoch as u64);
        self.order = (0..self.train.len()).collect();
        self.order.shuffle(&mut rng);
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn encoder(&self) -> &Encoder {
        self.encoder
            .as_ref()
            .expect("encoder present between steps")
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Full batches per epoch (the last partial batch is dropped, as contrastive training does).
    pub fn steps_per_epoch(&self) -> usize {
        self.train.len() / self.config.batch_size
    }

    pub fn global_step(&self) -> usize {
        self.epoch * self.steps_per_epoch() + self.step_in_epoch
    }

    pub fn epoch_finished(&self) -> bool {
        self.step_in_epoch >= self.steps_per_epoch()
    }

    pub fn finished(&self) -> bool {
        self.epoch >= self.config.epochs
    }

    /// Linear warm-up, then cosine decay to zero over the whole run.
    pub fn learning_rate(&self, step: usize) -> f64 {
        let total = (self.config.epochs * self.steps_per_epoch()).max(1) as f64;
        let warmup = (self.config.warmup_epochs * self.steps_per_epoch() as f64).round();
        let step = step as f64;
        if step < warmup {
            return self.config.lr * (step + 1.0) / warmup;
        }
        let progress = ((step - warmup) / (total - warmup).max(1.0)).min(1.0);
        self.config.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The two augmented views of the first `count` images of the next batch, flattened
    /// [count, 3, 32, 32]: exactly what the next step trains on (the page shows them).
    pub fn upcoming_views(&self, count: usize) -> (Vec<f32>, Vec<f32>) {
        if self.epoch_finished() {
            return (vec![], vec![]);
        }
        let start = self.step_in_epoch * self.config.batch_size;
        let count = count.min(self.config.batch_size);
        let images: Vec<&[u8]> = self.order[start..start + count]
            .iter()
            .map(|&i| self.train.image(i))
            .collect();
        let stream0 = (self.epoch * self.train.len() + start) as u64;
        view_pairs(&images, &self.views, self.config.seed, stream0)
    }

    /// The two augmented views of the next batch, as [B, 3, 32, 32] tensors.
    pub fn next_views(&self) -> (Tensor<4>, Tensor<4>) {
        let b = self.config.batch_size;
        let (v1, v2) = self.upcoming_views(b);
        let tensor = |v: Vec<f32>| {
            debug_assert_eq!(v.len(), b * IMAGE_LEN);
            Tensor::from_data(TensorData::new(v, [b, 3, SIDE, SIDE]), &self.device)
        };
        (tensor(v1), tensor(v2))
    }

    /// One optimization step on the next batch. A non-finite loss is an error and leaves the
    /// weights as they were.
    pub fn step(&mut self) -> anyhow::Result<StepEvent> {
        futures_lite::future::block_on(self.step_async())
    }

    /// [`Trainer::step`] for callers that cannot block on the GPU (the page's worker).
    pub async fn step_async(&mut self) -> anyhow::Result<StepEvent> {
        self.step_marked(&mut |_| {}).await
    }

    /// A step that calls `mark(phase)` as each phase ends: "data" (views made and uploaded),
    /// "forward" (encoder and loss), "backward", "optimizer". Benchmarks time the phases with it.
    pub async fn step_marked(
        &mut self,
        mark: &mut dyn FnMut(&'static str),
    ) -> anyhow::Result<StepEvent> {
        anyhow::ensure!(
            !self.epoch_finished(),
            "epoch {} has no steps left: call end_epoch()",
            self.epoch
        );
        let (x1, x2) = self.next_views();
        mark("data");
        let encoder = self.encoder.take().expect("encoder present");
        let z1 = encoder.forward(x1);
        let z2 = encoder.forward(x2);
        let (value, objective) = match self.loss_and_objective(z1, z2).await {
            Ok(v) => v,
            Err(e) => {
                self.encoder = Some(encoder);
                return Err(e);
            }
        };
        mark("forward");
        let (epoch, step) = (self.epoch, self.step_in_epoch);
        if !value.is_finite() {
            self.encoder = Some(encoder);
            return Err(TrainError::NonFiniteLoss {
                epoch,
                step,
                loss: value,
            }
            .into());
        }
        let lr = self.learning_rate(self.global_step());
        let grads = GradientsParams::from_grads(objective.backward(), &encoder);
        mark("backward");
        self.encoder = Some(self.optimizer.step(lr, encoder, grads));
        mark("optimizer");
        self.step_in_epoch += 1;
        Ok(StepEvent {
            epoch,
            step: self.global_step() - 1,
            loss: value,
            lr,
        })
    }

    /// The loss value and the scalar whose gradient trains the encoder: the loss itself on the
    /// reference path; on the fused path sum(z1·g1 + z2·g2) with the kernel's gradients g held
    /// constant, which hands autodiff exactly dL/dz and leaves the encoder's backward to Burn.
    async fn loss_and_objective(
        &mut self,
        z1: Tensor<2>,
        z2: Tensor<2>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        if self.config.loss_kernel == LossKernel::Fused {
            return self.fused_objective(z1, z2).await;
        }
        let loss = self.loss.forward(z1, z2)?;
        let value =
            loss.clone().into_scalar_async::<f64>().await.map_err(|e| {
                anyhow::anyhow!("the device failed while reading the loss back: {e:?}")
            })?;
        Ok((value, loss))
    }

    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    async fn fused_objective(
        &mut self,
        z1: Tensor<2>,
        z2: Tensor<2>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        if self.fused.is_none() {
            self.fused = Some(FusedPath::new()?);
        }
        let fused = self.fused.as_ref().expect("made above");
        let [n, d] = z1.dims();
        let a = crate::backend::read_f32(z1.clone().detach()).await?;
        let b = crate::backend::read_f32(z2.clone().detach()).await?;
        let out = fused
            .kernel
            .compute(&fused.gpu, &self.loss, &a, &b, n, d)
            .await?;
        let constant =
            |g: Vec<f32>| Tensor::<2>::from_data(TensorData::new(g, [n, d]), &self.device);
        let objective = (z1 * constant(out.grad_z1)).sum() + (z2 * constant(out.grad_z2)).sum();
        Ok((out.loss as f64, objective))
    }

    #[cfg(not(any(feature = "wgpu", feature = "webgpu")))]
    async fn fused_objective(
        &mut self,
        _z1: Tensor<2>,
        _z2: Tensor<2>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        anyhow::bail!("--loss-kernel fused needs a build with the wgpu feature; use reference")
    }

    /// Replaces the weights (a saved `model.safetensors`, say) and starts the optimizer afresh.
    pub fn load_encoder(&mut self, encoder: Encoder) {
        self.encoder = Some(encoder);
        self.optimizer = EncoderOptimizer::new(
            self.config.optimizer,
            self.config.weight_decay,
            self.config.momentum,
        );
    }

    pub fn end_epoch(&mut self) {
        self.epoch += 1;
        self.step_in_epoch = 0;
        self.shuffle();
    }

    /// Weights and optimizer state at an epoch boundary.
    pub fn snapshot(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        anyhow::ensure!(
            self.step_in_epoch == 0,
            "snapshots are taken at epoch boundaries"
        );
        Ok((
            module_to_bytes(self.encoder().clone())?,
            self.optimizer.to_bytes()?,
        ))
    }

    /// Restores a snapshot taken after `epoch` completed epochs.
    pub fn restore(
        &mut self,
        epoch: usize,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> anyhow::Result<()> {
        let fresh = Encoder::new(self.config.model, &self.device);
        self.encoder = Some(module_from_bytes(fresh, weights)?);
        let optim = EncoderOptimizer::new(
            self.config.optimizer,
            self.config.weight_decay,
            self.config.momentum,
        );
        self.optimizer = optim.from_bytes(optimizer)?;
        self.epoch = epoch;
        self.step_in_epoch = 0;
        self.shuffle();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossKind;
    use crate::optim::OptimizerKind;

    fn device() -> Device {
        crate::backend::cpu().autodiff()
    }

    fn trainer(warmup_epochs: f64) -> Trainer {
        let config = RunConfig {
            data: "synthetic".into(),
            batch_size: 4,
            epochs: 10,
            lr: 0.5,
            weight_decay: 0.0,
            warmup_epochs,
            ..RunConfig::default()
        };
        let split = Split {
            images: vec![0; 40 * IMAGE_LEN],
            labels: vec![0; 40],
        };
        Trainer::new(config, split, device()).unwrap()
    }

    #[test]
    fn warmup_then_cosine_to_zero() {
        let t = trainer(2.0); // 10 steps per epoch, 100 in all, 20 of warm-up
        assert!((t.learning_rate(0) - 0.5 / 20.0).abs() < 1e-12);
        assert!((t.learning_rate(19) - 0.5).abs() < 1e-12);
        assert!((t.learning_rate(20) - 0.5).abs() < 1e-12);
        assert!(
            (t.learning_rate(60) - 0.25).abs() < 1e-12,
            "half way through the cosine"
        );
        assert!(t.learning_rate(99) < 0.001);
        let t = trainer(0.0);
        assert!((t.learning_rate(0) - 0.5).abs() < 1e-12);
    }

    /// A trainer restored from a snapshot takes the very step the original takes next, for each
    /// optimizer (its momenta and moments travel in the snapshot).
    #[test]
    fn restore_then_step_equals_step() {
        let device = device();
        for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::Lars] {
            let mut config = trainer(0.0).config().clone();
            config.optimizer = optimizer;
            config.lr = 0.01;
            let images: Vec<u8> = (0..8 * IMAGE_LEN).map(|i| (i * 37 % 251) as u8).collect();
            let split = Split {
                images,
                labels: vec![0; 8],
            };
            let mut original = Trainer::new(config.clone(), split.clone(), device.clone()).unwrap();
            original.step().unwrap();
            original.step().unwrap();
            original.end_epoch();
            let (weights, state) = original.snapshot().unwrap();
            let mut restored = Trainer::new(config, split, device.clone()).unwrap();
            restored.restore(1, weights, state).unwrap();
            let (a, b) = (original.step().unwrap(), restored.step().unwrap());
            assert_eq!(a.loss, b.loss, "{optimizer:?}: the loss after restoring");
            let (a, b) = (original.step().unwrap(), restored.step().unwrap());
            assert_eq!(a.loss, b.loss, "{optimizer:?}: the loss one update later");
            let tensors = |t: &Trainer| crate::weights::torchvision_tensors(t.encoder());
            for (a, b) in tensors(&original).iter().zip(tensors(&restored)) {
                assert_eq!(a.data, b.data, "{optimizer:?}: {}", a.name);
            }
        }
    }

    /// What `dcl experiment batch-sweep` pairs on: one seed, every loss starts from the same
    /// weights and trains on the same views; another seed changes both.
    #[test]
    fn a_seed_fixes_weights_and_views_whatever_the_loss() {
        let images: Vec<u8> = (0..8 * IMAGE_LEN).map(|i| (i * 37 % 251) as u8).collect();
        let split = Split {
            images,
            labels: vec![0; 8],
        };
        let make = |loss, seed| {
            let config = RunConfig {
                loss,
                seed,
                ..trainer(0.0).config().clone()
            };
            Trainer::new(config, split.clone(), device()).unwrap()
        };
        let weights = |t: &Trainer| {
            let tensors = crate::weights::torchvision_tensors(t.encoder());
            tensors.into_iter().map(|t| t.data).collect::<Vec<_>>()
        };
        let (dcl, infonce) = (make(LossKind::Dcl, 1), make(LossKind::Infonce, 1));
        assert!(weights(&dcl) == weights(&infonce));
        assert_eq!(dcl.upcoming_views(4), infonce.upcoming_views(4));
        let other = make(LossKind::Dcl, 2);
        assert!(weights(&dcl) != weights(&other));
        assert_ne!(dcl.upcoming_views(4), other.upcoming_views(4));
    }

    #[test]
    fn rejects_batches_larger_than_the_data() {
        let mut config = trainer(0.0).config().clone();
        config.batch_size = 64;
        let split = Split {
            images: vec![0; 10 * IMAGE_LEN],
            labels: vec![0; 10],
        };
        let err = Trainer::new(config, split, device()).err().unwrap();
        assert!(err.to_string().contains("fewer than one batch"), "{err}");
    }
}
