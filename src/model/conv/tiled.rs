//! The convolution's matrix products on a software GPU (SwiftShader, which is the page's WebGPU
//! on a machine without a GPU; Mesa's lavapipe natively), as a CubeCL kernel of ours.
//!
//! Without autotune (the page's build) Burn's matmul takes its tiles-in-shared-memory kernel,
//! whose barriers a software GPU runs as switches between coroutines: natively on SwiftShader its
//! autotuner measured that kernel 2.3x slower than its best pick over the step's products, and
//! up to 8x on the weight gradient's (short and wide, reduced over every pixel of the batch). Here
//! a thread keeps an 8 x 8 block of the output in registers, reads both operands by their strides
//! (a transpose is a view, not a copy) and shares nothing: no shared memory, no barrier. A long
//! reduction is split over threads into partial blocks, summed by a second kernel, so the weight
//! gradient's few outputs still fill the machine.

use crate::model::cube::{elementwise, empty};
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
use burn::backend::Wgpu;
use burn::backend::{backend_extension, tensor::FloatTensor, Backend, Dispatch, TensorMetadata};
use burn::tensor::Tensor as BurnTensor;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::*;

/// Rows and columns of the output block a thread keeps: 64 products per step of k from 16 loads
/// (measured on SwiftShader, the products of a step: 4 x 4 blocks 657 ms, 4 x 8 598-615, 8 x 8
/// 457-469, 8 x 16 480-489).
const BLOCK: usize = 8;
const WIDE: usize = 8;
/// Threads a product should have to fill a software GPU (a few cores, each running a workgroup's
/// invocations in SIMD lanes): below this the reduction is split.
const THREADS: usize = 4096;
/// The shortest stretch of the reduction a split takes: partial blocks cost a write and a read.
const MIN_CHUNK: usize = 64;

