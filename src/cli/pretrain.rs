//! `dcl pretrain`: a run folder written by a [`Session`] through [`RunFolder`], resumable from
//! its latest checkpoint.

use crate::augment::ViewRecipe;
use crate::backend::{DeviceKind, DeviceSpec};
use crate::collective::Collective;
use crate::data::discover;
use crate::files::write_atomic;
use crate::loss::{LossKernel, LossKind};
use crate::model::{ModelName, Precision};
use crate::optim::OptimizerKind;
use crate::run::{Checkpoint, RunDir};
use crate::safetensors::safetensors_bytes;
use crate::train::{Event, RunConfig, Session, Sink, Trainer};
use crate::weights::torchvision_tensors;
use burn::module::AutodiffModule;
use clap::Args;
use std::path::{Path, PathBuf};

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
    /// The run folder (rank 0's; other ranks of --nodes write nothing).
    #[arg(long, required_unless_present = "node_rank")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its latest checkpoint (its config.toml wins over flags).
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    nodes: Nodes,
}

/// Training across processes, one device each, on one machine or several: every rank runs
/// `dcl pretrain` with the same --nodes and --coordinator. Rank 0 listens on the coordinator
/// address, owns the run folder and sends the others its config and weights; they bring only
/// the data (by the run's --data name or path, on their own disk).
#[derive(Args, Clone)]
struct Nodes {
    /// How many processes train together.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// This process's rank, 0 to --nodes - 1; 0 writes the run.
    #[arg(long)]
    node_rank: Option<usize>,
    /// Rank 0's HOST:PORT (it listens there; the others connect to it).
    #[arg(long, default_value = "127.0.0.1:29500")]
    coordinator: String,
    /// Seconds to wait for every rank to connect.
    #[arg(long, default_value_t = 300)]
    connect_timeout: u64,
}

impl Nodes {
    fn rank(&self) -> usize {
        self.node_rank.unwrap_or(0)
    }

    /// This process's place in the group, or `None` alone.
    fn join(&self) -> anyhow::Result<Option<Collective>> {
        if self.nodes <= 1 {
            anyhow::ensure!(
                self.rank() == 0,
                "--node-rank {} needs --nodes above it",
                self.rank()
            );
            return Ok(None);
        }
        let patience = std::time::Duration::from_secs(self.connect_timeout);
        Collective::join(&self.coordinator, self.rank(), self.nodes, patience).map(Some)
    }
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
    /// With --devices or --nodes: draw every anchor's negatives from the whole global batch
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
    let config = args.recipe.config(args.loss, args.batch_size, args.seed);
    anyhow::ensure!(
        args.nodes.nodes <= 1 || config.devices.is_empty(),
        "--nodes runs one device per process; --devices splits one process over several"
    );
    let nodes = args.nodes.nodes.max(1);
    anyhow::ensure!(
        config.batch_size.is_multiple_of(nodes) && config.batch_size / nodes >= 2,
        "--batch-size {} does not split into {nodes} equal slices of at least 2 images (one per \
         process of --nodes)",
        config.batch_size
    );
    match (args.nodes.rank(), &args.out) {
        (0, Some(out)) => train_in_group(config, out, args.resume, || args.nodes.join()),
        (0, None) => anyhow::bail!("--out is needed: rank 0 writes the run"),
        (_, _) => follow(args.nodes.join()?.expect("a rank above 0 is in a group")),
    }
}

/// Trains `config` into the run folder `out`; with `resume`, continues the run already there
/// from its latest checkpoint (its `config.toml` wins over `config`), and a finished run is
/// left as it is.
pub fn train(config: RunConfig, out: &Path, resume: bool) -> anyhow::Result<()> {
    train_in_group(config, out, resume, || Ok(None))
}

/// [`train`] as rank 0 of the group `join` makes (joined once everything that can fail alone
/// has been checked): the other ranks get its config and its weights and optimizer state
/// before the first step, whether the run starts or resumes.
fn train_in_group(
    config: RunConfig,
    out: &Path,
    resume: bool,
    join: impl FnOnce() -> anyhow::Result<Option<Collective>>,
) -> anyhow::Result<()> {
    let existing = out.join("config.toml").is_file();
    let config = if resume && existing {
        RunDir::open(out)?.read_config()?
    } else {
        anyhow::ensure!(
            !existing,
            "{} already holds a run; pass --resume to continue it or pick another --out",
            out.display()
        );
        config
    };
    // Everything that can fail without the folder comes first, the device included: a GPU that
    // cannot start leaves nothing behind.
    config.validate()?;
    let dataset = discover::load(&config.data)?;
    let device = crate::backend::device_at(config.first_device())?;
    let config = config.for_data(&dataset);
    let group = join()?;
    let dir = RunDir::create(out)?;
    dir.write_config(&config)?;
    let mut session = Session::in_group(config, &dataset, device, group.clone())?;
    match dir.latest_checkpoint()?.filter(|_| resume) {
        Some(ckpt) => {
            eprintln!("resuming {} after epoch {}", dir.root.display(), ckpt.epoch);
            dir.truncate_events_after(ckpt.epoch)?;
            session.restore(ckpt.epoch, ckpt.weights, ckpt.optimizer)?;
        }
        // A fresh start (or a resume before the first checkpoint): the log starts over.
        None => dir.clear_events()?,
    }
    if let Some(group) = group {
        let trainer = session.trainer();
        let (weights, optimizer) = trainer.snapshot()?;
        let start = Start {
            config: trainer.config().clone(),
            epoch: trainer.epoch,
            weights,
            optimizer,
        };
        group.all_gather_bytes(start.to_bytes()?)?;
    }
    session.run(&mut RunFolder { dir, bar: None })
}

