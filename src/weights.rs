//! Weights in and out of Burn: records as bytes (checkpoints, moving a model between devices) and
//! the encoder's tensors under torchvision's ResNet names (what `safetensors` writes and reads).

use crate::arch::{names, BlockSpec, ResNetArch};
use crate::model::{BasicBlock, Encoder, ModelName};
use crate::safetensors::NamedTensor;
use burn::module::{Module, Param, ParamId, RunningState};
use burn::nn::BatchNorm;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Tensor, TensorData};
use std::collections::HashMap;

/// Serializes a module's record (weights and running statistics, burnpack format) as stored.
pub fn module_to_bytes<M: Module>(module: M) -> anyhow::Result<Vec<u8>> {
    let bytes = module.into_record().into_bytes()?;
    Ok(bytes.to_vec())
}

/// Loads bytes from [`module_to_bytes`] into a module of the same architecture, on the module's
/// device (the record's tensors are copied there).
pub fn module_from_bytes<M: Module>(module: M, bytes: Vec<u8>) -> anyhow::Result<M> {
    let unfit = |e| anyhow::anyhow!("checkpoint does not fit this model: {e}");
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(unfit)?;
    module.try_load_record(record).map_err(unfit)
}

/// A freshly initialized encoder, identical on every device for a given seed: it is drawn on the
/// CPU backend and copied over, since each backend's random generator differs.
pub fn init_encoder(name: ModelName, seed: u64, device: &Device) -> anyhow::Result<Encoder> {
    // The CPU backend's generator is shared by the process: two threads seeding and drawing at
    // once would interleave their draws, and one seed would no longer give one encoder.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = crate::backend::cpu();
    cpu.seed(seed);
    let reference = Encoder::new(name, &cpu);
    module_from_bytes(Encoder::new(name, device), module_to_bytes(reference)?)
}

/// A named tensor still on its device, flattened, waiting to be read back.
struct OnDevice {
    name: String,
    shape: Vec<usize>,
    flat: Tensor<1>,
}

fn on_device<const D: usize>(name: String, t: Tensor<D>) -> OnDevice {
    let shape = t.dims().to_vec();
    let flat = t.reshape([shape.iter().product::<usize>()]);
    OnDevice { name, shape, flat }
}

