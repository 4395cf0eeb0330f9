//! The `dcl` command line: pretrain, eval, loss, model, data, bench.

use crate::backend::DeviceKind;
use crate::data::{discover, npy, preview, Dataset};
use crate::eval::{knn_monitor, linear_probe};
use crate::loss::{ContrastiveLoss, LossKernel, LossKind};
use crate::model::{param_counts, Encoder, ModelName};
use crate::optim::OptimizerKind;
use crate::run::{Checkpoint, RunDir};
use crate::safetensors::safetensors_bytes;
use crate::train::{RunConfig, Trainer};
use crate::weights::{module_from_bytes, torchvision_tensors, write_atomic};
use burn::module::AutodiffModule;
use burn::tensor::{Device, Tensor, TensorData};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    Pretrain(PretrainArgs),
    /// kNN (and linear probe) accuracy of a run's latest checkpoint.
    Eval {
        #[arg(long)]
        run: PathBuf,
        /// Also fit a linear probe on frozen features.
        #[arg(long)]
        linear: bool,
        #[arg(long)]
        device: Option<DeviceKind>,
    },
    /// The loss (and gradients) of two embedding arrays, for checking a port against PyTorch.
    Loss(LossArgs),
    /// Model presets.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Datasets: info, preview, download.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Serve the playground page (index.html, www/, the wasm build) and a dataset found on disk.
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// A dataset path or name; by default the first of cifar10, fashion-mnist, mnist found.
        #[arg(long)]
        data: Option<String>,
        /// The folder holding index.html.
        #[arg(long, default_value = ".")]
        root: std::path::PathBuf,
    },
    /// Backbone features (or projections) of images by the WGSL inference engine, as `.npy`.
    #[cfg(feature = "wgpu")]
    Embed(EmbedArgs),
    /// One image and its nearest neighbours by cosine similarity of features, as a PNG row.
    #[cfg(feature = "wgpu")]
    Neighbors(NeighborsArgs),
    /// Speed measurements.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Args, Clone)]
struct PretrainArgs {
    /// A dataset path, or a name: cifar10, cifar100, mnist, fashion-mnist.
    #[arg(long, default_value = "cifar10")]
    data: String,
    #[arg(long, default_value = "resnet-mini")]
    model: ModelName,
    #[arg(long, default_value = "dcl")]
    loss: LossKind,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Peak learning rate (after warm-up).
    #[arg(long, default_value_t = 0.06)]
    lr: f64,
    #[arg(long, default_value = "sgd")]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    /// DCLW's weighting width.
    #[arg(long, default_value_t = 0.5)]
    sigma: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    #[arg(long, default_value = "cpu")]
    device: DeviceKind,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Train on the first N training images only.
    #[arg(long)]
    limit: Option<usize>,
    /// The random resized crop's smallest area fraction (SimCLR's 0.08; 0.2 suits short runs).
    #[arg(long, default_value_t = 0.08)]
    crop_min_scale: f32,
    /// fused (the WGSL kernel; the default with --device wgpu) or reference (Burn's ops).
    #[arg(long)]
    loss_kernel: Option<LossKernel>,
    /// Continue the run in --out from its latest checkpoint (its config.toml wins over flags).
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct LossArgs {
    #[arg(long)]
    z1: PathBuf,
    #[arg(long)]
    z2: PathBuf,
    #[arg(long, default_value = "dcl")]
    kind: LossKind,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    #[arg(long, default_value_t = 0.5)]
    sigma: f64,
    /// Write grad_z1.npy and grad_z2.npy here.
    #[arg(long)]
    grad_out: Option<PathBuf>,
}

/// What `dcl embed` and `dcl neighbors` read.
#[cfg(feature = "wgpu")]
#[derive(Args)]
struct EngineInput {
    /// A `model.safetensors` written by `dcl pretrain` (torchvision names).
    #[arg(long)]
    model: PathBuf,
    /// A dataset path or name, or (embed only) a float32 `.npy` of shape [B, 3, H, W] used as is.
    #[arg(long)]
    data: String,
    #[arg(long, value_enum, default_value = "test")]
    split: crate::retrieval::SplitName,
    /// The first N images of the split only.
    #[arg(long)]
    limit: Option<usize>,
}

#[cfg(feature = "wgpu")]
#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    input: EngineInput,
    #[arg(long)]
    out: PathBuf,
    /// The projection head's 128-d output instead of the backbone features.
    #[arg(long)]
    projected: bool,
    /// Scale every row to unit L2 norm (what cosine kNN uses).
    #[arg(long)]
    normalize: bool,
}

