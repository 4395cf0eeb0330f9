//! The page's bindings (wasm32): the Web Worker in `www/worker.js` drives a [`Playground`] one
//! step at a time on the browser's WebGPU, with the same readers, trainer, loss and model code as
//! the native CLI. Every GPU read-back is awaited: a page cannot block on its GPU.
//!
//! A run's `RefCell` stays borrowed across those awaits on purpose: the worker sends every call
//! into a run through one promise chain, so no second borrow can start while one is held (and a
//! step must not interleave with a save anyway).
#![allow(clippy::await_holding_refcell_ref)]

use crate::backend::DeviceKind;
use crate::data::preview::{image_rgb, view_rgb};
use crate::data::{from_named_files, Dataset, Split, IMAGE_LEN};
use crate::eval::{knn_monitor_async, pca2, read_f32};
use crate::gpu::{infer::InferenceEngine, loss::FusedLoss, GpuContext};
use crate::loss::{ContrastiveLoss, LossKernel, LossKind};
use crate::model::ModelName;
use crate::optim::OptimizerKind;
use crate::train::{RunConfig, Trainer};
use crate::weights::{
    encoder_from_tensors, parse_safetensors, safetensors_bytes, torchvision_tensors_async,
};
use burn::backend::wgpu::{graphics, init_setup_async, WgpuDevice};
use burn::backend::{Autodiff, WebGpu};
use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use js_sys::Promise;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

type B = Autodiff<WebGpu>;

#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

