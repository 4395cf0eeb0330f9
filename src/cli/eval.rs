//! `dcl eval`: a run's latest checkpoint under the evaluation protocol (kNN at two k and a linear
//! probe, the whole training split as the bank), beside the same protocol on the untrained
//! encoder of the run's seed and on raw pixels, so each number stands next to its baselines.

use crate::backend::DeviceKind;
use crate::data::{discover, Split};
use crate::eval::{features, knn_monitor, pixel_features, Protocol, Scores};
use crate::model::{Encoder, ResNet};
use crate::run::RunDir;
use crate::weights::{init_encoder, module_from_bytes};
use burn::module::AutodiffModule;
use burn::tensor::Device;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    run: PathBuf,
    /// The kNN neighbourhoods reported.
    #[arg(long, value_delimiter = ',', default_value = "20,200")]
    knn_k: Vec<usize>,
    /// The bank (and the probe's training set): the first N training images; all by default.
    #[arg(long)]
    bank: Option<usize>,
    /// Skip the linear probes (kNN only).
    #[arg(long)]
    no_linear: bool,
    #[arg(long)]
    device: Option<DeviceKind>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.knn_k.is_empty() && args.knn_k.iter().all(|&k| k >= 1),
        "--knn-k needs one or more k >= 1"
    );
    anyhow::ensure!(args.bank != Some(0), "--bank must be at least 1");
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
    let trained = module_from_bytes(Encoder::new(config.model, &device), ckpt.weights)?;
    let untrained = init_encoder(config.model, config.seed, &device)?;
    // The monitor's number, as metrics.jsonl logged it (bank: the run's own training images).
    let run_train = ds.train.head(config.limit.unwrap_or(usize::MAX));
    let (monitor, _) = knn_monitor(
        &trained.valid().backbone,
        &run_train,
        &ds.test,
        ds.classes,
        &device,
    );
    let bank = ds.train.head(args.bank.unwrap_or(usize::MAX));
    let protocol = Protocol {
        ks: args.knn_k,
        linear: !args.no_linear,
    };
    let score = |f: &dyn Fn(&Split) -> anyhow::Result<Vec<f32>>| -> anyhow::Result<Scores> {
        let (b, q) = (f(&bank)?, f(&ds.test)?);
        let dim = b.len() / bank.len();
        protocol.score(
            (&b, &bank.labels),
            (&q, &ds.test.labels),
            dim,
            ds.classes,
            &device,
        )
    };
    let on = &device;
    let encoder = |backbone: ResNet| move |split: &Split| backbone_features(&backbone, split, on);
    let report = serde_json::json!({
        "epoch": ckpt.epoch,
        "knn_top1": monitor,
        "bank_images": bank.len(),
        "test_images": ds.test.len(),
        "encoder": score(&encoder(trained.valid().backbone))?,
        "untrained": score(&encoder(untrained.valid().backbone))?,
        "pixels": score(&|split: &Split| Ok(pixel_features(split)))?,
    });
    println!("{report}");
    Ok(())
}

fn backbone_features(
    backbone: &ResNet,
    split: &Split,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    futures_lite::future::block_on(features(backbone, split, device))
}
