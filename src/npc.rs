//! The negative-positive coupling (NPC) of InfoNCE, measured (Yeh et al., Section 3). For anchor
//! i with positive logit s_pos and negative logits s_neg, InfoNCE's loss -s_pos + lse(s_pos,
//! s_neg) has d/ds_pos = -(1 - p_pos) = -q, where p_pos is the positive's softmax weight among
//! all of the anchor's logits; DCL's -s_pos + lse(s_neg) has d/ds_pos = -1. So q is the factor by
//! which InfoNCE scales the positive's pull, the coupling DCL removes: near 1 it does no harm,
//! small q (easy positives: small batches, low temperatures, a trained encoder) weakens learning.

/// One anchor's logits: the positive, then its 2N - 2 negatives.
pub struct AnchorLogits {
    pub positive: f64,
    pub negatives: Vec<f64>,
}

/// The logits of every anchor of both views (view 1's anchors first), as the losses see them:
/// rows of `z1`, `z2` ([n, d]) are L2-normalized here, similarities divided by `temperature`.
pub fn anchor_logits(
    z1: &[f32],
    z2: &[f32],
    n: usize,
    d: usize,
    temperature: f64,
) -> Vec<AnchorLogits> {
    let unit = |z: &[f32]| -> Vec<Vec<f64>> {
        z.chunks_exact(d)
            .map(|r| {
                let norm = r
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-12);
                r.iter().map(|&v| v as f64 / norm).collect()
            })
            .collect()
    };
    let (a, b) = (unit(z1), unit(z2));
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>() / temperature;
    let mut out = Vec::with_capacity(2 * n);
    for (anchors, others) in [(&a, &b), (&b, &a)] {
        for i in 0..n {
            let negatives = (0..n)
                .filter(|&j| j != i)
                .flat_map(|j| [dot(&anchors[i], &anchors[j]), dot(&anchors[i], &others[j])])
                .collect();
            out.push(AnchorLogits {
                positive: dot(&anchors[i], &others[i]),
                negatives,
            });
        }
    }
    out
}

fn logsumexp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    max + xs.map(|x| (x - max).exp()).sum::<f64>().ln()
}

impl AnchorLogits {
    /// q = 1 - p_pos.
    pub fn npc_multiplier(&self) -> f64 {
        let all = std::iter::once(self.positive).chain(self.negatives.iter().copied());
        1.0 - (self.positive - logsumexp(all)).exp()
    }

    pub fn infonce(&self) -> f64 {
        let all = std::iter::once(self.positive).chain(self.negatives.iter().copied());
        -self.positive + logsumexp(all)
    }

    pub fn dcl(&self) -> f64 {
        -self.positive + logsumexp(self.negatives.iter().copied())
    }
}

/// Mean, median, 10th and 90th percentile of a sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
}

pub fn summarize(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Summary {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{ContrastiveLoss, LossKind};
    use rand::{Rng, SeedableRng};

    fn embeddings(seed: u64, n: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = || (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        (draw(), draw())
    }

    /// The identity that defines q, on random inputs: InfoNCE's gradient with respect to each
    /// positive logit is -q times DCL's (which is -1), by central differences; and the per-anchor
    /// losses average to the crate's losses on the same embeddings.
    #[test]
    fn infonce_scales_the_positive_gradient_by_q() {
        let (n, d, t) = (9, 5, 0.3);
        let (z1, z2) = embeddings(4, n, d);
        let anchors = anchor_logits(&z1, &z2, n, d, t);
        assert_eq!(anchors.len(), 2 * n);
        let h = 1e-5;
        for anchor in &anchors {
            let shifted = |delta: f64, loss: fn(&AnchorLogits) -> f64| {
                let moved = AnchorLogits {
                    positive: anchor.positive + delta,
                    negatives: anchor.negatives.clone(),
                };
                loss(&moved)
            };
            let slope = |loss| (shifted(h, loss) - shifted(-h, loss)) / (2.0 * h);
            let (g_infonce, g_dcl) = (slope(AnchorLogits::infonce), slope(AnchorLogits::dcl));
            let q = anchor.npc_multiplier();
            assert!((g_dcl + 1.0).abs() < 1e-8, "{g_dcl}");
            assert!(
                (g_infonce - q * g_dcl).abs() < 1e-8,
                "{g_infonce} vs {q} * {g_dcl}"
            );
            assert!(q > 0.0 && q < 1.0);
        }
        for (kind, per_anchor) in [
            (
                LossKind::Infonce,
                AnchorLogits::infonce as fn(&AnchorLogits) -> f64,
            ),
            (LossKind::Dcl, AnchorLogits::dcl),
        ] {
            let mean = anchors.iter().map(per_anchor).sum::<f64>() / anchors.len() as f64;
            let wide = |z: &[f32]| z.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let loss = ContrastiveLoss::new(kind, t, 0.5).unwrap();
            let crate_loss = loss.on_host(&wide(&z1), &wide(&z2), n, d).unwrap().loss as f64;
            assert!(
                (mean - crate_loss).abs() < 1e-5 * mean.abs(),
                "{kind}: {mean} vs {crate_loss}"
            );
        }
    }

    #[test]
    fn summary_reads_quantiles() {
        let v: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
        let s = summarize(&v);
        assert_eq!((s.median, s.p10, s.p90), (0.5, 0.1, 0.9));
        assert!((s.mean - 0.5).abs() < 1e-12);
    }
}
