//! Mixed precision (`--precision bf16-mixed`), as PyTorch's bf16 autocast does it: each
//! convolution and linear layer takes bf16 inputs and weights and gives a bf16 output (a GPU's
//! tensor cores accumulate in f32 inside), while batch norm, pooling, the loss, the optimizer and
//! the master weights stay in f32. Gradients flow back through the same casts, so they are bf16
//! where the activations were.
//!
//! On CUDA the layers compute in bf16. On the CPU the same roundings are applied around the f32
//! kernels (operands and result rounded to bf16, the sum in f32): no faster, but numerically what
//! the GPU does, so a CPU run measures the flag's effect on accuracy. WebGPU has no bf16.

use crate::backend::DeviceKind;
use burn::tensor::{FloatDType, Tensor};

/// The arithmetic of the encoder's convolutions and linear layers during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16Mixed,
}

choice!(
    Precision,
    "precision",
    [F32 = "f32" | "fp32", Bf16Mixed = "bf16-mixed" | "bf16"]
);

impl Precision {
    /// Refuses a device that cannot run this precision.
    pub fn check(self, device: DeviceKind) -> anyhow::Result<()> {
        anyhow::ensure!(
            !(self == Self::Bf16Mixed && device == DeviceKind::Wgpu),
            "--precision bf16-mixed: WebGPU's shaders have no bf16 (f32 and f16 only); use \
             --device cuda, or cpu to measure its effect on accuracy"
        );
        Ok(())
    }
}

/// How a forward pass computes its convolutions and linear layers: handed down the encoder by
/// whoever runs it (the trainer, from its step's [`Precision`] and device), never held aside.
/// The casts a lowered layer records carry its backward pass along.
#[derive(Clone, Copy, PartialEq, Debug, Default)]
pub enum Lowering {
    /// f32 throughout.
    #[default]
    None,
    /// The layers compute in bf16 (CUDA).
    Native,
    /// Operands and results rounded to bf16 around f32 kernels (the CPU).
    Rounded,
}

impl Lowering {
    /// `precision`'s lowering on `device`.
    pub fn of(precision: Precision, device: DeviceKind) -> Self {
        match (precision, device) {
            (Precision::F32, _) => Self::None,
            (Precision::Bf16Mixed, DeviceKind::Cuda) => Self::Native,
            (Precision::Bf16Mixed, _) => Self::Rounded,
        }
    }
}

/// `layer(x, weight)` lowered as asked; its output is f32 either way.
pub(super) fn lowered<const D: usize, const E: usize>(
    x: Tensor<D>,
    weight: Tensor<E>,
    lowering: Lowering,
    layer: impl FnOnce(Tensor<D>, Tensor<E>) -> Tensor<D>,
) -> Tensor<D> {
    match lowering {
        Lowering::None => layer(x, weight),
        Lowering::Native => {
            layer(x.cast(FloatDType::BF16), weight.cast(FloatDType::BF16)).cast(FloatDType::F32)
        }
        Lowering::Rounded => round(layer(round(x), round(weight))),
    }
}

/// To the nearest bf16, kept in f32.
fn round<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.cast(FloatDType::BF16).cast(FloatDType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Distribution, TensorData};

    fn device() -> burn::tensor::Device {
        crate::backend::cpu().autodiff()
    }

    /// 1 + 2^-10 is not a bf16 (7 fraction bits): rounded, it is 1. So is its product with 1;
    /// and the gradient reaches the f32 operand.
    #[test]
    fn bf16_mixed_rounds_operands_and_result() {
        let device = device();
        let x =
            Tensor::<2>::from_data(TensorData::new(vec![1.0 + 2f32.powi(-10)], [1, 1]), &device)
                .require_grad();
        let w = Tensor::<2>::from_data(TensorData::new(vec![1.0f32], [1, 1]), &device);
        let product = |x: Tensor<2>, w: Tensor<2>| x.matmul(w);
        let exact = lowered(x.clone(), w.clone(), Lowering::None, product);
        assert_eq!(exact.into_scalar::<f32>(), 1.0 + 2f32.powi(-10));
        let bf16 = Lowering::of(Precision::Bf16Mixed, DeviceKind::Cpu);
        let y = lowered(x.clone(), w.clone(), bf16, product);
        assert_eq!(y.clone().into_scalar::<f32>(), 1.0);
        let grads = y.sum().backward();
        assert_eq!(x.grad(&grads).unwrap().into_scalar::<f32>(), 1.0);
        let f32_again = lowered(x, w, Lowering::of(Precision::F32, DeviceKind::Cpu), product);
        assert_eq!(f32_again.into_scalar::<f32>(), 1.0 + 2f32.powi(-10));
    }

    /// CUDA's lowering (the layer itself in bf16) and the CPU's (roundings around f32) give the
    /// same convolution, here both on the CPU, whose bf16 convolution sums in f32 like a GPU's:
    /// equal values, and input gradients equal to bf16's rounding (the backward's order differs).
    #[test]
    fn computing_in_bf16_equals_rounding_around_f32() {
        let device = device();
        let x = Tensor::<4>::random([2, 3, 6, 6], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.3), &device);
        let conv = |x, w| {
            burn::tensor::module::conv2d(x, w, None, ConvOptions::new([1; 2], [1; 2], [1, 1], 1))
        };
        let values = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        let run = |on: DeviceKind| {
            let x = x.clone().require_grad();
            let lowering = Lowering::of(Precision::Bf16Mixed, on);
            let y = lowered(x.clone(), w.clone(), lowering, conv);
            let grads = (y.clone() * y.clone()).sum().backward();
            (values(y), values(x.grad(&grads).unwrap()))
        };
        let ((native, native_grad), (rounded, rounded_grad)) =
            (run(DeviceKind::Cuda), run(DeviceKind::Cpu));
        let gap = native_grad.iter().zip(&rounded_grad);
        let gap = gap.map(|(a, b)| (a - b).abs() / a.abs().max(1.0));
        let gap = gap.fold(0.0f32, f32::max);
        assert!(gap < 1e-2, "the input gradients differ by {gap}, relative");
        let f32s: Vec<f32> = lowered(x.clone(), w.clone(), Lowering::None, conv)
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(native, rounded);
        let worst = f32s
            .iter()
            .zip(&rounded)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0));
        let worst = worst.fold(0.0f32, f32::max);
        assert!(
            worst > 0.0 && worst < 2e-2,
            "bf16 moves a value by {worst}, relative"
        );
    }

    #[test]
    fn webgpu_is_refused_bf16() {
        let error = Precision::Bf16Mixed.check(DeviceKind::Wgpu).unwrap_err();
        assert!(error.to_string().contains("no bf16"), "{error}");
        Precision::Bf16Mixed.check(DeviceKind::Cuda).unwrap();
        Precision::F32.check(DeviceKind::Wgpu).unwrap();
    }
}
