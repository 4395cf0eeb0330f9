//! dcl: Decoupled Contrastive Learning (Yeh et al., ECCV 2022) for self-supervised image encoders.
//!
//! `data` -> `augment` -> `model` -> `loss` -> `train` -> `eval`, on any Burn backend picked in
//! `backend`; `weights`, `safetensors` and `run` handle what goes to disk (through `files`);
//! `gpu` holds the WGSL kernels (the fused loss, the inference engine); `cli` is the `dcl`
//! command (native only) and `web` the page's bindings; `collective` is what data-parallel peers
//! exchange.
//!
//! Without the `train` feature (the inference-only page build, `web-infer`) nothing here needs
//! Burn: the readers, the presets (`arch`), safetensors, the loss's float64 host path and the WGSL
//! kernels remain.

#[macro_use]
mod choice;

// The training process's allocator policy: native only (libc).
#[cfg(not(target_arch = "wasm32"))]
pub mod alloc;
pub mod arch;
pub mod augment;
#[cfg(feature = "train")]
pub mod backend;
// Peers training one encoder together (`--devices` threads, native only; MPI ranks with `mpi`).
#[cfg(feature = "train")]
pub mod collective;
// The command line: native only, so none of it reaches the page's wasm modules.
#[cfg(all(feature = "train", not(target_arch = "wasm32")))]
pub mod cli;
pub mod data;
#[cfg(feature = "train")]
pub mod eval;
pub mod files;
#[cfg(any(feature = "wgpu", feature = "web-infer"))]
pub mod gpu;
pub mod loss;
#[cfg(feature = "train")]
pub mod model;
pub mod neighbors;
pub mod npc;
#[cfg(feature = "train")]
pub mod optim;
#[cfg(feature = "train")]
pub mod run;
pub mod safetensors;
#[cfg(feature = "train")]
pub mod train;
#[cfg(all(target_arch = "wasm32", feature = "web-infer"))]
pub mod web;
#[cfg(feature = "train")]
pub mod weights;
