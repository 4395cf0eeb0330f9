//! A trained encoder as a search engine: `dcl embed` and `dcl neighbors`, on the WGSL inference
//! engine (no Burn at run time), fed a `model.safetensors` and a dataset or an image array.

use crate::augment::plain_batch;
use crate::data::{discover, npy, Dataset, Split, SIDE};
use crate::gpu::infer::{Embeddings, InferenceEngine};
use crate::gpu::GpuContext;
use crate::safetensors::parse_safetensors;
use std::path::Path;

/// Which split of a dataset to embed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitName {
    Train,
    Test,
}

/// Normalized images [count, 3, height, width], row-major, ready for the engine.
pub struct Images {
    pub data: Vec<f32>,
    pub count: usize,
    pub height: usize,
    pub width: usize,
}

/// Reads `model.safetensors` (torchvision names) into the engine.
pub fn load_engine(gpu: &GpuContext, path: &Path) -> anyhow::Result<InferenceEngine> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read: {e}"))?;
    let (tensors, _) = parse_safetensors(&shown, &bytes)?;
    InferenceEngine::new(gpu, &tensors).map_err(|e| anyhow::anyhow!("{shown}: {e}"))
}

/// The first `limit` images of a dataset split through the evaluation transform (no
/// augmentation, the training normalization).
pub fn split_images(split: &Split, limit: Option<usize>) -> Images {
    let count = limit.map_or(split.len(), |l| l.min(split.len()));
    let images: Vec<&[u8]> = (0..count).map(|i| split.image(i)).collect();
    Images {
        data: plain_batch(&images),
        count,
        height: SIDE,
        width: SIDE,
    }
}

/// A float32/float64 `.npy` of shape [B, 3, H, W], used as is (already normalized).
pub fn npy_images(path: &Path) -> anyhow::Result<Images> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read: {e}"))?;
    let array = npy::parse(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let [count, 3, height, width] = array.shape[..] else {
        anyhow::bail!(
            "{shown}: expected images of shape [B, 3, H, W], found {:?}",
            array.shape
        );
    };
    if let Some(i) = array.data.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{shown}: non-finite value {} at flat index {i}",
            array.data[i]
        );
    }
    Ok(Images {
        data: array.data.iter().map(|&v| v as f32).collect(),
        count,
        height,
        width,
    })
}

/// `--data` as `dcl embed` takes it: a `.npy` image array, else a dataset path or name.
pub fn load_images(
    data: &str,
    split: SplitName,
    limit: Option<usize>,
) -> anyhow::Result<(Images, Option<Dataset>)> {
    if data.ends_with(".npy") {
        return Ok((npy_images(Path::new(data))?, None));
    }
    let dataset = discover::load(data)?;
    let images = split_images(pick(&dataset, split), limit);
    anyhow::ensure!(
        images.count > 0,
        "{data}: the {split:?} split has no images"
    );
    Ok((images, Some(dataset)))
}

pub fn pick(dataset: &Dataset, split: SplitName) -> &Split {
    match split {
        SplitName::Train => &dataset.train,
        SplitName::Test => &dataset.test,
    }
}

/// Runs the engine natively; rows L2-normalized when asked.
pub fn embed(
    gpu: &GpuContext,
    engine: &InferenceEngine,
    images: &Images,
    normalized: bool,
) -> anyhow::Result<Embeddings> {
    let Images {
        data,
        count,
        height,
        width,
    } = images;
    futures_lite::future::block_on(engine.forward(gpu, data, [*count, *height, *width], normalized))
}

/// The `k` rows most cosine-similar to row `query` (itself excluded), best first, with their
/// similarity. `rows` are unit vectors of width `dim`.
pub fn nearest(rows: &[f32], dim: usize, query: usize, k: usize) -> Vec<(usize, f32)> {
    let q = &rows[query * dim..(query + 1) * dim];
    let mut scored: Vec<(usize, f32)> = rows
        .chunks_exact(dim)
        .enumerate()
        .filter(|&(i, _)| i != query)
        .map(|(i, r)| (i, r.iter().zip(q).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_ranks_by_cosine_and_skips_the_query() {
        let rows = [1.0, 0.0, 0.6, 0.8, 0.0, 1.0, 0.8, 0.6];
        let got = nearest(&rows, 2, 0, 2);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 1]);
        assert!((got[0].1 - 0.8).abs() < 1e-6);
    }
}
