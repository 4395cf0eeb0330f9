//! The run driver: the epoch loop, the kNN monitor's cadence and the moments for checkpoints,
//! written once. The CLI runs a [`Session`] to the end into a sink that writes the run folder;
//! the page's worker pumps [`Session::advance`] one event at a time and draws each; experiments
//! collect the events they need.
//!
//! Events come in this order: the monitor on raw pixels and on the untrained encoder, then per epoch
//! its steps, the evaluation after it, and `Epoch` (a checkpoint is due); `Finished` last. A
//! session restored from a checkpoint after epoch e goes on with epoch e + 1's first step.

use super::{RunConfig, Strategy, Trainer};
use crate::collective::Collective;
use crate::data::{Dataset, Split};
use crate::eval::{knn_monitor_async, pixel_scores, Scores};
use crate::model::Encoder;
use burn::module::AutodiffModule;
use burn::tensor::Device;
use serde::Serialize;
use web_time::Instant;

/// What a run reports; serialized as one line of `metrics.jsonl` (`event` names the kind).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The kNN monitor on raw pixels, once before anything else: the level an encoder must
    /// beat to be of use.
    Pixels {
        knn_top1: f64,
        #[serde(flatten)]
        scores: Scores,
    },
    /// One optimization step; `step` counts from 0 over the whole run, `images_per_sec` is the
    /// current epoch's average after its first step (images, not views; see `Pace`).
    Step {
        epoch: usize,
        step: usize,
        loss: f64,
        lr: f64,
        images_per_sec: f64,
    },
    /// The monitor after `epoch` epochs (0: the untrained encoder): `knn_top1` at k = 200, and
    /// `knn` at k = 20 and 200 and `linear` (the probe; natively only) in `scores`. (Logs
    /// written before session 13 name it `knn`.)
    Evaluation {
        epoch: usize,
        knn_top1: f64,
        #[serde(flatten)]
        scores: Scores,
        /// The queries' backbone features, row-major (the page's scatter and neighbours).
        #[serde(skip)]
        features: Vec<f32>,
    },
    /// Epoch `epoch` (counted from 1) is complete and evaluated: the moment for a checkpoint.
    Epoch {
        epoch: usize,
    },
    Finished,
}

/// Where a run's events go when the session runs to its end.
pub trait Sink {
    fn record(&mut self, event: &Event, trainer: &Trainer) -> anyhow::Result<()>;
}

/// The kNN monitor's data: the bank (the training images the run uses, un-augmented) and the
/// queries (the test split, or its first `eval_images`).
struct Monitor {
    bank: Split,
    queries: Split,
    classes: usize,
}

pub struct Session {
    /// The run's replicas; the session reports on this process's trainer (rank 0's with
    /// `--devices`).
    strategy: Strategy,
    /// `None` when the dataset has no test split.
    monitor: Option<Monitor>,
    /// The epoch whose evaluation has been reported.
    evaluated: Option<usize>,
    pixels_reported: bool,
    checkpoint_due: bool,
    pace: Option<Pace>,
}

/// The epoch's images/s from the end of its first step on (that step's own figure until then):
/// a run's first step also compiles the GPU's kernels (28 s of the page's first step on
/// SwiftShader, 1.4 s each after), which an average from the epoch's start carries for long.
struct Pace {
    since: Instant,
    images: usize,
    first: bool,
}

impl Pace {
    fn new(first: bool) -> Self {
        Self {
            since: Instant::now(),
            images: 0,
            first,
        }
    }

    /// `images` more trained: the rate so far, counted afresh after the first step.
    fn step(&mut self, images: usize) -> f64 {
        self.images += images;
        let rate = self.images as f64 / self.since.elapsed().as_secs_f64();
        if self.first {
            *self = Self::new(false);
        }
        rate
    }
}

impl Session {
    /// A fresh run of `config` on `dataset` (its `limit` and `eval_images` applied here).
    /// `device` must have autodiff enabled (see `backend::device`).
    pub fn new(config: RunConfig, dataset: &Dataset, device: Device) -> anyhow::Result<Self> {
        Self::in_group(config, dataset, device, None)
    }

    /// [`Session::new`] for one rank of processes that train together (an MPI job). Rank 0
    /// alone runs the monitor: the run's record is its.
    pub fn in_group(
        config: RunConfig,
        dataset: &Dataset,
        device: Device,
        group: Option<Collective>,
    ) -> anyhow::Result<Self> {
        let config = config.for_data(dataset);
        let train = dataset.train.head(config.limit.unwrap_or(usize::MAX));
        let reports = group.as_ref().is_none_or(|g| g.rank() == 0);
        let monitor = (reports && !dataset.test.is_empty()).then(|| Monitor {
            bank: train.clone(),
            queries: dataset.test.head(config.eval_images.unwrap_or(usize::MAX)),
            classes: dataset.classes,
        });
        Ok(Self {
            strategy: match group {
                Some(group) => Strategy::rank(config, train, device, group)?,
                None => Strategy::new(config, train, device)?,
            },
            monitor,
            evaluated: None,
            pixels_reported: false,
            checkpoint_due: false,
            pace: None,
        })
    }

