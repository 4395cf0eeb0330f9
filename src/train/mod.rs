//! The trainer, one step at a time (`step()`, `end_epoch()`); [`Session`] drives it through a
//! run for the CLI, the page and experiments alike. What it trains on and when is its
//! [`schedule`]'s; the weights and the optimizer's state, and their snapshots, its [`replica`]'s.

mod config;
mod peers;
mod prefetch;
mod replica;
mod route;
mod schedule;
mod session;

pub use config::RunConfig;
pub use route::Traffic;
pub use session::{Event, Session, Sink};

use crate::collective::{Collective, SyncBatchNorm};
use crate::data::{Split, IMAGE_LEN, SIDE};
use crate::model::{Encoder, MixedPrecision};
use crate::weights::module_to_bytes;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use replica::Replica;
use route::LossRoute;
use schedule::Schedule;
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
    route: LossRoute,
    replica: Replica,
    device: Device,
    schedule: Schedule,
    /// This trainer's place among the peers of `--devices`; `None` alone on one device.
    group: Option<Collective>,
    /// Rank 0's: the other peers, each a trainer on its own thread.
    peers: Vec<peers::Peer>,
}

impl Trainer {
    /// A trainer on `device`, which must have autodiff enabled (see `backend::device`). With
    /// several `config.devices`, `device` is the first one's, and a peer starts on each other.
    pub fn new(config: RunConfig, train: Split, device: Device) -> anyhow::Result<Self> {
        // Before any peer starts: a bad setting is one error, not one per device.
        config.validate()?;
        let world = config.peers();
        if world == 1 {
            return Self::replica(config, train, device, None);
        }
        let mut group = Collective::group(world);
        let rank0 = group.remove(0);
        let peers = peers::start(&config, &train, group)?;
        let mut trainer = Self::replica(config, train, device, Some(rank0))?;
        trainer.peers = peers;
        Ok(trainer)
    }

    /// A trainer as rank `group.rank()` of processes training together (an MPI job).
    pub fn in_group(
        config: RunConfig,
        train: Split,
        device: Device,
        group: Collective,
    ) -> anyhow::Result<Self> {
        Self::replica(config, train, device, group)
    }

