//! The loss family against (1) lightly 1.6's own numbers, (2) a loop-based float64 reference
//! written from the paper's formula, independently of the vectorized code, and (3) its symmetries.

use burn::tensor::{Tensor, TensorData};
use dcl::loss::{ContrastiveLoss, LossKind};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Loss and gradients of the vectorized Burn implementation, in float32.
fn burn_loss(
    loss: &ContrastiveLoss,
    z1: &[f64],
    z2: &[f64],
    n: usize,
    d: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let device = dcl::backend::cpu().autodiff();
    let t = |z: &[f64]| {
        let v: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        Tensor::<2>::from_data(TensorData::new(v, [n, d]), &device).require_grad()
    };
    let (a, b) = (t(z1), t(z2));
    let l = loss.forward(a.clone(), b.clone()).unwrap();
    let value: f32 = l.clone().into_scalar();
    let grads = l.backward();
    let g = |x: Tensor<2>| -> Vec<f64> {
        x.grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    (value as f64, g(a), g(b))
}

/// The formula, one anchor at a time, in float64.
fn loop_reference(
    kind: LossKind,
    t: f64,
    sigma: f64,
    z1: &[f64],
    z2: &[f64],
    n: usize,
    d: usize,
) -> f64 {
    let normalize = |z: &[f64]| -> Vec<Vec<f64>> {
        z.chunks(d)
            .map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                r.iter().map(|x| x / norm).collect()
            })
            .collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (a, b) = (normalize(z1), normalize(z2));
    let directed = |a: &Vec<Vec<f64>>, b: &Vec<Vec<f64>>| {
        let pos: Vec<f64> = (0..n).map(|i| dot(&a[i], &b[i])).collect();
        let weights: Vec<f64> = if kind == LossKind::Dclw {
            let m = pos.iter().map(|p| p / sigma).fold(f64::MIN, f64::max);
            let e: Vec<f64> = pos.iter().map(|p| (p / sigma - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| 2.0 - n as f64 * x / s).collect()
        } else {
            vec![1.0; n]
        };
        let mut total = 0.0;
        for i in 0..n {
            let mut terms = Vec::new();
            for j in 0..n {
                if j != i {
                    terms.push(dot(&a[i], &a[j]) / t);
                    terms.push(dot(&a[i], &b[j]) / t);
                } else if kind == LossKind::Infonce {
                    terms.push(pos[i] / t);
                }
            }
            let m = terms.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + terms.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            total += -weights[i] * pos[i] / t + lse;
        }
        total / n as f64
    };
    0.5 * (directed(&a, &b) + directed(&b, &a))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Largest element error relative to the largest reference element.
fn rel_vec(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn matches_lightly_fixtures_loss_and_gradients() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lightly_losses.json"
    ))
    .unwrap();
    let fixtures: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fixtures["lightly"], "1.6.0");
    let cases = fixtures["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let kind: LossKind = case["kind"].as_str().unwrap().parse().unwrap();
        let (t, sigma) = (
            case["temperature"].as_f64().unwrap(),
            case["sigma"].as_f64().unwrap(),
        );
        let (n, d) = (
            case["n"].as_u64().unwrap() as usize,
            case["d"].as_u64().unwrap() as usize,
        );
        let (z1, z2) = (floats(&case["z1"]), floats(&case["z2"]));
        let loss = ContrastiveLoss::new(kind, t, sigma).unwrap();
        let (value, g1, g2) = burn_loss(&loss, &z1, &z2, n, d);
        let expected = case["loss"].as_f64().unwrap();
        let what = format!("{kind} n={n} d={d} t={t} sigma={sigma}");
        assert!(
            rel(value, expected) < 1e-5,
            "{what}: loss {value} vs lightly {expected}"
        );
        assert!(
            rel_vec(&g1, &floats(&case["grad_z1"])) < 1e-5,
            "{what}: grad z1"
        );
        assert!(
            rel_vec(&g2, &floats(&case["grad_z2"])) < 1e-5,
            "{what}: grad z2"
        );
        // The independent loop agrees with lightly too, in float64.
        let looped = loop_reference(kind, t, sigma, &z1, &z2, n, d);
        assert!(
            rel(looped, expected) < 1e-10,
            "{what}: loop {looped} vs lightly {expected}"
        );
        // So does the float64 host path (the loss explorer's CPU fallback), gradients included.
        let host = loss.on_host(&z1, &z2, n, d).unwrap();
        assert!(
            rel(host.loss as f64, expected) < 1e-6,
            "{what}: host {} vs lightly {expected}",
            host.loss
        );
        assert!(
            rel_vec(&widen(&host.grad_z1), &floats(&case["grad_z1"])) < 1e-6,
            "{what}: host grad z1"
        );
        assert!(
            rel_vec(&widen(&host.grad_z2), &floats(&case["grad_z2"])) < 1e-6,
            "{what}: host grad z2"
        );
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn random(rng: &mut impl Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| rng.gen_range(-1.0f32..1.0) as f64)
        .collect()
}

