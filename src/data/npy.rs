//! `.npy` (NumPy) reading and writing for float arrays, the currency of people porting losses
//! from PyTorch: the `npyz` crate does the format; this module narrows it to what `dcl` takes
//! (float32 or float64, C order), bounds it by the file's size, and words the errors.

/// A float array read from `.npy`, widened to f64 so float32 and float64 inputs are both exact.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Parses `.npy` bytes holding little-endian float32 or float64 in C order.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    check_header_length(bytes)?;
    let file = npyz::NpyFile::new(bytes).map_err(|e| format!("not a readable .npy file ({e})"))?;
    if file.order() == npyz::Order::Fortran {
        return Err("Fortran-ordered arrays are unsupported".into());
    }
    let shape = file
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("shape entry {d} is too large")))
        .collect::<Result<Vec<usize>, String>>()?;
    let descr = file.dtype().descr();
    let width: usize = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "dtype {other} unsupported (expected float32 or float64)"
            ))
        }
    };
    // Checked before reading, so a header that promises more than the file holds allocates
    // nothing.
    let needed = shape
        .iter()
        .try_fold(width, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= bytes.len())
        .ok_or_else(|| {
            format!(
                "the file is {} bytes, too short for shape {shape:?} of {width}-byte floats",
                bytes.len()
            )
        })?;
    let short = |e: std::io::Error| {
        format!("the payload ends before shape {shape:?} of {width}-byte floats ({needed} bytes) is read: {e}")
    };
    let data = if width == 4 {
        file.into_vec::<f32>()
            .map_err(short)?
            .into_iter()
            .map(f64::from)
            .collect()
    } else {
        file.into_vec::<f64>().map_err(short)?
    };
    Ok(Array { shape, data })
}

/// The header's promised length against the file's: npyz allocates what the header length field
/// says before reading it (a 100-byte file can ask for 4 GB).
fn check_header_length(bytes: &[u8]) -> Result<(), String> {
    let (Some(&major), true) = (bytes.get(6), bytes.starts_with(b"\x93NUMPY")) else {
        return Ok(()); // npyz words the error for a file that is not .npy at all
    };
    let (start, len) = match major {
        1 => (
            10,
            bytes
                .get(8..10)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize),
        ),
        _ => (
            12,
            bytes
                .get(8..12)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize),
        ),
    };
    match len {
        Some(len) if start + len <= bytes.len() => Ok(()),
        _ => Err(format!(
            "not a readable .npy file (its header length runs past the file's {} bytes)",
            bytes.len()
        )),
    }
}

/// Serializes a float32 array as `.npy` (format 1.0, NumPy's own layout).
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut out = Vec::new();
    use npyz::WriterBuilder;
    let written = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&dims)
        .writer(&mut out)
        .begin_nd()
        .and_then(|mut w| {
            w.extend(data.iter().copied())?;
            w.finish()
        });
    written.expect("writing to memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_float32() {
        let bytes = to_bytes(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        // A 64-byte aligned header, then 6 floats.
        assert_eq!(bytes.len() % 64, 24);
        let a = parse(&bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
    }

    #[test]
    fn rejects_truncated_payload_and_wrong_dtype() {
        let bytes = to_bytes(&[2, 2], &[1.0; 4]);
        let err = parse(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.contains("payload ends before shape [2, 2]"), "{err}");
        // A header promising far more than the file holds is refused before any allocation.
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999, 9999999), }\n";
        let mut huge = b"\x93NUMPY\x01\x00".to_vec();
        huge.extend((header.len() as u16).to_le_bytes());
        huge.extend(header.as_bytes());
        huge.extend([0u8; 16]);
        let err = parse(&huge).unwrap_err();
        assert!(err.contains("too short for shape"), "{err}");
        let mut bad = bytes.clone();
        let at = bad.windows(3).position(|w| w == b"<f4").unwrap();
        bad[at + 1] = b'i';
        assert!(parse(&bad).unwrap_err().contains("<i4"));
        assert!(parse(b"hello").unwrap_err().contains("not a readable .npy"));
    }
}
