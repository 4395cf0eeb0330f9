//! Evaluation of frozen features: the kNN monitor (k=200, cosine, temperature 0.1, as in InstDisc,
//! MoCo and lightly's benchmarks), and the protocol `dcl eval` reports: kNN at k = 20 and 200 and
//! a linear probe, for the encoder, the untrained encoder of the same seed and raw pixels alike.

use crate::augment::plain_batch;
use crate::backend::read_f32;
use crate::data::{Split, IMAGE_LEN, SIDE};
use crate::loss::l2_normalize;
use crate::model::ResNet;
use burn::tensor::{Device, Tensor, TensorData};

mod judge;
mod probe;
pub use judge::Judge;
pub use probe::linear_probe;

/// L2-normalized backbone features of every image of a split, without augmentation, row-major
/// [len, dim]. Batch norm runs in eval mode: pass `valid()` weights; the images go to `device`
/// without autodiff, which is what tells batch norm to use its running statistics.
pub async fn features(
    backbone: &ResNet,
    split: &Split,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    const BATCH: usize = 500;
    let device = &device.clone().inner();
    let mut out = Vec::new();
    for start in (0..split.len()).step_by(BATCH) {
        let end = (start + BATCH).min(split.len());
        let images: Vec<&[u8]> = (start..end).map(|i| split.image(i)).collect();
        let x = Tensor::<4>::from_data(
            TensorData::new(plain_batch(&images), [end - start, 3, SIDE, SIDE]),
            device,
        );
        out.extend(read_f32(l2_normalize(backbone.forward(x))).await?);
    }
    Ok(out)
}

/// A weighted kNN vote (InstDisc's, as MoCo and lightly's benchmarks use it): each of the k
/// most cosine-similar bank samples votes for its class with weight exp(sim / temperature).
#[derive(Debug, Clone)]
pub struct Knn {
    /// Every k reported: one similarity pass serves them all.
    pub ks: Vec<usize>,
    pub temperature: f64,
}

impl Default for Knn {
    /// The monitor's: k = 200, t = 0.1.
    fn default() -> Self {
        Self {
            ks: vec![200],
            temperature: 0.1,
        }
    }
}

impl Knn {
    /// Top-1 accuracy (0..1) at each of `ks`, in order. Rows of `bank` and `queries` are unit
    /// vectors of width `dim`.
    #[allow(clippy::too_many_arguments)]
    pub async fn top1(
        &self,
        bank: &[f32],
        bank_labels: &[u16],
        queries: &[f32],
        query_labels: &[u16],
        dim: usize,
        classes: usize,
        device: &Device,
    ) -> anyhow::Result<Vec<f64>> {
        const CHUNK: usize = 512;
        let device = &device.clone().inner();
        let n_bank = bank_labels.len();
        let bank_t = Tensor::<2>::from_data(TensorData::new(bank.to_vec(), [n_bank, dim]), device)
            .transpose();
        let mut correct = vec![0usize; self.ks.len()];
        for (c, labels) in query_labels.chunks(CHUNK).enumerate() {
            let rows = labels.len();
            let q = &queries[c * CHUNK * dim..(c * CHUNK + rows) * dim];
            let q = Tensor::<2>::from_data(TensorData::new(q.to_vec(), [rows, dim]), device);
            let sims = read_f32(q.matmul(bank_t.clone())).await?;
            for (row, &label) in sims.chunks_exact(n_bank).zip(labels) {
                for (hits, vote) in correct
                    .iter_mut()
                    .zip(self.votes(row, bank_labels, classes))
                {
                    *hits += usize::from(vote == label as usize);
                }
            }
        }
        let n = query_labels.len().max(1) as f64;
        Ok(correct.into_iter().map(|c| c as f64 / n).collect())
    }

