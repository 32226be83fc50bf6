//! Harness logic on hand-made documents: metrics, WinoGrande partial scoring, LAMBADA greedy
//! match, few-shot sampling, tokenisation rules, JSONL tasks, batching invariance, NLL.

use anyhow::Result;
use mor_config::ModelConfig;
use mor_engine::Cpu;
use mor_eval::harness::{run_task, PaperTable, RunOptions, TaskReport};
use mor_eval::nll::{validation_nll, NllOptions};
use mor_eval::scorer::{encode_pair, greedy_match, LlResult, ModelScorer, Scorer, TextEncoder, TokenRequest};
use mor_eval::task::{sample_fewshot, score_doc, Doc, Fewshot, Group, Metric, Task};
use mor_eval::tasks::{expand_task_list, hellaswag_preprocess, jsonl_doc, py_capitalize, winogrande_doc};
use mor_model::{Model, Routing};
use std::collections::HashMap;

/// One token per byte (id = byte + 1; 0 is the prefix token).
struct Bytes;
impl TextEncoder for Bytes {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(|b| b as u32 + 1).collect())
    }
    fn prefix_token(&self) -> u32 {
        0
    }
}

fn decode(ids: &[u32]) -> String {
    String::from_utf8(ids.iter().map(|&i| (i - 1) as u8).collect()).unwrap()
}

/// Scores requests from a table keyed by (context, continuation) text; records what it saw.
#[derive(Default)]
struct Table {
    lls: HashMap<(String, String), (f64, bool)>,
    seen: Vec<(String, String)>,
}
impl Table {
    fn set(&mut self, ctx: &str, cont: &str, ll: f64, greedy: bool) {
        self.lls.insert((ctx.into(), cont.into()), (ll, greedy));
    }
}
impl Scorer for Table {
    fn score(&mut self, reqs: &[TokenRequest]) -> Result<Vec<LlResult>> {
        Ok(reqs
            .iter()
            .map(|r| {
                let key = (decode(&r.context), decode(&r.continuation));
                self.seen.push(key.clone());
                let (ll, g) = *self.lls.get(&key).unwrap_or_else(|| panic!("unexpected request {key:?}"));
                LlResult { ll, is_greedy: g }
            })
            .collect())
    }
}

fn choice(query: &str, choices: &[&str], gold: usize) -> Doc {
    Doc::Choice { query: query.into(), choices: choices.iter().map(|s| s.to_string()).collect(), gold, delimiter: " ".into() }
}

#[test]
fn acc_and_acc_norm_differ_where_length_matters() {
    // Short wrong choice wins on raw log-likelihood, the long gold choice per character.
    let doc = choice("Q:", &["no", "a much longer answer"], 1);
    let r = [LlResult { ll: -3.0, is_greedy: false }, LlResult { ll: -8.0, is_greedy: false }];
    let s = score_doc(&doc, &r);
    assert_eq!((s.pred, s.pred_norm), (Some(0), Some(1)));
    assert_eq!((s.acc, s.acc_norm), (0.0, Some(1.0)));
    // Equal lengths: both metrics agree.
    let doc = choice("Q:", &["abc", "xyz"], 0);
    let s = score_doc(&doc, &[LlResult { ll: -1.0, is_greedy: true }, LlResult { ll: -2.0, is_greedy: false }]);
    assert_eq!((s.acc, s.acc_norm), (1.0, Some(1.0)));
    // Ties go to the first index (numpy argmax).
    let s = score_doc(&doc, &[LlResult { ll: -1.0, is_greedy: false }, LlResult { ll: -1.0, is_greedy: false }]);
    assert_eq!(s.pred, Some(0));
    // Characters (the harness' len()) vs UTF-8 bytes: "éé" is 2 chars, 4 bytes.
    let doc = choice("Q:", &["éé", "abc"], 0);
    let s = score_doc(&doc, &[LlResult { ll: -2.1, is_greedy: false }, LlResult { ll: -3.0, is_greedy: false }]);
    // per char: -1.05 vs -1.0 -> 1 ; per byte: -0.525 vs -1.0 -> 0
    assert_eq!((s.acc_norm, s.acc_norm_bytes), (Some(0.0), Some(1.0)));
}

