//! bf16 GEMMs through cuBLASLt. Every bf16 product of the backend (linear layers forward and
//! backward, the fused backward on stacked weights, the residual epilogue) goes through
//! one plan-cached call (`lt_gemm`; [`Cuda::gemm_bf16`] wraps it in cuBLAS's argument order):
//! column-major as in cuBLAS,
//! `D[m, n] = op(A)·op(B) + β·C` with bf16 A and B, C and D both f32 or both bf16, fp32
//! accumulation, β 0 or 1. (The fp32 SGEMMs of the parity mode stay on cuBLAS, in mod.rs.)
//!
//! Each distinct problem ([`GemmShape`]: transposes, sizes, leading dimensions, output type, what
//! is added, pointer alignment) gets one plan, kept for the life of the backend: the cuBLASLt
//! descriptors and one algorithm, picked as [`GemmSelect`] says:
//! * `heuristic`: the first algorithm of cuBLASLt's heuristic (what cuBLAS itself would run);
//! * `tuned` (the default): the fastest of the heuristic's first [`TUNE_CANDIDATES`], timed when
//!   the plan is made on scratch operands of the plan's shape filled with pseudo-random bf16
//!   values (never the live buffers: an accumulating product would add into them; zeros would
//!   understate the time). That synchronises with the host once per new shape and needs memory
//!   for one product's operands, at most [`TUNE_SCRATCH_MAX`] (without it the heuristic's first
//!   is kept).
//!
//! An algorithm fixes the summation order, so a resumed or repeated run must reuse the choices of
//! the first: the tuned plans form a table (shape -> algorithm) that is saved as JSON and loaded
//! by later runs ([`Cuda::keep_gemm_algos_in`], [`Cuda::load_gemm_algos`],
//! [`Cuda::save_gemm_algos`]; `MOR_GEMM_ALGOS=<file>` at backend start). A file records the
//! cuBLASLt version and the device; one from another version or device is ignored with a
//! warning. Every algorithm used, from the heuristic or from a file, must fit the backend's
//! cuBLASLt workspace ([`LT_WORKSPACE`]).

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fmt;
use std::path::{Path, PathBuf};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result::{self as lt_result, CublasError};
use cudarc::cublaslt::{sys as lt, MatmulShared as _};
use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use serde::{Deserialize, Serialize};

use super::{check_len, Cuda, CudaBuf, CudaError, Dtype};

/// Workspace bytes of cuBLASLt (NVIDIA's recommendation for Hopper); every algorithm must fit.
pub(super) const LT_WORKSPACE: usize = 32 << 20;
/// Candidates of the heuristic timed per shape in `tuned` mode.
pub const TUNE_CANDIDATES: usize = 8;
/// Timed runs per candidate (after one warm-up run); the median counts.
const TUNE_REPS: usize = 5;
/// A later candidate replaces the best so far only when faster by more than this fraction: below
/// it the difference is timing noise, and keeping the heuristic's order then makes repeated
/// tunings agree more often.
const TUNE_MARGIN: f64 = 0.02;
/// Most scratch memory (bytes) the timing of one shape may take (the largest product of a
/// training step, an LM-head chunk of 4096 x 49152 f32 logits, takes about 0.9 GiB).
pub const TUNE_SCRATCH_MAX: usize = 2 << 30;
/// Device memory left free when scratch is allocated for timing.
const TUNE_FREE_MARGIN: usize = 256 << 20;
/// `format` of the algorithm table file.
const TABLE_FORMAT: &str = "mor-gemm-algos/1";

/// How the backend picks the cuBLASLt algorithm of a bf16 GEMM (`CudaOptions::gemm_select`,
/// `MOR_GEMM_SELECT=heuristic|tuned`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmSelect {
    /// The heuristic's first algorithm: deterministic for a given cuBLASLt version and device.
    Heuristic,
    /// The fastest of the heuristic's first [`TUNE_CANDIDATES`], timed per shape (or taken from
    /// a loaded table).
    #[default]
    Tuned,
}

impl GemmSelect {
    /// `heuristic` or `tuned` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "heuristic" => Some(GemmSelect::Heuristic),
            "tuned" => Some(GemmSelect::Tuned),
            _ => None,
        }
    }
}

/// What a GEMM adds its product to: the `β·C` of `D = op(A)·op(B) + β·C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmAdd {
    /// β = 0: D is overwritten.
    Zero,
    /// β = 1, C = D: the product accumulates into D.
    Accumulate,
    /// β = 1, C a separate matrix of D's layout (the residual stream of a layer).
    Residual,
}

/// One bf16 GEMM problem as the backend plans it (column-major, cuBLAS conventions): A is stored
/// `[k, m]` when transposed (`transa`) else `[m, k]`, B `[n, k]` when transposed else `[k, n]`,
/// C and D `[m, n]`, with leading dimensions `lda`, `ldb`, `ldc` (C and D share theirs). Its
/// `Display` form is the key of the algorithm table, e.g.
/// `TN m960 n16384 k960 ld960,960,960 bf16 beta0 align256,256,256,256`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    out_bf16: bool,
    add: GemmAdd,
    /// Alignment (bytes, a power of two up to 256) of the A, B, C and D pointers: algorithms are
    /// chosen for it.
    align: [u16; 4],
}

impl GemmShape {
    /// A problem on densely stored operands (leading dimension = rows) with 256-byte aligned
    /// pointers, C and D of type `out`.
    pub fn new(transa: bool, transb: bool, m: usize, n: usize, k: usize, out: Dtype, add: GemmAdd) -> Self {
        GemmShape {
            transa,
            transb,
            m,
            n,
            k,
            lda: if transa { k } else { m },
            ldb: if transb { n } else { k },
            ldc: m,
            out_bf16: out == Dtype::Bf16,
            add,
            align: [256; 4],
        }
    }

