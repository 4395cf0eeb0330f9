//! The trainer of one replica, one step at a time (`step()`, `end_epoch()`); [`Session`] drives a
//! run's replicas, laid out by a [`Strategy`] (one device, `--devices`, MPI ranks), for the CLI,
//! the page and experiments alike. What a trainer trains on and when is its [`schedule`]'s; the
//! weights and the optimizer's state, and their snapshots, its [`replica`]'s; how the embeddings
//! become the loss its [`route`]'s.

mod config;
mod prefetch;
mod replica;
mod route;
mod schedule;
mod session;
mod strategy;

pub use config::RunConfig;
pub use route::Traffic;
pub use session::{Event, Session, Sink};
pub use strategy::Strategy;

use crate::collective::{Collective, SyncBatchNorm};
use crate::data::{Split, IMAGE_LEN, SIDE};
use crate::model::{Encoder, Lowering, Pass};
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
    /// This trainer's place among the replicas it trains with; `None` alone.
    group: Option<Collective>,
}

impl Trainer {
    /// A trainer alone on `device`, which must have autodiff enabled (see `backend::device`).
    /// Several `config.devices` train through a [`Strategy`].
    pub fn new(config: RunConfig, train: Split, device: Device) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.peers() == 1,
            "{} devices train together through train::Strategy, not one Trainer",
            config.peers()
        );
        Self::replica(config, train, device, None)
    }

    /// A trainer as rank `group.rank()` of replicas training together: a `--devices` peer or
    /// an MPI rank.
    pub fn in_group(
        config: RunConfig,
        train: Split,
        device: Device,
        group: Collective,
    ) -> anyhow::Result<Self> {
        Self::replica(config, train, device, group)
    }

    /// Rank `group.rank()` of the group's replicas, or alone without a group.
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
    /// The next batch's two views stacked, [2B, 3, H, W] (the first view's images, then the
    /// second's): one upload, and no concatenation on the device.
    fn next_views(&mut self) -> Tensor<4> {
        let rows = self.rows();
        let b = rows.len();
        let (mut views, second) = self.schedule.take_views(rows);
        views.extend(second);
        debug_assert_eq!(views.len(), 2 * b * IMAGE_LEN);
        Tensor::from_data(TensorData::new(views, [2 * b, 3, SIDE, SIDE]), &self.device)
    }

    /// One optimization step on the next batch. A non-finite loss is an error and leaves the
    /// weights as they were.
    pub fn step(&mut self) -> anyhow::Result<StepEvent> {
        futures_lite::future::block_on(self.step_marked(&mut |_| {}))
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
            self.epoch()
        );
        let views = self.next_views();
        mark("data");
        let encoder = self.replica.encoder();
        let pass = Pass {
            views: 2,
            lowering: Lowering::of(self.config.precision, self.config.device),
            sync: self.group.as_ref().map(SyncBatchNorm::over),
        };
        let z = encoder.forward_stacked(views, &pass);
        let (value, objective) = self.route.objective(z, self.group.as_ref()).await?;
        mark("forward");
        let grads = GradientsParams::from_grads(objective.backward(), encoder);
        let value = self.route.read(value, self.group.as_ref()).await?;
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
        let grads = match &self.group {
            Some(group) => replica::sum_gradients(group, encoder, grads)?,
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
        self.replica = Replica::with(&self.config, encoder);
        Ok(())
    }

    /// Continues after `epoch` epochs from `encoder`'s weights with a fresh optimizer (see
    /// `Session::continue_from`).
    pub fn continue_from(&mut self, epoch: usize, encoder: Encoder) -> anyhow::Result<()> {
        self.load_encoder(encoder)?;
        self.schedule.start_epoch(epoch);
        Ok(())
    }

    /// [`Trainer::load_encoder`] from `weights::module_to_bytes`' bytes (how peers receive
    /// weights).
    fn load_weights(&mut self, weights: Vec<u8>) -> anyhow::Result<()> {
        let encoder = replica::weights_from_bytes(&self.config, &self.device, weights)?;
        self.load_encoder(encoder)
    }

    pub fn end_epoch(&mut self) {
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
        self.replica = Replica::restore(&self.config, &self.device, weights, optimizer)?;
        self.schedule.start_epoch(epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
