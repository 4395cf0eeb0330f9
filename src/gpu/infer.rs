//! Host side of `shaders/resnet_infer.wgsl`: a ResNet encoder (CIFAR stem, BasicBlocks, SimCLR
//! projection head) in eval mode, BatchNorm folded into the weights at load time.
//!
//! Pipelines and weights are created once. Per input shape (chunk size, height, width) a plan
//! holds the activation buffers, the per-layer uniform buffers and the bind groups; plans are
//! kept for reuse.
//!
//! Over 500 lines on purpose: it is the host side of one shader, and its layers, plans and
//! dispatch order only make sense read together.

use super::folding::{Checked, Folded};
use super::GpuContext;
use crate::arch::{names, ResNetArch, PROJECTION_DIM};
use crate::safetensors::NamedTensor;
use std::collections::HashMap;
use std::sync::Mutex;
use wgpu::util::DeviceExt;

const SHADER: &str = include_str!("../../shaders/resnet_infer.wgsl");
/// Output (channels, pixels) one conv workgroup computes, in the shader's two shapes.
const WIDE_TILE: [u32; 2] = [64, 64];
const NARROW_TILE: [u32; 2] = [16, 256];
/// Layers up to this many channels use the narrow tile: a wide one would compute mostly
/// padding (measured on llvmpipe: narrow wins at 16 and 32 channels).
const NARROW_MAX_CHANNELS: u32 = 32;
/// Invocations per workgroup of the one-dimensional kernels.
const GROUP: u32 = 64;
/// Images per submission at most: bounds device memory (resnet18 at 32x32: 4 activation
/// buffers of 32 MiB) whatever batch the caller passes.
const MAX_CHUNK: usize = 128;
/// Plans (input shapes) kept at once; a full cache is emptied rather than grown.
const MAX_PLANS: usize = 4;
/// Activation buffers a block needs at once: input, conv1 output, downsample output, output.
const ACTIVATION_BUFFERS: usize = 4;
const FLAG_RELU: u32 = 1;
const FLAG_RESIDUAL: u32 = 2;

/// Encoder outputs, row-major.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Embeddings {
    /// Backbone features after global average pooling, [B, feature_dim].
    pub features: Vec<f32>,
    /// Projection head outputs, [B, 128].
    pub projections: Vec<f32>,
}

/// The kernel's uniform block, field for field (`Params` in the shader).
#[derive(Default)]
struct Params {
    batch: u32,
    c_in: u32,
    h_in: u32,
    w_in: u32,
    c_out: u32,
    h_out: u32,
    w_out: u32,
    stride: u32,
    pad: u32,
    ksize: u32,
    flags: u32,
    k_total: u32,
}

impl Params {
    fn bytes(&self) -> Vec<u8> {
        [
            self.batch,
            self.c_in,
            self.h_in,
            self.w_in,
            self.c_out,
            self.h_out,
            self.w_out,
            self.stride,
            self.pad,
            self.ksize,
            self.flags,
            self.k_total,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }
}

struct Kernels {
    layout: wgpu::BindGroupLayout,
    conv2d: wgpu::ComputePipeline,
    /// For layers of at most `NARROW_MAX_CHANNELS` channels.
    conv2d_narrow: wgpu::ComputePipeline,
    pool: wgpu::ComputePipeline,
    linear: wgpu::ComputePipeline,
    normalize: wgpu::ComputePipeline,
}

impl Kernels {
    fn new(gpu: &GpuContext) -> Self {
        // src, weight, bias and residual are read; dst is written.
        let program = gpu.program(
            "resnet_infer.wgsl",
            SHADER,
            &[true, true, true, true, false],
        );
        let pipeline =
            |entry: &str, constants: &[(&str, f64)]| program.pipeline(gpu, entry, constants);
        Self {
            conv2d: pipeline("conv2d", &[]),
            conv2d_narrow: pipeline("conv2d", &[("NARROW", 1.0)]),
            pool: pipeline("global_avg_pool", &[]),
            linear: pipeline("linear", &[]),
            normalize: pipeline("l2_normalize", &[]),
            layout: program.layout,
        }
    }
}

/// A convolution or linear layer on the device: weight [c_out, c_in * ksize^2], bias [c_out].
struct Layer {
    c_in: usize,
    c_out: usize,
    ksize: usize,
    stride: usize,
    relu: bool,
    weight: wgpu::Buffer,
    bias: wgpu::Buffer,
}

impl Layer {
    /// A convolution: its weight goes up transposed to [c_in * ksize^2, c_out], the layout the
    /// conv kernel's tile loads read contiguously.
    fn conv(gpu: &GpuContext, mut f: Folded, shape: [usize; 4], relu: bool) -> Self {
        f.weight = transpose(&f.weight, shape[1]);
        Self::new(gpu, f, shape, relu)
    }