    /// The same problem with other leading dimensions (each at least its matrix's rows).
    pub fn with_ld(mut self, lda: usize, ldb: usize, ldc: usize) -> Self {
        self.lda = lda;
        self.ldb = ldb;
        self.ldc = ldc;
        let ((ar, _), (br, _)) = (self.a_dims(), self.b_dims());
        assert!(lda >= ar.max(1) && ldb >= br.max(1) && ldc >= self.m.max(1), "gemm {self}: a leading dimension is below its matrix's rows");
        self
    }

    /// The alignment of these pointers (A, B, C, D) in place of the 256 bytes assumed.
    fn with_ptrs(mut self, ptrs: [u64; 4]) -> Self {
        self.align = ptrs.map(|p| if p == 0 { 256 } else { 1u16 << p.trailing_zeros().min(8) });
        self
    }

    /// `2·m·n·k`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Type of C and D.
    pub fn out(&self) -> Dtype {
        if self.out_bf16 {
            Dtype::Bf16
        } else {
            Dtype::F32
        }
    }

    /// Stored (rows, columns) of A and B.
    fn a_dims(&self) -> (usize, usize) {
        if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    fn b_dims(&self) -> (usize, usize) {
        if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    fn beta(&self) -> f32 {
        if self.add == GemmAdd::Zero {
            0.0
        } else {
            1.0
        }
    }

    /// Elements a matrix of `rows x cols` with leading dimension `ld` spans.
    fn span(rows: usize, cols: usize, ld: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            ld * (cols - 1) + rows
        }
    }

    /// Elements spanned by A, B and C/D.
    fn spans(&self) -> [usize; 3] {
        let ((ar, ac), (br, bc)) = (self.a_dims(), self.b_dims());
        [Self::span(ar, ac, self.lda), Self::span(br, bc, self.ldb), Self::span(self.m, self.n, self.ldc)]
    }
}

impl fmt::Display for GemmShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = |t: bool| if t { 'T' } else { 'N' };
        let add = match self.add {
            GemmAdd::Zero => "beta0",
            GemmAdd::Accumulate => "beta1",
            GemmAdd::Residual => "residual",
        };
        let [aa, ab, ac, ad] = self.align;
        write!(
            f,
            "{}{} m{} n{} k{} ld{},{},{} {} {add} align{aa},{ab},{ac},{ad}",
            op(self.transa),
            op(self.transb),
            self.m,
            self.n,
            self.k,
            self.lda,
            self.ldb,
            self.ldc,
            if self.out_bf16 { "bf16" } else { "f32" }
        )
    }
}

/// Where a plan's algorithm came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmSource {
    /// The heuristic's first (`heuristic` mode, or the heuristic offered one candidate).
    Heuristic,
    /// The fastest candidate, timed when the plan was made.
    Timed,
    /// The algorithm table (a loaded file, or an earlier plan of this process).
    Stored,
    /// `tuned` mode without memory for the timing scratch: the heuristic's first.
    Untimed,
}

/// The algorithm a plan runs, and how it was picked.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmChoice {
    pub source: GemmSource,
    /// Position in the heuristic's list of candidates (0: its first); `None` for a stored
    /// algorithm that is not among them.
    pub rank: Option<usize>,
    /// Median time (ms) of the chosen algorithm and of the heuristic's first, when timed.
    pub ms: Option<f64>,
    pub heuristic_ms: Option<f64>,
    /// Configuration as cuBLASLt describes it (algorithm id, tile, stages, split-k).
    pub config: String,
}

/// The cuBLASLt descriptors of one [`GemmShape`] (matmul, layouts of A, B, C, D).
struct LtDescs {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 4],
}

impl LtDescs {
    fn new(s: &GemmShape) -> Result<Self, CublasError> {
        use lt::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
        let desc = lt_result::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)?;
        // Owned from here: an error below destroys what was created.
        let mut d = LtDescs { desc, layouts: [std::ptr::null_mut(); 4] };
        use lt::cublasLtMatmulDescAttributes_t::{CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB};
        for (attr, t) in [(CUBLASLT_MATMUL_DESC_TRANSA, s.transa), (CUBLASLT_MATMUL_DESC_TRANSB, s.transb)] {
            let op: i32 = if t { 1 } else { 0 }; // CUBLAS_OP_T / CUBLAS_OP_N
            // SAFETY: a live descriptor; the attribute is an int32 cublasOperation_t.
            unsafe { lt_result::set_matmul_desc_attribute(d.desc, attr, &op as *const i32 as *const c_void, 4)? };
        }
        let cd = if s.out_bf16 { CUDA_R_16BF } else { CUDA_R_32F };
        let ((ar, ac), (br, bc)) = (s.a_dims(), s.b_dims());
        let dims = [(CUDA_R_16BF, ar, ac, s.lda), (CUDA_R_16BF, br, bc, s.ldb), (cd, s.m, s.n, s.ldc), (cd, s.m, s.n, s.ldc)];
        for (i, (t, rows, cols, ld)) in dims.into_iter().enumerate() {
            d.layouts[i] = lt_result::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)?;
        }
        Ok(d)
    }
}

impl Drop for LtDescs {
    fn drop(&mut self) {
        // SAFETY: created by `LtDescs::new` for this value alone, destroyed once here.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = lt_result::destroy_matrix_layout(l);
                }
            }
            let _ = lt_result::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt matmul set up for one [`GemmShape`], kept for the life of the backend.
