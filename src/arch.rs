//! The one description of the ResNet: stage widths and blocks, each block's shape, every tensor's
//! torchvision name and shape, and the one validator of a set of named tensors. The Burn model
//! (`model`), the weights' name walk (`weights`) and the WGSL engine's folding (`gpu::infer`) are
//! all built from it. Plain numbers, so the inference-only build needs no Burn.

use std::collections::HashMap;

/// The named encoder presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelName {
    ResNet18,
    ResNetMini,
}

choice!(
    ModelName,
    "model",
    [
        ResNet18 = "resnet18",
        ResNetMini = "resnet-mini" | "resnet_mini"
    ]
);

impl ModelName {
    pub fn arch(self) -> ResNetArch {
        match self {
            // torchvision's resnet18 with the CIFAR stem and no fc: 11.17 M parameters, 512-d.
            Self::ResNet18 => ResNetArch {
                widths: [64, 128, 256, 512],
                blocks: [2, 2, 2, 2],
            },
            // Quarter width, one block per stage: small enough to train in a browser tab.
            Self::ResNetMini => ResNetArch {
                widths: [16, 32, 64, 128],
                blocks: [1, 1, 1, 1],
            },
        }
    }
}

/// A named f32 tensor in PyTorch layout, as `model.safetensors` stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Stage widths and BasicBlocks per stage; stages 2-4 halve the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetArch {
    pub widths: [usize; 4],
    pub blocks: [usize; 4],
}

/// The projection head's output width, as in SimCLR.
pub const PROJECTION_DIM: usize = 128;
/// The widest stage a set of weights may declare: past it, a crafted file is refused before
/// anything is allocated.
pub const MAX_WIDTH: usize = 4096;
/// The most BasicBlocks per stage (torchvision's deepest ResNet has 36).
pub const MAX_BLOCKS: usize = 64;
/// Names listed per category in an error message before "and N more".
const MAX_LISTED: usize = 20;

/// Torchvision's names of the tensors outside the blocks. The head is
/// `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)` under `head.*`.
pub mod names {
    pub const STEM_CONV: &str = "conv1.weight";
    pub const STEM_BN: &str = "bn1";
    pub const HEAD_LINEAR: &str = "head.0.weight";
    pub const HEAD_BN: &str = "head.1";
    pub const HEAD_OUT: &str = "head.3.weight";
    pub const HEAD_OUT_BIAS: &str = "head.3.bias";

    /// A BatchNorm's four tensors: weight (gamma), bias (beta), running mean and variance.
    pub fn batch_norm(prefix: &str) -> [String; 4] {
        ["weight", "bias", "running_mean", "running_var"].map(|f| format!("{prefix}.{f}"))
    }
}

/// Parameter counts, as `dcl model info` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub backbone: usize,
    pub head: usize,
    pub total: usize,
    pub feature_dim: usize,
    pub projection_dim: usize,
}

/// One BasicBlock's shape and its torchvision prefix (`layer2.0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// 0-3.
    pub stage: usize,
    pub prefix: String,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
}

impl BlockSpec {
    /// A 1x1 strided projection of the residual, when the block changes shape.
    pub fn has_downsample(&self) -> bool {
        self.stride != 1 || self.c_in != self.c_out
    }

    /// `conv1`, `bn1`, `conv2`, `bn2`, `downsample.0`, `downsample.1` under the prefix: a
    /// convolution's weight name, a BatchNorm's prefix.
    pub fn name(&self, layer: &str) -> String {
        match layer {
            "conv1" | "conv2" | "downsample.0" => format!("{}.{layer}.weight", self.prefix),
            _ => format!("{}.{layer}", self.prefix),
        }
    }
}

impl ResNetArch {
    pub fn feature_dim(&self) -> usize {
        self.widths[3]
    }

    /// Widths in 1..=MAX_WIDTH and block counts in 1..=MAX_BLOCKS.
    pub fn validate(&self) -> anyhow::Result<()> {
        for s in 0..4 {
            let (width, blocks) = (self.widths[s], self.blocks[s]);
            anyhow::ensure!(
                (1..=MAX_WIDTH).contains(&width),
                "stage {} is {width} channels wide: a stage has 1 to {MAX_WIDTH}",
                s + 1
            );
            anyhow::ensure!(
                (1..=MAX_BLOCKS).contains(&blocks),
                "stage {} has {blocks} blocks: a stage has 1 to {MAX_BLOCKS}",
                s + 1
            );
        }
        Ok(())
    }

