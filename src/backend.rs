//! The one place that maps `--device cpu|wgpu|cuda` to a Burn backend.
//!
//! Since Burn 0.22 a tensor's backend is a property of its `Device`, chosen at run time; code
//! that trains or evaluates takes a `Device` and never names a backend. The CPU device is Burn's
//! `flex` backend (measured fastest of Burn's CPU backends here; see the README).

use burn::tensor::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Wgpu,
    Cuda,
}

choice!(
    DeviceKind,
    "device",
    [Cpu = "cpu", Wgpu = "wgpu", Cuda = "cuda"]
);

/// One of `--devices`: a kind and, for CUDA, which card (`cuda:1`). The CPU is one device that
/// peers share; wgpu peers share the one adapter the WGSL kernels run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub index: usize,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse()
                    .map_err(|_| format!("device '{s}': '{index}' is not a device number"))?;
                (kind, index)
            }
            None => (s, 0),
        };
        let kind: DeviceKind = kind.parse()?;
        if index > 0 && kind != DeviceKind::Cuda {
            return Err(format!(
                "device '{s}': only cuda devices are numbered ({kind} is one device; repeat it \
                 for several peers on it)"
            ));
        }
        Ok(Self { kind, index })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DeviceKind::Cuda => write!(f, "cuda:{}", self.index),
            kind => write!(f, "{kind}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The autodiff device for `--device`: Burn 0.22 picks the backend at run time, so the whole
/// program runs on one tensor type and only this function knows which backends were built in.
/// A GPU that cannot start is an error that says what to do, not a panic.
pub fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    device_at(DeviceSpec { kind, index: 0 })
}

/// [`device`] for one of `--devices`.
pub fn device_at(spec: DeviceSpec) -> anyhow::Result<Device> {
    default_to_cpu();
    let device = match spec.kind {
        DeviceKind::Cpu => cpu(),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => probe(
            shared_wgpu,
            "wgpu",
            "no Vulkan/Metal/DX12 adapter found (on a machine without a GPU, install Mesa's \
             lavapipe: apt install mesa-vulkan-drivers)",
        )?,
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => probe(
            || Device::cuda(spec.index),
            "cuda",
            "no CUDA GPU or driver found (libcuda and NVRTC are loaded at run time; use --device \
             cpu or wgpu here)",
        )?,
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "--device {other}: this build has no {other} support; rebuild with `--features {other}`"
        ),
    };
    Ok(device.autodiff())
}

/// Whether `device` takes the flex backend extensions (`model::conv`'s im2col + gemm convolution,
/// `model::norm`'s fused batch norm): the CPU device. The GPU backends' own forms of both go with
/// [`has_cube_kernels`].
pub fn has_fast_conv(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// Whether `device` runs dcl's own CubeCL kernels (`optim::update`, `model::norm`'s and
/// `model::conv`'s): Burn's GPU backends, when built without fusion (whose tensors are not
/// CubeCL's until fused).
pub fn has_cube_kernels(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        #[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
        burn::backend::DispatchDevice::Wgpu(_) => true,
        #[cfg(all(feature = "cube-kernels", feature = "cuda", not(feature = "fusion")))]
        burn::backend::DispatchDevice::Cuda(_) => true,
        _ => false,
    }
}

/// Whether `device` is a wgpu device on a software adapter (lavapipe; SwiftShader, the page's
/// WebGPU on a machine without a GPU), where `model::conv` multiplies by a kernel of its own.
pub fn software_gpu(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        #[cfg(any(feature = "wgpu", feature = "webgpu"))]
        burn::backend::DispatchDevice::Wgpu(_) => wgpu_context().is_some_and(|c| c.software),
        _ => false,
    }
}

/// The CPU device without autodiff: seeded initialization and host-side helpers.
pub fn cpu() -> Device {
    default_to_cpu();
    Device::flex()
}

/// Makes the CPU Burn's default device (`BURN_DEVICE`, unless the user set it). Burn builds loaded
/// optimizer state on its default device before moving it to the weights' device; with `cuda`
/// compiled in, that default is CUDA, which a machine without a GPU cannot start, so a resume
/// would panic there. Done once, when the first device is made (before training threads start).
fn default_to_cpu() {
    // The page (wasm32) has neither CUDA nor environment variables.
    #[cfg(not(target_family = "wasm"))]
    static ONCE: std::sync::Once = std::sync::Once::new();
    #[cfg(not(target_family = "wasm"))]
    ONCE.call_once(|| {
        if std::env::var_os("BURN_DEVICE").is_none() {
            std::env::set_var("BURN_DEVICE", "flex");
        }
    });
}

/// The wgpu context Burn's wgpu device runs on, shared with the WGSL kernels (the fused loss):
/// one adapter, one device and one queue for the whole run. Set up once per process natively
/// (by [`device`]) and once per page (by the playground's `initWebGpu`).
#[cfg(all(feature = "wgpu", not(target_family = "wasm")))]
static SHARED_WGPU: std::sync::OnceLock<std::sync::Arc<crate::gpu::GpuContext>> =
    std::sync::OnceLock::new();

