//! Times `Llama::forward_backward` on `Device::Cpu` in f32: a random model of
//! a preset (written to a temporary folder), a random rank-16 adapter on all
//! seven projections (PEFT's peer: alpha 16, dropout 0.05), and one row of
//! random ids. Prints each step's wall time and the process's CPU time over
//! it (on a shared machine the wall time also counts the other processes'
//! turns on the cores), and the median tokens/s.
//!
//! `cargo run --release --example train_step -- [tiny|mini|small] [seq] [steps]`
//! (defaults: small, 512, 3; one untimed warm-up step first).

use std::time::Instant;

use platypus::llama::init::{random_adapter, write_random_model, Preset};
use platypus::llama::train::{Layout, StepBatch};
use platypus::llama::{AdapterConfig, Llama, Module};
use platypus::{DType, Device};

/// CPU seconds of this process so far (user + system, all threads), from
/// /proc/self/stat in USER_HZ = 100 ticks per second; None off Linux.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

fn main() -> platypus::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = match args.first().map(String::as_str).unwrap_or("small") {
        "tiny" => Preset::Tiny,
        "mini" => Preset::Mini,
        "small" => Preset::Small,
        other => panic!("unknown preset {other}: tiny, mini or small"),
    };
    let seq: usize = args.get(1).map_or(512, |s| s.parse().expect("seq"));
    let steps: usize = args.get(2).map_or(3, |s| s.parse().expect("steps"));
    let config = preset.config();
    let dir = std::env::temp_dir().join(format!("platypus-train-step-{}", std::process::id()));
    write_random_model(&dir, &config, DType::F32, 1, None)?;
    let mut model = Llama::load(&dir, &Device::Cpu)?;
    std::fs::remove_dir_all(&dir).expect("remove the temporary model");
    let adapter_config = AdapterConfig {
        r: 16,
        alpha: 16.0,
        use_rslora: false,
        dropout: 0.05,
        targets: Module::ALL.to_vec(),
        base_model: None,
    };
    model.attach(&random_adapter(&config, adapter_config, 2, true))?;
    // `attach` leaves dropout off (inference); the peer trains with 0.05, a
    // stream of counters of its own per projection.
    for (i, (_, f)) in model.lora_factors_mut().into_iter().enumerate() {
        f.config.dropout = 0.05;
        f.config.seed = 3;
        f.config.offset = (i as u64) << 32;
    }

    let ids: Vec<u32> = (0..seq as u64)
        .map(|t| (t.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 % config.vocab_size as u32)
        .collect();
    let positions: Vec<i32> = (0..seq as i32).collect();
    let targets: Vec<i32> = (1..=seq)
        .map(|t| ids.get(t).map_or(-100, |&id| id as i32))
        .collect();
    let lens = [seq as u32];
    let batch = StepBatch {
        ids: &ids,
        rows: 1,
        seq,
        positions: &positions,
        targets: &targets,
        layout: Layout::Padded { lens: &lens },
    };
    let scale = 1.0 / batch.counted() as f32;
    println!(
        "{preset:?}, 1 × {seq} tokens, {} threads",
        rayon::current_num_threads()
    );
    let mut times = Vec::new();
    for step in 0..=steps {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        let (ce, _) = model.forward_backward(&batch, scale, false)?;
        let secs = start.elapsed().as_secs_f64();
        let cpu = match (cpu_start, cpu_seconds()) {
            (Some(a), Some(b)) => format!(", {:.2} s of CPU", b - a),
            _ => String::new(),
        };
        let what = if step == 0 { "warm-up" } else { "step" };
        println!(
            "{what} {step}: {secs:.3} s ({:.1} tokens/s{cpu}), loss {:.4}",
            seq as f64 / secs,
            ce.mean()
        );
        if step > 0 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    if let Some(&median) = times.get(times.len() / 2) {
        println!(
            "median {median:.3} s per step, {:.1} tokens/s",
            seq as f64 / median
        );
    }
    Ok(())
}
