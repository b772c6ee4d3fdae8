//! f32 GEMM against weights in their stored dtype, on rayon threads.
//!
//! The products of a Linear layer: [`matmul_nt`] (y = x Wᵀ, the forward),
//! [`matmul_nn`] (y = x W, the input gradient) and [`matmul_tn`] (y = xᵀ W,
//! a weight gradient: the sum over tokens of outer products). The output is
//! cut into tiles of rows × columns, one rayon task each, and a tile is one
//! `matrixmultiply::sgemm` call per panel of weights: f32 weights are read in
//! place, f16 and bf16 ones are widened a panel at a time into a buffer of
//! the task, never the whole matrix at once. A single row of x (decoding) is
//! a memory-bound GEMV and skips sgemm and its packing altogether.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// A row-major weight matrix as stored: f32, f16 or bf16.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// 32-bit floats, read in place.
    F32(&'a [f32]),
    /// IEEE half precision, widened to f32 as it is read.
    F16(&'a [f16]),
    /// bfloat16, widened to f32 as it is read.
    BF16(&'a [bf16]),
}

impl Weights<'_> {
    /// Number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }
}

/// y [m, n] = alpha · x [m, k] · wᵀ + beta · y, w [n, k] row-major (a
/// Linear's weight [out, in]). beta 0 overwrites y, whatever it held.
///
/// Panics unless x, w and y hold exactly m·k, n·k and m·n elements.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt(
    x: &[f32],
    w: Weights<'_>,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    matmul(x, w, Layout::Nt, Shape { m, k, n }, alpha, beta, y);
}

/// y [m, n] = alpha · x [m, k] · w + beta · y, w [k, n] row-major (dx = dy ·
/// W for a Linear's backward). beta 0 overwrites y, whatever it held.
///
/// Panics unless x, w and y hold exactly m·k, k·n and m·n elements.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
    x: &[f32],
    w: Weights<'_>,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    matmul(x, w, Layout::Nn, Shape { m, k, n }, alpha, beta, y);
}

/// y [m, n] = alpha · xᵀ · w + beta · y, x [k, m] and w [k, n] row-major:
/// a sum over the k rows of both, as a weight's gradient sums over tokens
/// (dW = dyᵀ x). beta 0 overwrites y, whatever it held.
///
/// Panics unless x, w and y hold exactly k·m, k·n and m·n elements.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn(
    x: &[f32],
    w: Weights<'_>,
    k: usize,
    m: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    matmul(x, w, Layout::Tn, Shape { m, k, n }, alpha, beta, y);
}

/// How the operands hold the m × k left-hand and k × n right-hand sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// x is [m, k], w is [n, k]: the product uses w's transpose.
    Nt,
    /// x is [m, k], w is [k, n]: both as they are.
    Nn,
    /// x is [k, m], w is [k, n]: the product uses x's transpose.
    Tn,
}

/// Sizes of one product: (m × k) · (k × n) into y [m, n].
#[derive(Clone, Copy, Debug)]
struct Shape {
    m: usize,
    k: usize,
    n: usize,
}

/// Most rows of one output tile.
pub(crate) const TILE_ROWS: usize = 256;
/// Most columns of one output tile.
const TILE_COLS: usize = 256;
/// Tiles are not split below this many rows or columns.
const MIN_TILE: usize = 32;
/// Multiply-adds below which a task is not worth splitting (tens of µs of
/// one core in sgemm, against a few µs of rayon overhead).
const TASK_WORK: usize = 1 << 20;
/// The same for the memory-bound GEMV, whose multiply-adds are cheaper.
const GEMV_TASK_WORK: usize = 1 << 16;
/// Tasks wanted per thread, so that uneven progress still balances.
const TASKS_PER_THREAD: usize = 4;

fn matmul(
    x: &[f32],
    w: Weights<'_>,
    layout: Layout,
    shape: Shape,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    let Shape { m, k, n } = shape;
    assert_eq!(x.len(), m * k, "x holds m·k elements");
    assert_eq!(w.len(), n * k, "w holds n·k elements");
    assert_eq!(y.len(), m * n, "y is [m, n]");
    if y.is_empty() {
        return;
    }
    if k == 0 {
        y.iter_mut().for_each(|v| *v = scaled(0.0, beta, *v));
        return;
    }
    match w {
        Weights::F32(w) => run(x, w, layout, shape, alpha, beta, y),
        Weights::F16(w) => run(x, w, layout, shape, alpha, beta, y),
        Weights::BF16(w) => run(x, w, layout, shape, alpha, beta, y),
    }
}