    /// The class each k votes for, given one query's similarities to the bank.
    fn votes(&self, sims: &[f32], bank_labels: &[u16], classes: usize) -> Vec<usize> {
        let mut idx: Vec<u32> = (0..sims.len() as u32).collect();
        let by_sim = |a: &u32, b: &u32| sims[*b as usize].total_cmp(&sims[*a as usize]);
        let widest = self.ks.iter().max().map_or(0, |&k| k.min(idx.len()));
        if widest < idx.len() && widest > 0 {
            idx.select_nth_unstable_by(widest - 1, by_sim);
        }
        idx.truncate(widest);
        idx.sort_by(by_sim);
        self.ks
            .iter()
            .map(|&k| {
                let mut scores = vec![0.0f64; classes];
                for &i in &idx[..k.min(idx.len())] {
                    scores[bank_labels[i as usize] as usize] +=
                        (sims[i as usize] as f64 / self.temperature).exp();
                }
                (0..classes)
                    .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// Raw pixels as a representation: the normalized images (the encoder's input), each row scaled
/// to unit length, so kNN on them is cosine kNN on pixels.
pub fn pixel_features(split: &Split) -> Vec<f32> {
    let images: Vec<&[u8]> = (0..split.len()).map(|i| split.image(i)).collect();
    let mut rows = plain_batch(&images);
    for row in rows.chunks_exact_mut(IMAGE_LEN) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    rows
}

/// What one representation scores under the protocol: kNN top-1 per k, the linear probe.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scores {
    /// `{"20": 0.81, "200": 0.77}`.
    #[serde(serialize_with = "keys_as_strings")]
    pub knn: std::collections::BTreeMap<usize, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linear: Option<f64>,
}

/// Writes a map's keys as strings, as JSON has them anyway: the page's bindings turn maps into
/// plain objects, whose keys must be strings.
fn keys_as_strings<S: serde::Serializer>(
    map: &std::collections::BTreeMap<usize, f64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.iter().map(|(k, v)| (k.to_string(), v)))
}

/// The evaluation protocol: weighted kNN (cosine, t = 0.1) at each of `ks`, and the linear
/// probe when `linear`. Features are unit rows of width `dim`.
#[derive(Debug, Clone)]
pub struct Protocol {
    pub ks: Vec<usize>,
    pub linear: bool,
}

impl Default for Protocol {
    fn default() -> Self {
        Self {
            ks: vec![20, 200],
            linear: true,
        }
    }
}

impl Protocol {
    #[allow(clippy::too_many_arguments)]
    pub fn score(
        &self,
        bank: (&[f32], &[u16]),
        queries: (&[f32], &[u16]),
        dim: usize,
        classes: usize,
        device: &Device,
    ) -> anyhow::Result<Scores> {
        let knn = Knn {
            ks: self.ks.clone(),
            ..Knn::default()
        };
        let top1 = futures_lite::future::block_on(
            knn.top1(bank.0, bank.1, queries.0, queries.1, dim, classes, device),
        )?;
        Ok(Scores {
            knn: self.ks.iter().copied().zip(top1).collect(),
            linear: self
                .linear
                .then(|| linear_probe(bank, queries, dim, classes, device)),
        })
    }
}

/// The monitor's protocol: kNN at k = 20 and 200 and, natively, the linear probe. The page leaves
/// the probe out: its L-BFGS fits read the GPU back synchronously at every step, which a page cannot.
pub fn monitor_protocol() -> Protocol {
    Protocol {
        ks: vec![20, MONITOR_K],
        linear: cfg!(not(target_family = "wasm")),
    }
}

/// The k of the monitor's headline number (`knn_top1` in `metrics.jsonl`), as in the kNN monitors
/// of InstDisc, MoCo and lightly.
pub const MONITOR_K: usize = 200;

/// The monitor on frozen backbone features: bank = `train` without augmentation, queries =
/// `test`. Returns the scores and the two feature matrices.
pub fn knn_monitor(
    backbone: &ResNet,
    train: &Split,
    test: &Split,
    classes: usize,
    device: &Device,
) -> (Scores, (Vec<f32>, Vec<f32>)) {
    let monitor = knn_monitor_async(backbone, train, test, classes, device);
    futures_lite::future::block_on(monitor).expect("kNN monitor")
}

/// [`knn_monitor`], awaited.
pub async fn knn_monitor_async(
    backbone: &ResNet,
    train: &Split,
    test: &Split,
    classes: usize,
    device: &Device,
) -> anyhow::Result<(Scores, (Vec<f32>, Vec<f32>))> {
    let bank = features(backbone, train, device).await?;
    let queries = features(backbone, test, device).await?;
    let dim = bank.len() / train.len().max(1);
    let scores = monitor_scores((&bank, train), (&queries, test), dim, classes, device).await?;
    Ok((scores, (bank, queries)))
}

/// [`monitor_protocol`] on `queries` against `bank`, rows of width `dim`.
async fn monitor_scores(
    bank: (&[f32], &Split),
    queries: (&[f32], &Split),
    dim: usize,
    classes: usize,
    device: &Device,
) -> anyhow::Result<Scores> {
    let protocol = monitor_protocol();
    let (b, q) = (bank.1, queries.1);
    let knn = Knn {
        ks: protocol.ks.clone(),
        ..Knn::default()
    };
    let top1 = knn
        .top1(
            bank.0, &b.labels, queries.0, &q.labels, dim, classes, device,
        )
        .await?;
    Ok(Scores {
        knn: protocol.ks.iter().copied().zip(top1).collect(),
        linear: protocol.linear.then(|| {
            linear_probe(
                (bank.0, &b.labels),
                (queries.0, &q.labels),
                dim,
                classes,
                device,
            )
        }),
    })
}

impl Scores {
    /// `kNN@20 0.7812  kNN@200 0.7521  linear 0.8110`.
    pub fn summary(&self) -> String {
        let knn = self.knn.iter().map(|(k, v)| format!("kNN@{k} {v:.4}"));
        let linear = self.linear.map(|v| format!("linear {v:.4}"));
        knn.chain(linear).collect::<Vec<_>>().join("  ")
    }

    /// The monitor's headline number: kNN top-1 at [`MONITOR_K`].
    pub fn monitor_top1(&self) -> f64 {
        self.knn.get(&MONITOR_K).copied().unwrap_or(f64::NAN)
    }
}

/// The monitor's protocol on raw pixels (unit rows): the baseline of [`knn_monitor`].
pub async fn pixel_scores(
    train: &Split,
    test: &Split,
    classes: usize,
    device: &Device,
) -> anyhow::Result<Scores> {
    let (bank, queries) = (pixel_features(train), pixel_features(test));
    monitor_scores((&bank, train), (&queries, test), IMAGE_LEN, classes, device).await
}

/// Each row's coordinates on the first two principal components of `rows` (row-major, `dim`
/// columns), for the page's embedding scatter. Power iteration on X^T X with deflation: no
/// dim x dim matrix, and a fixed start vector so the picture does not flip between calls.
pub fn pca2(rows: &[f32], dim: usize) -> Vec<[f32; 2]> {
    let n = rows.len() / dim.max(1);
    if n == 0 {
        return vec![];
    }
    let mut mean = vec![0.0f64; dim];
    for row in rows.chunks_exact(dim) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64 / n as f64;
        }
    }
    let centered: Vec<f64> = rows
        .chunks_exact(dim)
        .flat_map(|row| row.iter().zip(&mean).map(|(&x, m)| x as f64 - m))
        .collect();
    let project = |v: &[f64]| -> Vec<f64> {
        centered
            .chunks_exact(dim)
            .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect()
    };
    let mut axes: Vec<Vec<f64>> = Vec::new();
    for _ in 0..2 {
        let mut v: Vec<f64> = (0..dim).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
        for _ in 0..200 {
            let xv = project(&v);
            let mut next = vec![0.0f64; dim];
            for (row, s) in centered.chunks_exact(dim).zip(&xv) {
                for (o, x) in next.iter_mut().zip(row) {
                    *o += x * s;
                }
            }
            for axis in &axes {
                let dot: f64 = next.iter().zip(axis).map(|(a, b)| a * b).sum();
                next.iter_mut().zip(axis).for_each(|(o, a)| *o -= dot * a);
            }
            let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm < 1e-12 {
                break;
            }
            v = next.into_iter().map(|x| x / norm).collect();
        }
        axes.push(v);
    }
    let (first, second) = (project(&axes[0]), project(&axes[1]));
    first
        .iter()
        .zip(&second)
        .map(|(&a, &b)| [a as f32, b as f32])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: [f32; 2]) -> [f32; 2] {
        let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
        [v[0] / n, v[1] / n]
    }

    /// A hand-made bank: class 0 near the x axis, class 1 near the y axis, and one class-1 point
    /// close to the x axis that only a small k hears.
    #[test]
    fn knn_votes_by_similarity_at_each_k() {
        let bank: Vec<[f32; 2]> = vec![[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0], [1.0, 0.02]];
        let labels = [0u16, 0, 1, 1, 1];
        let bank: Vec<f32> = bank.into_iter().flat_map(unit).collect();
        let queries: Vec<f32> = [[1.0, 0.0], [0.0, 1.0]]
            .into_iter()
            .flat_map(unit)
            .collect();
        let knn = Knn {
            ks: vec![1, 3],
            temperature: 0.1,
        };
        let device = crate::backend::cpu();
        let top1 = |truth: [u16; 2]| {
            futures_lite::future::block_on(
                knn.top1(&bank, &labels, &queries, &truth, 2, 2, &device),
            )
            .unwrap()
        };
        // k = 1: the x-axis query's nearest is the odd class-1 point; k = 3: two class-0 votes.
        assert_eq!(top1([1, 1]), vec![1.0, 0.5]);
        assert_eq!(top1([0, 1]), vec![0.5, 1.0]);
    }

    #[test]
    fn pca_recovers_the_two_widest_axes() {
        // A full grid on x and y (uncorrelated by construction) spread 3 and 2, and a +-0.5
        // checkerboard on z: the first component is x, the second y.
        let mut rows = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20 {
            for j in 0..10 {
                let (a, b) = ((i as f32 - 9.5) / 10.0, (j as f32 - 4.5) / 5.0);
                let c = if (i + j) % 2 == 0 { 0.5 } else { -0.5 };
                rows.extend([3.0 * a + 1.0, 2.0 * b - 2.0, c]);
                expected.push([3.0 * a, 2.0 * b]);
            }
        }
        let mean = |k: usize| expected.iter().map(|e| e[k]).sum::<f32>() / 200.0;
        let (m0, m1) = (mean(0), mean(1));
        let got = pca2(&rows, 3);
        for k in 0..2 {
            let m = [m0, m1][k];
            let sign = (got[0][k] / (expected[0][k] - m)).signum();
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g[k] - sign * (e[k] - m)).abs() < 1e-3,
                    "axis {k}: {g:?} vs {e:?}"
                );
            }
        }
    }
}