    pub fn trainer(&self) -> &Trainer {
        self.strategy.trainer()
    }

    /// Replaces the weights (a saved `model.safetensors`, say) and starts the optimizer afresh;
    /// the run goes on from where it stands.
    pub fn load_encoder(&mut self, encoder: Encoder) -> anyhow::Result<()> {
        self.strategy.load_encoder(encoder)
    }

    pub fn config(&self) -> &RunConfig {
        self.trainer().config()
    }

    /// The monitor's queries (empty without a test split).
    pub fn queries(&self) -> Option<&Split> {
        self.monitor.as_ref().map(|m| &m.queries)
    }

    /// Continues from a checkpoint taken after `epoch` epochs (its evaluation was reported).
    pub fn restore(
        &mut self,
        epoch: usize,
        weights: Vec<u8>,
        optimizer: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.strategy.restore(epoch, weights, optimizer)?;
        self.evaluated = Some(epoch);
        self.pixels_reported = true;
        self.checkpoint_due = false;
        Ok(())
    }

    /// Continues after `epoch` epochs from weights alone, the optimizer's state started afresh:
    /// the page's autosave, since Burn reads optimizer state back from WebGPU only by blocking,
    /// which a page cannot do. The learning-rate schedule and the views go on from `epoch`.
    pub fn continue_from(&mut self, epoch: usize, encoder: Encoder) -> anyhow::Result<()> {
        self.strategy.continue_from(epoch, encoder)?;
        self.evaluated = Some(epoch);
        self.pixels_reported = true;
        self.checkpoint_due = false;
        Ok(())
    }

    /// The next event: a step, an evaluation, a checkpoint moment, or `Finished` (for good).
    pub async fn advance(&mut self) -> anyhow::Result<Event> {
        if self.trainer().epoch_finished() && !self.trainer().finished() {
            self.strategy.end_epoch();
            self.checkpoint_due = true;
            self.pace = None;
        }
        if let Some(m) = self.monitor.as_ref().filter(|_| !self.pixels_reported) {
            self.pixels_reported = true;
            let scores =
                pixel_scores(&m.bank, &m.queries, m.classes, self.trainer().device()).await?;
            return Ok(Event::Pixels {
                knn_top1: scores.monitor_top1(),
                scores,
            });
        }
        let epoch = self.trainer().epoch();
        if self.monitor.is_some() && self.evaluated != Some(epoch) {
            self.evaluated = Some(epoch);
            return self.evaluate().await;
        }
        if std::mem::take(&mut self.checkpoint_due) {
            return Ok(Event::Epoch { epoch });
        }
        if self.trainer().finished() {
            return Ok(Event::Finished);
        }
        let batch = self.config().batch_size;
        let pace = self.pace.get_or_insert_with(|| Pace::new(true));
        let step = self.strategy.step_async().await?;
        Ok(Event::Step {
            epoch: step.epoch,
            step: step.step,
            loss: step.loss,
            lr: step.lr,
            images_per_sec: pace.step(batch),
        })
    }

    /// The kNN monitor on the current encoder, now (the page asks after loading weights);
    /// `knn_top1` is NaN without a test split.
    pub async fn evaluate(&self) -> anyhow::Result<Event> {
        let epoch = self.trainer().epoch();
        let Some(m) = &self.monitor else {
            return Ok(Event::Evaluation {
                epoch,
                knn_top1: f64::NAN,
                scores: Scores::default(),
                features: vec![],
            });
        };
        let backbone = self.trainer().encoder().valid().backbone;
        let device = self.trainer().device();
        let (scores, (_, features)) =
            knn_monitor_async(&backbone, &m.bank, &m.queries, m.classes, device).await?;
        Ok(Event::Evaluation {
            epoch,
            knn_top1: scores.monitor_top1(),
            scores,
            features,
        })
    }

