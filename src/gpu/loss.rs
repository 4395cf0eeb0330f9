//! Host side of `shaders/dcl_loss.wgsl`: the fused decoupled loss, forward and backward.
//!
//! The kernel reads and writes buffers it is handed ([`Io`]): its own, filled from the host and
//! read back ([`FusedLoss::compute`]), or slices of Burn's storage, so that a training step's
//! embeddings and gradient never leave the device ([`FusedLoss::enqueue`]).

use super::GpuContext;
use crate::loss::{ContrastiveLoss, LossAndGrads, LossKind};
use std::sync::Mutex;

const SHADER: &str = include_str!("../../shaders/dcl_loss.wgsl");
/// Invocations per workgroup of the row passes (`WG` in the shader).
const WG: u32 = 64;
/// Rows per workgroup of the two big passes (`ROWS_PER_GROUP`): 8 per invocation.
const ROWS_PER_GROUP: usize = 512;
/// The widest embedding the kernel is tested for (and the project promises).
pub const MAX_DIM: usize = 512;

/// The five pipelines of the kernel, compiled once and reused for every call, and the scratch
/// buffers of the last shape it ran on (a training run's shape never changes).
pub struct FusedLoss {
    layout: wgpu::BindGroupLayout,
    normalize: wgpu::ComputePipeline,
    weights: wgpu::ComputePipeline,
    row_lse: wgpu::ComputePipeline,
    row_grad: wgpu::ComputePipeline,
    finish: wgpu::ComputePipeline,
    scratch: Mutex<Option<Scratch>>,
}

/// Where the kernel reads the views and writes its results, on the kernel's device.
pub struct Io<'a> {
    /// [2N, D] row-major: z1's rows, then z2's.
    pub z: wgpu::BufferBinding<'a>,
    /// [2N]: each anchor's term; the loss is their mean.
    pub row_loss: wgpu::BufferBinding<'a>,
    /// [`grad_shape`]: dL/dz in its first 2N rows and D columns (the rest is the kernel's
    /// padding).
    pub grad: wgpu::BufferBinding<'a>,
}

/// The shape of the gradient buffer for N samples a view of width D: whole workgroups of rows
/// (the last group's idle lanes store without a branch) and whole vec4s of columns.
pub fn grad_shape(n: usize, d: usize) -> [usize; 2] {
    [
        (2 * n).div_ceil(ROWS_PER_GROUP) * ROWS_PER_GROUP,
        d.div_ceil(4) * 4,
    ]
}

/// The kernel's own buffers for one shape: the parameters and the intermediate passes' results.
struct Scratch {
    shape: (usize, usize),
    params: wgpu::Buffer,
    u: wgpu::Buffer,
    norms: wgpu::Buffer,
    pos: wgpu::Buffer,
    w: wgpu::Buffer,
    lse: wgpu::Buffer,
}

impl Scratch {
    fn new(gpu: &GpuContext, n: usize, d: usize) -> Self {
        let rows = 2 * n as u64;
        let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Self {
            shape: (n, d),
            params,
            u: gpu.storage("u", rows * d.div_ceil(4) as u64 * 16),
            norms: gpu.storage("norms", rows * 4),
            pos: gpu.storage("pos", n as u64 * 4),
            w: gpu.storage("w", n as u64 * 4),
            lse: gpu.storage("lse", rows * 4),
        }
    }

    fn bytes(&self) -> u64 {
        [
            &self.params,
            &self.u,
            &self.norms,
            &self.pos,
            &self.w,
            &self.lse,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }
}

/// The kernel's uniform block (`Params` in the shader).
fn params(loss: &ContrastiveLoss, n: usize, d: usize) -> Vec<u8> {
    let kind = match loss.kind {
        LossKind::Dcl => 0u32,
        LossKind::Dclw => 1,
        LossKind::Infonce => 2,
    };
    let mut uniform = Vec::with_capacity(32);
    for v in [n as u32, d as u32, kind, 2 * n as u32] {
        uniform.extend(v.to_le_bytes());
    }
    for v in [
        (1.0 / loss.temperature) as f32,
        (1.0 / loss.sigma) as f32,
        1e-12,
    ] {
        uniform.extend(v.to_le_bytes());
    }
    uniform.extend((d.div_ceil(4) as u32).to_le_bytes());
    uniform
}

/// The shapes the kernel takes.
pub fn check_shape(n: usize, d: usize) -> anyhow::Result<()> {
    anyhow::ensure!(n >= 2, "batch of {n}: contrastive losses need N >= 2");
    anyhow::ensure!(
        (1..=MAX_DIM).contains(&d),
        "D = {d}: the fused kernel takes 1..={MAX_DIM}"
    );
    Ok(())
}

impl FusedLoss {
    pub fn new(gpu: &GpuContext) -> Self {
        // Every storage binding writable, z too (see the shader).
        let program = gpu.program("dcl_loss.wgsl", SHADER, &[false; 8]);
        let pipeline = |entry: &str| program.pipeline(gpu, entry, &[]);
        Self {
            normalize: pipeline("normalize"),
            weights: pipeline("weights"),
            row_lse: pipeline("row_lse"),
            row_grad: pipeline("row_grad"),
            finish: pipeline("finish"),
            layout: program.layout,
            scratch: Mutex::new(None),
        }
    }