#[cfg(all(feature = "webgpu", target_family = "wasm"))]
thread_local! {
    static SHARED_WGPU: std::cell::OnceCell<std::sync::Arc<crate::gpu::GpuContext>> =
        const { std::cell::OnceCell::new() };
}

/// The context of [`shared_wgpu`], once it is set up.
#[cfg(all(feature = "wgpu", not(target_family = "wasm")))]
pub fn wgpu_context() -> Option<std::sync::Arc<crate::gpu::GpuContext>> {
    SHARED_WGPU.get().cloned()
}

#[cfg(all(feature = "webgpu", target_family = "wasm"))]
pub fn wgpu_context() -> Option<std::sync::Arc<crate::gpu::GpuContext>> {
    SHARED_WGPU.with(|c| c.get().cloned())
}

/// Burn's default wgpu device, set up here (not lazily by Burn) so its context can be shared.
#[cfg(all(feature = "wgpu", not(target_family = "wasm")))]
fn shared_wgpu() -> Device {
    use burn::backend::wgpu::{graphics::AutoGraphicsApi, init_setup, WgpuDevice};
    SHARED_WGPU.get_or_init(|| {
        let setup = init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), Default::default());
        std::sync::Arc::new(crate::gpu::GpuContext::from_setup(setup))
    });
    Device::wgpu(burn::tensor::DeviceKind::default())
}

/// The page's Burn device on the browser's WebGPU, sharing its context as [`shared_wgpu`] does
/// natively. Awaited once before anything else runs on the GPU.
#[cfg(all(feature = "webgpu", target_family = "wasm"))]
pub async fn init_page_webgpu() {
    use burn::backend::wgpu::{graphics::WebGpu, init_setup_async, WgpuDevice};
    if wgpu_context().is_some() {
        return;
    }
    let setup = init_setup_async::<WebGpu>(&WgpuDevice::default(), Default::default()).await;
    let context = std::sync::Arc::new(crate::gpu::GpuContext::from_setup(setup));
    SHARED_WGPU.with(|c| {
        let _ = c.set(context);
    });
}

/// Burn panics when a GPU backend cannot start; turn that into an error that says what to do.
/// The cause is often a panic on the backend's own server thread, which this thread only sees
/// as a closed channel (`RecvError`): every thread's first panic message is collected, and the
/// first one is the cause.
#[allow(dead_code)]
fn probe(make: impl FnOnce() -> Device, name: &str, hint: &str) -> anyhow::Result<Device> {
    let panics = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload_as_str().unwrap_or_default();
        if let Ok(mut seen) = seen.lock() {
            // The first clause: cudarc's goes on to list thirty library names.
            let first = message.lines().next().unwrap_or_default();
            seen.push(first.split(" - ").next().unwrap_or_default().to_string());
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let device = make();
        let ones = Tensor::<1>::ones([1], &device)
            .into_data()
            .try_to_vec::<f32>();
        ones.map(|v| (v, device))
    }));
    std::panic::set_hook(previous);
    match result {
        Ok(Ok((v, device))) if v == [1.0] => Ok(device),
        Ok(_) => anyhow::bail!("--device {name}: the device returned wrong data on a self-test"),
        Err(_) => {
            let panics = panics.lock().map(|p| p.clone()).unwrap_or_default();
            match panics.first().filter(|m| !m.is_empty()) {
                Some(cause) => anyhow::bail!("--device {name}: {hint}. ({cause})"),
                None => anyhow::bail!("--device {name}: {hint}."),
            }
        }
    }
}

/// Reads a tensor back as f32s, without blocking (the page's GPU can only be awaited).
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> anyhow::Result<Vec<f32>> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| anyhow::anyhow!("the device failed while reading a tensor back: {e:?}"))?;
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("unexpected tensor data: {e:?}"))
}

/// A scalar on its way back from the device ([`start_read`]).
pub struct ScalarRead {
    read: std::pin::Pin<Box<dyn std::future::Future<Output = ReadResult> + Send>>,
    /// Where the read is under way already: the device whose queued work is submitted before
    /// the host waits, so that the device works through all of it meanwhile.
    flush: Option<Device>,
}

type ReadResult = anyhow::Result<f64>;

impl ScalarRead {
    pub async fn value(self) -> ReadResult {
        if let Some(device) = self.flush {
            device.flush();
        }
        self.read.await
    }

    /// Burn's own read, made when awaited.
    fn when_awaited(t: Tensor<1>) -> Self {
        Self {
            read: Box::pin(async move { t.into_scalar_async::<f64>().await.map_err(read_failed) }),
            flush: None,
        }
    }
}

