//! The playground's bindings: the Web Worker in `www/worker.js` drives a [`Playground`] one step
//! at a time, on the browser's WebGPU or on Burn's CPU backend in wasm (for a browser without a
//! usable GPU), with the same trainer, loss and model code as the native CLI.
//!
//! A run's `RefCell` stays borrowed across GPU read-backs on purpose: the worker sends every call
//! into a run through one promise chain, so no second borrow can start while one is held (and a
//! step must not interleave with a save anyway).
#![allow(clippy::await_holding_refcell_ref)]

use super::{js_error, loss_and_shape, to_js, WebDataset};
use crate::augment::preview::{image_rgb, view_rgb};
use crate::backend::read_f32;
use crate::backend::DeviceKind;
use crate::data::{Dataset, Split, IMAGE_LEN, SIDE};
use crate::eval::{pca2, Scores};
use crate::model::Encoder;
use crate::neighbors::nearest_to_row;
use crate::safetensors::{parse_safetensors, safetensors_bytes};
use crate::train::{Event, RunConfig, Session};
use crate::weights::{encoder_from_tensors, torchvision_tensors_async};
use burn::module::AutodiffModule;
use burn::tensor::{Device, Tensor, TensorData};
use js_sys::Promise;
use serde::Serialize;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// Burn's device on the browser's WebGPU adapter, without autodiff. Valid once
/// [`init_webgpu`] has run (the page awaits it before anything else).
fn webgpu() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::default())
}

/// The page's Burn device for a run on `kind`, without autodiff: WebGPU, or Burn's CPU backend
/// (flex, with the CPU convolution and batch norm the native CLI uses, SIMD128, one thread).
fn page_device(kind: DeviceKind) -> Result<Device, JsValue> {
    match kind {
        DeviceKind::Wgpu => Ok(webgpu()),
        DeviceKind::Cpu => Ok(crate::backend::cpu()),
        DeviceKind::Cuda => Err(js_error(
            "bad playground config: the page trains on \"cpu\" or \"wgpu\" (WebGPU), not cuda",
        )),
    }
}

/// Starts Burn on the browser's WebGPU adapter. The page checks `navigator.gpu` and
/// `requestAdapter()` before calling this, so a missing adapter gets its message there.
#[wasm_bindgen(js_name = initWebGpu)]
pub async fn init_webgpu() {
    crate::backend::init_page_webgpu().await;
}

struct Run {
    session: Session,
    /// Test features from the last evaluation, for the neighbours view.
    test_features: Vec<f32>,
}

/// An event as the page's worker sees it: the session's own, named and keyed as `metrics.jsonl`
/// has it, except that an evaluation carries the scatter's points.
#[derive(Serialize)]
#[serde(untagged)]
enum PageEvent {
    Evaluation(Evaluation),
    Session(Event),
}

#[derive(Serialize)]
#[serde(tag = "event", rename = "evaluation")]
struct Evaluation {
    epoch: usize,
    knn_top1: f64,
    /// kNN top-1 at k = 20 and 200 (the page has no linear probe: see `eval::monitor_protocol`).
    #[serde(flatten)]
    scores: Scores,
    /// PCA coordinates of the evaluated test images, x0, y0, x1, y1, ...
    points: Vec<f32>,
    labels: Vec<u16>,
}

impl Run {
    /// The page's form of a session event; keeps an evaluation's features for
    /// [`Playground::neighbors`].
    fn page_event(&mut self, event: Event) -> PageEvent {
        match event {
            Event::Evaluation {
                epoch,
                scores,
                features,
                ..
            } => PageEvent::Evaluation(self.evaluation(epoch, scores, features)),
            other => PageEvent::Session(other),
        }
    }

    fn evaluation(&mut self, epoch: usize, scores: Scores, features: Vec<f32>) -> Evaluation {
        let labels = self.test().labels.clone();
        let dim = features.len() / labels.len().max(1);
        let points = pca2(&features, dim).into_iter().flatten().collect();
        self.test_features = features;
        Evaluation {
            epoch,
            knn_top1: scores.monitor_top1(),
            scores,
            points,
            labels,
        }
    }

