//! The official CIFAR-10 / CIFAR-100 binary format.
//!
//! CIFAR-10 records are `<1 label byte><3072 pixel bytes>`, CIFAR-100 records
//! `<1 coarse label><1 fine label><3072 pixel bytes>`; pixels are planar R, G, B, row-major 32x32,
//! which is already our CHW layout. The archives (`cifar-10-binary.tar.gz`,
//! `cifar-100-binary.tar.gz`) hold `data_batch_{1..5}.bin` + `test_batch.bin`, or `train.bin` +
//! `test.bin`.

use super::{decompressed, read_error, DataError, Dataset, Format, Split, IMAGE_LEN};
use std::io::Read;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }

    pub fn classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }

    fn format(self) -> Format {
        match self {
            Self::Cifar10 => Format::Cifar10,
            Self::Cifar100 => Format::Cifar100,
        }
    }

    /// Which split a batch file belongs to, by its base name; `None` for files that are not batches.
    pub fn split_of(self, base_name: &str) -> Option<bool> {
        let is_train = match self {
            Self::Cifar10 => base_name.starts_with("data_batch_") && base_name.ends_with(".bin"),
            Self::Cifar100 => base_name == "train.bin",
        };
        let is_test = match self {
            Self::Cifar10 => base_name == "test_batch.bin",
            Self::Cifar100 => base_name == "test.bin",
        };
        (is_train || is_test).then_some(is_train)
    }
}

/// Parses one batch file. Uses the fine label for CIFAR-100.
pub fn parse_batch(file: &str, bytes: &[u8], variant: Variant) -> Result<Split, DataError> {
    let record = variant.label_bytes() + IMAGE_LEN;
    if bytes.is_empty() {
        return Err(DataError::new(
            file,
            0,
            "empty file, expected CIFAR records",
        ));
    }
    if !bytes.len().is_multiple_of(record) {
        let whole = bytes.len() / record * record;
        return Err(DataError::new(
            file,
            whole,
            format!(
                "truncated: {} bytes is not a whole number of {record}-byte records",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / record;
    let mut split = Split {
        images: Vec::with_capacity(n * IMAGE_LEN),
        labels: Vec::with_capacity(n),
    };
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[variant.label_bytes() - 1] as usize;
        if label >= variant.classes() {
            return Err(DataError::new(
                file,
                i * record + variant.label_bytes() - 1,
                format!(
                    "label {label} out of range for {} classes",
                    variant.classes()
                ),
            ));
        }
        split.labels.push(label as u16);
        split
            .images
            .extend_from_slice(&rec[variant.label_bytes()..]);
    }
    Ok(split)
}

/// Builds a dataset from (file name, bytes) batch files, in any order; batches are sorted by name
/// so `data_batch_1..5` concatenate in their official order.
pub fn from_batches(
    name: &str,
    variant: Variant,
    mut files: Vec<(String, Vec<u8>)>,
) -> Result<Dataset, DataError> {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let empty = || Split {
        images: vec![],
        labels: vec![],
    };
    let (mut train, mut test) = (empty(), empty());
    for (file, bytes) in &files {
        let base = file.rsplit(['/', ':']).next().unwrap_or(file);
        if let Some(is_train) = variant.split_of(base) {
            let split = parse_batch(file, bytes, variant)?;
            if is_train { &mut train } else { &mut test }.append(split);
        }
    }
    if train.is_empty() && test.is_empty() {
        return Err(DataError::new(
            name,
            0,
            "no CIFAR batch files found (expected data_batch_*.bin/test_batch.bin or train.bin/test.bin)",
        ));
    }
    Ok(Dataset {
        name: name.to_string(),
        format: variant.format(),
        classes: variant.classes(),
        source_shape: [3, 32, 32],
        train,
        test,
    })
}

/// The largest batch file of either variant: CIFAR-100's `train.bin`, 50,000 records.
const MAX_BATCH: u64 = 50_000 * (2 + IMAGE_LEN as u64);

/// The most batch data one archive may hold: CIFAR-10's six batches are 184 MB.
const MAX_ARCHIVE_BATCHES: u64 = 190_000_000;

/// Reads `cifar-10-binary.tar.gz` or `cifar-100-binary.tar.gz` as it decompresses. The variant is
/// told by the batch names inside. Each entry's promised size is checked before it is read.
pub fn from_archive(file: &str, input: impl Read) -> Result<Dataset, DataError> {
    let input = decompressed(input).map_err(|e| read_error(file, 0, e))?;
    let mut archive = tar::Archive::new(input);
    let mut files = Vec::new();
    let mut kept = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| DataError::new(file, 0, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| match e.kind() {
            std::io::ErrorKind::FileTooLarge => read_error(file, 0, e),
            _ => DataError::new(file, 0, format!("corrupt tar entry: {e}")),
        })?;
        let offset = entry.raw_file_position() as usize;
        let path = entry.path().map(|p| p.to_string_lossy().into_owned());
        let path =
            path.map_err(|e| DataError::new(file, offset, format!("bad entry name: {e}")))?;
        let base = path.rsplit('/').next().unwrap_or(&path).to_string();
        let wanted = Variant::Cifar10.split_of(&base).is_some()
            || Variant::Cifar100.split_of(&base).is_some();
        if !wanted {
            continue;
        }
        kept += entry.size();
        if entry.size() > MAX_BATCH || kept > MAX_ARCHIVE_BATCHES {
            return Err(DataError::new(
                file,
                offset,
                format!(
                    "{path} promises {} bytes, more than a CIFAR archive holds",
                    entry.size()
                ),
            ));
        }
        let mut data = Vec::new();
        entry
            .take(MAX_BATCH)
            .read_to_end(&mut data)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::FileTooLarge => read_error(file, offset, e),
                _ => DataError::new(
                    file,
                    offset + data.len(),
                    format!("truncated archive in {path}: {e}"),
                ),
            })?;
        files.push((format!("{file}:{path}"), data));
    }
    let is_cifar100 = files
        .iter()
        .any(|(n, _)| n.ends_with("/train.bin") || n.ends_with(":train.bin"));
    let variant = if is_cifar100 {
        Variant::Cifar100
    } else {
        Variant::Cifar10
    };
    from_batches(file, variant, files)
}

/// One CIFAR file: a single batch (`data_batch_1.bin`, `test.bin`, ...; told by its name) or a
/// whole archive. The page's file picker and `--data FILE` both land here.
pub fn from_file(file: &str, bytes: Vec<u8>) -> Result<Dataset, DataError> {
    let base = file.rsplit(['/', '\\']).next().unwrap_or(file);
    if !base.ends_with(".bin") {
        return from_archive(file, bytes.as_slice());
    }
    let variant = if base == "train.bin" || base == "test.bin" {
        Variant::Cifar100
    } else {
        Variant::Cifar10
    };
    from_batches(file, variant, vec![(file.to_string(), bytes)])
}