#[test]
fn multiple_choice_requests_and_task_aggregation() {
    let docs = vec![choice("Question: 2+2?\nAnswer:", &["4", "five"], 0), choice("Question: sky?\nAnswer:", &["blue", "green"], 0)];
    let task = Task::single("mc", docs, Metric::AccNorm, "test".into());
    let mut t = Table::default();
    t.set("Question: 2+2?\nAnswer:", " 4", -1.0, true);
    t.set("Question: 2+2?\nAnswer:", " five", -2.0, false);
    t.set("Question: sky?\nAnswer:", " blue", -9.0, false);
    t.set("Question: sky?\nAnswer:", " green", -5.0, false);
    let r = run_task(&task, &Bytes, &mut t, &RunOptions::default()).unwrap();
    assert_eq!((r.docs, r.requests), (2, 4));
    assert_eq!(r.acc, 0.5);
    // per char: -9/4 = -2.25 vs -5/5 = -1.0 -> green (wrong); doc 1: -1/1 vs -2/4 -> five (wrong)
    assert_eq!(r.acc_norm, Some(0.0));
    assert_eq!(r.value, 0.0);
}

#[test]
fn winogrande_partial_scoring_scores_only_the_shared_continuation() {
    let doc = winogrande_doc("Sarah was a much better surgeon than Maria so _ always got the easier cases.", "Sarah", "Maria", "2").unwrap();
    let Doc::Partial { contexts, continuation, gold, .. } = &doc else { panic!() };
    assert_eq!(contexts, &["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]);
    assert_eq!(continuation, "always got the easier cases.");
    assert_eq!(*gold, 1);
    let reqs = doc.requests("");
    assert_eq!(reqs[0], (contexts[0].clone(), " always got the easier cases.".to_string()));
    assert_eq!(reqs[1].1, reqs[0].1, "same continuation for both options");
    // Tokenised: the option is context, only the continuation ids are scored.
    let q = encode_pair(&Bytes, &reqs[1].0, &reqs[1].1).unwrap();
    assert_eq!(decode(&q.context), contexts[1]);
    assert_eq!(decode(&q.continuation), " always got the easier cases.");
    let task = Task::single("wg", vec![doc.clone()], Metric::Acc, "t".into());
    let mut t = Table::default();
    t.set(&contexts[0], " always got the easier cases.", -12.0, false);
    t.set(&contexts[1], " always got the easier cases.", -10.0, false);
    let r = run_task(&task, &Bytes, &mut t, &RunOptions::default()).unwrap();
    assert_eq!(r.acc, 1.0);
    assert!(winogrande_doc("no blank here", "a", "b", "1").is_err());
    assert!(winogrande_doc("a _ b", "a", "b", "3").is_err());
}

#[test]
fn lambada_accuracy_is_a_greedy_match_of_the_whole_target() {
    let vocab = 4;
    // Two target positions; row argmaxes are 2 and 1.
    let logits = [0.1, 0.2, 0.9, 0.0, 0.0, 0.5, 0.4, 0.3];
    assert!(greedy_match(&logits, vocab, &[2, 1]));
    assert!(!greedy_match(&logits, vocab, &[2, 2]), "second token not the argmax");
    assert!(!greedy_match(&logits, vocab, &[0, 1]), "first token not the argmax");
    // A tie counts for the first maximal id only.
    assert!(greedy_match(&[0.5, 0.5, 0.0, 0.0], vocab, &[0]));
    assert!(!greedy_match(&[0.5, 0.5, 0.0, 0.0], vocab, &[1]));
    // Document level: acc is the greedy flag, the ll only feeds perplexity.
    let docs = vec![
        Doc::Greedy { context: "the cat sat on the".into(), continuation: " mat".into() },
        Doc::Greedy { context: "one two".into(), continuation: " three".into() },
    ];
    let task = Task::single("lambada", docs, Metric::Acc, "t".into());
    let mut t = Table::default();
    t.set("the cat sat on the", " mat", -0.5, true);
    t.set("one two", " three", -0.1, false);
    let r = run_task(&task, &Bytes, &mut t, &RunOptions::default()).unwrap();
    assert_eq!(r.acc, 0.5);
    assert!((r.perplexity.unwrap() - (0.3f64).exp()).abs() < 1e-12);
    assert_eq!(r.acc_norm, None);
}

#[test]
fn encode_pair_moves_trailing_space_and_handles_empty_context() {
    let q = encode_pair(&Bytes, "Answer: ", "yes").unwrap();
    assert_eq!((decode(&q.context), decode(&q.continuation)), ("Answer:".into(), " yes".into()));
    let q = encode_pair(&Bytes, "", "hello").unwrap();
    assert_eq!(q.context, vec![0]);
    assert_eq!(decode(&q.continuation), "hello");
}

fn group_task(n: usize) -> Task {
    let docs: Vec<Doc> = (0..n).map(|i| choice(&format!("q{i}"), &["a", "b"], i % 2)).collect();
    Task::single("t", docs, Metric::Acc, "t".into())
}

#[test]
fn fewshot_sampling_is_deterministic_and_never_the_document_itself() {
    let task = group_task(30);
    for doc in 0..30 {
        let a = task.fewshot_examples(doc, 5, 1234);
        assert_eq!(a, task.fewshot_examples(doc, 5, 1234), "same seed, same examples");
        assert_eq!(a.len(), 5);
        assert!(!a.contains(&task.docs[doc]), "doc {doc} is its own example");
        let mut uniq = a.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), 5);
    }
    let differs = (0..30).any(|d| task.fewshot_examples(d, 5, 1) != task.fewshot_examples(d, 5, 2));
    assert!(differs, "the seed matters");
    // Independent of which other documents are evaluated (per-document stream).
    assert_eq!(sample_fewshot(30, 3, Some(4), 7, 4), sample_fewshot(30, 3, Some(4), 7, 4));
    // Pool smaller than k: everything but the document.
    let small = group_task(3);
    assert_eq!(small.fewshot_examples(1, 5, 0).len(), 2);
    // Context format: examples rendered as solved, "\n\n" after each.
    let prefix = task.context_prefix(0, 2, 9);
    let ex = task.fewshot_examples(0, 2, 9);
    assert_eq!(prefix, format!("{}\n\n{}\n\n", ex[0].render_example(), ex[1].render_example()));
    assert!(ex[0].render_example().starts_with('q') && (ex[0].render_example().ends_with(" a") || ex[0].render_example().ends_with(" b")));
    assert_eq!(task.context_prefix(0, 0, 9), "");
}

