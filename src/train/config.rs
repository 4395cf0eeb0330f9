//! The one description of a run: what `dcl pretrain` writes to `config.toml`, what its flags
//! default to, and what the page's controls and the `train` embed's `data-config` set (in the
//! page's camelCase spelling, which the embed API keeps; see [`RunConfig::overridden`]).

use crate::augment::{ViewConfig, ViewRecipe};
use crate::backend::{DeviceKind, DeviceSpec};
use crate::loss::{ContrastiveLoss, LossKernel, LossKind};
use crate::model::{ModelName, Precision};
use crate::optim::OptimizerKind;
use serde::{Deserialize, Serialize};

/// Everything that defines a run. Fields left out of a `config.toml` or a page config take
/// [`RunConfig::default`] (the CLI) or [`RunConfig::playground`] (the page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub data: String,
    pub model: ModelName,
    pub loss: LossKind,
    pub temperature: f64,
    /// DCLW's weighting width.
    pub sigma: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    pub momentum: f64,
    pub warmup_epochs: f64,
    pub seed: u64,
    pub device: DeviceKind,
    /// Data parallel: one peer per device (all of `device`'s kind), each on an equal slice of
    /// every batch. Empty: `device` alone.
    pub devices: Vec<DeviceSpec>,
    /// With several devices or processes: every anchor's negatives come from the whole global
    /// batch (the one-device loss), not only its own device's slice.
    pub gather_negatives: bool,
    /// Train on the first `limit` training images only (toy runs).
    pub limit: Option<usize>,
    /// The kNN monitor's queries: the first `eval_images` test images (all when unset).
    pub eval_images: Option<usize>,
    /// The random resized crop's smallest area fraction (SimCLR: 0.08). Short runs on small
    /// datasets learn faster with gentler crops (MoCo's CIFAR recipe uses 0.2).
    pub crop_min_scale: f32,
    /// The view pipeline; `auto` picks it from the data's channels when the run starts. A
    /// `config.toml` without it predates grayscale recipes: every dataset then had SimCLR's.
    #[serde(default = "colour_views")]
    pub views: ViewRecipe,
    /// The fused WGSL kernel or Burn's composed ops (runs written before the kernel existed used
    /// the latter, hence the default).
    pub loss_kernel: LossKernel,
    /// The encoder's arithmetic while training (see `model::precision`).
    pub precision: Precision,
}

impl Default for RunConfig {
    /// SimCLR's CIFAR-10 recipe at batch 256 with DCL's temperature.
    fn default() -> Self {
        Self {
            data: "cifar10".into(),
            model: ModelName::ResNetMini,
            loss: LossKind::Dcl,
            temperature: 0.1,
            sigma: 0.5,
            batch_size: 256,
            epochs: 200,
            lr: 0.06,
            optimizer: OptimizerKind::Sgd,
            weight_decay: 5e-4,
            momentum: 0.9,
            warmup_epochs: 0.0,
            seed: 0,
            device: DeviceKind::Cpu,
            devices: vec![],
            gather_negatives: true,
            limit: None,
            eval_images: None,
            crop_min_scale: ViewConfig::default().crop_scale.0,
            views: ViewRecipe::Auto,
            loss_kernel: LossKernel::Reference,
            precision: Precision::F32,
        }
    }
}

impl RunConfig {
    /// The page's toy run: small enough to learn visibly in a browser tab within minutes.
    pub fn playground() -> Self {
        Self {
            data: String::new(),
            batch_size: 32,
            epochs: 10,
            lr: 1e-3,
            optimizer: OptimizerKind::Adam,
            weight_decay: 1e-6,
            seed: 1,
            device: DeviceKind::Wgpu,
            limit: Some(2000),
            eval_images: Some(500),
            loss_kernel: LossKernel::Fused,
            ..Self::default()
        }
    }

    /// This config on `device`, with the loss kernel that suits it.
    pub fn on_device(self, device: DeviceKind) -> Self {
        Self {
            device,
            loss_kernel: Self::default_loss_kernel(device),
            ..self
        }
    }

    /// The loss kernel that suits a device when none is asked for: the fused WGSL kernel on wgpu.
    pub fn default_loss_kernel(device: DeviceKind) -> LossKernel {
        match device {
            DeviceKind::Wgpu => LossKernel::Fused,
            DeviceKind::Cpu | DeviceKind::Cuda => LossKernel::Reference,
        }
    }

    /// How many devices train together.
    pub fn peers(&self) -> usize {
        self.devices.len().max(1)
    }

    /// The device rank 0 trains on (the session's, whose encoder is evaluated and saved).
    pub fn first_device(&self) -> DeviceSpec {
        let alone = DeviceSpec {
            kind: self.device,
            index: 0,
        };
        self.devices.first().copied().unwrap_or(alone)
    }

