//! Where a run stands and what it trains on next: each epoch's order of the images, each step's
//! views, the next step's views in the making, and the learning rate at each step. Everything
//! random is keyed by (seed, epoch, sample), so a run resumed from an epoch checkpoint replays
//! exactly what an uninterrupted run would.

use super::prefetch::{Prefetch, Views};
use super::RunConfig;
use crate::augment::{view_pairs, ViewConfig};
use crate::data::{Split, IMAGE_LEN};
use rand::seq::SliceRandom;
use std::ops::Range;

pub(super) struct Schedule {
    train: Split,
    views: ViewConfig,
    seed: u64,
    batch_size: usize,
    epochs: usize,
    lr: f64,
    warmup_epochs: f64,
    /// This epoch's order of the training images.
    order: Vec<usize>,
    /// Epochs completed so far.
    pub(super) epoch: usize,
    /// Steps taken in the current epoch.
    pub(super) step_in_epoch: usize,
    /// The next step's views, in the making while this step runs.
    prefetch: Prefetch,
}

impl Schedule {
    /// The start of `config`'s run over `train`.
    pub(super) fn new(config: &RunConfig, train: Split) -> anyhow::Result<Self> {
        anyhow::ensure!(
            train.len() >= config.batch_size,
            "{} training images are fewer than one batch of {}",
            train.len(),
            config.batch_size
        );
        let mut schedule = Self {
            train,
            views: config.views.config(config.crop_min_scale),
            seed: config.seed,
            batch_size: config.batch_size,
            epochs: config.epochs,
            lr: config.lr,
            warmup_epochs: config.warmup_epochs,
            order: vec![],
            epoch: 0,
            step_in_epoch: 0,
            prefetch: Prefetch::default(),
        };
        schedule.start_epoch(0);
        Ok(schedule)
    }

    /// Goes to the start of the epoch after `epochs` completed ones.
    pub(super) fn start_epoch(&mut self, epochs: usize) {
        self.epoch = epochs;
        self.step_in_epoch = 0;
        let mut rng = crate::augment::sample_rng(self.seed ^ 0x005e_ed0f_0d3e, epochs as u64);
        self.order = (0..self.train.len()).collect();
        self.order.shuffle(&mut rng);
    }

    /// Full batches per epoch (the last partial batch is dropped, as contrastive training does).
    pub(super) fn steps_per_epoch(&self) -> usize {
        self.train.len() / self.batch_size
    }

    pub(super) fn global_step(&self) -> usize {
        self.epoch * self.steps_per_epoch() + self.step_in_epoch
    }

    pub(super) fn epoch_finished(&self) -> bool {
        self.step_in_epoch >= self.steps_per_epoch()
    }

    pub(super) fn finished(&self) -> bool {
        self.epoch >= self.epochs
    }

    /// Linear warm-up, then cosine decay to zero over the whole run.
    pub(super) fn learning_rate(&self, step: usize) -> f64 {
        let total = (self.epochs * self.steps_per_epoch()).max(1) as f64;
        let warmup = (self.warmup_epochs * self.steps_per_epoch() as f64).round();
        let step = step as f64;
        if step < warmup {
            return self.lr * (step + 1.0) / warmup;
        }
        let progress = ((step - warmup) / (total - warmup).max(1.0)).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The views of rows `rows` of the next batch. A sample's views are keyed by its place in
    /// the epoch, so a peer's slice gets the very views one device would make for those rows.
    pub(super) fn views_of(&self, rows: Range<usize>) -> Views {
        if self.epoch_finished() {
            return (vec![], vec![]);
        }
        self.view_job(self.step_in_epoch, rows)()
    }

    /// Makes the views of rows `rows` of step `step` of this epoch, apart from the schedule: the
    /// images are copied (a few kilobytes a row), so the job can run on another thread.
    pub(super) fn view_job(
        &self,
        step: usize,
        rows: Range<usize>,
    ) -> impl FnOnce() -> Views + Send + 'static {
        let start = step * self.batch_size + rows.start;
        let images: Vec<u8> = self.order[start..start + rows.len()]
            .iter()
            .flat_map(|&i| self.train.image(i).iter().copied())
            .collect();
        let (views, seed) = (self.views, self.seed);
        let stream0 = (self.epoch * self.train.len() + start) as u64;
        move || {
            let images: Vec<&[u8]> = images.chunks_exact(IMAGE_LEN).collect();
            view_pairs(&images, &views, seed, stream0)
        }
    }

    /// This step's views, from the prefetch when it made them, and the next step's set going.
    pub(super) fn take_views(&mut self, rows: Range<usize>) -> Views {
        let (epoch, first, count) = (self.epoch, rows.start, rows.len());
        let key = |step| (epoch, step, first, count);
        let now = key(self.step_in_epoch);
        let views = (self.prefetch.take(now)).unwrap_or_else(|| self.views_of(rows.clone()));
        let next = self.step_in_epoch + 1;
        if next < self.steps_per_epoch() {
            let job = self.view_job(next, rows.clone());
            self.prefetch.start(key(next), job);
        }
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(warmup_epochs: f64) -> Schedule {
        let config = RunConfig {
            batch_size: 4,
            epochs: 10,
            lr: 0.5,
            warmup_epochs,
            ..RunConfig::default()
        };
        let split = Split {
            images: vec![0; 40 * IMAGE_LEN],
            labels: vec![0; 40],
        };
        Schedule::new(&config, split).unwrap()
    }

    #[test]
    fn warmup_then_cosine_to_zero() {
        let t = schedule(2.0); // 10 steps per epoch, 100 in all, 20 of warm-up
        assert!((t.learning_rate(0) - 0.5 / 20.0).abs() < 1e-12);
        assert!((t.learning_rate(19) - 0.5).abs() < 1e-12);
        assert!((t.learning_rate(20) - 0.5).abs() < 1e-12);
        assert!(
            (t.learning_rate(60) - 0.25).abs() < 1e-12,
            "half way through the cosine"
        );
        assert!(t.learning_rate(99) < 0.001);
        let t = schedule(0.0);
        assert!((t.learning_rate(0) - 0.5).abs() < 1e-12);
    }
}
