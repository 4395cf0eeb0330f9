//! `dcl data get`: a dataset from its official source, each file checked against its MD5.

use crate::data::discover::{aliases, NAMES};
use std::fs;
use std::path::{Path, PathBuf};

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
