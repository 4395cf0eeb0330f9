//! Finding and loading a dataset from `--data PATH` or a name (native only).
//!
//! Names are looked up in `$DCL_DATA` (or, when unset, the data cache `~/.cache/dcl/data`),
//! `./data` and Debian's `/usr/share/datasets`, in that order.

use super::{cifar, idx, DataError, Dataset, MAX_FILE};
use std::fs;
use std::path::{Path, PathBuf};

pub const NAMES: [&str; 4] = ["cifar10", "cifar100", "mnist", "fashion-mnist"];

/// The folder or file names a dataset goes by on disk.
pub(crate) fn aliases(name: &str) -> &'static [&'static str] {
    match name {
        "cifar10" => &[
            "cifar-10-batches-bin",
            "cifar10",
            "cifar-10",
            "cifar-10-binary.tar.gz",
        ],
        "cifar100" => &[
            "cifar-100-binary",
            "cifar100",
            "cifar-100",
            "cifar-100-binary.tar.gz",
        ],
        "mnist" => &["mnist"],
        "fashion-mnist" => &["fashion-mnist", "fashion_mnist"],
        _ => &[],
    }
}

/// Where `dcl data get` and `dcl serve` put what they fetch: `$DCL_DATA` when set, else
/// `$XDG_CACHE_HOME/dcl/data` (`~/.cache/dcl/data`).
pub fn data_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("DCL_DATA") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("dcl/data")
}

pub fn search_roots() -> Vec<PathBuf> {
    let mut roots = vec![data_cache()];
    roots.push(PathBuf::from("data"));
    roots.push(PathBuf::from("/usr/share/datasets"));
    roots
}

/// Resolves `--data`: an existing path, else a dataset name searched in the roots.
pub fn resolve(spec: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !NAMES.contains(&spec) {
        anyhow::bail!(
            "--data {spec}: no such file or folder, and not a dataset name ({})",
            NAMES.join(", ")
        );
    }
    let roots = search_roots();
    for root in &roots {
        for alias in aliases(spec) {
            let candidate = root.join(alias);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    let looked: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    anyhow::bail!(
        "dataset '{spec}' not found in {}; run `dcl data get {spec}` or place its files there by hand",
        looked.join(", ")
    )
}

/// A dataset file, opened once its size is known to be within [`MAX_FILE`].
fn open(path: &Path) -> Result<fs::File, DataError> {
    let shown = path.display().to_string();
    let cannot = |e: std::io::Error| DataError::new(&shown, 0, format!("cannot read: {e}"));
    let file = fs::File::open(path).map_err(cannot)?;
    let size = file.metadata().map_err(cannot)?.len();
    if size > MAX_FILE {
        return Err(DataError::new(
            &shown,
            0,
            format!(
                "{size} bytes, more than the {} MiB any dataset file has",
                MAX_FILE >> 20
            ),
        ));
    }
    Ok(file)
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut open(path)?, &mut bytes)
        .map_err(|e| DataError::new(&path.display().to_string(), 0, format!("cannot read: {e}")))?;
    Ok(bytes)
}

/// The folder holding a dataset's files: the archive's extracted subfolder when `path` is its
/// parent (`cifar-10-batches-bin`, `cifar-100-binary`), else `path` itself.
pub fn files_dir(path: &Path) -> PathBuf {
    ["cifar-10-batches-bin", "cifar-100-binary"]
        .iter()
        .map(|d| path.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| path.to_path_buf())
}

/// Loads a dataset from a CIFAR archive, a CIFAR batch file or folder, or an IDX folder.
pub fn load(spec: &str) -> anyhow::Result<Dataset> {
    let path = resolve(spec)?;
    let shown = path.display().to_string();
    if path.is_file() {
        // An archive is read as it decompresses, never whole.
        return Ok(match shown.ends_with(".bin") {
            true => cifar::from_file(&shown, read(&path)?)?,
            false => cifar::from_archive(&shown, std::io::BufReader::new(open(&path)?))?,
        });
    }
    let dir = files_dir(&path);
    let entries: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let base = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    for variant in [cifar::Variant::Cifar10, cifar::Variant::Cifar100] {
        let batches: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| variant.split_of(&base(p)).is_some())
            .collect();
        if !batches.is_empty() {
            let files = batches
                .into_iter()
                .map(|p| Ok((p.display().to_string(), read(p)?)))
                .collect::<Result<Vec<_>, DataError>>()?;
            return Ok(cifar::from_batches(&shown, variant, files)?);
        }
    }
    load_idx(&dir, &shown)
}

/// `train-images-idx3-ubyte[.gz]` and friends, as MNIST and Fashion-MNIST ship them.
fn load_idx(dir: &Path, shown: &str) -> anyhow::Result<Dataset> {
    let find = |stem: &str| -> Option<PathBuf> {
        [stem.to_string(), format!("{stem}.gz")]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
    };
    let pair = |images: &str, labels: &str| -> anyhow::Result<Option<OwnedPair>> {
        match (find(images), find(labels)) {
            (Some(i), Some(l)) => Ok(Some([
                (i.display().to_string(), read(&i)?),
                (l.display().to_string(), read(&l)?),
            ])),
            _ => Ok(None),
        }
    };
    let Some(train) = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")? else {
        anyhow::bail!(
            "{shown}: no dataset files found (expected cifar-10-binary.tar.gz, data_batch_*.bin, \
             train.bin/test.bin, or train-images-idx3-ubyte[.gz] with its labels)"
        );
    };
    let test = pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(idx::dataset(
        &name,
        borrow(&train),
        test.as_ref().map(borrow),
    )?)
}

/// An (images, labels) pair of IDX files read from disk: (path, bytes) each.
type OwnedPair = [(String, Vec<u8>); 2];

fn borrow(files: &OwnedPair) -> idx::IdxPair<'_> {
    [
        (files[0].0.as_str(), files[0].1.as_slice()),
        (files[1].0.as_str(), files[1].1.as_slice()),
    ]
}
