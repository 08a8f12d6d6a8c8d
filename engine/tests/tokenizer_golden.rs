//! The tokenizer and chat templates against llama.cpp's goldens (`golden/tokenize/{model}.json`,
//! written by `ci/golden/tokenization.py`): every case's ids and detokenized text, the EOG set,
//! BOS / EOS, and every chat rendering.
//!
//! Goldens: `<repo>/golden/tokenize/`, or `$LOCKSTEP_GOLDEN_DIR/tokenize/`. Models:
//! `fetch::ensure_model` (the lockstep cache, `$LOCKSTEP_CACHE`; fetched when missing). A missing
//! golden fails the test and names `ci/regenerate-golden`.

use std::path::PathBuf;

use lockstep_engine::chat::{self, ChatMessage};
use lockstep_engine::fetch;
use lockstep_engine::gguf::GgufFile;
use lockstep_engine::tokenizer::Tokenizer;
use serde::Deserialize;

const MODELS: &[&str] = &["qwen2.5-coder-0.5b", "smollm2-135m"];

#[derive(Deserialize)]
struct Golden {
    model: String,
    add_special: bool,
    parse_special: bool,
    vocab: VocabInfo,
    cases: Vec<Case>,
    chat: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct VocabInfo {
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
    special: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    detok: String,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    bos_token: String,
    eos_token: String,
    rendered: String,
}

fn golden_dir() -> PathBuf {
    match std::env::var_os("LOCKSTEP_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("golden"),
    }
}

fn load(id: &str) -> (Golden, GgufFile) {
    let gpath = golden_dir().join("tokenize").join(format!("{id}.json"));
    let text =
        std::fs::read_to_string(&gpath).unwrap_or_else(|e| panic!("{}: {e}; run `ci/regenerate-golden` to write the tokenization goldens", gpath.display()));
    let golden: Golden = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not a tokenization golden: {e}", gpath.display()));
    assert_eq!(golden.model, id, "{}: golden is for another model", gpath.display());
    assert!(golden.add_special && golden.parse_special, "{}: expected add_special and parse_special on", gpath.display());
    let mpath = fetch::ensure_model(id, false).unwrap_or_else(|e| panic!("{id}: the model is not in the cache: {e}"));
    let gguf = GgufFile::open(&mpath).unwrap_or_else(|e| panic!("{id}: {e}"));
    (golden, gguf)
}

/// A token id, or "none" (no BOS, say).
fn id_or_none(id: Option<u32>) -> String {
    id.map_or("none".into(), |i| i.to_string())
}

fn show(s: &str) -> String {
    let mut t: String = format!("{s:?}");
    if t.len() > 160 {
        let cut = (0..=157).rev().find(|&i| t.is_char_boundary(i)).unwrap_or(0);
        t.truncate(cut);
        t.push('…');
    }
    t
}

/// Every case of one model; returns (passed, total) and panics with every failure listed.
fn check_tokenize(id: &str) {
    let (golden, gguf) = load(id);
    let tok = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{id}: building the tokenizer: {e}"));

    let mut failures = Vec::new();
    let v = &golden.vocab;
    if tok.n_vocab() != v.n_vocab {
        failures.push(format!("n_vocab: expected {}, got {}", v.n_vocab, tok.n_vocab()));
    }
    if tok.bos() != v.bos || tok.eos() != v.eos {
        failures.push(format!("bos/eos: expected {}/{}, got {}/{}", id_or_none(v.bos), id_or_none(v.eos), id_or_none(tok.bos()), id_or_none(tok.eos())));
    }
    let eog: Vec<u32> = (0..tok.n_vocab() as u32).filter(|&t| tok.is_eog(t)).collect();
    if eog != v.eog {
        failures.push(format!("end-of-generation ids: expected {:?}, got {:?}", v.eog, eog));
    }
    if tok.special_ids() != v.special {
        failures.push(format!("special (control / user-defined) ids: expected {:?}, got {:?}", v.special, tok.special_ids()));
    }

    let mut passed = 0;
    for case in &golden.cases {
        let mut ok = true;
        match tok.encode(&case.text, golden.add_special, golden.parse_special) {
            Ok(ids) if ids == case.ids => {}
            Ok(ids) => {
                ok = false;
                failures.push(format!("encode {}:\n    expected {:?}\n    got      {:?}", show(&case.text), case.ids, ids));
            }
            Err(e) => {
                ok = false;
                failures.push(format!("encode {}: error {e}", show(&case.text)));
            }
        }
        let detok = tok.decode(&case.ids);
        if detok != case.detok {
            ok = false;
            failures.push(format!("decode {:?}:\n    expected {}\n    got      {}", case.ids, show(&case.detok), show(&detok)));
        }
        passed += ok as usize;
    }
    eprintln!("{id}: {passed}/{} tokenization cases agree with llama.cpp", golden.cases.len());
    assert!(
        failures.is_empty(),
        "{id}: {} of {} tokenization cases differ from llama.cpp:\n{}",
        golden.cases.len() - passed,
        golden.cases.len(),
        failures.join("\n")
    );
}

fn check_chat(id: &str) {
    let (golden, gguf) = load(id);
    let template = chat::template_of(&gguf).unwrap_or_else(|| panic!("{id}: no tokenizer.chat_template"));
    assert!(!golden.chat.is_empty(), "{id}: the golden has no chat renderings");
    let mut failures = Vec::new();
    for c in &golden.chat {
        match chat::render(template, &c.messages, c.add_generation_prompt, &c.bos_token, &c.eos_token) {
            Ok(r) if r == c.rendered => {}
            Ok(r) => failures.push(format!(
                "{} messages, add_generation_prompt={}:\n    expected {}\n    got      {}",
                c.messages.len(),
                c.add_generation_prompt,
                show(&c.rendered),
                show(&r)
            )),
            Err(e) => failures.push(format!("{} messages: error {e}", c.messages.len())),
        }
    }
    eprintln!("{id}: {}/{} chat renderings agree with jinja2", golden.chat.len() - failures.len(), golden.chat.len());
    assert!(failures.is_empty(), "{id}: chat renderings differ from jinja2:\n{}", failures.join("\n"));
}

#[test]
fn tokenize_qwen2_5_coder_0_5b() {
    check_tokenize(MODELS[0]);
}

#[test]
fn tokenize_smollm2_135m() {
    check_tokenize(MODELS[1]);
}

#[test]
fn chat_qwen2_5_coder_0_5b() {
    check_chat(MODELS[0]);
}

#[test]
fn chat_smollm2_135m() {
    check_chat(MODELS[1]);
}

/// "<|im_start|>" must be one token with parse_special on, and text without it (docs/bug-classes.md, tokenizer: special
/// tokens split into text).
#[test]
fn im_start_is_one_token_only_when_parsing_specials() {
    for id in MODELS {
        let (_, gguf) = load(id);
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        let one = tok.encode("<|im_start|>", false, true).unwrap();
        assert_eq!(one.len(), 1, "{id}: <|im_start|> with parse_special: {one:?}");
        let many = tok.encode("<|im_start|>", false, false).unwrap();
        assert!(many.len() > 1, "{id}: <|im_start|> without parse_special: {many:?}");
        assert_eq!(tok.decode(&many), "<|im_start|>");
    }
}
