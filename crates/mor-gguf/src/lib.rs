//! mor-gguf: read GGUF files (the llama.cpp container format).
//!
//! A GGUF file is a header, a list of typed metadata key/values, a tensor directory and an
//! aligned blob of tensor data. [`GgufFile::open`] memory-maps the file and parses everything
//! but the tensor data, which stays in the map until asked for:
//!
//! ```no_run
//! let g = mor_gguf::GgufFile::open("model.gguf")?;
//! let arch = g.get_str("general.architecture");
//! let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
//! let info = g.tensor("token_embd.weight").unwrap();   // dims innermost first, as ggml has them
//! let w: Vec<f32> = g.dequantize("token_embd.weight")?; // row-major, info.dims[0] contiguous
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Supported versions: 2 and 3, little-endian. Dequantisation covers F32, F16, BF16, F64,
//! I8/I16/I32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K, Q8_K; others are
//! listed in [`GgmlType`] (so any file parses) but [`dequantize_into`] refuses them.
//!
//! Layout note for weight loaders: `dims[0]` is the innermost (contiguous) dimension, so a
//! PyTorch `[out, in]` matrix appears as `dims = [in, out]`. llama.cpp stores the Q and K
//! projections of Llama models permuted (interleaved RoPE pairs); undoing that is the model
//! loader's job, not this crate's.

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

