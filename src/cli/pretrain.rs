//! `dcl pretrain`: its flags, and the run they describe trained into a run folder
//! ([`crate::run::train`]) as this process's rank of the job.

use crate::augment::ViewRecipe;
use crate::backend::{DeviceKind, DeviceSpec};
use crate::collective::Job;
use crate::loss::{LossKernel, LossKind};
use crate::model::{ModelName, Precision};
use crate::optim::OptimizerKind;
use crate::train::RunConfig;
use clap::Args;
use std::path::PathBuf;

/// The flags default to [`RunConfig::default`].
#[derive(Args, Clone)]
pub struct PretrainArgs {
    #[arg(long, default_value_t = RunConfig::default().loss)]
    loss: LossKind,
    #[arg(long, default_value_t = RunConfig::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = RunConfig::default().seed)]
    seed: u64,
    #[command(flatten)]
    recipe: Recipe,
    /// The run folder (under mpirun or srun, rank 0's; the other ranks write nothing).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (its config.toml wins over flags).
    #[arg(long)]
    resume: bool,
}

/// A run's settings apart from the loss, the batch size and the seed, which an experiment
/// varies (`dcl experiment batch-sweep` takes the same flags).
#[derive(Args, Clone)]
pub struct Recipe {
    /// A dataset path, or a name: cifar10, cifar100, mnist, fashion-mnist.
    #[arg(long, default_value_t = RunConfig::default().data)]
    pub data: String,
    #[arg(long, default_value_t = RunConfig::default().model)]
    model: ModelName,
    #[arg(long, default_value_t = RunConfig::default().epochs)]
    epochs: usize,
    /// Peak learning rate (after warm-up).
    #[arg(long, default_value_t = RunConfig::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = RunConfig::default().optimizer)]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = RunConfig::default().temperature)]
    temperature: f64,
    /// DCLW's weighting width.
    #[arg(long, default_value_t = RunConfig::default().sigma)]
    sigma: f64,
    #[arg(long, default_value_t = RunConfig::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, default_value_t = RunConfig::default().momentum)]
    momentum: f64,
    #[arg(long, default_value_t = RunConfig::default().warmup_epochs)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = RunConfig::default().device)]
    pub device: DeviceKind,
    /// Data parallel over several devices of one kind, each on an equal slice of every batch
    /// (`cpu,cpu`; `cuda:0,cuda:1`); --device follows the first.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    /// With --devices or under mpirun: draw every anchor's negatives from the whole global batch
    /// (false: from its own device's slice only, each device with its own loss).
    #[arg(long, default_value_t = RunConfig::default().gather_negatives, action = clap::ArgAction::Set)]
    gather_negatives: bool,
    /// Train on the first N training images only.
    #[arg(long)]
    limit: Option<usize>,
    /// The kNN monitor's queries: the first N test images only.
    #[arg(long)]
    eval_images: Option<usize>,
    /// The random resized crop's smallest area fraction (SimCLR's 0.08; 0.2 suits short runs).
    #[arg(long, default_value_t = RunConfig::default().crop_min_scale)]
    crop_min_scale: f32,
    /// The view pipeline: color (SimCLR's), grayscale (MNIST-like data), or auto (by the data).
    #[arg(long, default_value_t = RunConfig::default().views)]
    views: ViewRecipe,
    /// fused (the WGSL kernel; the default with --device wgpu) or reference (Burn's ops).
    #[arg(long)]
    loss_kernel: Option<LossKernel>,
    /// f32, or bf16-mixed: convolutions and linear layers in bf16, the rest in f32 (on CUDA;
    /// on the CPU the same roundings around f32 kernels, to measure the effect on accuracy).
    #[arg(long, default_value_t = RunConfig::default().precision)]
    precision: Precision,
    /// A published recipe in place of the model and optimizer flags.
    #[arg(
        long,
        conflicts_with_all = ["model", "epochs", "lr", "optimizer", "weight_decay", "momentum", "warmup_epochs"]
    )]
    preset: Option<Preset>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Preset {
    /// The reproductions' CIFAR-10 recipe (lightly's benchmarks, raminnakhli's grid): ResNet-18,
    /// 200 epochs, SGD with momentum 0.9, lr 0.06 x batch / 128, weight decay 5e-4, cosine decay.
    Cifar10Resnet18,
}

impl Preset {
    fn apply(self, config: &mut RunConfig) {
        match self {
            Preset::Cifar10Resnet18 => {
                config.model = ModelName::ResNet18;
                config.epochs = 200;
                config.optimizer = OptimizerKind::Sgd;
                config.lr = 0.06 * config.batch_size as f64 / 128.0;
                config.weight_decay = 5e-4;
                config.momentum = 0.9;
                config.warmup_epochs = 0.0;
            }
        }
    }
}

impl Recipe {
    pub fn config(&self, loss: LossKind, batch_size: usize, seed: u64) -> RunConfig {
        let mut config = self.as_flagged(loss, batch_size, seed);
        if let Some(preset) = self.preset {
            preset.apply(&mut config);
        }
        config
    }

    /// The config the flags spell out, before any preset.
    fn as_flagged(&self, loss: LossKind, batch_size: usize, seed: u64) -> RunConfig {
        let device = self.devices.first().map_or(self.device, |d| d.kind);
        RunConfig {
            data: self.data.clone(),
            model: self.model,
            loss,
            temperature: self.temperature,
            sigma: self.sigma,
            batch_size,
            epochs: self.epochs,
            lr: self.lr,
            optimizer: self.optimizer,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            warmup_epochs: self.warmup_epochs,
            seed,
            device,
            devices: self.devices.clone(),
            gather_negatives: self.gather_negatives,
            limit: self.limit,
            eval_images: self.eval_images,
            crop_min_scale: self.crop_min_scale,
            views: self.views,
            loss_kernel: self
                .loss_kernel
                .unwrap_or(RunConfig::default_loss_kernel(device)),
            precision: self.precision,
        }
    }
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let job = Job::join()?;
    let config = args.recipe.config(args.loss, args.batch_size, args.seed);
    let trained = crate::run::train(config, &args.out, args.resume, job.group());
    job.end(trained)
}
