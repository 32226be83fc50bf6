mod common;
use common::asset;
use mor_data::{Tokenizer, TrainOptions};

const MIXED: &[&str] = &[
    "Hello world! The quick brown fox jumps over 12345 lazy dogs.",
    "Ünïcödé: naïve café, façade — “quotes” and ‘single’ … ellipsis",
    "日本語のテキストと中文字符，한국어 텍스트",
    "Emoji 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, combining e\u{301} and zero\u{200b}width",
    "Ελληνικά, кириллица, עברית, العربية, हिन्दी, ไทย",
    "tabs\tand\nnewlines\r\n  spaces   \n\n\n trailing  ",
    "code: fn main() { println!(\"{}\", 1 + 2 * 3); } // <|endoftext|> inside text",
    "",
    " ",
    "\u{0}\u{1}\u{7f} control chars and 🙂",
];

#[test]
fn smollm_from_gguf_reproduces_known_ids() {
    let Some(p) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let g = mor_gguf::GgufFile::open(&p).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eot_id(), Some(0));
    let ids = tok
        .encode("Hello world! The quick brown fox jumps over 12345 lazy dogs.")
        .unwrap();
    assert_eq!(
        ids,
        vec![19556, 905, 17, 378, 2365, 6354, 16438, 27003, 690, 216, 33, 34, 35, 36, 37, 23790, 5046, 30]
    );
    for s in MIXED {
        let ids = tok.encode(s).unwrap();
        assert_eq!(&tok.decode(&ids).unwrap(), s, "round trip of {s:?}");
    }
    // Special-token strings in data are text; with encode_with_special they are the id.
    assert!(!tok.encode("a<|endoftext|>b").unwrap().contains(&0));
    assert_eq!(tok.encode_with_special("a<|endoftext|>b").unwrap()[1], 0);
    // Saved and reloaded: same ids, same hash.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tokenizer.json");
    tok.save(&f).unwrap();
    let again = Tokenizer::from_file(&f).unwrap();
    assert_eq!(again.hash(), tok.hash());
    assert_eq!(again.encode(MIXED[3]).unwrap(), tok.encode(MIXED[3]).unwrap());
}

/// Test vectors of llama.cpp (`tests/test-tokenizer-0`): `.inp` holds texts separated by
/// `\n__ggml_vocab_test__\n`, `.out` one line of ids per text.
fn llama_cpp_vectors(name: &str) -> Option<(Tokenizer, Vec<(String, Vec<u32>)>)> {
    let dir = asset("llama-vocab")?;
    let g = mor_gguf::GgufFile::open(dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts: Vec<String> = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(k) => {
                texts.push(rest[..k].to_string());
                rest = &rest[k + sep.len()..];
            }
            None => {
                texts.push(rest.to_string());
                break;
            }
        }
    }
    let outs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), outs.len(), "{name}: .inp/.out disagree");
    Some((tok, texts.into_iter().zip(outs).collect()))
}

fn check_vectors(name: &str) {
    let Some((tok, cases)) = llama_cpp_vectors(name) else { return };
    let mut bad = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text).unwrap();
        if &got != want {
            bad.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
    }
    assert!(bad.is_empty(), "{name}: {} of {} cases differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
    eprintln!("{name}: {} llama.cpp vectors match", cases.len());
}

#[test]
fn llama_cpp_vectors_gpt2() {
    check_vectors("gpt-2");
}

#[test]
fn trained_bpe_round_trips() {
    let mut docs: Vec<String> = mor_data::builtin::generated_corpus(200_000, 7);
    docs.extend(MIXED.iter().map(|s| s.to_string()));
    let tok = Tokenizer::train_bpe(
        docs.iter(),
        &TrainOptions { vocab_size: 600, ..Default::default() },
    )
    .unwrap();
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(tok.eot_id(), Some(0));
    for s in MIXED.iter().copied().chain(docs.iter().take(3).map(|s| s.as_str())) {
        let ids = tok.encode(s).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < 600));
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
    // Merges were learned: common text compresses well below one token per byte.
    let text = &docs[0];
    let n = tok.encode(text).unwrap().len();
    assert!((n as f64) < 0.5 * text.len() as f64, "{n} tokens for {} bytes", text.len());
    // Training is deterministic.
    let again = Tokenizer::train_bpe(docs.iter(), &TrainOptions { vocab_size: 600, ..Default::default() }).unwrap();
    assert_eq!(again.hash(), tok.hash());
}

/// The other byte-level BPE vocabularies of llama.cpp's test set (pre-tokenizers mapped in
/// `tokenizer::pre_tokenizer_json`).
#[test]
fn llama_cpp_vectors_other_bpe_vocabs() {
    for name in ["command-r", "falcon", "llama-bpe", "mpt", "qwen2", "qwen35", "refact", "starcoder"] {
        check_vectors(name);
    }
}

/// Random strings over a mix of scripts, digits, spaces of every kind and punctuation: the
/// cases where the fast pre-tokenizer's hand-made look-ahead could differ from the regex.
fn random_texts(n: usize, seed: u64) -> Vec<String> {
    let alphabet: Vec<char> = "\u{4}\u{1d}\u{40000}\u{e0001}aZ é日ß\t\n\r  \u{a0}\u{3000}\u{2009}7٣½Ⅷ'\"!?.,;:-_()[]{}<>/\\|@#$%^&*~`+=🙂🦙\u{301}\u{200b}sStTdDmMrevlL\u{85}\u{b}\u{1c}"
        .chars()
        .collect();
    let mut s = seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|_| {
            let len = (next() % 40) as usize;
            (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect()
        })
        .collect()
}

fn assert_fast_matches_reference(tok: &Tokenizer, extra: &[String]) {
    assert!(tok.has_fast_path());
    let mut texts: Vec<String> = MIXED.iter().map(|s| s.to_string()).collect();
    texts.extend(random_texts(3000, 12345));
    texts.extend(extra.iter().cloned());
    texts.push("x".repeat(5000) + &" ".repeat(300) + "y"); // long words: the uncached path
    for t in &texts {
        assert_eq!(tok.encode(t).unwrap(), tok.encode_reference(t).unwrap(), "text {t:?}");
    }
}

#[test]
fn fast_path_matches_hf_trained() {
    let docs = mor_data::builtin::generated_corpus(100_000, 5);
    let tok = Tokenizer::train_bpe(docs.iter(), &TrainOptions { vocab_size: 700, ..Default::default() }).unwrap();
    assert_fast_matches_reference(&tok, &docs[..5]);
}

#[test]
fn fast_path_matches_hf_smollm_and_gpt2() {
    if let Some(p) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") {
        let tok = Tokenizer::from_gguf(&mor_gguf::GgufFile::open(&p).unwrap()).unwrap();
        assert_fast_matches_reference(&tok, &[]);
    }
    if let Some(d) = asset("llama-vocab") {
        let tok = Tokenizer::from_gguf(&mor_gguf::GgufFile::open(d.join("ggml-vocab-gpt-2.gguf")).unwrap()).unwrap();
        assert_fast_matches_reference(&tok, &[]);
    }
}
