//! The loss route: how a step's embeddings become the loss and the scalar whose gradient trains
//! the encoder. The reference route is Burn's ops on the device, autodiff straight through the
//! loss; the fused route (the WGSL kernel) and the gathered one (every peer's embeddings, so
//! that each anchor sees the global batch's negatives) cross through the host and come back as
//! the loss' gradient with respect to the embeddings.

use super::RunConfig;
use crate::collective::Collective;
use crate::loss::{ContrastiveLoss, LossAndGrads, LossKernel};
use burn::tensor::{Device, Tensor, TensorData};

pub(super) struct LossRoute {
    loss: ContrastiveLoss,
    kernel: LossKernel,
    gather_negatives: bool,
    device: Device,
    /// The WGSL kernel and its device, made on the first fused step (making it must be awaited).
    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    fused: Option<FusedPath>,
    pub(super) traffic: Traffic,
}

/// What this trainer's steps have cost in round trips with the device so far, beyond Burn's
/// own kernel launches (which CubeCL's log counts: `dcl bench train`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Copies back to the host that a step waited for.
    pub host_reads: usize,
    /// Compute dispatches made outside Burn (the fused WGSL loss).
    pub dispatches: usize,
}

/// The fused loss kernel on Burn's own wgpu device (`backend::wgpu_context`). The embeddings
/// still cross through the host, a few hundred kilobytes a step: Burn's buffers are not handed
/// to the kernel.
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
struct FusedPath {
    gpu: std::sync::Arc<crate::gpu::GpuContext>,
    kernel: crate::gpu::loss::FusedLoss,
}

#[cfg(any(feature = "wgpu", feature = "webgpu"))]
impl FusedPath {
    fn new() -> anyhow::Result<Self> {
        let gpu = crate::backend::wgpu_context().ok_or_else(|| {
            anyhow::anyhow!(
                "the fused loss kernel runs on the wgpu device that backend::device makes"
            )
        })?;
        let kernel = crate::gpu::loss::FusedLoss::new(&gpu);
        Ok(Self { gpu, kernel })
    }
}

impl LossRoute {
    /// `config`'s loss, computed for embeddings on `device`.
    pub(super) fn new(config: &RunConfig, device: Device) -> anyhow::Result<Self> {
        Ok(Self {
            loss: ContrastiveLoss::new(config.loss, config.temperature, config.sigma)?,
            kernel: config.loss_kernel,
            gather_negatives: config.gather_negatives,
            device,
            #[cfg(any(feature = "wgpu", feature = "webgpu"))]
            fused: None,
            traffic: Traffic::default(),
        })
    }

    /// The loss value and the scalar whose gradient trains the encoder: the loss itself on the
    /// reference path; on the fused and the gathered paths sum(z1·g1 + z2·g2) with the loss'
    /// gradients g held constant, which hands autodiff exactly dL/dz and leaves the encoder's
    /// backward to Burn.
    pub(super) async fn objective(
        &mut self,
        z1: Tensor<2>,
        z2: Tensor<2>,
        group: Option<&Collective>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        let gathered = group.filter(|_| self.gather_negatives);
        if self.kernel == LossKernel::Fused || gathered.is_some() {
            return self.objective_through_host(z1, z2, gathered).await;
        }
        let loss = self.loss.forward(z1, z2)?;
        self.traffic.host_reads += 1;
        let value =
            loss.clone().into_scalar_async::<f64>().await.map_err(|e| {
                anyhow::anyhow!("the device failed while reading the loss back: {e:?}")
            })?;
        match group {
            // Each peer's own batch (`--gather-negatives false`): the run's loss is the mean
            // of the peers' losses, and so is the objective once the gradients are summed.
            Some(group) => {
                let mut values = [value];
                group.sum(&mut values)?;
                let world = group.world() as f64;
                Ok((values[0] / world, loss.div_scalar(world)))
            }
            None => Ok((value, loss)),
        }
    }

    /// The loss over the batch, the whole global one when `gathered` (every peer's embeddings,
    /// by rank), and its exact gradient with respect to this device's rows.
    async fn objective_through_host(
        &mut self,
        z1: Tensor<2>,
        z2: Tensor<2>,
        gathered: Option<&Collective>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        let [n, d] = z1.dims();
        let mut a = crate::backend::read_f32(z1.clone().detach()).await?;
        let mut b = crate::backend::read_f32(z2.clone().detach()).await?;
        self.traffic.host_reads += 2;
        let mut first = 0;
        if let Some(group) = gathered {
            let mine = a.iter().chain(&b).map(|&v| v as f64).collect();
            let parts = group.all_gather(mine)?;
            let view = |part: &[f64]| part.iter().map(|&v| v as f32).collect::<Vec<_>>();
            a = parts.iter().flat_map(|p| view(&p[..n * d])).collect();
            b = parts.iter().flat_map(|p| view(&p[n * d..])).collect();
            first = group.rank() * n;
        }
        let out = self.loss_and_grads(&a, &b, a.len() / d, d).await?;
        self.traffic.host_reads += out.host_reads;
        self.traffic.dispatches += out.dispatches;
        let own = |g: Vec<f32>| {
            let rows = g[first * d..(first + n) * d].to_vec();
            Tensor::<2>::from_data(TensorData::new(rows, [n, d]), &self.device)
        };
        let objective = (z1 * own(out.grad_z1)).sum() + (z2 * own(out.grad_z2)).sum();
        Ok((out.loss as f64, objective))
    }

    /// The loss of embeddings `a`, `b` ([n, d]) and its gradients: the fused kernel, or Burn's
    /// ops on leaves of the step's device.
    async fn loss_and_grads(
        &mut self,
        a: &[f32],
        b: &[f32],
        n: usize,
        d: usize,
    ) -> anyhow::Result<LossAndGrads> {
        // Without the wgpu feature, `RunConfig::validate` has refused the fused kernel.
        #[cfg(any(feature = "wgpu", feature = "webgpu"))]
        if self.kernel == LossKernel::Fused {
            return self.fused_loss_and_grads(a, b, n, d).await;
        }
        let leaf = |v: &[f32]| {
            Tensor::<2>::from_data(TensorData::new(v.to_vec(), [n, d]), &self.device).require_grad()
        };
        let (za, zb) = (leaf(a), leaf(b));
        let loss = self.loss.forward(za.clone(), zb.clone())?;
        let value = crate::backend::read_f32(loss.clone().detach()).await?;
        let grads = loss.backward();
        let grad = |z: Tensor<2>| z.grad(&grads).expect("a leaf of the loss");
        Ok(LossAndGrads {
            loss: value[0],
            grad_z1: crate::backend::read_f32(grad(za)).await?,
            grad_z2: crate::backend::read_f32(grad(zb)).await?,
            device_bytes: 0,
            host_reads: 3,
            dispatches: 0,
        })
    }

    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    async fn fused_loss_and_grads(
        &mut self,
        a: &[f32],
        b: &[f32],
        n: usize,
        d: usize,
    ) -> anyhow::Result<LossAndGrads> {
        if self.fused.is_none() {
            self.fused = Some(FusedPath::new()?);
        }
        let fused = self.fused.as_ref().expect("made above");
        fused
            .kernel
            .compute(&fused.gpu, &self.loss, a, b, n, d)
            .await
    }
}
