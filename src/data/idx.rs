//! IDX files (MNIST, Fashion-MNIST), gzipped or not: big-endian magic `0x0000_08_NN` where NN is
//! the number of dimensions, then NN big-endian u32 sizes, then u8 data.

use super::{maybe_gunzip, DataError, Dataset, Format, Split, CHANNELS, IMAGE_LEN, SIDE};

/// Parses an IDX file of unsigned bytes; returns the dimensions and the payload.
pub fn parse(file: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let raw = maybe_gunzip(file, bytes)?;
    if raw.len() < 4 {
        return Err(DataError::new(file, raw.len(), "truncated IDX header"));
    }
    if raw[0] != 0 || raw[1] != 0 {
        return Err(DataError::new(file, 0, "not an IDX file (bad magic)"));
    }
    if raw[2] != 0x08 {
        return Err(DataError::new(
            file,
            2,
            format!(
                "IDX element type 0x{:02x} unsupported (expected 0x08, unsigned byte)",
                raw[2]
            ),
        ));
    }
    let ndim = raw[3] as usize;
    let header = 4 + 4 * ndim;
    if raw.len() < header {
        return Err(DataError::new(file, raw.len(), "truncated IDX header"));
    }
    let dims: Vec<usize> = raw[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims.iter().product::<usize>();
    let payload = &raw[header..];
    if payload.len() != expected {
        return Err(DataError::new(
            file,
            header + payload.len().min(expected),
            format!(
                "payload is {} bytes but dimensions {dims:?} need {expected}",
                payload.len()
            ),
        ));
    }
    Ok((dims, payload.to_vec()))
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