#[cfg(feature = "wgpu")]
#[derive(Args)]
struct NeighborsArgs {
    #[command(flatten)]
    input: EngineInput,
    /// Index of the query image in the split.
    #[arg(long)]
    query: usize,
    #[arg(short, long, default_value_t = 8)]
    k: usize,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    scale: usize,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameter counts of a preset.
    Info { name: ModelName },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Format, image count, shape, classes and label counts.
    Info {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// A PNG grid of the first images, or of their augmented view pairs.
    Preview {
        path: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        count: usize,
        #[arg(long, default_value_t = 2)]
        scale: usize,
        /// Show two augmented views per image, drawn with this seed.
        #[arg(long)]
        views: Option<u64>,
    },
    /// Download from the official source, checksum-verified.
    Get {
        name: String,
        #[arg(long, default_value = "data")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Images per second of a full training step (two views, forward, loss, backward, update).
    Train {
        #[arg(long, default_value = "resnet-mini")]
        model: ModelName,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value = "cpu")]
        device: DeviceKind,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// CPU threads for dcl's kernels and the peer (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also run the PyTorch peer (scripts/peer_bench_train.py) and print the ratio.
        #[arg(long)]
        peer: bool,
        #[arg(long)]
        json: bool,
    },
    /// Images/s of inference on wgpu: the WGSL engine vs Burn's eval-mode forward.
    #[cfg(feature = "wgpu")]
    Infer {
        #[arg(long, default_value = "resnet-mini")]
        model: ModelName,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Forward + backward of the loss: the fused WGSL kernel vs Burn's composed reference.
    Loss {
        /// Only wgpu: both paths run on the same adapter.
        #[arg(long, default_value = "wgpu")]
        device: DeviceKind,
        #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,8192")]
        n: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        d: usize,
        /// Timed repetitions after one warm-up; the median is reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also run scripts/peer_bench_loss.py (PyTorch + lightly on the CPU) on the same sizes.
        #[arg(long)]
        peer: bool,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pretrain(args) => pretrain(args),
        Command::Eval {
            run,
            linear,
            device,
        } => {
            let dir = RunDir::open(&run)?;
            let config = dir.read_config()?;
            let device = device.unwrap_or(config.device);
            let ckpt = dir
                .latest_checkpoint()?
                .ok_or_else(|| anyhow::anyhow!("{}: no checkpoint yet", run.display()))?;
            let report = EvalTask {
                config,
                ckpt,
                linear,
            }
            .run(crate::backend::device(device)?)?;
            println!("{report}");
            Ok(())
        }
        Command::Loss(args) => loss(args),
        Command::Model {
            command: ModelCommand::Info { name },
        } => {
            let encoder = Encoder::new(name, &crate::backend::cpu());
            let counts = param_counts(&encoder, name);
            println!(
                "{}",
                serde_json::json!({ "model": name.to_string(), "params": counts })
            );
            Ok(())
        }
        Command::Data { command } => data(command),
        #[cfg(feature = "wgpu")]
        Command::Embed(args) => embed(args),
        #[cfg(feature = "wgpu")]
        Command::Neighbors(args) => neighbors(args),
        Command::Serve { port, data, root } => crate::serve::serve(&root, port, data.as_deref()),
        Command::Bench {
            command:
                BenchCommand::Train {
                    model,
                    batch_size,
                    device,
                    steps,
                    threads,
                    peer,
                    json,
                },
        } => {
            let threads = threads.unwrap_or_else(num_cpus);
            anyhow::ensure!(
                threads >= 1 && steps >= 1,
                "--threads and --steps must be >= 1"
            );
            // Burn's CPU kernels (flex, gemm) run on rayon's global pool.
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
            let mut bench = BenchTask {
                model,
                batch_size,
                steps,
            }
            .run(crate::backend::device(device)?)?;
            bench["device"] = device.to_string().into();
            bench["threads"] = threads.into();
            if peer {
                let args = [
                    "--model".to_string(),
                    model.to_string(),
                    "--batch-size".into(),
                    batch_size.to_string(),
                    "--threads".into(),
                    threads.to_string(),
                    "--steps".into(),
                    steps.to_string(),
                ];
                let pytorch = run_peer("scripts/peer_bench_train.py", &args)?;
                let ratio = bench["images_per_sec"].as_f64().unwrap_or(0.0)
                    / pytorch["images_per_sec"].as_f64().unwrap_or(f64::NAN);
                bench["pytorch_images_per_sec"] = pytorch["images_per_sec"].clone();
                bench["ratio"] = ratio.into();
            }
            print_train_bench(&bench, json);
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Loss {
                    device,
                    n,
                    d,
                    reps,
                    peer,
                    json,
                },
        } => bench_loss(device, &n, d, reps, peer, json),
        #[cfg(feature = "wgpu")]
        Command::Bench {
            command:
                BenchCommand::Infer {
                    model,
                    batch_size,
                    reps,
                },
        } => {
            println!("| model | batch | path | images/s |\n|---|---|---|---|");
            for row in crate::gpu::bench::infer(model, batch_size, reps)? {
                println!(
                    "| {model} | {} | {} | {:.1} |",
                    row.batch, row.path, row.images_per_sec
                );
            }
            Ok(())
        }
    }
}

fn data(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Info { path, json } => {
            let ds = discover::load(&path)?;
            let info = ds.info();
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "{}: {:?}, {} images ({} train, {} test), shape {:?}, {} classes",
                    ds.name,
                    info.format,
                    info.images,
                    info.train_images,
                    info.test_images,
                    info.shape,
                    info.classes
                );
            }
            Ok(())
        }
        DataCommand::Preview {
            path,
            out,
            count,
            scale,
            views,
        } => {
            let ds = discover::load(&path)?;
            write_atomic(&out, &preview::grid_png(&ds, count, scale, views)?)
        }
        DataCommand::Get { name, dir } => {
            let target = discover::download(&name, &dir)?;
            println!("{name} is in {}", target.display());
            Ok(())
        }
    }
}

