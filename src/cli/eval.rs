//! `dcl eval`: the kNN monitor (and a linear probe) on a run's latest checkpoint.

use crate::backend::DeviceKind;
use crate::data::discover;
use crate::eval::{knn_monitor, linear_probe};
use crate::model::Encoder;
use crate::run::RunDir;
use crate::weights::module_from_bytes;
use burn::module::AutodiffModule;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    run: PathBuf,
    /// Also fit a linear probe on frozen features.
    #[arg(long)]
    linear: bool,
    #[arg(long)]
    device: Option<DeviceKind>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let dir = RunDir::open(&args.run)?;
    let config = dir.read_config()?;
    let device = crate::backend::device(args.device.unwrap_or(config.device))?;
    let ckpt = dir
        .latest_checkpoint()?
        .ok_or_else(|| anyhow::anyhow!("{}: no checkpoint yet", args.run.display()))?;
    let ds = discover::load(&config.data)?;
    anyhow::ensure!(
        !ds.test.is_empty(),
        "{}: no test split to evaluate on",
        config.data
    );
    let train = ds.train.head(config.limit.unwrap_or(usize::MAX));
    let encoder = module_from_bytes(Encoder::new(config.model, &device), ckpt.weights)?;
    let backbone = encoder.valid().backbone;
    let (knn, (bank, queries)) = knn_monitor(&backbone, &train, &ds.test, ds.classes, &device);
    let dim = config.model.arch().feature_dim();
    let mut report = serde_json::json!({ "epoch": ckpt.epoch, "knn_top1": knn, "train_images": train.len(), "test_images": ds.test.len() });
    if args.linear {
        let top1 = linear_probe(
            (&bank, &train.labels),
            (&queries, &ds.test.labels),
            dim,
            ds.classes,
            &device,
        );
        report["linear_top1"] = top1.into();
    }
    println!("{report}");
    Ok(())
}