pub(super) struct LtPlan {
    descs: LtDescs,
    algo: lt::cublasLtMatmulAlgo_t,
    choice: GemmChoice,
}

// SAFETY: the descriptors are plain host objects, used under the backend's plan lock only.
unsafe impl Send for LtPlan {}
unsafe impl Sync for LtPlan {}

/// One algorithm of the table, with what is known of how it was picked (informative, except
/// `algo`). In the file: the eight words as hex strings (JSON numbers would lose bits past
/// 2^53); a missing informative field reads as empty or `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredAlgo {
    #[serde(with = "hex_words")]
    algo: [u64; 8],
    /// `timed`, `untimed` or `heuristic` (see [`GemmSource`]).
    #[serde(default)]
    how: String,
    #[serde(default)]
    rank: Option<usize>,
    #[serde(default)]
    ms: Option<f64>,
    #[serde(default)]
    heuristic_ms: Option<f64>,
    #[serde(default)]
    config: String,
}

/// What a table file was made with; a file is used only where all three match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableId {
    cublaslt_version: u64,
    device: String,
    sm_count: u64,
}

/// The chosen algorithms by shape key ([`GemmShape`]'s `Display`), and the file they are kept in.
#[derive(Default)]
pub(super) struct AlgoTable {
    entries: BTreeMap<String, StoredAlgo>,
    file: Option<PathBuf>,
}