/// The engine on this machine's adapter, and the images `--data` names.
#[cfg(feature = "wgpu")]
fn open_engine(
    input: &EngineInput,
) -> anyhow::Result<(
    crate::gpu::GpuContext,
    crate::gpu::infer::InferenceEngine,
    crate::retrieval::Images,
    Option<Dataset>,
)> {
    let gpu = crate::gpu::GpuContext::blocking()?;
    let engine = crate::retrieval::load_engine(&gpu, &input.model)?;
    let (images, dataset) = crate::retrieval::load_images(&input.data, input.split, input.limit)?;
    Ok((gpu, engine, images, dataset))
}

#[cfg(feature = "wgpu")]
fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    use crate::retrieval::embed;
    let (gpu, engine, images, _) = open_engine(&args.input)?;
    let out = embed(&gpu, &engine, &images, args.normalize)?;
    let (rows, dim) = if args.projected {
        (out.projections, crate::model::PROJECTION_DIM)
    } else {
        (out.features, engine.feature_dim())
    };
    write_atomic(&args.out, &npy::to_bytes(&[images.count, dim], &rows))?;
    eprintln!(
        "{} embeddings of width {dim} -> {}",
        images.count,
        args.out.display()
    );
    Ok(())
}

#[cfg(feature = "wgpu")]
fn neighbors(args: NeighborsArgs) -> anyhow::Result<()> {
    use crate::retrieval::{embed, nearest, pick};
    let (gpu, engine, images, dataset) = open_engine(&args.input)?;
    let (data, split) = (&args.input.data, args.input.split);
    let dataset = dataset.ok_or_else(|| {
        anyhow::anyhow!("{data}: neighbors draws dataset images; pass a dataset, not a .npy")
    })?;
    anyhow::ensure!(
        args.query < images.count,
        "--query {} is past the {} images searched",
        args.query,
        images.count
    );
    let features = embed(&gpu, &engine, &images, true)?.features;
    let found = nearest(&features, engine.feature_dim(), args.query, args.k);
    let labels = &pick(&dataset, split).labels;
    let mut row = vec![args.query];
    row.extend(found.iter().map(|f| f.0));
    let report: Vec<serde_json::Value> = found
        .iter()
        .map(|&(i, sim)| serde_json::json!({"index": i, "label": labels[i], "cosine": sim}))
        .collect();
    write_atomic(
        &args.out,
        &preview::row_png(
            pick(&dataset, split),
            dataset.source_shape,
            &row,
            args.scale,
        )?,
    )?;
    println!(
        "{}",
        serde_json::json!({"query": args.query, "label": labels[args.query], "neighbors": report})
    );
    Ok(())
}