/// The product for m, k, n ≥ 1, dispatched to the GEMV or the tiled sgemm.
fn run<T: Stored>(
    x: &[f32],
    w: &[T],
    layout: Layout,
    shape: Shape,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    match (shape.m, layout) {
        (1, Layout::Nt) => gemv_nt(x, w, alpha, beta, y),
        // x [k, 1] is laid out as x [1, k].
        (1, Layout::Nn | Layout::Tn) => gemv_nn(x, w, alpha, beta, y),
        _ => tiled(x, w, layout, shape, alpha, beta, y),
    }
}

/// `ab` + beta · `old`, where beta 0 drops `old` even when it is NaN.
fn scaled(ab: f32, beta: f32, old: f32) -> f32 {
    if beta == 0.0 {
        ab
    } else {
        ab + beta * old
    }
}

/// Weights as the kernels read them: f32 in place, f16 and bf16 widened
/// into a buffer of the task.
trait Stored: Copy + Sync {
    /// Rows of k widened at a time in the tiled product (all of them for
    /// f32, which is read in place).
    const PANEL_K: usize;

    /// `src` as f32: itself, or widened into `buf`.
    fn row<'b>(src: &'b [Self], buf: &'b mut Vec<f32>) -> &'b [f32];

    /// Σ xᵢ wᵢ, using `buf` if the row must be widened first.
    fn dot(x: &[f32], w: &[Self], buf: &mut Vec<f32>) -> f32;

    /// Rows `rows` × columns `cols` of the row-major matrix `w` with `ld`
    /// columns, as an f32 view: in place, or widened into `buf`.
    fn panel<'b>(
        w: &'b [Self],
        ld: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        buf: &'b mut Vec<f32>,
    ) -> View<'b>;
}

impl Stored for f32 {
    const PANEL_K: usize = usize::MAX;

    fn row<'b>(src: &'b [f32], _: &'b mut Vec<f32>) -> &'b [f32] {
        src
    }

    fn dot(x: &[f32], w: &[f32], _: &mut Vec<f32>) -> f32 {
        dot(x, w, |v| v)
    }

    fn panel<'b>(
        w: &'b [f32],
        ld: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        _: &'b mut Vec<f32>,
    ) -> View<'b> {
        View::new(
            &w[rows.start * ld + cols.start..],
            rows.len(),
            cols.len(),
            ld,
            1,
        )
    }
}

/// [`Stored`] for a 16-bit float type, widened by `$widen(src, dst)`, with
/// the dot product `$dot(x, w, buf)`.
macro_rules! widened {
    ($t:ty, $widen:expr, $dot:expr) => {
        impl Stored for $t {
            /// sgemm's own depth of packing: a panel of 256 columns is 256 KiB.
            const PANEL_K: usize = 256;

            fn row<'b>(src: &'b [$t], buf: &'b mut Vec<f32>) -> &'b [f32] {
                buf.resize(src.len(), 0.0);
                $widen(src, buf);
                buf
            }

            fn dot(x: &[f32], w: &[$t], buf: &mut Vec<f32>) -> f32 {
                $dot(x, w, buf)
            }

            fn panel<'b>(
                w: &'b [$t],
                ld: usize,
                rows: Range<usize>,
                cols: Range<usize>,
                buf: &'b mut Vec<f32>,
            ) -> View<'b> {
                let width = cols.len();
                buf.resize(rows.len() * width, 0.0);
                for (r, dst) in rows.clone().zip(buf.chunks_exact_mut(width)) {
                    $widen(&w[r * ld + cols.start..][..width], dst);
                }
                View::new(buf, rows.len(), width, width, 1)
            }
        }
    };
}

// `half` converts f16 slices with F16C where the CPU has it.
widened!(f16, <[f16]>::convert_to_f32_slice, dot_f16);
widened!(bf16, widen_bf16, dot_bf16);

/// Σ xᵢ wᵢ for f16 weights: the row is widened first, in one conversion.
fn dot_f16(x: &[f32], w: &[f16], buf: &mut Vec<f32>) -> f32 {
    dot(x, <f16 as Stored>::row(w, buf), |v| v)
}