impl Cuda {
    /// Column-major `C[m, n] = op(A)·op(B) + beta·C` with bf16 A and B (device pointers of bf16
    /// data), C of type `c_type` (f32 or bf16), fp32 accumulation, `beta` 0 or 1: the backend's
    /// one bf16 GEMM path (cuBLASLt, see the module documentation).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_bf16(
        &self,
        transa: cublasOperation_t,
        transb: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        c_type: Dtype,
        ldc: usize,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        assert!(beta == 0.0 || beta == 1.0, "gemm_bf16: beta must be 0 or 1, not {beta}");
        let add = if beta == 0.0 { GemmAdd::Zero } else { GemmAdd::Accumulate };
        let t = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        let shape = GemmShape::new(t(transa), t(transb), m, n, k, c_type, add).with_ld(lda, ldb, ldc);
        self.lt_gemm(shape, a, b, c, c);
    }

    /// The backend's bf16 GEMM on whole buffers, for checks and benchmarks: `shape` on A = `a`
    /// and B = `b` (bf16 buffers), D = `d` (of the shape's output type), adding `c` for
    /// [`GemmAdd::Residual`] (no `c` otherwise).
    pub fn gemm_bf16_buf(&self, shape: GemmShape, a: &CudaBuf, b: &CudaBuf, c: Option<&CudaBuf>, d: &mut CudaBuf) {
        assert!(a.is_bf16() && b.is_bf16(), "gemm_bf16_buf: A and B must be bf16 buffers");
        assert!(d.dtype == shape.out(), "gemm_bf16_buf: D is {:?}, the shape says {:?}", d.dtype, shape.out());
        let [sa, sb, sc] = shape.spans();
        check_len("A", a.len(), sa);
        check_len("B", b.len(), sb);
        check_len("D", d.len(), sc);
        let (ap, bp) = (self.p(a), self.p(b));
        match (shape.add, c) {
            (GemmAdd::Residual, Some(c)) => {
                assert!(c.dtype == shape.out(), "gemm_bf16_buf: C is {:?}, the shape says {:?}", c.dtype, shape.out());
                check_len("C", c.len(), sc);
                let cp = self.p(c);
                let dp = self.pm(d);
                self.lt_gemm(shape, ap, bp, cp, dp);
            }
            (GemmAdd::Residual, None) => panic!("gemm_bf16_buf: a residual GEMM needs C"),
            (_, Some(_)) => panic!("gemm_bf16_buf: C is D unless the shape is a residual GEMM"),
            (_, None) => {
                let dp = self.pm(d);
                self.lt_gemm(shape, ap, bp, dp, dp);
            }
        }
    }

    /// Run `shape` on these device pointers through its plan (made on first use).
    pub(super) fn lt_gemm(&self, shape: GemmShape, a: u64, b: u64, c: u64, d: u64) {
        if shape.m == 0 || shape.n == 0 {
            return;
        }
        assert!(shape.k > 0, "gemm {shape}: k = 0");
        let shape = shape.with_ptrs([a, b, c, d]);
        let mut plans = self.lt_plans.lock().unwrap();
        let plan = plans.entry(shape).or_insert_with(|| {
            self.not_capturing("planning a GEMM shape");
            self.lt_new_plan(&shape)
        });
        let _p = self.prof_detail(|| format!("gemm {shape}"));
        self.lt_run(&plan.descs, &plan.algo, shape.beta(), [a, b, c, d])
            .unwrap_or_else(|e| panic!("cublasLtMatmul failed for {shape} ({}): {e:?}", plan.choice.config));
    }

    /// The algorithm the backend runs for `shape` (256-byte aligned operands), planning it as a
    /// GEMM call would (so in `tuned` mode timing it, unless already planned or in the table).
    pub fn gemm_algo_choice(&self, shape: GemmShape) -> GemmChoice {
        let mut plans = self.lt_plans.lock().unwrap();
        plans.entry(shape).or_insert_with(|| self.lt_new_plan(&shape)).choice.clone()
    }

    /// Times (ms, median of `reps` after a warm-up) of each of the heuristic's first `count`
    /// algorithms for `shape`, best first in the heuristic's view, on scratch operands as the
    /// tuner uses; an algorithm that fails to run gets infinity. Empty when the scratch does not
    /// fit. A diagnostic (`cuda_parity --gemm-algos`); touches no plan.
    pub fn gemm_algo_times(&self, shape: GemmShape, count: usize, reps: usize) -> Vec<f64> {
        let descs = LtDescs::new(&shape).unwrap_or_else(|e| panic!("cublasLt: no descriptors for {shape}: {e:?}"));
        let algos = self.lt_candidates(&descs, &shape, count).unwrap_or_else(|e| panic!("cublasLt: no algorithm for {shape}: {e:?}"));
        self.lt_time(&descs, &shape, &algos, reps).unwrap_or_default()
    }

    /// Add the algorithms of a table file written by [`Cuda::save_gemm_algos`] to the table
    /// (shapes already in it, planned by this backend, keep their algorithm); returns how many
    /// were added. A file from another cuBLASLt version or device is ignored with a warning
    /// (`Ok(0)`). Used by plans made later, in `tuned` mode.
    pub fn load_gemm_algos(&self, path: &Path) -> Result<usize, CudaError> {
        let err = |e: String| CudaError::Gemm(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let (id, entries) = parse_table(&text).map_err(err)?;
        let mine = self.table_id();
        if id != mine {
            eprintln!(
                "mor-engine: warning: ignoring the GEMM algorithm table {}: made with cuBLASLt {} on {} ({} SMs), this is cuBLASLt {} on {} ({} SMs)",
                path.display(),
                id.cublaslt_version,
                id.device,
                id.sm_count,
                mine.cublaslt_version,
                mine.device,
                mine.sm_count
            );
            return Ok(0);
        }
        let mut table = self.gemm_table.lock().unwrap();
        let before = table.entries.len();
        for (key, e) in entries {
            table.entries.entry(key).or_insert(e);
        }
        Ok(table.entries.len() - before)
    }

    /// Write the table (every shape planned in `tuned` mode, and those loaded) to `path`
    /// atomically (a temporary file renamed over it; the folder is created if missing); returns
    /// the number of shapes written.
    pub fn save_gemm_algos(&self, path: &Path) -> Result<usize, CudaError> {
        let table = self.gemm_table.lock().unwrap();
        self.write_table(&table, path)
    }

    /// Keep the table in `path`: load it when the file exists (see [`Cuda::load_gemm_algos`]),
    /// and rewrite it whenever a new shape is tuned (`tuned` mode only). Returns how many
    /// algorithms were loaded. A file that cannot be read or parsed is an error (it is not
    /// overwritten; delete it to tune afresh); one from another version or device is replaced.
    pub fn keep_gemm_algos_in(&self, path: &Path) -> Result<usize, CudaError> {
        let loaded = if path.exists() { self.load_gemm_algos(path)? } else { 0 };
        let mut table = self.gemm_table.lock().unwrap();
        table.file = Some(path.to_path_buf());
        if table.entries.len() > loaded {
            // Shapes tuned before this call: the file should hold them too.
            self.write_table(&table, path)?;
        }
        Ok(loaded)
    }

    /// The file the table is kept in ([`Cuda::keep_gemm_algos_in`], `MOR_GEMM_ALGOS`).
    pub fn gemm_algos_file(&self) -> Option<PathBuf> {
        self.gemm_table.lock().unwrap().file.clone()
    }

    /// `MOR_GEMM_ALGOS=<file>` at backend start (`tuned` mode): keep the table in that file. A
    /// file that cannot be used is reported and the backend tunes without it.
    pub(super) fn gemm_algos_from_env(&self) {
        let Some(path) = std::env::var_os("MOR_GEMM_ALGOS").filter(|p| !p.is_empty()) else { return };
        if self.gemm_select != GemmSelect::Tuned {
            return;
        }
        if let Err(e) = self.keep_gemm_algos_in(Path::new(&path)) {
            eprintln!("mor-engine: warning: MOR_GEMM_ALGOS not used: {e}");
        }
    }

    fn table_id(&self) -> TableId {
        // SAFETY: a plain query of the loaded library.
        let version = unsafe { lt::cublasLtGetVersion() } as u64;
        TableId { cublaslt_version: version, device: self.device_name(), sm_count: self.sm_count as u64 }
    }

    fn write_table(&self, table: &AlgoTable, path: &Path) -> Result<usize, CudaError> {
        let err = |e: std::io::Error| CudaError::Gemm(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_file_name(format!(
            "{}.tmp{}",
            path.file_name().map_or("gemm_algos".into(), |f| f.to_string_lossy()),
            std::process::id()
        ));
        std::fs::write(&tmp, table_json(&self.table_id(), &table.entries)).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        Ok(table.entries.len())
    }

    /// The plan of `s`: descriptors and the algorithm [`GemmSelect`] picks (see the module
    /// documentation). Panics when cuBLASLt has no algorithm for it.
    fn lt_new_plan(&self, s: &GemmShape) -> LtPlan {
        let descs = LtDescs::new(s).unwrap_or_else(|e| panic!("cublasLt: no descriptors for {s}: {e:?}"));
        let tuned = self.gemm_select == GemmSelect::Tuned;
        let cands = self
            .lt_candidates(&descs, s, if tuned { TUNE_CANDIDATES } else { 1 })
            .unwrap_or_else(|e| panic!("cublasLt: no algorithm for {s}: {e:?}"));
        let first = |source| GemmChoice { source, rank: Some(0), ms: None, heuristic_ms: None, config: algo_config(&cands[0]) };
        if !tuned {
            return LtPlan { descs, algo: cands[0], choice: first(GemmSource::Heuristic) };
        }
        let key = s.to_string();
        let stored = self.gemm_table.lock().unwrap().entries.get(&key).cloned();
        if let Some(e) = stored {
            let algo = lt::cublasLtMatmulAlgo_t { data: e.algo };
            if self.lt_algo_fits(&descs, &algo) {
                let rank = cands.iter().position(|c| c.data == e.algo);
                let choice = GemmChoice { source: GemmSource::Stored, rank, ms: e.ms, heuristic_ms: e.heuristic_ms, config: e.config };
                return LtPlan { descs, algo, choice };
            }
            eprintln!("mor-engine: warning: the stored GEMM algorithm for {key} does not pass cublasLtMatmulAlgoCheck (or needs more workspace); tuning again");
        }
        let (algo, choice) = if cands.len() == 1 {
            (cands[0], first(GemmSource::Heuristic))
        } else if let Some(times) = self.lt_time(&descs, s, &cands, TUNE_REPS) {
            let best = pick_fastest(&times);
            let fin = |t: f64| t.is_finite().then_some(t);
            let choice = GemmChoice { source: GemmSource::Timed, rank: Some(best), ms: fin(times[best]), heuristic_ms: fin(times[0]), config: algo_config(&cands[best]) };
            (cands[best], choice)
        } else {
            eprintln!("mor-engine: warning: no device memory to time the GEMM algorithms of {key}; using the heuristic's first");
            (cands[0], first(GemmSource::Untimed))
        };
        let how = match choice.source {
            GemmSource::Timed => "timed",
            GemmSource::Untimed => "untimed",
            _ => "heuristic",
        };
        let entry = StoredAlgo { algo: algo.data, how: how.into(), rank: choice.rank, ms: choice.ms, heuristic_ms: choice.heuristic_ms, config: choice.config.clone() };
        let mut table = self.gemm_table.lock().unwrap();
        table.entries.insert(key, entry);
        if let Some(path) = table.file.clone() {
            if let Err(e) = self.write_table(&table, &path) {
                eprintln!("mor-engine: warning: could not save the GEMM algorithm table: {e}");
            }
        }
        LtPlan { descs, algo, choice }
    }

    /// The heuristic's first `count` algorithms for `s` (best first in its view), those that ran
    /// and fit the workspace; an error when none does. For the pointer alignment of the shape,
    /// and with a bf16 output only those whose split-k partial sums (if any) stay fp32.
    fn lt_candidates(&self, descs: &LtDescs, s: &GemmShape, count: usize) -> Result<Vec<lt::cublasLtMatmulAlgo_t>, CublasError> {
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let pref = lt_result::create_matmul_pref()?;
        let mut found: Vec<lt::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count.max(1));
        let mut returned = 0i32;
        // SAFETY: live descriptors and preference; `found` has room for `count` results, of which
        // the library writes `returned`.
        let status = unsafe {
            let set = |attr, v: &[u8]| lt_result::set_matmul_pref_attribute(pref, attr, v.as_ptr() as *const c_void, v.len());
            let mut r = set(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(LT_WORKSPACE as u64).to_ne_bytes());
            let aligns = [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ];
            for (attr, al) in aligns.into_iter().zip(s.align) {
                r = r.and_then(|_| set(attr, &(al as u32).to_ne_bytes()));
            }
            if s.out_bf16 {
                // Split-k partial sums in fp32 only (not in the bf16 output), so that a faster
                // candidate never costs accuracy.
                let mask = lt::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
                r = r.and_then(|_| set(P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask.to_ne_bytes()));
            }
            let st = r.and_then(|_| {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    *self.blas_lt.handle(),
                    descs.desc,
                    descs.layouts[0],
                    descs.layouts[1],
                    descs.layouts[2],
                    descs.layouts[3],
                    pref,
                    count.max(1) as i32,
                    found.as_mut_ptr(),
                    &mut returned,
                )
                .result()
            });
            found.set_len(returned.clamp(0, count.max(1) as i32) as usize);
            lt_result::destroy_matmul_pref(pref)?;
            st
        };
        status?;
        let ok: Vec<_> = found
            .iter()
            .filter(|h| h.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && h.workspaceSize <= LT_WORKSPACE)
            .map(|h| h.algo)
            .collect();
        if ok.is_empty() {
            return Err(CublasError(lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
        }
        Ok(ok)
    }

    /// Whether cuBLASLt accepts `algo` for these descriptors within the workspace.
    fn lt_algo_fits(&self, descs: &LtDescs, algo: &lt::cublasLtMatmulAlgo_t) -> bool {
        let mut r = std::mem::MaybeUninit::<lt::cublasLtMatmulHeuristicResult_t>::zeroed();
        // SAFETY: live descriptors; `r` is written by the library on success.
        let st = unsafe {
            lt::cublasLtMatmulAlgoCheck(
                *self.blas_lt.handle(),
                descs.desc,
                descs.layouts[0],
                descs.layouts[1],
                descs.layouts[2],
                descs.layouts[3],
                algo,
                r.as_mut_ptr(),
            )
        };
        // SAFETY: zero-initialised plain data, filled in on success.
        let r = unsafe { r.assume_init() };
        st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= LT_WORKSPACE
    }

    /// Median time (ms) of each algorithm on scratch operands of `s`; `None` when the scratch
    /// does not fit (see [`TUNE_SCRATCH_MAX`]). Synchronises with the host.
    fn lt_time(&self, descs: &LtDescs, s: &GemmShape, algos: &[lt::cublasLtMatmulAlgo_t], reps: usize) -> Option<Vec<f64>> {
        let (_mem, ptrs) = self.lt_scratch(s)?;
        let beta = s.beta();
        let times = algos
            .iter()
            .map(|algo| {
                // A warm-up run, then the timed ones back to back between events, read at the end:
                // the GPU never waits for the host in between (launch latency is not counted).
                if self.lt_run(descs, algo, beta, ptrs).is_err() {
                    return f64::INFINITY;
                }
                let event = || self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("cuda: event record failed");
                let mut events = vec![event()];
                for _ in 0..reps.max(1) {
                    if self.lt_run(descs, algo, beta, ptrs).is_err() {
                        return f64::INFINITY;
                    }
                    events.push(event());
                }
                let mut ms: Vec<f64> = events.windows(2).map(|w| w[0].elapsed_ms(&w[1]).expect("cuda: event timing failed") as f64).collect();
                ms.sort_by(|x, y| x.total_cmp(y));
                ms[ms.len() / 2]
            })
            .collect();
        self.synchronize();
        Some(times)
    }

    /// Scratch operands for timing `s`: one allocation holding A, B, D and (residual) C, filled
    /// with pseudo-random bf16 values, and their pointers (A, B, C, D). `None` when it would
    /// exceed [`TUNE_SCRATCH_MAX`] or leave less than [`TUNE_FREE_MARGIN`] of device memory.
    fn lt_scratch(&self, s: &GemmShape) -> Option<(CudaSlice<u8>, [u64; 4])> {
        let [sa, sb, sc] = s.spans();
        let cd = if s.out_bf16 { 2 } else { 4 };
        let round = |bytes: usize| bytes.max(1).next_multiple_of(256);
        let sizes = [round(sa * 2), round(sb * 2), if s.add == GemmAdd::Residual { round(sc * cd) } else { 0 }, round(sc * cd)];
        let total: usize = sizes.iter().sum();
        if total > TUNE_SCRATCH_MAX || self.mem_get_info().0 < total + TUNE_FREE_MARGIN {
            return None;
        }
        // SAFETY: filled below before any read.
        let mut mem = unsafe { self.stream.alloc::<u8>(total) }.ok()?;
        let base = self.pm(&mut mem);
        self.fill_random_bf16(base, total);
        let mut ptrs = [0u64; 4];
        let mut off = 0u64;
        for (p, size) in ptrs.iter_mut().zip(sizes) {
            *p = base + off;
            off += size as u64;
        }
        if s.add != GemmAdd::Residual {
            ptrs[2] = ptrs[3]; // C is D
        }
        Some((mem, ptrs))
    }

    /// Fill `bytes` at `ptr` (even, 2-byte aligned) with pseudo-random bf16 values in (-1, 1)
    /// (a 64 KiB host block repeated by device copies). Read as f32, each pair of them is a finite
    /// value in (-1, 1) as well.
    fn fill_random_bf16(&self, ptr: u64, bytes: usize) {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let block: Vec<half::bf16> = (0..(32 << 10).min(bytes / 2))
            .map(|_| {
                // xorshift64*: 24 random bits to a value in (-1, 1), kept away from zero.
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let r = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u32 << 24) as f32;
                let v = 0.0625 + 0.9375 * r;
                half::bf16::from_f32(if x & 1 == 0 { v } else { -v })
            })
            .collect();
        if block.is_empty() {
            return;
        }
        let src = self.stream.clone_htod(&block).expect("cuda: host-to-device copy failed");
        // Both ranges of each copy lie in the caller's allocation of `bytes` and do not overlap.
        let mut filled = block.len() * 2;
        self.memcpy_dtod(ptr, self.p(&src), filled);
        while filled < bytes {
            let n = filled.min(bytes - filled);
            self.memcpy_dtod(ptr + filled as u64, ptr, n);
            filled += n;
        }
    }

    /// `D = op(A)·op(B) + beta·C` with algorithm `algo` on the stream, with the backend's
    /// workspace; `ptrs` are A, B, C, D in the descriptors' layouts.
    fn lt_run(&self, descs: &LtDescs, algo: &lt::cublasLtMatmulAlgo_t, beta: f32, ptrs: [u64; 4]) -> Result<(), CublasError> {
        let alpha = 1.0f32;
        let [a, b, c, d] = ptrs;
        let ws = self.p(&self.lt_workspace);
        // SAFETY: live descriptors; the pointers hold the extents of their layouts (checked by the
        // callers); the workspace is LT_WORKSPACE bytes.
        unsafe {
            lt_result::matmul(
                *self.blas_lt.handle(),
                descs.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                descs.layouts[0],
                b as *const c_void,
                descs.layouts[1],
                c as *const c_void,
                descs.layouts[2],
                d as *mut c_void,
                descs.layouts[3],
                algo,
                ws as *mut c_void,
                LT_WORKSPACE,
                self.stream.cu_stream() as lt::cudaStream_t,
            )
        }
    }
}

