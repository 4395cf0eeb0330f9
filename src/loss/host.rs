//! The loss and its analytic gradients in float64 on plain slices: no GPU, no Burn. O(N²·D), for
//! the handful of points the tutorial's loss explorer drags around when the page has no WebGPU.

use super::{ContrastiveLoss, LossAndGrads, LossError, LossKind};

/// Rows of `z` ([n, d]) scaled to unit length, and their lengths (floored at 1e-12, as
/// `torch.nn.functional.normalize`).
fn normalize(z: &[f64], d: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    z.chunks(d)
        .map(|row| {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            (row.iter().map(|x| x / norm).collect(), norm)
        })
        .unzip()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(out: &mut [f64], scale: f64, x: &[f64]) {
    out.iter_mut().zip(x).for_each(|(o, v)| *o += scale * v);
}

/// `dL/dz` from `dL/du` for `u = z/|z|`: the part of the gradient along `u` is dropped.
fn through_normalize(grad: &[f64], unit: &[f64], norm: f64) -> Vec<f64> {
    let along = dot(grad, unit);
    grad.iter()
        .zip(unit)
        .map(|(g, u)| (g - along * u) / norm)
        .collect()
}

impl ContrastiveLoss {
    /// Loss and gradients of `z1`, `z2` ([n, d], row-major, not yet normalized).
    pub fn on_host(
        &self,
        z1: &[f64],
        z2: &[f64],
        n: usize,
        d: usize,
    ) -> Result<LossAndGrads, LossError> {
        let shape = |z: &[f64]| [z.len() / d.max(1), d];
        if d == 0 || z1.len() != n * d || z2.len() != n * d {
            return Err(LossError::ShapeMismatch(shape(z1), shape(z2)));
        }
        if n < 2 {
            return Err(LossError::BatchTooSmall(n));
        }
        let (a, norm_a) = normalize(z1, d);
        let (b, norm_b) = normalize(z2, d);
        let mut grad_a = vec![vec![0.0; d]; n];
        let mut grad_b = vec![vec![0.0; d]; n];
        // Each direction is half of the loss and a mean over its n anchors.
        let forward = directed(self, &a, &b, 0.5 / n as f64, &mut grad_a, &mut grad_b);
        let backward = directed(self, &b, &a, 0.5 / n as f64, &mut grad_b, &mut grad_a);
        let back = |grads: &[Vec<f64>], units: &[Vec<f64>], norms: &[f64]| -> Vec<f32> {
            (0..n)
                .flat_map(|i| through_normalize(&grads[i], &units[i], norms[i]))
                .map(|g| g as f32)
                .collect()
        };
        Ok(LossAndGrads {
            loss: (forward + backward) as f32,
            grad_z1: back(&grad_a, &a, &norm_a),
            grad_z2: back(&grad_b, &b, &norm_b),
            device_bytes: 0,
            host_reads: 0,
            dispatches: 0,
        })
    }
}

/// `scale` times the summed loss of `anchors` against `positives`, its gradient with respect to
/// the unit rows added into `grad_anchors` and `grad_positives`.
fn directed(
    loss: &ContrastiveLoss,
    anchors: &[Vec<f64>],
    positives: &[Vec<f64>],
    scale: f64,
    grad_anchors: &mut [Vec<f64>],
    grad_positives: &mut [Vec<f64>],
) -> f64 {
    let n = anchors.len();
    let inv_t = 1.0 / loss.temperature;
    let weights = positive_weights(loss, anchors, positives);
    let mut total = 0.0;
    for i in 0..n {
        // The denominator's terms: (similarity / t, is it against a positive row, which row).
        let mut terms = Vec::with_capacity(2 * n);
        for j in 0..n {
            if j != i {
                terms.push((dot(&anchors[i], &anchors[j]) * inv_t, false, j));
            }
            if j != i || loss.kind == LossKind::Infonce {
                terms.push((dot(&anchors[i], &positives[j]) * inv_t, true, j));
            }
        }
        let max = terms.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = terms.iter().map(|t| (t.0 - max).exp()).sum();
        let positive = dot(&anchors[i], &positives[i]) * inv_t;
        total += max + sum.ln() - weights[i] * positive;

        let pull = -scale * weights[i] * inv_t;
        axpy(&mut grad_anchors[i], pull, &positives[i]);
        axpy(&mut grad_positives[i], pull, &anchors[i]);
        for &(s, against_positive, j) in &terms {
            let p = scale * inv_t * (s - max).exp() / sum;
            let other = if against_positive {
                &positives[j]
            } else {
                &anchors[j]
            };
            axpy(&mut grad_anchors[i], p, other);
            let grad_other = if against_positive {
                &mut grad_positives[j]
            } else {
                &mut grad_anchors[j]
            };
            axpy(grad_other, p, &anchors[i]);
        }
    }
    scale * total
}

/// DCLW's `2 - N softmax(<a_i,b_i>/sigma)`, held constant (no gradient); 1 for the others.
fn positive_weights(
    loss: &ContrastiveLoss,
    anchors: &[Vec<f64>],
    positives: &[Vec<f64>],
) -> Vec<f64> {
    let n = anchors.len();
    if loss.kind != LossKind::Dclw {
        return vec![1.0; n];
    }
    let sims: Vec<f64> = (0..n)
        .map(|i| dot(&anchors[i], &positives[i]) / loss.sigma)
        .collect();
    let max = sims.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = sims.iter().map(|s| (s - max).exp()).sum();
    sims.iter()
        .map(|s| 2.0 - n as f64 * (s - max).exp() / sum)
        .collect()
}
