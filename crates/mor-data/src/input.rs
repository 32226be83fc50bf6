//! Finding input files and reading documents out of them.
//!
//! Formats, chosen by file name (a trailing `.gz` means gzip-compressed):
//! * plain text (`.txt`, `.text`, `.md`, `.rst`, or no extension): one document per file,
//!   per line or per blank-line-separated paragraph ([`TextDocs`]);
//! * JSON Lines (`.jsonl`, `.ndjson`): one object per line, the document in a string field
//!   (`text` by default);
//! * JSON (`.json`): an array of such objects, or one object;
//! * Parquet (`.parquet`): a string column (`text` by default), the FineWeb-Edu layout.
//!
//! Readers yield [`Piece`]s: a document, or a part of a long document (plain-text documents
//! are cut near [`PIECE_BYTES`] before a line that starts with a non-space character, a
//! place where the GPT-2 family of pre-tokenizers splits anyway, so cutting does not change
//! the tokens; memory stays bounded and long files tokenize in parallel). Every error names the
//! file and the line or row.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Plain-text documents longer than this are read in pieces of about this size.
pub const PIECE_BYTES: usize = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Jsonl,
    Json,
    Parquet,
}

/// How a plain-text file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TextDocs {
    /// The whole file is one document.
    #[default]
    File,
    /// Each non-empty line is a document.
    Line,
    /// Documents are separated by one or more blank lines.
    Paragraph,
}

impl std::str::FromStr for TextDocs {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "file" => TextDocs::File,
            "line" => TextDocs::Line,
            "paragraph" => TextDocs::Paragraph,
            _ => bail!("unknown text document mode {s:?} (file, line, paragraph)"),
        })
    }
}

/// One input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
    pub gzip: bool,
    /// Size on disk, bytes.
    pub size: u64,
}

/// The format of `path` from its name, or None for files to ignore.
pub fn format_of(path: &Path) -> Option<(Format, bool)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.starts_with('.') {
        return None;
    }
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_string(), true),
        None => (name.clone(), false),
    };
    let ext = Path::new(&stem)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    let f = match ext {
        "txt" | "text" | "md" | "rst" | "" => Format::Text,
        "jsonl" | "ndjson" => Format::Jsonl,
        "json" => Format::Json,
        "parquet" if !gz => Format::Parquet,
        _ => return None,
    };
    Some((f, gz))
}

/// Expand files, folders (recursively, files of known formats only) and glob patterns into a
/// sorted, de-duplicated list. An explicit file of unknown extension is read as plain text.
pub fn discover(inputs: &[impl AsRef<str>]) -> Result<Vec<InputFile>> {
    let mut paths: Vec<(PathBuf, bool)> = Vec::new(); // (path, explicit)
    for inp in inputs {
        let inp = inp.as_ref();
        let p = Path::new(inp);
        if p.is_dir() {
            let mut stack = vec![p.to_path_buf()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
                    let e = e?;
                    let path = e.path();
                    let ft = e.file_type()?;
                    if ft.is_dir() {
                        if !path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                            stack.push(path);
                        }
                    } else if format_of(&path).is_some() {
                        paths.push((path, false));
                    }
                }
            }
        } else if p.exists() {
            paths.push((p.to_path_buf(), true));
        } else if inp.contains(['*', '?', '[']) {
            let mut n = 0;
            for g in glob::glob(inp).with_context(|| format!("bad glob pattern {inp:?}"))? {
                let g = g?;
                if g.is_file() {
                    paths.push((g, true));
                    n += 1;
                }
            }
            if n == 0 {
                bail!("no files match {inp:?}");
            }
        } else {
            bail!("input {inp:?} does not exist");
        }
    }
    paths.sort();
    paths.dedup_by(|a, b| a.0 == b.0);
    let mut out = Vec::with_capacity(paths.len());
    for (path, _explicit) in paths {
        let (format, gzip) = format_of(&path).unwrap_or((Format::Text, false));
        let size = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        out.push(InputFile {
            path,
            format,
            gzip,
            size,
        });
    }
    if out.is_empty() {
        bail!("no input files found in {:?}", inputs.iter().map(|s| s.as_ref()).collect::<Vec<_>>());
    }
    Ok(out)
}

