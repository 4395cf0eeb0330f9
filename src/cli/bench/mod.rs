//! `dcl bench`: a training step beside its PyTorch reference, inference, the loss kernel.

#[cfg(feature = "wgpu")]
mod kernels;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod launches;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use launches::LaunchLog;

use super::run_pytorch;
use crate::backend::{DeviceKind, DeviceSpec};
use crate::loss::LossKernel;
use crate::model::{ModelName, Precision};
use crate::optim::OptimizerKind;
use crate::train::{RunConfig, Strategy};
use clap::Subcommand;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images per second of a full training step (two views, forward, loss, backward, update).
    Train {
        #[arg(long, default_value = "resnet-mini")]
        model: ModelName,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value = "cpu")]
        device: DeviceKind,
        /// Data parallel, as `dcl pretrain --devices` (the batch is split over them).
        #[arg(long, value_delimiter = ',', conflicts_with = "device")]
        devices: Vec<DeviceSpec>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// As `dcl pretrain --precision` (bf16-mixed pays on CUDA only).
        #[arg(long, default_value_t = Precision::F32)]
        precision: Precision,
        /// As `dcl pretrain --loss-kernel` (default: the device's, as there).
        #[arg(long)]
        loss_kernel: Option<LossKernel>,
        /// As `dcl pretrain --optimizer` (the page trains with adam).
        #[arg(long, default_value_t = RunConfig::default().optimizer)]
        optimizer: OptimizerKind,
        /// CPU threads for dcl's kernels and the PyTorch reference (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also run the PyTorch reference (scripts/pytorch_bench_train.py) and print the ratio.
        #[arg(long)]
        pytorch: bool,
        /// On wgpu and CUDA: each kernel's device time a step, the slowest first (each launch
        /// is then timed on its own, which slows the step: its images/s are not the step's).
        #[arg(long, conflicts_with = "pytorch")]
        kernel_times: bool,
        /// With --pytorch: this many dcl and PyTorch runs, interleaved (this machine drifts by 10-30%
        /// between runs); the medians and the spread of the pairs' ratios are reported.
        #[arg(long, default_value_t = 1, requires = "pytorch")]
        pairs: usize,
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
        /// Also run scripts/pytorch_bench_loss.py (PyTorch + lightly on the CPU) on the same sizes.
        #[arg(long)]
        pytorch: bool,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Train {
            model,
            batch_size,
            device,
            devices,
            steps,
            precision,
            loss_kernel,
            optimizer,
            threads,
            pytorch,
            kernel_times,
            pairs,
            json,
        } => {
            let device = devices.first().map_or(device, |d| d.kind);
            anyhow::ensure!(
                !pytorch || optimizer == OptimizerKind::Sgd,
                "--pytorch: the PyTorch step trains with SGD with momentum; drop --optimizer {optimizer}"
            );
            let threads = threads.unwrap_or_else(num_cpus);
            anyhow::ensure!(
                threads >= 1 && steps >= 1 && pairs >= 1,
                "--threads, --steps and --pairs must be >= 1"
            );
            // Burn's CPU kernels (flex, gemm) run on rayon's global pool.
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
            let names: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
            let task = BenchTask {
                model,
                batch_size,
                steps,
                device,
                devices,
                precision,
                loss_kernel: loss_kernel.unwrap_or(RunConfig::default_loss_kernel(device)),
                optimizer,
            };
            let launches = launch_log(device, kernel_times)?;
            let mut bench = task.run(&launches)?;
            bench["device"] = match names.is_empty() {
                true => device.to_string(),
                false => names.join(","),
            }
            .into();
            bench["threads"] = threads.into();
            if pytorch {
                let args = [
                    "--model".to_string(),
                    model.to_string(),
                    "--batch-size".into(),
                    batch_size.to_string(),
                    "--threads".into(),
                    threads.to_string(),
                    "--steps".into(),
                    steps.to_string(),
                    // The same card for CUDA; PyTorch has no wgpu, so that reference runs on the CPU.
                    "--device".into(),
                    match device {
                        DeviceKind::Cuda => "cuda".into(),
                        _ => "cpu".into(),
                    },
                ];
                against_pytorch(&task, &launches, &mut bench, &args, pairs)?;
            }
            print_train_bench(&bench, json);
            Ok(())
        }
        BenchCommand::Loss {
            device,
            n,
            d,
            reps,
            pytorch,
            json,
        } => bench_loss(device, &n, d, reps, pytorch, json),
        #[cfg(feature = "wgpu")]
        BenchCommand::Infer {
            model,
            batch_size,
            reps,
        } => {
            println!("| model | batch | path | images/s |\n|---|---|---|---|");
            for row in kernels::infer(model, batch_size, reps)? {
                println!(
                    "| {model} | {} | {} | {:.1} |",
                    row.batch, row.path, row.images_per_sec
                );
            }
            Ok(())
        }
    }
}

