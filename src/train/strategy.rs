//! How a run's replicas are laid out, the one seam for distribution: one device; `--devices`,
//! where the session steps rank 0's trainer and every other peer is a trainer on a thread of its
//! own, told to do what rank 0 does; or one rank of an MPI job, where every process runs the same
//! session on its own rank. A [`Trainer`] steps one replica and knows nothing of the others: what
//! it shares with them (embeddings, batch statistics, gradients) it exchanges within its step,
//! through its place in the group.

mod peers;

use super::{RunConfig, StepEvent, Trainer};
use crate::collective::Collective;
use crate::data::Split;
use crate::model::Encoder;
use crate::weights::module_to_bytes;
use burn::tensor::Device;
use peers::{Command, Peer};

pub struct Strategy {
    /// The replica this process's session drives: rank 0's with `--devices`.
    trainer: Trainer,
    /// `--devices`' other peers, each a trainer on its own thread; none otherwise.
    peers: Vec<Peer>,
}

impl Strategy {
    /// One device, or the peers of `config.devices`, where `device` is the first one's.
    /// `device` must have autodiff enabled (see `backend::device`).
    pub fn new(config: RunConfig, train: Split, device: Device) -> anyhow::Result<Self> {
        // Before any peer starts: a bad setting is one error, not one per device.
        config.validate()?;
        let world = config.peers();
        if world == 1 {
            let trainer = Trainer::new(config, train, device)?;
            return Ok(Self {
                trainer,
                peers: vec![],
            });
        }
        let mut group = Collective::group(world);
        let rank0 = group.remove(0);
        let peers = peers::start(&config, &train, group)?;
        let trainer = Trainer::in_group(config, train, device, rank0)?;
        Ok(Self { trainer, peers })
    }

    /// This process as rank `group.rank()` of an MPI job: its trainer, on its slice.
    pub fn rank(
        config: RunConfig,
        train: Split,
        device: Device,
        group: Collective,
    ) -> anyhow::Result<Self> {
        let trainer = Trainer::in_group(config, train, device, group)?;
        Ok(Self {
            trainer,
            peers: vec![],
        })
    }

    /// The trainer of this process's replica (rank 0's with `--devices`: the run's record).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// One optimization step on the next batch, each peer on its slice at the same time.
    pub fn step(&mut self) -> anyhow::Result<StepEvent> {
        futures_lite::future::block_on(self.step_async())
    }

    /// [`Strategy::step`] for callers that cannot block on the GPU (the page's worker).
    pub async fn step_async(&mut self) -> anyhow::Result<StepEvent> {
        self.step_marked(&mut |_| {}).await
    }

    /// [`Trainer::step_marked`], each peer on its slice at the same time.
    pub async fn step_marked(
        &mut self,
        mark: &mut dyn FnMut(&'static str),
    ) -> anyhow::Result<StepEvent> {
        peers::send_all(&self.peers, || Command::Step)?;
        let mine = self.trainer.step_marked(mark).await;
        peers::settle(&self.peers, mine)
    }

    pub fn end_epoch(&mut self) {
        // A peer that stopped has already failed the step before this one.
        let _ = peers::tell_all(&self.peers, || Command::EndEpoch);
        self.trainer.end_epoch();
    }

    /// Replaces every replica's weights and starts their optimizers afresh.
    pub fn load_encoder(&mut self, encoder: Encoder) -> anyhow::Result<()> {
        if !self.peers.is_empty() {
            let weights = module_to_bytes(encoder.clone())?;
            peers::tell_all(&self.peers, || Command::Load(weights.clone()))?;
        }
        self.trainer.load_encoder(encoder)
    }

    /// [`Trainer::continue_from`], on one device.
    pub fn continue_from(&mut self, epoch: usize, encoder: Encoder) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.peers.is_empty(),
            "continuing from weights alone is for one device; peers restore whole checkpoints"
        );
        self.trainer.continue_from(epoch, encoder)
    }

    /// Restores every replica from a snapshot taken after `epoch` completed epochs.
    pub fn restore(
        &mut self,
        epoch: usize,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> anyhow::Result<()> {
        peers::tell_all(&self.peers, || Command::Restore {
            epoch,
            weights: weights.clone(),
            optimizer: optimizer.clone(),
        })?;
        self.trainer.restore(epoch, weights, optimizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimizerKind;
    use crate::train::tests::{device, trainer, varied_split};

    /// The exactness of data parallel (`--devices`): two CPU peers with half a batch each, negatives
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
            let mut strategy = Strategy::new(config, split.clone(), device()).unwrap();
            let losses = [strategy.step().unwrap().loss, strategy.step().unwrap().loss];
            let updates: Vec<Vec<f32>> = (weights(strategy.trainer()).iter().zip(&initial))
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
}
