//! `dcl data`: what a dataset holds, a preview of its images or views, downloads.

use crate::augment::preview;
use crate::data::discover;
use crate::files::write_atomic;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Format, image count, shape, classes and label counts.
    Info {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// A PNG grid of the first images, or of their augmented view pairs.
    Preview {
        path: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        count: usize,
        #[arg(long, default_value_t = 2)]
        scale: usize,
        /// Show two augmented views per image, drawn with this seed.
        #[arg(long)]
        views: Option<u64>,
    },
    /// Download from the official source, checksum-verified (URL and MD5 of an archive can be
    /// replaced through DCL_CIFAR10_URL / DCL_CIFAR10_MD5, and likewise for cifar100).
    Get {
        name: String,
        /// Default: the data cache ($DCL_DATA, else ~/.cache/dcl/data), where names are found.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Info { path, json } => {
            let ds = discover::load(&path)?;
            let info = ds.info();
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!(
                    "{}: {:?}, {} images ({} train, {} test), shape {:?}, {} classes",
                    ds.name,
                    info.format,
                    info.images,
                    info.train_images,
                    info.test_images,
                    info.shape,
                    info.classes
                );
            }
            Ok(())
        }
        DataCommand::Preview {
            path,
            out,
            count,
            scale,
            views,
        } => {
            let ds = discover::load(&path)?;
            write_atomic(&out, &preview::grid_png(&ds, count, scale, views)?)
        }
        DataCommand::Get { name, dir } => {
            let dir = dir.unwrap_or_else(discover::data_cache);
            let target = super::download::download(&name, &dir)?;
            println!("{name} is in {}", target.display());
            Ok(())
        }
    }
}
