//! The playground's bindings: the Web Worker in `www/worker.js` drives a [`Playground`] one step
//! at a time on the browser's WebGPU, with the same trainer, loss and model code as the native CLI.
//!
//! A run's `RefCell` stays borrowed across GPU read-backs on purpose: the worker sends every call
//! into a run through one promise chain, so no second borrow can start while one is held (and a
//! step must not interleave with a save anyway).
#![allow(clippy::await_holding_refcell_ref)]

use super::{js_error, loss_and_shape, to_js, WebDataset};
use crate::backend::DeviceKind;
use crate::data::preview::{image_rgb, view_rgb};
use crate::data::{Split, IMAGE_LEN, SIDE};
use crate::eval::{knn_monitor_async, pca2, read_f32};
use crate::loss::{LossKernel, LossKind};
use crate::model::{Encoder, ModelName};
use crate::optim::OptimizerKind;
use crate::safetensors::{parse_safetensors, safetensors_bytes};
use crate::train::{RunConfig, Trainer};
use crate::weights::{encoder_from_tensors, torchvision_tensors_async};
use burn::module::AutodiffModule;
use burn::tensor::{Device, Tensor, TensorData};
use js_sys::Promise;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// Burn's device on the browser's WebGPU adapter, without autodiff. Valid once
/// [`init_webgpu`] has run (the page awaits it before anything else).
fn webgpu() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::default())
}

/// Starts Burn on the browser's WebGPU adapter. The page checks `navigator.gpu` and
/// `requestAdapter()` before calling this, so a missing adapter gets its message there.
#[wasm_bindgen(js_name = initWebGpu)]
pub async fn init_webgpu() {
    Device::wgpu_async(burn::tensor::DeviceKind::default()).await;
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
    trainer: Trainer,
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
        let trainer = Trainer::new(config, train.clone(), webgpu().autodiff()).map_err(js_error)?;
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
            let encoder = encoder_from_tensors(model, tensors, &device)
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
    let device = webgpu();
    let tensor = |z: Vec<f32>| Tensor::<2>::from_data(TensorData::new(z, [n, d]), &device);
    let value = loss.forward(tensor(z1), tensor(z2)).map_err(js_error)?;
    Ok(read_f32(value).await.map_err(js_error)?[0] as f64)
}

/// Burn's eval-mode forward of a trained encoder on the page's WebGPU: what the tutorial times
/// beside the WGSL engine ([`super::WebEncoder`]) on the same images, and checks it against.
#[wasm_bindgen]
pub struct BurnEncoder {
    encoder: Encoder,
}

#[wasm_bindgen]
impl BurnEncoder {
    /// A `model.safetensors` written by `dcl` (its metadata names the preset).
    #[wasm_bindgen(js_name = fromSafetensors)]
    pub fn from_safetensors(file: String, bytes: Vec<u8>) -> Result<BurnEncoder, JsValue> {
        let (tensors, saved) = parse_safetensors(&file, &bytes).map_err(js_error)?;
        let model = saved.ok_or_else(|| js_error(format!("{file} names no model preset")))?;
        let encoder = encoder_from_tensors(model, tensors, &webgpu())
            .map_err(|e| js_error(format!("{file}: {e}")))?;
        Ok(Self { encoder })
    }

    /// The 128-d projections (flat, row-major) of normalized images [batch, 3, 32, 32].
    pub fn projections(&self, images: Vec<f32>, batch: usize) -> Promise {
        let encoder = self.encoder.clone();
        future_to_promise(async move {
            if images.len() != batch * IMAGE_LEN {
                return Err(js_error(format!(
                    "{} numbers are not {batch} images of 3x32x32",
                    images.len()
                )));
            }
            let shape = [batch, 3, SIDE, SIDE];
            let x = Tensor::<4>::from_data(TensorData::new(images, shape), &webgpu());
            let out = read_f32(encoder.forward(x)).await.map_err(js_error)?;
            Ok(js_sys::Float32Array::from(out.as_slice()).into())
        })
    }
}
