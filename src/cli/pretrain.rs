//! `dcl pretrain`: a run folder written by a [`Session`] through [`RunFolder`], resumable from
//! its latest checkpoint.

use crate::augment::ViewRecipe;
use crate::backend::{DeviceKind, DeviceSpec};
use crate::collective::{Collective, Job};
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
    let trained = train_in_group(config, &args.out, args.resume, job.group());
    job.end(trained)
}

/// Trains `config` into the run folder `out`; with `resume`, continues the run already there
/// from its latest checkpoint (its `config.toml` wins over `config`), and a finished run is
/// left as it is.
pub fn train(config: RunConfig, out: &Path, resume: bool) -> anyhow::Result<()> {
    train_in_group(config, out, resume, None)
}

/// [`train`] as one rank of `group`. Every rank runs this with the same flags; rank 0 alone
/// reads and writes the run folder, and the others start from what it read.
fn train_in_group(
    config: RunConfig,
    out: &Path,
    resume: bool,
    group: Option<&Collective>,
) -> anyhow::Result<()> {
    let writer = group.is_none_or(|g| g.rank() == 0);
    let start = match writer {
        true => Start::read(config, out, resume)?,
        false => Start {
            config,
            checkpoint: None,
        },
    };
    let Start { config, checkpoint } = match group {
        Some(group) => start.share(group)?,
        None => start,
    };
    // Everything that can fail without the folder comes first, the device included: a GPU that
    // cannot start leaves nothing behind.
    config.validate()?;
    if let Some(group) = group {
        check_split(&config, group.world())?;
    }
    let dataset = discover::load(&config.data)?;
    let device = crate::backend::device_at(config.first_device())?;
    let mut session = Session::in_group(config, &dataset, device, group.cloned())?;
    let resumed = checkpoint.as_ref().map(|ckpt| ckpt.epoch);
    if let Some(ckpt) = checkpoint {
        session.restore(ckpt.epoch, ckpt.weights, ckpt.optimizer)?;
    }
    if !writer {
        let (rank, world) = group.map(|g| (g.rank(), g.world())).expect("in a group");
        say(format!(
            "rank {rank} of {world}: from epoch {}",
            resumed.unwrap_or(0)
        ));
        return session.run(&mut Silent);
    }
    let dir = RunDir::create(out)?;
    dir.write_config(session.config())?;
    match resumed {
        Some(epoch) => {
            say(format!(
                "resuming {} after epoch {epoch}",
                dir.root.display()
            ));
            dir.truncate_events_after(epoch)?;
        }
        // A fresh start (or a resume before the first checkpoint): the log starts over.
        None => dir.clear_events()?,
    }
    session.run(&mut RunFolder { dir, bar: None })
}

/// One process per rank, each on one device and an equal slice of every batch.
fn check_split(config: &RunConfig, world: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.devices.is_empty(),
        "--devices splits one process over several devices; under mpirun each rank trains on \
         one (--device)"
    );
    anyhow::ensure!(
        config.batch_size.is_multiple_of(world) && config.batch_size / world >= 2,
        "--batch-size {} does not split into {world} equal slices of at least 2 images (one per \
         MPI rank)",
        config.batch_size
    );
    Ok(())
}

/// A line on stderr in one write: `eprintln!` writes its pieces one by one (stderr is not
/// buffered), and mpirun, relaying every rank's stream, would splice two ranks' lines.
fn say(mut line: String) {
    line.push('\n');
    eprint!("{line}");
}

/// What a run starts from: its config and, resuming, the checkpoint to continue.
struct Start {
    config: RunConfig,
    checkpoint: Option<Checkpoint>,
}

impl Start {
    /// The flags' config for a new run in `out`; resuming, the folder's own and its latest
    /// checkpoint.
    fn read(config: RunConfig, out: &Path, resume: bool) -> anyhow::Result<Self> {
        if !out.join("config.toml").is_file() {
            return Ok(Self {
                config,
                checkpoint: None,
            });
        }
        anyhow::ensure!(
            resume,
            "{} already holds a run; pass --resume to continue it or pick another --out",
            out.display()
        );
        let dir = RunDir::open(out)?;
        Ok(Self {
            config: dir.read_config()?,
            checkpoint: dir.latest_checkpoint()?,
        })
    }

    /// Rank 0's start on every rank: the run folder need only be on rank 0's disk.
    fn share(self, group: &Collective) -> anyhow::Result<Self> {
        let epoch = self.checkpoint.as_ref().map(|ckpt| ckpt.epoch);
        let header = group.broadcast_bytes(serde_json::to_vec(&(&self.config, epoch))?)?;
        let (config, epoch): (RunConfig, Option<usize>) = serde_json::from_slice(&header)
            .map_err(|e| anyhow::anyhow!("rank 0's config is unreadable here: {e}"))?;
        let state = self.checkpoint.map(|ckpt| (ckpt.weights, ckpt.optimizer));
        let (weights, optimizer) = state.unwrap_or_default();
        let (weights, optimizer) = (
            group.broadcast_bytes(weights)?,
            group.broadcast_bytes(optimizer)?,
        );
        Ok(Self {
            config,
            checkpoint: epoch.map(|epoch| Checkpoint {
                epoch,
                weights,
                optimizer,
            }),
        })
    }
}

/// Ranks above 0 write nothing: rank 0's run folder is the run's record.
struct Silent;

impl Sink for Silent {
    fn record(&mut self, _: &Event, _: &Trainer) -> anyhow::Result<()> {
        Ok(())
    }
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
            trainer.epoch() + 1,
            trainer.config().epochs
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}
