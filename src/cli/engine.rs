//! `dcl embed` and `dcl neighbors`: the WGSL inference engine on this machine's adapter.

use super::retrieval::{self, Images};
use crate::augment::preview;
use crate::data::{npy, Dataset};
use crate::files::write_atomic;
use crate::gpu::{infer::InferenceEngine, GpuContext};
use clap::Args;
use std::path::PathBuf;

/// What `dcl embed` and `dcl neighbors` read.
#[derive(Args)]
struct EngineInput {
    /// A `model.safetensors` written by `dcl pretrain` (torchvision names).
    #[arg(long)]
    model: PathBuf,
    /// A dataset path or name, or (embed only) a float32 `.npy` of shape [B, 3, H, W] used as is.
    #[arg(long)]
    data: String,
    #[arg(long, value_enum, default_value = "test")]
    split: retrieval::SplitName,
    /// The first N images of the split only.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    input: EngineInput,
    #[arg(long)]
    out: PathBuf,
    /// The projection head's 128-d output instead of the backbone features.
    #[arg(long)]
    projected: bool,
    /// Scale every row to unit L2 norm (what cosine kNN uses).
    #[arg(long)]
    normalize: bool,
}

#[derive(Args)]
pub struct NeighborsArgs {
    #[command(flatten)]
    input: EngineInput,
    /// Index of the query image in the split.
    #[arg(long)]
    query: usize,
    #[arg(short, long, default_value_t = 8)]
    k: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    scale: usize,
}

/// The engine on this machine's adapter, and the images `--data` names.
fn open_engine(
    input: &EngineInput,
) -> anyhow::Result<(GpuContext, InferenceEngine, Images, Option<Dataset>)> {
    let gpu = GpuContext::blocking()?;
    let engine = retrieval::load_engine(&gpu, &input.model)?;
    let (images, dataset) = retrieval::load_images(&input.data, input.split, input.limit)?;
    Ok((gpu, engine, images, dataset))
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    use retrieval::embed;
    let (gpu, engine, images, _) = open_engine(&args.input)?;
    let out = embed(&gpu, &engine, &images, args.normalize)?;
    let (rows, dim) = if args.projected {
        (out.projections, crate::model::PROJECTION_DIM)
    } else {
        (out.features, engine.feature_dim())
    };
    write_atomic(&args.out, &npy::to_bytes(&[images.count, dim], &rows))?;
    eprintln!(
        "{} embeddings of width {dim} -> {}",
        images.count,
        args.out.display()
    );
    Ok(())
}

pub fn neighbors(args: NeighborsArgs) -> anyhow::Result<()> {
    use retrieval::{embed, pick};
    let (gpu, engine, images, dataset) = open_engine(&args.input)?;
    let (data, split) = (&args.input.data, args.input.split);
    let dataset = dataset.ok_or_else(|| {
        anyhow::anyhow!("{data}: neighbors draws dataset images; pass a dataset, not a .npy")
    })?;
    anyhow::ensure!(
        args.query < images.count,
        "--query {} is past the {} images searched",
        args.query,
        images.count
    );
    let features = embed(&gpu, &engine, &images, true)?.features;
    let found =
        crate::neighbors::nearest_to_row(&features, engine.feature_dim(), args.query, args.k);
    let labels = &pick(&dataset, split).labels;
    let mut row = vec![args.query];
    row.extend(found.iter().map(|f| f.0));
    let report: Vec<serde_json::Value> = found
        .iter()
        .map(|&(i, sim)| serde_json::json!({"index": i, "label": labels[i], "cosine": sim}))
        .collect();
    write_atomic(
        &args.out,
        &preview::row_png(
            pick(&dataset, split),
            dataset.source_shape,
            &row,
            args.scale,
        )?,
    )?;
    println!(
        "{}",
        serde_json::json!({"query": args.query, "label": labels[args.query], "neighbors": report})
    );
    Ok(())
}
