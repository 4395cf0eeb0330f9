//! The linear probe: L2-regularized multinomial logistic regression on frozen, standardized
//! features, fitted by L-BFGS, its regularization chosen on training rows held out from the fit.
//! This is the protocol of Kornblith et al. (2019) that SimCLR's linear evaluation of transfer
//! uses, on a coarser grid of strengths.
//!
//! Why not a fixed number of gradient steps: stopped early, the probe is regularized by its step
//! count, and not alike for every representation. Measured on Fashion-MNIST (all 60,000 training
//! images, 10,000 test): 300 full-batch Adam steps left a trained encoder's probe 0.9 points below
//! its converged value (0.848 against 0.857) while they flattered raw pixels, whose unregularized
//! fit falls from 0.847 at 300 steps to 0.837 at 3,000 as it overfits 2,352 columns.

use crate::backend::read_f32;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};

/// Strengths λ of the penalty λ‖W‖² added to the mean cross-entropy, largest first: each fit
/// starts from the previous one's weights. Five values over four decades, not Kornblith et al.'s
/// 45 over eleven: a fit of raw pixels (60,000 x 2,352) costs about 0.4 s per evaluation here.
/// Raw pixels chose 1e-2 from 1e-2..1e-5 on all of Fashion-MNIST, so the grid reaches above it.
const STRENGTHS: [f64; 5] = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5];
/// Every fifth training row is held out to choose λ; the chosen λ is then refitted on all rows.
const HOLD_OUT_EVERY: usize = 5;
/// The most L-BFGS iterations per fit. Ill-conditioned fits reach it: on all of Fashion-MNIST, raw
/// pixels' (2,352 correlated columns) at every strength, a 128-wide encoder's at 1e-4 and below,
/// where the well-regularized ones stop on their own after 130-260. The cap bounds the time
/// (pixels: about 2 minutes a fit here); the held-out rows judge whichever fit it leaves.
const MAX_ITERATIONS: usize = 300;

/// Top-1 (0..1) on `test` of the probe fitted to `train`, rows of width `dim`. Deterministic: the
/// problem is convex, the fit starts from zero weights and the hold-out rows are fixed.
pub fn linear_probe(
    train: (&[f32], &[u16]),
    test: (&[f32], &[u16]),
    dim: usize,
    classes: usize,
    device: &Device,
) -> f64 {
    let device = &device.clone().inner();
    let columns = Standardization::of(train.0, dim);
    let (held_out, fitted): (Vec<usize>, Vec<usize>) =
        (0..train.1.len()).partition(|i| i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1);
    let rows = |picked: &[usize]| Rows::new(&columns, train, picked, classes, device);
    // The fit and hold-out rows are freed before all rows are laid out: for raw pixels each copy
    // is gigabytes.
    let start = vec![0.0; (columns.kept.len() + 1) * classes];
    let (strength, start) = choose_strength(&rows(&fitted), &rows(&held_out), start);
    let all: Vec<usize> = (0..train.1.len()).collect();
    let weights = rows(&all).minimize(strength, start);
    let test_rows: Vec<usize> = (0..test.1.len()).collect();
    Rows::new(&columns, test, &test_rows, classes, device).accuracy(&weights)
}

/// The strength whose fit to `fit` scores best on `held_out` (the largest on a tie), with that
/// fit's weights.
fn choose_strength(fit: &Rows, held_out: &Rows, mut weights: Vec<f64>) -> (f64, Vec<f64>) {
    let mut chosen = (f64::NEG_INFINITY, STRENGTHS[0], weights.clone());
    for strength in STRENGTHS {
        weights = fit.minimize(strength, weights);
        let accuracy = held_out.accuracy(&weights);
        if accuracy > chosen.0 {
            chosen = (accuracy, strength, weights.clone());
        }
    }
    (chosen.1, chosen.2)
}

/// Per-column mean and 1/deviation of the training rows; constant columns (a pixel that is padding
/// everywhere) carry nothing and are dropped.
struct Standardization {
    dim: usize,
    kept: Vec<usize>,
    mean: Vec<f32>,
    scale: Vec<f32>,
}

