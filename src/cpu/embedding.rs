//! Embedding reference: out[i, :] = table[ids[i], :], a plain gather.

/// Rows `ids` of `table` ([vocab, hidden], row-major) as [ids.len(), hidden].
/// Panics if an id is not below vocab.
pub fn forward(table: &[f32], hidden: usize, ids: &[u32]) -> Vec<f32> {
    assert!(
        hidden > 0 && table.len() % hidden == 0,
        "table is [vocab, hidden]"
    );
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let start = id as usize * hidden;
        out.extend_from_slice(&table[start..start + hidden]);
    }
    out
}
