use mor_data::builtin::{ensure, BuiltinOptions};
use mor_data::{ShardSource, TokenSource, Tokenizer};
use std::time::Instant;

/// The offline fallback path (no npm): builds, caches, and the second call is instant.
#[test]
fn builtin_generated_corpus_builds_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = BuiltinOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        vocab_size: 512,
        use_npm: false,
        progress: false,
        ..Default::default()
    };
    let t = Instant::now();
    let b = ensure(&opts).unwrap();
    let first = t.elapsed();
    assert!(b.source.contains("generated"));
    assert_eq!(b.vocab_size, 512);
    assert!(b.train_tokens > 100_000 && b.val_tokens > 0, "{b:?}");
    let tok = Tokenizer::from_file(&b.tokenizer).unwrap();
    assert_eq!(tok.eot_id(), Some(0));
    let mut src = ShardSource::open(&b.shards, "train", &Default::default()).unwrap();
    assert_eq!(src.vocab_size(), 512);
    let batch = src.next_batch(2, 64).unwrap();
    let text = tok.decode(batch.row_inputs(0)).unwrap();
    assert!(text.chars().filter(|c| c.is_alphabetic()).count() > 100, "{text}");
    ShardSource::open(&b.shards, "val", &Default::default()).unwrap();
    let t = Instant::now();
    let again = ensure(&opts).unwrap();
    assert!(t.elapsed().as_millis() < 500, "cached call took {:?}", t.elapsed());
    assert_eq!(again.shards, b.shards);
    eprintln!("builtin (generated) first build {first:?}");
    // Nothing but the finished folder in the cache root.
    let names: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["builtin-v1-vocab512".to_string()]);
}