/// One tensor of the encoder, reached under its torchvision name.
enum Slot<'a> {
    Conv(&'a mut Param<Tensor<4>>),
    /// A Linear weight: Burn stores [in, out], PyTorch [out, in].
    Linear(&'a mut Param<Tensor<2>>),
    Vector(&'a mut Param<Tensor<1>>),
    Running(&'a mut RunningState<Tensor<1>>),
}

type Visitor<'v> = dyn FnMut(String, Slot<'_>) + 'v;

fn visit_batch_norm(prefix: &str, bn: &mut BatchNorm, f: &mut Visitor) {
    let [gamma, beta, mean, var] = names::batch_norm(prefix);
    f(gamma, Slot::Vector(&mut bn.gamma));
    f(beta, Slot::Vector(&mut bn.beta));
    f(mean, Slot::Running(&mut bn.running_mean));
    f(var, Slot::Running(&mut bn.running_var));
}

fn visit_block(spec: &BlockSpec, b: &mut BasicBlock, f: &mut Visitor) {
    f(spec.name("conv1"), Slot::Conv(&mut b.conv1.weight));
    visit_batch_norm(&spec.name("bn1"), &mut b.bn1, f);
    f(spec.name("conv2"), Slot::Conv(&mut b.conv2.weight));
    visit_batch_norm(&spec.name("bn2"), &mut b.bn2, f);
    if let Some(d) = &mut b.downsample {
        f(spec.name("downsample.0"), Slot::Conv(&mut d.conv.weight));
        visit_batch_norm(&spec.name("downsample.1"), &mut d.bn, f);
    }
}

/// Every tensor of the encoder under the names of its architecture description
/// ([`ResNetArch::expected_shapes`], in the same order). The one walk both saving and loading use.
fn visit(encoder: &mut Encoder, arch: ResNetArch, f: &mut Visitor) {
    let r = &mut encoder.backbone;
    f(names::STEM_CONV.into(), Slot::Conv(&mut r.conv1.weight));
    visit_batch_norm(names::STEM_BN, &mut r.bn1, f);
    let blocks = r.layers.iter_mut().flatten();
    for (spec, block) in arch.block_specs().iter().zip(blocks) {
        visit_block(spec, block, f);
    }
    let h = &mut encoder.head;
    f(
        names::HEAD_LINEAR.into(),
        Slot::Linear(&mut h.linear1.weight),
    );
    visit_batch_norm(names::HEAD_BN, &mut h.bn, f);
    f(names::HEAD_OUT.into(), Slot::Linear(&mut h.linear2.weight));
    if let Some(bias) = &mut h.linear2.bias {
        f(names::HEAD_OUT_BIAS.into(), Slot::Vector(bias));
    }
}

/// The encoder's tensors under torchvision's names, in PyTorch layout (Linear weights [out, in]).
pub fn torchvision_tensors(encoder: &Encoder) -> Vec<NamedTensor> {
    futures_lite::future::block_on(torchvision_tensors_async(encoder)).expect("weights read back")
}

/// [`torchvision_tensors`], awaited (the page reads its GPU this way).
pub async fn torchvision_tensors_async(encoder: &Encoder) -> anyhow::Result<Vec<NamedTensor>> {
    let mut pending = Vec::new();
    let arch = encoder.backbone.arch();
    visit(&mut encoder.clone(), arch, &mut |name, slot| {
        pending.push(match slot {
            Slot::Conv(p) => on_device(name, p.val()),
            Slot::Linear(p) => on_device(name, p.val().transpose()),
            Slot::Vector(p) => on_device(name, p.val()),
            Slot::Running(r) => on_device(name, r.value()),
        })
    });
    let mut out = Vec::new();
    for t in pending {
        out.push(NamedTensor {
            data: crate::backend::read_f32(t.flat).await?,
            name: t.name,
            shape: t.shape,
        });
    }
    Ok(out)
}

/// A loaded value as a parameter the optimizer can train (on autodiff backends).
fn trainable<const D: usize>(id: ParamId, value: Tensor<D>) -> Param<Tensor<D>> {
    Param::initialized(id, value.require_grad())
}

/// An encoder of preset `name` holding `tensors` (torchvision names and layouts). Missing, extra
/// and mis-shaped tensors are all reported, by name, in one error ([`ResNetArch::check`]).
pub fn encoder_from_tensors(
    name: ModelName,
    tensors: Vec<NamedTensor>,
    device: &Device,
) -> anyhow::Result<Encoder> {
    let arch = name.arch();
    arch.check(&tensors)
        .map_err(|e| anyhow::anyhow!("these weights do not fit {name}: {e}"))?;
    let mut by_name: HashMap<String, NamedTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut encoder = Encoder::new(name, device);
    visit(&mut encoder, arch, &mut |key, slot| {
        let t = by_name
            .remove(&key)
            .expect("checked: every tensor is present");
        let data = TensorData::new(t.data, t.shape);
        match slot {
            Slot::Conv(p) => *p = trainable(p.id, Tensor::from_data(data, device)),
            Slot::Linear(p) => {
                let value = Tensor::<2>::from_data(data, device).transpose();
                *p = trainable(p.id, value)
            }
            Slot::Vector(p) => *p = trainable(p.id, Tensor::from_data(data, device)),
            Slot::Running(r) => *r = RunningState::new(Tensor::from_data(data, device)),
        }
    });
    Ok(encoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk and the description name the same tensors, with the same shapes, in one order.
    #[test]
    fn the_walk_follows_the_description() {
        for name in [ModelName::ResNetMini, ModelName::ResNet18] {
            let encoder = Encoder::new(name, &crate::backend::cpu());
            assert_eq!(encoder.backbone.arch(), name.arch());
            let walked: Vec<(String, Vec<usize>)> = torchvision_tensors(&encoder)
                .into_iter()
                .map(|t| (t.name, t.shape))
                .collect();
            assert_eq!(walked, name.arch().expected_shapes(), "{name}");
        }
    }
}
