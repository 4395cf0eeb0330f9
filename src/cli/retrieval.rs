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