    /// A linear layer: weight [c_out, c_in] as PyTorch stores it.
    fn new(gpu: &GpuContext, f: Folded, shape: [usize; 4], relu: bool) -> Self {
        let [c_in, c_out, ksize, stride] = shape;
        let upload = |label, data: &[f32]| {
            let contents: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            gpu.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &contents,
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        Self {
            c_in,
            c_out,
            ksize,
            stride,
            relu,
            weight: upload("weight", &f.weight),
            bias: upload("bias", &f.bias),
        }
    }

    /// Output side length of the convolution ("same" padding for odd kernels).
    fn out_len(&self, len: usize) -> usize {
        (len + 2 * (self.ksize / 2) - self.ksize) / self.stride + 1
    }
}

struct Block {
    conv1: Layer,
    conv2: Layer,
    downsample: Option<Layer>,
}

/// What one submission runs on: `batch` images of `height` x `width`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Shape {
    batch: usize,
    height: usize,
    width: usize,
}

struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: [u32; 2],
}

/// Buffers and recorded dispatches for one [`Shape`]. Bind groups keep the intermediate
/// activation buffers alive.
struct Plan {
    batch: usize,
    input: wgpu::Buffer,
    features: wgpu::Buffer,
    projections: wgpu::Buffer,
    forward: Vec<Dispatch>,
    normalize: Vec<Dispatch>,
}

/// `m` ([rows, len / rows], row-major) transposed.
fn transpose(m: &[f32], rows: usize) -> Vec<f32> {
    let cols = m.len() / rows;
    (0..m.len())
        .map(|i| m[(i % rows) * cols + i / rows])
        .collect()
}

/// A [batch, c, h, w] activation in a device buffer.
#[derive(Clone, Copy)]
struct Act<'b> {
    buffer: &'b wgpu::Buffer,
    c: usize,
    h: usize,
    w: usize,
}

/// The buffers a kernel binds, beyond its uniform block.
struct Bindings<'a> {
    src: &'a wgpu::Buffer,
    weight: &'a wgpu::Buffer,
    bias: &'a wgpu::Buffer,
    residual: &'a wgpu::Buffer,
    dst: &'a wgpu::Buffer,
}

/// The ResNet encoder on the GPU. Folds BatchNorm and uploads the weights once.
pub struct InferenceEngine {
    arch: ResNetArch,
    kernels: Kernels,
    stem: Layer,
    blocks: Vec<Block>,
    head1: Layer,
    head2: Layer,
    /// Bound where a kernel reads nothing: bindings cannot be left empty, and an unused one
    /// must not alias the output (read-only and writable use of one buffer conflict).
    dummy: wgpu::Buffer,
    plans: Mutex<HashMap<Shape, Plan>>,
}

