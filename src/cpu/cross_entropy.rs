//! Cross-entropy of a linear LM head reference, in f64: logits = h Wᵀ,
//! loss_t = logsumexp(logits_t) − logits_t[label_t] for every token whose
//! label is not ignored (< 0, transformers' −100).

/// (sum of the losses, number of tokens counted, logsumexp of every row).
/// h [tokens, hidden], w [vocab, hidden], labels [tokens]; rows with a
/// negative label get their logsumexp but add nothing.
pub fn linear_cross_entropy(
    h: &[f32],
    w: &[f32],
    labels: &[i32],
    hidden: usize,
) -> (f64, usize, Vec<f32>) {
    let vocab = w.len() / hidden;
    assert_eq!(h.len(), labels.len() * hidden, "h is [tokens, hidden]");
    let mut sum = 0.0f64;
    let mut count = 0;
    let mut lse = Vec::with_capacity(labels.len());
    for (row, &label) in h.chunks_exact(hidden).zip(labels) {
        let logits: Vec<f64> = w
            .chunks_exact(hidden)
            .map(|wr| row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        lse.push(l as f32);
        if label >= 0 {
            assert!((label as usize) < vocab, "label {label} < vocab {vocab}");
            sum += l - logits[label as usize];
            count += 1;
        }
    }
    (sum, count, lse)
}