#[test]
fn first_n_fewshot_and_round_robin_limit_for_grouped_tasks() {
    let mut docs = Vec::new();
    let mut group_of = Vec::new();
    for g in 0..3 {
        for i in 0..4 {
            docs.push(choice(&format!("g{g} q{i}"), &["x", "y"], 0));
            group_of.push(g);
        }
    }
    let groups = (0..3)
        .map(|g| Group {
            name: format!("g{g}"),
            description: format!("About g{g}.\n\n"),
            fewshot: Fewshot::FirstN(vec![choice(&format!("dev{g}a"), &["x", "y"], 1), choice(&format!("dev{g}b"), &["x", "y"], 0)]),
        })
        .collect();
    let task = Task { name: "m".into(), docs, group_of, groups, primary: Metric::Acc, source: "t".into() };
    assert_eq!(task.selection(Some(5)), vec![0, 1, 4, 5, 8]);
    assert_eq!(task.selection(None).len(), 12);
    assert_eq!(task.context_prefix(5, 1, 0), "About g1.\n\ndev1a y\n\n");
    assert_eq!(task.context_prefix(5, 2, 99), "About g1.\n\ndev1a y\n\ndev1b x\n\n");
    assert_eq!(task.context_prefix(5, 0, 0), "About g1.\n\n");
}

#[test]
fn hellaswag_preprocessing_and_python_capitalize() {
    assert_eq!(py_capitalize("he is HERE"), "He is here");
    assert_eq!(py_capitalize(""), "");
    assert_eq!(hellaswag_preprocess("  Clean [title] the tub. [step] Scrub it.  "), "Clean. the tub. Scrub it.");
    assert_eq!(hellaswag_preprocess("a [x] b  c"), "a b c");
    assert_eq!(hellaswag_preprocess("open [ no close"), "open [ no close");
    assert_eq!(hellaswag_preprocess("a [b\nc] d"), "a [b\nc] d", "[...] does not span lines");
}

