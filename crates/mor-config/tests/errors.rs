//! Bad config files give errors that name the field at fault.

use mor_config::*;

fn tiny_text() -> String {
    preset_toml("tiny-mor-ec3").unwrap().to_string()
}

fn err(text: &str) -> String {
    RunConfig::from_toml_str(text, "test.toml").unwrap_err().to_string()
}

#[test]
fn kv_heads_must_divide_heads() {
    let msg = err(&tiny_text().replace("num_kv_heads = 2", "num_kv_heads = 3"));
    assert!(msg.starts_with("model.num_kv_heads: must divide model.num_heads"), "{msg}");
}

#[test]
fn unknown_key_names_its_path() {
    let msg = err(&tiny_text().replace("alpha = 0.1", "alpha = 0.1\nalhpa = 0.2"));
    assert!(msg.contains("model.router.alhpa"), "{msg}");
    assert!(msg.contains("unknown field"), "{msg}");
    let msg = err(&tiny_text().replace("[train]", "[train]\nstepz = 3"));
    assert!(msg.contains("train.stepz"), "{msg}");
    let msg = err(&format!("bogus = 1\n{}", tiny_text()));
    assert!(msg.contains("bogus"), "{msg}");
}

#[test]
fn wrong_type_names_its_path() {
    let msg = err(&tiny_text().replace("num_layers = 8", "num_layers = \"eight\""));
    assert!(msg.contains("model.num_layers"), "{msg}");
    let msg = err(&tiny_text().replace("sharing = \"middle_cycle\"", "sharing = \"spiral\""));
    assert!(msg.contains("model.recursion.sharing"), "{msg}");
}

#[test]
fn missing_field_names_its_table() {
    let msg = err(&tiny_text().replace("hidden_size = 128\n", ""));
    assert!(msg.contains("model") && msg.contains("hidden_size"), "{msg}");
}

#[test]
fn semantic_errors_name_the_field() {
    let msg = err(&tiny_text().replace("num_layers = 8", "num_layers = 9"));
    assert!(msg.starts_with("model.num_layers:"), "{msg}");
    let msg = err(&tiny_text().replace("seq_len = 128", "seq_len = 4096"));
    assert!(msg.starts_with("train.seq_len:"), "{msg}");
    let msg = err(&tiny_text().replace("alpha = 0.1", "alpha = -1.0"));
    assert!(msg.starts_with("model.router.alpha:"), "{msg}");
    // KV sharing needs contiguous recursion blocks.
    let text =
        preset_toml("tiny-rec3-seq").unwrap().replace("kv_mode = \"recursion_wise\"", "kv_mode = \"share\"");
    let msg = err(&text);
    assert!(msg.starts_with("model.recursion.kv_mode:"), "{msg}");
}

#[test]
fn syntax_error_reports_position() {
    let msg = err("name = \"x\"\n[model\n");
    assert!(msg.contains("line 2"), "{msg}");
}