impl InferenceEngine {
    /// Validates `tensors` (torchvision names) against the architecture they describe, folds
    /// every BatchNorm and builds the pipelines.
    pub fn new(gpu: &GpuContext, tensors: &[NamedTensor]) -> anyhow::Result<Self> {
        let arch = ResNetArch::from_tensors(tensors)?;
        let t = Checked::new(&arch, tensors)?;
        let conv =
            |name: &str, bn: &str, shape, relu| Layer::conv(gpu, t.fold(name, bn), shape, relu);
        let blocks = arch
            .block_specs()
            .into_iter()
            .map(|b| {
                let (c_in, c_out, s) = (b.c_in, b.c_out, b.stride);
                Block {
                    conv1: conv(&b.name("conv1"), &b.name("bn1"), [c_in, c_out, 3, s], true),
                    conv2: conv(&b.name("conv2"), &b.name("bn2"), [c_out, c_out, 3, 1], true),
                    downsample: b.has_downsample().then(|| {
                        let shape = [c_in, c_out, 1, s];
                        conv(
                            &b.name("downsample.0"),
                            &b.name("downsample.1"),
                            shape,
                            false,
                        )
                    }),
                }
            })
            .collect();
        let d = arch.feature_dim();
        Ok(Self {
            stem: conv(
                names::STEM_CONV,
                names::STEM_BN,
                [3, arch.widths[0], 3, 1],
                true,
            ),
            blocks,
            head1: Layer::new(
                gpu,
                t.fold(names::HEAD_LINEAR, names::HEAD_BN),
                [d, d, 1, 1],
                true,
            ),
            head2: Layer::new(
                gpu,
                t.plain(names::HEAD_OUT, names::HEAD_OUT_BIAS),
                [d, PROJECTION_DIM, 1, 1],
                false,
            ),
            kernels: Kernels::new(gpu),
            dummy: gpu.storage("unused", 4),
            plans: Mutex::new(HashMap::new()),
            arch,
        })
    }

    pub fn arch(&self) -> ResNetArch {
        self.arch
    }

    /// Width of `features` per image.
    pub fn feature_dim(&self) -> usize {
        self.arch.feature_dim()
    }

    /// Features and projections of `images`, [batch, 3, height, width] NCHW; with `normalized`,
    /// every row of both outputs is scaled to unit L2 norm on the GPU (raw outputs otherwise).
    pub async fn forward(
        &self,
        gpu: &GpuContext,
        images: &[f32],
        [batch, height, width]: [usize; 3],
        normalized: bool,
    ) -> anyhow::Result<Embeddings> {
        let shape = Shape {
            batch,
            height,
            width,
        };
        self.run(gpu, images, shape, normalized).await
    }

    async fn run(
        &self,
        gpu: &GpuContext,
        images: &[f32],
        shape: Shape,
        normalize: bool,
    ) -> anyhow::Result<Embeddings> {
        let Shape {
            batch,
            height,
            width,
        } = shape;
        anyhow::ensure!(height > 0 && width > 0, "images of {height}x{width} pixels");
        let per_image = 3 * height * width;
        anyhow::ensure!(
            images.len() == batch * per_image,
            "{} image values do not match [B={batch}, 3, H={height}, W={width}] ({} values)",
            images.len(),
            batch * per_image
        );
        let chunk = self.max_chunk(gpu, height, width)?;
        let mut out = Embeddings {
            features: Vec::with_capacity(batch * self.feature_dim()),
            projections: Vec::with_capacity(batch * PROJECTION_DIM),
        };
        for part in images.chunks(chunk * per_image) {
            let shape = Shape {
                batch: part.len() / per_image,
                ..shape
            };
            // The plan leaves the cache while in use, so overlapping calls never share buffers.
            let plan = self.take_plan(gpu, shape);
            let result = self.run_chunk(gpu, &plan, part, normalize).await;
            self.return_plan(shape, plan);
            let (features, projections) = result?;
            out.features.extend(features);
            out.projections.extend(projections);
        }
        Ok(out)
    }

