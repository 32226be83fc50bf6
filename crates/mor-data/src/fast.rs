//! A fast encoder for the common byte-level BPE layout (GPT-2 pre-tokenizer, optionally with
//! digits split individually, as SmolLM and [`crate::Tokenizer::train_bpe`] have it).
//!
//! The HF pipeline keeps per-byte alignment data for every split and runs the GPT-2 regex in
//! fancy-regex's backtracking VM (for its `\s+(?!\S)` look-ahead): about 1 MB/s per core. This
//! path gives the same ids (tests compare the two) at a multiple of that:
//! * the pre-tokenizer is the GPT-2 pattern without the look-ahead, run by the `regex` crate's
//!   automata; the look-ahead's effect is restored by hand: a whitespace run of two or more
//!   characters followed by a non-space gives back its last character to the next token;
//! * words are looked up in a sharded cache of ids; misses run a heap-based BPE merge (same
//!   rank / leftmost tie-break as HF's `BPE::merge_word`).
//!
//! It is built only when the tokenizer's JSON matches the layout exactly (no normaliser, BPE
//! model without dropout / byte fallback / prefixes, ByteLevel pre-tokenizer with regex, no
//! non-special added tokens); otherwise encoding goes through HF.

use serde_json::Value;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

/// FxHash (rustc's): fast for short keys.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fx(u64);
impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64)
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
}
impl Fx {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}
type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// Character classes of the GPT-2 pattern: letter, number, whitespace, other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    L,
    N,
    W,
    O,
}

const ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::O; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphabetic() {
            Class::L
        } else if c.is_ascii_digit() {
            Class::N
        } else if matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
            Class::W
        } else {
            Class::O
        };
        i += 1;
    }
    t
};

/// Length of the contraction (`s t re ve m ll d`) at the start of `rest` (after the `'`).
#[inline]
fn contraction(rest: &[u8]) -> Option<usize> {
    match rest {
        [b's' | b't' | b'm' | b'd', ..] => Some(1),
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => Some(2),
        _ => None,
    }
}
const CACHE_SHARDS: usize = 16;
const NO_ID: u32 = u32::MAX;
const CLASS_TABLE_END: u32 = 0x3000;

/// A hasher for keys that are hashes already.
#[derive(Default, Clone, Copy)]
pub(crate) struct Identity(u64);
impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("Identity hashes u64 keys only")
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
}
const CACHE_MAX_WORD: usize = 64;
const CACHE_SHARD_CAP: usize = 1 << 15;

pub(crate) struct FastBpe {
    re_l: regex::Regex,
    re_n: regex::Regex,
    split_digits: bool,
    byte_ids: [u32; 256],
    merges: FxMap<(u32, u32), (u32, u32)>, // pair -> (rank, merged id)
    /// Word -> ids, keyed by the word's Fx hash (computed once; the word is compared on hit).
    cache: Vec<Mutex<HashMap<u64, (Box<str>, Box<[u32]>), BuildHasherDefault<Identity>>>>,
    /// Classes of the chars U+0080..U+3000 (the regexes are slow per char).
    class_table: Vec<Class>,
}

/// GPT-2's byte -> printable char table.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

fn is_bytelevel_with_regex(v: &Value) -> bool {
    v["type"] == "ByteLevel" && v["use_regex"] != false && v["add_prefix_space"] != true
}

