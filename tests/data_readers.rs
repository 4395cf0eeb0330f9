//! Readers against files written here in the official formats, and against real Fashion-MNIST.

use crate::common::*;
use dcl::data::{cifar, discover, idx, IMAGE_LEN};
use std::io::Write;

#[test]
fn cifar10_folder_reads_every_batch_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = write_cifar10(tmp.path(), 2, 30, 20);
    // The folder, its parent and a single batch file all work.
    for spec in [root.clone(), tmp.path().to_path_buf()] {
        let ds = discover::load(spec.to_str().unwrap()).unwrap();
        assert_eq!((ds.train.len(), ds.test.len(), ds.classes), (60, 20, 10));
        // Record 31 is the second record of data_batch_2: pixels encode index 31, CHW as stored.
        assert_eq!(ds.train.image(31), &cifar10_record(31, 1)[1..]);
        assert_eq!(ds.train.labels[31], 1);
        assert_eq!(ds.test.image(0), &cifar10_record(60, 0)[1..]);
        let info = ds.info();
        assert_eq!(info.images, 80);
        assert_eq!(info.label_counts, vec![8; 10]);
        assert_eq!(info.shape, [3, 32, 32]);
    }
    let single = discover::load(root.join("data_batch_2.bin").to_str().unwrap()).unwrap();
    assert_eq!(single.train.len(), 30);
}

#[test]
fn cifar10_archive_equals_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), 5, 4, 6);
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(
        "cifar-10-batches-bin",
        tmp.path().join("cifar-10-batches-bin"),
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, gz.finish().unwrap()).unwrap();
    let from_archive = discover::load(archive.to_str().unwrap()).unwrap();
    let from_folder =
        discover::load(tmp.path().join("cifar-10-batches-bin").to_str().unwrap()).unwrap();
    assert_eq!(from_archive.train, from_folder.train);
    assert_eq!(from_archive.test, from_folder.test);
    assert_eq!(from_archive.train.len(), 20);
}

#[test]
fn truncated_or_corrupt_cifar_names_file_and_offset() {
    let mut bytes: Vec<u8> = (0..3).flat_map(|i| cifar10_record(i, 2)).collect();
    bytes.truncate(2 * RECORD + 100);
    let err = cifar::parse_batch("data_batch_1.bin", &bytes, cifar::Variant::Cifar10).unwrap_err();
    assert_eq!(err.file, "data_batch_1.bin");
    assert_eq!(err.offset, 2 * RECORD);
    assert!(err.to_string().contains("truncated"), "{err}");

    let mut bad = cifar10_record(0, 3);
    bad.extend(cifar10_record(1, 42));
    let err = cifar::parse_batch("test_batch.bin", &bad, cifar::Variant::Cifar10).unwrap_err();
    assert_eq!(err.offset, RECORD);
    assert!(err.to_string().contains("label 42"), "{err}");

    let err = cifar::from_archive("cifar-10-binary.tar.gz", &[0x1f, 0x8b, 8, 0, 1, 2, 3][..])
        .unwrap_err();
    assert!(err.to_string().contains("cifar-10-binary.tar.gz"), "{err}");
}

#[test]
fn cifar100_uses_fine_labels() {
    let record = |coarse: u8, fine: u8| {
        let mut r = vec![coarse, fine];
        r.extend(vec![fine; 3072]);
        r
    };
    let train: Vec<u8> = [record(3, 97), record(19, 5)].concat();
    let test = record(0, 99);
    let ds = cifar::from_batches(
        "cifar-100",
        cifar::Variant::Cifar100,
        vec![("x/train.bin".into(), train), ("x/test.bin".into(), test)],
    )
    .unwrap();
    assert_eq!(ds.classes, 100);
    assert_eq!(ds.train.labels, vec![97, 5]);
    assert_eq!(ds.test.labels, vec![99]);
    assert!(ds.train.image(1).iter().all(|&p| p == 5));
}