    async fn run_chunk(
        &self,
        gpu: &GpuContext,
        plan: &Plan,
        images: &[f32],
        normalize: bool,
    ) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let bytes: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
        gpu.queue.write_buffer(&plan.input, 0, &bytes);
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            let extra = if normalize { &plan.normalize[..] } else { &[] };
            for d in plan.forward.iter().chain(extra) {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], 1);
            }
        }
        gpu.queue.submit([encoder.finish()]);
        let features = gpu
            .read(&plan.features, plan.batch * self.feature_dim())
            .await?;
        let projections = gpu
            .read(&plan.projections, plan.batch * PROJECTION_DIM)
            .await?;
        Ok((features, projections))
    }

    fn take_plan(&self, gpu: &GpuContext, shape: Shape) -> Plan {
        let cached = self.plans.lock().expect("plan cache").remove(&shape);
        cached.unwrap_or_else(|| self.build_plan(gpu, shape))
    }

    fn return_plan(&self, shape: Shape, plan: Plan) {
        let mut plans = self.plans.lock().expect("plan cache");
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(shape, plan);
    }

    /// Largest activation of the network per image, in values (the input included).
    fn max_activation(&self, height: usize, width: usize) -> usize {
        let (mut h, mut w) = (self.stem.out_len(height), self.stem.out_len(width));
        let mut max = (3 * height * width).max(self.stem.c_out * h * w);
        for b in &self.blocks {
            (h, w) = (b.conv1.out_len(h), b.conv1.out_len(w));
            max = max.max(b.conv1.c_out * h * w);
        }
        max
    }

    /// Images per submission such that no buffer or dispatch exceeds WebGPU's default limits
    /// (or the device's, where lower).
    fn max_chunk(&self, gpu: &GpuContext, height: usize, width: usize) -> anyhow::Result<usize> {
        let (device, default) = (gpu.device.limits(), wgpu::Limits::default());
        let max_bytes = device
            .max_storage_buffer_binding_size
            .min(device.max_buffer_size)
            .min(default.max_storage_buffer_binding_size) as usize;
        let max_groups = device
            .max_compute_workgroups_per_dimension
            .min(default.max_compute_workgroups_per_dimension) as usize;
        let pixels = self.stem.out_len(height) * self.stem.out_len(width);
        let widest_row = self.feature_dim().max(PROJECTION_DIM);
        let chunk = [
            MAX_CHUNK,
            max_bytes / (4 * self.max_activation(height, width)),
            max_groups * WIDE_TILE[1] as usize / pixels,
            max_groups * GROUP as usize / widest_row,
            max_groups,
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        anyhow::ensure!(
            chunk > 0,
            "one {height}x{width} image exceeds the GPU's buffer or dispatch limits"
        );
        Ok(chunk)
    }

    fn build_plan(&self, gpu: &GpuContext, shape: Shape) -> Plan {
        let Shape {
            batch,
            height,
            width,
        } = shape;
        let bytes = |values: usize| (values * 4) as u64;
        let input = gpu.storage("images", bytes(batch * 3 * height * width));
        let features = gpu.storage("features", bytes(batch * self.feature_dim()));
        let projections = gpu.storage("projections", bytes(batch * PROJECTION_DIM));
        let act_bytes = bytes(batch * self.max_activation(height, width));
        let pool: Vec<wgpu::Buffer> = (0..ACTIVATION_BUFFERS)
            .map(|_| gpu.storage("activation", act_bytes))
            .collect();
        let mut b = PlanBuilder {
            engine: self,
            gpu,
            batch,
            dispatches: Vec::new(),
        };
        let images = Act {
            buffer: &input,
            c: 3,
            h: height,
            w: width,
        };
        let mut x = b.conv(&self.stem, images, &pool[0], None);
        let mut x_slot = 0;
        for block in &self.blocks {
            let free: Vec<usize> = (0..ACTIVATION_BUFFERS).filter(|&i| i != x_slot).collect();
            let t = b.conv(&block.conv1, x, &pool[free[0]], None);
            let identity = match &block.downsample {
                Some(d) => b.conv(d, x, &pool[free[1]], None),
                None => x,
            };
            x = b.conv(&block.conv2, t, &pool[free[2]], Some(identity));
            x_slot = free[2];
        }
        b.pool(x, &features);
        // Any activation buffer but the last block's output holds the head's hidden layer.
        let hidden = &pool[(x_slot + 1) % ACTIVATION_BUFFERS];
        b.linear(&self.head1, &features, hidden);
        b.linear(&self.head2, hidden, &projections);
        let forward = std::mem::take(&mut b.dispatches);
        b.normalize(&features, self.feature_dim());
        b.normalize(&projections, PROJECTION_DIM);
        let normalize = b.dispatches;
        Plan {
            batch,
            input,
            features,
            projections,
            forward,
            normalize,
        }
    }
}

/// Records the dispatches of one plan.
struct PlanBuilder<'e> {
    engine: &'e InferenceEngine,
    gpu: &'e GpuContext,
    batch: usize,
    dispatches: Vec<Dispatch>,
}