    /// Checks every setting that does not need the data; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_devices()?;
        self.precision.check(self.device)?;
        ContrastiveLoss::new(self.loss, self.temperature, self.sigma)?;
        anyhow::ensure!(
            self.batch_size >= 2,
            "--batch-size {} must be at least 2",
            self.batch_size
        );
        anyhow::ensure!(self.epochs >= 1, "--epochs must be at least 1");
        anyhow::ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr {} must be > 0",
            self.lr
        );
        anyhow::ensure!(
            self.crop_min_scale > 0.0 && self.crop_min_scale <= 1.0,
            "--crop-min-scale {} must be in (0, 1]",
            self.crop_min_scale
        );
        anyhow::ensure!(
            self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0,
            "--warmup-epochs {} must be >= 0",
            self.warmup_epochs
        );
        // The loss path follows the device here, in one place: the fused kernel is WGSL.
        anyhow::ensure!(
            self.loss_kernel == LossKernel::Reference || self.device == DeviceKind::Wgpu,
            "--loss-kernel fused is a WGSL kernel and runs with --device wgpu; with --device {} \
             use --loss-kernel reference",
            self.device
        );
        anyhow::ensure!(
            self.loss_kernel == LossKernel::Reference
                || cfg!(any(feature = "wgpu", feature = "webgpu")),
            "--loss-kernel fused needs a build with the wgpu feature; use reference"
        );
        anyhow::ensure!(self.limit != Some(0), "--limit must be at least 1");
        anyhow::ensure!(
            self.eval_images != Some(0),
            "--eval-images must be at least 1"
        );
        Ok(())
    }

    fn validate_devices(&self) -> anyhow::Result<()> {
        let list = || {
            let names: Vec<String> = self.devices.iter().map(|d| d.to_string()).collect();
            names.join(",")
        };
        anyhow::ensure!(
            self.devices.iter().all(|d| d.kind == self.device),
            "--devices {}: every device must be of --device's kind ({})",
            list(),
            self.device
        );
        let peers = self.peers();
        anyhow::ensure!(
            self.batch_size.is_multiple_of(peers) && self.batch_size / peers >= 2,
            "--batch-size {} does not split into {peers} equal slices of at least 2 images \
             (one per device of --devices {})",
            self.batch_size,
            list()
        );
        anyhow::ensure!(
            peers == 1 || cfg!(not(target_family = "wasm")),
            "a page trains on one device; --devices is the command line's"
        );
        Ok(())
    }

    /// This config with the fields named in `overrides` (a JSON object, keys in snake_case or in
    /// the page's camelCase; the page calls `limit` `subset`) replaced, then validated.
    pub fn overridden(&self, overrides: &serde_json::Value) -> anyhow::Result<Self> {
        let serde_json::Value::Object(fields) = overrides else {
            anyhow::bail!("a run config must be an object of settings, not {overrides}");
        };
        let mut merged = serde_json::to_value(self)?;
        for (key, value) in fields {
            merged[snake_case(key)] = value.clone();
        }
        let config: Self =
            serde_json::from_value(merged).map_err(|e| anyhow::anyhow!("bad run config: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// This config with what `auto` settings leave to the data decided (the view recipe).
    pub fn for_data(&self, dataset: &crate::data::Dataset) -> Self {
        Self {
            views: self.views.resolve(dataset.source_shape[0]),
            ..self.clone()
        }
    }

    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// A `config.toml`; `origin` (its path) names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        Ok(config)
    }
}

fn colour_views() -> ViewRecipe {
    ViewRecipe::Color
}

/// `batchSize` -> `batch_size`; the page's `subset` is the CLI's `limit`.
fn snake_case(key: &str) -> String {
    if key == "subset" {
        return "limit".into();
    }
    key.chars()
        .flat_map(|c| match c.is_ascii_uppercase() {
            true => vec!['_', c.to_ascii_lowercase()],
            false => vec![c],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trips_and_fills_missing_fields_with_defaults() {
        let config = RunConfig {
            limit: Some(500),
            temperature: 0.2,
            ..RunConfig::default()
        };
        let text = config.to_toml().unwrap();
        assert_eq!(RunConfig::from_toml(&text, "config.toml").unwrap(), config);
        // A config.toml written before eval_images and loss_kernel existed.
        let old = text
            .lines()
            .filter(|l| !l.starts_with("eval_images") && !l.starts_with("loss_kernel"))
            .collect::<Vec<_>>()
            .join("\n");
        let read = RunConfig::from_toml(&old, "config.toml").unwrap();
        assert_eq!(read.loss_kernel, LossKernel::Reference);
        assert_eq!(read.limit, Some(500));
    }

    #[test]
    fn names_the_bad_setting() {
        let err = RunConfig::from_toml("temprature = 0.1", "run/config.toml").unwrap_err();
        assert!(err.to_string().contains("temprature"), "{err}");
        let err = RunConfig::from_toml("temperature = -1.0", "run/config.toml").unwrap_err();
        assert!(err.to_string().contains("run/config.toml"), "{err}");
        let bad = RunConfig {
            batch_size: 1,
            ..RunConfig::playground()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--batch-size"));
    }

    #[test]
    fn the_page_overrides_its_preset_in_camel_case() {
        let json = r#"{"batchSize": 16, "subset": 480, "evalImages": 200, "loss": "dclw"}"#;
        let overrides = serde_json::from_str(json).unwrap();
        let config = RunConfig::playground().overridden(&overrides).unwrap();
        assert_eq!(
            (config.batch_size, config.limit, config.eval_images),
            (16, Some(480), Some(200))
        );
        assert_eq!(config.loss, LossKind::Dclw);
        assert_eq!(config.lr, RunConfig::playground().lr);
        let typo = serde_json::json!({ "batchSise": 16 });
        let err = RunConfig::playground().overridden(&typo).unwrap_err();
        assert!(err.to_string().contains("batch_sise"), "{err}");
        let bad = serde_json::json!({ "temperature": 0.0 });
        assert!(RunConfig::playground().overridden(&bad).is_err());
    }
}
