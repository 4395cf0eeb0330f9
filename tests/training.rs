//! Training end to end: real Fashion-MNIST learns, devices agree, kill -9 and resume is exact,
//! a non-finite loss stops the run without touching the weights.

use crate::common::*;
use dcl::backend::DeviceKind;
use dcl::data::{discover, Split, IMAGE_LEN};
use dcl::model::ModelName;
use dcl::optim::OptimizerKind;
use dcl::train::{RunConfig, TrainError, Trainer};
use dcl::weights::{encoder_from_tensors, torchvision_tensors};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub fn config(batch_size: usize, epochs: usize) -> RunConfig {
    RunConfig {
        data: "synthetic".into(),
        temperature: 0.2,
        batch_size,
        epochs,
        lr: 0.003,
        optimizer: OptimizerKind::Adam,
        weight_decay: 1e-6,
        seed: 3,
        ..RunConfig::default()
    }
}

fn events(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn knn(events: &[Value]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter(|e| e["event"] == "evaluation")
        .map(|e| {
            (
                e["epoch"].as_u64().unwrap(),
                e["knn_top1"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn step_losses(events: &[Value]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter(|e| e["event"] == "step")
        .map(|e| (e["step"].as_u64().unwrap(), e["loss"].as_f64().unwrap()))
        .collect()
}

/// The short CPU run of the core issue: resnet-mini, DCL, 5,000 real Fashion-MNIST images, 3
/// epochs at batch 32, Adam 1e-3, then `dcl eval --bank 5000` (the 10,000 test images as queries)
/// for the encoder beside its untrained self (same seed) and raw pixels. The run is deterministic.
/// Measured over seeds 1-5 (this exact command, `--seed 1..5`; `results/ci-seeds/run.sh`
/// then `eval.sh`, commit a52a9f3's binary; the reports are beside them), gains over the untrained encoder:
///
/// | seed | kNN k=200 | kNN k=20 | linear probe |
/// |---|---|---|---|
/// | 1 | +2.71 | -0.23 | +0.10 |
/// | 2 | +4.71 | +1.07 | +2.07 |
/// | 3 | +5.81 | +2.91 | +3.13 |
/// | 4 | +4.56 | +0.37 | +0.34 |
/// | 5 | +2.22 | -0.28 | +1.18 |
///
/// So the bars: kNN k=200 at least +1.5 (the lowest seed's +2.2 less a margin); the linear probe
/// (`eval::probe`, L-BFGS with a held-out penalty) gains on every seed but by only 10 test images
/// on seed 1, so it is asserted not to lose a point, which a collapsed or broken encoder would;
/// k=20 is not asserted (two seeds of five lose). Raw pixels beat every seed at this length
/// (k=200 0.740, k=20 0.797, linear 0.822 against 0.68-0.70, 0.74-0.76, 0.78-0.80).
#[test]
fn fashion_mnist_short_run_beats_the_untrained_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(dcl_bin())
        .args([
            "pretrain",
            "--data",
            FASHION_MNIST,
            "--model",
            "resnet-mini",
            "--loss",
            "dcl",
        ])
        .args([
            "--limit",
            "5000",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ])
        .args([
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--weight-decay",
            "1e-6",
        ])
        .args(["--temperature", "0.1", "--crop-min-scale", "0.2"])
        .args(["--seed", "1", "--out", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&run);
    let knn = knn(&ev);
    assert_eq!(
        knn.iter().map(|k| k.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let (before, after) = (knn[0].1, knn[3].1);
    eprintln!("Fashion-MNIST kNN top-1 by epoch: {knn:?}");
    // Random 10-class guessing is 0.1; an untrained ResNet already separates some classes.
    assert!(before > 0.3 && before < 0.85, "untrained kNN {before}");
    let losses = step_losses(&ev);
    assert_eq!(losses.len(), 3 * (5000 / 32));
    assert!(losses.iter().all(|l| l.1.is_finite()));
    let mean = |s: &[(u64, f64)]| s.iter().map(|l| l.1).sum::<f64>() / s.len() as f64;
    assert!(
        mean(&losses[losses.len() - 20..]) < mean(&losses[..20]),
        "loss went down"
    );
    for f in ["config.toml", "model.safetensors", "checkpoints/latest"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    // `dcl eval` reads the run back and agrees with the last monitor value (k=200 over the same
    // 5,000-image bank), and gives the encoder's scores beside its two baselines.
    let report: Value =
        serde_json::from_slice(&dcl_eval(&run, &["--bank", "5000"]).stdout).unwrap();
    assert!((report["knn_top1"].as_f64().unwrap() - after).abs() < 1e-9);
    eprintln!("dcl eval --bank 5000: {report}");
    let score = |who: &str, what: &[&str]| {
        let value = what.iter().fold(&report[who], |v, key| &v[key]);
        let value = value.as_f64().unwrap_or(f64::NAN);
        assert!(value > 0.1 && value <= 1.0, "{who} {what:?}: {report}");
        value
    };
    for who in ["encoder", "untrained", "pixels"] {
        score(who, &["knn", "20"]);
    }
    let gain = |what: &[&str]| score("encoder", what) - score("untrained", what);
    assert!(
        gain(&["knn", "200"]) >= 0.015,
        "kNN k=200 gained {:+.4} over the untrained encoder (seeds 1-5: +0.022 to +0.058)",
        gain(&["knn", "200"])
    );
    assert!(
        gain(&["linear"]) > -0.01,
        "the linear probe gained {:+.4} over the untrained encoder (seeds 1-5: +0.001 to +0.031)",
        gain(&["linear"])
    );
}

fn synthetic_split(n: usize) -> Split {
    let images = (0..n * IMAGE_LEN)
        .map(|i| ((i * 31 + i / 977) % 256) as u8)
        .collect();
    Split {
        images,
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
    }
}

/// The autodiff CPU device the trainers here run on.
fn cpu() -> burn::tensor::Device {
    dcl::backend::cpu().autodiff()
}

#[cfg(feature = "wgpu")]
fn wgpu() -> burn::tensor::Device {
    dcl::backend::device(DeviceKind::Wgpu)
        .expect("wgpu needs a Vulkan adapter: apt install mesa-vulkan-drivers (lavapipe)")
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_first_step_matches_cpu() {
    let cfg = config(16, 1);
    let mut cpu = Trainer::new(cfg.clone(), synthetic_split(32), cpu()).unwrap();
    let mut gpu = Trainer::new(cfg, synthetic_split(32), wgpu()).unwrap();
    let (a, b) = (cpu.step().unwrap().loss, gpu.step().unwrap().loss);
    assert!(
        (a - b).abs() / a.abs() < 1e-3,
        "first-step loss cpu {a} vs wgpu {b}"
    );
    let (a, b) = (cpu.step().unwrap().loss, gpu.step().unwrap().loss);
    assert!(
        (a - b).abs() / a.abs() < 1e-2,
        "second-step loss cpu {a} vs wgpu {b}"
    );
}

/// Both views in one encoder pass (each with its own batch statistics) equal a pass per view,
/// on every device built in: the embeddings, and the gradient of every weight through both.
#[test]
fn one_pass_over_both_views_equals_a_pass_per_view() {
    use burn::tensor::{Tensor, TensorData};
    use dcl::weights::init_encoder;
    // Inputs from a formula, weights from `init_encoder`: a device's own generator is shared
    // with the tests running beside this one.
    let values = |shape: [usize; 4], phase: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|i| (i as f32 * 0.37 + phase).sin() * (1.0 + phase))
            .collect();
        TensorData::new(v, shape)
    };
    #[allow(unused_mut)]
    let mut devices = vec![cpu()];
    #[cfg(feature = "wgpu")]
    devices.push(wgpu());
    for device in devices {
        let encoder = init_encoder(ModelName::ResNetMini, 5, &device).unwrap();
        let view = |phase| Tensor::<4>::from_data(values([6, 3, 32, 32], phase), &device);
        let (x1, x2) = (view(0.0), view(0.5));
        // Weighted sums, so that every embedding's gradient differs.
        let weights =
            Tensor::<4>::from_data(values([1, 1, 6, 128], 1.0), &device).reshape([6, 128]);
        let objective =
            |z1: Tensor<2>, z2: Tensor<2>| (z1 * weights.clone() - z2 * weights.clone()).sum();
        let [a1, a2] = encoder.clone().forward_views([x1.clone(), x2.clone()]);
        let (b1, b2) = (encoder.forward(x1), encoder.forward(x2));
        for (a, b) in [(&a1, &b1), (&a2, &b2)] {
            let diff = (a.clone() - b.clone()).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-4, "{device:?}: embeddings differ by {diff}");
        }
        let grads_one = objective(a1, a2).backward();
        let grads_two = objective(b1, b2).backward();
        let conv = &encoder.backbone.layers[0][0].conv1.weight;
        let (g1, g2) = (
            conv.grad(&grads_one).unwrap(),
            conv.grad(&grads_two).unwrap(),
        );
        let scale = g2.clone().abs().max().into_scalar::<f32>();
        let diff = (g1 - g2).abs().max().into_scalar::<f32>();
        assert!(
            diff <= 1e-4 * scale,
            "{device:?}: conv1 gradients differ by {diff} (max {scale})"
        );
    }
}

/// The fused WGSL loss, run on Burn's own buffers, trains the encoder as Burn's composed loss
/// does: for 20 steps on the wgpu device, the fused path starts each step from the reference run's weights and optimizer state
/// and must report the same loss and land on the same weights. (Comparing two free-running
/// trajectories instead measures chaos: float32 rounding differences of 1e-7 grow about tenfold a
/// step in this small-batch regime, on either path.)
#[cfg(feature = "wgpu")]
#[test]
fn fused_loss_kernel_trains_like_the_reference_for_20_steps() {
    use dcl::loss::LossKernel;
    // One batch of real images per epoch, so every step starts at an epoch boundary, where a
    // trainer can be snapshot and restored.
    let images = dcl::data::discover::load(FASHION_MNIST)
        .unwrap()
        .train
        .head(8);
    let make = |kernel| {
        let mut cfg = config(8, 20);
        cfg.loss_kernel = kernel;
        cfg.device = DeviceKind::Wgpu;
        cfg.optimizer = OptimizerKind::Sgd;
        cfg.lr = 0.05;
        cfg.temperature = 0.5;
        Trainer::new(cfg, images.clone(), wgpu()).unwrap()
    };
    let (mut reference, mut fused) = (make(LossKernel::Reference), make(LossKernel::Fused));
    let weights = |t: &Trainer| -> Vec<f32> {
        dcl::weights::torchvision_tensors(t.encoder())
            .into_iter()
            .flat_map(|t| t.data)
            .collect()
    };
    let mut losses = vec![];
    for epoch in 0..20 {
        let (w, o) = reference.snapshot().unwrap();
        fused.restore(epoch, w, o).unwrap();
        let (a, b) = (fused.step().unwrap().loss, reference.step().unwrap().loss);
        assert!(
            (a - b).abs() / b.abs() < 1e-5,
            "step {epoch}: fused {a} vs reference {b}"
        );
        let (wa, wb) = (weights(&fused), weights(&reference));
        let scale = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = wa
            .iter()
            .zip(&wb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff / scale < 1e-5,
            "step {epoch}: weights differ by {diff} (of {scale})"
        );
        losses.push(b);
        fused.end_epoch();
        reference.end_epoch();
    }
    eprintln!("losses {losses:?}");
    // The embeddings and the gradient stayed on the device: the loss value is a step's one
    // read-back, and the kernel's five passes its only dispatches beside Burn's.
    let traffic = fused.traffic();
    assert_eq!((traffic.host_reads, traffic.dispatches), (20, 5 * 20));
    assert!(
        losses[19] < losses[0],
        "20 steps on one batch lower its loss: {losses:?}"
    );
}

#[test]
fn non_finite_loss_stops_without_touching_the_weights() {
    let mut trainer = Trainer::new(config(8, 1), synthetic_split(64), cpu()).unwrap();
    trainer.step().unwrap();
    // Sabotage: a NaN in the projection head's last bias (one inside the network would not do:
    // ReLU maps NaN to 0) reaches every embedding, so the loss.
    let mut tensors = torchvision_tensors(trainer.encoder());
    tensors
        .iter_mut()
        .find(|t| t.name == "head.3.bias")
        .unwrap()
        .data[0] = f32::NAN;
    let poisoned = encoder_from_tensors(ModelName::ResNetMini, tensors, &cpu()).unwrap();
    trainer.load_encoder(poisoned).unwrap();
    // Trainable weights only: batch-norm running statistics do see the failing forward pass.
    // Compared bit for bit: the sabotaged weight is a NaN.
    let weights = |t: &Trainer| -> Vec<(String, Vec<u32>)> {
        torchvision_tensors(t.encoder())
            .into_iter()
            .filter(|t| !t.name.contains("running_"))
            .map(|t| (t.name, t.data.iter().map(|v| v.to_bits()).collect()))
            .collect()
    };
    let before = weights(&trainer);
    let err = trainer.step().unwrap_err();
    match err.downcast_ref::<TrainError>() {
        Some(TrainError::NonFiniteLoss {
            epoch: 0,
            step: 1,
            loss,
        }) => assert!(!loss.is_finite()),
        other => panic!("expected a non-finite loss error, got {other:?} ({err})"),
    }
    assert!(err.to_string().contains("training stopped"), "{err}");
    assert!(
        weights(&trainer) == before,
        "the failed step changed the weights"
    );
}

fn pretrain(data: &Path, run: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(dcl_bin());
    cmd.args([
        "pretrain",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ])
    .args([
        "--epochs",
        "4",
        "--batch-size",
        "32",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
    ])
    .args(["--warmup-epochs", "1", "--seed", "7"]);
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

#[test]
fn kill_9_then_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar10(tmp.path(), 2, 160, 40);
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    let out = pretrain(&data, &whole, false).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = pretrain(&data, &killed, false)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the third epoch's first step is logged: after the epoch-2 checkpoint, mid-epoch.
    // A kill may cut the last line short: read only whole events.
    let logged_steps = || -> Vec<Value> {
        std::fs::read_to_string(killed.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == "step")
            .collect()
    };
    let third_epoch_started = || logged_steps().iter().any(|e| e["epoch"] == 2);
    let deadline = Instant::now() + Duration::from_secs(600);
    while !third_epoch_started() {
        assert!(
            Instant::now() < deadline,
            "the third epoch did not start in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let latest = std::fs::read_to_string(killed.join("checkpoints/latest")).unwrap();
    let logged = logged_steps().len();
    assert!(
        latest == "epoch-0002" && logged > 20 && logged < 30,
        "the kill did not land inside the third epoch: latest {latest}, {logged} steps logged"
    );
    let out = pretrain(&data, &killed, true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));

    let (a, b) = (events(&whole), events(&killed));
    let (la, lb) = (step_losses(&a), step_losses(&b));
    assert_eq!(la.len(), 4 * 10);
    assert_eq!(
        la.iter().map(|l| l.0).collect::<Vec<_>>(),
        lb.iter().map(|l| l.0).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {s}: {x} vs {y}");
    }
    let (ka, kb) = (knn(&a), knn(&b));
    assert_eq!(ka.len(), 5);
    for (x, y) in ka.iter().zip(&kb) {
        assert_eq!(x.0, y.0);
        assert!(
            (x.1 - y.1).abs() < 0.01,
            "kNN at epoch {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
    // Nothing half-written is left behind, and the final model loads.
    let leftovers: Vec<_> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let ds = discover::load(data.to_str().unwrap()).unwrap();
    assert_eq!(ds.train.len(), 320);
    dcl_eval(&killed, &["--no-linear"]);
}

/// `dcl eval --run RUN`, which must succeed.
fn dcl_eval(run: &Path, extra: &[&str]) -> std::process::Output {
    let out = Command::new(dcl_bin())
        .args(["eval", "--run", run.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