#[test]
fn matches_the_loop_reference_on_fresh_random_inputs() {
    let mut rng = crate::common::test_rng("matches_the_loop_reference_on_fresh_random_inputs");
    for kind in [LossKind::Dcl, LossKind::Dclw, LossKind::Infonce] {
        for (n, d) in [(2, 1), (3, 7), (17, 16), (64, 32)] {
            let t = rng.gen_range(0.05..1.0);
            let (z1, z2) = (random(&mut rng, n * d), random(&mut rng, n * d));
            let loss = ContrastiveLoss::new(kind, t, 0.5).unwrap();
            let (value, g1, g2) = burn_loss(&loss, &z1, &z2, n, d);
            let expected = loop_reference(kind, t, 0.5, &z1, &z2, n, d);
            // The host path's analytic gradients against Burn's autodiff of the tensor code; not
            // for D = 1, where every gradient is zero but for float32 rounding (a unit vector in
            // one dimension cannot turn), scaled up by 1/|z|.
            let host = loss.on_host(&z1, &z2, n, d).unwrap();
            let max_abs = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (h, g) in [(&host.grad_z1, &g1), (&host.grad_z2, &g2)]
                .into_iter()
                .filter(|_| d > 1)
            {
                let err = widen(h)
                    .iter()
                    .zip(g)
                    .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    err <= 1e-4 * max_abs(g),
                    "{kind} n={n} d={d} t={t}: host gradients differ from autodiff by {err}"
                );
            }
            assert!(
                (host.loss as f64 - expected).abs() / expected.abs().max(1.0) < 1e-6,
                "{kind} n={n} d={d} t={t}: host {} vs loop {expected}",
                host.loss
            );
            // In float32 the loss is a difference of logits of size 1/t, so its error scales
            // with 1/t, not with the loss: an InfoNCE loss near 0 (N = 2, D = 1) cancels.
            let scale = expected.abs().max(1.0 / t);
            assert!(
                (value - expected).abs() / scale < 1e-5,
                "{kind} n={n} d={d} t={t}: {value} vs {expected}"
            );
        }
    }
}

#[test]
fn swapping_the_views_changes_nothing() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (n, d) = (9, 12);
    let (z1, z2) = (random(&mut rng, n * d), random(&mut rng, n * d));
    for kind in [LossKind::Dcl, LossKind::Dclw, LossKind::Infonce] {
        let loss = ContrastiveLoss::new(kind, 0.2, 0.5).unwrap();
        let (ab, ga1, ga2) = burn_loss(&loss, &z1, &z2, n, d);
        let (ba, gb1, gb2) = burn_loss(&loss, &z2, &z1, n, d);
        assert!(rel(ab, ba) < 1e-6, "{kind}: {ab} vs {ba}");
        assert!(
            rel_vec(&ga1, &gb2) < 1e-5 && rel_vec(&ga2, &gb1) < 1e-5,
            "{kind} gradients"
        );
    }
}

#[test]
fn dclw_sigma_extremes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (n, d) = (8, 6);
    let (z1, z2) = (random(&mut rng, n * d), random(&mut rng, n * d));
    let value = |kind, sigma| {
        burn_loss(
            &ContrastiveLoss::new(kind, 0.1, sigma).unwrap(),
            &z1,
            &z2,
            n,
            d,
        )
        .0
    };
    // A huge sigma flattens the softmax: every weight is 2 - N/N = 1, which is plain DCL.
    assert!(rel(value(LossKind::Dclw, 1e4), value(LossKind::Dcl, 0.5)) < 1e-4);
    // A tiny sigma puts all mass on the easiest positive; still finite, and equal to the loop.
    let tiny = value(LossKind::Dclw, 1e-7);
    assert!(tiny.is_finite());
    assert!(
        rel(
            tiny,
            loop_reference(LossKind::Dclw, 0.1, 1e-7, &z1, &z2, n, d)
        ) < 1e-4
    );
}

#[test]
fn identical_directions_give_known_values() {
    // All anchors and positives identical: every similarity is 1/t, so DCL is
    // -1/t + log(2N-2) + 1/t = log(2N-2), and InfoNCE is log(2N-1).
    let (n, d, t) = (4, 3, 0.5);
    let z = vec![1.0; n * d];
    let dcl = burn_loss(
        &ContrastiveLoss::new(LossKind::Dcl, t, 0.5).unwrap(),
        &z,
        &z,
        n,
        d,
    )
    .0;
    let infonce = burn_loss(
        &ContrastiveLoss::new(LossKind::Infonce, t, 0.5).unwrap(),
        &z,
        &z,
        n,
        d,
    )
    .0;
    assert!(rel(dcl, (2.0 * n as f64 - 2.0).ln()) < 1e-6, "{dcl}");
    assert!(
        rel(infonce, (2.0 * n as f64 - 1.0).ln()) < 1e-6,
        "{infonce}"
    );
}