/// A document or a part of one.
#[derive(Clone, Debug)]
pub struct Piece {
    pub text: String,
    /// This piece starts a new document.
    pub doc_start: bool,
    /// This piece ends its document (the end-of-text token follows it).
    pub doc_end: bool,
}

/// Options of the readers.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// JSON / Parquet field holding the text.
    pub text_field: String,
    pub text_docs: TextDocs,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            text_field: "text".into(),
            text_docs: TextDocs::File,
        }
    }
}

/// Yields the pieces of one file.
pub trait PieceReader: Send {
    fn next_piece(&mut self) -> Result<Option<Piece>>;
    /// Fraction of the file consumed so far, 0..=1 (for progress bars).
    fn progress(&self) -> f64;
}

/// Open a reader for `f`.
pub fn open(f: &InputFile, opts: &ReadOptions) -> Result<Box<dyn PieceReader>> {
    let name = f.path.display().to_string();
    match f.format {
        Format::Parquet => Ok(Box::new(ParquetReader::open(f, opts)?)),
        Format::Json => {
            let raw = read_all(f)?;
            let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
                anyhow::anyhow!("{name}:{}:{}: invalid JSON: {e}", e.line(), e.column())
            })?;
            let items = match v {
                serde_json::Value::Array(a) => a,
                o @ serde_json::Value::Object(_) => vec![o],
                _ => bail!("{name}: expected a JSON array or object"),
            };
            let mut docs = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                docs.push(field_text(it, &opts.text_field).with_context(|| {
                    format!("{name}: item {i}")
                })?);
            }
            Ok(Box::new(VecReader { docs: docs.into_iter(), n: items.len(), i: 0 }))
        }
        Format::Jsonl => Ok(Box::new(JsonlReader {
            lines: LineSource::open(f)?,
            name,
            field: opts.text_field.clone(),
        })),
        Format::Text => Ok(Box::new(TextReader {
            lines: LineSource::open(f)?,
            mode: opts.text_docs,
            in_doc: false,
            done: false,
            pending: None,
        })),
    }
}

fn read_all(f: &InputFile) -> Result<Vec<u8>> {
    let mut r = raw_reader(f)?;
    let mut v = Vec::new();
    r.read_to_end(&mut v)
        .with_context(|| format!("reading {}", f.path.display()))?;
    Ok(v)
}

fn raw_reader(f: &InputFile) -> Result<Box<dyn Read + Send>> {
    let file = std::fs::File::open(&f.path).with_context(|| format!("opening {}", f.path.display()))?;
    Ok(if f.gzip {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)))
    } else {
        Box::new(file)
    })
}

fn field_text(v: &serde_json::Value, field: &str) -> Result<Option<String>> {
    let obj = v.as_object().context("not a JSON object")?;
    match obj.get(field) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Null) => Ok(None),
        Some(other) => bail!("field {field:?} is not a string but {}", json_kind(other)),
        None => bail!(
            "no field {field:?} (fields: {})",
            obj.keys().take(10).cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

struct VecReader {
    docs: std::vec::IntoIter<Option<String>>,
    n: usize,
    i: usize,
}

impl PieceReader for VecReader {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        for d in self.docs.by_ref() {
            self.i += 1;
            if let Some(text) = d {
                return Ok(Some(Piece { text, doc_start: true, doc_end: true }));
            }
        }
        Ok(None)
    }
    fn progress(&self) -> f64 {
        if self.n == 0 { 1.0 } else { self.i as f64 / self.n as f64 }
    }
}

/// Lines of a file with their numbers; bytes must be UTF-8.
struct LineSource {
    r: Box<dyn BufRead + Send>,
    name: String,
    line_no: u64,
    bytes: u64,
    size: u64,
    gzip: bool,
    buf: Vec<u8>,
}

