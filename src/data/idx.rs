//! IDX files (MNIST, Fashion-MNIST), gzipped or not: big-endian magic `0x0000_08_NN` where NN is
//! the number of dimensions, then NN big-endian u32 sizes, then u8 data.

use super::{
    decompressed, read_error, DataError, Dataset, Format, Split, CHANNELS, IMAGE_LEN, SIDE,
};
use std::io::Read;

/// The most payload an IDX file may promise (MNIST-like training sets hold 47 MB): checked
/// against the header before anything is read.
pub const MAX_PAYLOAD: usize = 128 << 20;

/// Parses an IDX file of unsigned bytes, gzipped or not; returns the dimensions and the payload.
/// Reads as it decompresses, and no further than the header promises.
pub fn parse(file: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let mut input = decompressed(bytes).map_err(|e| read_error(file, 0, e))?;
    let mut head = [0u8; 4];
    read_header(&mut input, &mut head, file, 0)?;
    if head[0] != 0 || head[1] != 0 {
        return Err(DataError::new(file, 0, "not an IDX file (bad magic)"));
    }
    if head[2] != 0x08 {
        return Err(DataError::new(
            file,
            2,
            format!(
                "IDX element type 0x{:02x} unsupported (expected 0x08, unsigned byte)",
                head[2]
            ),
        ));
    }
    let mut sizes = vec![0u8; 4 * head[3] as usize];
    read_header(&mut input, &mut sizes, file, 4)?;
    let header = 4 + sizes.len();
    let dims: Vec<usize> = sizes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| {
            DataError::new(
                file,
                4,
                format!(
                    "dimensions {dims:?} promise more than the {} MiB an IDX file may hold",
                    MAX_PAYLOAD >> 20
                ),
            )
        })?;
    // One byte past the promise tells a file that is too long without reading all of it.
    let mut payload = Vec::new();
    input
        .take(expected as u64 + 1)
        .read_to_end(&mut payload)
        .map_err(|e| read_error(file, header + payload.len(), e))?;
    if payload.len() != expected {
        let found = match payload.len() > expected {
            true => "more".to_string(),
            false => payload.len().to_string(),
        };
        return Err(DataError::new(
            file,
            header + payload.len().min(expected),
            format!("payload is {found} bytes but dimensions {dims:?} need {expected}"),
        ));
    }
    Ok((dims, payload))
}

fn read_header(
    input: &mut impl Read,
    buf: &mut [u8],
    file: &str,
    at: usize,
) -> Result<(), DataError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DataError::new(file, at, "truncated IDX header"),
        _ => read_error(file, at, e),
    })
}

/// Pairs an images file [N, H, W] (H, W <= 32) with a labels file [N] into a split, padding each
/// grayscale image to 32x32 and replicating it to three channels.
pub fn split(
    images_file: &str,
    images: &[u8],
    labels_file: &str,
    labels: &[u8],
) -> Result<(Split, [usize; 3]), DataError> {
    let (idims, pixels) = parse(images_file, images)?;
    let (ldims, label_bytes) = parse(labels_file, labels)?;
    if idims.len() != 3 || idims[1] > SIDE || idims[2] > SIDE {
        return Err(DataError::new(
            images_file,
            0,
            format!("expected images of shape [N, H, W] with H, W <= 32, found {idims:?}"),
        ));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(DataError::new(
            labels_file,
            0,
            format!("labels of shape {ldims:?} do not match {} images", idims[0]),
        ));
    }
    let (n, h, w) = (idims[0], idims[1], idims[2]);
    let (top, left) = ((SIDE - h) / 2, (SIDE - w) / 2);
    let mut out = vec![0u8; n * IMAGE_LEN];
    for (i, src) in pixels.chunks_exact(h * w).enumerate() {
        let dst = &mut out[i * IMAGE_LEN..(i + 1) * IMAGE_LEN];
        for c in 0..CHANNELS {
            for y in 0..h {
                let row = c * SIDE * SIDE + (top + y) * SIDE + left;
                dst[row..row + w].copy_from_slice(&src[y * w..(y + 1) * w]);
            }
        }
    }
    let labels = label_bytes.iter().map(|&l| l as u16).collect();
    Ok((
        Split {
            images: out,
            labels,
        },
        [1, h, w],
    ))
}

/// An (images, labels) pair of named IDX files, as bytes (gzipped or not).
pub type IdxPair<'a> = [(&'a str, &'a [u8]); 2];

/// MNIST-style training files and, when present, test files as one dataset; the class count is
/// the largest label + 1.
pub fn dataset(name: &str, train: IdxPair, test: Option<IdxPair>) -> Result<Dataset, DataError> {
    let read = |[(images_file, images), (labels_file, labels)]: IdxPair| {
        split(images_file, images, labels_file, labels)
    };
    let (train, source_shape) = read(train)?;
    let test = match test {
        Some(files) => read(files)?.0,
        None => Split {
            images: vec![],
            labels: vec![],
        },
    };
    let classes = train
        .labels
        .iter()
        .chain(&test.labels)
        .copied()
        .max()
        .unwrap_or(0) as usize
        + 1;
    Ok(Dataset {
        name: name.to_string(),
        format: Format::Idx,
        classes,
        source_shape,
        train,
        test,
    })
}