#[test]
fn jsonl_schema_variants_and_errors() {
    let d = jsonl_doc(&serde_json::json!({"context": "Q?", "choices": ["a", "b"], "gold": 1})).unwrap();
    assert_eq!(d, choice("Q?", &["a", "b"], 1));
    let d = jsonl_doc(&serde_json::json!({"context": "x", "continuation": " y"})).unwrap();
    assert_eq!(d, Doc::Greedy { context: "x".into(), continuation: " y".into() });
    let d = jsonl_doc(&serde_json::json!({"contexts": ["A did", "B did"], "continuation": "it.", "gold": 0})).unwrap();
    assert!(matches!(d, Doc::Partial { .. }));
    let d = jsonl_doc(&serde_json::json!({"context": "Q", "choices": ["a", "b"], "gold": "0", "delimiter": ""})).unwrap();
    assert_eq!(d.requests("")[0].1, "a");
    assert!(jsonl_doc(&serde_json::json!({"context": "Q", "choices": ["a", "b"], "gold": 2})).is_err());
    assert!(jsonl_doc(&serde_json::json!({"context": "Q"})).is_err());

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("my_task.jsonl");
    std::fs::write(&p, "{\"context\": \"Q\", \"choices\": [\"a\", \"b\"], \"gold\": 0, \"metric\": \"acc\", \"description\": \"D. \"}\n\n{\"context\": \"R\", \"choices\": [\"c\", \"d\"], \"gold\": 1}\n").unwrap();
    let t = mor_eval::tasks::load_task(p.to_str().unwrap(), dir.path()).unwrap();
    assert_eq!((t.name.as_str(), t.docs.len(), t.primary), ("my_task", 2, Metric::Acc));
    assert_eq!(t.context_prefix(1, 0, 0), "D. ");
    std::fs::write(&p, "{\"context\": \"Q\", \"choices\": [\"a\"], \"gold\": 0}\n").unwrap();
    let e = format!("{:#}", mor_eval::tasks::load_task(p.to_str().unwrap(), dir.path()).unwrap_err());
    assert!(e.contains("line 1") && e.contains("at least 2"), "{e}");
    let e = format!("{:#}", mor_eval::tasks::load_task("hellaswag", dir.path()).unwrap_err());
    assert!(e.contains("fetch-eval-data.sh"), "{e}");
    assert_eq!(expand_task_list("paper"), mor_eval::tasks::PAPER_TASKS);
    assert_eq!(expand_task_list("arc,piqa,arc_easy"), vec!["arc_easy", "arc_challenge", "piqa"]);
}

#[test]
fn paper_table_columns() {
    let rep = |task: &str, value: f64| TaskReport {
        task: task.into(),
        docs: 1,
        requests: 1,
        shots: 0,
        acc: value,
        acc_stderr: 0.0,
        acc_norm: None,
        acc_norm_stderr: None,
        acc_norm_bytes: None,
        perplexity: None,
        metric: Metric::Acc,
        value,
        seconds: 0.0,
        source: String::new(),
        per_doc: None,
    };
    let mut reps = vec![rep("lambada", 0.4), rep("hellaswag", 0.5), rep("piqa", 0.6), rep("winogrande", 0.5), rep("arc_easy", 0.6)];
    let t = PaperTable::from_reports(&reps);
    assert_eq!((t.arc, t.avg), (None, None), "ARC needs both halves");
    reps.push(rep("arc_challenge", 0.3));
    reps.push(rep("mmlu", 0.25));
    let t = PaperTable::from_reports(&reps);
    assert!((t.arc.unwrap() - 0.45).abs() < 1e-12);
    assert!((t.avg.unwrap() - (0.4 + 0.5 + 0.6 + 0.5 + 0.45 + 0.25) / 6.0).abs() < 1e-12);
    let text = t.render();
    assert!(text.contains("LD") && text.contains("MMLU") && text.contains("45.0"), "{text}");
}

// ------------------------------------------------------------------ model scorer and NLL

fn tiny(router: Option<&str>) -> ModelConfig {
    let mut c: ModelConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 16, "num_layers": 5, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 4, "intermediate_size": 24, "max_seq_len": 64, "init_std": 0.3
    }))
    .unwrap();
    if let Some(kind) = router {
        c.recursion = Some(serde_json::from_value(serde_json::json!({"sharing": "middle_cycle", "num_recursions": 3})).unwrap());
        c.router = Some(serde_json::from_value(serde_json::json!({"kind": kind})).unwrap());
    }
    c
}

fn requests() -> Vec<TokenRequest> {
    (0..7)
        .map(|i| TokenRequest {
            context: (0..(3 + 5 * i)).map(|j| ((j * 7 + i) % 60 + 1) as u32).collect(),
            continuation: (0..(1 + i % 3)).map(|j| ((j * 11 + i * 3) % 60 + 1) as u32).collect(),
        })
        .collect()
}

