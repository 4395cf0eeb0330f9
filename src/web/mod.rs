//! The page's bindings (wasm32). Every GPU read-back is awaited: a page cannot block on its GPU.
//!
//! Here: what the embeds need (datasets parsed by the core readers, the WGSL inference engine and
//! loss kernel, the float64 host loss), built alone as the small `web-infer` module without Burn.
//! `playground`: the training page's bindings, Burn on WebGPU, in the full `webgpu` build.

use crate::data::{from_named_files, Dataset, Split, IMAGE_LEN};
use crate::gpu::{infer::InferenceEngine, loss::FusedLoss, GpuContext};
use crate::loss::{ContrastiveLoss, LossKind};
use crate::safetensors::parse_safetensors;
use js_sys::Promise;
use serde::Serialize;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

#[cfg(feature = "train")]
mod playground;

// The static constructors (cubecl's `inventory` registrations: thousands of them), run once.
// Unless the module calls them itself, wasm-ld links it as a "command" and wraps every export
// in a call to all of them: each call from JS into the module (wasm-bindgen's externref table,
// every bind group entry of every dispatch) ran them again, 80% of a training step's host time
// in the page (README "The playground").
unsafe extern "C" {
    fn __wasm_call_ctors();
}

#[wasm_bindgen(start)]
pub fn start() {
    // SAFETY: the linker's constructor list, called once before any other export runs.
    unsafe { __wasm_call_ctors() };
    console_error_panic_hook::set_once();
}

