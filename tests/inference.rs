//! The WGSL inference engine (`shaders/resnet_infer.wgsl`) against two references: Burn's
//! eval-mode forward of trained encoders, and a naive CPU forward pass (f64, BatchNorm applied as
//! written, not folded) on random weights with non-trivial BatchNorm statistics. Over 500 lines:
//! the naive reference forward pass is part of the test.

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use dcl::data::Split;
use dcl::gpu::infer::InferenceEngine;
use dcl::gpu::GpuContext;
use dcl::model::ModelName;
use dcl::safetensors::{parse_safetensors, safetensors_bytes, NamedTensor};
use dcl::train::Trainer;
use dcl::weights::torchvision_tensors;
use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const MINI: ([usize; 4], [usize; 4]) = ([16, 32, 64, 128], [1, 1, 1, 1]);
const RESNET18: ([usize; 4], [usize; 4]) = ([64, 128, 256, 512], [2, 2, 2, 2]);
const EPS: f64 = 1e-5;
const PROJ: usize = 128;

fn gpu() -> GpuContext {
    GpuContext::blocking().expect("a wgpu adapter (lavapipe on CPU-only machines)")
}

/// Random tensors, written out here rather than taken from the crate's own name list.
fn random_weights((widths, blocks): ([usize; 4], [usize; 4]), seed: u64) -> Vec<NamedTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut uniform = |name: String, shape: Vec<usize>, lo: f32, hi: f32| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
        out.push(NamedTensor { name, shape, data });
    };
    // He-uniform bounds keep activations of a deep random net at a sane scale.
    let mut conv = |name: String, o: usize, i: usize, k: usize| {
        let a = (6.0 / (i * k * k) as f32).sqrt();
        uniform(name, vec![o, i, k, k], -a, a);
    };
    conv("conv1.weight".into(), widths[0], 3, 3);
    let mut bns = vec![("bn1".to_string(), widths[0])];
    let mut c_in = widths[0];
    for s in 0..4 {
        for i in 0..blocks[s] {
            let (c, p) = (widths[s], format!("layer{}.{i}", s + 1));
            conv(format!("{p}.conv1.weight"), c, c_in, 3);
            conv(format!("{p}.conv2.weight"), c, c, 3);
            bns.push((format!("{p}.bn1"), c));
            bns.push((format!("{p}.bn2"), c));
            if (s > 0 && i == 0) || c_in != c {
                conv(format!("{p}.downsample.0.weight"), c, c_in, 1);
                bns.push((format!("{p}.downsample.1"), c));
            }
            c_in = c;
        }
    }
    let d = widths[3];
    let a = (6.0 / d as f32).sqrt();
    uniform("head.0.weight".into(), vec![d, d], -a, a);
    uniform("head.3.weight".into(), vec![PROJ, d], -a, a);
    uniform("head.3.bias".into(), vec![PROJ], -0.5, 0.5);
    bns.push(("head.1".into(), d));
    for (p, c) in bns {
        uniform(format!("{p}.weight"), vec![c], 0.5, 1.5);
        uniform(format!("{p}.bias"), vec![c], -0.3, 0.3);
        uniform(format!("{p}.running_mean"), vec![c], -0.3, 0.3);
        uniform(format!("{p}.running_var"), vec![c], 0.5, 2.0);
    }
    out
}