impl LineSource {
    fn open(f: &InputFile) -> Result<Self> {
        Ok(LineSource {
            r: Box::new(BufReader::with_capacity(1 << 16, raw_reader(f)?)),
            name: f.path.display().to_string(),
            line_no: 0,
            bytes: 0,
            size: f.size.max(1),
            gzip: f.gzip,
            buf: Vec::new(),
        })
    }
    /// The next line including its `\n`, or None at the end.
    fn next_line(&mut self) -> Result<Option<&str>> {
        self.buf.clear();
        let n = self
            .r
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("{}:{}: read error", self.name, self.line_no + 1))?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        self.bytes += n as u64;
        match std::str::from_utf8(&self.buf) {
            Ok(s) => Ok(Some(s)),
            Err(e) => bail!(
                "{}:{}: invalid UTF-8 at byte {} of the line",
                self.name,
                self.line_no,
                e.valid_up_to()
            ),
        }
    }
    fn progress(&self) -> f64 {
        if self.gzip {
            // Compressed size is unknown in uncompressed terms; a rough 3x ratio.
            (self.bytes as f64 / (3.0 * self.size as f64)).min(0.99)
        } else {
            (self.bytes as f64 / self.size as f64).min(1.0)
        }
    }
}

struct JsonlReader {
    lines: LineSource,
    name: String,
    field: String,
}

impl PieceReader for JsonlReader {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            let field = &self.field;
            let name = &self.name;
            let n = self.lines.line_no + 1;
            let Some(line) = self.lines.next_line()? else {
                return Ok(None);
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{name}:{n}: invalid JSON (column {}): {e}", e.column()))?;
            match field_text(&v, field).with_context(|| format!("{name}:{n}"))? {
                Some(text) => return Ok(Some(Piece { text, doc_start: true, doc_end: true })),
                None => continue,
            }
        }
    }
    fn progress(&self) -> f64 {
        self.lines.progress()
    }
}

struct TextReader {
    lines: LineSource,
    mode: TextDocs,
    /// A document has been started and not ended.
    in_doc: bool,
    done: bool,
    /// Text read ahead but not yet returned.
    pending: Option<String>,
}

impl PieceReader for TextReader {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        if self.done {
            return Ok(None);
        }
        let mut text = self.pending.take().unwrap_or_default();
        loop {
            let line = match self.lines.next_line()? {
                Some(l) => l,
                None => {
                    self.done = true;
                    if text.trim().is_empty() && !self.in_doc {
                        return Ok(None);
                    }
                    let start = !self.in_doc;
                    self.in_doc = false;
                    if self.mode != TextDocs::File {
                        trim_end_newlines(&mut text);
                    }
                    return Ok(Some(Piece { text, doc_start: start, doc_end: true }));
                }
            };
            if self.mode != TextDocs::Line
                && text.len() >= PIECE_BYTES
                && line.starts_with(|c: char| !c.is_whitespace())
            {
                // Cut a long document before this line; it goes on in the next piece.
                self.pending = Some(line.to_string());
                let start = !self.in_doc;
                self.in_doc = true;
                return Ok(Some(Piece { text, doc_start: start, doc_end: false }));
            }
            match self.mode {
                TextDocs::Line => {
                    let t = line.trim_end_matches(['\n', '\r']);
                    if t.trim().is_empty() {
                        continue;
                    }
                    return Ok(Some(Piece { text: t.to_string(), doc_start: true, doc_end: true }));
                }
                TextDocs::Paragraph => {
                    if line.trim().is_empty() {
                        if text.trim().is_empty() && !self.in_doc {
                            text.clear();
                            continue;
                        }
                        let start = !self.in_doc;
                        self.in_doc = false;
                        trim_end_newlines(&mut text);
                        return Ok(Some(Piece { text, doc_start: start, doc_end: true }));
                    }
                    text.push_str(line);
                }
                TextDocs::File => text.push_str(line),
            }
        }
    }
    fn progress(&self) -> f64 {
        self.lines.progress()
    }
}

fn trim_end_newlines(s: &mut String) {
    while s.ends_with(['\n', '\r']) {
        s.pop();
    }
}

/// Reads one string column of a Parquet file, record batch by record batch.
struct ParquetReader {
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    name: String,
    field: String,
    rows_total: u64,
    /// Rows of the file before the current batch.
    row0: u64,
    batch: Vec<Option<String>>,
    next: usize,
}

