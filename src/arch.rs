//! The encoder presets as plain numbers: what the Burn model (`model`) and the WGSL inference
//! engine (`gpu::infer`) both build from, so the inference-only build needs no Burn.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The named encoder presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelName {
    #[serde(rename = "resnet18")]
    ResNet18,
    #[serde(rename = "resnet-mini")]
    ResNetMini,
}

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

impl FromStr for ModelName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resnet18" => Ok(Self::ResNet18),
            "resnet-mini" | "resnet_mini" => Ok(Self::ResNetMini),
            other => Err(format!(
                "unknown model '{other}': expected resnet18 or resnet-mini"
            )),
        }
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ResNet18 => "resnet18",
            Self::ResNetMini => "resnet-mini",
        })
    }
}

/// Stage widths and BasicBlocks per stage; stages 2-4 halve the resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetArch {
    pub widths: [usize; 4],
    pub blocks: [usize; 4],
}

impl ResNetArch {
    pub fn feature_dim(&self) -> usize {
        self.widths[3]
    }
}

/// The projection head's output width, as in SimCLR.
pub const PROJECTION_DIM: usize = 128;
