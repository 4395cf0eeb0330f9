//! Training into a run folder: a [`Session`] whose events go to `metrics.jsonl`, a checkpoint
//! and `model.safetensors` at each epoch's end; resumable from its latest checkpoint. What
//! `dcl pretrain` and the experiments (`dcl experiment`) call.

use super::{Checkpoint, RunDir};
use crate::collective::Collective;
use crate::data::discover;
use crate::files::write_atomic;
use crate::safetensors::safetensors_bytes;
use crate::train::{Event, RunConfig, Session, Sink, Trainer};
use crate::weights::torchvision_tensors;
use burn::module::AutodiffModule;
use std::path::Path;

/// Trains `config` into the run folder `out`; with `resume`, continues the run already there
/// from its latest checkpoint (its `config.toml` wins over `config`), and a finished run is
/// left as it is. In a `group` (an MPI job's ranks) every rank calls this with the same config;
/// rank 0 alone reads and writes the run folder, and the others start from what it read.
pub fn train(
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
