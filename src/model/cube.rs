//! What the GPU kernels of `model::conv` and `model::norm` share: fresh tensors and an
//! element-wise kernel's launch grid.

use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

/// A fresh tensor of `dims` on `like`'s device, of its type.
pub(super) fn empty<R: CubeRuntime>(like: &CubeTensor<R>, dims: &[usize]) -> CubeTensor<R> {
    let (client, device) = (like.client.clone(), like.device.clone());
    empty_device_dtype(client, device, dims.to_vec().into(), like.dtype)
}

/// The grid of a kernel with one thread per element of `elements`.
pub(super) fn elementwise<R: CubeRuntime>(
    x: &CubeTensor<R>,
    elements: usize,
) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&x.client, elements);
    (calculate_cube_count_elemwise(&x.client, elements, dim), dim)
}
