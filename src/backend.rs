//! The one place that maps `--device cpu|wgpu|cuda` to a Burn backend.
//!
//! Code that trains or evaluates is generic over `B: AutodiffBackend`; it is written as a
//! [`BackendTask`] and run here on the backend the user picked. The CPU device is Burn's `flex`
//! backend (measured fastest of Burn's CPU backends here; see the README).

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::AutodiffBackend, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Wgpu,
    Cuda,
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!(
                "unknown device '{other}': expected cpu, wgpu or cuda"
            )),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        })
    }
}

pub type CpuBackend = Flex;

/// Work to run on whichever backend the user picked.
pub trait BackendTask {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> anyhow::Result<Self::Output>;
}

pub fn dispatch<T: BackendTask>(kind: DeviceKind, task: T) -> anyhow::Result<T::Output> {
    match kind {
        DeviceKind::Cpu => task.run::<Autodiff<Flex>>(Default::default()),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            let device = burn::backend::wgpu::WgpuDevice::default();
            probe::<burn::backend::Wgpu>(&device, "wgpu", "no Vulkan/Metal/DX12 adapter found \
                (on a machine without a GPU, install Mesa's lavapipe: apt install mesa-vulkan-drivers)")?;
            task.run::<Autodiff<burn::backend::Wgpu>>(device)
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            let device = burn::backend::cuda::CudaDevice::default();
            probe::<burn::backend::Cuda>(
                &device,
                "cuda",
                "no CUDA GPU or driver found \
                (libcuda and NVRTC are loaded at run time; use --device cpu or wgpu here)",
            )?;
            task.run::<Autodiff<burn::backend::Cuda>>(device)
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "--device {other}: this build has no {other} support; rebuild with `--features {other}`"
        ),
    }
}

/// Burn panics when a GPU backend cannot start; turn that into an error that says what to do.
#[allow(dead_code)]
fn probe<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    name: &str,
    hint: &str,
) -> anyhow::Result<()> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<B, 1>::ones([1], device)
            .into_data()
            .to_vec::<f32>()
    }));
    std::panic::set_hook(previous);
    match result {
        Ok(Ok(v)) if v == [1.0] => Ok(()),
        Ok(_) => anyhow::bail!("--device {name}: the device returned wrong data on a self-test"),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let first = detail.lines().next().unwrap_or("");
            anyhow::bail!("--device {name}: {hint}. ({first})")
        }
    }
}
