//! `dcl pretrain`: a run folder written by a [`Session`] through [`RunFolder`], resumable from
//! its latest checkpoint.

use crate::backend::DeviceKind;
use crate::data::discover;
use crate::loss::{LossKernel, LossKind};
use crate::model::ModelName;
use crate::optim::OptimizerKind;
use crate::run::{Checkpoint, RunDir};
use crate::safetensors::safetensors_bytes;
use crate::train::{Event, RunConfig, Session, Sink, Trainer};
use crate::weights::{torchvision_tensors, write_atomic};
use burn::module::AutodiffModule;
use clap::Args;
use std::path::PathBuf;

/// The flags default to [`RunConfig::default`].
#[derive(Args, Clone)]
pub struct PretrainArgs {
    /// A dataset path, or a name: cifar10, cifar100, mnist, fashion-mnist.
    #[arg(long, default_value_t = RunConfig::default().data)]
    data: String,
    #[arg(long, default_value_t = RunConfig::default().model)]
    model: ModelName,
    #[arg(long, default_value_t = RunConfig::default().loss)]
    loss: LossKind,
    #[arg(long, default_value_t = RunConfig::default().batch_size)]
    batch_size: usize,
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
    device: DeviceKind,
    #[arg(long, default_value_t = RunConfig::default().seed)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Train on the first N training images only.
    #[arg(long)]
    limit: Option<usize>,
    /// The kNN monitor's queries: the first N test images only.
    #[arg(long)]
    eval_images: Option<usize>,
    /// The random resized crop's smallest area fraction (SimCLR's 0.08; 0.2 suits short runs).
    #[arg(long, default_value_t = RunConfig::default().crop_min_scale)]
    crop_min_scale: f32,
    /// fused (the WGSL kernel; the default with --device wgpu) or reference (Burn's ops).
    #[arg(long)]
    loss_kernel: Option<LossKernel>,
    /// Continue the run in --out from its latest checkpoint (its config.toml wins over flags).
    #[arg(long)]
    resume: bool,
}

impl PretrainArgs {
    fn config(self) -> RunConfig {
        RunConfig {
            data: self.data,
            model: self.model,
            loss: self.loss,
            temperature: self.temperature,
            sigma: self.sigma,
            batch_size: self.batch_size,
            epochs: self.epochs,
            lr: self.lr,
            optimizer: self.optimizer,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            warmup_epochs: self.warmup_epochs,
            seed: self.seed,
            device: self.device,
            limit: self.limit,
            eval_images: self.eval_images,
            crop_min_scale: self.crop_min_scale,
            loss_kernel: self
                .loss_kernel
                .unwrap_or(RunConfig::default_loss_kernel(self.device)),
        }
    }
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let dir = RunDir::create(&args.out)?;
    let resume = args.resume;
    let config = if resume && args.out.join("config.toml").is_file() {
        dir.read_config()?
    } else {
        anyhow::ensure!(
            !args.out.join("config.toml").is_file(),
            "{} already holds a run; pass --resume to continue it or pick another --out",
            args.out.display()
        );
        args.config()
    };
    // Validate before writing anything.
    config.validate()?;
    let dataset = discover::load(&config.data)?;
    dir.write_config(&config)?;
    let device = crate::backend::device(config.device)?;
    let mut session = Session::new(config, &dataset, device)?;
    match dir.latest_checkpoint()?.filter(|_| resume) {
        Some(ckpt) => {
            eprintln!("resuming {} after epoch {}", dir.root.display(), ckpt.epoch);
            dir.truncate_events_after(ckpt.epoch)?;
            session.restore(ckpt.epoch, ckpt.weights, ckpt.optimizer)?;
        }
        // A fresh start (or a resume before the first checkpoint): the log starts over.
        None => dir.clear_events()?,
    }
    session.run(&mut RunFolder { dir, bar: None })
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
            Event::Evaluation {
                epoch, knn_top1, ..
            } => {
                let when = if *epoch == 0 {
                    " (before training)"
                } else {
                    ""
                };
                eprintln!("epoch {epoch}{when}: kNN top-1 {knn_top1:.4}");
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
