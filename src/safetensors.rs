//! The safetensors format (8-byte header length, JSON header, raw little-endian data) for
//! encoders in torchvision's names and layouts: read by the WGSL engine and PyTorch alike, so it
//! needs no Burn.

use crate::arch::ModelName;

/// A named f32 tensor in PyTorch layout.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
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

/// The tensors of a safetensors file (F32 only, as `dcl` and PyTorch's `save_file` write them),
/// and the model preset its metadata names, if any.
pub fn parse_safetensors(
    file: &str,
    bytes: &[u8],
) -> anyhow::Result<(Vec<NamedTensor>, Option<ModelName>)> {
    let bad = |what: String| anyhow::anyhow!("{file}: not a usable safetensors file: {what}");
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
    let body_start = 8usize
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| bad(format!("header of {header_len} bytes runs past the end")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..body_start]).map_err(|e| bad(format!("header: {e}")))?;
    let body = &bytes[body_start..];
    let mut model = None;
    let mut tensors = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            model = info["model"].as_str().and_then(|m| m.parse().ok());
            continue;
        }
        anyhow::ensure!(
            info["dtype"] == "F32",
            "{file}: tensor {name} is {}, only F32 is read",
            info["dtype"]
        );
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .map_err(|e| bad(format!("{name}: shape: {e}")))?;
        let [start, end]: [usize; 2] = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|e| bad(format!("{name}: data_offsets: {e}")))?;
        let numel: usize = shape.iter().product();
        anyhow::ensure!(
            start <= end && end <= body.len() && end - start == 4 * numel,
            "{file}: tensor {name}: offsets {start}..{end} do not hold {numel} f32 values in a \
             {}-byte body (truncated file?)",
            body.len()
        );
        let data = body[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(NamedTensor { name, shape, data });
    }
    Ok((tensors, model))
}