/// Direct computation: one unpadded forward per request, log-softmax by hand.
fn direct(be: &Cpu<f32>, m: &mut Model<Cpu<f32>>, r: &TokenRequest) -> (f64, bool) {
    let seq: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
    let inp = &seq[..seq.len() - 1];
    let first = inp.len() - r.continuation.len();
    let targets = vec![u32::MAX; inp.len()];
    let b = mor_model::Batch { inputs: inp, targets: &targets, batch: 1, seq_len: inp.len(), doc_starts: None };
    m.forward(be, &b, Routing::Threshold, false, 1.0).unwrap();
    let rows: Vec<usize> = (first..inp.len()).collect();
    let lg = m.logits_at(be, &rows);
    let v = m.cfg.vocab_size;
    let mut ll = 0.0;
    let mut greedy = true;
    for (k, &t) in r.continuation.iter().enumerate() {
        let row = &lg[k * v..(k + 1) * v];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        ll += row[t as usize] as f64 - lse;
        greedy &= mor_eval::scorer::argmax(row) == t as usize;
    }
    (ll, greedy)
}

#[test]
fn model_scorer_batching_does_not_change_scores() {
    let be = Cpu::<f32>::new();
    for router in [None, Some("expert"), Some("token")] {
        let mut m = Model::new(&be, tiny(router), 3).unwrap();
        let reqs = requests();
        let want: Vec<(f64, bool)> = reqs.iter().map(|r| direct(&be, &mut m, r)).collect();
        for bs in [1, 3, 8] {
            let got = ModelScorer::new(&be, &mut m, Routing::Threshold, bs).score(&reqs).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g.ll - w.0).abs() < 1e-4, "{router:?} batch {bs} request {i}: {} vs {}", g.ll, w.0);
                assert_eq!(g.is_greedy, w.1, "{router:?} batch {bs} request {i}");
            }
        }
    }
    // Truncation keeps the last max_len + 1 tokens; an oversize continuation is an error.
    let mut m = Model::new(&be, tiny(None), 3).unwrap();
    let mut s = ModelScorer::new(&be, &mut m, Routing::Threshold, 2);
    s.max_len = 8;
    let long = TokenRequest { context: (1..40).collect(), continuation: vec![5, 6] };
    let cut = TokenRequest { context: (31..40).collect(), continuation: vec![5, 6] };
    let r = s.score(&[long, cut]).unwrap();
    assert!((r[0].ll - r[1].ll).abs() < 1e-6);
    assert!(s.score(&[TokenRequest { context: vec![1], continuation: (1..20).collect() }]).is_err());
}

#[test]
fn validation_nll_is_the_mean_of_row_means_and_flags_topk() {
    let be = Cpu::<f32>::new();
    let stream: Vec<u32> = (0..200u32).map(|i| (i * 13 + i / 7) % 64).collect();
    for router in [None, Some("expert")] {
        let mut m = Model::new(&be, tiny(router), 1).unwrap();
        let opts = NllOptions { rows: 4, seq_len: 16, routing: Routing::Threshold, batch: 3 };
        let r = validation_nll(&be, &mut m, &stream, &opts).unwrap();
        assert!(r.causal);
        assert_eq!((r.rows, r.tokens, r.row_nll.len()), (4, 64, 4));
        for (k, &row) in r.row_nll.iter().enumerate() {
            let inp = &stream[k * 16..k * 16 + 16];
            let tgt = &stream[k * 16 + 1..k * 16 + 17];
            let b = mor_model::Batch { inputs: inp, targets: tgt, batch: 1, seq_len: 16, doc_starts: None };
            let s = m.forward(&be, &b, Routing::Threshold, false, 1.0).unwrap();
            assert!((s.ce - row).abs() < 1e-5, "row {k}: {} vs {row}", s.ce);
        }
        assert!((r.nll - r.row_nll.iter().sum::<f64>() / 4.0).abs() < 1e-12);
        let t = validation_nll(&be, &mut m, &stream, &NllOptions { routing: Routing::TopK, ..opts.clone() }).unwrap();
        assert_eq!(t.causal, router.is_none(), "top-k is non-causal only for expert-choice");
        assert_eq!(t.routing, "topk");
        assert!(validation_nll(&be, &mut m, &stream, &NllOptions { rows: 20, ..opts }).is_err(), "not enough rows");
    }
}
