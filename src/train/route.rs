//! The loss route: how a step's embeddings become the loss and the scalar whose gradient trains
//! the encoder. The reference route is Burn's ops on the device, autodiff straight through the
//! loss; the fused route runs the WGSL kernel on Burn's own buffers and hands autodiff the loss'
//! gradient with respect to the embeddings; the gathered one (every peer's embeddings, so that
//! each anchor sees the global batch's negatives) crosses through the host. On a hardware GPU the
//! loss value's copy back starts as soon as the loss is queued, and the step awaits it once the
//! backward pass is queued too: the device works through the backward pass meanwhile, and the
//! host checks the value before it queues the update.

use super::RunConfig;
use crate::backend::{start_read, ScalarRead};
use crate::collective::Collective;
use crate::loss::{ContrastiveLoss, LossAndGrads, LossKernel};
use anyhow::Context;
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

/// A step's loss value: on its way back from the device, or already read (the gathered route's).
pub(super) enum LossValue {
    Device(ScalarRead),
    Host(f64),
}

/// The fused loss kernel on Burn's own wgpu device (`backend::wgpu_context`).
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

/// z1 and z2 of the stacked embeddings [2N, D].
fn views(z: Tensor<2>) -> [Tensor<2>; 2] {
    let [z1, z2]: [Tensor<2>; 2] = z.chunk(2, 0).try_into().expect("two views");
    [z1, z2]
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

    /// The loss of the stacked embeddings `z` ([2N, D], z1's rows then z2's) and the scalar
    /// whose gradient trains the encoder: the loss itself on the reference path; on the fused
    /// and the gathered paths sum(z · g) with the loss' gradient g held constant, which hands
    /// autodiff exactly dL/dz and leaves the encoder's backward to Burn. Peers that each train
    /// on their own batch (`--gather-negatives false`) take the mean of their losses.
    pub(super) async fn objective(
        &mut self,
        z: Tensor<2>,
        group: Option<&Collective>,
    ) -> anyhow::Result<(LossValue, Tensor<1>)> {
        if let Some(group) = group.filter(|_| self.gather_negatives) {
            let (value, objective) = self.objective_through_host(z, Some(group)).await?;
            return Ok((LossValue::Host(value), objective));
        }
        let (value, objective) = match self.kernel {
            LossKernel::Fused => match self.fused_on_device(z.clone())? {
                Some((value, objective)) => (LossValue::Device(start_read(value)), objective),
                None => {
                    let (value, objective) = self.objective_through_host(z, None).await?;
                    (LossValue::Host(value), objective)
                }
            },
            LossKernel::Reference => {
                let [z1, z2] = views(z);
                let loss = self.loss.forward(z1, z2)?;
                (
                    LossValue::Device(start_read(loss.clone().detach().inner())),
                    loss,
                )
            }
        };
        let objective = match group {
            Some(group) => objective.div_scalar(group.world() as f64),
            None => objective,
        };
        Ok((value, objective))
    }

    /// The step's loss on the host: the one read-back of a step on the device paths, awaited
    /// once the backward pass is queued ([`start_read`]). Own-batch peers
    /// ([`LossRoute::objective`]) average theirs; gathered peers hold the global batch's loss
    /// already.
    pub(super) async fn read(
        &mut self,
        value: LossValue,
        group: Option<&Collective>,
    ) -> anyhow::Result<f64> {
        let value = match value {
            LossValue::Host(value) => value,
            LossValue::Device(read) => {
                self.traffic.host_reads += 1;
                read.value().await.context("the step's loss")?
            }
        };
        match group.filter(|_| !self.gather_negatives) {
            Some(group) => {
                let mut values = [value];
                group.sum(&mut values)?;
                Ok(values[0] / group.world() as f64)
            }
            None => Ok(value),
        }
    }

    /// The fused kernel on Burn's buffers: the loss value on the device and sum(z · dL/dz);
    /// None where the embeddings are not on Burn's wgpu storage (a fusion build).
    fn fused_on_device(&mut self, z: Tensor<2>) -> anyhow::Result<Option<(Tensor<1>, Tensor<1>)>> {
        #[cfg(all(
            feature = "cube-kernels",
            not(feature = "fusion"),
            any(feature = "wgpu", feature = "webgpu")
        ))]
        {
            if self.fused.is_none() {
                self.fused = Some(FusedPath::new()?);
            }
            let fused = self.fused.as_ref().expect("made above");
            let inner = z.clone().detach().inner();
            let out =
                crate::gpu::on_burn::loss_on_device(&fused.kernel, &fused.gpu, &self.loss, inner)?;
            if let Some(out) = out {
                self.traffic.dispatches += out.dispatches;
                let objective = (z * Tensor::from_inner(out.grad)).sum();
                return Ok(Some((out.value, objective)));
            }
        }
        let _ = z;
        Ok(None)
    }

    /// The loss over the batch, the whole global one when `gathered` (every peer's embeddings,
    /// by rank), and its exact gradient with respect to this device's rows.
    async fn objective_through_host(
        &mut self,
        z: Tensor<2>,
        gathered: Option<&Collective>,
    ) -> anyhow::Result<(f64, Tensor<1>)> {
        let [z1, z2] = views(z);
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
