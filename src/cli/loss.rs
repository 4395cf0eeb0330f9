//! `dcl loss`: the loss and its gradients for two embedding arrays, to check a port against
//! PyTorch.

use crate::data::npy;
use crate::files::write_atomic;
use crate::loss::{ContrastiveLoss, LossKind};
use burn::tensor::{Tensor, TensorData};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct LossArgs {
    #[arg(long)]
    z1: PathBuf,
    #[arg(long)]
    z2: PathBuf,
    #[arg(long, default_value = "dcl")]
    kind: LossKind,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    #[arg(long, default_value_t = 0.5)]
    sigma: f64,
    /// Write grad_z1.npy and grad_z2.npy here.
    #[arg(long)]
    grad_out: Option<PathBuf>,
}

fn read_embeddings(path: &Path) -> anyhow::Result<npy::Array> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{shown}: cannot read: {e}"))?;
    let array = npy::parse(&bytes).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    anyhow::ensure!(
        array.shape.len() == 2,
        "{shown}: expected shape [N, D], found {:?}",
        array.shape
    );
    if let Some(i) = array.data.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{shown}: non-finite value {} at flat index {i}",
            array.data[i]
        );
    }
    Ok(array)
}

pub fn run(args: LossArgs) -> anyhow::Result<()> {
    let a = read_embeddings(&args.z1)?;
    let b = read_embeddings(&args.z2)?;
    anyhow::ensure!(
        a.shape == b.shape,
        "{} has shape {:?} but {} has {:?}",
        args.z1.display(),
        a.shape,
        args.z2.display(),
        b.shape
    );
    let (n, d) = (a.shape[0], a.shape[1]);
    let criterion = ContrastiveLoss::new(args.kind, args.temperature, args.sigma)?;
    let device = crate::backend::cpu().autodiff();
    let tensor = |x: &npy::Array| {
        let data: Vec<f32> = x.data.iter().map(|&v| v as f32).collect();
        Tensor::<2>::from_data(TensorData::new(data, [n, d]), &device).require_grad()
    };
    let (z1, z2) = (tensor(&a), tensor(&b));
    let value = criterion.forward(z1.clone(), z2.clone())?;
    let scalar: f32 = value.clone().into_scalar();
    println!(
        "{}",
        serde_json::json!({ "kind": args.kind, "loss": scalar, "n": n, "d": d,
            "temperature": args.temperature, "sigma": args.sigma })
    );
    if let Some(dir) = args.grad_out {
        std::fs::create_dir_all(&dir)?;
        let grads = value.backward();
        for (name, z) in [("grad_z1.npy", z1), ("grad_z2.npy", z2)] {
            let g = z
                .grad(&grads)
                .expect("gradient of an input")
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32");
            write_atomic(&dir.join(name), &npy::to_bytes(&[n, d], &g))?;
        }
    }
    Ok(())
}
