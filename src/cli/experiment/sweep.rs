//! `dcl experiment batch-sweep`: the paper's batch-size claim on this machine. Every loss trains
//! at every batch size under the same seeds; a seed fixes the initial weights and the stream of
//! augmented views, so the losses' runs are paired and compared seed by seed. Each cell is a run
//! folder of its own, resumable: a rerun skips finished cells and continues an interrupted one
//! from its checkpoint. `results.md`, `results.json` and `results.svg` are rewritten at the end.

use crate::cli::chart::{Chart, Point, Series};
use crate::cli::pretrain::Recipe;
use crate::data::discover;
use crate::eval::{Judge, Protocol, Scores};
use crate::files::write_atomic;
use crate::loss::LossKind;
use crate::model::Encoder;
use crate::run::train;
use crate::run::RunDir;
use crate::train::RunConfig;
use crate::weights::{init_encoder, module_from_bytes};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SweepArgs {
    #[arg(long, value_delimiter = ',', default_value = "dcl,infonce")]
    losses: Vec<LossKind>,
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    batch_sizes: Vec<usize>,
    /// Seeds 1..=N, each shared by every loss and batch size.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[command(flatten)]
    recipe: Recipe,
    /// The evaluation's bank and the probe's training set: the first N training images (all by
    /// default; the queries are the whole test split).
    #[arg(long)]
    bank: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "20,200")]
    knn_k: Vec<usize>,
    /// Skip the linear probes (kNN only).
    #[arg(long)]
    no_linear: bool,
    #[arg(long)]
    out: PathBuf,
}

/// What a sweep folder was started with; a rerun must ask for the same.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Grid {
    losses: Vec<LossKind>,
    batch_sizes: Vec<usize>,
    seeds: u64,
    bank: Option<usize>,
    knn_k: Vec<usize>,
    linear: bool,
    /// The runs' settings (loss, batch size and seed are the first cell's).
    recipe: RunConfig,
}

#[derive(Serialize, Deserialize, Clone)]
struct Cell {
    loss: LossKind,
    batch_size: usize,
    seed: u64,
    scores: Scores,
}

#[derive(Serialize)]
struct Results<'a> {
    grid: &'a Grid,
    pixels: &'a Scores,
    /// The untrained encoder of each seed.
    untrained: &'a [Scores],
    cells: &'a [Cell],
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let grid = grid(&args)?;
    std::fs::create_dir_all(&args.out)?;
    check_grid(&args.out, &grid)?;
    let dataset = discover::load(&grid.recipe.data)?;
    let device = crate::backend::device(grid.recipe.device)?;
    let protocol = Protocol {
        ks: grid.knn_k.clone(),
        linear: grid.linear,
    };
    let judge = Judge::new(&dataset, grid.bank, protocol, device.clone())?;
    let pixels = cached(&args.out.join("pixels.json"), || judge.pixels())?;
    let mut untrained = Vec::new();
    let mut cells = Vec::new();
    for seed in 1..=grid.seeds {
        untrained.push(cached(
            &args.out.join(format!("untrained-s{seed}.json")),
            || judge.encoder(&init_encoder(grid.recipe.model, seed, &device)?),
        )?);
        for &batch_size in &grid.batch_sizes {
            for &loss in &grid.losses {
                let name = format!("{loss}-b{batch_size}-s{seed}");
                let run = args.out.join(&name);
                let scores = cached(&run.join("scores.json"), || {
                    eprintln!("cell {name}");
                    let config = args.recipe.config(loss, batch_size, seed);
                    train(config, &run, true, None)?;
                    let ckpt = RunDir::open(&run)?
                        .latest_checkpoint()?
                        .ok_or_else(|| anyhow::anyhow!("{name}: trained but no checkpoint"))?;
                    let encoder = Encoder::new(grid.recipe.model, &device);
                    judge.encoder(&module_from_bytes(encoder, ckpt.weights)?)
                })?;
                cells.push(Cell {
                    loss,
                    batch_size,
                    seed,
                    scores,
                });
            }
        }
    }
    let results = Results {
        grid: &grid,
        pixels: &pixels,
        untrained: &untrained,
        cells: &cells,
    };
    write_atomic(
        &args.out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    write_atomic(&args.out.join("results.md"), markdown(&results).as_bytes())?;
    write_atomic(&args.out.join("results.svg"), svg(&results).as_bytes())?;
    eprintln!(
        "wrote {}/results.md, results.json, results.svg",
        args.out.display()
    );
    Ok(())
}

fn grid(args: &SweepArgs) -> anyhow::Result<Grid> {
    anyhow::ensure!(!args.losses.is_empty(), "--losses needs one or more losses");
    anyhow::ensure!(
        !args.batch_sizes.is_empty(),
        "--batch-sizes needs one or more sizes"
    );
    anyhow::ensure!(args.seeds >= 1, "--seeds must be at least 1");
    let (loss, batch) = (args.losses[0], args.batch_sizes[0]);
    for &b in &args.batch_sizes {
        args.recipe.config(loss, b, 1).validate()?;
    }
    Ok(Grid {
        losses: args.losses.clone(),
        batch_sizes: args.batch_sizes.clone(),
        seeds: args.seeds,
        bank: args.bank,
        knn_k: args.knn_k.clone(),
        linear: !args.no_linear,
        recipe: args.recipe.config(loss, batch, 1),
    })
}