fn random_images(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// An NCHW activation in f64.
struct Act {
    data: Vec<f64>,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
}

struct Reference<'a>(HashMap<&'a str, &'a NamedTensor>);

impl<'a> Reference<'a> {
    fn new(tensors: &'a [NamedTensor]) -> Self {
        Self(tensors.iter().map(|t| (t.name.as_str(), t)).collect())
    }

    fn get(&self, name: &str) -> &'a NamedTensor {
        self.0[name]
    }

    fn conv(&self, x: &Act, name: &str, stride: usize) -> Act {
        let wt = self.get(name);
        let (co, k) = (wt.shape[0], wt.shape[2]);
        let pad = k / 2;
        let ho = (x.h + 2 * pad - k) / stride + 1;
        let wo = (x.w + 2 * pad - k) / stride + 1;
        let mut data = vec![0.0; x.b * co * ho * wo];
        for b in 0..x.b {
            for o in 0..co {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut sum = 0.0;
                        for ci in 0..x.c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((b * x.c + ci) * x.h + iy as usize) * x.w + ix as usize;
                                    let wi = ((o * x.c + ci) * k + ky) * k + kx;
                                    sum += x.data[xi] * wt.data[wi] as f64;
                                }
                            }
                        }
                        data[((b * co + o) * ho + oy) * wo + ox] = sum;
                    }
                }
            }
        }
        Act {
            data,
            b: x.b,
            c: co,
            h: ho,
            w: wo,
        }
    }

    /// Eval-mode BatchNorm of NCHW `data` with `spatial` values per channel (1 for BatchNorm1d).
    fn batch_norm(&self, data: &mut [f64], channels: usize, spatial: usize, prefix: &str) {
        let f = |field: &str| &self.get(&format!("{prefix}.{field}")).data;
        let (g, beta, mean, var) = (f("weight"), f("bias"), f("running_mean"), f("running_var"));
        for (i, v) in data.iter_mut().enumerate() {
            let c = (i / spatial) % channels;
            let norm = (*v - mean[c] as f64) / (var[c] as f64 + EPS).sqrt();
            *v = norm * g[c] as f64 + beta[c] as f64;
        }
    }

    fn conv_bn(&self, x: &Act, conv: &str, bn: &str, stride: usize, relu: bool) -> Act {
        let mut y = self.conv(x, conv, stride);
        self.batch_norm(&mut y.data, y.c, y.h * y.w, bn);
        if relu {
            y.data.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        y
    }

    /// `x` [b, in] times `name` [out, in] transposed.
    fn linear(&self, x: &[f64], b: usize, name: &str) -> Vec<f64> {
        let wt = self.get(name);
        let (o, i) = (wt.shape[0], wt.shape[1]);
        let mut y = vec![0.0; b * o];
        for r in 0..b {
            for j in 0..o {
                y[r * o + j] = (0..i)
                    .map(|k| x[r * i + k] * wt.data[j * i + k] as f64)
                    .sum();
            }
        }
        y
    }

    /// Features [b, w3] and projections [b, 128], as the project's Burn model computes them.
    fn forward(
        &self,
        blocks: [usize; 4],
        images: &[f32],
        b: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let data = images.iter().map(|&v| v as f64).collect();
        let mut x = self.conv_bn(
            &Act {
                data,
                b,
                c: 3,
                h,
                w,
            },
            "conv1.weight",
            "bn1",
            1,
            true,
        );
        for (s, &n) in blocks.iter().enumerate() {
            for i in 0..n {
                let p = format!("layer{}.{i}", s + 1);
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let identity = if self
                    .0
                    .contains_key(format!("{p}.downsample.0.weight").as_str())
                {
                    let conv = format!("{p}.downsample.0.weight");
                    self.conv_bn(&x, &conv, &format!("{p}.downsample.1"), stride, false)
                } else {
                    Act {
                        data: x.data.clone(),
                        ..x
                    }
                };
                let out = self.conv_bn(
                    &x,
                    &format!("{p}.conv1.weight"),
                    &format!("{p}.bn1"),
                    stride,
                    true,
                );
                let mut out = self.conv_bn(
                    &out,
                    &format!("{p}.conv2.weight"),
                    &format!("{p}.bn2"),
                    1,
                    false,
                );
                for (v, r) in out.data.iter_mut().zip(&identity.data) {
                    *v = (*v + r).max(0.0);
                }
                x = out;
            }
        }
        let hw = x.h * x.w;
        let features: Vec<f64> = x
            .data
            .chunks(hw)
            .map(|c| c.iter().sum::<f64>() / hw as f64)
            .collect();
        let mut hidden = self.linear(&features, b, "head.0.weight");
        self.batch_norm(&mut hidden, x.c, 1, "head.1");
        hidden.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut projections = self.linear(&hidden, b, "head.3.weight");
        let bias = &self.get("head.3.bias").data;
        for (i, v) in projections.iter_mut().enumerate() {
            *v += bias[i % PROJ] as f64;
        }
        (features, projections)
    }
}

/// max |a - b| / max |b|.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "degenerate reference (max |value| {scale})");
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    diff / scale
}

fn l2_normalized(rows: &[f64], cols: usize) -> Vec<f64> {
    rows.chunks(cols)
        .flat_map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(move |v| v / norm)
        })
        .collect()
}

/// Runs the engine and the reference on the same random weights and images and compares.
fn check(arch: ([usize; 4], [usize; 4]), b: usize, h: usize, w: usize, normalized: bool) {
    let gpu = gpu();
    let tensors = random_weights(arch, 7);
    let engine = InferenceEngine::new(&gpu, &tensors).unwrap();
    assert_eq!(engine.feature_dim(), arch.0[3]);
    let images = random_images(b * 3 * h * w, 11);
    let got = block_on(engine.forward(&gpu, &images, [b, h, w], false)).unwrap();
    let (features, projections) = Reference::new(&tensors).forward(arch.1, &images, b, h, w);
    let (ef, ep) = (
        relative_error(&got.features, &features),
        relative_error(&got.projections, &projections),
    );
    println!("B={b} {h}x{w}: relative error features {ef:.2e}, projections {ep:.2e}");
    assert!(
        ef < 1e-4 && ep < 1e-4,
        "features {ef:.2e}, projections {ep:.2e}"
    );
    if normalized {
        let again = block_on(engine.forward(&gpu, &images, [b, h, w], false)).unwrap();
        assert_eq!(again, got, "a reused plan gives other results");
        let unit = block_on(engine.forward(&gpu, &images, [b, h, w], true)).unwrap();
        let d = arch.0[3];
        assert!(relative_error(&unit.features, &l2_normalized(&features, d)) < 1e-4);
        assert!(relative_error(&unit.projections, &l2_normalized(&projections, PROJ)) < 1e-4);
    }
}