    /// One peer's trainer: rank `group.rank()` of the group (or alone, without a group).
    fn replica(
        config: RunConfig,
        train: Split,
        device: Device,
        group: impl Into<Option<Collective>>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let route = LossRoute::new(&config, device.clone())?;
        let schedule = Schedule::new(&config, train)?;
        Ok(Self {
            route,
            replica: Replica::new(&config, &device)?,
            device,
            schedule,
            group: group.into(),
            peers: vec![],
            config,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn encoder(&self) -> &Encoder {
        self.replica.encoder()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Epochs completed so far.
    pub fn epoch(&self) -> usize {
        self.schedule.epoch
    }

    /// Steps taken in the current epoch.
    pub fn step_in_epoch(&self) -> usize {
        self.schedule.step_in_epoch
    }

    /// Full batches per epoch (the last partial batch is dropped, as contrastive training does).
    pub fn steps_per_epoch(&self) -> usize {
        self.schedule.steps_per_epoch()
    }

    pub fn traffic(&self) -> Traffic {
        self.route.traffic
    }

    pub fn epoch_finished(&self) -> bool {
        self.schedule.epoch_finished()
    }

    pub fn finished(&self) -> bool {
        self.schedule.finished()
    }

    /// The two augmented views of the first `count` images of the next batch, flattened
    /// [count, 3, 32, 32]: exactly what the next step trains on (the page shows them).
    pub fn upcoming_views(&self, count: usize) -> (Vec<f32>, Vec<f32>) {
        (self.schedule).views_of(0..count.min(self.config.batch_size))
    }

    /// This trainer's rows of every batch: all of them alone, its equal share among peers.
    fn rows(&self) -> std::ops::Range<usize> {
        let (rank, world) = (self.group.as_ref()).map_or((0, 1), |g| (g.rank(), g.world()));
        let share = self.config.batch_size / world;
        rank * share..(rank + 1) * share
    }

    /// The two augmented views of this trainer's rows of the next batch, as [B, 3, 32, 32]
    /// tensors.
    fn next_views(&mut self) -> (Tensor<4>, Tensor<4>) {
        let rows = self.rows();
        let b = rows.len();
        let (v1, v2) = self.schedule.take_views(rows);
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
    /// With peers, each takes the step on its slice at the same time.
    pub async fn step_marked(
        &mut self,
        mark: &mut dyn FnMut(&'static str),
    ) -> anyhow::Result<StepEvent> {
        peers::send_all(&self.peers, || peers::Command::Step)?;
        let mine = self.step_own(mark).await;
        peers::settle(&self.peers, mine)
    }

    /// This trainer's part of a step.
    async fn step_own(&mut self, mark: &mut dyn FnMut(&'static str)) -> anyhow::Result<StepEvent> {
        anyhow::ensure!(
            !self.epoch_finished(),
            "epoch {} has no steps left: call end_epoch()",
            self.epoch()
        );
        let (x1, x2) = self.next_views();
        mark("data");
        let encoder = self.replica.encoder();
        let sync_batch_norm = self.group.as_ref().map(SyncBatchNorm::over);
        let precision = MixedPrecision::enter(self.config.precision, self.config.device);
        let [z1, z2] = encoder.forward_views([x1, x2]);
        drop(precision);
        let (value, objective) = self.route.objective(z1, z2, self.group.as_ref()).await?;
        mark("forward");
        let (epoch, step) = (self.epoch(), self.step_in_epoch());
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                epoch,
                step,
                loss: value,
            }
            .into());
        }
        let lr = self.schedule.learning_rate(self.schedule.global_step());
        let grads = GradientsParams::from_grads(objective.backward(), encoder);
        drop(sync_batch_norm);
        let grads = match &self.group {
            Some(group) => peers::sum_gradients(group, encoder, grads)?,
            None => grads,
        };
        mark("backward");
        self.replica.update(lr, grads);
        mark("optimizer");
        self.schedule.step_in_epoch += 1;
        Ok(StepEvent {
            epoch,
            step: self.schedule.global_step() - 1,
            loss: value,
            lr,
        })
    }

    /// Replaces the weights (a saved `model.safetensors`, say) and starts the optimizer afresh.
    pub fn load_encoder(&mut self, encoder: Encoder) -> anyhow::Result<()> {
        if !self.peers.is_empty() {
            let weights = module_to_bytes(encoder.clone())?;
            peers::tell_all(&self.peers, || peers::Command::Load(weights.clone()))?;
        }
        self.replica = Replica::with(&self.config, encoder);
        Ok(())
    }

    /// Continues after `epoch` epochs from `encoder`'s weights with a fresh optimizer (see
    /// `Session::continue_from`).
    pub fn continue_from(&mut self, epoch: usize, encoder: Encoder) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.peers.is_empty(),
            "continuing from weights alone is for one device; peers restore whole checkpoints"
        );
        self.load_encoder(encoder)?;
        self.schedule.start_epoch(epoch);
        Ok(())
    }

    /// [`Trainer::load_encoder`] from [`module_to_bytes`]'s bytes (how peers receive weights).
    fn load_weights(&mut self, weights: Vec<u8>) -> anyhow::Result<()> {
        self.load_encoder(replica::weights_from_bytes(
            &self.config,
            &self.device,
            weights,
        )?)
    }

    pub fn end_epoch(&mut self) {
        // A peer that stopped has already failed the step before this one.
        let _ = peers::tell_all(&self.peers, || peers::Command::EndEpoch);
        self.schedule.start_epoch(self.epoch() + 1);
    }

    /// Weights and optimizer state at an epoch boundary.
    pub fn snapshot(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        anyhow::ensure!(
            self.step_in_epoch() == 0,
            "snapshots are taken at epoch boundaries"
        );
        self.replica.snapshot()
    }

    /// Restores a snapshot taken after `epoch` completed epochs.
    pub fn restore(
        &mut self,
        epoch: usize,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> anyhow::Result<()> {
        peers::tell_all(&self.peers, || peers::Command::Restore {
            epoch,
            weights: weights.clone(),
            optimizer: optimizer.clone(),
        })?;
        self.replica = Replica::restore(&self.config, &self.device, weights, optimizer)?;
        self.schedule.start_epoch(epoch);
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

    /// `n` images of varied pixels.
    fn varied_split(n: usize) -> Split {
        Split {
            images: (0..n * IMAGE_LEN).map(|i| (i * 37 % 251) as u8).collect(),
            labels: vec![0; n],
        }
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

    /// A trainer restored from a snapshot takes the very step the original takes next, for each
    /// optimizer (its momenta and moments travel in the snapshot).
    #[test]
    fn restore_then_step_equals_step() {
        let device = device();
        for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::Lars] {
            let mut config = trainer(0.0).config().clone();
            config.optimizer = optimizer;
            config.lr = 0.01;
            let split = varied_split(8);
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

    /// The views a step takes from the prefetch are the ones it would have made itself, and a
    /// restore (which moves the run elsewhere) makes the stale job's views go unused.
    #[test]
    fn prefetched_views_are_the_views_made_on_demand() {
        let mut t = Trainer::new(trainer(0.0).config().clone(), varied_split(8), device()).unwrap();
        let rows = t.rows();
        let first = t.schedule.take_views(rows.clone());
        assert_eq!(first, t.schedule.view_job(0, rows.clone())());
        t.schedule.step_in_epoch = 1;
        let expected = t.schedule.views_of(rows.clone());
        assert_eq!(
            t.schedule.take_views(rows.clone()),
            expected,
            "step 1, prefetched"
        );
        t.end_epoch();
        let (weights, optimizer) = t.snapshot().unwrap();
        t.schedule.step_in_epoch = 0;
        t.schedule.take_views(rows.clone()); // step 1 of epoch 1 in the making
        t.restore(0, weights, optimizer).unwrap();
        t.schedule.step_in_epoch = 1;
        assert_eq!(
            t.schedule.take_views(rows),
            expected,
            "epoch 0 again, not epoch 1's views"
        );
    }

    /// What `dcl experiment batch-sweep` pairs on: one seed, every loss starts from the same
    /// weights and trains on the same views; another seed changes both.
    #[test]
    fn a_seed_fixes_weights_and_views_whatever_the_loss() {
        let split = varied_split(8);
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

    /// The exactness of data parallel (`peers`): two CPU peers with half a batch each, negatives
    /// gathered and batch norms synced, take one device's step on the whole batch (the loss and
    /// every tensor's update, running statistics included, to float rounding), and their
    /// replicas stay equal into the next step; each peer with its own negatives does not.
    #[test]
    fn two_peers_take_the_one_device_step() {
        use crate::backend::{DeviceKind, DeviceSpec};
        let split = varied_split(16);
        let cpu = DeviceSpec {
            kind: DeviceKind::Cpu,
            index: 0,
        };
        let config = RunConfig {
            batch_size: 8,
            optimizer: OptimizerKind::Sgd,
            lr: 0.5,
            ..trainer(0.0).config().clone()
        };
        let weights = |t: &Trainer| crate::weights::torchvision_tensors(t.encoder());
        let initial = weights(&Trainer::new(config.clone(), split.clone(), device()).unwrap());
        // Two steps: the losses, and each tensor's change over them.
        let run = |devices: Vec<DeviceSpec>, gather_negatives| {
            let config = RunConfig {
                devices,
                gather_negatives,
                ..config.clone()
            };
            let mut trainer = Trainer::new(config, split.clone(), device()).unwrap();
            let losses = [trainer.step().unwrap().loss, trainer.step().unwrap().loss];
            let updates: Vec<Vec<f32>> = (weights(&trainer).iter().zip(&initial))
                .map(|(after, before)| {
                    after
                        .data
                        .iter()
                        .zip(&before.data)
                        .map(|(a, b)| a - b)
                        .collect()
                })
                .collect();
            (losses, updates)
        };
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        // The largest relative difference of an update from the one-device one.
        let worst = |updates: &[Vec<f32>], reference: &[Vec<f32>]| {
            (updates.iter().zip(reference))
                .filter(|(_, r)| norm(r) > 0.0)
                .map(|(u, r)| {
                    let diff: Vec<f32> = u.iter().zip(r).map(|(u, r)| u - r).collect();
                    norm(&diff) / norm(r)
                })
                .fold(0.0, f64::max)
        };
        let (one_losses, one) = run(vec![], true);
        let (two_losses, two) = run(vec![cpu; 2], true);
        for (a, b) in one_losses.iter().zip(&two_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "losses {one_losses:?} vs {two_losses:?}"
            );
        }
        let gathered = worst(&two, &one);
        assert!(gathered < 1e-4, "two peers' update off by {gathered:e}");
        let (local_losses, local) = run(vec![cpu; 2], false);
        let apart = (local_losses[0] - one_losses[0]).abs() / one_losses[0];
        assert!(
            apart > 1e-2,
            "own negatives: loss {local_losses:?} vs {one_losses:?}"
        );
        let ungathered = worst(&local, &one);
        assert!(
            ungathered > 1e-2,
            "own negatives: update off by only {ungathered:e}"
        );
        eprintln!("two peers vs one: update {gathered:.1e}; own negatives: {ungathered:.1e}");
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