/// Index of the fastest time, going through the candidates in the heuristic's order: a later one
/// wins only when faster than the best so far by more than [`TUNE_MARGIN`].
fn pick_fastest(times: &[f64]) -> usize {
    let mut best = 0;
    for (i, &t) in times.iter().enumerate().skip(1) {
        if t < times[best] * (1.0 - TUNE_MARGIN) || (!times[best].is_finite() && t.is_finite()) {
            best = i;
        }
    }
    best
}

/// `id …, tile …, stages …, splitk …` of an algorithm (`?` where cuBLASLt does not say).
fn algo_config(algo: &lt::cublasLtMatmulAlgo_t) -> String {
    use lt::cublasLtMatmulAlgoConfigAttributes_t as A;
    let get = |attr| {
        let mut v = 0u32;
        let mut written = 0usize;
        // SAFETY: reads one 4-byte attribute of a plain-data algorithm into `v`.
        let st = unsafe { lt::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &mut v as *mut u32 as *mut c_void, 4, &mut written) };
        if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            (v as i32).to_string()
        } else {
            "?".into()
        }
    };
    format!(
        "id {} tile {} stages {} splitk {}",
        get(A::CUBLASLT_ALGO_CONFIG_ID),
        get(A::CUBLASLT_ALGO_CONFIG_TILE_ID),
        get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
        get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM)
    )
}

