//! Host side of `shaders/dcl_loss.wgsl`: the fused decoupled loss, forward and backward.

use super::GpuContext;
use crate::loss::{ContrastiveLoss, LossAndGrads, LossKind};

const SHADER: &str = include_str!("../../shaders/dcl_loss.wgsl");
/// Invocations per workgroup of the row passes (`WG` in the shader).
const WG: u32 = 64;
/// Rows per workgroup of the two big passes (`ROWS_PER_GROUP`): 8 per invocation.
const ROWS_PER_GROUP: u32 = 512;
/// The widest embedding the kernel is tested for (and the project promises).
pub const MAX_DIM: usize = 512;

/// The five pipelines of the kernel, compiled once and reused for every call.
pub struct FusedLoss {
    layout: wgpu::BindGroupLayout,
    normalize: wgpu::ComputePipeline,
    weights: wgpu::ComputePipeline,
    row_lse: wgpu::ComputePipeline,
    row_grad: wgpu::ComputePipeline,
    finish: wgpu::ComputePipeline,
}

impl FusedLoss {
    pub fn new(gpu: &GpuContext) -> Self {
        // z is read-only; u, norms, pos, w, lse, row_loss and grad are written.
        let program = gpu.program(
            "dcl_loss.wgsl",
            SHADER,
            &[true, false, false, false, false, false, false, false],
        );
        let pipeline = |entry: &str| program.pipeline(gpu, entry, &[]);
        Self {
            normalize: pipeline("normalize"),
            weights: pipeline("weights"),
            row_lse: pipeline("row_lse"),
            row_grad: pipeline("row_grad"),
            finish: pipeline("finish"),
            layout: program.layout,
        }
    }

    /// Loss and gradients of `z1`, `z2` ([n, d], row-major).
    pub async fn compute(
        &self,
        gpu: &GpuContext,
        loss: &ContrastiveLoss,
        z1: &[f32],
        z2: &[f32],
        n: usize,
        d: usize,
    ) -> anyhow::Result<LossAndGrads> {
        anyhow::ensure!(n >= 2, "batch of {n}: contrastive losses need N >= 2");
        anyhow::ensure!(
            z1.len() == n * d && z2.len() == n * d,
            "views of {} and {} values do not match [N={n}, D={d}]",
            z1.len(),
            z2.len()
        );
        anyhow::ensure!(
            (1..=MAX_DIM).contains(&d),
            "D = {d}: the fused kernel takes 1..={MAX_DIM}"
        );
        let rows = 2 * n;
        let kind = match loss.kind {
            LossKind::Dcl => 0u32,
            LossKind::Dclw => 1,
            LossKind::Infonce => 2,
        };
        let mut uniform = Vec::with_capacity(32);
        for v in [n as u32, d as u32, kind, rows as u32] {
            uniform.extend(v.to_le_bytes());
        }
        let d4 = d.div_ceil(4);
        for v in [
            (1.0 / loss.temperature) as f32,
            (1.0 / loss.sigma) as f32,
            1e-12,
        ] {
            uniform.extend(v.to_le_bytes());
        }
        uniform.extend((d4 as u32).to_le_bytes());
        let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.queue.write_buffer(&params, 0, &uniform);
        let matrix = (rows * d * 4) as u64;
        let z = gpu.storage("z", matrix);
        let z_bytes: Vec<u8> = z1.iter().chain(z2).flat_map(|v| v.to_le_bytes()).collect();
        gpu.queue.write_buffer(&z, 0, &z_bytes);
        let padded = (rows * d4 * 16) as u64;
        let u = gpu.storage("u", padded);
        let norms = gpu.storage("norms", rows as u64 * 4);
        let pos = gpu.storage("pos", n as u64 * 4);
        let w = gpu.storage("w", n as u64 * 4);
        let lse = gpu.storage("lse", rows as u64 * 4);
        let row_loss = gpu.storage("row_loss", rows as u64 * 4);
        let padded_rows = (rows as u32).div_ceil(ROWS_PER_GROUP) as usize * ROWS_PER_GROUP as usize;
        let grad = gpu.storage("grad", (padded_rows * d4 * 16) as u64);
        let buffers = [&params, &z, &u, &norms, &pos, &w, &lse, &row_loss, &grad];
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("dcl_loss"),
            layout: &self.layout,
            entries: &entries,
        });
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let mut dispatches = 0;
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_bind_group(0, &bind_group, &[]);
            let row_groups = (rows as u32).div_ceil(WG);
            let tile_groups = (rows as u32).div_ceil(ROWS_PER_GROUP);
            for (pipeline, groups) in [
                (&self.normalize, row_groups),
                (&self.weights, 1),
                (&self.row_lse, tile_groups),
                (&self.row_grad, tile_groups),
                (&self.finish, row_groups),
            ] {
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(groups, 1, 1);
                dispatches += 1;
            }
        }
        gpu.queue.submit([encoder.finish()]);
        let losses = gpu.read(&row_loss, rows).await?;
        let padded_grads = gpu.read(&grad, rows * d4 * 4).await?;
        let host_reads = 2;
        // The buffers above, all alive until the end, and the larger of the two staging buffers
        // the read-backs made (one at a time). O(N·D): no 2N x 2N matrix exists anywhere.
        let staging = 4 * losses.len().max(padded_grads.len()) as u64;
        let device_bytes = buffers.iter().map(|b| b.size()).sum::<u64>() + staging;
        let mut grads: Vec<f32> = if d == d4 * 4 {
            padded_grads
        } else {
            padded_grads
                .chunks_exact(d4 * 4)
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
            host_reads,
            dispatches,
        })
    }
}