    /// Submits the kernel's passes on `gpu`'s queue for views of N samples of width D in `io`,
    /// and returns without waiting (the queue orders them after work submitted before, and
    /// before work submitted after). Returns the number of dispatches, and the bytes of the
    /// kernel's own buffers.
    pub fn enqueue(
        &self,
        gpu: &GpuContext,
        loss: &ContrastiveLoss,
        n: usize,
        d: usize,
        io: Io,
    ) -> anyhow::Result<(usize, u64)> {
        check_shape(n, d)?;
        let mut scratch = self
            .scratch
            .lock()
            .map_err(|_| anyhow::anyhow!("the fused loss' buffers were poisoned by a panic"))?;
        if scratch.as_ref().map(|s| s.shape) != Some((n, d)) {
            *scratch = Some(Scratch::new(gpu, n, d));
        }
        let s = scratch.as_ref().expect("made above");
        gpu.queue.write_buffer(&s.params, 0, &params(loss, n, d));
        fn whole(b: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
            b.as_entire_buffer_binding()
        }
        let bindings = [
            whole(&s.params),
            io.z,
            whole(&s.u),
            whole(&s.norms),
            whole(&s.pos),
            whole(&s.w),
            whole(&s.lse),
            io.row_loss,
            io.grad,
        ];
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .into_iter()
            .zip(0..)
            .map(|(b, binding)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(b),
            })
            .collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("dcl_loss"),
            layout: &self.layout,
            entries: &entries,
        });
        let rows = (2 * n) as u32;
        let row_groups = rows.div_ceil(WG);
        let tile_groups = rows.div_ceil(ROWS_PER_GROUP as u32);
        let passes = [
            (&self.normalize, row_groups),
            (&self.weights, 1),
            (&self.row_lse, tile_groups),
            (&self.row_grad, tile_groups),
            (&self.finish, row_groups),
        ];
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &bind_group, &[]);
            for (pipeline, groups) in passes {
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        gpu.queue.submit([encoder.finish()]);
        Ok((passes.len(), s.bytes()))
    }

    /// Loss and gradients of `z1`, `z2` ([n, d], row-major) from and back to the host.
    pub async fn compute(
        &self,
        gpu: &GpuContext,
        loss: &ContrastiveLoss,
        z1: &[f32],
        z2: &[f32],
        n: usize,
        d: usize,
    ) -> anyhow::Result<LossAndGrads> {
        check_shape(n, d)?;
        anyhow::ensure!(
            z1.len() == n * d && z2.len() == n * d,
            "views of {} and {} values do not match [N={n}, D={d}]",
            z1.len(),
            z2.len()
        );
        let rows = 2 * n;
        let z = gpu.storage("z", (rows * d * 4) as u64);
        let z_bytes: Vec<u8> = z1.iter().chain(z2).flat_map(|v| v.to_le_bytes()).collect();
        gpu.queue.write_buffer(&z, 0, &z_bytes);
        let row_loss = gpu.storage("row_loss", rows as u64 * 4);
        let [grad_rows, width] = grad_shape(n, d);
        let grad = gpu.storage("grad", (grad_rows * width * 4) as u64);
        let io = Io {
            z: z.as_entire_buffer_binding(),
            row_loss: row_loss.as_entire_buffer_binding(),
            grad: grad.as_entire_buffer_binding(),
        };
        let (dispatches, scratch_bytes) = self.enqueue(gpu, loss, n, d, io)?;
        let losses = gpu.read(&row_loss, rows).await?;
        let padded_grads = gpu.read(&grad, rows * width).await?;
        // Every buffer above alive until the end, and the larger of the two staging buffers the
        // read-backs made (one at a time). O(N·D): no 2N x 2N matrix exists anywhere.
        let staging = 4 * losses.len().max(padded_grads.len()) as u64;
        let device_bytes = scratch_bytes + z.size() + row_loss.size() + grad.size() + staging;
        let mut grads: Vec<f32> = if d == width {
            padded_grads
        } else {
            padded_grads
                .chunks_exact(width)
                .flat_map(|row| &row[..d])
                .copied()
                .collect()
        };
        let total: f64 = losses.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
        let grad_z2 = grads.split_off(n * d);
        Ok(LossAndGrads {
            loss: total as f32,
            grad_z1: grads,
            grad_z2,
            device_bytes,
            host_reads: 2,
            dispatches,
        })
    }
}
