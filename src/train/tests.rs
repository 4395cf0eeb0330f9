//! The trainer's own tests: resume, prefetch and seeds against steps made directly.

use super::*;
use crate::loss::LossKind;
use crate::optim::OptimizerKind;

pub(super) fn device() -> Device {
    crate::backend::cpu().autodiff()
}

/// `n` images of varied pixels.
pub(super) fn varied_split(n: usize) -> Split {
    Split {
        images: (0..n * IMAGE_LEN).map(|i| (i * 37 % 251) as u8).collect(),
        labels: vec![0; n],
    }
}

pub(super) fn trainer(warmup_epochs: f64) -> Trainer {
    let config = RunConfig {
        data: "synthetic".into(),
        batch_size: 4,
        epochs: 10,
        lr: 0.5,
        weight_decay: 0.0,
        warmup_epochs,
        ..RunConfig::default()
    };
    let split = Split {
        images: vec![0; 40 * IMAGE_LEN],
        labels: vec![0; 40],
    };
    Trainer::new(config, split, device()).unwrap()
}

/// A trainer restored from a snapshot takes the very step the original takes next, for each
/// optimizer (its momenta and moments travel in the snapshot).
#[test]
fn restore_then_step_equals_step() {
    let device = device();
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::Lars] {
        let mut config = trainer(0.0).config().clone();
        config.optimizer = optimizer;
        config.lr = 0.01;
        let split = varied_split(8);
        let mut original = Trainer::new(config.clone(), split.clone(), device.clone()).unwrap();
        original.step().unwrap();
        original.step().unwrap();
        original.end_epoch();
        let (weights, state) = original.snapshot().unwrap();
        let mut restored = Trainer::new(config, split, device.clone()).unwrap();
        restored.restore(1, weights, state).unwrap();
        let (a, b) = (original.step().unwrap(), restored.step().unwrap());
        assert_eq!(a.loss, b.loss, "{optimizer:?}: the loss after restoring");
        let (a, b) = (original.step().unwrap(), restored.step().unwrap());
        assert_eq!(a.loss, b.loss, "{optimizer:?}: the loss one update later");
        let tensors = |t: &Trainer| crate::weights::torchvision_tensors(t.encoder());
        for (a, b) in tensors(&original).iter().zip(tensors(&restored)) {
            assert_eq!(a.data, b.data, "{optimizer:?}: {}", a.name);
        }
    }
}

/// The views a step takes from the prefetch are the ones it would have made itself, and a
/// restore (which moves the run elsewhere) makes the stale job's views go unused.
#[test]
fn prefetched_views_are_the_views_made_on_demand() {
    let mut t = Trainer::new(trainer(0.0).config().clone(), varied_split(8), device()).unwrap();
    let rows = t.rows();
    let first = t.schedule.take_views(rows.clone());
    assert_eq!(first, t.schedule.view_job(0, rows.clone())());
    t.schedule.step_in_epoch = 1;
    let expected = t.schedule.views_of(rows.clone());
    assert_eq!(
        t.schedule.take_views(rows.clone()),
        expected,
        "step 1, prefetched"
    );
    t.end_epoch();
    let (weights, optimizer) = t.snapshot().unwrap();
    t.schedule.step_in_epoch = 0;
    t.schedule.take_views(rows.clone()); // step 1 of epoch 1 in the making
    t.restore(0, weights, optimizer).unwrap();
    t.schedule.step_in_epoch = 1;
    assert_eq!(
        t.schedule.take_views(rows),
        expected,
        "epoch 0 again, not epoch 1's views"
    );
}

/// What `dcl experiment batch-sweep` pairs on: one seed, every loss starts from the same
/// weights and trains on the same views; another seed changes both.
#[test]
fn a_seed_fixes_weights_and_views_whatever_the_loss() {
    let split = varied_split(8);
    let make = |loss, seed| {
        let config = RunConfig {
            loss,
            seed,
            ..trainer(0.0).config().clone()
        };
        Trainer::new(config, split.clone(), device()).unwrap()
    };
    let weights = |t: &Trainer| {
        let tensors = crate::weights::torchvision_tensors(t.encoder());
        tensors.into_iter().map(|t| t.data).collect::<Vec<_>>()
    };
    let (dcl, infonce) = (make(LossKind::Dcl, 1), make(LossKind::Infonce, 1));
    assert!(weights(&dcl) == weights(&infonce));
    assert_eq!(dcl.upcoming_views(4), infonce.upcoming_views(4));
    let other = make(LossKind::Dcl, 2);
    assert!(weights(&dcl) != weights(&other));
    assert_ne!(dcl.upcoming_views(4), other.upcoming_views(4));
}

#[test]
fn rejects_batches_larger_than_the_data() {
    let mut config = trainer(0.0).config().clone();
    config.batch_size = 64;
    let split = Split {
        images: vec![0; 10 * IMAGE_LEN],
        labels: vec![0; 10],
    };
    let err = Trainer::new(config, split, device()).err().unwrap();
    assert!(err.to_string().contains("fewer than one batch"), "{err}");
}
