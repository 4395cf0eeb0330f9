//! `dcl eval`: a run's latest checkpoint under the evaluation protocol (kNN at two k and a linear
//! probe, the whole training split as the bank), beside the same protocol on the untrained
//! encoder of the run's seed and on raw pixels, so each number stands next to its baselines.

use crate::backend::DeviceKind;
use crate::data::discover;
use crate::eval::{knn_monitor, Judge, Protocol};
use crate::model::Encoder;
use crate::run::RunDir;
use crate::weights::{init_encoder, module_from_bytes};
use burn::module::AutodiffModule;
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
    let dir = RunDir::open(&args.run)?;
    let config = dir.read_config()?;
    let device = crate::backend::device(args.device.unwrap_or(config.device))?;
    let ckpt = dir
        .latest_checkpoint()?
        .ok_or_else(|| anyhow::anyhow!("{}: no checkpoint yet", args.run.display()))?;
    let ds = discover::load(&config.data)?;
    let protocol = Protocol {
        ks: args.knn_k,
        linear: !args.no_linear,
    };
    let judge = Judge::new(&ds, args.bank, protocol, device.clone())?;
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
    let report = serde_json::json!({
        "epoch": ckpt.epoch,
        "knn_top1": monitor.monitor_top1(),
        "bank_images": judge.bank_len(),
        "test_images": ds.test.len(),
        "encoder": judge.encoder(&trained)?,
        "untrained": judge.encoder(&untrained)?,
        "pixels": judge.pixels()?,
    });
    println!("{report}");
    Ok(())
}
