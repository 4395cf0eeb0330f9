//! `dcl experiment npc`: InfoNCE's negative-positive coupling (q = 1 - p_pos, see `npc`) over real
//! augmented batches, per batch size and temperature, for the untrained encoder and a trained
//! one: the paper's Figure 2 on this machine's data.

use crate::augment::{view_pairs, ViewConfig};
use crate::cli::chart::{Chart, Point, Series};
use crate::data::{discover, Split, IMAGE_LEN, SIDE};
use crate::files::write_atomic;
use crate::model::{Encoder, ModelName};
use crate::npc::{anchor_logits, summarize, Summary};
use crate::run::RunDir;
use crate::weights::{init_encoder, module_from_bytes};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use rand::seq::SliceRandom;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct NpcArgs {
    #[arg(long)]
    data: String,
    /// A run folder: its latest checkpoint is the trained encoder (its model and seed are used).
    #[arg(long)]
    run: Option<PathBuf>,
    #[arg(long, default_value = "resnet-mini")]
    model: ModelName,
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256,512,1024")]
    batch_sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5")]
    temperatures: Vec<f64>,
    /// Anchors measured per batch size (whole batches; each image gives two anchors).
    #[arg(long, default_value_t = 2048)]
    anchors: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(serde::Serialize)]
struct Row {
    encoder: &'static str,
    batch_size: usize,
    temperature: f64,
    anchors: usize,
    q: Summary,
}

pub fn run(args: NpcArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch_sizes.iter().all(|&b| b >= 2),
        "--batch-sizes must be 2 or more each"
    );
    anyhow::ensure!(
        args.temperatures.iter().all(|&t| t.is_finite() && t > 0.0),
        "--temperatures must be > 0"
    );
    let device = crate::backend::device(crate::backend::DeviceKind::Cpu)?;
    let dataset = discover::load(&args.data)?;
    let largest = *args.batch_sizes.iter().max().unwrap_or(&2);
    anyhow::ensure!(
        dataset.train.len() >= largest,
        "{}: {} training images are fewer than a batch of {largest}",
        args.data,
        dataset.train.len()
    );
    let (model, seed) = match &args.run {
        Some(run) => {
            let config = RunDir::open(run)?.read_config()?;
            (config.model, config.seed)
        }
        None => (args.model, args.seed),
    };
    let mut encoders = vec![("untrained", init_encoder(model, seed, &device)?)];
    if let Some(run) = &args.run {
        let ckpt = RunDir::open(run)?
            .latest_checkpoint()?
            .ok_or_else(|| anyhow::anyhow!("{}: no checkpoint yet", run.display()))?;
        let trained = module_from_bytes(Encoder::new(model, &device), ckpt.weights)?;
        encoders.push(("trained", trained));
    }
    let mut rows = Vec::new();
    for (name, encoder) in &encoders {
        for &batch in &args.batch_sizes {
            let batches = args.anchors.div_ceil(2 * batch).max(1);
            let mut q = vec![Vec::new(); args.temperatures.len()];
            for (i, images) in batch_images(&dataset.train, batch, batches, args.seed)
                .iter()
                .enumerate()
            {
                let (z1, z2) = embed_views(encoder, images, args.seed, i as u64, &device)?;
                for (qs, &t) in q.iter_mut().zip(&args.temperatures) {
                    let logits = anchor_logits(&z1, &z2, batch, z1.len() / batch, t);
                    qs.extend(logits.iter().map(|a| a.npc_multiplier()));
                }
            }
            for (qs, &temperature) in q.iter().zip(&args.temperatures) {
                let row = Row {
                    encoder: name,
                    batch_size: batch,
                    temperature,
                    anchors: qs.len(),
                    q: summarize(qs),
                };
                eprintln!(
                    "{name} batch {batch} t {temperature}: mean q {:.4}",
                    row.q.mean
                );
                rows.push(row);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    write_atomic(
        &args.out.join("npc.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    write_atomic(&args.out.join("npc.md"), markdown(&rows, &args).as_bytes())?;
    write_atomic(&args.out.join("npc.svg"), svg(&rows).as_bytes())?;
    eprintln!("wrote {}/npc.md, npc.json, npc.svg", args.out.display());
    Ok(())
}

/// `count` batches of `batch` training images, in a seeded shuffle of the split.
fn batch_images(train: &Split, batch: usize, count: usize, seed: u64) -> Vec<Vec<&[u8]>> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut crate::augment::sample_rng(seed ^ 0x4e9c, 0));
    order
        .chunks_exact(batch)
        .take(count)
        .map(|idx| idx.iter().map(|&i| train.image(i)).collect())
        .collect()
}

/// The projections of a batch's two views, as the loss sees them in training (batch norm on
/// the batch's statistics).
fn embed_views(
    encoder: &Encoder,
    images: &[&[u8]],
    seed: u64,
    stream: u64,
    device: &Device,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let n = images.len();
    let (v1, v2) = view_pairs(images, &ViewConfig::default(), seed, stream * n as u64);
    let tensor = |v: Vec<f32>| {
        debug_assert_eq!(v.len(), n * IMAGE_LEN);
        Tensor::<4>::from_data(TensorData::new(v, [n, 3, SIDE, SIDE]), device)
    };
    let [z1, z2] = encoder.forward_views([tensor(v1), tensor(v2)]);
    let read = |z: &Tensor<2>| {
        futures_lite::future::block_on(crate::backend::read_f32(z.clone().detach()))
    };
    let rows = (read(&z1)?, read(&z2)?);
    // Batch norm takes the batch's statistics only on the autodiff device, as in training, and
    // there a forward pass's graph lives until a backward pass consumes it: without this, memory
    // grew with every batch (24 GB, and killed, by batch 128 here).
    let _ = (z1.sum() + z2.sum()).backward();
    Ok(rows)
}

fn markdown(rows: &[Row], args: &NpcArgs) -> String {
    let mut md = String::from(
        "# InfoNCE's NPC multiplier q = 1 - p_pos\n\nThe factor by which InfoNCE scales each \
         positive's pull (DCL: 1). Small q: the coupling weakens learning.\n\n",
    );
    let _ = writeln!(
        md,
        "Data `{}`, {} anchors per batch size, seed {}{}.\n",
        args.data,
        args.anchors,
        args.seed,
        args.run.as_ref().map_or(String::new(), |r| format!(
            ", trained run `{}`",
            r.display()
        ))
    );
    md.push_str("| encoder | batch | temperature | anchors | mean q | median | p10 | p90 |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            r.encoder,
            r.batch_size,
            r.temperature,
            r.anchors,
            r.q.mean,
            r.q.median,
            r.q.p10,
            r.q.p90
        );
    }
    md
}

/// Mean q against batch size per encoder and temperature, bars from p10 to p90.
fn svg(rows: &[Row]) -> String {
    let mut series: Vec<(&str, f64)> = rows.iter().map(|r| (r.encoder, r.temperature)).collect();
    series.sort_by(|a, b| a.0.cmp(b.0).then(a.1.total_cmp(&b.1)));
    series.dedup();
    let series = series
        .into_iter()
        .map(|(encoder, t)| Series {
            label: format!("{encoder}, t = {t}"),
            points: rows
                .iter()
                .filter(|r| r.encoder == encoder && r.temperature == t)
                .map(|r| Point {
                    batch_size: r.batch_size,
                    value: r.q.mean,
                    low: r.q.p10,
                    high: r.q.p90,
                })
                .collect(),
        })
        .collect();
    Chart {
        y_label: "q = 1 - p_pos".into(),
        series,
        levels: vec![],
        y_range: Some((0.0, 1.0)),
    }
    .svg()
}
