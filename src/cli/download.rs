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

/// A source's URL and MD5, or the ones `DCL_<NAME>_URL` / `DCL_<NAME>_MD5` put in their place
/// (single-file datasets only: CIFAR-10 and CIFAR-100). Tests and mirrors use the override.
fn source_for(
    name: &str,
    url: &'static str,
    md5_hex: &'static str,
    single: bool,
) -> (String, String) {
    let var = |what: &str| {
        let key = format!("DCL_{}_{what}", name.to_ascii_uppercase().replace('-', "_"));
        single.then(|| std::env::var(key).ok()).flatten()
    };
    (
        var("URL").unwrap_or_else(|| url.to_string()),
        var("MD5").unwrap_or_else(|| md5_hex.to_string()),
    )
}

/// Downloads a dataset into `dir` with `curl`, each file checked against its MD5 before it
/// takes its final name (a failed, truncated or corrupted download leaves nothing behind).
/// An archive lands as `dir/<archive>`, IDX files in `dir/<name>/`; returns that path, which
/// `--data` and the name lookup both find.
pub fn download(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let files = sources(name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown dataset '{name}': expected one of {}",
            NAMES.join(", ")
        )
    })?;
    let single = files.len() == 1;
    let target = if single {
        dir.to_path_buf()
    } else {
        dir.join(aliases(name)[0])
    };
    fs::create_dir_all(&target)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", target.display()))?;
    let mut last = target.clone();
    for (official_url, official_md5) in files {
        let (url, md5_hex) = source_for(name, official_url, official_md5, single);
        // The official file name whatever the URL: the name lookup goes by it.
        last = target.join(official_url.rsplit('/').next().unwrap_or("download"));
        fetch_verified(&url, &md5_hex, &last)?;
    }
    Ok(if single { last } else { target })
}

/// `url` to `dest` through `dest.part`, renamed only once its MD5 is `md5_hex`.
fn fetch_verified(url: &str, md5_hex: &str, dest: &Path) -> anyhow::Result<()> {
    let file = dest
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let partial = dest.with_file_name(format!("{file}.part"));
    let status = std::process::Command::new("curl")
        .args(["--fail", "--location", "--silent", "--show-error"])
        .args(["--connect-timeout", "10", "--output"])
        .arg(&partial)
        .arg(url)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        let _ = fs::remove_file(&partial);
        anyhow::bail!(
            "could not download {url} (no internet access, or curl missing). Place the official \
             files by hand: put {file} into {} (or any folder named in $DCL_DATA), then pass \
             --data with its path",
            dest.parent().unwrap_or(dest).display()
        );
    }
    let digest = md5_of(&partial)?;
    if !digest.eq_ignore_ascii_case(md5_hex) {
        let _ = fs::remove_file(&partial);
        anyhow::bail!(
            "{url}: checksum mismatch (md5 {digest}, expected {md5_hex}): the download is \
             truncated or corrupted and was discarded"
        );
    }
    fs::rename(&partial, dest)?;
    Ok(())
}

/// A file's MD5, read in pieces (CIFAR-10's archive is 170 MB).
fn md5_of(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut context = md5::Context::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("{:x}", context.compute()));
        }
        context.consume(&buf[..n]);
    }
}