impl FastBpe {
    /// Build from a `tokenizer.json` value, or None if its layout is not the supported one.
    pub(crate) fn from_json(v: &Value) -> Option<Self> {
        if !v["normalizer"].is_null() {
            return None;
        }
        let pre = &v["pre_tokenizer"];
        let split_digits = if is_bytelevel_with_regex(pre) {
            false
        } else if pre["type"] == "Sequence" {
            let p = pre["pretokenizers"].as_array()?;
            if p.len() == 2
                && p[0]["type"] == "Digits"
                && p[0]["individual_digits"] == true
                && is_bytelevel_with_regex(&p[1])
            {
                true
            } else {
                return None;
            }
        } else {
            return None;
        };
        // Added tokens matched in data mode are the non-special ones: none allowed here.
        if v["added_tokens"].as_array().is_some_and(|a| a.iter().any(|t| t["special"] != true)) {
            return None;
        }
        let m = &v["model"];
        if m["type"] != "BPE"
            || !(m["dropout"].is_null())
            || m["byte_fallback"] == true
            || !(m["continuing_subword_prefix"].is_null() || m["continuing_subword_prefix"] == "")
            || !(m["end_of_word_suffix"].is_null() || m["end_of_word_suffix"] == "")
            || m["ignore_merges"] == true
        {
            return None;
        }
        let vocab = m["vocab"].as_object()?;
        let id = |s: &str| vocab.get(s).and_then(|x| x.as_u64()).map(|x| x as u32);
        let chars = bytes_to_unicode();
        // Some vocabularies (SmolLM's) lack a few byte symbols; HF drops such bytes silently
        // (no unk token), and so do we: NO_ID marks them.
        let mut byte_ids = [NO_ID; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = id(&c.to_string()).unwrap_or(NO_ID);
        }
        let mut merges = FxMap::default();
        for (rank, mv) in m["merges"].as_array()?.iter().enumerate() {
            let (a, b) = match mv {
                Value::String(s) => {
                    let (a, b) = s.split_once(' ')?;
                    (a.to_string(), b.to_string())
                }
                Value::Array(p) if p.len() == 2 => (p[0].as_str()?.to_string(), p[1].as_str()?.to_string()),
                _ => return None,
            };
            let (ia, ib, inew) = (id(&a)?, id(&b)?, id(&format!("{a}{b}"))?);
            merges.entry((ia, ib)).or_insert((rank as u32, inew));
        }
        let mut f = FastBpe {
            re_l: regex::Regex::new(r"^\p{L}$").ok()?,
            re_n: regex::Regex::new(r"^\p{N}$").ok()?,
            split_digits,
            byte_ids,
            merges,
            cache: (0..CACHE_SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            class_table: Vec::new(),
        };
        f.class_table = (0x80u32..CLASS_TABLE_END)
            .map(|u| match char::from_u32(u) {
                Some(ch) => f.slow_class(ch),
                None => Class::O,
            })
            .collect();
        Some(f)
    }

    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if !self.split_digits {
            self.encode_segment(text, out);
            return;
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                if start < i {
                    self.encode_segment(&text[start..i], out);
                }
                let e = i + c.len_utf8();
                self.encode_word(&text[i..e], out);
                start = e;
            }
        }
        if start < text.len() {
            self.encode_segment(&text[start..], out);
        }
    }

    /// GPT-2's pre-tokenizer regex over `seg` (a whole string for its look-ahead), then BPE
    /// per piece. Hand-written (as llama.cpp does) from the pattern
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`;
    /// `tests/tokenizer.rs` checks it against the regex on random text.
    fn encode_segment(&self, seg: &str, out: &mut Vec<u32>) {
        let b = seg.as_bytes();
        let n = b.len();
        let mut pos = 0;
        while pos < n {
            let (c, cl) = self.class_at(seg, pos);
            let end = match c {
                Class::L | Class::N => self.run(seg, pos + cl, c),
                Class::O => {
                    if b[pos] == b'\'' {
                        if let Some(k) = contraction(&b[pos + 1..]) {
                            self.encode_word(&seg[pos..pos + 1 + k], out);
                            pos += 1 + k;
                            continue;
                        }
                    }
                    self.run(seg, pos + cl, Class::O)
                }
                Class::W => {
                    if b[pos] == b' ' && pos + 1 < n {
                        let (c2, cl2) = self.class_at(seg, pos + 1);
                        if c2 != Class::W {
                            // ` ?\p{L}+` and friends: the space joins the run after it.
                            let e = self.run(seg, pos + 1 + cl2, c2);
                            self.encode_word(&seg[pos..e], out);
                            pos = e;
                            continue;
                        }
                    }
                    let e = self.run(seg, pos + cl, Class::W);
                    if e < n && e - pos > cl {
                        // `\s+(?!\S)`: leave the last whitespace char for the next token.
                        let last = seg[..e].chars().next_back().unwrap().len_utf8();
                        e - last
                    } else {
                        e
                    }
                }
            };
            self.encode_word(&seg[pos..end], out);
            pos = end;
        }
    }

    /// End of the run of class `c` starting at `pos`.
    #[inline]
    fn run(&self, seg: &str, mut pos: usize, c: Class) -> usize {
        while pos < seg.len() {
            let (c2, l) = self.class_at(seg, pos);
            if c2 != c {
                break;
            }
            pos += l;
        }
        pos
    }

    /// Class and UTF-8 length of the char at byte `pos`.
    #[inline]
    fn class_at(&self, seg: &str, pos: usize) -> (Class, usize) {
        let b0 = seg.as_bytes()[pos];
        if b0 < 128 {
            return (ASCII_CLASS[b0 as usize], 1);
        }
        let ch = seg[pos..].chars().next().unwrap();
        let u = ch as u32;
        let c = if u < CLASS_TABLE_END {
            self.class_table[(u - 0x80) as usize]
        } else {
            self.slow_class(ch)
        };
        (c, ch.len_utf8())
    }

    fn slow_class(&self, ch: char) -> Class {
        let mut buf = [0u8; 4];
        let s = ch.encode_utf8(&mut buf);
        if ch.is_whitespace() {
            Class::W
        } else if self.re_l.is_match(s) {
            Class::L
        } else if self.re_n.is_match(s) {
            Class::N
        } else {
            Class::O
        }
    }

    fn encode_word(&self, w: &str, out: &mut Vec<u32>) {
        if w.len() <= CACHE_MAX_WORD {
            let mut h = Fx::default();
            h.write(w.as_bytes());
            let key = h.finish();
            let shard = &self.cache[(key >> 60) as usize % CACHE_SHARDS];
            if let Some((word, ids)) = shard.lock().unwrap().get(&key) {
                if &**word == w {
                    out.extend_from_slice(ids);
                    return;
                }
            }
            let n0 = out.len();
            self.bpe(w.as_bytes(), out);
            let mut c = shard.lock().unwrap();
            if c.len() >= CACHE_SHARD_CAP {
                c.clear();
            }
            c.insert(key, (w.into(), out[n0..].into()));
        } else {
            self.bpe(w.as_bytes(), out);
        }
    }

    /// Merge the bytes of one word: lowest rank first, leftmost among equals.
    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut id: Vec<u32> = bytes
            .iter()
            .map(|&b| self.byte_ids[b as usize])
            .filter(|&i| i != NO_ID)
            .collect();
        let n = id.len();
        if n <= 1 {
            out.extend_from_slice(&id);
            return;
        }
        let mut next: Vec<usize> = (1..=n).collect(); // n = none
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // usize::MAX = none
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize)>>, a: u32, b: u32, pos: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                heap.push(std::cmp::Reverse((rank, pos)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, id[i], id[i + 1], i);
        }
        while let Some(std::cmp::Reverse((rank, i))) = heap.pop() {
            if !alive[i] || next[i] >= n {
                continue;
            }
            let j = next[i];
            match self.merges.get(&(id[i], id[j])) {
                Some(&(r, new)) if r == rank => {
                    id[i] = new;
                    alive[j] = false;
                    next[i] = next[j];
                    if next[j] < n {
                        prev[next[j]] = i;
                    }
                    if prev[i] != usize::MAX {
                        push(&mut heap, id[prev[i]], id[i], prev[i]);
                    }
                    if next[i] < n {
                        push(&mut heap, id[i], id[next[i]], i);
                    }
                }
                _ => continue, // stale entry
            }
        }
        let mut i = 0;
        while i < n {
            out.push(id[i]);
            i = next[i];
        }
    }
}