impl Standardization {
    fn of(rows: &[f32], dim: usize) -> Self {
        let n = (rows.len() / dim.max(1)).max(1) as f64;
        let mut sum = vec![0.0f64; dim];
        let mut sq = vec![0.0f64; dim];
        for row in rows.chunks_exact(dim) {
            for ((s, q), &v) in sum.iter_mut().zip(&mut sq).zip(row) {
                *s += v as f64;
                *q += v as f64 * v as f64;
            }
        }
        let mut out = Self {
            dim,
            kept: Vec::new(),
            mean: Vec::new(),
            scale: Vec::new(),
        };
        for (c, (s, q)) in sum.iter().zip(&sq).enumerate() {
            let mean = s / n;
            let sd = (q / n - mean * mean).max(0.0).sqrt();
            if sd > 1e-8 {
                out.kept.push(c);
                out.mean.push(mean as f32);
                out.scale.push((1.0 / sd) as f32);
            }
        }
        out
    }

    /// The standardized kept columns of `row`.
    fn apply<'a>(&'a self, row: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
        self.kept
            .iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(move |((&c, m), s)| (row[c] - m) * s)
    }
}

/// Standardized rows on the device, with their labels: the design matrix X [n, d], its transpose
/// (laid out for the gradient's product) and the one-hot targets [n, c].
struct Rows {
    x: Tensor<2>,
    xt: Tensor<2>,
    one_hot: Tensor<2>,
    labels: Vec<u16>,
    classes: usize,
}

impl Rows {
    fn new(
        columns: &Standardization,
        (features, labels): (&[f32], &[u16]),
        picked: &[usize],
        classes: usize,
        device: &Device,
    ) -> Self {
        let (n, d) = (picked.len(), columns.kept.len());
        let x: Vec<f32> = picked
            .iter()
            .flat_map(|&i| columns.apply(&features[i * columns.dim..(i + 1) * columns.dim]))
            .collect();
        let mut xt = vec![0.0; n * d];
        for (r, row) in x.chunks_exact(d.max(1)).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                xt[c * n + r] = v;
            }
        }
        let labels: Vec<u16> = picked.iter().map(|&i| labels[i]).collect();
        let mut one_hot = vec![0.0; n * classes];
        for (r, &label) in labels.iter().enumerate() {
            one_hot[r * classes + label as usize] = 1.0;
        }
        let tensor = |data: Vec<f32>, shape: [usize; 2]| {
            Tensor::<2>::from_data(TensorData::new(data, shape), device)
        };
        Self {
            x: tensor(x, [n, d]),
            xt: tensor(xt, [d, n]),
            one_hot: tensor(one_hot, [n, classes]),
            labels,
            classes,
        }
    }

    /// Logits [n, c] of `weights` (W [d, c] row-major, then the bias [c]).
    fn logits(&self, weights: &[f64]) -> Tensor<2> {
        let c = self.classes;
        let d = weights.len() / c - 1;
        let device = &self.x.device();
        let w: Vec<f32> = weights.iter().map(|&v| v as f32).collect();
        let bias = Tensor::<2>::from_data(TensorData::new(w[d * c..].to_vec(), [1, c]), device);
        let w = Tensor::<2>::from_data(TensorData::new(w[..d * c].to_vec(), [d, c]), device);
        self.x.clone().matmul(w) + bias
    }

    /// Mean cross-entropy plus λ‖W‖², and its gradient, at `weights`.
    fn objective(&self, weights: &[f64], strength: f64) -> (f64, Vec<f64>) {
        let n = self.labels.len().max(1) as f64;
        let log_p = log_softmax(self.logits(weights), 1);
        let cross_entropy = (log_p.clone() * self.one_hot.clone())
            .sum()
            .neg()
            .div_scalar(n);
        let residual = (log_p.exp() - self.one_hot.clone()).div_scalar(n);
        let gradient_w = self.xt.clone().matmul(residual.clone());
        let gradient_b = residual.sum_dim(0);
        let packed = Tensor::cat(
            vec![
                gradient_w.flatten(0, 1),
                gradient_b.flatten(0, 1),
                cross_entropy,
            ],
            0,
        );
        let packed = futures_lite::future::block_on(read_f32(packed)).expect("probe gradient");
        let (gradient, loss) = packed.split_at(weights.len());
        let penalized = weights.len() - self.classes;
        let mut value = loss[0] as f64;
        let gradient = gradient
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (&g, &w))| {
                if i < penalized {
                    value += strength * w * w;
                    g as f64 + 2.0 * strength * w
                } else {
                    g as f64
                }
            })
            .collect();
        (value, gradient)
    }

    fn minimize(&self, strength: f64, start: Vec<f64>) -> Vec<f64> {
        lbfgs(|w| self.objective(w, strength), start, MAX_ITERATIONS)
    }

    fn accuracy(&self, weights: &[f64]) -> f64 {
        if self.labels.is_empty() {
            return 0.0;
        }
        let logits =
            futures_lite::future::block_on(read_f32(self.logits(weights))).expect("probe logits");
        let correct = logits
            .chunks_exact(self.classes)
            .zip(&self.labels)
            .filter(|(row, &label)| {
                let best = (0..self.classes).max_by(|&a, &b| row[a].total_cmp(&row[b]));
                best == Some(label as usize)
            })
            .count();
        correct as f64 / self.labels.len() as f64
    }
}