impl ParquetReader {
    fn open(f: &InputFile, opts: &ReadOptions) -> Result<Self> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use parquet::arrow::ProjectionMask;
        let name = f.path.display().to_string();
        let file = std::fs::File::open(&f.path).with_context(|| format!("opening {name}"))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{name}: not a readable Parquet file"))?;
        let schema = b.parquet_schema();
        let idx = (0..schema.num_columns())
            .find(|&i| schema.column(i).path().string() == opts.text_field)
            .with_context(|| {
                let cols: Vec<String> = (0..schema.num_columns())
                    .map(|i| schema.column(i).path().string())
                    .collect();
                format!("{name}: no column {:?} (columns: {})", opts.text_field, cols.join(", "))
            })?;
        let rows_total = b.metadata().file_metadata().num_rows().max(0) as u64;
        let mask = ProjectionMask::leaves(schema, [idx]);
        let reader = b
            .with_projection(mask)
            .with_batch_size(1024)
            .build()
            .with_context(|| format!("{name}: cannot read column {:?}", opts.text_field))?;
        Ok(ParquetReader {
            reader,
            name,
            field: opts.text_field.clone(),
            rows_total,
            row0: 0,
            batch: Vec::new(),
            next: 0,
        })
    }

    fn load_batch(&mut self) -> Result<bool> {
        use arrow_array::{cast::AsArray, Array};
        self.row0 += self.batch.len() as u64;
        self.batch.clear();
        self.next = 0;
        let Some(rb) = self.reader.next() else {
            return Ok(false);
        };
        let rb = rb.map_err(|e| {
            anyhow::anyhow!(
                "{}: corrupt data in rows {}..{}: {e}",
                self.name,
                self.row0,
                (self.row0 + 1024).min(self.rows_total)
            )
        })?;
        let col = rb.column(0);
        let b = &mut self.batch;
        if let Some(a) = col.as_string_opt::<i32>() {
            b.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_owned())));
        } else if let Some(a) = col.as_string_opt::<i64>() {
            b.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_owned())));
        } else if let Some(a) = col.as_string_view_opt() {
            b.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_owned())));
        } else {
            bail!(
                "{}: column {:?} has type {}, expected a string column",
                self.name,
                self.field,
                col.data_type()
            );
        }
        Ok(true)
    }
}

impl PieceReader for ParquetReader {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            while self.next < self.batch.len() {
                let i = self.next;
                self.next += 1;
                if let Some(text) = self.batch[i].take() {
                    return Ok(Some(Piece { text, doc_start: true, doc_end: true }));
                }
            }
            if !self.load_batch()? {
                return Ok(None);
            }
        }
    }
    fn progress(&self) -> f64 {
        if self.rows_total == 0 {
            1.0
        } else {
            ((self.row0 + self.next as u64) as f64 / self.rows_total as f64).min(1.0)
        }
    }
}

/// All pieces of `files` in order, as one iterator that stops at the first error and leaves it
/// in `error` (for consumers such as the BPE trainer that take plain iterators).
pub struct PieceIter<'a> {
    files: &'a [InputFile],
    opts: ReadOptions,
    next_file: usize,
    cur: Option<Box<dyn PieceReader>>,
    /// Stop after this many bytes of text.
    pub max_bytes: Option<u64>,
    pub bytes: u64,
    pub error: Option<anyhow::Error>,
}

impl<'a> PieceIter<'a> {
    pub fn new(files: &'a [InputFile], opts: ReadOptions) -> Self {
        PieceIter { files, opts, next_file: 0, cur: None, max_bytes: None, bytes: 0, error: None }
    }
}

impl Iterator for PieceIter<'_> {
    type Item = Piece;
    fn next(&mut self) -> Option<Piece> {
        if self.error.is_some() || self.max_bytes.is_some_and(|m| self.bytes >= m) {
            return None;
        }
        loop {
            if self.cur.is_none() {
                let f = self.files.get(self.next_file)?;
                self.next_file += 1;
                match open(f, &self.opts) {
                    Ok(r) => self.cur = Some(r),
                    Err(e) => {
                        self.error = Some(e);
                        return None;
                    }
                }
            }
            match self.cur.as_mut().unwrap().next_piece() {
                Ok(Some(p)) => {
                    self.bytes += p.text.len() as u64;
                    return Some(p);
                }
                Ok(None) => self.cur = None,
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            }
        }
    }
}
