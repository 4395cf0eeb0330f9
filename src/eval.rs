//! Evaluation of frozen features: the kNN monitor (k=200, cosine, temperature 0.1, as in InstDisc,
//! MoCo and lightly's benchmarks) and a linear probe.

use crate::augment::plain_batch;
use crate::backend::read_f32;
use crate::data::{Split, SIDE};
use crate::loss::l2_normalize;
use crate::model::ResNet;
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};

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

/// Parameters of the kNN monitor.
#[derive(Debug, Clone, Copy)]
pub struct Knn {
    pub k: usize,
    pub temperature: f64,
}

impl Default for Knn {
    fn default() -> Self {
        Self {
            k: 200,
            temperature: 0.1,
        }
    }
}

impl Knn {
    /// Top-1 accuracy (0..1) of a weighted kNN vote: each of the k most cosine-similar bank
    /// samples votes for its class with weight exp(sim / temperature).
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
    ) -> anyhow::Result<f64> {
        const CHUNK: usize = 512;
        let device = &device.clone().inner();
        let n_bank = bank_labels.len();
        let k = self.k.min(n_bank);
        let bank_t = Tensor::<2>::from_data(TensorData::new(bank.to_vec(), [n_bank, dim]), device)
            .transpose();
        let mut correct = 0usize;
        for (c, labels) in query_labels.chunks(CHUNK).enumerate() {
            let rows = labels.len();
            let q = &queries[c * CHUNK * dim..(c * CHUNK + rows) * dim];
            let q = Tensor::<2>::from_data(TensorData::new(q.to_vec(), [rows, dim]), device);
            let sims = read_f32(q.matmul(bank_t.clone())).await?;
            for (row, &label) in sims.chunks_exact(n_bank).zip(labels) {
                if self.vote(row, bank_labels, k, classes) == label as usize {
                    correct += 1;
                }
            }
        }
        Ok(correct as f64 / query_labels.len().max(1) as f64)
    }

    fn vote(&self, sims: &[f32], bank_labels: &[u16], k: usize, classes: usize) -> usize {
        let mut idx: Vec<u32> = (0..sims.len() as u32).collect();
        let by_sim = |a: &u32, b: &u32| sims[*b as usize].total_cmp(&sims[*a as usize]);
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_sim);
        }
        let mut scores = vec![0.0f64; classes];
        for &i in &idx[..k] {
            scores[bank_labels[i as usize] as usize] +=
                (sims[i as usize] as f64 / self.temperature).exp();
        }
        (0..classes)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap_or(0)
    }
}

/// Linear probe: multinomial logistic regression on frozen features, full-batch Adam, evaluated
/// on the test features. Returns top-1 accuracy (0..1).
pub fn linear_probe(
    train: (&[f32], &[u16]),
    test: (&[f32], &[u16]),
    dim: usize,
    classes: usize,
    device: &Device,
) -> f64 {
    let to_tensors = |(x, y): (&[f32], &[u16])| {
        let n = y.len();
        let x = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, dim]), device);
        let y: Vec<i64> = y.iter().map(|&l| l as i64).collect();
        (
            x,
            Tensor::<1, Int>::from_data(TensorData::new(y, [n]), device),
        )
    };
    let (x, y) = to_tensors(train);
    let mut probe: Linear = LinearConfig::new(dim, classes).init(device);
    let mut optim = AdamConfig::new().init();
    let ce = CrossEntropyLossConfig::new().init(device);
    for _ in 0..300 {
        // Features are unit vectors: a scale of 10 gives the logits room without tuning.
        let loss = ce.forward(probe.forward(x.clone().mul_scalar(10.0)), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &probe);
        probe = optim.step(0.05, probe, grads);
    }
    let (xt, yt) = to_tensors(test);
    let probe = probe.valid();
    let xt = xt.inner().mul_scalar(10.0);
    let pred = probe.forward(xt).argmax(1).reshape([yt.dims()[0]]);
    let correct = pred.equal(yt.inner()).int().sum().into_scalar::<i64>();
    correct as f64 / test.1.len().max(1) as f64
}

/// The kNN monitor on frozen backbone features: bank = `train` without augmentation, queries =
/// `test`. Returns top-1 and the two feature matrices (for a linear probe).
pub fn knn_monitor(
    backbone: &ResNet,
    train: &Split,
    test: &Split,
    classes: usize,
    device: &Device,
) -> (f64, (Vec<f32>, Vec<f32>)) {
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
) -> anyhow::Result<(f64, (Vec<f32>, Vec<f32>))> {
    let bank = features(backbone, train, device).await?;
    let queries = features(backbone, test, device).await?;
    let dim = bank.len() / train.len().max(1);
    let top1 = Knn::default()
        .top1(
            &bank,
            &train.labels,
            &queries,
            &test.labels,
            dim,
            classes,
            device,
        )
        .await?;
    Ok((top1, (bank, queries)))
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
    use super::pca2;

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
