//! Checkpoints: one directory holding
//!
//! * `model.safetensors` — every parameter of the [`ParamStore`] by name, f32, shape as
//!   registered (metadata `format = pt`, so Hugging Face tooling accepts the file);
//! * `optimizer.safetensors` — for each optimizer, `<param>.exp_avg` and `<param>.exp_avg_sq`
//!   (f32, the parameter's shape); the step count of each optimizer is in the file metadata
//!   under `step.main` / `step.aux_router`;
//! * `state.json` — whatever the caller passes (step, RNG state, data position, router
//!   counters, config, …), pretty-printed JSON.
//!
//! **Writing is atomic.** [`save_checkpoint`] writes everything into a fresh temporary directory
//! next to the target (`<parent>/.<name>.tmp-<pid>-<nanos>`), fsyncs every file and the directory,
//! then swaps it with the target: on Linux with `renameat2(RENAME_EXCHANGE)` (one atomic step),
//! elsewhere (or where the filesystem refuses it) by renaming the old checkpoint to
//! `<parent>/.<name>.old` first. The previous checkpoint is only deleted after the new one is
//! in place; any failure before that removes the temporary directory and leaves the target as
//! it was. If a crash hits between the two renames of the fallback, [`latest_checkpoint`] finds
//! the `.old` copy.
//!
//! **Loading validates before it changes anything**: missing files, unreadable/corrupt/truncated
//! safetensors, missing / unexpected / wrongly shaped / non-f32 tensors and a missing step count
//! are errors naming the tensor and the file; the parameter store and optimizers are written only
//! once both files have passed.
//!
//! Suggested layout: `<run_dir>/checkpoint/` holds the single latest checkpoint, atomically
//! replaced at every save ([`checkpoint_dir`], [`latest_checkpoint`]).

use crate::optim::{exp_avg_name, exp_avg_sq_name, AdamW, NamedTensor};
use anyhow::{anyhow, bail, Context, Result};
use mor_engine::{Backend, ParamGroup, ParamStore};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
/// Name of the checkpoint directory inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// `<run_dir>/checkpoint`.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT_DIR)
}

/// Metadata key of an optimizer's step count in `optimizer.safetensors`.
pub fn step_key(group: ParamGroup) -> &'static str {
    match group {
        ParamGroup::Main => "step.main",
        ParamGroup::AuxRouter => "step.aux_router",
    }
}

/// The checkpoint to resume a run from: `<run_dir>/checkpoint` if it holds a `state.json`,
/// else the `.checkpoint.old` backup left by a crash in the middle of a non-atomic replace,
/// else `None`.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let dir = checkpoint_dir(run_dir);
    if dir.join(STATE_FILE).is_file() {
        return Some(dir);
    }
    let backup = backup_path(&dir).ok()?;
    if !dir.exists() && backup.join(STATE_FILE).is_file() {
        return Some(backup);
    }
    None
}

// ---- writing ------------------------------------------------------------------------------

/// A tensor view that reads the backend buffer only when the serializer asks for its bytes, so
/// saving holds one tensor at a time in host memory.
struct LazyF32<'a, B: Backend> {
    backend: &'a B,
    buf: &'a B::Buf,
    shape: &'a [usize],
    n: usize,
}

impl<B: Backend> View for LazyF32<'_, B> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(f32_to_le_bytes(&self.backend.to_f32_prefix(self.buf, self.n)))
    }
    fn data_len(&self) -> usize {
        self.n * 4
    }
}

fn f32_to_le_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn le_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", path.display()))
}