/// a [M, K] · b [K, N], with both gradients (each is a product of the same kernel).
pub fn matmul(a: BurnTensor<2>, b: BurnTensor<2>) -> BurnTensor<2> {
    BurnTensor::from_dispatch(<Dispatch as TiledBackend>::tiled_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[backend_extension(Wgpu: cfg(any(feature = "wgpu", feature = "webgpu")), Autodiff)]
pub trait TiledBackend: Backend {
    fn tiled_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Split `split` of a [M, K] · b [K, N]: the sum over k in [split chunk, (split + 1) chunk),
/// into out at split M N (out is [M, N] when there is one split). A thread a BLOCK x WIDE block.
#[cube(launch)]
// `div_ceil` is not among the functions CubeCL translates.
#[allow(clippy::manual_div_ceil)]
fn tiled_matmul_kernel(
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    out: &mut Tensor<f32>,
    splits: u32,
    chunk: u32,
) {
    let (m, k, n) = (a.shape(0), a.shape(1), b.shape(1));
    let blocks_n = (n + WIDE - 1) / WIDE;
    let blocks = (m + BLOCK - 1) / BLOCK * blocks_n;
    let thread = ABSOLUTE_POS;
    if thread >= splits as usize * blocks {
        terminate!();
    }
    let split = thread / blocks;
    let (m0, n0) = (thread % blocks / blocks_n * BLOCK, thread % blocks_n * WIDE);
    let start = split * chunk as usize;
    let end = select(start + (chunk as usize) < k, start + chunk as usize, k);
    // Past the edge a block reads the last row or column again (in bounds, no branch in the
    // loop) and stores nothing there.
    let mut rows = Array::<usize>::new(BLOCK);
    let mut columns = Array::<usize>::new(WIDE);
    #[unroll]
    for i in 0..BLOCK {
        rows[i] = select(m0 + i < m, m0 + i, m - 1) * a.stride(0);
    }
    #[unroll]
    for i in 0..WIDE {
        columns[i] = select(n0 + i < n, n0 + i, n - 1) * b.stride(1);
    }
    let mut sums = Array::<f32>::new(BLOCK * WIDE);
    #[unroll]
    for i in 0..BLOCK * WIDE {
        sums[i] = 0.0;
    }
    let (a_step, b_step) = (a.stride(1), b.stride(0));
    let mut lhs = Array::<f32>::new(BLOCK);
    let mut rhs = Array::<f32>::new(WIDE);
    for step in start..end {
        #[unroll]
        for i in 0..BLOCK {
            lhs[i] = a[rows[i] + step * a_step];
        }
        #[unroll]
        for i in 0..WIDE {
            rhs[i] = b[step * b_step + columns[i]];
        }
        #[unroll]
        for i in 0..BLOCK {
            #[unroll]
            for j in 0..WIDE {
                sums[i * WIDE + j] += lhs[i] * rhs[j];
            }
        }
    }
    let base = split * m * n;
    #[unroll]
    for i in 0..BLOCK {
        #[unroll]
        for j in 0..WIDE {
            if m0 + i < m && n0 + j < n {
                out[base + (m0 + i) * n + n0 + j] = sums[i * WIDE + j];
            }
        }
    }
}

/// out[i] = the sum over splits s of partials[s len + i], in split order.
#[cube(launch)]
fn sum_splits_kernel(partials: &Tensor<f32>, out: &mut Tensor<f32>, splits: u32) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let mut sum = 0.0f32;
    for s in 0..splits as usize {
        sum += partials[s * out.len() + i];
    }
    out[i] = sum;
}

/// How many stretches the reduction over `k` is split into, for an output of `blocks` blocks.
fn splits(k: usize, blocks: usize) -> usize {
    THREADS.div_ceil(blocks).min(k.div_ceil(MIN_CHUNK)).max(1)
}

impl<R: CubeRuntime> TiledBackend for CubeBackend<R> {
    fn tiled_matmul(a: CubeTensor<R>, b: CubeTensor<R>) -> CubeTensor<R> {
        let ([m, k], n) = (a.shape().dims::<2>(), b.shape()[1]);
        let blocks = m.div_ceil(BLOCK) * n.div_ceil(WIDE);
        let chunk = k.div_ceil(splits(k, blocks));
        let splits = k.div_ceil(chunk).max(1);
        let out = empty(&a, &[m, n]);
        let partials = match splits {
            1 => out.clone(),
            _ => empty(&a, &[splits * m * n]),
        };
        let client = a.client.clone();
        let (count, dim) = elementwise(&a, splits * blocks);
        tiled_matmul_kernel::launch(
            &client,
            count,
            dim,
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            partials.clone().into_tensor_arg(),
            splits as u32,
            chunk as u32,
        );
        if splits > 1 {
            let (count, dim) = elementwise(&out, m * n);
            sum_splits_kernel::launch(
                &client,
                count,
                dim,
                partials.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                splits as u32,
            );
        }
        out
    }
}

impl<B: TiledBackend, C: CheckpointStrategy> TiledBackend for Autodiff<B, C> {
    fn tiled_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = B::tiled_matmul(a.primitive.clone(), b.primitive.clone());
        match TiledGrad
            .prepare::<C>([a.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[derive(Debug)]
struct TiledGrad;

impl<B: TiledBackend> Backward<B, 2> for TiledGrad {
    type State = (FloatTensor<B>, FloatTensor<B>);

    /// da = dout · b^T and db = a^T · dout, the transposes as views.
    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [a_node, b_node] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let (a, b) = ops.state;
        if let Some(node) = a_node {
            let da = B::tiled_matmul(dout.clone(), B::float_transpose(b));
            grads.register::<B>(node.id, da);
        }
        if let Some(node) = b_node {
            grads.register::<B>(node.id, B::tiled_matmul(B::float_transpose(a), dout));
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor};

    /// Value and both gradients against Burn's matmul on the CPU, on shapes off the 8 x 8 blocks
    /// and on reductions long enough to be split (the weight gradient's shape among them).
    #[test]
    fn equals_burns_matmul_with_gradients() {
        let cpu = crate::backend::cpu().autodiff();
        let gpu = crate::backend::device(crate::backend::DeviceKind::Wgpu).expect("wgpu");
        cpu.seed(3);
        for [m, k, n] in [
            [1, 1, 1],
            [5, 7, 9],
            [16, 27, 1030],
            [16, 4100, 36],
            [3, 700, 2],
        ] {
            let random = |shape| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &cpu);
            let (a, b, r) = (random([m, k]), random([k, n]), random([m, n]));
            let on_gpu = |t: &Tensor<2>| Tensor::<2>::from_data(t.to_data(), &gpu).require_grad();
            let (a_gpu, b_gpu) = (on_gpu(&a), on_gpu(&b));
            let ours = matmul(a_gpu.clone(), b_gpu.clone());
            let grads = (ours.clone() * Tensor::from_data(r.to_data(), &gpu))
                .sum()
                .backward();
            let (a, b) = (a.require_grad(), b.require_grad());
            let burns = a.clone().matmul(b.clone());
            let burns_grads = (burns.clone() * r).sum().backward();
            let close = |ours: Tensor<2>, reference: Tensor<2>, what: &str| {
                let ours = Tensor::<2>::from_data(ours.into_data(), &reference.device());
                let scale = reference.clone().abs().max().into_scalar::<f32>().max(1.0);
                let diff = (ours - reference).abs().max().into_scalar::<f32>();
                assert!(
                    diff < 1e-5 * scale * (k as f32).sqrt(),
                    "{what}, {m}x{k}x{n}: {diff}"
                );
            };
            close(ours, burns, "value");
            close(
                a_gpu.grad(&grads).unwrap(),
                a.grad(&burns_grads).unwrap(),
                "da",
            );
            close(
                b_gpu.grad(&grads).unwrap(),
                b.grad(&burns_grads).unwrap(),
                "db",
            );
        }
    }
}