    fn test(&self) -> &Split {
        self.session.queries().expect("the page always has queries")
    }

    /// The encoder in a `model.safetensors`, which must hold this run's model.
    fn encoder_from_file(&self, file: &str, bytes: &[u8]) -> Result<Encoder, JsValue> {
        let model = self.session.config().model;
        let (tensors, saved) = parse_safetensors(file, bytes).map_err(js_error)?;
        if let Some(saved) = saved.filter(|&s| s != model) {
            return Err(js_error(format!(
                "{file} holds a {saved}; this run trains a {model}: pick that model and start again"
            )));
        }
        let device = self.session.trainer().device().clone();
        encoder_from_tensors(model, tensors, &device).map_err(|e| js_error(format!("{file}: {e}")))
    }
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
    /// The page's defaults ([`RunConfig::playground`]), which the controls start from.
    pub fn defaults() -> Result<JsValue, JsValue> {
        to_js(&RunConfig::playground())
    }

    /// A run of the playground preset with `config`'s fields (the page's camelCase names, or
    /// snake_case) replaced; unknown or bad fields are errors. `device` is `"wgpu"` (the default:
    /// awaits [`init_webgpu`] first) or `"cpu"`; the loss kernel follows it unless given.
    #[wasm_bindgen(constructor)]
    pub fn new(dataset: &WebDataset, config: JsValue) -> Result<Playground, JsValue> {
        let overrides = if config.is_undefined() || config.is_null() {
            serde_json::json!({})
        } else {
            serde_wasm_bindgen::from_value(config)
                .map_err(|e| js_error(format!("bad playground config: {e}")))?
        };
        let device = match overrides.get("device") {
            Some(kind) => serde_json::from_value(kind.clone())
                .map_err(|e| js_error(format!("bad playground config: {e}")))?,
            None => DeviceKind::Wgpu,
        };
        let mut config = RunConfig::playground()
            .on_device(device)
            .overridden(&overrides)
            .map_err(|e| js_error(format!("bad playground config: {e}")))?;
        let d = &dataset.inner;
        config.data = d.name.clone();
        // Only the subsets the run uses are copied. Without a test split, the monitor holds out
        // nothing and queries the training images.
        let held_out = if d.test.is_empty() { &d.train } else { &d.test };
        let subset = Dataset {
            name: d.name.clone(),
            format: d.format,
            classes: d.classes,
            source_shape: d.source_shape,
            train: d.train.head(config.limit.unwrap_or(usize::MAX)),
            test: held_out.head(config.eval_images.unwrap_or(usize::MAX)),
        };
        let device = page_device(config.device)?.autodiff();
        let session = Session::new(config, &subset, device).map_err(js_error)?;
        Ok(Self {
            run: Rc::new(RefCell::new(Run {
                session,
                test_features: vec![],
            })),
        })
    }

