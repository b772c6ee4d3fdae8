//! Cross-entropy of a linear LM head reference, in f64: logits = h Wᵀ,
//! loss_t = logsumexp(logits_t) − logits_t[label_t] for every token whose
//! label is not ignored (< 0, transformers' −100); and the same from given
//! logits.

/// (sum of the losses, number of tokens counted, logsumexp of every row).
/// h [tokens, hidden], w [vocab, hidden], labels [tokens]; rows with a
/// negative label get their logsumexp but add nothing.
pub fn linear_cross_entropy(
    h: &[f32],
    w: &[f32],
    labels: &[i32],
    hidden: usize,
) -> (f64, usize, Vec<f32>) {
    assert_eq!(h.len(), labels.len() * hidden, "h is [tokens, hidden]");
    let rows = h.chunks_exact(hidden).map(|row| {
        w.chunks_exact(hidden)
            .map(|wr| row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect::<Vec<f64>>()
    });
    reduce(rows, labels)
}

/// The same from logits [rows, vocab] (labels [rows]).
pub fn from_logits(logits: &[f32], labels: &[i32], vocab: usize) -> (f64, usize, Vec<f32>) {
    assert_eq!(
        logits.len(),
        labels.len() * vocab,
        "logits is [rows, vocab]"
    );
    let rows = logits
        .chunks_exact(vocab)
        .map(|row| row.iter().map(|&z| z as f64).collect::<Vec<f64>>());
    reduce(rows, labels)
}

/// Per-row logsumexp and the label's loss, in f64, summed in row order.
fn reduce(rows: impl Iterator<Item = Vec<f64>>, labels: &[i32]) -> (f64, usize, Vec<f32>) {
    let mut sum = 0.0f64;
    let mut count = 0;
    let mut lse = Vec::with_capacity(labels.len());
    for (logits, &label) in rows.zip(labels) {
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        lse.push(l as f32);
        if label >= 0 {
            let vocab = logits.len();
            assert!((label as usize) < vocab, "label {label} < vocab {vocab}");
            sum += l - logits[label as usize];
            count += 1;
        }
    }
    (sum, count, lse)
}

/// dL/dh for L = `scale` · Σ loss_t over the counted tokens (h, w, labels as
/// in [`linear_cross_entropy`]): dh_t = scale · (softmax(h_t Wᵀ) − onehot(label_t)) W,
/// zero for ignored tokens. In f64, rounded once to f32.
pub fn linear_cross_entropy_grad(
    h: &[f32],
    w: &[f32],
    labels: &[i32],
    hidden: usize,
    scale: f32,
) -> Vec<f32> {
    assert_eq!(h.len(), labels.len() * hidden, "h is [tokens, hidden]");
    let mut dh = vec![0.0f32; h.len()];
    for ((row, &label), out) in h
        .chunks_exact(hidden)
        .zip(labels)
        .zip(dh.chunks_exact_mut(hidden))
    {
        if label < 0 {
            continue;
        }
        let logits: Vec<f64> = w
            .chunks_exact(hidden)
            .map(|wr| row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|z| (z - max).exp()).sum();
        let mut acc = vec![0.0f64; hidden];
        for (v, (z, wr)) in logits.iter().zip(w.chunks_exact(hidden)).enumerate() {
            let onehot = if v == label as usize { 1.0 } else { 0.0 };
            let g = scale as f64 * ((z - max).exp() / sum - onehot);
            for (a, &wv) in acc.iter_mut().zip(wr) {
                *a += g * wv as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    dh
}