/// Writes `grid.json` in a new sweep folder, or checks that an old one asked for the same grid
/// (finished cells would otherwise be mixed with cells of other settings).
fn check_grid(out: &Path, grid: &Grid) -> anyhow::Result<()> {
    let path = out.join("grid.json");
    if path.is_file() {
        let old: Grid = serde_json::from_slice(&std::fs::read(&path)?)
            .map_err(|e| anyhow::anyhow!("{}: not a sweep's grid: {e}", path.display()))?;
        anyhow::ensure!(
            &old == grid,
            "{} holds a sweep with other settings ({}); pick another --out or repeat its flags",
            out.display(),
            path.display()
        );
        return Ok(());
    }
    write_atomic(&path, serde_json::to_string_pretty(grid)?.as_bytes())
}

/// The scores stored at `path`, or computed now and stored there (atomically: an interrupted
/// sweep never leaves a half-written result that a rerun would trust).
fn cached(path: &Path, compute: impl FnOnce() -> anyhow::Result<Scores>) -> anyhow::Result<Scores> {
    if path.is_file() {
        return serde_json::from_slice(&std::fs::read(path)?)
            .map_err(|e| anyhow::anyhow!("{}: unreadable scores: {e}", path.display()));
    }
    let scores = compute()?;
    write_atomic(path, serde_json::to_string_pretty(&scores)?.as_bytes())?;
    Ok(scores)
}

/// One reported number: the linear probe or kNN at one k.
#[derive(Clone, Copy)]
enum Metric {
    Linear,
    Knn(usize),
}

impl Metric {
    fn all(grid: &Grid) -> Vec<Metric> {
        let linear = grid.linear.then_some(Metric::Linear);
        linear
            .into_iter()
            .chain(grid.knn_k.iter().map(|&k| Metric::Knn(k)))
            .collect()
    }

    fn of(self, s: &Scores) -> f64 {
        match self {
            Metric::Linear => s.linear.unwrap_or(f64::NAN),
            Metric::Knn(k) => s.knn.get(&k).copied().unwrap_or(f64::NAN),
        }
    }

    fn label(self) -> String {
        match self {
            Metric::Linear => "linear probe".into(),
            Metric::Knn(k) => format!("kNN k={k}"),
        }
    }
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn cells_of<'a>(r: &'a Results, loss: LossKind, batch: usize) -> Vec<&'a Cell> {
    r.cells
        .iter()
        .filter(|c| c.loss == loss && c.batch_size == batch)
        .collect()
}

/// Per seed, `loss`'s score minus the reference loss' at the same batch size.
fn paired_differences(
    r: &Results,
    loss: LossKind,
    reference: LossKind,
    batch: usize,
    metric: Metric,
) -> Vec<f64> {
    cells_of(r, loss, batch)
        .iter()
        .filter_map(|c| {
            let other = r
                .cells
                .iter()
                .find(|o| o.loss == reference && o.batch_size == batch && o.seed == c.seed)?;
            Some(metric.of(&c.scores) - metric.of(&other.scores))
        })
        .collect()
}

/// The loss others are compared with: InfoNCE if the grid has it, else the first one.
fn reference(grid: &Grid) -> LossKind {
    if grid.losses.contains(&LossKind::Infonce) {
        LossKind::Infonce
    } else {
        grid.losses[0]
    }
}