/// Kernel launches are counted on the CubeCL devices; the CPU device launches none.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn launch_log(device: DeviceKind, timed: bool) -> anyhow::Result<Option<LaunchLog>> {
    match device {
        DeviceKind::Cpu => Ok(None),
        _ => LaunchLog::start(timed).map(Some),
    }
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn launch_log(_: DeviceKind, _: bool) -> anyhow::Result<Option<LaunchLog>> {
    Ok(None)
}

/// Without a CubeCL backend there is no launch to count.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
enum LaunchLog {}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
impl LaunchLog {
    fn count(&self) -> usize {
        match *self {}
    }

    fn kernel_times(&self, _: usize) -> Vec<KernelTime> {
        match *self {}
    }
}

/// One kernel's launches and their summed device time, over a stretch of the launch log.
pub struct KernelTime {
    pub kernel: String,
    pub launches: usize,
    pub ms: f64,
}

struct BenchTask {
    model: ModelName,
    batch_size: usize,
    steps: usize,
    device: DeviceKind,
    /// Empty: `device` alone.
    devices: Vec<DeviceSpec>,
    precision: Precision,
    loss_kernel: LossKernel,
    optimizer: OptimizerKind,
}

impl BenchTask {
    /// Images/s over `steps` steps after one warm-up step, and the mean ms per step of each
    /// phase (the device is synchronized at each phase's end, so GPU phases do not overlap).
    fn run(&self, launches: &Option<LaunchLog>) -> anyhow::Result<serde_json::Value> {
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
            batch_size: self.batch_size,
            epochs: 1,
            lr: 0.01,
            device: self.device,
            devices: self.devices.clone(),
            precision: self.precision,
            loss_kernel: self.loss_kernel,
            optimizer: self.optimizer,
            ..RunConfig::default()
        };
        let device = crate::backend::device_at(config.first_device())?;
        let mut strategy = Strategy::new(config, split, device.clone())?;
        strategy.step()?; // warm-up: kernel compilation, allocator growth
        let _ = device.sync();
        let count = || launches.as_ref().map(LaunchLog::count);
        let (launched, traffic) = (count(), strategy.trainer().traffic());
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
            futures_lite::future::block_on(strategy.step_marked(&mut mark))?;
        }
        let ips = (self.steps * self.batch_size) as f64 / started.elapsed().as_secs_f64();
        let per_step = |count: usize| count as f64 / self.steps as f64;
        let (now, before) = (strategy.trainer().traffic(), traffic);
        // Burn's launches, and the dispatches made beside Burn (the fused loss).
        let dispatches = count().zip(launched).map(|(now_launched, launched)| {
            per_step(now_launched - launched + now.dispatches - before.dispatches)
        });
        let host_reads = per_step(now.host_reads - before.host_reads);
        let kernels: Vec<serde_json::Value> = match (launches, launched) {
            (Some(log), Some(launched)) => log
                .kernel_times(launched)
                .into_iter()
                .map(|k| {
                    serde_json::json!({
                        "kernel": k.kernel,
                        "launches_per_step": per_step(k.launches),
                        "ms_per_step": k.ms / self.steps as f64,
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        // The device waits for nothing but the views while "data" runs: the next step's views
        // are made while this one computes, so only what that overlap does not hide is left.
        let total: f64 = phases.iter().map(|(_, ms)| ms).sum();
        let data = phases
            .iter()
            .find(|(p, _)| *p == "data")
            .map_or(0.0, |p| p.1);
        let ms: serde_json::Map<String, serde_json::Value> = phases
            .into_iter()
            .map(|(p, ms)| (p.to_string(), ms.into()))
            .collect();
        Ok(serde_json::json!({
            "model": self.model.to_string(),
            "precision": self.precision.to_string(),
            "loss_kernel": self.loss_kernel.to_string(),
            "batch_size": self.batch_size,
            "images_per_sec": ips,
            "ms_per_step": ms,
            "data_wait_share": data / total,
            "dispatches_per_step": dispatches,
            "host_reads_per_step": host_reads,
            "kernels": kernels,
        }))
    }
}

/// Runs the PyTorch reference (`args`) beside `bench`, `pairs` times interleaved with `task` again, and
/// puts the medians, the pairs' ratio range and the pairs themselves into `bench`.
fn against_pytorch(
    task: &BenchTask,
    launches: &Option<LaunchLog>,
    bench: &mut serde_json::Value,
    args: &[String],
    pairs: usize,
) -> anyhow::Result<()> {
    let rate = |v: &serde_json::Value| v["images_per_sec"].as_f64().unwrap_or(f64::NAN);
    let pytorch_rate = || run_pytorch("scripts/pytorch_bench_train.py", args).map(|v| rate(&v));
    let mut runs = vec![(rate(bench), pytorch_rate()?)];
    for _ in 1..pairs {
        runs.push((rate(&task.run(launches)?), pytorch_rate()?));
    }
    let ratios: Vec<f64> = runs.iter().map(|(ours, theirs)| ours / theirs).collect();
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    bench["images_per_sec"] = median(runs.iter().map(|r| r.0).collect()).into();
    bench["pytorch_images_per_sec"] = median(runs.iter().map(|r| r.1).collect()).into();
    bench["ratio"] = median(ratios).into();
    bench["ratio_range"] = serde_json::json!([lowest, highest]);
    bench["pairs"] = runs
        .iter()
        .map(|(ours, theirs)| serde_json::json!({"dcl": ours, "pytorch": theirs}))
        .collect();
    Ok(())
}

/// The median (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() % 2 {
        1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The model, and its precision when it is not f32.
fn model_cell(b: &serde_json::Value) -> String {
    let model = b["model"].as_str().unwrap_or("");
    match b["precision"].as_str() {
        Some(p) if p != "f32" => format!("{model} ({p})"),
        _ => model.to_string(),
    }
}

/// The ratio to PyTorch; over several pairs, the median with the pairs' range.
fn ratio_cell(b: &serde_json::Value) -> String {
    let Some(ratio) = b["ratio"].as_f64() else {
        return "-".into();
    };
    match (b["pairs"].as_array(), b["ratio_range"].as_array()) {
        (Some(pairs), Some(range)) if pairs.len() > 1 => format!(
            "{ratio:.2} ({:.2}-{:.2}, {} pairs)",
            range[0].as_f64().unwrap_or(f64::NAN),
            range[1].as_f64().unwrap_or(f64::NAN),
            pairs.len()
        ),
        _ => format!("{ratio:.2}"),
    }
}

fn print_train_bench(b: &serde_json::Value, json: bool) {
    if json {
        println!("{b}");
        return;
    }
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let ms = &b["ms_per_step"];
    println!("| model | batch | device | threads | dcl images/s | PyTorch images/s | ratio | ms/step: data | forward | backward | optimizer | waiting for data | dispatches/step | host reads/step |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        model_cell(b),
        b["batch_size"],
        b["device"].as_str().unwrap_or(""),
        b["threads"],
        f(&b["images_per_sec"]),
        f(&b["pytorch_images_per_sec"]),
        ratio_cell(b),
        f(&ms["data"]),
        f(&ms["forward"]),
        f(&ms["backward"]),
        f(&ms["optimizer"]),
        b["data_wait_share"]
            .as_f64()
            .map_or("-".into(), |s| format!("{:.1}%", 100.0 * s)),
        f(&b["dispatches_per_step"]),
        f(&b["host_reads_per_step"]),
    );
    print_kernel_times(b);
}

/// The slowest kernels of a step, when they were timed (`--kernel-times`).
fn print_kernel_times(b: &serde_json::Value) {
    const SHOWN: usize = 25;
    let Some(kernels) = b["kernels"]
        .as_array()
        .filter(|k| k.first().and_then(|k| k["ms_per_step"].as_f64()) > Some(0.0))
    else {
        return;
    };
    let total: f64 = kernels
        .iter()
        .filter_map(|k| k["ms_per_step"].as_f64())
        .sum();
    println!("\n{total:.1} ms of kernels a step, the slowest {SHOWN}:\n");
    println!("| kernel | launches/step | ms/step | share |\n|---|---|---|---|");
    for k in kernels.iter().take(SHOWN) {
        let ms = k["ms_per_step"].as_f64().unwrap_or(0.0);
        let name = k["kernel"].as_str().unwrap_or("");
        println!(
            "| {} | {:.1} | {ms:.1} | {:.1}% |",
            // CubeCL separates a kernel's type arguments with bars, which would end the cell.
            name.replace(" | ", " ")
                .chars()
                .take(100)
                .collect::<String>(),
            k["launches_per_step"].as_f64().unwrap_or(0.0),
            100.0 * ms / total
        );
    }
}

#[cfg(feature = "wgpu")]
fn bench_loss(
    device: DeviceKind,
    sizes: &[usize],
    d: usize,
    reps: usize,
    pytorch: bool,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        device == DeviceKind::Wgpu,
        "--device {device}: the fused kernel is WGSL; `dcl bench loss` runs on --device wgpu"
    );
    anyhow::ensure!(reps >= 1, "--reps must be at least 1");
    let mut rows: Vec<serde_json::Value> = kernels::run(sizes, d, reps)?
        .iter()
        .map(|r| serde_json::to_value(r).expect("json"))
        .collect();
    if pytorch {
        rows.extend(pytorch_loss_rows(sizes, d, reps)?);
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

/// The PyTorch/lightly CPU figures for the same sizes, from the PyTorch reference script (torch required).
#[cfg(feature = "wgpu")]
fn pytorch_loss_rows(
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
    Ok(serde_json::from_value(run_pytorch(
        "scripts/pytorch_bench_loss.py",
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