/// Σ xᵢ wᵢ for bf16 weights, widened in the dot product's own loop.
fn dot_bf16(x: &[f32], w: &[bf16], _: &mut Vec<f32>) -> f32 {
    dot(x, w, bf16_to_f32)
}

/// bf16 to f32 is the 16 bits moved to the top: a shift that LLVM
/// vectorizes (`half`'s own conversion has a branch for NaN).
fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// [`bf16_to_f32`] over a slice; lengths must match.
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(s);
    }
}

/// y [n] = alpha · w [n, k] · x [k] + beta · y: each task takes a block of
/// weight rows and dots each of them with x.
fn gemv_nt<T: Stored>(x: &[f32], w: &[T], alpha: f32, beta: f32, y: &mut [f32]) {
    let k = x.len();
    let rows = per_task(y.len(), k);
    y.par_chunks_mut(rows)
        .zip(w.par_chunks(rows * k))
        .for_each_init(Vec::new, |buf, (y, w)| {
            for (yj, wj) in y.iter_mut().zip(w.chunks_exact(k)) {
                *yj = scaled(alpha * T::dot(x, wj, buf), beta, *yj);
            }
        });
}

/// y [n] = alpha · x [k] · w [k, n] + beta · y: each task takes a block of
/// columns and accumulates x_i times row i of w over it.
fn gemv_nn<T: Stored>(x: &[f32], w: &[T], alpha: f32, beta: f32, y: &mut [f32]) {
    let n = y.len();
    let cols = per_task(n, x.len());
    y.par_chunks_mut(cols).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(acc, buf), (task, y)| {
            let start = task * cols;
            acc.clear();
            acc.resize(y.len(), 0.0);
            for (i, &xi) in x.iter().enumerate() {
                let wi = T::row(&w[i * n + start..][..y.len()], buf);
                acc.iter_mut().zip(wi).for_each(|(a, &w)| *a += xi * w);
            }
            for (yj, &a) in y.iter_mut().zip(acc.iter()) {
                *yj = scaled(alpha * a, beta, *yj);
            }
        },
    );
}

/// Outputs per GEMV task, each costing `work` multiply-adds: a few tasks
/// per thread, none too small to be worth its overhead.
fn per_task(outputs: usize, work: usize) -> usize {
    let tasks = TASKS_PER_THREAD * rayon::current_num_threads();
    outputs
        .div_ceil(tasks)
        .max(GEMV_TASK_WORK.div_ceil(work.max(1)))
        .max(1)
}