fn markdown(r: &Results) -> String {
    let g = r.grid;
    let c = &g.recipe;
    let metrics = Metric::all(g);
    let mut md = format!(
        "# Batch-size sweep: {} at temperature {}\n\n",
        g.losses
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        c.temperature
    );
    let _ = writeln!(
        md,
        "Data `{}`{}, `{}`, {} epochs, {} lr {}, crop scale from {}, {} views; seeds 1..{} (paired: one seed, \
         the same initial weights and views for every loss). Evaluation: backbone features, bank \
         = {}, queries = the test split.\n",
        c.data,
        c.limit
            .map_or(String::new(), |n| format!(" (first {n} training images)")),
        c.model,
        c.epochs,
        c.optimizer,
        c.lr,
        c.crop_min_scale,
        c.views,
        g.seeds,
        g.bank
            .map_or("the whole training split".into(), |n| format!(
                "the first {n} training images"
            )),
    );
    md.push_str("## Top-1 accuracy (mean ± standard deviation over seeds)\n\n| run | batch | ");
    for m in &metrics {
        let _ = write!(md, "{} | ", m.label());
    }
    md.push_str("seeds |\n|---|---|");
    md.push_str(&"---|".repeat(metrics.len() + 1));
    md.push('\n');
    let row = |md: &mut String, name: &str, batch: &str, scores: &[&Scores]| {
        let _ = write!(md, "| {name} | {batch} | ");
        for m in &metrics {
            let xs: Vec<f64> = scores.iter().map(|s| m.of(s)).collect();
            let (mean, sd) = mean_sd(&xs);
            let _ = write!(md, "{mean:.4} ± {sd:.4} | ");
        }
        let _ = writeln!(md, "{} |", scores.len());
    };
    row(&mut md, "raw pixels", "-", &[r.pixels]);
    row(
        &mut md,
        "untrained",
        "-",
        &r.untrained.iter().collect::<Vec<_>>(),
    );
    for &b in &g.batch_sizes {
        for &l in &g.losses {
            let scores: Vec<&Scores> = cells_of(r, l, b).iter().map(|c| &c.scores).collect();
            row(&mut md, &l.to_string(), &b.to_string(), &scores);
        }
    }
    let base = reference(g);
    for &l in g.losses.iter().filter(|&&l| l != base) {
        let _ = write!(
            md,
            "\n## Paired difference: {l} minus {base} (mean ± standard deviation over seeds)\n\n| batch | "
        );
        for m in &metrics {
            let _ = write!(md, "{} | ", m.label());
        }
        md.push_str("seeds |\n|---|");
        md.push_str(&"---|".repeat(metrics.len() + 1));
        md.push('\n');
        for &b in &g.batch_sizes {
            let _ = write!(md, "| {b} | ");
            let mut n = 0;
            for &m in &metrics {
                let d = paired_differences(r, l, base, b, m);
                n = d.len();
                let (mean, sd) = mean_sd(&d);
                let _ = write!(md, "{mean:+.4} ± {sd:.4} | ");
            }
            let _ = writeln!(md, "{n} |");
        }
    }
    md
}

/// The first metric (the linear probe, when run) against batch size per loss, bars ± one
/// standard deviation; raw pixels and the untrained encoder as levels.
fn svg(r: &Results) -> String {
    let metric = Metric::all(r.grid)[0];
    let series = r
        .grid
        .losses
        .iter()
        .map(|&loss| Series {
            label: loss.to_string(),
            points: r
                .grid
                .batch_sizes
                .iter()
                .map(|&b| {
                    let xs: Vec<f64> = cells_of(r, loss, b)
                        .iter()
                        .map(|c| metric.of(&c.scores))
                        .collect();
                    let (mean, sd) = mean_sd(&xs);
                    Point {
                        batch_size: b,
                        value: mean,
                        low: mean - sd,
                        high: mean + sd,
                    }
                })
                .collect(),
        })
        .collect();
    let untrained: Vec<f64> = r.untrained.iter().map(|s| metric.of(s)).collect();
    Chart {
        y_label: format!("{} top-1", metric.label()),
        series,
        levels: vec![
            ("raw pixels".into(), metric.of(r.pixels)),
            ("untrained".into(), mean_sd(&untrained).0),
        ],
        y_range: None,
    }
    .svg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(linear: f64, knn20: f64) -> Scores {
        Scores {
            knn: [(20, knn20)].into_iter().collect(),
            linear: Some(linear),
        }
    }

    #[test]
    fn mean_and_sample_deviation() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_sd(&[0.7]), (0.7, 0.0));
    }

    #[test]
    fn differences_pair_cells_by_seed() {
        let grid = Grid {
            losses: vec![LossKind::Dcl, LossKind::Infonce],
            batch_sizes: vec![32],
            seeds: 2,
            bank: None,
            knn_k: vec![20],
            linear: true,
            recipe: RunConfig::default(),
        };
        let cell = |loss, seed, linear| Cell {
            loss,
            batch_size: 32,
            seed,
            scores: scores(linear, 0.5),
        };
        // Listed out of seed order on purpose: pairing goes by seed, not position.
        let cells = vec![
            cell(LossKind::Dcl, 1, 0.80),
            cell(LossKind::Infonce, 2, 0.70),
            cell(LossKind::Infonce, 1, 0.75),
            cell(LossKind::Dcl, 2, 0.78),
        ];
        let (pixels, untrained) = (scores(0.6, 0.7), vec![scores(0.5, 0.4); 2]);
        let r = Results {
            grid: &grid,
            pixels: &pixels,
            untrained: &untrained,
            cells: &cells,
        };
        let d = paired_differences(&r, LossKind::Dcl, LossKind::Infonce, 32, Metric::Linear);
        assert_eq!(d.len(), 2);
        assert!(
            (d[0] - 0.05).abs() < 1e-12 && (d[1] - 0.08).abs() < 1e-12,
            "{d:?}"
        );
        let md = markdown(&r);
        assert!(
            md.contains("| dcl | 32 | 0.7900 ± 0.0141 | 0.5000 ± 0.0000 | 2 |"),
            "{md}"
        );
        assert!(
            md.contains("| 32 | +0.0650 ± 0.0212 | +0.0000 ± 0.0000 | 2 |"),
            "{md}"
        );
        assert!(
            md.contains("| raw pixels | - | 0.6000 ± 0.0000 | 0.7000 ± 0.0000 | 1 |"),
            "{md}"
        );
        assert!(svg(&r).contains("raw pixels"));
    }
}