    /// The run's next event, as `metrics.jsonl` has it: `{event: 'pixels', knn_top1}` (raw
    /// pixels, first), `{event: 'step', epoch, step, loss, lr, images_per_sec}`,
    /// `{event: 'epoch', epoch}` or `{event: 'finished'}`; evaluations come as
    /// `{event: 'evaluation', epoch, knn_top1, knn, points, labels}` (the first is the untrained
    /// encoder's).
    pub fn advance(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let mut run = run.borrow_mut();
            let event = run.session.advance().await.map_err(js_error)?;
            to_js(&run.page_event(event))
        })
    }

    pub fn epoch(&self) -> usize {
        self.run.borrow().session.trainer().epoch()
    }

    #[wasm_bindgen(js_name = batchSize)]
    pub fn batch_size(&self) -> usize {
        self.run.borrow().session.config().batch_size
    }

    #[wasm_bindgen(js_name = stepsPerEpoch)]
    pub fn steps_per_epoch(&self) -> usize {
        self.run.borrow().session.trainer().steps_per_epoch()
    }

    /// The run's settings, in `config.toml`'s names.
    pub fn config(&self) -> Result<JsValue, JsValue> {
        to_js(self.run.borrow().session.config())
    }

    /// RGB bytes (32x32x3 each) of the view pairs the next step trains on: first view, second
    /// view, first view, ... (none at an epoch's end).
    #[wasm_bindgen(js_name = upcomingViews)]
    pub fn upcoming_views(&self, count: usize) -> Vec<u8> {
        let (a, b) = self.run.borrow().session.trainer().upcoming_views(count);
        a.chunks_exact(IMAGE_LEN)
            .zip(b.chunks_exact(IMAGE_LEN))
            .flat_map(|(x, y)| [view_rgb(x), view_rgb(y)].concat())
            .collect()
    }

    /// RGB bytes (32x32x3) of evaluated test image `index`.
    #[wasm_bindgen(js_name = testImage)]
    pub fn test_image(&self, index: usize) -> Result<Vec<u8>, JsValue> {
        let run = self.run.borrow();
        let test = run.test();
        if index >= test.len() {
            return Err(js_error(format!(
                "test image {index} does not exist ({} evaluated)",
                test.len()
            )));
        }
        Ok(image_rgb(test.image(index)))
    }

    /// The kNN monitor on the current weights, now: `{event: 'evaluation', epoch, knn_top1,
    /// knn, points, labels}`.
    pub fn evaluate(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let mut run = run.borrow_mut();
            let event = run.session.evaluate().await.map_err(js_error)?;
            to_js(&run.page_event(event))
        })
    }

    /// Loads a `model.safetensors` (saved by this page or by `dcl pretrain`) into the run, then
    /// evaluates it: the evaluation event of [`Playground::advance`]. Training continues from
    /// these weights.
    #[wasm_bindgen(js_name = loadSafetensors)]
    pub fn load_safetensors(&self, file: String, bytes: Vec<u8>) -> Promise {
        with_run(&self.run, |run| async move {
            let mut run = run.borrow_mut();
            let encoder = run.encoder_from_file(&file, &bytes)?;
            run.session.load_encoder(encoder).map_err(js_error)?;
            let event = run.session.evaluate().await.map_err(js_error)?;
            to_js(&run.page_event(event))
        })
    }

    /// Continues this run after `epoch` epochs from an autosave's `model.safetensors` (the page
    /// keeps one per epoch in IndexedDB): the next event is epoch `epoch + 1`'s first step. The
    /// optimizer's state starts afresh (see `Session::continue_from`).
    #[wasm_bindgen(js_name = continueFrom)]
    pub fn continue_from(&self, epoch: usize, file: String, bytes: Vec<u8>) -> Promise {
        with_run(&self.run, move |run| async move {
            let mut run = run.borrow_mut();
            let encoder = run.encoder_from_file(&file, &bytes)?;
            run.session
                .continue_from(epoch, encoder)
                .map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The `k` evaluated test images most cosine-similar to test image `index` (itself first).
    pub fn neighbors(&self, index: usize, k: usize) -> Result<Vec<u32>, JsValue> {
        let run = self.run.borrow();
        let n = run.test().len();
        if run.test_features.is_empty() || index >= n {
            return Err(js_error(format!(
                "no features for test image {index}: evaluate first ({n} test images)"
            )));
        }
        let dim = run.test_features.len() / n;
        let found = nearest_to_row(&run.test_features, dim, index, k.saturating_sub(1));
        Ok(std::iter::once(index)
            .chain(found.into_iter().map(|(i, _)| i))
            .map(|i| i as u32)
            .collect())
    }

    /// The encoder as safetensors, with the same torchvision names the CLI writes.
    #[wasm_bindgen(js_name = saveSafetensors)]
    pub fn save_safetensors(&self) -> Promise {
        with_run(&self.run, |run| async move {
            let run = run.borrow();
            let trainer = run.session.trainer();
            let tensors = torchvision_tensors_async(&trainer.encoder().valid())
                .await
                .map_err(js_error)?;
            let bytes = safetensors_bytes(&tensors, trainer.config().model);
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
