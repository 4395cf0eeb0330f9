//! The fused loss kernel on Burn's own storage: the step's embeddings are read where the encoder
//! wrote them and the gradient is written into a Burn tensor, so nothing crosses the host. Burn's
//! wgpu backend and the kernel share one device and one queue (`backend::wgpu_context`); the
//! queue's order is the only synchronization needed once Burn's pending work is submitted.

use super::loss::{grad_shape, FusedLoss, Io};
use super::GpuContext;
use crate::loss::ContrastiveLoss;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::WgpuResource;
use burn::backend::{BackendTensor, DispatchTensor, DispatchTensorKind, Wgpu};
use burn::tensor::Tensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

type Storage = FloatTensor<Wgpu>;

/// The loss of a step and its gradient, on the device.
pub struct DeviceLoss {
    /// The mean over the 2N anchors, [1].
    pub value: Tensor<1>,
    /// dL/dz, [2N, D].
    pub grad: Tensor<2>,
    /// The kernel's dispatches (Burn's own launches are counted by CubeCL).
    pub dispatches: usize,
}

/// The loss of `z` ([2N, D]: z1's rows, then z2's; a tensor of Burn's wgpu device, without
/// autodiff), or None when `z` is not on that device.
pub fn loss_on_device(
    kernel: &FusedLoss,
    gpu: &GpuContext,
    loss: &ContrastiveLoss,
    z: Tensor<2>,
) -> anyhow::Result<Option<DeviceLoss>> {
    let [rows, d] = z.dims();
    let Some(z) = storage(z) else {
        return Ok(None);
    };
    let z = if z.is_contiguous() {
        z
    } else {
        into_contiguous(z)
    };
    let n = rows / 2;
    let empty = |dims: &[usize]| {
        empty_device_contiguous_dtype(z.client.clone(), z.device.clone(), dims.into(), z.dtype)
    };
    let row_loss = empty(&[rows]);
    let grad = empty(&grad_shape(n, d));
    let resource = |t: &Storage| {
        t.client
            .get_resource(t.handle.clone())
            .map_err(|e| anyhow::anyhow!("Burn's storage is unavailable: {e:?}"))
    };
    let (zr, lr, gr) = (resource(&z)?, resource(&row_loss)?, resource(&grad)?);
    fn binding(r: &WgpuResource) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &r.buffer,
            offset: r.offset,
            size: std::num::NonZeroU64::new(r.size),
        }
    }
    let io = Io {
        z: binding(zr.resource()),
        row_loss: binding(lr.resource()),
        grad: binding(gr.resource()),
    };
    // The encoder's kernels that wrote z are still in Burn's command encoder: submit them first.
    z.client
        .flush()
        .map_err(|e| anyhow::anyhow!("the device failed before the loss: {e:?}"))?;
    let (dispatches, _) = kernel.enqueue(gpu, loss, n, d, io)?;
    let value = tensor::<1>(row_loss).mean();
    let grad = tensor::<2>(grad).slice([0..rows, 0..d]);
    Ok(Some(DeviceLoss {
        value,
        grad,
        dispatches,
    }))
}

fn storage<const D: usize>(t: Tensor<D>) -> Option<Storage> {
    match t.into_dispatch().kind {
        DispatchTensorKind::Wgpu(BackendTensor::Float(t)) => Some(t),
        _ => None,
    }
}

fn tensor<const D: usize>(t: Storage) -> Tensor<D> {
    Tensor::from_dispatch(DispatchTensor {
        kind: DispatchTensorKind::Wgpu(BackendTensor::Float(t)),
        checkpointing: None,
    })
}