/// Minimizes a smooth convex `f` (value and gradient) from `x` by L-BFGS: ten (step, gradient
/// change) pairs, backtracking to Armijo's condition. Stops when the gradient vanishes (every
/// component under 1e-6), a step lowers f by less than a part in 1e9, no step along the direction
/// lowers f (the probe's f32 kernels resolve f to about a part in 1e7, so this is how its fits
/// end), or after `max_iterations`.
fn lbfgs(
    mut f: impl FnMut(&[f64]) -> (f64, Vec<f64>),
    mut x: Vec<f64>,
    max_iterations: usize,
) -> Vec<f64> {
    const HISTORY: usize = 10;
    let (mut value, mut gradient) = f(&x);
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    for _ in 0..max_iterations {
        if gradient.iter().all(|g| g.abs() < 1e-6) {
            break;
        }
        let mut direction = two_loop(&gradient, &pairs);
        let mut slope = dot(&gradient, &direction);
        if slope >= 0.0 {
            pairs.clear();
            direction = gradient.iter().map(|g| -g).collect();
            slope = dot(&gradient, &direction);
        }
        let mut step = 1.0;
        let accepted = loop {
            let next: Vec<f64> = x
                .iter()
                .zip(&direction)
                .map(|(a, d)| a + step * d)
                .collect();
            let (next_value, next_gradient) = f(&next);
            if next_value <= value + 1e-4 * step * slope {
                break Some((next, next_value, next_gradient));
            }
            step *= 0.5;
            if step < 1e-10 {
                break None;
            }
        };
        let Some((next, next_value, next_gradient)) = accepted else {
            break;
        };
        let s: Vec<f64> = next.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = next_gradient
            .iter()
            .zip(&gradient)
            .map(|(a, b)| a - b)
            .collect();
        let curvature = dot(&s, &y);
        if curvature > 1e-12 {
            if pairs.len() == HISTORY {
                pairs.pop_front();
            }
            pairs.push_back((s, y, 1.0 / curvature));
        }
        let decrease = value - next_value;
        (x, value, gradient) = (next, next_value, next_gradient);
        if decrease <= 1e-9 * value.abs().max(1.0) {
            break;
        }
    }
    x
}

