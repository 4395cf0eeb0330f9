//! The `dcl` command line, one module per subcommand. The binary's concerns live here (the
//! static server, the benches, retrieval, downloads' progress); the library's stages stay
//! outside, and nothing here is built into the page's wasm modules.

mod bench;
mod chart;
mod data;
mod download;
#[cfg(feature = "wgpu")]
mod engine;
mod eval;
mod experiment;
mod loss;
mod pretrain;
#[cfg(feature = "wgpu")]
mod retrieval;
pub mod serve;

use crate::model::ModelName;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dcl",
    version,
    about = "Decoupled Contrastive Learning: pretrain and inspect self-supervised image encoders"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Self-supervised pretraining; writes a run folder.
    Pretrain(pretrain::PretrainArgs),
    /// kNN (and linear probe) accuracy of a run's latest checkpoint.
    Eval(eval::EvalArgs),
    /// The loss (and gradients) of two embedding arrays, for checking a port against PyTorch.
    Loss(loss::LossArgs),
    /// Model presets.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Datasets: info, preview, download.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Serve the playground page (index.html, www/, the wasm build) and a dataset found on disk.
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// A dataset path or name; by default CIFAR-10 (fetched when online), else the first of
        /// fashion-mnist, mnist found.
        #[arg(long)]
        data: Option<String>,
        /// The folder holding index.html.
        #[arg(long, default_value = ".")]
        root: std::path::PathBuf,
        /// Without --data, CIFAR-10 is fetched into the data cache when it is not on disk;
        /// this skips that.
        #[arg(long)]
        offline: bool,
    },
    /// Backbone features (or projections) of images by the WGSL inference engine, as `.npy`.
    #[cfg(feature = "wgpu")]
    Embed(engine::EmbedArgs),
    /// One image and its nearest neighbours by cosine similarity of features, as a PNG row.
    #[cfg(feature = "wgpu")]
    Neighbors(engine::NeighborsArgs),
    /// Experiments that test the paper's claims: `npc`.
    Experiment {
        #[command(subcommand)]
        command: experiment::ExperimentCommand,
    },
    /// Speed measurements.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameter counts of a preset.
    Info { name: ModelName },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pretrain(args) => pretrain::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Model {
            command: ModelCommand::Info { name },
        } => {
            let counts = name.arch().param_counts();
            println!(
                "{}",
                serde_json::json!({ "model": name.to_string(), "params": counts })
            );
            Ok(())
        }
        Command::Data { command } => data::run(command),
        #[cfg(feature = "wgpu")]
        Command::Embed(args) => engine::embed(args),
        #[cfg(feature = "wgpu")]
        Command::Neighbors(args) => engine::neighbors(args),
        Command::Serve {
            port,
            data,
            root,
            offline,
        } => serve::serve(&root, port, data.as_deref(), offline),
        Command::Experiment { command } => experiment::run(command),
        Command::Bench { command } => bench::run(command),
    }
}

/// Runs a PyTorch reference script (torch required; never a runtime dependency of dcl) and parses the
/// JSON it prints.
fn run_pytorch(script: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("--pytorch: cannot run python3: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "--pytorch: {script} failed (pip install torch && pip install --no-deps lightly): {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("--pytorch: {script} printed no JSON: {e}"))
}