fn read_embeddings(path: &Path) -> anyhow::Result<npy::Array> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read: {e}"))?;
    let array = npy::parse(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    anyhow::ensure!(
        array.shape.len() == 2,
        "{shown}: expected shape [N, D], found {:?}",
        array.shape
    );
    if let Some(i) = array.data.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{shown}: non-finite value {} at flat index {i}",
            array.data[i]
        );
    }
    Ok(array)
}

fn loss(args: LossArgs) -> anyhow::Result<()> {
    let a = read_embeddings(&args.z1)?;
    let b = read_embeddings(&args.z2)?;
    anyhow::ensure!(
        a.shape == b.shape,
        "{} has shape {:?} but {} has {:?}",
        args.z1.display(),
        a.shape,
        args.z2.display(),
        b.shape
    );
    let (n, d) = (a.shape[0], a.shape[1]);
    let criterion = ContrastiveLoss::new(args.kind, args.temperature, args.sigma)?;
    let device = crate::backend::cpu().autodiff();
    let tensor = |x: &npy::Array| {
        let data: Vec<f32> = x.data.iter().map(|&v| v as f32).collect();
        Tensor::<2>::from_data(TensorData::new(data, [n, d]), &device).require_grad()
    };
    let (z1, z2) = (tensor(&a), tensor(&b));
    let value = criterion.forward(z1.clone(), z2.clone())?;
    let scalar: f32 = value.clone().into_scalar();
    println!(
        "{}",
        serde_json::json!({ "kind": args.kind, "loss": scalar, "n": n, "d": d,
            "temperature": args.temperature, "sigma": args.sigma })
    );
    if let Some(dir) = args.grad_out {
        std::fs::create_dir_all(&dir)?;
        let grads = value.backward();
        for (name, z) in [("grad_z1.npy", z1), ("grad_z2.npy", z2)] {
            let g = z
                .grad(&grads)
                .expect("gradient of an input")
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32");
            write_atomic(&dir.join(name), &npy::to_bytes(&[n, d], &g))?;
        }
    }
    Ok(())
}

