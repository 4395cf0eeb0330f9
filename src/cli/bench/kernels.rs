//! `dcl bench loss` and `dcl bench infer`: the WGSL kernels against Burn's composed ops on the
//! same wgpu adapter (forward + backward with the memory each needs at its peak; inference).

use crate::gpu::loss::FusedLoss;
use crate::gpu::GpuContext;
use crate::loss::{ContrastiveLoss, LossKind};
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct LossBench {
    pub n: usize,
    pub d: usize,
    pub path: &'static str,
    /// Median of the timed repetitions, forward + backward + gradients read back; `None` when
    /// the path cannot run at this size.
    pub ms: Option<f64>,
    pub peak_bytes: Option<u64>,
    /// Why the path cannot run at this size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs `f` once to warm up (kernel compilation, autotuning), then `reps` times; median ms.
fn time(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut ms = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

/// Burn's composed loss on the wgpu backend: forward, backward, both gradients read back.
fn reference(device: &Device, loss: &ContrastiveLoss, z1: &[f32], z2: &[f32], n: usize, d: usize) {
    let view = |z: &[f32]| {
        Tensor::<2>::from_data(TensorData::new(z.to_vec(), [n, d]), device).require_grad()
    };
    let (a, b) = (view(z1), view(z2));
    let value = loss.forward(a.clone(), b.clone()).expect("valid shapes");
    let grads = value.backward();
    for t in [a, b] {
        let _ = t.grad(&grads).expect("gradient").into_data();
    }
}

/// The table rows for each N at D = `d`, DCL at t = 0.1.
pub fn run(sizes: &[usize], d: usize, reps: usize) -> anyhow::Result<Vec<LossBench>> {
    let gpu = GpuContext::blocking()?;
    let kernel = FusedLoss::new(&gpu);
    let loss = ContrastiveLoss::new(LossKind::Dcl, 0.1, 0.5)?;
    let device = Device::wgpu(DeviceKind::default()).autodiff();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut rows = Vec::new();
    for &n in sizes {
        let mut draw = || {
            (0..n * d)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect::<Vec<_>>()
        };
        let (z1, z2) = (draw(), draw());
        let mut device_bytes = 0;
        let ms = time(reps, || {
            let out = futures_lite::future::block_on(kernel.compute(&gpu, &loss, &z1, &z2, n, d))?;
            device_bytes = out.device_bytes;
            Ok(())
        })?;
        rows.push(LossBench {
            n,
            d,
            path: "fused",
            ms: Some(ms),
            peak_bytes: Some(device_bytes),
            error: None,
        });
        // The composed path materializes 2N x 2N similarities in one buffer: past the adapter's
        // buffer limit it cannot run (lavapipe: 128 MiB, N = 8192 needs 256 MiB).
        let matrix = 4 * (2 * n as u64).pow(2);
        let limit = gpu.device.limits().max_storage_buffer_binding_size;
        if matrix > limit {
            rows.push(LossBench {
                n,
                d,
                path: "reference",
                ms: None,
                peak_bytes: None,
                error: Some(format!(
                    "its 2N x 2N similarity matrix ({} MiB) exceeds the adapter's largest buffer ({} MiB)",
                    matrix >> 20,
                    limit >> 20
                )),
            });
            continue;
        }
        // Burn's pools keep the pages they grew to: after a cleanup, what is reserved once the
        // runs are done is the peak of the composed path.
        device.memory_cleanup();
        let ms = time(reps, || {
            reference(&device, &loss, &z1, &z2, n, d);
            Ok(())
        })?;
        let usage = device
            .memory_pool_usage()
            .ok_or_else(|| anyhow::anyhow!("Burn's wgpu device gave no memory report"))?;
        rows.push(LossBench {
            n,
            d,
            path: "reference",
            ms: Some(ms),
            peak_bytes: Some(usage.bytes_reserved),
            error: None,
        });
    }
    Ok(rows)
}

/// One row of `dcl bench infer`: images/s of an eval-mode forward (features and projections
/// read back) on the wgpu adapter.
#[derive(Debug, Clone, Serialize)]
pub struct InferBench {
    pub path: &'static str,
    pub batch: usize,
    pub images_per_sec: f64,
}

/// The WGSL engine against Burn's eval-mode forward of the same weights on the same adapter.
pub fn infer(
    model: crate::model::ModelName,
    batch: usize,
    reps: usize,
) -> anyhow::Result<Vec<InferBench>> {
    let device = Device::wgpu(DeviceKind::default());
    let encoder = crate::weights::init_encoder(model, 0, &device)?;
    let tensors = crate::weights::torchvision_tensors(&encoder);
    let gpu = GpuContext::blocking()?;
    let engine = crate::gpu::infer::InferenceEngine::new(&gpu, &tensors)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let images: Vec<f32> = (0..batch * crate::data::IMAGE_LEN)
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    let engine_ms = time(reps, || {
        futures_lite::future::block_on(engine.forward(&gpu, &images, [batch, 32, 32], false))
            .map(|_| ())
    })?;
    let burn_ms = time(reps, || {
        let x =
            Tensor::<4>::from_data(TensorData::new(images.clone(), [batch, 3, 32, 32]), &device);
        let features = encoder.backbone.forward(x);
        let _ = encoder.head.forward(features.clone()).into_data();
        let _ = features.into_data();
        Ok(())
    })?;
    let row = |path, ms: f64| InferBench {
        path,
        batch,
        images_per_sec: batch as f64 / (ms / 1e3),
    };
    Ok(vec![row("wgsl-engine", engine_ms), row("burn", burn_ms)])
}