/// Starts reading `t` ([1], without autodiff) back to the host. On a hardware GPU (Burn's wgpu
/// and CUDA backends) the copy is queued and submitted now, so awaiting it later waits for the
/// work queued before it, not for what the host queues meanwhile. On the CPU, and on a software
/// GPU, whose device runs on the host's own cores, it is read when awaited (started early, the
/// page's step on SwiftShader ran 7% slower: 5.5 against 5.9 images/s).
pub fn start_read(t: Tensor<1>) -> ScalarRead {
    #[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
    if !software_gpu(&t.device()) {
        return cube_read::start(t);
    }
    ScalarRead::when_awaited(t)
}

fn read_failed(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("the device failed while reading a value back: {e:?}")
}

/// The eager read on CubeCL's clients: Burn's own `into_data` reaches the client only when its
/// future is first polled (and natively reads lazily, at first access of the bytes).
#[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
mod cube_read {
    use super::{read_failed, ReadResult, ScalarRead};
    use burn::backend::{BackendTensor, DispatchTensor, DispatchTensorKind};
    use burn::tensor::{Tensor, TensorData};
    use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeRuntime};
    use cubecl::server::CopyDescriptor;

    /// The read under way on a CubeCL GPU device; Burn's own read elsewhere.
    pub(super) fn start(t: Tensor<1>) -> ScalarRead {
        let device = t.device();
        let DispatchTensor {
            kind,
            checkpointing,
        } = t.into_dispatch();
        let read = match kind {
            #[cfg(any(feature = "wgpu", feature = "webgpu"))]
            DispatchTensorKind::Wgpu(BackendTensor::Float(t)) => polled_once(eager(t)),
            #[cfg(feature = "cuda")]
            DispatchTensorKind::Cuda(BackendTensor::Float(t)) => polled_once(eager(t)),
            kind => {
                let t = Tensor::from_dispatch(DispatchTensor {
                    kind,
                    checkpointing,
                });
                return ScalarRead::when_awaited(t);
            }
        };
        ScalarRead {
            read,
            flush: Some(device),
        }
    }

    fn eager<R: CubeRuntime>(
        t: CubeTensor<R>,
    ) -> impl std::future::Future<Output = ReadResult> + Send + 'static {
        let t = if t.is_contiguous() {
            t
        } else {
            into_contiguous(t)
        };
        let (shape, dtype, elem_size) = (t.meta.shape().clone(), t.dtype, t.elem_size());
        let copy = CopyDescriptor::new(
            t.handle.binding(),
            shape.clone(),
            t.meta.strides().clone(),
            elem_size,
        );
        let client = t.client;
        async move {
            // The client queues the copy in this call; its future then waits for the device (on
            // CUDA by blocking on a fence), which is for the await, not for the first poll.
            let read = client.read_one_tensor_async(copy);
            futures_lite::future::yield_now().await;
            let bytes = read.await;
            let data = TensorData::from_bytes(bytes.map_err(read_failed)?, shape, dtype);
            let values = data
                .convert::<f64>()
                .try_to_vec::<f64>()
                .map_err(read_failed)?;
            values
                .first()
                .copied()
                .ok_or_else(|| read_failed("no value"))
        }
    }

    /// `read` polled once now: its first poll queues and submits the copy (CubeCL's read
    /// futures borrow their client, so the client lives inside `read`).
    fn polled_once(
        read: impl std::future::Future<Output = ReadResult> + Send + 'static,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ReadResult> + Send>> {
        use std::task::{Context, Poll, Waker};
        let mut read = Box::pin(read);
        match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => Box::pin(std::future::ready(value)),
            Poll::Pending => read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read returns the value as it was queued, though the device gets more work before it
    /// is awaited (here a kernel over the same buffer), also from a view at an offset:
    /// [`start_read`] on each device, and the eager read (a hardware GPU's) on lavapipe too.
    #[test]
    fn start_read_returns_the_value_queued_before_it() {
        let mut devices = vec![cpu()];
        #[cfg(feature = "wgpu")]
        devices.push(
            device(DeviceKind::Wgpu)
                .expect("a Vulkan adapter (lavapipe)")
                .inner(),
        );
        type Read = fn(Tensor<1>) -> ScalarRead;
        let mut reads: Vec<(&str, Read)> = vec![("start_read", start_read)];
        #[cfg(all(feature = "cube-kernels", not(feature = "fusion")))]
        reads.push(("eager", cube_read::start));
        for device in devices {
            for (name, read) in &reads {
                let x = Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.5, 5.0], &device);
                let element = read(x.clone().slice(3..4));
                let sum = read(x.clone().sum());
                let doubled = x.mul_scalar(2.0);
                let block_on = futures_lite::future::block_on;
                assert_eq!(block_on(element.value()).unwrap(), 4.5, "{name} {device:?}");
                assert_eq!(block_on(sum.value()).unwrap(), 15.5, "{name} {device:?}");
                assert_eq!(read_f32_sync(doubled)[3], 9.0, "{name} {device:?}");
            }
        }
    }

    fn read_f32_sync(t: Tensor<1>) -> Vec<f32> {
        futures_lite::future::block_on(read_f32(t)).unwrap()
    }
}
