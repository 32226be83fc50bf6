//! Tokenization throughput (MB of text per second), single-threaded and on all cores.
//!
//!   cargo run --release -p mor-data --example tokenize-bench -- [TOKENIZER] [TEXT FILES...]
//!
//! TOKENIZER is a tokenizer.json or a .gguf (default: the SmolLM2 GGUF that
//! scripts/fetch-test-assets.sh puts in .assets/). Text defaults to the builtin corpus
//! (Moby-Dick + State of the Union, about 12 MB; fetched and cached on first use).
use anyhow::Result;
use mor_data::Tokenizer;
use rayon::prelude::*;
use std::time::Instant;

/// CPU seconds used by this process so far (all threads).
fn cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain syscall writing into a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tok_path = args.first().cloned().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").to_string()
    });
    let tok = if tok_path.ends_with(".gguf") {
        Tokenizer::from_gguf(&mor_gguf::GgufFile::open(&tok_path)?)?
    } else {
        Tokenizer::from_file(&tok_path)?
    };
    let docs: Vec<String> = if args.len() > 1 {
        let files = mor_data::input::discover(&args[1..])?;
        let mut d = Vec::new();
        for f in &files {
            let mut r = mor_data::input::open(f, &Default::default())?;
            while let Some(p) = r.next_piece()? {
                d.push(p.text);
            }
        }
        d
    } else {
        let b = mor_data::builtin::ensure(&Default::default())?;
        let f = mor_data::input::discover(&[b.corpus.display().to_string()])?;
        let mut r = mor_data::input::open(&f[0], &Default::default())?;
        let mut d = Vec::new();
        while let Some(p) = r.next_piece()? {
            d.push(p.text);
        }
        d
    };
    // Cut long documents into ~64 KB pieces at line starts, as `prepare` does (256 KB there).
    let mut pieces = Vec::new();
    for d in &docs {
        let mut start = 0;
        while start < d.len() {
            let mut end = (start + 65536).min(d.len());
            while end < d.len() && !(d.as_bytes()[end - 1] == b'\n' && !d.as_bytes()[end].is_ascii_whitespace()) {
                end += 1;
            }
            pieces.push(&d[start..end]);
            start = end;
        }
    }
    let bytes: usize = pieces.iter().map(|p| p.len()).sum();
    let mb = bytes as f64 / 1e6;
    println!("tokenizer {tok_path} (vocab {}), text {:.1} MB in {} pieces, {} threads",
        tok.vocab_size(), mb, pieces.len(), rayon::current_num_threads());
    // Warm up the BPE cache as a long run would have it.
    let _ = pieces.iter().take(20).map(|p| tok.encode(p)).collect::<Vec<_>>();
    let (t, c) = (Instant::now(), cpu_secs());
    let n1: usize = pieces.iter().map(|p| tok.encode(p).unwrap().len()).sum();
    let s1 = t.elapsed().as_secs_f64();
    let c1 = cpu_secs() - c;
    let (t, c) = (Instant::now(), cpu_secs());
    let n2: usize = pieces.par_iter().map(|p| tok.encode(p).unwrap().len()).sum();
    let s2 = t.elapsed().as_secs_f64();
    let c2 = cpu_secs() - c;
    assert_eq!(n1, n2);
    // The HF pipeline on a sample, for comparison (the fast path must agree with it).
    let sample: Vec<&str> = pieces.iter().copied().take(pieces.len().min(40)).collect();
    let sb: usize = sample.iter().map(|p| p.len()).sum();
    let t = Instant::now();
    for p in &sample {
        assert_eq!(tok.encode_reference(p).unwrap(), tok.encode(p).unwrap());
    }
    let s3 = t.elapsed().as_secs_f64();
    println!("1 thread : {:7.2} MB/s wall, {:7.2} MB per CPU-second  ({:.2} M tokens/s, {:.2} bytes/token)",
        mb / s1, mb / c1, n1 as f64 / 1e6 / s1, bytes as f64 / n1 as f64);
    println!("{} threads: {:7.2} MB/s wall, {:7.2} MB per CPU-second  ({:.2} M tokens/s)",
        rayon::current_num_threads(), mb / s2, mb / c2, n2 as f64 / 1e6 / s2);
    let mut load = String::new();
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") { load = l.split_whitespace().take(3).collect::<Vec<_>>().join(" "); }
    println!("load average during the run: {load} (other processes share the cores)");
    println!("fast path: {}; HF pipeline + fast path on a {:.1} MB sample, 1 thread: {:.2} MB/s (ids identical)",
        tok.has_fast_path(), sb as f64 / 1e6, sb as f64 / 1e6 / s3);
    Ok(())
}
