//! BatchNorm folded into the preceding convolution or linear layer, for the WGSL engine, on
//! tensors the architecture description (`arch`) has validated.

use crate::arch::{names, ResNetArch};
use crate::safetensors::NamedTensor;
use std::collections::HashMap;

/// PyTorch's and Burn's BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;

/// Validated tensors by name.
pub struct Checked<'a>(HashMap<&'a str, &'a NamedTensor>);

impl<'a> Checked<'a> {
    /// The tensors, validated against `arch` ([`ResNetArch::check`], the one validator).
    pub fn new(arch: &ResNetArch, tensors: &'a [NamedTensor]) -> anyhow::Result<Self> {
        arch.check(tensors).map(Self)
    }

    fn data(&self, name: &str) -> &'a [f32] {
        // `new` checked that every expected name is present.
        &self.0[name].data
    }

    /// A convolution or linear weight ([out, ...] row-major) with the BatchNorm `bn` folded in.
    pub fn fold(&self, weight: &str, bn: &str) -> Folded {
        let [gamma, beta, mean, var] = names::batch_norm(bn).map(|name| self.data(&name));
        let w = self.data(weight);
        let row = w.len() / gamma.len();
        let mut folded = Folded {
            weight: Vec::with_capacity(w.len()),
            bias: Vec::with_capacity(gamma.len()),
        };
        for (o, chunk) in w.chunks_exact(row).enumerate() {
            let scale = gamma[o] as f64 / (var[o] as f64 + BN_EPS).sqrt();
            folded
                .weight
                .extend(chunk.iter().map(|&v| (v as f64 * scale) as f32));
            folded
                .bias
                .push((beta[o] as f64 - mean[o] as f64 * scale) as f32);
        }
        folded
    }

    /// A layer with no BatchNorm after it, taken as it is.
    pub fn plain(&self, weight: &str, bias: &str) -> Folded {
        Folded {
            weight: self.data(weight).to_vec(),
            bias: self.data(bias).to_vec(),
        }
    }
}

/// A layer's weight ([out, ...] row-major) and per-output bias after folding.
pub struct Folded {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}
