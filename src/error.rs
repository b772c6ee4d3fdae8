//! The crate's error type: every op names the argument that was wrong and
//! what it expected.

use std::path::PathBuf;

use crate::DType;

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with enough detail to fix the call. In every variant
/// `op` names the operation (`rmsnorm::forward`), `arg` the argument that was
/// wrong, `expected` and `got` what it should have been and what it was.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument's shape does not fit.
    #[error("{op}: argument `{arg}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    /// An argument's element type is not supported or does not match.
    #[error("{op}: argument `{arg}` has dtype {got}, expected {expected}")]
    DType {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: DType,
    },
    /// An argument lives on another device than the op runs on.
    #[error("{op}: argument `{arg}` is on {got}, expected {expected}")]
    Device {
        op: &'static str,
        arg: &'static str,
        expected: String,
        got: String,
    },
    /// Any other invalid argument value (empty, misaligned, out of range).
    #[error("{op}: argument `{arg}`: {what}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        what: String,
    },
    /// No CUDA device can be used; says why and how to get one.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// A kernel could not be launched at all (not built for this device,
    /// or a device that runs no kernels).
    #[error("kernel `{kernel}` failed: {message}")]
    Launch { kernel: String, message: String },
    /// A launch asks for more than its arch allows (threads, registers,
    /// shared memory, grid): refused before it reaches the driver.
    #[error("kernel `{kernel}` cannot launch on sm_{arch}: {what}")]
    LaunchResources {
        kernel: String,
        arch: u32,
        what: String,
    },
    /// The host emulator stopped a launch: `check` says which of its checks
    /// failed, `message` names the block, threads and source line.
    #[error("kernel `{kernel}` failed on the emulator ({check}): {message}")]
    Emulator {
        kernel: String,
        check: crate::emu::EmuCheck,
        message: String,
    },
    /// A file could not be read or written, or its contents are not what was
    /// expected (`what` says which, with expected vs got).
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    /// An output could not be written (or was refused: an input, a folder, a
    /// socket); nothing was left half-written ([`crate::output`]).
    #[error("cannot write {}: {what}", path.display())]
    Output { path: PathBuf, what: String },
    /// Training rows too similar to benchmark items (the training guard,
    /// [`crate::curate::guard_training`]): how many, the threshold, the
    /// report written, and its summary.
    #[error(
        "{}: {rows} of {rows_in} rows reach cosine {threshold} to a benchmark item; \
         see {} (drop them with --drop-contaminated)\n{summary}",
        path.display(),
        report.display()
    )]
    Contaminated {
        path: PathBuf,
        rows: usize,
        rows_in: usize,
        threshold: f32,
        report: PathBuf,
        summary: String,
    },
    /// The CUDA driver reported an error.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
}
