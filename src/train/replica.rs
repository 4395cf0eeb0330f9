//! What a trainer trains: the encoder's weights and the optimizer's state (momenta, moments),
//! made together, replaced together, and saved together at an epoch boundary as a snapshot (what
//! a checkpoint holds) from which a run continues exactly. The replica is the encoder's one
//! owner: a step borrows the weights, and only [`Replica::update`], which cannot fail, hands
//! them to the optimizer, so no error leaves a trainer without them. Among peers, each replica's
//! gradients are summed over all of them before its update, so the replicas stay equal.

use super::RunConfig;
use crate::collective::Collective;
use crate::model::Encoder;
use crate::optim::EncoderOptimizer;
use crate::weights::{init_encoder, module_from_bytes, module_to_bytes};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

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

/// The gradients summed over the peers (each peer's are of its share of the global loss), the
/// same on every peer afterwards.
pub(super) fn sum_gradients(
    group: &Collective,
    encoder: &Encoder,
    mut grads: GradientsParams,
) -> anyhow::Result<GradientsParams> {
    let mut flat = Flatten {
        grads: &grads,
        values: vec![],
    };
    encoder.visit(&mut flat);
    let mut values = flat.values;
    group.sum(&mut values)?;
    encoder.visit(&mut Scatter {
        grads: &mut grads,
        values: &values,
        offset: 0,
    });
    Ok(grads)
}

/// Every parameter's gradient, one after another in the module's order.
struct Flatten<'a> {
    grads: &'a GradientsParams,
    values: Vec<f64>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let data = grad.into_data().convert::<f32>();
            let values = data.as_slice::<f32>().expect("f32 after convert");
            self.values.extend(values.iter().map(|&v| v as f64));
        }
    }
}

/// [`Flatten`]'s inverse: the summed values back in place of each gradient.
struct Scatter<'a> {
    grads: &'a mut GradientsParams,
    values: &'a [f64],
    offset: usize,
}

impl ModuleVisitor for Scatter<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let dims = grad.dims();
            let count: usize = dims.iter().product();
            let values = &self.values[self.offset..self.offset + count];
            self.offset += count;
            let data = TensorData::new(values.iter().map(|&v| v as f32).collect(), dims);
            let summed = Tensor::<D>::from_data(data, &grad.device());
            self.grads.register::<D>(param.id, summed);
        }
    }
}