fn pretrain(args: PretrainArgs) -> anyhow::Result<()> {
    let dir = RunDir::create(&args.out)?;
    let config = if args.resume && args.out.join("config.toml").is_file() {
        dir.read_config()?
    } else {
        anyhow::ensure!(
            !args.out.join("config.toml").is_file(),
            "{} already holds a run; pass --resume to continue it or pick another --out",
            args.out.display()
        );
        RunConfig {
            data: args.data,
            model: args.model,
            loss: args.loss,
            temperature: args.temperature,
            sigma: args.sigma,
            batch_size: args.batch_size,
            epochs: args.epochs,
            lr: args.lr,
            optimizer: args.optimizer,
            weight_decay: args.weight_decay,
            momentum: args.momentum,
            warmup_epochs: args.warmup_epochs,
            seed: args.seed,
            device: args.device,
            limit: args.limit,
            crop_min_scale: args.crop_min_scale,
            loss_kernel: args.loss_kernel.unwrap_or(match args.device {
                DeviceKind::Wgpu => LossKernel::Fused,
                DeviceKind::Cpu | DeviceKind::Cuda => LossKernel::Reference,
            }),
        }
    };
    // Validate before writing anything.
    ContrastiveLoss::new(config.loss, config.temperature, config.sigma)?;
    let dataset = discover::load(&config.data)?;
    dir.write_config(&config)?;
    let device = crate::backend::device(config.device)?;
    PretrainTask {
        config,
        dataset,
        dir,
        resume: args.resume,
    }
    .run(device)
}

struct PretrainTask {
    config: RunConfig,
    dataset: Dataset,
    dir: RunDir,
    resume: bool,
}

/// The kNN monitor event: accuracy on the test split, memory bank = un-augmented training split.
fn knn_event(
    trainer: &Trainer,
    ds: &Dataset,
    train: &crate::data::Split,
    epoch: usize,
) -> serde_json::Value {
    let backbone = trainer.encoder().valid().backbone;
    let (top1, _) = knn_monitor(&backbone, train, &ds.test, ds.classes, trainer.device());
    serde_json::json!({ "event": "knn", "epoch": epoch, "knn_top1": top1 })
}

impl PretrainTask {
    fn run(self, device: Device) -> anyhow::Result<()> {
        let Self {
            config,
            dataset,
            dir,
            resume,
        } = self;
        let train = dataset
            .train
            .clone()
            .truncated(config.limit.unwrap_or(usize::MAX));
        let mut trainer = Trainer::new(config.clone(), train.clone(), device)?;
        let has_test = !dataset.test.is_empty();
        match dir.latest_checkpoint()?.filter(|_| resume) {
            Some(ckpt) => {
                eprintln!("resuming {} after epoch {}", dir.root.display(), ckpt.epoch);
                dir.truncate_events_after(ckpt.epoch)?;
                trainer.restore(ckpt.epoch, ckpt.weights, ckpt.optimizer)?;
            }
            None => {
                // A fresh start (or a resume before the first checkpoint): the log starts over.
                dir.clear_events()?;
                if has_test {
                    let event = knn_event(&trainer, &dataset, &train, 0);
                    eprintln!(
                        "epoch 0 (before training): kNN top-1 {:.4}",
                        event["knn_top1"]
                    );
                    dir.log(&event)?;
                }
            }
        }
        while !trainer.finished() {
            let bar = progress_bar(&trainer);
            let started = Instant::now();
            while !trainer.epoch_finished() {
                let mut event = serde_json::to_value(trainer.step()?)?;
                let done = trainer.step_in_epoch;
                let ips = (done * config.batch_size) as f64 / started.elapsed().as_secs_f64();
                event["images_per_sec"] = ips.into();
                dir.log(&event)?;
                bar.set_message(format!(
                    "loss {:.4}  {ips:.0} img/s",
                    event["loss"].as_f64().unwrap_or(f64::NAN)
                ));
                bar.inc(1);
            }
            bar.finish();
            trainer.end_epoch();
            if has_test {
                let event = knn_event(&trainer, &dataset, &train, trainer.epoch);
                eprintln!(
                    "epoch {}: kNN top-1 {:.4}",
                    trainer.epoch, event["knn_top1"]
                );
                dir.log(&event)?;
            }
            let (weights, optimizer) = trainer.snapshot()?;
            dir.save_checkpoint(&Checkpoint {
                epoch: trainer.epoch,
                weights,
                optimizer,
            })?;
            let tensors = torchvision_tensors(&trainer.encoder().valid());
            write_atomic(
                &dir.root.join("model.safetensors"),
                &safetensors_bytes(&tensors, config.model),
            )?;
        }
        Ok(())
    }
}

