//! The fused WGSL loss kernel against the Burn reference, on lavapipe (or any wgpu adapter).

use burn::tensor::{Tensor, TensorData};
use dcl::gpu::{loss::FusedLoss, GpuContext};
use dcl::loss::{ContrastiveLoss, LossKind};
use rand::Rng;

fn reference(
    loss: &ContrastiveLoss,
    z1: &[f32],
    z2: &[f32],
    n: usize,
    d: usize,
) -> (f32, Vec<f32>, Vec<f32>) {
    let device = dcl::backend::cpu().autodiff();
    let t = |z: &[f32]| {
        Tensor::<2>::from_data(TensorData::new(z.to_vec(), [n, d]), &device).require_grad()
    };
    let (a, b) = (t(z1), t(z2));
    let l = loss.forward(a.clone(), b.clone()).unwrap();
    let value: f32 = l.clone().into_scalar();
    let grads = l.backward();
    let g = |x: Tensor<2>| {
        x.grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    (value, g(a), g(b))
}

/// Largest error relative to the largest reference element, or to `floor` when that is larger.
fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(floor);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn fused_kernel_equals_the_burn_reference() {
    let gpu =
        GpuContext::blocking().expect("a wgpu adapter (lavapipe: apt install mesa-vulkan-drivers)");
    let kernel = FusedLoss::new(&gpu);
    let mut rng = crate::common::test_rng("fused_kernel_equals_the_burn_reference");
    for n in [2, 3, 64, 257, 1024] {
        for d in [1, 16, 128] {
            for kind in [LossKind::Dcl, LossKind::Dclw, LossKind::Infonce] {
                let t = rng.gen_range(0.1..0.5);
                let loss = ContrastiveLoss::new(kind, t, 0.5).unwrap();
                let mut draw = || {
                    (0..n * d)
                        .map(|_| rng.gen_range(0.5f32..1.5) * if rng.gen() { 1.0 } else { -1.0 })
                        .collect::<Vec<f32>>()
                };
                let (z1, z2) = (draw(), draw());
                // At D = 1 the exact gradient is zero (a 1-d unit vector cannot turn): both sides
                // hold rounding noise only, judged against the scale of the loss's gradient, 1/t.
                let floor = if d == 1 { (1.0 / t) as f32 } else { 0.0 };
                let fused =
                    futures_lite::future::block_on(kernel.compute(&gpu, &loss, &z1, &z2, n, d))
                        .unwrap();
                let (value, g1, g2) = reference(&loss, &z1, &z2, n, d);
                let what = format!("{kind} n={n} d={d} t={t:.3}");
                // The loss is a difference of logits of size 1/t: a loss near 0 (InfoNCE, N = 2,
                // D = 1, positive aligned, negatives opposite) carries float32 error of 1/t's size.
                let scale = value.abs().max(if d == 1 { (1.0 / t) as f32 } else { 0.0 });
                assert!(
                    (fused.loss - value).abs() <= 1e-4 * scale,
                    "{what}: {} vs {value}",
                    fused.loss
                );
                assert!(
                    max_rel(&fused.grad_z1, &g1, floor) <= 1e-4,
                    "{what}: grad z1 off by {}",
                    max_rel(&fused.grad_z1, &g1, floor)
                );
                assert!(
                    max_rel(&fused.grad_z2, &g2, floor) <= 1e-4,
                    "{what}: grad z2 off by {}",
                    max_rel(&fused.grad_z2, &g2, floor)
                );
            }
        }
    }
}

#[test]
fn fused_kernel_rejects_bad_shapes() {
    let gpu = GpuContext::blocking().unwrap();
    let kernel = FusedLoss::new(&gpu);
    let loss = ContrastiveLoss::new(LossKind::Dcl, 0.1, 0.5).unwrap();
    let run = |z1: &[f32], z2: &[f32], n, d| {
        futures_lite::future::block_on(kernel.compute(&gpu, &loss, z1, z2, n, d))
    };
    assert!(run(&[1.0; 3], &[1.0; 3], 1, 3)
        .unwrap_err()
        .to_string()
        .contains("N >= 2"));
    assert!(run(&[1.0; 6], &[1.0; 4], 2, 3)
        .unwrap_err()
        .to_string()
        .contains("do not match"));
    assert!(run(&vec![1.0; 2 * 600], &vec![1.0; 2 * 600], 2, 600).is_err());
}

/// The kernel run on Burn's own buffers (how a training step runs it: the embeddings read where
/// the encoder wrote them, the gradient written into a Burn tensor) gives the host path's numbers,
/// with Burn's work queued before and after it.
#[test]
fn fused_kernel_on_burn_buffers_equals_the_host_path() {
    use dcl::backend::{device, wgpu_context, DeviceKind};
    use dcl::gpu::on_burn::loss_on_device;
    let device = device(DeviceKind::Wgpu).expect("a wgpu adapter").inner();
    let gpu = wgpu_context().expect("set up with the device");
    let kernel = FusedLoss::new(&gpu);
    let mut rng = crate::common::test_rng("fused_kernel_on_burn_buffers_equals_the_host_path");
    for (n, d) in [(8, 128), (3, 5), (300, 16)] {
        for kind in [LossKind::Dcl, LossKind::Dclw] {
            let loss = ContrastiveLoss::new(kind, 0.2, 0.5).unwrap();
            let z: Vec<f32> = (0..2 * n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let host = futures_lite::future::block_on(kernel.compute(
                &gpu,
                &loss,
                &z[..n * d],
                &z[n * d..],
                n,
                d,
            ))
            .unwrap();
            // z made by a Burn op (queued, not yet submitted when the kernel is called).
            let z = Tensor::<2>::from_data(TensorData::new(z, [2 * n, d]), &device).mul_scalar(1.0);
            let out = loss_on_device(&kernel, &gpu, &loss, z).unwrap().unwrap();
            let grad = out
                .grad
                .mul_scalar(1.0)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let value: f32 = out.value.into_scalar();
            let what = format!("{kind} n={n} d={d}");
            assert!(
                (value - host.loss).abs() <= 1e-5 * host.loss.abs(),
                "{what}: {value} vs {}",
                host.loss
            );
            let expected: Vec<f32> = host.grad_z1.iter().chain(&host.grad_z2).copied().collect();
            assert!(
                max_rel(&grad, &expected, 0.0) <= 1e-6,
                "{what}: gradient off by {}",
                max_rel(&grad, &expected, 0.0)
            );
        }
    }
}