/// Σ aᵢ widen(bᵢ) over the shorter of the two, with eight independent f32
/// accumulators so that LLVM vectorizes the loop and the additions are not
/// one serial chain.
pub(crate) fn dot<T: Copy>(a: &[f32], b: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&x, &y)| x * widen(y))
        .sum();
    for (x, y) in a8.zip(b8) {
        for ((acc, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *acc += x * widen(y);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The product for m ≥ 2, one rayon task per output tile.
fn tiled<T: Stored>(
    x: &[f32],
    w: &[T],
    layout: Layout,
    shape: Shape,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    let Shape { m, k, n } = shape;
    let (tile_m, tile_n) = tile_sizes(shape);
    let tiles_n = n.div_ceil(tile_n);
    let out = SharedOut(y.as_mut_ptr());
    (0..m.div_ceil(tile_m) * tiles_n)
        .into_par_iter()
        .for_each_init(Vec::new, |buf, tile| {
            let (ti, tj) = (tile / tiles_n, tile % tiles_n);
            let rows = ti * tile_m..m.min((ti + 1) * tile_m);
            let cols = tj * tile_n..n.min((tj + 1) * tile_n);
            let mut depth = 0;
            while depth < k {
                let ks = depth..depth + T::PANEL_K.min(k - depth);
                let a = match layout {
                    Layout::Nt | Layout::Nn => {
                        View::new(&x[rows.start * k + ks.start..], rows.len(), ks.len(), k, 1)
                    }
                    Layout::Tn => {
                        View::new(&x[ks.start * m + rows.start..], rows.len(), ks.len(), 1, m)
                    }
                };
                let b = match layout {
                    Layout::Nt => T::panel(w, k, cols.clone(), ks.clone(), buf).t(),
                    Layout::Nn | Layout::Tn => T::panel(w, n, ks.clone(), cols.clone(), buf),
                };
                let beta = if depth == 0 { beta } else { 1.0 };
                // SAFETY: the tiles partition y (y.len() == m·n was checked),
                // so this task alone touches rows × cols of it, and y stays
                // borrowed until every task has finished.
                unsafe { sgemm_raw(alpha, a, b, beta, out.at(rows.start * n + cols.start), n) };
                depth = ks.end;
            }
        });
}

/// Rows and columns per output tile: at most [`TILE_ROWS`] × [`TILE_COLS`]
/// and as even as the sides allow, halved (longer side first) until there are a few tiles per thread or
/// halves would be too small to be worth a task.
fn tile_sizes(Shape { m, k, n }: Shape) -> (usize, usize) {
    let wanted = TASKS_PER_THREAD * rayon::current_num_threads();
    // As few tiles as cover the side, of one size (a multiple of 8): 262
    // rows are two tiles of 136, not one of 256 and one of 6 that costs as
    // much packing.
    let even = |side: usize, most: usize| {
        if side <= most {
            side
        } else {
            side.div_ceil(side.div_ceil(most)).next_multiple_of(8)
        }
    };
    let (mut tile_m, mut tile_n) = (even(m, TILE_ROWS), even(n, TILE_COLS));
    // Half of `side` (a multiple of 8, for sgemm's micro-kernels) if each
    // half still has `other` × half × k multiply-adds worth a task.
    let halve = |side: usize, other: usize| {
        let half = (side / 2).next_multiple_of(8);
        (side > MIN_TILE && half * other * k >= TASK_WORK).then_some(half)
    };
    while m.div_ceil(tile_m) * n.div_ceil(tile_n) < wanted {
        match (halve(tile_n, tile_m), halve(tile_m, tile_n)) {
            (Some(half), _) if tile_n >= tile_m => tile_n = half,
            (_, Some(half)) => tile_m = half,
            (Some(half), None) => tile_n = half,
            (None, None) => break,
        }
    }
    (tile_m, tile_n)
}

/// The output of [`tiled`], shared by its tasks, each of which writes its
/// own tile only.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the tasks write disjoint tiles of the output (see `tiled`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Pointer to element `offset` (a method, so that closures capture the
    /// whole Sync struct rather than its raw pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// A read-only strided f32 matrix: element (r, c) at `data[r·rs + c·cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `rows` × `cols` elements of `data` with row stride `rs` and column
    /// stride `cs`. Panics unless every element lies in `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "a {rows}×{cols} view with strides ({rs}, {cs}) overruns {} elements",
            data.len()
        );
        View {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose, without moving any data.
    pub(crate) fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// c [a.rows, b.cols] (row stride `ldc`) = alpha · a · b + beta · c, on the
/// calling thread; beta 0 overwrites c, whatever it held. Panics unless
/// a.cols == b.rows and every element of the product lies in c.
pub(crate) fn sgemm(alpha: f32, a: View<'_>, b: View<'_>, beta: f32, c: &mut [f32], ldc: usize) {
    assert!(
        a.rows == 0 || b.cols == 0 || (a.rows - 1) * ldc + b.cols <= c.len(),
        "c is too short for the product"
    );
    // SAFETY: c is borrowed exclusively and every written element was just
    // checked to lie in it.
    unsafe { sgemm_raw(alpha, a, b, beta, c.as_mut_ptr(), ldc) }
}

/// [`sgemm`] writing through a raw pointer.
///
/// # Safety
/// `c + r·ldc + j` must be valid for reads and writes, and touched by no
/// other thread during the call, for every r < a.rows and j < b.cols.
unsafe fn sgemm_raw(alpha: f32, a: View<'_>, b: View<'_>, beta: f32, c: *mut f32, ldc: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    // Strides of slices in memory fit an isize.
    let stride = |s: usize| s as isize;
    // SAFETY: `View::new` checked that a and b lie in their slices; the
    // caller vouches for c.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            stride(a.rs),
            stride(a.cs),
            b.data.as_ptr(),
            stride(b.rs),
            stride(b.cs),
            beta,
            c,
            stride(ldc),
            1,
        )
    }
}