fn progress_bar(trainer: &Trainer) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(trainer.steps_per_epoch() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "epoch {}/{} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ETA {{eta}}",
            trainer.epoch + 1,
            trainer.config.epochs
        ))
        .expect("template")
        .progress_chars("=> "),
    );
    bar
}

struct EvalTask {
    config: RunConfig,
    ckpt: Checkpoint,
    linear: bool,
}

impl EvalTask {
    fn run(self, device: Device) -> anyhow::Result<serde_json::Value> {
        let Self {
            config,
            ckpt,
            linear,
        } = self;
        let ds = discover::load(&config.data)?;
        anyhow::ensure!(
            !ds.test.is_empty(),
            "{}: no test split to evaluate on",
            config.data
        );
        let train = ds
            .train
            .clone()
            .truncated(config.limit.unwrap_or(usize::MAX));
        let encoder = module_from_bytes(Encoder::new(config.model, &device), ckpt.weights)?;
        let backbone = encoder.valid().backbone;
        let (knn, (bank, queries)) = knn_monitor(&backbone, &train, &ds.test, ds.classes, &device);
        let dim = config.model.arch().feature_dim();
        let mut report = serde_json::json!({ "epoch": ckpt.epoch, "knn_top1": knn, "train_images": train.len(), "test_images": ds.test.len() });
        if linear {
            let top1 = linear_probe(
                (&bank, &train.labels),
                (&queries, &ds.test.labels),
                dim,
                ds.classes,
                &device,
            );
            report["linear_top1"] = top1.into();
        }
        Ok(report)
    }
}

struct BenchTask {
    model: ModelName,
    batch_size: usize,
    steps: usize,
}

