//! Minimal `.npy` (NumPy) reading and writing for float arrays, the currency of people porting
//! losses from PyTorch.

/// A float array read from `.npy`, widened to f64 so float32 and float64 inputs are both exact.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Parses `.npy` bytes holding little-endian float32 or float64 in C order.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let width = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => 4,
        "<f8" => 8,
        other => {
            return Err(format!(
                "dtype {other} unsupported (expected float32 or float64)"
            ))
        }
    };
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-ordered arrays are unsupported".into());
    }
    let shape = parse_shape(header)?;
    let count: usize = shape.iter().product();
    let payload = &bytes[start + header_len..];
    if payload.len() != count * width {
        return Err(format!(
            "payload is {} bytes but shape {shape:?} of {width}-byte floats needs {}",
            payload.len(),
            count * width
        ));
    }
    let data = if width == 4 {
        let f = |c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
        payload.chunks_exact(4).map(f).collect()
    } else {
        let f = |c: &[u8]| f64::from_le_bytes(c.try_into().unwrap());
        payload.chunks_exact(8).map(f).collect()
    };
    Ok(Array { shape, data })
}

/// The value of `key` in the header's Python dict literal: a quoted string, a tuple or a word.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest[rest.find(':')? + 1..].trim_start();
    let end = match rest.chars().next()? {
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        '(' => rest.find(')')? + 1,
        _ => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    Some(&rest[..end])
}

fn parse_shape(header: &str) -> Result<Vec<usize>, String> {
    let value = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let inner = value
        .strip_prefix('(')
        .and_then(|v| v.split(')').next())
        .ok_or("malformed shape")?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| format!("malformed shape entry '{s}'"))
        })
        .collect()
}

/// Serializes a float32 array as `.npy` version 1.0.
pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // The header (with magic, version, length and newline) pads to a multiple of 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
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
        assert!(err.contains("payload is 13 bytes"), "{err}");
        let mut bad = bytes.clone();
        let at = bad.windows(3).position(|w| w == b"<f4").unwrap();
        bad[at + 1] = b'i';
        assert!(parse(&bad).unwrap_err().contains("<i4"));
        assert!(parse(b"hello").unwrap_err().contains("magic"));
    }
}