    /// Runs to the end, each event into `sink` (native callers; the page pumps `advance`).
    pub fn run(&mut self, sink: &mut dyn Sink) -> anyhow::Result<()> {
        loop {
            let event = futures_lite::future::block_on(self.advance())?;
            sink.record(&event, self.strategy.trainer())?;
            if event == Event::Finished {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Format, IMAGE_LEN};

    struct Collect(Vec<Event>);

    impl Sink for Collect {
        fn record(&mut self, event: &Event, _: &Trainer) -> anyhow::Result<()> {
            self.0.push(event.clone());
            Ok(())
        }
    }

    fn dataset(test_images: usize) -> Dataset {
        let split = |n: usize| Split {
            images: (0..n * IMAGE_LEN).map(|i| (i * 31 % 253) as u8).collect(),
            labels: (0..n).map(|i| (i % 2) as u16).collect(),
        };
        Dataset {
            name: "synthetic".into(),
            format: Format::Cifar10,
            classes: 2,
            source_shape: [3, 32, 32],
            train: split(12),
            test: split(test_images),
        }
    }

    fn config() -> RunConfig {
        RunConfig {
            batch_size: 4,
            epochs: 2,
            limit: Some(8),
            lr: 0.01,
            ..RunConfig::default()
        }
    }

    fn kinds(events: &[Event]) -> String {
        let kind = |e: &Event| match e {
            Event::Pixels { .. } => "P",
            Event::Step { .. } => "s",
            Event::Evaluation { .. } => "E",
            Event::Epoch { .. } => "|",
            Event::Finished => ".",
        };
        events.iter().map(kind).collect()
    }

    fn run(session: &mut Session) -> Vec<Event> {
        let mut sink = Collect(vec![]);
        session.run(&mut sink).unwrap();
        sink.0
    }

    #[test]
    fn events_come_in_the_documented_order() {
        let device = crate::backend::cpu().autodiff();
        let mut session = Session::new(config(), &dataset(6), device.clone()).unwrap();
        let events = run(&mut session);
        // limit 8, batch 4: two steps an epoch.
        assert_eq!(kinds(&events), "PEssE|ssE|.");
        let steps: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                Event::Step { step, .. } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(steps, [0, 1, 2, 3]);
        let Event::Pixels { knn_top1, .. } = events[0] else {
            unreachable!()
        };
        assert!((0.0..=1.0).contains(&knn_top1), "{knn_top1}");
        assert!(matches!(events[4], Event::Evaluation { epoch: 1, .. }));
        assert!(matches!(events[5], Event::Epoch { epoch: 1 }));
        let Event::Evaluation { features, .. } = &events[1] else {
            unreachable!()
        };
        assert_eq!(
            features.len(),
            6 * 128,
            "resnet-mini's features of 6 queries"
        );
        // Finished stays finished.
        let again = futures_lite::future::block_on(session.advance()).unwrap();
        assert_eq!(again, Event::Finished);
        // Without a test split: no evaluations, the same steps and checkpoints.
        let mut session = Session::new(config(), &dataset(0), device).unwrap();
        assert_eq!(kinds(&run(&mut session)), "ss|ss|.");
    }

    #[test]
    fn a_restored_session_continues_where_the_checkpoint_left_off() {
        let device = crate::backend::cpu().autodiff();
        let mut whole = Session::new(config(), &dataset(4), device.clone()).unwrap();
        let events = run(&mut whole);
        let mut first = Session::new(config(), &dataset(4), device.clone()).unwrap();
        let mut snapshot = None;
        while snapshot.is_none() {
            if let Event::Epoch { .. } = futures_lite::future::block_on(first.advance()).unwrap() {
                snapshot = Some(first.trainer().snapshot().unwrap());
            }
        }
        let (weights, optimizer) = snapshot.unwrap();
        let mut resumed = Session::new(config(), &dataset(4), device.clone()).unwrap();
        resumed.restore(1, weights, optimizer).unwrap();
        let rest = run(&mut resumed);
        assert_eq!(kinds(&rest), "ssE|.");
        let loss = |e: &Event| match e {
            Event::Step { loss, .. } => Some(*loss),
            Event::Evaluation { knn_top1, .. } => Some(*knn_top1),
            _ => None,
        };
        let tail: Vec<_> = events[6..].iter().map(loss).collect();
        assert_eq!(rest.iter().map(loss).collect::<Vec<_>>(), tail);

        // From epoch 1's weights alone (the page's autosave): the same steps, numbered on from
        // epoch 1 at epoch 1's learning rate, with a fresh optimizer (SGD's momentum restarts,
        // so the losses after the first step differ).
        let mut continued = Session::new(config(), &dataset(4), device).unwrap();
        let weights = first.trainer().encoder().clone();
        continued.continue_from(1, weights).unwrap();
        let rest = run(&mut continued);
        assert_eq!(kinds(&rest), "ssE|.");
        let steps = |events: &[Event]| -> Vec<(usize, usize, f64)> {
            let step = |e: &Event| match e {
                Event::Step {
                    epoch, step, lr, ..
                } => Some((*epoch, *step, *lr)),
                _ => None,
            };
            events.iter().filter_map(step).collect()
        };
        assert_eq!(steps(&rest), steps(&events[6..]));
        assert_eq!(
            loss(&rest[0]),
            tail[0],
            "the first step sees the same weights and views"
        );
    }
}