impl BenchTask {
    /// Images/s over `steps` steps after one warm-up step, and the mean ms per step of each
    /// phase (the device is synchronized at each phase's end, so GPU phases do not overlap).
    fn run(self, device: Device) -> anyhow::Result<serde_json::Value> {
        use rand::{Rng, SeedableRng};
        let n = self.batch_size * (self.steps + 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let images = (0..n * crate::data::IMAGE_LEN).map(|_| rng.gen()).collect();
        let split = crate::data::Split {
            images,
            labels: vec![0; n],
        };
        let config = RunConfig {
            data: "synthetic".into(),
            model: self.model,
            loss: LossKind::Dcl,
            temperature: 0.1,
            sigma: 0.5,
            batch_size: self.batch_size,
            epochs: 1,
            lr: 0.01,
            optimizer: OptimizerKind::Sgd,
            weight_decay: 5e-4,
            momentum: 0.9,
            warmup_epochs: 0.0,
            seed: 0,
            device: DeviceKind::Cpu,
            limit: None,
            crop_min_scale: 0.08,
            loss_kernel: LossKernel::Reference,
        };
        let mut trainer = Trainer::new(config, split, device.clone())?;
        trainer.step()?; // warm-up: kernel compilation, allocator growth
        let mut phases: Vec<(&'static str, f64)> = Vec::new();
        let started = Instant::now();
        let mut last = started;
        for _ in 0..self.steps {
            let mut mark = |phase: &'static str| {
                let _ = device.sync();
                let now = Instant::now();
                let ms = (now - last).as_secs_f64() * 1e3 / self.steps as f64;
                match phases.iter_mut().find(|(p, _)| *p == phase) {
                    Some((_, total)) => *total += ms,
                    None => phases.push((phase, ms)),
                }
                last = now;
            };
            futures_lite::future::block_on(trainer.step_marked(&mut mark))?;
        }
        let ips = (self.steps * self.batch_size) as f64 / started.elapsed().as_secs_f64();
        let ms: serde_json::Map<String, serde_json::Value> = phases
            .into_iter()
            .map(|(p, ms)| (p.to_string(), ms.into()))
            .collect();
        Ok(serde_json::json!({
            "model": self.model.to_string(),
            "batch_size": self.batch_size,
            "images_per_sec": ips,
            "ms_per_step": ms,
        }))
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_train_bench(b: &serde_json::Value, json: bool) {
    if json {
        println!("{b}");
        return;
    }
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let ms = &b["ms_per_step"];
    println!("| model | batch | device | threads | dcl images/s | PyTorch images/s | ratio | ms/step: data | forward | backward | optimizer |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        b["model"].as_str().unwrap_or(""),
        b["batch_size"],
        b["device"].as_str().unwrap_or(""),
        b["threads"],
        f(&b["images_per_sec"]),
        f(&b["pytorch_images_per_sec"]),
        b["ratio"]
            .as_f64()
            .map_or("-".into(), |r| format!("{r:.2}")),
        f(&ms["data"]),
        f(&ms["forward"]),
        f(&ms["backward"]),
        f(&ms["optimizer"]),
    );
}

/// Runs a PyTorch peer script (torch required; never a runtime dependency of dcl) and parses the
/// JSON it prints.
fn run_peer(script: &str, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("--peer: cannot run python3: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "--peer: {script} failed (pip install torch && pip install --no-deps lightly): {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("--peer: {script} printed no JSON: {e}"))
}

#[cfg(feature = "wgpu")]
fn bench_loss(
    device: DeviceKind,
    sizes: &[usize],
    d: usize,
    reps: usize,
    peer: bool,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        device == DeviceKind::Wgpu,
        "--device {device}: the fused kernel is WGSL; `dcl bench loss` runs on --device wgpu"
    );
    anyhow::ensure!(reps >= 1, "--reps must be at least 1");
    let mut rows: Vec<serde_json::Value> = crate::gpu::bench::run(sizes, d, reps)?
        .iter()
        .map(|r| serde_json::to_value(r).expect("json"))
        .collect();
    if peer {
        rows.extend(peer_loss_rows(sizes, d, reps)?);
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!("| N | D | path | ms (forward + backward) | peak memory (MiB) | note |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let mib = r["peak_bytes"]
            .as_u64()
            .map(|b| format!("{:.1}", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into());
        let ms = r["ms"]
            .as_f64()
            .map(|ms| format!("{ms:.1}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {ms} | {mib} | {} |",
            r["n"],
            r["d"],
            r["path"].as_str().unwrap_or(""),
            r["error"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// The PyTorch/lightly CPU figures for the same sizes, from the peer script (torch required).
#[cfg(feature = "wgpu")]
fn peer_loss_rows(
    sizes: &[usize],
    d: usize,
    reps: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let sizes: Vec<String> = sizes.iter().map(|n| n.to_string()).collect();
    let args = [
        "--n".to_string(),
        sizes.join(","),
        "--d".into(),
        d.to_string(),
        "--reps".into(),
        reps.to_string(),
    ];
    Ok(serde_json::from_value(run_peer(
        "scripts/peer_bench_loss.py",
        &args,
    )?)?)
}

#[cfg(not(feature = "wgpu"))]
fn bench_loss(
    _: DeviceKind,
    _: &[usize],
    _: usize,
    _: usize,
    _: bool,
    _: bool,
) -> anyhow::Result<()> {
    anyhow::bail!("`dcl bench loss` needs the wgpu feature (a default feature)")
}
