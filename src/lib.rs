//! dcl: Decoupled Contrastive Learning (Yeh et al., ECCV 2022) for self-supervised image encoders.
//!
//! `data` -> `augment` -> `model` -> `loss` -> `train` -> `eval`, on any Burn backend picked in
//! `backend`; `weights`, `safetensors` and `run` handle what goes to disk; `gpu` holds the WGSL
//! kernels (the fused loss, the inference engine); `cli` is the `dcl` command and `web` the page's
//! bindings.
//!
//! Without the `train` feature (the inference-only page build, `web-infer`) nothing here needs
//! Burn: the readers, the presets (`arch`), safetensors, the loss's float64 host path and the WGSL
//! kernels remain.

pub mod arch;
pub mod augment;
#[cfg(feature = "train")]
pub mod backend;
#[cfg(feature = "train")]
pub mod cli;
pub mod data;
#[cfg(feature = "train")]
pub mod eval;
#[cfg(any(feature = "wgpu", feature = "web-infer"))]
pub mod gpu;
pub mod loss;
#[cfg(feature = "train")]
pub mod model;
#[cfg(feature = "train")]
pub mod optim;
#[cfg(feature = "wgpu")]
pub mod retrieval;
#[cfg(feature = "train")]
pub mod run;
pub mod safetensors;
pub mod serve;
#[cfg(feature = "train")]
pub mod train;
#[cfg(all(target_arch = "wasm32", feature = "web-infer"))]
pub mod web;
#[cfg(feature = "train")]
pub mod weights;