#[test]
fn idx_images_are_padded_to_32_and_replicated() {
    let pixels: Vec<u8> = (0..2 * 28 * 28).map(|i| (i % 251) as u8).collect();
    let images = idx_gz(&[2, 28, 28], &pixels);
    let labels = idx_gz(&[2], &[7, 3]);
    let (split, shape) = idx::split("imgs", &images, "labels", &labels).unwrap();
    assert_eq!(shape, [1, 28, 28]);
    assert_eq!(split.labels, vec![7, 3]);
    let img = split.image(1);
    assert_eq!(img.len(), IMAGE_LEN);
    for c in 0..3 {
        // Pixel (0, 0) of the 28x28 source sits at (2, 2); the border is zero.
        assert_eq!(img[c * 1024 + 2 * 32 + 2], pixels[784]);
        assert_eq!(img[c * 1024 + 29 * 32 + 29], pixels[784 + 27 * 28 + 27]);
        assert_eq!(img[c * 1024], 0);
    }
}

#[test]
fn corrupt_idx_files_are_named() {
    let err = idx::parse("bad.idx", &[1, 2, 3, 4, 5]).unwrap_err();
    assert!(
        err.to_string().contains("bad.idx") && err.to_string().contains("magic"),
        "{err}"
    );
    let mut short = vec![0, 0, 8, 1];
    short.extend(10u32.to_be_bytes());
    short.extend([1, 2, 3]);
    let err = idx::parse("short.idx", &short).unwrap_err();
    assert_eq!(err.offset, 11);
    assert!(err.to_string().contains("payload is 3 bytes"), "{err}");
    let gz = idx_gz(&[1], &[5]);
    let err = idx::parse("cut.gz", &gz[..gz.len() / 2]).unwrap_err();
    assert!(err.to_string().contains("gzip"), "{err}");
    let labels = idx_gz(&[3], &[1, 2, 3]);
    let images = idx_gz(&[2, 28, 28], &[0; 2 * 784]);
    let err = idx::split("imgs", &images, "labels", &labels).unwrap_err();
    assert!(err.to_string().contains("do not match 2 images"), "{err}");
}

#[test]
fn real_fashion_mnist_from_debian() {
    let ds = discover::load(FASHION_MNIST)
        .expect("Debian's dataset-fashion-mnist is installed by the test set-up");
    let info = ds.info();
    assert_eq!(
        (info.train_images, info.test_images, info.classes),
        (60_000, 10_000, 10)
    );
    assert_eq!(info.label_counts, vec![7_000; 10]);
    assert_eq!(info.shape, [1, 28, 28]);
    // The first training image is an ankle boot (label 9) in the official release.
    assert_eq!(ds.train.labels[0], 9);
}

#[test]
fn in_memory_files_are_recognized_as_the_page_receives_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_cifar10(tmp.path(), 2, 3, 2);
    let read = |name: &str| (name.to_string(), std::fs::read(dir.join(name)).unwrap());
    let batches = vec![
        read("test_batch.bin"),
        read("data_batch_2.bin"),
        read("data_batch_1.bin"),
    ];
    let ds = dcl::data::from_named_files("picked", batches).unwrap();
    assert_eq!((ds.classes, ds.train.len(), ds.test.len()), (10, 6, 2));
    assert_eq!(
        ds.train.labels,
        vec![0, 1, 2, 3, 4, 5],
        "batches in official order"
    );
    let one = dcl::data::from_named_files("one", vec![read("data_batch_2.bin")]).unwrap();
    assert_eq!((one.train.len(), one.train.labels[0]), (3, 3));

    let pixels: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 251) as u8).collect();
    let idx = vec![
        ("t10k-labels-idx1-ubyte.gz".into(), idx_gz(&[1], &[9])),
        (
            "train-images-idx3-ubyte.gz".into(),
            idx_gz(&[2, 28, 28], &pixels[..2 * 784]),
        ),
        ("train-labels-idx1-ubyte.gz".into(), idx_gz(&[2], &[4, 1])),
        (
            "t10k-images-idx3-ubyte.gz".into(),
            idx_gz(&[1, 28, 28], &pixels[2 * 784..]),
        ),
    ];
    let ds = dcl::data::from_named_files("fashion-mnist", idx).unwrap();
    assert_eq!(
        (ds.train.labels.clone(), ds.test.labels.clone()),
        (vec![4, 1], vec![9])
    );
    assert_eq!(ds.source_shape, [1, 28, 28]);

    let err = dcl::data::from_named_files(
        "junk",
        vec![("a.txt".into(), vec![1]), ("b.txt".into(), vec![2])],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("junk") && err.contains("2 files"), "{err}");
}
