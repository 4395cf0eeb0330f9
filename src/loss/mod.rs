//! The decoupled contrastive loss family: DCL, DCLW and InfoNCE (NT-Xent).
//!
//! Semantics follow lightly 1.6 (`DCLLoss`, `DCLWLoss`, `NTXentLoss`): the two views are
//! L2-normalized inside, every sample is an anchor once per direction, and the result is the mean
//! over all 2N anchors. For anchor `a_i` with positive `b_i` and temperature `t`:
//!
//! ```text
//! DCL      l_i = -w_i <a_i,b_i>/t + logsumexp_{j != i} { <a_i,a_j>/t, <a_i,b_j>/t }
//! InfoNCE  l_i =     -<a_i,b_i>/t + logsumexp { <a_i,b_j>/t for all j, <a_i,a_j>/t for j != i }
//! ```
//!
//! DCL's denominator holds only the 2N-2 negatives, so the positive no longer damps the gradient of
//! the negatives (the negative-positive coupling of InfoNCE). DCLW weights the positive term by
//! `w = 2 - N * softmax(<a,b>/sigma)` over the batch: hard positives (low similarity) weigh more.
//! `tensor` computes it on Burn tensors (the training reference every faster path, the WGSL kernel
//! included, is tested against); `host` in float64 on plain slices, for a few points where no
//! GPU or Burn is at hand (the tutorial's loss explorer in the inference-only build).

use serde::{Deserialize, Serialize};
use std::fmt;

mod host;
#[cfg(feature = "train")]
mod tensor;
#[cfg(feature = "train")]
pub use tensor::l2_normalize;

/// Which member of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Dcl,
    Dclw,
    Infonce,
}

choice!(
    LossKind,
    "loss",
    [
        Dcl = "dcl",
        Dclw = "dclw",
        Infonce = "infonce" | "ntxent" | "nt-xent"
    ]
);

/// Which implementation computes the loss during training: `shaders/dcl_loss.wgsl` (one fused
/// pass, O(N·D) memory) or Burn's composed tensor ops (any backend; the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKernel {
    Fused,
    Reference,
}

choice!(
    LossKernel,
    "loss kernel",
    [Fused = "fused", Reference = "reference"]
);

/// A loss with its hyper-parameters, validated once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveLoss {
    pub kind: LossKind,
    pub temperature: f64,
    /// Only DCLW reads it: the width of the von Mises-Fisher weighting.
    pub sigma: f64,
}

/// Why a loss could not be computed. Never a NaN in disguise.
#[derive(Debug, Clone, PartialEq)]
pub enum LossError {
    BatchTooSmall(usize),
    ShapeMismatch([usize; 2], [usize; 2]),
    BadTemperature(f64),
    BadSigma(f64),
}

impl fmt::Display for LossError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BatchTooSmall(n) => write!(
                f,
                "batch of {n}: contrastive losses need N >= 2 (a sample needs negatives)"
            ),
            Self::ShapeMismatch(a, b) => write!(
                f,
                "the two views differ in shape: {a:?} vs {b:?} (expected the same [N, D])"
            ),
            Self::BadTemperature(t) => write!(f, "temperature {t} must be finite and > 0"),
            Self::BadSigma(s) => write!(f, "sigma {s} must be finite and > 0"),
        }
    }
}

impl std::error::Error for LossError {}

impl ContrastiveLoss {
    pub fn new(kind: LossKind, temperature: f64, sigma: f64) -> Result<Self, LossError> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(LossError::BadTemperature(temperature));
        }
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(LossError::BadSigma(sigma));
        }
        Ok(Self {
            kind,
            temperature,
            sigma,
        })
    }
}

/// The loss and its gradients with respect to both (unnormalized) views.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LossAndGrads {
    pub loss: f32,
    pub grad_z1: Vec<f32>,
    pub grad_z2: Vec<f32>,
    /// Device memory the computation held at its peak, summed over the buffers it really
    /// allocated (0 on the host).
    #[serde(skip)]
    pub device_bytes: u64,
    /// The copies back to the host it waited for, and the compute dispatches it made outside
    /// Burn (what a step's cost is counted in: see `dcl bench train`).
    #[serde(skip)]
    pub host_reads: usize,
    #[serde(skip)]
    pub dispatches: usize,
}
