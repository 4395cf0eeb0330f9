//! Nearest neighbours by cosine similarity: the one ranking behind `dcl neighbors`, the page's
//! neighbours view and the retrieval embed. Plain Rust, so the inference-only page build has it.

/// The `k` rows of `rows` (unit vectors of width `dim`) most similar to `query`, best first, with
/// their cosine similarity; row `skip` (the query's own row, when it is one) left out. Ties go to
/// the lower index, so the ranking is the same everywhere.
pub fn nearest(
    rows: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
    skip: Option<usize>,
) -> Vec<(usize, f32)> {
    assert_eq!(query.len(), dim, "the query's width is not the rows' width");
    let mut scored: Vec<(usize, f32)> = rows
        .chunks_exact(dim)
        .enumerate()
        .filter(|&(i, _)| Some(i) != skip)
        .map(|(i, r)| (i, r.iter().zip(query).map(|(a, b)| a * b).sum()))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

/// [`nearest`] for row `query` of `rows` itself, which is left out.
pub fn nearest_to_row(rows: &[f32], dim: usize, query: usize, k: usize) -> Vec<(usize, f32)> {
    nearest(
        rows,
        dim,
        &rows[query * dim..(query + 1) * dim],
        k,
        Some(query),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_cosine_and_skips_the_query() {
        let rows = [1.0, 0.0, 0.6, 0.8, 0.0, 1.0, 0.8, 0.6];
        let got = nearest_to_row(&rows, 2, 0, 2);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 1]);
        assert!((got[0].1 - 0.8).abs() < 1e-6);
        // An outside query: every row is a candidate; ties go to the lower index.
        let got = nearest(&[0.0, 1.0, 1.0, 0.0, 0.0, 1.0], 2, &[0.0, 1.0], 3, None);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 2, 1]);
    }
}
