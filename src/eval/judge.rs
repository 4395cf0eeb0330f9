//! The evaluation protocol on fixed data, for an encoder and its baselines: what `dcl eval` and
//! the experiments score runs with.

use super::{features, pixel_features, Protocol, Scores};
use crate::data::{Dataset, Split};
use crate::model::Encoder;
use burn::module::AutodiffModule;
use burn::tensor::Device;

/// The protocol on fixed data: the bank (and the probe's training set) is the first `bank`
/// training images, or all of them; the queries are the whole test split.
pub struct Judge {
    bank: Split,
    test: Split,
    classes: usize,
    protocol: Protocol,
    device: Device,
}

impl Judge {
    pub fn new(
        ds: &Dataset,
        bank: Option<usize>,
        protocol: Protocol,
        device: Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !protocol.ks.is_empty() && protocol.ks.iter().all(|&k| k >= 1),
            "--knn-k needs one or more k >= 1"
        );
        anyhow::ensure!(bank != Some(0), "--bank must be at least 1");
        anyhow::ensure!(
            !ds.test.is_empty(),
            "{}: no test split to evaluate on",
            ds.name
        );
        Ok(Self {
            bank: ds.train.head(bank.unwrap_or(usize::MAX)),
            test: ds.test.clone(),
            classes: ds.classes,
            protocol,
            device,
        })
    }

    /// The bank's size.
    pub fn bank_len(&self) -> usize {
        self.bank.len()
    }

    /// The encoder's backbone features (the projection head is dropped, as is usual).
    pub fn encoder(&self, encoder: &Encoder) -> anyhow::Result<Scores> {
        let backbone = encoder.valid().backbone;
        let on = |split: &Split| {
            futures_lite::future::block_on(features(&backbone, split, &self.device))
        };
        self.score(&on)
    }

    /// Raw pixels under the same protocol: the level an encoder must clear.
    pub fn pixels(&self) -> anyhow::Result<Scores> {
        self.score(&|split: &Split| Ok(pixel_features(split)))
    }

    fn score(&self, f: &dyn Fn(&Split) -> anyhow::Result<Vec<f32>>) -> anyhow::Result<Scores> {
        let (b, q) = (f(&self.bank)?, f(&self.test)?);
        let dim = b.len() / self.bank.len();
        self.protocol.score(
            (&b, &self.bank.labels),
            (&q, &self.test.labels),
            dim,
            self.classes,
            &self.device,
        )
    }
}