#[test]
fn resnet_mini_matches_reference_on_odd_images() {
    check(MINI, 3, 20, 20, true);
}

#[test]
fn resnet18_matches_reference() {
    check(RESNET18, 2, 32, 32, false);
}

/// 130 images run as chunks of 128 and 2; non-square images.
#[test]
fn large_batches_are_chunked() {
    check(MINI, 130, 9, 13, false);
}

fn load_error(tensors: &[NamedTensor]) -> String {
    match InferenceEngine::new(&gpu(), tensors) {
        Ok(_) => panic!("weights accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_weights_are_named() {
    let mut tensors = random_weights(MINI, 1);
    tensors.retain(|t| t.name != "layer2.0.bn1.running_var");
    tensors.push(NamedTensor {
        name: "layer1.0.bn1.num_batches_tracked".into(),
        shape: vec![],
        data: vec![0.0],
    });
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "layer3.0.conv2.weight")
        .unwrap();
    t.shape = vec![64, 32, 3, 3];
    t.data.truncate(64 * 32 * 9);
    let msg = load_error(&tensors);
    for name in [
        "missing: layer2.0.bn1.running_var",
        "unexpected: layer1.0.bn1.num_batches_tracked",
        "layer3.0.conv2.weight [64, 32, 3, 3]",
    ] {
        assert!(msg.contains(name), "{name} not in: {msg}");
    }
}

#[test]
fn each_kind_of_bad_weight_is_reported_alone() {
    let mut missing = random_weights(MINI, 1);
    missing.retain(|t| t.name != "head.3.bias");
    assert!(load_error(&missing).contains("missing: head.3.bias"));
    let mut extra = random_weights(MINI, 1);
    extra.push(NamedTensor {
        name: "fc.weight".into(),
        shape: vec![10, 128],
        data: vec![0.0; 1280],
    });
    assert!(load_error(&extra).contains("unexpected: fc.weight"));
    let mut misshaped = random_weights(MINI, 1);
    let t = misshaped
        .iter_mut()
        .find(|t| t.name == "head.1.running_mean")
        .unwrap();
    t.shape = vec![127];
    t.data.pop();
    assert!(load_error(&misshaped).contains("wrong shape: head.1.running_mean [127]"));
}

#[test]
fn image_size_mismatch_is_an_error() {
    let gpu = gpu();
    let engine = InferenceEngine::new(&gpu, &random_weights(MINI, 1)).unwrap();
    let err = block_on(engine.forward(&gpu, &[0.0; 100], [2, 8, 8], false)).unwrap_err();
    assert!(err.to_string().contains("[B=2, 3, H=8, W=8]"), "{err}");
}

/// An encoder after two Adam steps on the CPU: weights, BatchNorm affine parameters and running
/// statistics all moved off their initial values.
fn trained(model: ModelName) -> dcl::model::Encoder {
    let mut config = crate::training::config(4, 1);
    config.model = model;
    let images = (0..8 * dcl::data::IMAGE_LEN)
        .map(|i| ((i * 131 + i / 1001) % 256) as u8)
        .collect();
    let split = Split {
        images,
        labels: vec![0; 8],
    };
    let mut trainer = Trainer::new(config, split, dcl::backend::cpu().autodiff()).unwrap();
    trainer.step().unwrap();
    trainer.step().unwrap();
    trainer.encoder().valid()
}

/// The engine, fed the safetensors file `dcl pretrain` writes, equals Burn's eval-mode forward.
fn matches_burn(model: ModelName, b: usize) {
    let encoder = trained(model);
    let bytes = safetensors_bytes(&torchvision_tensors(&encoder), model);
    let (tensors, _) = parse_safetensors("model.safetensors", &bytes).unwrap();
    let images = random_images(b * 3 * 32 * 32, 5);
    let x = Tensor::<4>::from_data(
        TensorData::new(images.clone(), [b, 3, 32, 32]),
        &dcl::backend::cpu(),
    );
    let features = encoder.backbone.forward(x);
    let projections = encoder.head.forward(features.clone());
    let burn = |t: Tensor<2>| -> Vec<f64> {
        t.into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let gpu = gpu();
    let engine = InferenceEngine::new(&gpu, &tensors).unwrap();
    let got = block_on(engine.forward(&gpu, &images, [b, 32, 32], false)).unwrap();
    let (ef, ep) = (
        relative_error(&got.features, &burn(features)),
        relative_error(&got.projections, &burn(projections)),
    );
    eprintln!("{model} vs Burn: relative error features {ef:.2e}, projections {ep:.2e}");
    assert!(
        ef < 1e-4 && ep < 1e-4,
        "features {ef:.2e}, projections {ep:.2e}"
    );
}

#[test]
fn resnet_mini_matches_burn_eval_forward() {
    matches_burn(ModelName::ResNetMini, 6);
}

#[test]
fn resnet18_matches_burn_eval_forward() {
    matches_burn(ModelName::ResNet18, 2);
}

fn dcl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::common::dcl_bin())
        .args(args)
        .output()
        .unwrap()
}