// ---- the table file --------------------------------------------------------------------------

/// The table file: format, cuBLASLt version, device, SM count, then one object per shape (its
/// key, then [`StoredAlgo`]'s fields).
#[derive(Serialize, Deserialize)]
struct TableFile {
    format: String,
    cublaslt_version: u64,
    device: String,
    sm_count: u64,
    algos: Vec<KeyedAlgo>,
}

#[derive(Serialize, Deserialize)]
struct KeyedAlgo {
    key: String,
    #[serde(flatten)]
    algo: StoredAlgo,
}

/// The table as (pretty-printed) JSON.
fn table_json(id: &TableId, entries: &BTreeMap<String, StoredAlgo>) -> String {
    let file = TableFile {
        format: TABLE_FORMAT.into(),
        cublaslt_version: id.cublaslt_version,
        device: id.device.clone(),
        sm_count: id.sm_count,
        algos: entries.iter().map(|(key, e)| KeyedAlgo { key: key.clone(), algo: e.clone() }).collect(),
    };
    // Non-finite times are written as `null`.
    serde_json::to_string_pretty(&file).expect("the table serialises") + "\n"
}

/// Parse a table file written by [`table_json`].
fn parse_table(text: &str) -> Result<(TableId, BTreeMap<String, StoredAlgo>), String> {
    // The format first, so that a file of another format is reported as such.
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let json_err = |e: serde_json::Error| format!("JSON: {e}");
    let Format { format } = serde_json::from_str(text).map_err(json_err)?;
    if format != TABLE_FORMAT {
        return Err(format!("format {format:?}, expected \"{TABLE_FORMAT}\""));
    }
    let file: TableFile = serde_json::from_str(text).map_err(json_err)?;
    let id = TableId { cublaslt_version: file.cublaslt_version, device: file.device, sm_count: file.sm_count };
    Ok((id, file.algos.into_iter().map(|k| (k.key, k.algo)).collect()))
}