mod quant;
pub use quant::dequantize_into;

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Default alignment of the tensor data section (`general.alignment` overrides it).
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// Any integer type (or bool) widened to i64; u64 values above i64::MAX give None.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v as i64,
            Value::I8(v) => v as i64,
            Value::U16(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::U32(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            Value::Bool(v) => v as i64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => {
                write!(f, "[")?;
                for (i, v) in a.iter().take(8).enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.len() > 8 {
                    write!(f, ", ... ({} items)", a.len())?;
                }
                write!(f, "]")
            }
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// ggml tensor element types, with their numeric ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => bail!("unknown ggml tensor type id {id}"),
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        const QK_K: usize = 256;
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            IQ2XXS => (QK_K, 66),
            IQ2XS => (QK_K, 74),
            IQ3XXS => (QK_K, 98),
            IQ1S => (QK_K, 50),
            IQ4NL => (32, 18),
            IQ3S => (QK_K, 110),
            IQ2S => (QK_K, 82),
            IQ4XS => (QK_K, 136),
            IQ1M => (QK_K, 56),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            MXFP4 => (32, 17),
        }
    }

    /// Bytes taken by `n` elements (n must be a multiple of the block size).
    pub fn bytes_for(self, n: u64) -> Result<u64> {
        let (bs, bb) = self.block();
        ensure!(
            n % bs as u64 == 0,
            "{n} elements is not a whole number of {self:?} blocks ({bs})"
        );
        Ok(n / bs as u64 * bb as u64)
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost, contiguous dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    pub fn n_bytes(&self) -> u64 {
        self.ty.bytes_for(self.n_elements()).unwrap_or(0)
    }
    /// Dimensions outermost first (the PyTorch / row-major order).
    pub fn shape_row_major(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    map: memmap2::Mmap,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only; as with every mmap, the file must not be truncated
        // by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        Self::parse(path.to_path_buf(), map)
            .with_context(|| format!("reading GGUF file {}", path.display()))
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<Self> {
        let mut r = Reader { buf: &map, pos: 0 };
        let magic = r.u32()?;
        ensure!(
            magic == GGUF_MAGIC,
            "not a GGUF file (magic {magic:#010x}, expected \"GGUF\")"
        );
        let version = r.u32()?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            bail!("big-endian GGUF files are not supported");
        }
        ensure!(
            version == 2 || version == 3,
            "unsupported GGUF version {version} (2 and 3 are supported)"
        );
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each entry takes at least a few bytes: reject absurd counts before allocating.
        ensure!(
            n_tensors <= map.len() as u64 && n_kv <= map.len() as u64,
            "corrupt header: {n_tensors} tensors, {n_kv} metadata entries"
        );
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("metadata key #{i}"))?;
            let ty = r.u32()?;
            let v = r
                .value(ty, 0)
                .with_context(|| format!("metadata value of {key:?}"))?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, v));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("tensor #{i} name"))?;
            let nd = r.u32()?;
            ensure!(nd <= 8, "tensor {name:?}: {nd} dimensions");
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ty = GgmlType::from_id(r.u32()?).with_context(|| format!("tensor {name:?}"))?;
            let offset = r.u64()?;
            tensor_index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }
        let alignment = match index.get("general.alignment") {
            Some(&i) => metadata[i]
                .1
                .as_i64()
                .filter(|&a| a > 0)
                .context("general.alignment is not a positive integer")?
                as u64,
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let g = GgufFile {
            path,
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            map,
        };
        for t in &g.tensors {
            let nb = t
                .ty
                .bytes_for(t.n_elements())
                .with_context(|| format!("tensor {:?}", t.name))?;
            let end = g.data_offset + t.offset + nb;
            ensure!(
                end <= g.map.len() as u64,
                "tensor {:?} ends at byte {end}, past the end of the file ({} bytes): truncated file?",
                t.name,
                g.map.len()
            );
        }
        Ok(g)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_i64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }
    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self
            .get(key)
            .with_context(|| format!("metadata key {key:?} is missing"))?;
        let a = v
            .as_array()
            .with_context(|| format!("{key:?} is a {}, not an array", v.type_name()))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .with_context(|| format!("{key:?}[{i}] is a {}, not a string", x.type_name()))
            })
            .collect()
    }
    /// A required array of integers.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self
            .get(key)
            .with_context(|| format!("metadata key {key:?} is missing"))?;
        let a = v
            .as_array()
            .with_context(|| format!("{key:?} is a {}, not an array", v.type_name()))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64().with_context(|| {
                    format!("{key:?}[{i}] is a {}, not an integer", x.type_name())
                })
            })
            .collect()
    }
    /// A required array of floats (or integers).
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>> {
        let v = self
            .get(key)
            .with_context(|| format!("metadata key {key:?} is missing"))?;
        let a = v
            .as_array()
            .with_context(|| format!("{key:?} is a {}, not an array", v.type_name()))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .with_context(|| format!("{key:?}[{i}] is a {}, not a number", x.type_name()))
            })
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantised) bytes of a tensor, borrowed from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensor(name)
            .with_context(|| format!("no tensor {name:?} in {}", self.path.display()))?;
        let start = (self.data_offset + t.offset) as usize;
        Ok(&self.map[start..start + t.n_bytes() as usize])
    }

    /// Dequantise a whole tensor to f32 (ggml order: `dims[0]` contiguous).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .with_context(|| format!("no tensor {name:?} in {}", self.path.display()))?;
        let mut out = vec![0f32; t.n_elements() as usize];
        dequantize_into(t.ty, self.tensor_bytes(name)?, &mut out)
            .with_context(|| format!("tensor {name:?}"))?;
        Ok(out)
    }

    /// The whole file, mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .with_context(|| {
                format!(
                    "unexpected end of file at byte {} (wanted {n} more bytes): truncated file?",
                    self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        ensure!(
            n <= (self.buf.len() - self.pos) as u64,
            "string length {n} at byte {} runs past the end of the file",
            self.pos
        );
        let b = self.take(n as usize)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            // A few vocabularies hold tokens that are not valid UTF-8 on their own.
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                ensure!(depth < 4, "arrays nested too deeply");
                let ety = self.u32()?;
                let n = self.u64()?;
                ensure!(
                    n <= (self.buf.len() - self.pos) as u64,
                    "array length {n} at byte {} runs past the end of the file",
                    self.pos
                );
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            _ => bail!("unknown metadata value type {ty} at byte {}", self.pos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a minimal GGUF v3 file by hand.
    fn tiny_gguf() -> Vec<u8> {
        fn s(out: &mut Vec<u8>, x: &str) {
            out.extend((x.len() as u64).to_le_bytes());
            out.extend(x.as_bytes());
        }
        let mut b = Vec::new();
        b.extend(GGUF_MAGIC.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "b");
        s(&mut b, "x.n");
        b.extend(4u32.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        // tensor a: f32 [2,3]; tensor q: Q8_0 [32]
        s(&mut b, "a");
        b.extend(2u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        s(&mut b, "q");
        b.extend(1u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for i in 0..6 {
            b.extend((i as f32).to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(half::f16::from_f32(0.5).to_le_bytes());
        for i in 0..32i8 {
            b.push((i - 16) as u8);
        }
        b
    }

    #[test]
    fn parses_hand_written_file() {
        let dir = std::env::temp_dir().join(format!("mor-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.gguf");
        std::fs::write(&p, tiny_gguf()).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(g.get_i64("x.n"), Some(7));
        assert_eq!(g.tensor("a").unwrap().shape_row_major(), vec![3, 2]);
        assert_eq!(
            g.dequantize("a").unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let q = g.dequantize("q").unwrap();
        assert_eq!(q[0], -8.0);
        assert_eq!(q[31], 7.5);

        // Truncation is reported, not a panic.
        let mut short = tiny_gguf();
        short.truncate(short.len() - 10);
        std::fs::write(&p, short).unwrap();
        let e = format!("{:#}", GgufFile::open(&p).unwrap_err());
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&p, b"GGML0000").unwrap();
        assert!(GgufFile::open(&p).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
