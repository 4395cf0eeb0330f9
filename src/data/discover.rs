//! Finding and loading a dataset from `--data PATH` or a name (native only).
//!
//! Names are looked up in `$DCL_DATA`, `./data` and Debian's `/usr/share/datasets`, in that order.

use super::{cifar, idx, DataError, Dataset};
use std::fs;
use std::path::{Path, PathBuf};

pub const NAMES: [&str; 4] = ["cifar10", "cifar100", "mnist", "fashion-mnist"];

/// The folder or file names a dataset goes by on disk.
fn aliases(name: &str) -> &'static [&'static str] {
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

pub fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(dir) = std::env::var_os("DCL_DATA") {
        roots.push(PathBuf::from(dir));
    }
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

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    fs::read(path)
        .map_err(|e| DataError::new(&path.display().to_string(), 0, format!("cannot read: {e}")))
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
        return Ok(cifar::from_file(&shown, read(&path)?)?);
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

/// Official sources and MD5 checksums for `dcl data get`.
fn sources(name: &str) -> Option<&'static [(&'static str, &'static str)]> {
    Some(match name {
        "cifar10" => &[(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "c32a1d4ab5d03f1284b67883e8d87530",
        )],
        "cifar100" => &[(
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            "03b5dce01913d631647c71ecec9e9cb8",
        )],
        "mnist" => &[
            ("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ],
        "fashion-mnist" => &[
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ],
        _ => return None,
    })
}

/// Downloads a dataset into `dir/<name>` with `curl`, verifying each file's MD5 before keeping it.
pub fn download(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let files = sources(name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown dataset '{name}': expected one of {}",
            NAMES.join(", ")
        )
    })?;
    let target = dir.join(aliases(name)[0].trim_end_matches(".tar.gz"));
    fs::create_dir_all(&target)?;
    for (url, md5_hex) in files {
        let file = url.rsplit('/').next().unwrap_or("download");
        let partial = target.join(format!("{file}.part"));
        let status = std::process::Command::new("curl")
            .args([
                "--fail",
                "--location",
                "--silent",
                "--show-error",
                "--output",
            ])
            .arg(&partial)
            .arg(url)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = fs::remove_file(&partial);
            anyhow::bail!(
                "could not download {url} (no internet access, or curl missing). Place the official \
                 files by hand: put {file} into {} (or any folder named in $DCL_DATA), then pass \
                 --data {name}",
                target.display()
            );
        }
        let digest = format!("{:x}", md5::compute(fs::read(&partial)?));
        if digest != *md5_hex {
            let _ = fs::remove_file(&partial);
            anyhow::bail!("{url}: checksum mismatch (md5 {digest}, expected {md5_hex}); the file was discarded");
        }
        fs::rename(&partial, target.join(file))?;
    }
    Ok(target)
}
