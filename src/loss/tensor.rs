//! The loss on Burn tensors: differentiable on any backend, the reference of the training path.

use super::{ContrastiveLoss, LossError, LossKind};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Int, Tensor};

impl ContrastiveLoss {
    /// The loss of two batches of embeddings `z1`, `z2` of shape [N, D] (not yet normalized).
    pub fn forward(&self, z1: Tensor<2>, z2: Tensor<2>) -> Result<Tensor<1>, LossError> {
        let (d1, d2) = (z1.dims(), z2.dims());
        if d1 != d2 {
            return Err(LossError::ShapeMismatch(d1, d2));
        }
        if d1[0] < 2 {
            return Err(LossError::BatchTooSmall(d1[0]));
        }
        let a = l2_normalize(z1);
        let b = l2_normalize(z2);
        let forward = self.directed(a.clone(), b.clone());
        let backward = self.directed(b, a);
        Ok((forward + backward).mul_scalar(0.5))
    }

    /// Mean loss over the anchors of `anchors`, their positives being the rows of `positives`.
    fn directed(&self, anchors: Tensor<2>, positives: Tensor<2>) -> Tensor<1> {
        let n = anchors.dims()[0];
        let device = anchors.device();
        let inv_t = 1.0 / self.temperature;
        let self_mask: Tensor<2, Bool> = Tensor::<2, Int>::eye(n, &device).equal_elem(1);

        let positive_sim = (anchors.clone() * positives.clone())
            .sum_dim(1)
            .mul_scalar(inv_t);
        let sim_anchor_anchor = anchors
            .clone()
            .matmul(anchors.clone().transpose())
            .mul_scalar(inv_t)
            .mask_fill(self_mask.clone(), MASKED);
        let sim_anchor_positive = anchors
            .clone()
            .matmul(positives.clone().transpose())
            .mul_scalar(inv_t);
        // The one line that separates DCL from InfoNCE: is the positive in its own denominator?
        let sim_anchor_positive = match self.kind {
            LossKind::Infonce => sim_anchor_positive,
            LossKind::Dcl | LossKind::Dclw => sim_anchor_positive.mask_fill(self_mask, MASKED),
        };
        let denominator =
            logsumexp_rows(Tensor::cat(vec![sim_anchor_anchor, sim_anchor_positive], 1));

        let attraction = match self.kind {
            LossKind::Dclw => {
                positive_sim * vmf_weights(anchors.detach(), positives.detach(), self.sigma)
            }
            _ => positive_sim,
        };
        (denominator - attraction).mean()
    }
}

/// Stands for -inf inside a log-sum-exp: far below any similarity/t yet finite, so no NaN appears.
const MASKED: f32 = -1.0e30;

/// `z / max(|z|, 1e-12)` row by row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(z: Tensor<2>) -> Tensor<2> {
    let norm = z.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    z / norm
}

/// Row-wise log-sum-exp, stable: the row max is taken out (without gradient, it cancels).
fn logsumexp_rows(x: Tensor<2>) -> Tensor<2> {
    let max = x.clone().max_dim(1).detach();
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// DCLW's positive weights `2 - N softmax_i(<a_i,b_i>/sigma)`, shape [N, 1], on normalized views.
fn vmf_weights(a: Tensor<2>, b: Tensor<2>, sigma: f64) -> Tensor<2> {
    let n = a.dims()[0] as f64;
    let sim = (a * b).sum_dim(1).mul_scalar(1.0 / sigma);
    softmax(sim, 0).mul_scalar(-n).add_scalar(2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{ContrastiveLoss, LossError, LossKind};

    #[test]
    fn rejects_bad_hyper_parameters_and_tiny_batches() {
        assert_eq!(
            ContrastiveLoss::new(LossKind::Dcl, 0.0, 0.5),
            Err(LossError::BadTemperature(0.0))
        );
        assert_eq!(
            ContrastiveLoss::new(LossKind::Dcl, -1.0, 0.5),
            Err(LossError::BadTemperature(-1.0))
        );
        assert!(ContrastiveLoss::new(LossKind::Dclw, 0.1, f64::NAN).is_err());
        let loss = ContrastiveLoss::new(LossKind::Dcl, 0.1, 0.5).unwrap();
        let device = crate::backend::cpu();
        let one = Tensor::<2>::ones([1, 4], &device);
        assert_eq!(
            loss.forward(one.clone(), one).unwrap_err(),
            LossError::BatchTooSmall(1)
        );
        let a = Tensor::<2>::ones([3, 4], &device);
        let b = Tensor::<2>::ones([3, 5], &device);
        assert!(matches!(
            loss.forward(a, b),
            Err(LossError::ShapeMismatch(_, _))
        ));
    }
}
