//! One parameter tensor's optimizer update (Adam's, SGD with momentum's) as one kernel on the GPU.
//!
//! Burn writes Adam's update as fifteen element-wise tensor ops and SGD's as seven: each is a
//! kernel dispatch on the GPU backends (Burn's page build has no fusion), and a browser's WebGPU
//! pays 25-70 microseconds a dispatch before any arithmetic. Here each update is one CubeCL
//! kernel that reads the weight, its gradient and its state once and writes them once. The
//! arithmetic is Burn's, in Burn's order, so the result equals Burn's optimizers to float
//! rounding (tested below); the CPU device keeps Burn's tensor ops (bit for bit as before).

use burn::tensor::Tensor;

/// The scalars of one Adam step on one tensor (Burn's `Adam`, no AMSGrad): `decay` is the L2
/// penalty added to the gradient; `scale` and `epsilon` carry the bias corrections of step
/// `time`, as Burn folds them.
// Read by the kernels only, which a build with Burn's fusion leaves out.
#[cfg_attr(feature = "fusion", allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub decay: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub scale: f32,
    pub epsilon: f32,
    /// 0 on the first step: the moments start from the gradient alone (Burn's initial state).
    pub history: f32,
}

impl AdamStep {
    /// Burn's bias corrections for step `time` (1 on the first step).
    pub fn new(lr: f64, decay: f32, beta_1: f32, beta_2: f32, epsilon: f32, time: usize) -> Self {
        let time = time as i32;
        let correction_2 = (1.0 - beta_2.powi(time)).sqrt();
        Self {
            lr: lr as f32,
            decay,
            beta_1,
            beta_2,
            scale: correction_2 / (1.0 - beta_1.powi(time)),
            epsilon: epsilon * correction_2,
            history: if time > 1 { 1.0 } else { 0.0 },
        }
    }
}

/// The scalars of one SGD step with momentum on one tensor (Burn's `Sgd` and `Momentum`, not
/// Nesterov's): velocity = gradient * keep + velocity * momentum.
// Read by the kernels only, which a build with Burn's fusion leaves out.
#[cfg_attr(feature = "fusion", allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f32,
    pub decay: f32,
    pub momentum: f32,
    pub keep: f32,
}

impl SgdStep {
    /// Rounded as Burn rounds them. On the first step (`history` false) the velocity starts as
    /// the gradient (Burn's initial state): kept whole, the velocity passed in weighted by zero.
    pub fn new(lr: f64, decay: f32, momentum: f64, dampening: f64, history: bool) -> Self {
        let (keep, momentum) = match history {
            true => ((1.0 - dampening) as f32, momentum as f32),
            false => (1.0, 0.0),
        };
        Self {
            lr: lr as f32,
            decay,
            momentum,
            keep,
        }
    }
}

/// Adam: `(weight, moment_1, moment_2)` after one step. On the first step pass the gradient as
/// both moments (they are then not read: `history` is 0).
pub fn adam<const D: usize>(
    weight: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    step: AdamStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (weight, moment_1, moment_2) = <burn::backend::Dispatch as UpdateBackend>::adam_update(
        weight.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(weight),
        Tensor::from_dispatch(moment_1),
        Tensor::from_dispatch(moment_2),
    )
}

/// SGD with momentum: `(weight, velocity)` after one step. On the first step pass the gradient
/// as the velocity.
pub fn sgd<const D: usize>(
    weight: Tensor<D>,
    grad: Tensor<D>,
    velocity: Tensor<D>,
    step: SgdStep,
) -> (Tensor<D>, Tensor<D>) {
    let (weight, velocity) = <burn::backend::Dispatch as UpdateBackend>::sgd_update(
        weight.into_dispatch(),
        grad.into_dispatch(),
        velocity.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(weight),
        Tensor::from_dispatch(velocity),
    )
}

/// Whether [`adam`] and [`sgd`] run on `weight`: an f32 tensor on a CubeCL GPU device. Others
/// take Burn's optimizers.
pub fn fused<const D: usize>(weight: &Tensor<D>) -> bool {
    crate::backend::has_cube_kernels(&weight.device()) && weight.dtype() == burn::tensor::DType::F32
}

pub use kernels::UpdateBackend;

#[cfg(not(all(feature = "cube-kernels", not(feature = "fusion"))))]
mod kernels {
    use super::{AdamStep, SgdStep};
    use burn::backend::{tensor::FloatTensor, Backend};

    /// Without CubeCL kernels in the build no device takes [`super::fused`]'s path.
    pub trait UpdateBackend: Backend {
        fn adam_update(
            _: FloatTensor<Self>,
            _: FloatTensor<Self>,
            _: FloatTensor<Self>,
            _: FloatTensor<Self>,
            _: AdamStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            unreachable!("no CubeCL kernels in this build")
        }
        fn sgd_update(
            _: FloatTensor<Self>,
            _: FloatTensor<Self>,
            _: FloatTensor<Self>,
            _: SgdStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            unreachable!("no CubeCL kernels in this build")
        }
    }

    impl UpdateBackend for burn::backend::Dispatch {}
}

#[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
mod kernels {
    use super::{AdamStep, SgdStep};
    #[cfg(feature = "cuda")]
    use burn::backend::Cuda;
    #[cfg(any(feature = "wgpu", feature = "webgpu"))]
    use burn::backend::Wgpu;
    use burn::backend::{backend_extension, tensor::FloatTensor, Backend, TensorMetadata};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{CubeBackend, CubeRuntime};
    use cubecl::prelude::*;
    use cubecl::{calculate_cube_count_elemwise, CubeDim};

