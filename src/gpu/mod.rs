//! Plain wgpu and the WGSL kernels of `shaders/`: one context, pipelines built once. Only
//! `on_burn` knows Burn: it hands the loss kernel Burn's own buffers.

mod folding;
pub mod infer;
pub mod loss;
#[cfg(all(
    feature = "cube-kernels",
    not(feature = "fusion"),
    any(feature = "wgpu", feature = "webgpu")
))]
pub mod on_burn;

/// A wgpu device and queue. Native: Vulkan/Metal/DX12 (lavapipe on a machine without a GPU).
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_name: String,
    /// A CPU's emulation of a GPU (lavapipe, SwiftShader; a browser's fallback adapter).
    pub software: bool,
}

impl GpuContext {
    pub async fn new() -> anyhow::Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "no WebGPU/Vulkan adapter ({e}); without a GPU install Mesa's lavapipe \
                     (apt install mesa-vulkan-drivers)"
                )
            })?;
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("dcl"),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await?;
        Ok(Self::on(device, queue, info))
    }

    fn on(device: wgpu::Device, queue: wgpu::Queue, adapter: wgpu::AdapterInfo) -> Self {
        Self {
            device,
            queue,
            software: adapter.device_type == wgpu::DeviceType::Cpu,
            adapter_name: adapter.name,
        }
    }

    /// The device and queue that Burn's wgpu backend was set up on, so the WGSL kernels and Burn
    /// share one device (see `backend`).
    #[cfg(feature = "train")]
    pub fn from_setup(setup: burn::backend::wgpu::WgpuSetup) -> Self {
        Self::on(setup.device, setup.queue, setup.adapter.get_info())
    }

    /// Blocks on [`GpuContext::new`] (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn blocking() -> anyhow::Result<Self> {
        futures_lite::future::block_on(Self::new())
    }

    /// A WGSL module and the one bind-group layout its entry points share: binding 0 a uniform
    /// block, then one storage buffer per `read_only` flag.
    pub(crate) fn program(&self, label: &str, source: &str, read_only: &[bool]) -> Program {
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let entry = |binding, ty| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![entry(0, wgpu::BufferBindingType::Uniform)];
        entries.extend(read_only.iter().zip(1..).map(|(&read_only, binding)| {
            entry(binding, wgpu::BufferBindingType::Storage { read_only })
        }));
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        Program {
            module,
            layout,
            pipeline_layout,
        }
    }

    pub(crate) fn storage(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copies `buffer` back to the host.
    pub(crate) async fn read(&self, buffer: &wgpu::Buffer, len: usize) -> anyhow::Result<Vec<f32>> {
        let bytes = (len * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = async_channel::bounded(1);
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.try_send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| anyhow::anyhow!("GPU wait failed: {e}"))?;
        rx.recv()
            .await?
            .map_err(|e| anyhow::anyhow!("GPU read-back failed: {e}"))?;
        let data = slice
            .get_mapped_range()
            .map_err(|e| anyhow::anyhow!("GPU read-back failed: {e:?}"))?;
        let out = data
            .chunks_exact(4)
            .take(len)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(data);
        staging.unmap();
        Ok(out)
    }
}

/// See [`GpuContext::program`].
pub(crate) struct Program {
    module: wgpu::ShaderModule,
    pub layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
}

impl Program {
    /// The compute pipeline of `entry`, with WGSL override `constants`.
    pub fn pipeline(
        &self,
        gpu: &GpuContext,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        gpu.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&self.pipeline_layout),
                module: &self.module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
    }
}
