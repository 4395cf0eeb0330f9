//! Integration tests, one crate (see Cargo.toml's `autotests`).

mod cli;
mod common;
mod data_readers;
mod loss_reference;
mod training;