fn js_error(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn to_js(value: &impl Serialize) -> Result<JsValue, JsValue> {
    serde_wasm_bindgen::to_value(value).map_err(js_error)
}

/// Starts Burn on the browser's WebGPU adapter. The page checks `navigator.gpu` and
/// `requestAdapter()` before calling this, so a missing adapter gets its message there.
#[wasm_bindgen(js_name = initWebGpu)]
pub async fn init_webgpu() {
    init_setup_async::<graphics::WebGpu>(&WgpuDevice::default(), Default::default()).await;
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

/// What the page's controls set; anything left out takes the toy-run default.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct PageConfig {
    model: ModelName,
    loss: LossKind,
    temperature: f64,
    sigma: f64,
    batch_size: usize,
    lr: f64,
    optimizer: OptimizerKind,
    weight_decay: f64,
    momentum: f64,
    warmup_epochs: f64,
    epochs: usize,
    seed: u64,
    /// Training images used (the first ones of the training split).
    subset: usize,
    /// Test images for the kNN monitor, the scatter and the neighbours view.
    eval_images: usize,
    /// The random resized crop's smallest area fraction.
    crop_min_scale: f32,
    /// `fused` (the WGSL kernel on the page's WebGPU) or `reference` (Burn's ops).
    loss_kernel: LossKernel,
}

impl Default for PageConfig {
    fn default() -> Self {
        Self {
            model: ModelName::ResNetMini,
            loss: LossKind::Dcl,
            temperature: 0.1,
            sigma: 0.5,
            batch_size: 32,
            lr: 1e-3,
            optimizer: OptimizerKind::Adam,
            weight_decay: 1e-6,
            momentum: 0.9,
            warmup_epochs: 0.0,
            epochs: 10,
            seed: 1,
            subset: 2000,
            eval_images: 500,
            crop_min_scale: 0.08,
            loss_kernel: LossKernel::Fused,
        }
    }
}

struct Run {
    trainer: Trainer<B>,
    /// The kNN bank: the training subset, without augmentation.
    bank: Split,
    test: Split,
    classes: usize,
    /// Test features from the last evaluation, for the neighbours view.
    test_features: Vec<f32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Evaluation {
    knn_top1: f64,
    /// PCA coordinates of the evaluated test images, x0, y0, x1, y1, ...
    points: Vec<f32>,
    labels: Vec<u16>,
}

/// kNN top-1 and the scatter of the run's current encoder; keeps the test features for
/// [`Playground::neighbors`].
async fn evaluate(run: &mut Run) -> Result<Evaluation, JsValue> {
    let backbone = run.trainer.encoder().valid().backbone;
    let device = run.trainer.device().clone();
    let (knn_top1, (_, queries)) =
        knn_monitor_async(&backbone, &run.bank, &run.test, run.classes, &device)
            .await
            .map_err(js_error)?;
    let dim = queries.len() / run.test.len().max(1);
    let points = pca2(&queries, dim).into_iter().flatten().collect();
    run.test_features = queries;
    Ok(Evaluation {
        knn_top1,
        points,
        labels: run.test.labels.clone(),
    })
}

/// One training run in the page.
#[wasm_bindgen]
pub struct Playground {
    run: Rc<RefCell<Run>>,
}

/// Runs `body` on the run unless a previous call is still in flight (the worker awaits each call;
/// a second caller gets an error, not a panic).
fn with_run<F, Fut>(run: &Rc<RefCell<Run>>, body: F) -> Promise
where
    F: FnOnce(Rc<RefCell<Run>>) -> Fut + 'static,
    Fut: std::future::Future<Output = Result<JsValue, JsValue>> + 'static,
{
    let run = run.clone();
    future_to_promise(async move {
        if run.try_borrow_mut().is_err() {
            return Err(js_error("the playground is busy with another call"));
        }
        body(run).await
    })
}

#[wasm_bindgen]
impl Playground {
    #[wasm_bindgen(constructor)]
    pub fn new(dataset: &WebDataset, config: JsValue) -> Result<Playground, JsValue> {
        let page: PageConfig = if config.is_undefined() || config.is_null() {
            PageConfig::default()
        } else {
            serde_wasm_bindgen::from_value(config)
                .map_err(|e| js_error(format!("bad playground config: {e}")))?
        };
        let d = &dataset.inner;
        let train = d.train.head(page.subset);
        // Without a test split, the monitor holds out nothing and queries the training images.
        let held_out = if d.test.is_empty() { &d.train } else { &d.test };
        let test = held_out.head(page.eval_images);
        let config = RunConfig {
            data: d.name.clone(),
            model: page.model,
            loss: page.loss,
            temperature: page.temperature,
            sigma: page.sigma,
            batch_size: page.batch_size,
            epochs: page.epochs,
            lr: page.lr,
            optimizer: page.optimizer,
            weight_decay: page.weight_decay,
            momentum: page.momentum,
            warmup_epochs: page.warmup_epochs,
            seed: page.seed,
            device: DeviceKind::Wgpu,
            limit: Some(page.subset),
            crop_min_scale: page.crop_min_scale,
            loss_kernel: page.loss_kernel,
        };
        let trainer =
            Trainer::new(config, train.clone(), WgpuDevice::default()).map_err(js_error)?;
        Ok(Self {
            run: Rc::new(RefCell::new(Run {
                trainer,
                bank: train,
                test,
                classes: d.classes,
                test_features: vec![],
            })),
        })
    }

    /// One optimization step: `{event, epoch, step, loss, lr}`.
    pub fn step(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let mut run = run.borrow_mut();
            let event = run.trainer.step_async().await.map_err(js_error)?;
            to_js(&event)
        })
    }

    #[wasm_bindgen(js_name = endEpoch)]
    pub fn end_epoch(&self) {
        self.run.borrow_mut().trainer.end_epoch();
    }

    #[wasm_bindgen(js_name = epochFinished)]
    pub fn epoch_finished(&self) -> bool {
        self.run.borrow().trainer.epoch_finished()
    }

    pub fn finished(&self) -> bool {
        self.run.borrow().trainer.finished()
    }

    pub fn epoch(&self) -> usize {
        self.run.borrow().trainer.epoch
    }

    #[wasm_bindgen(js_name = batchSize)]
    pub fn batch_size(&self) -> usize {
        self.run.borrow().trainer.config.batch_size
    }

    #[wasm_bindgen(js_name = stepsPerEpoch)]
    pub fn steps_per_epoch(&self) -> usize {
        self.run.borrow().trainer.steps_per_epoch()
    }

    /// RGB bytes (32x32x3 each) of the view pairs the next step trains on: first view, second
    /// view, first view, ...
    #[wasm_bindgen(js_name = upcomingViews)]
    pub fn upcoming_views(&self, count: usize) -> Vec<u8> {
        let (a, b) = self.run.borrow().trainer.upcoming_views(count);
        a.chunks_exact(IMAGE_LEN)
            .zip(b.chunks_exact(IMAGE_LEN))
            .flat_map(|(x, y)| [view_rgb(x), view_rgb(y)].concat())
            .collect()
    }

    /// RGB bytes (32x32x3) of evaluated test image `index`.
    #[wasm_bindgen(js_name = testImage)]
    pub fn test_image(&self, index: usize) -> Result<Vec<u8>, JsValue> {
        let run = self.run.borrow();
        if index >= run.test.len() {
            return Err(js_error(format!(
                "test image {index} does not exist ({} evaluated)",
                run.test.len()
            )));
        }
        Ok(image_rgb(run.test.image(index)))
    }

    /// The kNN monitor (bank = training subset, queries = evaluated test images) and the 2-D PCA
    /// of the test features: `{knnTop1, points, labels}`.
    pub fn evaluate(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let evaluation = evaluate(&mut run.borrow_mut()).await?;
            to_js(&evaluation)
        })
    }

    /// Loads a `model.safetensors` (saved by this page or by `dcl pretrain`) into the run, then
    /// evaluates it: `{knnTop1, points, labels}`. Training continues from these weights.
    #[wasm_bindgen(js_name = loadSafetensors)]
    pub fn load_safetensors(&self, file: String, bytes: Vec<u8>) -> Promise {
        with_run(&self.run, |run| async move {
            let mut run = run.borrow_mut();
            let model = run.trainer.config.model;
            let (tensors, saved) = parse_safetensors(&file, &bytes).map_err(js_error)?;
            if let Some(saved) = saved.filter(|&s| s != model) {
                return Err(js_error(format!(
                    "{file} holds a {saved}; this run trains a {model}: pick that model and start again"
                )));
            }
            let device = run.trainer.device().clone();
            let encoder = encoder_from_tensors::<B>(model, tensors, &device)
                .map_err(|e| js_error(format!("{file}: {e}")))?;
            run.trainer.load_encoder(encoder);
            to_js(&evaluate(&mut run).await?)
        })
    }

    /// The `k` evaluated test images most cosine-similar to test image `index` (itself first).
    pub fn neighbors(&self, index: usize, k: usize) -> Result<Vec<u32>, JsValue> {
        let run = self.run.borrow();
        let n = run.test.len();
        if run.test_features.is_empty() || index >= n {
            return Err(js_error(format!(
                "no features for test image {index}: evaluate first ({n} test images)"
            )));
        }
        let dim = run.test_features.len() / n;
        let f = &run.test_features;
        let query = &f[index * dim..(index + 1) * dim];
        let sim = |j: usize| -> f32 {
            let row = &f[j * dim..(j + 1) * dim];
            row.iter().zip(query).map(|(a, b)| a * b).sum()
        };
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| sim(b as usize).total_cmp(&sim(a as usize)));
        order.truncate(k);
        Ok(order)
    }

    /// The encoder as safetensors, with the same torchvision names the CLI writes.
    #[wasm_bindgen(js_name = saveSafetensors)]
    pub fn save_safetensors(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let run = run.borrow();
            let tensors = torchvision_tensors_async(&run.trainer.encoder().valid())
                .await
                .map_err(js_error)?;
            let bytes = safetensors_bytes(&tensors, run.trainer.config.model);
            Ok(js_sys::Uint8Array::from(bytes.as_slice()).into())
        })
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

/// The decoupled loss (or InfoNCE) of two [n, d] embeddings on the page's WebGPU through Burn,
/// for checking the page against the native `dcl loss` on the same numbers.
#[wasm_bindgen(js_name = lossValue)]
pub async fn loss_value(
    z1: Vec<f32>,
    z2: Vec<f32>,
    n: usize,
    d: usize,
    kind: &str,
    temperature: f64,
    sigma: f64,
) -> Result<f64, JsValue> {
    let loss = loss_and_shape(&z1, &z2, n, d, kind, temperature, sigma)?;
    let device = WgpuDevice::default();
    let tensor = |z: Vec<f32>| Tensor::<WebGpu, 2>::from_data(TensorData::new(z, [n, d]), &device);
    let value = loss.forward(tensor(z1), tensor(z2)).map_err(js_error)?;
    Ok(read_f32(value).await.map_err(js_error)?[0] as f64)
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
