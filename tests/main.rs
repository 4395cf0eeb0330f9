//! Integration tests, one crate (see Cargo.toml's `autotests`).

mod cli;
mod common;
mod data_readers;
#[cfg(feature = "wgpu")]
mod gpu_loss;
#[cfg(feature = "wgpu")]
mod inference;
mod loss_reference;
mod training;
mod weights;