/// -H·g by the two-loop recursion, H the inverse-Hessian estimate of `pairs` (s, y, 1/s·y)
/// scaled by s·y/y·y of the newest pair.
fn two_loop(
    gradient: &[f64],
    pairs: &std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)>,
) -> Vec<f64> {
    let mut q = gradient.to_vec();
    let mut alphas = Vec::with_capacity(pairs.len());
    for (s, y, rho) in pairs.iter().rev() {
        let alpha = rho * dot(s, &q);
        q.iter_mut().zip(y).for_each(|(q, y)| *q -= alpha * y);
        alphas.push(alpha);
    }
    if let Some((s, y, _)) = pairs.back() {
        let gamma = dot(s, y) / dot(y, y);
        q.iter_mut().for_each(|q| *q *= gamma);
    }
    for ((s, y, rho), alpha) in pairs.iter().zip(alphas.into_iter().rev()) {
        let beta = rho * dot(y, &q);
        q.iter_mut()
            .zip(s)
            .for_each(|(q, s)| *q += (alpha - beta) * s);
    }
    q.iter_mut().for_each(|q| *q = -*q);
    q
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A convex, non-quadratic valley whose curvatures span three decades: Σ c_i (cosh(x_i - m_i) - 1)
    /// has its minimum, 0, at m.
    #[test]
    fn lbfgs_finds_the_minimum_of_an_ill_conditioned_valley() {
        let centre = [1.0, -2.0, 0.5, 3.0, -0.25];
        let curvature = [1.0, 10.0, 100.0, 1000.0, 3.0];
        let valley = |x: &[f64]| {
            let terms = x.iter().zip(&centre).zip(&curvature);
            let value = terms
                .clone()
                .map(|((x, m), c)| c * ((x - m).cosh() - 1.0))
                .sum();
            let gradient = terms.map(|((x, m), c)| c * (x - m).sinh()).collect();
            (value, gradient)
        };
        let minimum = lbfgs(valley, vec![0.0; 5], 500);
        for (x, m) in minimum.iter().zip(&centre) {
            assert!((x - m).abs() < 1e-4, "{minimum:?}");
        }
    }

    /// Overlapping classes (no separating plane, so the unregularized optimum is finite): at the
    /// fitted weights the gradient vanishes, which is what the optimum of a convex problem is.
    #[test]
    fn the_probe_fit_reaches_the_optimum() {
        let (n, dim, classes) = (600, 6, 3);
        let mut state = 12345u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let labels: Vec<u16> = (0..n).map(|i| (i % classes) as u16).collect();
        let features: Vec<f32> = labels
            .iter()
            .flat_map(|&l| {
                (0..dim)
                    .map(|c| uniform() + 0.3 * f32::from(c == l as usize))
                    .collect::<Vec<_>>()
            })
            .collect();
        let device = crate::backend::cpu();
        let columns = Standardization::of(&features, dim);
        let all: Vec<usize> = (0..n).collect();
        let rows = Rows::new(
            &columns,
            (&features, &labels),
            &all,
            classes,
            &device.inner(),
        );
        for strength in [0.0, 1e-3] {
            let weights = rows.minimize(strength, vec![0.0; (dim + 1) * classes]);
            let (_, gradient) = rows.objective(&weights, strength);
            let largest = gradient.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            assert!(largest < 1e-4, "λ {strength}: gradient {largest}");
        }
    }

    /// PyTorch's float64 L-BFGS (strong-Wolfe line search, run to a gradient under 1e-7) on the
    /// same objective: `tests/fixtures/make_probe_fixture.py`. The fit reaches its optimum value
    /// and its weights, having dropped the constant column.
    #[test]
    fn the_probe_fit_matches_pytorch() {
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/probe_reference.json"))
                .unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (dim, classes) = (6, 3);
        let features: Vec<f32> = floats(&reference["features"])
            .iter()
            .map(|&v| v as f32)
            .collect();
        let labels: Vec<u16> = floats(&reference["labels"])
            .iter()
            .map(|&v| v as u16)
            .collect();
        let columns = Standardization::of(&features, dim);
        assert_eq!(columns.kept, [0, 1, 2, 3, 4]);
        let all: Vec<usize> = (0..labels.len()).collect();
        let device = crate::backend::cpu().inner();
        let rows = Rows::new(&columns, (&features, &labels), &all, classes, &device);
        for case in reference["cases"].as_array().unwrap() {
            let strength = case["strength"].as_f64().unwrap();
            let weights = rows.minimize(strength, vec![0.0; 6 * classes]);
            let (value, _) = rows.objective(&weights, strength);
            let optimum = case["optimum"].as_f64().unwrap();
            assert!(
                (value - optimum).abs() < 1e-6,
                "λ {strength}: {value} vs {optimum}"
            );
            let expected = [floats(&case["weights"]), floats(&case["bias"])].concat();
            for (w, e) in weights.iter().zip(&expected) {
                assert!(
                    (w - e).abs() < 1e-3,
                    "λ {strength}: {weights:?} vs {expected:?}"
                );
            }
        }
    }

    /// Two classes apart along one of three axes, noise on the others: the probe gets every test
    /// point right, and twice the same answer.
    #[test]
    fn the_linear_probe_separates_a_separable_set() {
        let point = |i: usize| {
            let class = (i % 2) as u16;
            let side = if class == 0 { -1.0 } else { 1.0 };
            let noise = |k: usize| (((i * 7 + k * 13) % 11) as f32 - 5.0) / 5.0;
            (
                [noise(1), side * (0.5 + (i % 3) as f32 * 0.1), noise(2)],
                class,
            )
        };
        let split = |range: std::ops::Range<usize>| {
            let (x, y): (Vec<[f32; 3]>, Vec<u16>) = range.map(point).unzip();
            (x.into_iter().flatten().collect::<Vec<f32>>(), y)
        };
        let (train, test) = (split(0..60), split(60..100));
        let device = crate::backend::cpu().autodiff();
        let probe = || linear_probe((&train.0, &train.1), (&test.0, &test.1), 3, 2, &device);
        let accuracy = probe();
        assert_eq!(accuracy, 1.0);
        assert_eq!(probe(), accuracy);
    }
}
