//! Torchvision-named ResNet tensors: the architecture they describe, their validation, and
//! BatchNorm folded into the preceding convolution or linear layer.

use crate::arch::{ResNetArch, PROJECTION_DIM};
use crate::safetensors::NamedTensor;
use std::collections::HashMap;

/// PyTorch's and Burn's BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;
/// Names listed per category in an error message before "and N more".
const MAX_LISTED: usize = 20;

/// One BasicBlock's shape, as the walk over the network yields it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    pub prefix: String,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
}

impl BlockSpec {
    pub fn has_downsample(&self) -> bool {
        self.stride != 1 || self.c_in != self.c_out
    }
}

impl ResNetArch {
    /// Reads widths and block counts off the tensor names and the first conv of each stage.
    pub fn from_tensors(tensors: &[NamedTensor]) -> anyhow::Result<Self> {
        let mut arch = ResNetArch {
            widths: [0; 4],
            blocks: [0; 4],
        };
        for s in 0..4 {
            let stage = format!("layer{}.", s + 1);
            arch.blocks[s] = tensors
                .iter()
                .filter_map(|t| t.name.strip_prefix(&stage)?.split('.').next()?.parse().ok())
                .map(|i: usize| i + 1)
                .max()
                .ok_or_else(|| anyhow::anyhow!("no tensors named {stage}*: not a ResNet"))?;
            let first = format!("{stage}0.conv1.weight");
            arch.widths[s] = tensors
                .iter()
                .find(|t| t.name == first)
                .and_then(|t| t.shape.first().copied())
                .ok_or_else(|| anyhow::anyhow!("missing {first}: cannot tell stage width"))?;
        }
        Ok(arch)
    }

    /// The BasicBlocks in order; the first block of stages 2-4 halves the resolution.
    pub fn block_specs(&self) -> Vec<BlockSpec> {
        let mut c_in = self.widths[0];
        let mut specs = Vec::new();
        for s in 0..4 {
            for i in 0..self.blocks[s] {
                let c_out = self.widths[s];
                specs.push(BlockSpec {
                    prefix: format!("layer{}.{i}", s + 1),
                    c_in,
                    c_out,
                    stride: if s > 0 && i == 0 { 2 } else { 1 },
                });
                c_in = c_out;
            }
        }
        specs
    }

    /// Every tensor the network needs, with its shape.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let conv = |out: &mut Vec<_>, name: String, o, i, k| out.push((name, vec![o, i, k, k]));
        let bn = |out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c| {
            for field in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{prefix}.{field}"), vec![c]));
            }
        };
        conv(&mut out, "conv1.weight".into(), self.widths[0], 3, 3);
        bn(&mut out, "bn1", self.widths[0]);
        for b in self.block_specs() {
            let p = &b.prefix;
            conv(&mut out, format!("{p}.conv1.weight"), b.c_out, b.c_in, 3);
            bn(&mut out, &format!("{p}.bn1"), b.c_out);
            conv(&mut out, format!("{p}.conv2.weight"), b.c_out, b.c_out, 3);
            bn(&mut out, &format!("{p}.bn2"), b.c_out);
            if b.has_downsample() {
                conv(
                    &mut out,
                    format!("{p}.downsample.0.weight"),
                    b.c_out,
                    b.c_in,
                    1,
                );
                bn(&mut out, &format!("{p}.downsample.1"), b.c_out);
            }
        }
        let d = self.feature_dim();
        out.push(("head.0.weight".into(), vec![d, d]));
        bn(&mut out, "head.1", d);
        out.push(("head.3.weight".into(), vec![PROJECTION_DIM, d]));
        out.push(("head.3.bias".into(), vec![PROJECTION_DIM]));
        out
    }
}

/// The tensors by name, once every expected tensor is present exactly once with its shape and
/// nothing else is there.
pub struct Checked<'a>(HashMap<&'a str, &'a NamedTensor>);

impl<'a> Checked<'a> {
    /// One error lists every missing, unexpected, duplicated and mis-shaped tensor.
    pub fn new(arch: &ResNetArch, tensors: &'a [NamedTensor]) -> anyhow::Result<Self> {
        let expected: HashMap<String, Vec<usize>> = arch.expected_shapes().into_iter().collect();
        let mut by_name = HashMap::new();
        let (mut unexpected, mut duplicated, mut misshaped) = (vec![], vec![], vec![]);
        for t in tensors {
            match expected.get(&t.name) {
                None => unexpected.push(t.name.clone()),
                Some(_) if by_name.contains_key(t.name.as_str()) => duplicated.push(t.name.clone()),
                Some(shape) => {
                    if *shape != t.shape || t.data.len() != shape.iter().product::<usize>() {
                        misshaped.push(format!(
                            "{} {:?} with {} values (expected {shape:?})",
                            t.name,
                            t.shape,
                            t.data.len()
                        ));
                    }
                    by_name.insert(t.name.as_str(), t);
                }
            }
        }
        let mut missing: Vec<String> = expected
            .keys()
            .filter(|n| !by_name.contains_key(n.as_str()))
            .cloned()
            .collect();
        missing.sort();
        let problems: Vec<String> = [
            ("missing", missing),
            ("unexpected", unexpected),
            ("duplicated", duplicated),
            ("wrong shape", misshaped),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{what}: {}", list(&names)))
        .collect();
        anyhow::ensure!(
            problems.is_empty(),
            "weights do not fit a ResNet with widths {:?} and blocks {:?}; {}",
            arch.widths,
            arch.blocks,
            problems.join("; ")
        );
        Ok(Self(by_name))
    }

    fn data(&self, name: &str) -> &'a [f32] {
        // `new` checked that every expected name is present.
        &self.0[name].data
    }

    /// A convolution or linear weight ([out, ...] row-major) with the BatchNorm `bn` folded in.
    pub fn fold(&self, weight: &str, bn: &str) -> Folded {
        let field = |f: &str| self.data(&format!("{bn}.{f}"));
        let (gamma, beta) = (field("weight"), field("bias"));
        let (mean, var) = (field("running_mean"), field("running_var"));
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

fn list(names: &[String]) -> String {
    let shown = names[..names.len().min(MAX_LISTED)].join(", ");
    match names.len().saturating_sub(MAX_LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}
