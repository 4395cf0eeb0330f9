//! dcl: Decoupled Contrastive Learning (Yeh et al., ECCV 2022) for self-supervised image encoders.
//!
//! `data` -> `augment` -> `model` -> `loss` -> `train` -> `eval`, on any Burn backend picked in
//! `backend`; `weights` and `run` handle what goes to disk; `cli` is the `dcl` command and `web`
//! the page's bindings.

pub mod augment;
pub mod backend;
pub mod cli;
pub mod data;
pub mod eval;
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
pub mod gpu;
pub mod loss;
pub mod model;
pub mod optim;
#[cfg(feature = "wgpu")]
pub mod retrieval;
pub mod run;
pub mod serve;
pub mod train;
#[cfg(all(target_arch = "wasm32", feature = "webgpu"))]
pub mod web;
pub mod weights;