fn js_error(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

/// Maps become plain objects (`{"20": 0.78}`), as in `metrics.jsonl`, not ES2015 `Map`s.
fn to_js(value: &impl Serialize) -> Result<JsValue, JsValue> {
    let serializer = serde_wasm_bindgen::Serializer::new().serialize_maps_as_objects(true);
    value.serialize(&serializer).map_err(js_error)
}

/// A dataset parsed in wasm by the core readers.
#[wasm_bindgen]
pub struct WebDataset {
    inner: Dataset,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DatasetSummary {
    name: String,
    format: crate::data::Format,
    classes: usize,
    train_images: usize,
    test_images: usize,
    shape: [usize; 3],
}

#[wasm_bindgen]
impl WebDataset {
    /// Files picked, dropped or fetched: a CIFAR archive, CIFAR batch files, or IDX files.
    #[wasm_bindgen(js_name = fromFiles)]
    pub fn from_files(
        name: &str,
        file_names: Vec<String>,
        contents: Vec<js_sys::Uint8Array>,
    ) -> Result<WebDataset, JsValue> {
        let files = file_names
            .into_iter()
            .zip(contents.iter().map(|c| c.to_vec()))
            .collect();
        let inner = from_named_files(name, files).map_err(js_error)?;
        Ok(Self { inner })
    }

    pub fn summary(&self) -> Result<JsValue, JsValue> {
        let d = &self.inner;
        to_js(&DatasetSummary {
            name: d.name.clone(),
            format: d.format,
            classes: d.classes,
            train_images: d.train.len(),
            test_images: d.test.len(),
            shape: d.source_shape,
        })
    }

    /// The first `count` test images (the training images if there is no test split), stored
    /// 32x32 CHW bytes one after another: a retrieval gallery.
    #[wasm_bindgen(js_name = galleryImages)]
    pub fn gallery_images(&self, count: usize) -> Vec<u8> {
        self.gallery().head(count).images
    }

    /// The labels of [`WebDataset::gallery_images`].
    #[wasm_bindgen(js_name = galleryLabels)]
    pub fn gallery_labels(&self, count: usize) -> Vec<u16> {
        self.gallery().head(count).labels
    }

    fn gallery(&self) -> &Split {
        let d = &self.inner;
        if d.test.is_empty() {
            &d.train
        } else {
            &d.test
        }
    }
}

/// A loss of `kind` on two [n, d] embeddings given as flat arrays, checked before any GPU work.
fn loss_and_shape(
    z1: &[f32],
    z2: &[f32],
    n: usize,
    d: usize,
    kind: &str,
    temperature: f64,
    sigma: f64,
) -> Result<ContrastiveLoss, JsValue> {
    let kind: LossKind = kind.parse().map_err(js_error)?;
    if z1.len() != n * d || z2.len() != n * d {
        return Err(js_error(format!(
            "z1 has {} and z2 {} numbers, expected n*d = {}",
            z1.len(),
            z2.len(),
            n * d
        )));
    }
    ContrastiveLoss::new(kind, temperature, sigma).map_err(js_error)
}

thread_local! {
    /// The WGSL loss kernel's device and pipelines, made on first use and kept.
    static FUSED: RefCell<Option<Rc<(GpuContext, FusedLoss)>>> = const { RefCell::new(None) };
}

/// The fused WGSL kernel (`shaders/dcl_loss.wgsl`) on the page's WebGPU, without Burn:
/// `{loss, gradZ1, gradZ2}`, the same numbers the native kernel and `dcl loss` give.
#[wasm_bindgen(js_name = fusedLoss)]
pub async fn fused_loss(
    z1: Vec<f32>,
    z2: Vec<f32>,
    n: usize,
    d: usize,
    kind: &str,
    temperature: f64,
    sigma: f64,
) -> Result<JsValue, JsValue> {
    let loss = loss_and_shape(&z1, &z2, n, d, kind, temperature, sigma)?;
    let kernel = match FUSED.with(|k| k.borrow().clone()) {
        Some(k) => k,
        None => {
            let gpu = GpuContext::new().await.map_err(js_error)?;
            let fused = FusedLoss::new(&gpu);
            let kernel = Rc::new((gpu, fused));
            FUSED.with(|k| *k.borrow_mut() = Some(kernel.clone()));
            kernel
        }
    };
    let out = kernel
        .1
        .compute(&kernel.0, &loss, &z1, &z2, n, d)
        .await
        .map_err(js_error)?;
    to_js(&out)
}

/// The same `{loss, gradZ1, gradZ2}` as [`fused_loss`], in float64 on the CPU: the loss
/// explorer's path on pages without WebGPU.
#[wasm_bindgen(js_name = hostLoss)]
pub fn host_loss(
    z1: Vec<f32>,
    z2: Vec<f32>,
    n: usize,
    d: usize,
    kind: &str,
    temperature: f64,
    sigma: f64,
) -> Result<JsValue, JsValue> {
    let loss = loss_and_shape(&z1, &z2, n, d, kind, temperature, sigma)?;
    let wide = |z: Vec<f32>| -> Vec<f64> { z.into_iter().map(f64::from).collect() };
    to_js(&loss.on_host(&wide(z1), &wide(z2), n, d).map_err(js_error)?)
}

/// The WGSL inference engine (`shaders/resnet_infer.wgsl`) on the page's WebGPU, without Burn:
/// what the tutorial embeds run a trained encoder with.
#[wasm_bindgen]
pub struct WebEncoder {
    inner: Rc<(GpuContext, InferenceEngine)>,
}

#[wasm_bindgen]
impl WebEncoder {
    /// Loads a `model.safetensors` (torchvision names); a bad file is an error naming it.
    #[wasm_bindgen(js_name = fromSafetensors)]
    pub async fn from_safetensors(file: String, bytes: Vec<u8>) -> Result<WebEncoder, JsValue> {
        let (tensors, _) = parse_safetensors(&file, &bytes).map_err(js_error)?;
        let gpu = GpuContext::new().await.map_err(js_error)?;
        let engine =
            InferenceEngine::new(&gpu, &tensors).map_err(|e| js_error(format!("{file}: {e}")))?;
        Ok(Self {
            inner: Rc::new((gpu, engine)),
        })
    }

    #[wasm_bindgen(getter, js_name = featureDim)]
    pub fn feature_dim(&self) -> usize {
        self.inner.1.feature_dim()
    }

    /// `{features, projections}` (flat, row-major) of normalized images [batch, 3, height,
    /// width]; rows scaled to unit length when `normalized`.
    pub fn embed(
        &self,
        images: Vec<f32>,
        batch: usize,
        height: usize,
        width: usize,
        normalized: bool,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let (gpu, engine) = &*inner;
            let out = engine
                .forward(gpu, &images, [batch, height, width], normalized)
                .await;
            to_js(&out.map_err(js_error)?)
        })
    }
}

/// Stored 32x32 CHW image bytes (as `WebDataset` holds them) to the normalized input encoders take.
#[wasm_bindgen(js_name = normalizeImages)]
pub fn normalize_images(pixels: Vec<u8>) -> Result<Vec<f32>, JsValue> {
    if !pixels.len().is_multiple_of(IMAGE_LEN) {
        return Err(js_error(format!(
            "{} bytes are not whole 3x32x32 images",
            pixels.len()
        )));
    }
    let images: Vec<&[u8]> = pixels.chunks_exact(IMAGE_LEN).collect();
    Ok(crate::augment::plain_batch(&images))
}

/// The `k` gallery rows (unit vectors of width `dim`) most cosine-similar to `query`, best first,
/// row `skip` left out (-1: none): `[[index, cosine], ...]`. The same ranking as `dcl neighbors`.
#[wasm_bindgen]
pub fn nearest(
    gallery: Vec<f32>,
    dim: usize,
    query: Vec<f32>,
    k: usize,
    skip: i32,
) -> Result<JsValue, JsValue> {
    if dim == 0 || query.len() != dim || !gallery.len().is_multiple_of(dim) {
        return Err(js_error(format!(
            "nearest: a query of {} numbers and a gallery of {} do not fit width {dim}",
            query.len(),
            gallery.len()
        )));
    }
    let skip = usize::try_from(skip).ok();
    to_js(&crate::neighbors::nearest(&gallery, dim, &query, k, skip))
}