/// `[u64; 8]` as eight `"0x…"` hex strings.
mod hex_words {
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::{SerializeTuple, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(words: &[u64; 8], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(8)?;
        for w in words {
            t.serialize_element(&format!("{w:#018x}"))?;
        }
        t.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u64; 8], D::Error> {
        let words: [Word; 8] = de::Deserialize::deserialize(d)?;
        Ok(words.map(|w| w.0))
    }

    struct Word(u64);

    impl<'de> de::Deserialize<'de> for Word {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(WordVisitor)
        }
    }

    struct WordVisitor;

    impl Visitor<'_> for WordVisitor {
        type Value = Word;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a 64-bit word as a \"0x...\" hex string")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Word, E> {
            let word = v.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok());
            word.map(Word).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_key_names_every_parameter() {
        let s = GemmShape::new(true, false, 960, 16384, 960, Dtype::Bf16, GemmAdd::Zero);
        assert_eq!(s.to_string(), "TN m960 n16384 k960 ld960,960,960 bf16 beta0 align256,256,256,256");
        let s = GemmShape::new(false, true, 192, 320, 4096, Dtype::F32, GemmAdd::Accumulate).with_ld(200, 330, 256).with_ptrs([0x1000, 0x1010, 0x1004, 0x1004]);
        assert_eq!(s.to_string(), "NT m192 n320 k4096 ld200,330,256 f32 beta1 align256,16,4,4");
        let s = GemmShape::new(false, false, 7, 5, 3, Dtype::F32, GemmAdd::Residual);
        assert_eq!(s.to_string(), "NN m7 n5 k3 ld7,3,7 f32 residual align256,256,256,256");
        assert_eq!(s.spans(), [7 * 2 + 7, 3 * 4 + 3, 7 * 4 + 7]);
    }

    #[test]
    #[should_panic(expected = "leading dimension")]
    fn leading_dimension_below_rows_is_refused() {
        let _ = GemmShape::new(true, false, 8, 8, 16, Dtype::F32, GemmAdd::Zero).with_ld(8, 16, 8);
    }

    #[test]
    fn select_parses() {
        assert_eq!(GemmSelect::parse("Tuned"), Some(GemmSelect::Tuned));
        assert_eq!(GemmSelect::parse(" heuristic "), Some(GemmSelect::Heuristic));
        assert_eq!(GemmSelect::parse("fast"), None);
        assert_eq!(GemmSelect::default(), GemmSelect::Tuned);
    }

    #[test]
    fn fastest_keeps_heuristic_order_within_noise() {
        assert_eq!(pick_fastest(&[1.0, 0.8, 0.9]), 1);
        assert_eq!(pick_fastest(&[1.0, 0.99, 0.985]), 0);
        assert_eq!(pick_fastest(&[f64::INFINITY, 2.0, 1.0]), 2);
        assert_eq!(pick_fastest(&[0.5]), 0);
    }

    #[test]
    fn table_round_trips() {
        let id = TableId { cublaslt_version: 130_001, device: "NVIDIA \"H200\" \\ test".into(), sm_count: 132 };
        let mut entries = BTreeMap::new();
        let key = GemmShape::new(true, false, 2560, 16384, 960, Dtype::Bf16, GemmAdd::Zero).to_string();
        let algo = [u64::MAX, 0, 1, 0x8000_0000_0000_0001, 42, 7, 0xdead_beef, 1 << 53 | 1];
        entries.insert(key.clone(), StoredAlgo { algo, how: "timed".into(), rank: Some(3), ms: Some(0.111), heuristic_ms: Some(0.139), config: "id 31 tile 20 stages 8 splitk 1".into() });
        entries.insert("NN other".into(), StoredAlgo { algo: [0; 8], how: "untimed".into(), rank: None, ms: None, heuristic_ms: Some(f64::NAN), config: String::new() });
        let text = table_json(&id, &entries);
        let (id2, back) = parse_table(&text).unwrap();
        assert_eq!(id2, id);
        assert_eq!(back.len(), 2);
        assert_eq!(back[&key], entries[&key]);
        assert_eq!(back["NN other"].algo, [0; 8]);
        assert_eq!(back["NN other"].heuristic_ms, None); // NaN is written as null
        // The layout: the identification, then one object per shape with its words in hex.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["format"], TABLE_FORMAT);
        assert_eq!(v["cublaslt_version"], 130_001);
        assert_eq!(v["device"], id.device.as_str());
        assert_eq!(v["sm_count"], 132);
        let first = &v["algos"][0];
        assert_eq!(first["key"], "NN other");
        assert!(first["heuristic_ms"].is_null() && first["rank"].is_null());
        let second = &v["algos"][1];
        assert_eq!(second["key"], key.as_str());
        assert_eq!(second["algo"][0], "0xffffffffffffffff");
        assert_eq!(second["algo"][7], "0x0020000000000001");
        assert_eq!((second["how"].as_str(), second["rank"].as_u64(), second["ms"].as_f64()), (Some("timed"), Some(3), Some(0.111)));
        // An empty table is valid JSON too.
        let (_, none) = parse_table(&table_json(&id, &BTreeMap::new())).unwrap();
        assert!(none.is_empty());
        // A file as the earlier hand-written writer made it still reads, informative fields
        // optional.
        let old = format!(
            "{{\n  \"format\": \"{TABLE_FORMAT}\",\n  \"cublaslt_version\": 7,\n  \"device\": \"d\",\n  \"sm_count\": 2,\n  \"algos\": [\n    {{\"key\": \"k\", \"algo\": [\"0x0000000000000001\", \"0x2\", \"0x3\", \"0x4\", \"0x5\", \"0x6\", \"0x7\", \"0xffffffffffffffff\"], \"how\": \"timed\", \"rank\": 0, \"ms\": 0.5, \"heuristic_ms\": null, \"config\": \"id 1\"}},\n    {{\"key\": \"k2\", \"algo\": [\"0x0\", \"0x0\", \"0x0\", \"0x0\", \"0x0\", \"0x0\", \"0x0\", \"0x0\"]}}\n  ]\n}}\n"
        );
        let (id3, old) = parse_table(&old).unwrap();
        assert_eq!(id3, TableId { cublaslt_version: 7, device: "d".into(), sm_count: 2 });
        assert_eq!(old["k"], StoredAlgo { algo: [1, 2, 3, 4, 5, 6, 7, u64::MAX], how: "timed".into(), rank: Some(0), ms: Some(0.5), heuristic_ms: None, config: "id 1".into() });
        assert_eq!(old["k2"], StoredAlgo { algo: [0; 8], how: String::new(), rank: None, ms: None, heuristic_ms: None, config: String::new() });
    }

    #[test]
    fn table_errors_are_reported() {
        let err = |text: &str| parse_table(text).unwrap_err();
        assert!(err("{}").contains("missing field `format`"));
        assert!(err("{\"format\": \"other/1\"}").contains("format \"other/1\", expected"));
        let with_algo = |algo: &str| {
            format!("{{\"format\": \"{TABLE_FORMAT}\", \"cublaslt_version\": 1, \"device\": \"d\", \"sm_count\": 1, \"algos\": [{{\"key\": \"k\", \"algo\": {algo}}}]}}")
        };
        assert!(err(&with_algo("[1,2,3,4,5,6,7,8]")).contains("0x"));
        assert!(err(&with_algo("[\"0x1\",\"0x2\",\"0x3\",\"0x4\",\"0x5\",\"0x6\",\"0xg\",\"0x8\"]")).contains("0xg"));
        assert!(err(&with_algo("[\"0x1\",\"0x2\",\"0x3\",\"0x4\",\"0x5\",\"0x6\",\"0x7\"]")).contains("length 7"));
        assert!(err(&format!("{{\"format\": \"{TABLE_FORMAT}\", \"device\": \"d\", \"sm_count\": 1, \"algos\": []}}")).contains("cublaslt_version"));
        assert!(err(&format!("{{\"format\": \"{TABLE_FORMAT}\", \"cublaslt_version\": -1, \"device\": \"d\", \"sm_count\": 1, \"algos\": []}}")).contains("-1"));
        assert!(err("{\"format\": ").starts_with("JSON: "));
        assert!(err("[1, 2] x").starts_with("JSON: "));
    }
}
