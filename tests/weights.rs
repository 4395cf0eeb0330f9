//! safetensors out and back in: the names and layouts PyTorch users expect, and loading that
//! restores the exact model or names what does not fit.

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use dcl::model::{Encoder, ModelName};
use dcl::safetensors::{parse_safetensors, safetensors_bytes};
use dcl::weights::{encoder_from_tensors, init_encoder, torchvision_tensors};

fn images(n: usize) -> Tensor<4> {
    let data: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(data, [n, 3, 32, 32]), &dcl::backend::cpu())
}

fn trained_like(name: ModelName) -> Encoder {
    // A seeded init whose running statistics one train-mode forward (autodiff backend) moved off
    // their defaults, so the round trip covers every kind of tensor.
    let encoder = init_encoder(name, 3, &dcl::backend::cpu().autodiff()).unwrap();
    let _ = encoder.forward(Tensor::from_inner(images(4)));
    encoder.valid()
}

#[test]
fn safetensors_round_trip_gives_the_same_model() {
    let name = ModelName::ResNetMini;
    let encoder = trained_like(name);
    let bytes = safetensors_bytes(&torchvision_tensors(&encoder), name);
    let (tensors, model) = parse_safetensors("model.safetensors", &bytes).unwrap();
    assert_eq!(model, Some(name));
    assert!(tensors
        .iter()
        .any(|t| t.name == "layer1.0.bn1.running_mean"));
    // PyTorch's Linear layout is [out, in]; Burn's is [in, out]: torch[0][1] == burn[1][0].
    let head = tensors.iter().find(|t| t.name == "head.0.weight").unwrap();
    let burn_w = encoder.head.linear1.weight.val();
    let out_dim = burn_w.dims()[1];
    let burn_w = burn_w.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(head.data[1], burn_w[out_dim]);
    assert_ne!(head.data[1], burn_w[1]);
    let loaded: Encoder = encoder_from_tensors(name, tensors, &dcl::backend::cpu()).unwrap();
    let (a, b) = (encoder.forward(images(3)), loaded.forward(images(3)));
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert!(a.iter().any(|v| v.abs() > 1e-3), "a non-trivial output");
    assert_eq!(a, b, "the loaded model computes exactly what was saved");
}

#[test]
fn weights_that_do_not_fit_are_named() {
    let name = ModelName::ResNetMini;
    let encoder = trained_like(name);
    let mut tensors = torchvision_tensors(&encoder);
    tensors.retain(|t| t.name != "layer2.0.conv1.weight");
    tensors
        .iter_mut()
        .find(|t| t.name == "bn1.bias")
        .unwrap()
        .shape = vec![7];
    tensors.push(dcl::safetensors::NamedTensor {
        name: "fc.weight".into(),
        shape: vec![1],
        data: vec![0.0],
    });
    let err = encoder_from_tensors(name, tensors, &dcl::backend::cpu())
        .err()
        .unwrap()
        .to_string();
    for part in [
        "missing: layer2.0.conv1.weight",
        "unexpected: fc.weight",
        "wrong shape: bn1.bias [7]",
    ] {
        assert!(err.contains(part), "{part} not in: {err}");
    }
    let bytes = safetensors_bytes(&torchvision_tensors(&encoder), name);
    let err = parse_safetensors("cut.safetensors", &bytes[..bytes.len() - 10])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );
}
