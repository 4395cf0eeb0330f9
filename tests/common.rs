//! Helpers shared by the integration tests: synthetic datasets in the official file formats.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const RECORD: usize = 1 + 3072;

/// A CIFAR-10 record whose pixels encode its index, so tests can check order and layout.
pub fn cifar10_record(index: usize, label: u8) -> Vec<u8> {
    let mut r = vec![label];
    r.extend((0..3072).map(|p| ((p * 7 + index * 13) % 256) as u8));
    r
}

/// Writes `data_batch_1..=batches` with `per_batch` records each and a `test_batch.bin` with
/// `test` records into `dir/cifar-10-batches-bin`. Labels cycle 0..10; images carry a
/// class-dependent brightness so that a trained encoder can tell classes apart.
pub fn write_cifar10(dir: &Path, batches: usize, per_batch: usize, test: usize) -> PathBuf {
    let root = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&root).unwrap();
    let mut index = 0;
    let mut write = |name: &str, count: usize| {
        let mut bytes = Vec::new();
        for _ in 0..count {
            bytes.extend(cifar10_record(index, (index % 10) as u8));
            index += 1;
        }
        std::fs::write(root.join(name), bytes).unwrap();
    };
    for b in 1..=batches {
        write(&format!("data_batch_{b}.bin"), per_batch);
    }
    write("test_batch.bin", test);
    root
}

/// A gzipped IDX file of unsigned bytes.
pub fn idx_gz(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut raw = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        raw.extend(d.to_be_bytes());
    }
    raw.extend(payload);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

pub fn dcl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dcl")
}

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The generator of a randomized test: seeded from `DCL_TEST_SEED` when it is set, else from
/// entropy; the seed is printed either way, so a failure can be replayed.
pub fn test_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("DCL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: DCL_TEST_SEED={seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}
