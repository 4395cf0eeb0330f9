//! Weights in and out: Burn records as bytes (checkpoints, moving a model between devices) and
//! safetensors with torchvision's ResNet names for everyone else.

use crate::model::{BasicBlock, Encoder, ModelName};
use burn::module::{Module, Param};
use burn::nn::BatchNorm;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::Backend, Tensor};
use std::io::Write;
use std::path::Path;

pub type BytesRecorder = BinBytesRecorder<FullPrecisionSettings>;

/// Serializes a module's record (weights and running statistics) in full precision.
pub fn module_to_bytes<B: Backend, M: Module<B>>(module: M) -> anyhow::Result<Vec<u8>> {
    Ok(BytesRecorder::default().record(module.into_record(), ())?)
}

/// Loads bytes from [`module_to_bytes`] into a module of the same architecture, on any backend.
pub fn module_from_bytes<B: Backend, M: Module<B>>(
    module: M,
    bytes: Vec<u8>,
    device: &B::Device,
) -> anyhow::Result<M> {
    let record = BytesRecorder::default()
        .load(bytes, device)
        .map_err(|e| anyhow::anyhow!("checkpoint does not fit this model: {e}"))?;
    Ok(module.load_record(record))
}

/// A freshly initialized encoder, identical on every device for a given seed: it is drawn on the
/// CPU backend and copied over, since each backend's random generator differs.
pub fn init_encoder<B: Backend>(
    name: ModelName,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<Encoder<B>> {
    use crate::backend::CpuBackend;
    let cpu = Default::default();
    CpuBackend::seed(&cpu, seed);
    let reference = Encoder::<CpuBackend>::new(name, &cpu);
    module_from_bytes(
        Encoder::new(name, device),
        module_to_bytes(reference)?,
        device,
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| {
        anyhow::anyhow!("cannot rename {} to {}: {e}", tmp.display(), path.display())
    })?;
    Ok(())
}

/// A named f32 tensor in PyTorch layout.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A named tensor still on its device, flattened, waiting to be read back.
struct OnDevice<B: Backend> {
    name: String,
    shape: Vec<usize>,
    flat: Tensor<B, 1>,
}

fn tensor<B: Backend, const D: usize>(name: String, t: Tensor<B, D>) -> OnDevice<B> {
    let shape = t.dims().to_vec();
    let flat = t.reshape([shape.iter().product::<usize>()]);
    OnDevice { name, shape, flat }
}

fn param<B: Backend, const D: usize>(name: String, p: &Param<Tensor<B, D>>) -> OnDevice<B> {
    tensor(name, p.val())
}

fn batch_norm<B: Backend>(prefix: &str, bn: &BatchNorm<B>, out: &mut Vec<OnDevice<B>>) {
    out.push(param(format!("{prefix}.weight"), &bn.gamma));
    out.push(param(format!("{prefix}.bias"), &bn.beta));
    out.push(tensor(
        format!("{prefix}.running_mean"),
        bn.running_mean.value(),
    ));
    out.push(tensor(
        format!("{prefix}.running_var"),
        bn.running_var.value(),
    ));
}

fn block<B: Backend>(prefix: &str, b: &BasicBlock<B>, out: &mut Vec<OnDevice<B>>) {
    out.push(param(format!("{prefix}.conv1.weight"), &b.conv1.weight));
    batch_norm(&format!("{prefix}.bn1"), &b.bn1, out);
    out.push(param(format!("{prefix}.conv2.weight"), &b.conv2.weight));
    batch_norm(&format!("{prefix}.bn2"), &b.bn2, out);
    if let Some(d) = &b.downsample {
        out.push(param(
            format!("{prefix}.downsample.0.weight"),
            &d.conv.weight,
        ));
        batch_norm(&format!("{prefix}.downsample.1"), &d.bn, out);
    }
}

/// The encoder's tensors under torchvision's names (`conv1.weight`, `layer1.0.bn1.running_mean`,
/// ...) and the head as `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)` under `head.*`.
/// Linear weights are transposed to PyTorch's [out, in].
pub fn torchvision_tensors<B: Backend>(encoder: &Encoder<B>) -> Vec<NamedTensor> {
    futures_lite::future::block_on(torchvision_tensors_async(encoder)).expect("weights read back")
}

/// [`torchvision_tensors`], awaited (the page reads its GPU this way).
pub async fn torchvision_tensors_async<B: Backend>(
    encoder: &Encoder<B>,
) -> anyhow::Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    for t in on_device(encoder) {
        out.push(NamedTensor {
            data: crate::eval::read_f32(t.flat).await?,
            name: t.name,
            shape: t.shape,
        });
    }
    Ok(out)
}

fn on_device<B: Backend>(encoder: &Encoder<B>) -> Vec<OnDevice<B>> {
    let mut out = Vec::new();
    let r = &encoder.backbone;
    out.push(param("conv1.weight".into(), &r.conv1.weight));
    batch_norm("bn1", &r.bn1, &mut out);
    for (s, stage) in r.layers.iter().enumerate() {
        for (i, b) in stage.iter().enumerate() {
            block(&format!("layer{}.{i}", s + 1), b, &mut out);
        }
    }
    let h = &encoder.head;
    out.push(tensor(
        "head.0.weight".into(),
        h.linear1.weight.val().transpose(),
    ));
    batch_norm("head.1", &h.bn, &mut out);
    out.push(tensor(
        "head.3.weight".into(),
        h.linear2.weight.val().transpose(),
    ));
    if let Some(bias) = &h.linear2.bias {
        out.push(param("head.3.bias".into(), bias));
    }
    out
}

/// Serializes tensors in the safetensors format (8-byte header length, JSON header, raw LE data).
pub fn safetensors_bytes(tensors: &[NamedTensor], model: ModelName) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "model": model.to_string(), "producer": "dcl" }),
    );
    let mut offset = 0;
    for t in tensors {
        let end = offset + 4 * t.data.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header).expect("json");
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json.as_bytes());
    for t in tensors {
        out.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}