/// What rank 0 of `--nodes` sends the others before the first step: a JSON header line (the
/// config, the epoch, the weights' length), then the weights and the optimizer state.
struct Start {
    config: RunConfig,
    epoch: usize,
    weights: Vec<u8>,
    optimizer: Vec<u8>,
}

impl Start {
    fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let header = serde_json::json!({
            "config": self.config,
            "epoch": self.epoch,
            "weights": self.weights.len(),
        });
        let mut bytes = serde_json::to_vec(&header)?;
        bytes.push(b'\n');
        bytes.extend(&self.weights);
        bytes.extend(&self.optimizer);
        Ok(bytes)
    }

    fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let unreadable = || anyhow::anyhow!("rank 0 sent a start this version cannot read");
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(unreadable)?;
        let header: serde_json::Value = serde_json::from_slice(&bytes[..newline])
            .map_err(|e| anyhow::anyhow!("rank 0 sent a start this version cannot read: {e}"))?;
        let config: RunConfig = serde_json::from_value(header["config"].clone())?;
        let epoch = header["epoch"].as_u64().ok_or_else(unreadable)? as usize;
        let weights = header["weights"].as_u64().ok_or_else(unreadable)? as usize;
        let state = &bytes[newline + 1..];
        anyhow::ensure!(state.len() >= weights, "rank 0's start is truncated");
        let (weights, optimizer) = state.split_at(weights);
        Ok(Self {
            config,
            epoch,
            weights: weights.to_vec(),
            optimizer: optimizer.to_vec(),
        })
    }
}

/// A rank above 0 of `--nodes`: takes rank 0's config and state, then steps with it to the end.
fn follow(group: Collective) -> anyhow::Result<()> {
    let parts = group.all_gather_bytes(vec![])?;
    let Start {
        config,
        epoch,
        weights,
        optimizer,
    } = Start::from_bytes(&parts[0])?;
    let dataset = discover::load(&config.data)?;
    let device = crate::backend::device_at(config.first_device())?;
    eprintln!(
        "rank {} of {}: {} from epoch {epoch}",
        group.rank(),
        group.world(),
        config.data
    );
    let mut session = Session::in_group(config, &dataset, device, Some(group))?;
    let trainer = session.trainer_mut();
    trainer.restore(epoch, weights, optimizer)?;
    while !trainer.finished() {
        if trainer.epoch_finished() {
            trainer.end_epoch();
            continue;
        }
        trainer.step()?;
    }
    Ok(())
}

/// The CLI's sink: events to `metrics.jsonl`, a progress bar per epoch, and at each epoch's end
/// a checkpoint and `model.safetensors`.
struct RunFolder {
    dir: RunDir,
    bar: Option<indicatif::ProgressBar>,
}

impl Sink for RunFolder {
    fn record(&mut self, event: &Event, trainer: &Trainer) -> anyhow::Result<()> {
        match event {
            Event::Pixels { scores, .. } => {
                eprintln!("raw pixels: {} (the level to beat)", scores.summary());
                self.dir.log(event)?;
            }
            Event::Step {
                loss,
                images_per_sec,
                ..
            } => {
                self.dir.log(event)?;
                let bar = self.bar.get_or_insert_with(|| progress_bar(trainer));
                bar.set_message(format!("loss {loss:.4}  {images_per_sec:.0} img/s"));
                bar.inc(1);
            }
            Event::Evaluation { epoch, scores, .. } => {
                let when = if *epoch == 0 {
                    " (before training)"
                } else {
                    ""
                };
                eprintln!("epoch {epoch}{when}: {}", scores.summary());
                self.dir.log(event)?;
            }
            Event::Epoch { epoch } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish();
                }
                let (weights, optimizer) = trainer.snapshot()?;
                self.dir.save_checkpoint(&Checkpoint {
                    epoch: *epoch,
                    weights,
                    optimizer,
                })?;
                let tensors = torchvision_tensors(&trainer.encoder().valid());
                write_atomic(
                    &self.dir.root.join("model.safetensors"),
                    &safetensors_bytes(&tensors, trainer.config().model),
                )?;
            }
            Event::Finished => {}
        }
        Ok(())
    }
}

fn progress_bar(trainer: &Trainer) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(trainer.steps_per_epoch() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "epoch {}/{} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ETA {{eta}}",
            trainer.epoch + 1,
            trainer.config().epochs
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}