    /// Reads widths and block counts off the tensor names and the first conv of each stage,
    /// within the bounds of [`ResNetArch::validate`].
    pub fn from_tensors(tensors: &[NamedTensor]) -> anyhow::Result<Self> {
        let mut arch = ResNetArch {
            widths: [0; 4],
            blocks: [0; 4],
        };
        for s in 0..4 {
            let stage = format!("layer{}.", s + 1);
            for t in tensors {
                let Some(index) = t
                    .name
                    .strip_prefix(&stage)
                    .and_then(|n| n.split('.').next())
                else {
                    continue;
                };
                let index: usize = index
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{}: {index} is not a block index", t.name))?;
                anyhow::ensure!(
                    index < MAX_BLOCKS,
                    "{}: block {index} is past the {MAX_BLOCKS} blocks a stage may have",
                    t.name
                );
                arch.blocks[s] = arch.blocks[s].max(index + 1);
            }
            anyhow::ensure!(
                arch.blocks[s] > 0,
                "no tensors named {stage}*: not a ResNet"
            );
            let first = BlockSpec {
                stage: s,
                prefix: format!("{stage}0"),
                c_in: 0,
                c_out: 0,
                stride: 1,
            }
            .name("conv1");
            arch.widths[s] = tensors
                .iter()
                .find(|t| t.name == first)
                .and_then(|t| t.shape.first().copied())
                .ok_or_else(|| anyhow::anyhow!("missing {first}: cannot tell stage width"))?;
        }
        arch.validate()?;
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
                    stage: s,
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

    /// Every tensor the network holds, with its shape, in torchvision's order.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let conv = |out: &mut Vec<_>, name: String, o, i, k| out.push((name, vec![o, i, k, k]));
        let bn = |out: &mut Vec<(String, Vec<usize>)>, prefix: &str, c| {
            out.extend(names::batch_norm(prefix).map(|n| (n, vec![c])));
        };
        conv(&mut out, names::STEM_CONV.into(), self.widths[0], 3, 3);
        bn(&mut out, names::STEM_BN, self.widths[0]);
        for b in self.block_specs() {
            conv(&mut out, b.name("conv1"), b.c_out, b.c_in, 3);
            bn(&mut out, &b.name("bn1"), b.c_out);
            conv(&mut out, b.name("conv2"), b.c_out, b.c_out, 3);
            bn(&mut out, &b.name("bn2"), b.c_out);
            if b.has_downsample() {
                conv(&mut out, b.name("downsample.0"), b.c_out, b.c_in, 1);
                bn(&mut out, &b.name("downsample.1"), b.c_out);
            }
        }
        let d = self.feature_dim();
        out.push((names::HEAD_LINEAR.into(), vec![d, d]));
        bn(&mut out, names::HEAD_BN, d);
        out.push((names::HEAD_OUT.into(), vec![PROJECTION_DIM, d]));
        out.push((names::HEAD_OUT_BIAS.into(), vec![PROJECTION_DIM]));
        out
    }

    /// Trainable parameters only: batch-norm running statistics are buffers, as PyTorch counts
    /// them.
    pub fn param_counts(&self) -> ParamCounts {
        let count = |head: bool| -> usize {
            self.expected_shapes()
                .iter()
                .filter(|(name, _)| name.starts_with("head.") == head)
                .filter(|(name, _)| !name.contains(".running_"))
                .map(|(_, shape)| shape.iter().product::<usize>())
                .sum()
        };
        let (backbone, head) = (count(false), count(true));
        ParamCounts {
            backbone,
            head,
            total: backbone + head,
            feature_dim: self.feature_dim(),
            projection_dim: PROJECTION_DIM,
        }
    }

    /// The tensors by name, once every expected tensor is present exactly once with its shape
    /// and nothing else is there. One error lists every missing, unexpected, duplicated and
    /// mis-shaped tensor: the one validator of weights, for the Burn model and the WGSL engine.
    pub fn check<'a>(
        &self,
        tensors: &'a [NamedTensor],
    ) -> anyhow::Result<HashMap<&'a str, &'a NamedTensor>> {
        let expected: HashMap<String, Vec<usize>> = self.expected_shapes().into_iter().collect();
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
            self.widths,
            self.blocks,
            problems.join("; ")
        );
        Ok(by_name)
    }
}

fn list(names: &[String]) -> String {
    let shown = names[..names.len().min(MAX_LISTED)].join(", ");
    match names.len().saturating_sub(MAX_LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(arch: ResNetArch) -> Vec<NamedTensor> {
        arch.expected_shapes()
            .into_iter()
            .map(|(name, shape)| NamedTensor {
                data: vec![0.5; shape.iter().product()],
                name,
                shape,
            })
            .collect()
    }

    #[test]
    fn the_presets_read_back_from_their_tensors() {
        for name in [ModelName::ResNetMini, ModelName::ResNet18] {
            let arch = name.arch();
            let t = tensors(arch);
            assert_eq!(ResNetArch::from_tensors(&t).unwrap(), arch);
            assert_eq!(arch.check(&t).unwrap().len(), t.len());
        }
        // The stem (conv + 4 BN tensors), 8 blocks of 10, 3 downsamples of 5, the head's 7.
        assert_eq!(tensors(ModelName::ResNet18.arch()).len(), 5 + 80 + 15 + 7);
    }

    #[test]
    fn crafted_names_and_widths_are_refused_before_allocating() {
        let mut t = tensors(ModelName::ResNetMini.arch());
        t[0].name = "layer1.999999999.conv1.weight".into();
        let err = ResNetArch::from_tensors(&t).unwrap_err().to_string();
        assert!(err.contains("past the 64 blocks"), "{err}");
        let mut t = tensors(ModelName::ResNetMini.arch());
        let first = t
            .iter_mut()
            .find(|t| t.name == "layer2.0.conv1.weight")
            .unwrap();
        first.shape[0] = 0;
        let err = ResNetArch::from_tensors(&t).unwrap_err().to_string();
        assert!(err.contains("stage 2 is 0 channels wide"), "{err}");
    }

    #[test]
    fn one_error_names_every_fault() {
        let arch = ModelName::ResNetMini.arch();
        let mut t = tensors(arch);
        t.retain(|t| t.name != "layer2.0.conv1.weight");
        t.iter_mut().find(|t| t.name == "bn1.bias").unwrap().shape = vec![7];
        t.push(t[0].clone());
        let err = arch.check(&t).unwrap_err().to_string();
        for part in [
            "missing: layer2.0.conv1.weight",
            "duplicated: conv1.weight",
            "wrong shape: bn1.bias [7] with 16 values (expected [16])",
        ] {
            assert!(err.contains(part), "{part} not in: {err}");
        }
    }
}
