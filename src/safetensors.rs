//! The safetensors format (8-byte header length, JSON header, raw little-endian data) for
//! encoders in torchvision's names and layouts: read by the WGSL engine and PyTorch alike, so it
//! needs no Burn.
//!
//! Reading goes through the `safetensors` crate. Writing stays here: the crate keeps the
//! metadata in a `HashMap`, whose order (and so the file's bytes) changes from one save to the
//! next, and a save must repeat byte for byte (the page's save-load-save test, checkpoints).

use crate::arch::ModelName;
pub use crate::arch::NamedTensor;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

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

/// The tensors of a safetensors file (F32 only, as `dcl` and PyTorch's `save_file` write them),
/// and the model preset its metadata names, if any. The `safetensors` crate validates the file
/// (header bounds, offsets, sizes): it comes from anywhere, the page included.
pub fn parse_safetensors(
    file: &str,
    bytes: &[u8],
) -> anyhow::Result<(Vec<NamedTensor>, Option<ModelName>)> {
    let bad = |e: SafeTensorError| {
        anyhow::anyhow!("{file}: not a usable safetensors file (truncated or damaged?): {e}")
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let model = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("model")?.parse().ok());
    let mut tensors = Vec::new();
    for (name, view) in SafeTensors::deserialize(bytes).map_err(bad)?.tensors() {
        anyhow::ensure!(
            view.dtype() == Dtype::F32,
            "{file}: tensor {name:?} is {}, only F32 is read",
            view.dtype()
        );
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let shape = view.shape().to_vec();
        tensors.push(NamedTensor { name, shape, data });
    }
    Ok((tensors, model))
}
