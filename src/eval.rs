//! Evaluation of frozen features: the kNN monitor (k=200, cosine, temperature 0.1, as in InstDisc,
//! MoCo and lightly's benchmarks) and a linear probe.

use crate::augment::plain_batch;
use crate::data::{Split, SIDE};
use crate::loss::l2_normalize;
use crate::model::ResNet;
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

/// L2-normalized backbone features of every image of a split, without augmentation, row-major
/// [len, dim]. Batch-norm runs in eval mode (pass a model on a non-autodiff backend).
pub fn features<B: Backend>(backbone: &ResNet<B>, split: &Split, device: &B::Device) -> Vec<f32> {
    const BATCH: usize = 500;
    let mut out = Vec::new();
    for start in (0..split.len()).step_by(BATCH) {
        let end = (start + BATCH).min(split.len());
        let images: Vec<&[u8]> = (start..end).map(|i| split.image(i)).collect();
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(plain_batch(&images), [end - start, 3, SIDE, SIDE]),
            device,
        );
        let f = l2_normalize(backbone.forward(x));
        out.extend(f.into_data().convert::<f32>().to_vec::<f32>().expect("f32"));
    }
    out
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
    pub fn top1<B: Backend>(
        &self,
        bank: &[f32],
        bank_labels: &[u16],
        queries: &[f32],
        query_labels: &[u16],
        dim: usize,
        classes: usize,
        device: &B::Device,
    ) -> f64 {
        const CHUNK: usize = 512;
        let n_bank = bank_labels.len();
        let k = self.k.min(n_bank);
        let bank_t =
            Tensor::<B, 2>::from_data(TensorData::new(bank.to_vec(), [n_bank, dim]), device)
                .transpose();
        let mut correct = 0usize;
        for (c, labels) in query_labels.chunks(CHUNK).enumerate() {
            let rows = labels.len();
            let q = &queries[c * CHUNK * dim..(c * CHUNK + rows) * dim];
            let q = Tensor::<B, 2>::from_data(TensorData::new(q.to_vec(), [rows, dim]), device);
            let sims = q
                .matmul(bank_t.clone())
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32");
            for (row, &label) in sims.chunks_exact(n_bank).zip(labels) {
                if self.vote(row, bank_labels, k, classes) == label as usize {
                    correct += 1;
                }
            }
        }
        correct as f64 / query_labels.len().max(1) as f64
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
pub fn linear_probe<B: AutodiffBackend>(
    train: (&[f32], &[u16]),
    test: (&[f32], &[u16]),
    dim: usize,
    classes: usize,
    device: &B::Device,
) -> f64 {
    let to_tensors = |(x, y): (&[f32], &[u16])| {
        let n = y.len();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [n, dim]), device);
        let y: Vec<i64> = y.iter().map(|&l| l as i64).collect();
        (
            x,
            Tensor::<B, 1, Int>::from_data(TensorData::new(y, [n]), device),
        )
    };
    let (x, y) = to_tensors(train);
    let mut probe: Linear<B> = LinearConfig::new(dim, classes).init(device);
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
    let correct = pred.equal(yt.inner()).int().sum().into_scalar();
    use burn::tensor::ElementConversion;
    correct.elem::<i64>() as f64 / test.1.len().max(1) as f64
}

/// The kNN monitor on frozen backbone features: bank = `train` without augmentation, queries =
/// `test`. Returns top-1 and the two feature matrices (for a linear probe).
pub fn knn_monitor<B: Backend>(
    backbone: &ResNet<B>,
    train: &Split,
    test: &Split,
    classes: usize,
    device: &B::Device,
) -> (f64, (Vec<f32>, Vec<f32>)) {
    let bank = features(backbone, train, device);
    let queries = features(backbone, test, device);
    let dim = bank.len() / train.len().max(1);
    let top1 = Knn::default().top1::<B>(
        &bank,
        &train.labels,
        &queries,
        &test.labels,
        dim,
        classes,
        device,
    );
    (top1, (bank, queries))
}