fn read_npy(path: &std::path::Path) -> (Vec<usize>, Vec<f64>) {
    let a = dcl::data::npy::parse(&std::fs::read(path).unwrap()).unwrap();
    (a.shape, a.data)
}

/// `dcl embed` on a CIFAR-10 folder and on a `.npy` image array equals Burn's forward on the same
/// images; `dcl neighbors` draws the query and its k neighbours, best first.
#[test]
fn embed_and_neighbors_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::common::write_cifar10(tmp.path(), 1, 10, 12);
    let model = ModelName::ResNetMini;
    let encoder = trained(model);
    let weights = tmp.path().join("model.safetensors");
    std::fs::write(
        &weights,
        safetensors_bytes(&torchvision_tensors(&encoder), model),
    )
    .unwrap();
    let dataset = dcl::data::discover::load(data.to_str().unwrap()).unwrap();
    let pixels: Vec<&[u8]> = (0..12).map(|i| dataset.test.image(i)).collect();
    let images = dcl::augment::plain_batch(&pixels);
    let x = Tensor::<4>::from_data(
        TensorData::new(images.clone(), [12, 3, 32, 32]),
        &dcl::backend::cpu(),
    );
    let burn: Vec<f64> = encoder
        .forward(x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();

    let (w, d) = (weights.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp.path().join("emb.npy");
    let o = dcl(&[
        "embed",
        "--model",
        w,
        "--data",
        d,
        "--projected",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, from_dataset) = read_npy(&out);
    assert_eq!(shape, vec![12, 128]);
    let got: Vec<f32> = from_dataset.iter().map(|&v| v as f32).collect();
    assert!(relative_error(&got, &burn) < 1e-4);

    let npy = tmp.path().join("images.npy");
    std::fs::write(&npy, dcl::data::npy::to_bytes(&[12, 3, 32, 32], &images)).unwrap();
    let o = dcl(&[
        "embed",
        "--model",
        w,
        "--data",
        npy.to_str().unwrap(),
        "--projected",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_npy(&out), (shape, from_dataset));

    let o = dcl(&[
        "embed",
        "--model",
        w,
        "--data",
        d,
        "--normalize",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let (shape, unit) = read_npy(&out);
    assert_eq!(shape, vec![12, 128], "resnet-mini features are 128-d");
    for row in unit.chunks(128) {
        assert!((row.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-5);
    }

    let png = tmp.path().join("grid.png");
    let o = dcl(&[
        "neighbors",
        "--model",
        w,
        "--data",
        d,
        "--query",
        "3",
        "-k",
        "4",
        "--scale",
        "1",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let cosines: Vec<f64> = report["neighbors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["cosine"].as_f64().unwrap())
        .collect();
    assert_eq!(cosines.len(), 4);
    assert!(
        cosines.windows(2).all(|w| w[0] >= w[1]) && cosines[0] <= 1.0 + 1e-5,
        "{cosines:?}"
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (5 * 32 + 4 * 2, 32));
}

#[test]
fn embed_names_a_bad_model_file_and_a_bad_query() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::common::write_cifar10(tmp.path(), 1, 10, 4);
    let model = ModelName::ResNetMini;
    let mut tensors = torchvision_tensors(&trained(model));
    tensors.retain(|t| t.name != "layer2.0.conv1.weight" && t.name != "head.1.bias");
    let weights = tmp.path().join("model.safetensors");
    std::fs::write(&weights, safetensors_bytes(&tensors, model)).unwrap();
    let (w, d) = (weights.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp.path().join("emb.npy");
    let o = dcl(&[
        "embed",
        "--model",
        w,
        "--data",
        d,
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("layer2.0.conv1.weight"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
    std::fs::write(
        &weights,
        safetensors_bytes(&torchvision_tensors(&trained(model)), model),
    )
    .unwrap();
    let png = tmp.path().join("grid.png");
    let o = dcl(&[
        "neighbors",
        "--model",
        w,
        "--data",
        d,
        "--query",
        "4",
        "--out",
        png.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--query 4 is past the 4 images"), "{err}");
}