    #[backend_extension(
        Wgpu: cfg(any(feature = "wgpu", feature = "webgpu")),
        Cuda: cfg(feature = "cuda")
    )]
    pub trait UpdateBackend: Backend {
        fn adam_update(
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            moment_1: FloatTensor<Self>,
            moment_2: FloatTensor<Self>,
            step: AdamStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
        fn sgd_update(
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            velocity: FloatTensor<Self>,
            step: SgdStep,
        ) -> (FloatTensor<Self>, FloatTensor<Self>);
    }

    /// Burn's `Adam::step` for one element: the decayed gradient, both moments, then the
    /// bias-corrected step.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn adam_kernel(
        weight: &Tensor<f32>,
        grad: &Tensor<f32>,
        moment_1: &Tensor<f32>,
        moment_2: &Tensor<f32>,
        new_weight: &mut Tensor<f32>,
        new_moment_1: &mut Tensor<f32>,
        new_moment_2: &mut Tensor<f32>,
        lr: f32,
        decay: f32,
        beta_1: f32,
        beta_2: f32,
        scale: f32,
        epsilon: f32,
        history: f32,
    ) {
        let i = ABSOLUTE_POS;
        if i >= weight.len() {
            terminate!();
        }
        let w = weight[i];
        let g = w * decay + grad[i];
        let m1 = moment_1[i] * (beta_1 * history) + g * (1.0 - beta_1);
        let m2 = moment_2[i] * (beta_2 * history) + g * g * (1.0 - beta_2);
        new_moment_1[i] = m1;
        new_moment_2[i] = m2;
        new_weight[i] = w - m1 * scale / (f32::sqrt(m2) + epsilon) * lr;
    }

    /// Burn's `Sgd::step` with `Momentum` for one element.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    fn sgd_kernel(
        weight: &Tensor<f32>,
        grad: &Tensor<f32>,
        velocity: &Tensor<f32>,
        new_weight: &mut Tensor<f32>,
        new_velocity: &mut Tensor<f32>,
        lr: f32,
        decay: f32,
        momentum: f32,
        keep: f32,
    ) {
        let i = ABSOLUTE_POS;
        if i >= weight.len() {
            terminate!();
        }
        let w = weight[i];
        let g = w * decay + grad[i];
        let v = g * keep + velocity[i] * momentum;
        new_velocity[i] = v;
        new_weight[i] = w - v * lr;
    }

    /// Contiguous copies of the inputs (Burn's tensors almost always are: then no copy) and
    /// `outputs` fresh tensors of the weight's shape.
    fn prepare<R: CubeRuntime, const I: usize>(
        inputs: [CubeTensor<R>; I],
        outputs: usize,
    ) -> ([CubeTensor<R>; I], Vec<CubeTensor<R>>, CubeCount, CubeDim) {
        let inputs = inputs.map(into_contiguous);
        let weight = &inputs[0];
        for other in &inputs[1..] {
            assert_eq!(
                weight.shape(),
                other.shape(),
                "an update's tensors differ in shape"
            );
        }
        let fresh = || {
            let (client, device) = (weight.client.clone(), weight.device.clone());
            empty_device_dtype(client, device, weight.shape(), weight.dtype)
        };
        let outputs = (0..outputs).map(|_| fresh()).collect();
        let elements = weight.shape().num_elements();
        let cube_dim = CubeDim::new(&weight.client, elements);
        let cube_count = calculate_cube_count_elemwise(&weight.client, elements, cube_dim);
        (inputs, outputs, cube_count, cube_dim)
    }

    impl<R: CubeRuntime> UpdateBackend for CubeBackend<R> {
        fn adam_update(
            weight: CubeTensor<R>,
            grad: CubeTensor<R>,
            moment_1: CubeTensor<R>,
            moment_2: CubeTensor<R>,
            step: AdamStep,
        ) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
            let ([weight, grad, moment_1, moment_2], outputs, count, dim) =
                prepare([weight, grad, moment_1, moment_2], 3);
            let [new_weight, new_moment_1, new_moment_2]: [CubeTensor<R>; 3] =
                outputs.try_into().expect("three outputs");
            adam_kernel::launch(
                &weight.client.clone(),
                count,
                dim,
                weight.into_tensor_arg(),
                grad.into_tensor_arg(),
                moment_1.into_tensor_arg(),
                moment_2.into_tensor_arg(),
                new_weight.clone().into_tensor_arg(),
                new_moment_1.clone().into_tensor_arg(),
                new_moment_2.clone().into_tensor_arg(),
                step.lr,
                step.decay,
                step.beta_1,
                step.beta_2,
                step.scale,
                step.epsilon,
                step.history,
            );
            (new_weight, new_moment_1, new_moment_2)
        }

        fn sgd_update(
            weight: CubeTensor<R>,
            grad: CubeTensor<R>,
            velocity: CubeTensor<R>,
            step: SgdStep,
        ) -> (CubeTensor<R>, CubeTensor<R>) {
            let ([weight, grad, velocity], outputs, count, dim) =
                prepare([weight, grad, velocity], 2);
            let [new_weight, new_velocity]: [CubeTensor<R>; 2] =
                outputs.try_into().expect("two outputs");
            sgd_kernel::launch(
                &weight.client.clone(),
                count,
                dim,
                weight.into_tensor_arg(),
                grad.into_tensor_arg(),
                velocity.into_tensor_arg(),
                new_weight.clone().into_tensor_arg(),
                new_velocity.clone().into_tensor_arg(),
                step.lr,
                step.decay,
                step.momentum,
                step.keep,
            );
            (new_weight, new_velocity)
        }
    }
}
