//! What a trainer trains: the encoder's weights and the optimizer's state (momenta, moments),
//! made together, replaced together, and saved together at an epoch boundary as a snapshot (what
//! a checkpoint holds) from which a run continues exactly. The replica is the encoder's one
//! owner: a step borrows the weights, and only [`Replica::update`], which cannot fail, hands
//! them to the optimizer, so no error leaves a trainer without them.

use super::RunConfig;
use crate::model::Encoder;
use crate::optim::EncoderOptimizer;
use crate::weights::{init_encoder, module_from_bytes, module_to_bytes};
use burn::optim::GradientsParams;
use burn::tensor::Device;

pub(super) struct Replica {
    /// `None` only inside [`Replica::update`], while the optimizer owns the weights.
    encoder: Option<Encoder>,
    optimizer: EncoderOptimizer,
}

impl Replica {
    /// `config`'s initial weights (seeded) and a fresh optimizer.
    pub(super) fn new(config: &RunConfig, device: &Device) -> anyhow::Result<Self> {
        let encoder = init_encoder(config.model, config.seed, device)?;
        Ok(Self::with(config, encoder))
    }

    /// `encoder` with a fresh optimizer.
    pub(super) fn with(config: &RunConfig, encoder: Encoder) -> Self {
        let optimizer =
            EncoderOptimizer::new(config.optimizer, config.weight_decay, config.momentum);
        Self {
            encoder: Some(encoder),
            optimizer,
        }
    }

    pub(super) fn encoder(&self) -> &Encoder {
        self.encoder
            .as_ref()
            .expect("encoder present between steps")
    }

    /// The optimizer's step from `grads` (of the current weights) at learning rate `lr`.
    pub(super) fn update(&mut self, lr: f64, grads: GradientsParams) {
        let encoder = self.encoder.take().expect("encoder present between steps");
        self.encoder = Some(self.optimizer.step(lr, encoder, grads));
    }

    /// Weights and optimizer state, as bytes.
    pub(super) fn snapshot(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            module_to_bytes(self.encoder().clone())?,
            self.optimizer.to_bytes()?,
        ))
    }

    /// The replica a [`Replica::snapshot`] saved.
    pub(super) fn restore(
        config: &RunConfig,
        device: &Device,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let mut replica = Self::with(config, weights_from_bytes(config, device, weights)?);
        replica.optimizer = replica.optimizer.from_bytes(optimizer)?;
        Ok(replica)
    }
}

/// An encoder of `config`'s model on `device` from [`module_to_bytes`]'s bytes.
pub(super) fn weights_from_bytes(
    config: &RunConfig,
    device: &Device,
    weights: Vec<u8>,
) -> anyhow::Result<Encoder> {
    module_from_bytes(Encoder::new(config.model, device), weights)
}