impl PlanBuilder<'_> {
    /// Convolution `layer` of `x` into `dst`, adding `residual` before the ReLU when given.
    fn conv<'b>(
        &mut self,
        layer: &'b Layer,
        x: Act<'b>,
        dst: &'b wgpu::Buffer,
        residual: Option<Act<'b>>,
    ) -> Act<'b> {
        let out = Act {
            buffer: dst,
            c: layer.c_out,
            h: layer.out_len(x.h),
            w: layer.out_len(x.w),
        };
        let flags = if layer.relu { FLAG_RELU } else { 0 }
            | if residual.is_some() { FLAG_RESIDUAL } else { 0 };
        let params = Params {
            batch: self.batch as u32,
            c_in: x.c as u32,
            h_in: x.h as u32,
            w_in: x.w as u32,
            c_out: out.c as u32,
            h_out: out.h as u32,
            w_out: out.w as u32,
            stride: layer.stride as u32,
            pad: (layer.ksize / 2) as u32,
            ksize: layer.ksize as u32,
            flags,
            k_total: (x.c * layer.ksize * layer.ksize) as u32,
        };
        let kernels = &self.engine.kernels;
        let (pipeline, [tile_m, tile_n]) = if out.c as u32 <= NARROW_MAX_CHANNELS {
            (kernels.conv2d_narrow.clone(), NARROW_TILE)
        } else {
            (kernels.conv2d.clone(), WIDE_TILE)
        };
        let pixels = (self.batch * out.h * out.w) as u32;
        let groups = [pixels.div_ceil(tile_n), (out.c as u32).div_ceil(tile_m)];
        let bindings = Bindings {
            src: x.buffer,
            weight: &layer.weight,
            bias: &layer.bias,
            residual: residual.map_or(&self.engine.dummy, |r| r.buffer),
            dst,
        };
        self.push(pipeline, params, bindings, groups);
        out
    }

    fn pool(&mut self, x: Act<'_>, dst: &wgpu::Buffer) {
        let params = Params {
            batch: self.batch as u32,
            c_in: x.c as u32,
            h_in: x.h as u32,
            w_in: x.w as u32,
            ..Default::default()
        };
        let groups = [((self.batch * x.c) as u32).div_ceil(GROUP), 1];
        let dummy = &self.engine.dummy;
        let bindings = Bindings {
            src: x.buffer,
            weight: dummy,
            bias: dummy,
            residual: dummy,
            dst,
        };
        let pipeline = self.engine.kernels.pool.clone();
        self.push(pipeline, params, bindings, groups);
    }

    fn linear(&mut self, layer: &Layer, src: &wgpu::Buffer, dst: &wgpu::Buffer) {
        let params = Params {
            batch: self.batch as u32,
            c_in: layer.c_in as u32,
            c_out: layer.c_out as u32,
            flags: if layer.relu { FLAG_RELU } else { 0 },
            ..Default::default()
        };
        let groups = [((self.batch * layer.c_out) as u32).div_ceil(GROUP), 1];
        let residual = &self.engine.dummy;
        let bindings = Bindings {
            src,
            weight: &layer.weight,
            bias: &layer.bias,
            residual,
            dst,
        };
        let pipeline = self.engine.kernels.linear.clone();
        self.push(pipeline, params, bindings, groups);
    }

    /// Scales each row of `rows` ([batch, cols]) to unit L2 norm, in place.
    fn normalize(&mut self, rows: &wgpu::Buffer, cols: usize) {
        let params = Params {
            batch: self.batch as u32,
            c_in: cols as u32,
            ..Default::default()
        };
        let d = &self.engine.dummy;
        let bindings = Bindings {
            src: d,
            weight: d,
            bias: d,
            residual: d,
            dst: rows,
        };
        let pipeline = self.engine.kernels.normalize.clone();
        self.push(pipeline, params, bindings, [self.batch as u32, 1]);
    }

    fn push(
        &mut self,
        pipeline: wgpu::ComputePipeline,
        params: Params,
        b: Bindings,
        groups: [u32; 2],
    ) {
        let uniform = self
            .gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("layer params"),
                contents: &params.bytes(),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let buffers = [&uniform, b.src, b.weight, b.bias, b.residual, b.dst];
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("resnet_infer"),
                layout: &self.engine.kernels.layout,
                entries: &entries,
            });
        self.dispatches.push(Dispatch {
            pipeline,
            bind_group,
            groups,
        });
    }
}
