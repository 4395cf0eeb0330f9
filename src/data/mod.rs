//! Datasets as bytes in, 3x32x32 u8 images out.
//!
//! Readers take byte slices, not paths, so the web page (file picker, fetch) and the native CLI
//! (files) share them. Every image is stored CHW at 3x32x32: grayscale data is replicated to three
//! channels and padded to 32x32, so one model serves CIFAR and (Fashion-)MNIST alike.

pub mod cifar;
pub mod discover;
pub mod idx;
#[cfg(not(target_arch = "wasm32"))]
pub mod npy;

use serde::Serialize;
use std::fmt;
use std::io::{BufRead, Read};

pub const SIDE: usize = 32;
pub const CHANNELS: usize = 3;
pub const IMAGE_LEN: usize = CHANNELS * SIDE * SIDE;

/// A corrupt or truncated input, named by file and byte offset.
#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    pub file: String,
    pub offset: usize,
    pub problem: String,
}

impl DataError {
    pub fn new(file: &str, offset: usize, problem: impl Into<String>) -> Self {
        Self {
            file: file.to_string(),
            offset,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (at byte {})",
            self.file, self.problem, self.offset
        )
    }
}

impl std::error::Error for DataError {}

/// Where the images came from, for `dcl data info` and the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Cifar10,
    Cifar100,
    Idx,
}

/// One split of labelled images, CHW u8, `IMAGE_LEN` bytes each.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u16>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_LEN..(i + 1) * IMAGE_LEN]
    }

    /// A copy of the first `n` images (all when `n` is larger), without copying the rest.
    pub fn head(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            images: self.images[..n * IMAGE_LEN].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    /// The first `n` images (all when `n` is larger), for toy runs.
    pub fn truncated(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * IMAGE_LEN);
        self.labels.truncate(n);
        self
    }

    fn append(&mut self, other: Split) {
        self.images.extend(other.images);
        self.labels.extend(other.labels);
    }
}

/// A dataset with its train and test splits.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub format: Format,
    pub classes: usize,
    /// The stored images' shape before padding, [C, H, W].
    pub source_shape: [usize; 3],
    pub train: Split,
    pub test: Split,
}

/// `dcl data info --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetInfo {
    pub format: Format,
    pub images: usize,
    pub shape: [usize; 3],
    pub classes: usize,
    pub label_counts: Vec<usize>,
    pub train_images: usize,
    pub test_images: usize,
}

impl Dataset {
    pub fn info(&self) -> DatasetInfo {
        let mut label_counts = vec![0; self.classes];
        for &l in self.train.labels.iter().chain(&self.test.labels) {
            label_counts[l as usize] += 1;
        }
        DatasetInfo {
            format: self.format,
            images: self.train.len() + self.test.len(),
            shape: self.source_shape,
            classes: self.classes,
            label_counts,
            train_images: self.train.len(),
            test_images: self.test.len(),
        }
    }
}

/// The most a compressed dataset file may unpack to: CIFAR-10's archive is 185 MB unpacked. A
/// small gzip bomb stops here instead of spinning for minutes.
pub const MAX_INFLATED: u64 = 256 << 20;

/// The most any one dataset file may hold on disk (CIFAR-10's archive is 170 MB, CIFAR-100's
/// `train.bin` 154 MB): checked before a file is read.
pub const MAX_FILE: u64 = 200 << 20;

/// `input` decompressed on the fly when it is gzip (told by the magic, not the file name), at
/// most [`MAX_INFLATED`] bytes of it.
pub fn decompressed<'a>(input: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut input = std::io::BufReader::new(input);
    Ok(if input.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        Box::new(Bounded {
            inner: flate2::read::GzDecoder::new(input),
            left: MAX_INFLATED,
        })
    } else {
        Box::new(input)
    })
}

/// A reader that fails once more than `left` bytes have come out of it.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            // Any failure here is the gzip stream's, truncation included: say so.
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("gzip stream: {e}"))
        })?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "decompresses to more than {} MiB, more than any dataset file",
                    MAX_INFLATED >> 20
                ),
            )
        })?;
        Ok(n)
    }
}

/// A failed read of (possibly decompressed) dataset bytes, `offset` bytes in.
pub fn read_error(file: &str, offset: usize, e: std::io::Error) -> DataError {
    match e.kind() {
        std::io::ErrorKind::FileTooLarge => DataError::new(file, offset, e.to_string()),
        _ => DataError::new(
            file,
            offset,
            format!("corrupt or truncated data ({e}); offset is in the decompressed data"),
        ),
    }
}

/// Recognizes a dataset among named in-memory files, as the page receives them: one CIFAR archive
/// or batch file, several CIFAR batch files, or MNIST-style IDX files (by their official names).
pub fn from_named_files(name: &str, files: Vec<(String, Vec<u8>)>) -> Result<Dataset, DataError> {
    let base = |f: &str| f.rsplit(['/', '\\']).next().unwrap_or(f).to_string();
    let find = |stem: &str| {
        files.iter().find(|(f, _)| {
            let b = base(f);
            b == stem || b == format!("{stem}.gz")
        })
    };
    if let (Some(ti), Some(tl)) = (
        find("train-images-idx3-ubyte"),
        find("train-labels-idx1-ubyte"),
    ) {
        let test = match (
            find("t10k-images-idx3-ubyte"),
            find("t10k-labels-idx1-ubyte"),
        ) {
            (Some(i), Some(l)) => Some([(i.0.as_str(), &i.1[..]), (l.0.as_str(), &l.1[..])]),
            _ => None,
        };
        return idx::dataset(
            name,
            [(ti.0.as_str(), &ti.1[..]), (tl.0.as_str(), &tl.1[..])],
            test,
        );
    }
    for variant in [cifar::Variant::Cifar10, cifar::Variant::Cifar100] {
        if files.len() > 1
            && files
                .iter()
                .all(|(f, _)| variant.split_of(&base(f)).is_some())
        {
            return cifar::from_batches(name, variant, files);
        }
    }
    match <[_; 1]>::try_from(files) {
        Ok([(file, bytes)]) => cifar::from_file(&file, bytes),
        Err(files) => Err(DataError::new(
            name,
            0,
            format!(
                "{} files that are neither CIFAR batches nor MNIST-style IDX files \
                 (train-images-idx3-ubyte[.gz] with its labels)",
                files.len()
            ),
        )),
    }
}