fn fsync_dir(path: &Path) -> Result<()> {
    // Directories can be fsynced through a read-only handle on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    {
        File::open(path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot fsync directory {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_model_file<B: Backend>(path: &Path, backend: &B, params: &ParamStore<B>) -> Result<()> {
    let views = params.info.iter().zip(&params.values).map(|(info, buf)| {
        (info.name.clone(), LazyF32 { backend, buf, shape: &info.shape, n: info.numel() })
    });
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &meta, path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    fsync_file(path)
}

fn write_optimizer_file<B: Backend>(path: &Path, backend: &B, params: &ParamStore<B>, optimizers: &[&AdamW<B>]) -> Result<()> {
    let mut meta = HashMap::from([("format".to_string(), "mor-optimizer".to_string())]);
    let mut views = Vec::new();
    for opt in optimizers {
        if meta.insert(step_key(opt.group()).to_string(), opt.steps_taken().to_string()).is_some() {
            bail!("two optimizers for the {:?} group", opt.group());
        }
        for (k, id) in opt.param_ids().iter().enumerate() {
            let info = &params.info[id.0];
            let (m, v) = opt.moments(k);
            let n = info.numel();
            views.push((exp_avg_name(&info.name), LazyF32 { backend, buf: m, shape: &info.shape, n }));
            views.push((exp_avg_sq_name(&info.name), LazyF32 { backend, buf: v, shape: &info.shape, n }));
        }
    }
    safetensors::serialize_to_file(views, &Some(meta), path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    fsync_file(path)
}

fn write_state_file<S: Serialize + ?Sized>(path: &Path, state: &S) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(state).with_context(|| format!("cannot serialise the training state for {}", path.display()))?;
    text.push(b'\n');
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&text).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

fn split_target(dir: &Path) -> Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("checkpoint path {} has no usable final component", dir.display()))?
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn backup_path(dir: &Path) -> Result<PathBuf> {
    let (parent, name) = split_target(dir)?;
    Ok(parent.join(format!(".{name}.old")))
}

/// Remove temporary directories of earlier saves of `name` that crashed half-way.
fn remove_stale_temps(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    if let Ok(entries) = fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Atomically swap the directories `a` and `b` (both must exist). `Ok(false)` if the platform or
/// filesystem does not support it.
#[cfg(target_os = "linux")]
fn exchange_dirs(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(err).with_context(|| format!("cannot exchange {} and {}", a.display(), b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange_dirs(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

static FORCE_RENAME_FALLBACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Testing aid: skip the atomic `RENAME_EXCHANGE` and use the two-rename fallback.
#[doc(hidden)]
pub fn force_rename_fallback(on: bool) {
    FORCE_RENAME_FALLBACK.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Put the complete directory `tmp` at `dir`, replacing any previous content of `dir` only once
/// the new one is in place.
fn replace_dir(tmp: &Path, dir: &Path, parent: &Path) -> Result<()> {
    if !dir.exists() {
        fs::rename(tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        return fsync_dir(parent);
    }
    if !FORCE_RENAME_FALLBACK.load(std::sync::atomic::Ordering::SeqCst) && exchange_dirs(tmp, dir)? {
        // `tmp` now holds the previous checkpoint.
        fsync_dir(parent)?;
        // The new checkpoint is in place; a leftover old copy is removed by the next save.
        let _ = fs::remove_dir_all(tmp);
        return Ok(());
    }
    let backup = backup_path(dir)?;
    if backup.exists() {
        fs::remove_dir_all(&backup).with_context(|| format!("cannot remove {}", backup.display()))?;
    }
    fs::rename(dir, &backup).with_context(|| format!("cannot move {} to {}", dir.display(), backup.display()))?;
    if let Err(e) = fs::rename(tmp, dir) {
        let _ = fs::rename(&backup, dir);
        return Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    fsync_dir(parent)?;
    let _ = fs::remove_dir_all(&backup);
    Ok(())
}

/// Write a checkpoint to `dir` atomically (see the module docs). `optimizers` holds at most one
/// optimizer per group (typically `[&main]` or `[&main, &aux]`); `state` is any serialisable
/// value (usually a `serde_json::Value`) stored as `state.json`.
///
/// Refuses to replace an existing `dir` that is not a checkpoint (non-empty without
/// `state.json`), so a wrong path cannot wipe other data.
pub fn save_checkpoint<B: Backend, S: Serialize + ?Sized>(
    dir: &Path,
    backend: &B,
    params: &ParamStore<B>,
    optimizers: &[&AdamW<B>],
    state: &S,
) -> Result<()> {
    let (parent, name) = split_target(dir)?;
    if dir.exists() {
        let is_empty = fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !dir.join(STATE_FILE).is_file() && !is_empty {
            bail!("refusing to replace {}: it exists and is not a checkpoint (no {STATE_FILE})", dir.display());
        }
    }
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    remove_stale_temps(&parent, &name);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    fs::create_dir(&tmp).with_context(|| format!("cannot create temporary checkpoint directory {}", tmp.display()))?;

    let written = (|| -> Result<()> {
        write_model_file(&tmp.join(MODEL_FILE), backend, params)?;
        write_optimizer_file(&tmp.join(OPTIMIZER_FILE), backend, params, optimizers)?;
        write_state_file(&tmp.join(STATE_FILE), state)?;
        fsync_dir(&tmp)
    })()
    .and_then(|()| replace_dir(&tmp, dir, &parent));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("checkpoint {} not written (previous checkpoint, if any, kept)", dir.display())));
    }
    Ok(())
}

// ---- reading ------------------------------------------------------------------------------

/// A memory-mapped safetensors file whose header has been parsed and validated.
struct StFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl StFile {
    fn open(path: &Path) -> Result<StFile> {
        if !path.is_file() {
            bail!("checkpoint file {} is missing", path.display());
        }
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: checkpoint files are written once (in a temp dir) and never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        SafeTensors::deserialize(&map)
            .map_err(|e| anyhow!("{} is not a valid safetensors file (corrupt or truncated): {e}", path.display()))?;
        Ok(StFile { path: path.to_path_buf(), map })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated at open")
    }

    fn metadata(&self) -> HashMap<String, String> {
        SafeTensors::read_metadata(&self.map)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default()
    }

    /// Check that `name` exists with dtype F32 and `shape`.
    fn check(&self, st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<()> {
        let t = st
            .tensor(name)
            .map_err(|_| anyhow!("tensor {name} is missing from {}", self.path.display()))?;
        if t.dtype() != Dtype::F32 {
            bail!("tensor {name} in {} has dtype {:?}, expected F32", self.path.display(), t.dtype());
        }
        if t.shape() != shape {
            bail!("tensor {name} in {} has shape {:?}, expected {:?}", self.path.display(), t.shape(), shape);
        }
        Ok(())
    }

    fn check_no_extra(&self, st: &SafeTensors<'_>, expected: &HashSet<String>) -> Result<()> {
        let mut extra: Vec<&String> = st.names().into_iter().filter(|n| !expected.contains(*n)).collect();
        extra.sort();
        if let Some(name) = extra.first() {
            bail!(
                "unexpected tensor {name} in {} ({} tensor(s) not in the model/optimizer)",
                self.path.display(),
                extra.len()
            );
        }
        Ok(())
    }

    fn read_f32(&self, st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
        le_bytes_to_f32(st.tensor(name).expect("validated").data())
    }
}

/// Read `state.json` of a checkpoint directory without loading any tensor.
pub fn read_state(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(STATE_FILE);
    if !path.is_file() {
        bail!("checkpoint file {} is missing", path.display());
    }
    let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Load a checkpoint written by [`save_checkpoint`] into `params` and `optimizers` and return
/// its `state.json`. Every optimizer passed must have its group's state in the file; the file may
/// not hold state of a group that is not passed. On error nothing has been modified.
pub fn load_checkpoint<B: Backend>(
    dir: &Path,
    backend: &B,
    params: &mut ParamStore<B>,
    optimizers: &mut [&mut AdamW<B>],
) -> Result<serde_json::Value> {
    if !dir.is_dir() {
        bail!("checkpoint directory {} does not exist", dir.display());
    }
    let model_path = dir.join(MODEL_FILE);
    let opt_path = dir.join(OPTIMIZER_FILE);
    let state = read_state(dir)?;
    let model = StFile::open(&model_path)?;
    let optf = StFile::open(&opt_path)?;

    // Validate the model file.
    let mst = model.tensors();
    for info in &params.info {
        model.check(&mst, &info.name, &info.shape)?;
    }
    model.check_no_extra(&mst, &params.info.iter().map(|i| i.name.clone()).collect())?;

    // Validate the optimizer file.
    let ost = optf.tensors();
    let meta = optf.metadata();
    let mut expected = HashSet::new();
    let mut steps = Vec::with_capacity(optimizers.len());
    let mut groups = HashSet::new();
    for opt in optimizers.iter() {
        if !groups.insert(step_key(opt.group())) {
            bail!("two optimizers for the {:?} group", opt.group());
        }
        let key = step_key(opt.group());
        let step: u64 = meta
            .get(key)
            .ok_or_else(|| anyhow!("{} has no state for the {:?} optimizer (metadata {key} missing)", opt_path.display(), opt.group()))?
            .parse()
            .map_err(|_| anyhow!("{}: metadata {key} is not an integer", opt_path.display()))?;
        steps.push(step);
        for (name, shape) in opt.state_tensor_names(params) {
            optf.check(&ost, &name, &shape)?;
            expected.insert(name);
        }
    }
    for key in [step_key(ParamGroup::Main), step_key(ParamGroup::AuxRouter)] {
        if meta.contains_key(key) && !groups.contains(key) {
            bail!("{} holds optimizer state ({key}) but no optimizer for that group was given", opt_path.display());
        }
    }
    optf.check_no_extra(&ost, &expected)?;

    // Everything is valid: write.
    for (i, info) in params.info.iter().enumerate() {
        let data = model.read_f32(&mst, &info.name);
        backend.write_f32(&mut params.values[i], &data);
    }
    for (opt, step) in optimizers.iter_mut().zip(steps) {
        let ids = opt.param_ids().to_vec();
        for (k, id) in ids.iter().enumerate() {
            let name = &params.info[id.0].name;
            let m = optf.read_f32(&ost, &exp_avg_name(name));
            let v = optf.read_f32(&ost, &exp_avg_sq_name(name));
            opt.write_moments(backend, k, &m, &v);
        }
        opt.set_steps_taken(step);
    }
    Ok(state)
}

/// Write only the parameter values to a single safetensors file (`format = pt`, HF names),
/// atomically (temp file + fsync + rename). For exporting weights.
pub fn save_model_weights<B: Backend>(path: &Path, backend: &B, params: &ParamStore<B>) -> Result<()> {
    let (parent, name) = split_target(path)?;
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = write_model_file(&tmp, backend, params)
        .and_then(|()| fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display())))
        .and_then(|()| fsync_dir(&parent));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Load parameter values from a safetensors file (e.g. `<checkpoint>/model.safetensors`), with
/// the same validation as [`load_checkpoint`]; optimizers are untouched.
pub fn load_model_weights<B: Backend>(path: &Path, backend: &B, params: &mut ParamStore<B>) -> Result<()> {
    let f = StFile::open(path)?;
    let st = f.tensors();
    for info in &params.info {
        f.check(&st, &info.name, &info.shape)?;
    }
    f.check_no_extra(&st, &params.info.iter().map(|i| i.name.clone()).collect())?;
    for (i, info) in params.info.iter().enumerate() {
        let data = f.read_f32(&st, &info.name);
        backend.write_f32(&mut params.values[i], &data);
    }
    Ok(())
}

/// All tensors of a safetensors file as f32 host copies (F32 tensors only; others are an
/// error naming the tensor), plus the file's metadata. For tests and tools.
pub fn read_safetensors_f32(path: &Path) -> Result<(Vec<NamedTensor>, HashMap<String, String>)> {
    let f = StFile::open(path)?;
    let st = f.tensors();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = st.tensor(&name).expect("listed");
        if t.dtype() != Dtype::F32 {
            bail!("tensor {name} in {} has dtype {:?}, expected F32", path.display(), t.dtype());
        }
        out.push(NamedTensor { name: name.clone(), shape: t.shape().to_vec(), data: le_bytes_to_f32(t.data()) });
    }
    Ok((out, f.metadata()))
}
