//! Check 9: anti-cheat generation. The prompt is chosen at run time (the current minute spelled out,
//! "Write a haiku about GPU computing that includes the word forty-six"), so no output can be cached.
//! The backends must agree token by token and the output must pass the diversity gate; the report
//! records whether the word appears. The gate's limits come from the golden continuations and from
//! llama.cpp's own greedy continuations of all 60 prompts ([`Reference`]): a small model's greedy text
//! loops on some of them (smollm2-135m on "four": repeated 4-gram fraction 0.76, past the 0.70 the
//! golden continuations alone allow), and a limit must hold for llama.cpp's own output.

use std::path::Path;

use anyhow::{bail, Context};

use super::diversity::{self, Limits, Stats};
use super::{CheckResult, Op};

/// English words for 0..=59. Hand-written: 20 words and a rule are smaller than a dependency.
pub fn spell(n: u32) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 6] = ["", "", "twenty", "thirty", "forty", "fifty"];
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=59 if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_string(),
        20..=59 => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
        _ => n.to_string(),
    }
}

/// The word for the current minute (UTC) and the prompt.
pub fn prompt_now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let word = spell(((secs / 60) % 60) as u32);
    let prompt = format!("Write a haiku about GPU computing that includes the word {word}");
    (word, prompt)
}

/// llama.cpp's greedy continuation of each anti-cheat prompt of one model: golden/anticheat/{model}.json,
/// written by ci/golden/anticheat.py (exact tier, the prompt rendered with the model's chat template,
/// at most 32 tokens, the end-of-generation token included when one stopped it).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Reference {
    pub model: String,
    pub minutes: Vec<ReferenceMinute>,
}

/// One prompt's continuation in a [`Reference`].
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReferenceMinute {
    pub minute: u32,
    pub word: String,
    pub tokens: Vec<u32>,
}

impl Reference {
    /// `golden_dir/anticheat/{model}.json`, or None when the golden directory has none for `model`.
    /// A file that is there must hold the 60 prompts in order, each spelled as [`spell`] does, each
    /// with a continuation; anything else is an error naming the file.
    pub fn load(golden_dir: &Path, model: &str) -> anyhow::Result<Option<Reference>> {
        let path = golden_dir.join("anticheat").join(format!("{model}.json"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let r: Reference = serde_json::from_str(&text).with_context(|| format!("{}: not an anti-cheat reference", path.display()))?;
        if r.model != model {
            bail!("{}: the reference of model {:?}, expected {model:?}", path.display(), r.model);
        }
        if r.minutes.len() != 60 {
            bail!("{}: {} prompts, expected the 60 of minutes 0..=59", path.display(), r.minutes.len());
        }
        for (i, m) in r.minutes.iter().enumerate() {
            if m.minute as usize != i || m.word != spell(i as u32) {
                bail!("{}: prompt {i} is minute {} ({:?}), expected minute {i} ({:?})", path.display(), m.minute, m.word, spell(i as u32));
            }
            if m.tokens.is_empty() {
                bail!("{}: minute {i} ({:?}) has no tokens", path.display(), m.word);
            }
        }
        Ok(Some(r))
    }

    /// The diversity statistics of the 60 continuations (no entropies: NaN, which the limits skip).
    pub fn stats(&self) -> Vec<Stats> {
        self.minutes.iter().map(|m| diversity::stats(&m.tokens, &[])).collect()
    }
}

/// Tokens of llama.cpp's continuation the judged output must reproduce before its first difference
/// (or all of it, when shorter): a quarter of the 32 generated. Enough that no cached, canned or
/// unrelated output passes (the prompt changes by the minute), short of the whole text so that a
/// late near-tie, which another correct summation order may break the other way, does not fail it.
/// Measured: the CPU engine reproduces all 32 tokens of llama.cpp's continuation for each of the
/// 60 prompts of smollm2-135m and qwen2.5-coder-0.5b (exact tier).
pub const REFERENCE_PREFIX: usize = 8;

/// The anti-cheat gate's limits: [`Limits::from_golden`]'s rule over the golden continuations'
/// statistics and, when there is one, the [`Reference`]'s.
pub fn limits(golden: &[Stats], reference: Option<&Reference>) -> Option<Limits> {
    let mut all = golden.to_vec();
    all.extend(reference.map(Reference::stats).unwrap_or_default());
    Limits::from_any(&all)
}

/// One backend's generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Output {
    pub backend: String,
    pub tokens: Vec<u32>,
    pub text: String,
    pub step_entropies: Vec<f64>,
}

/// The checks of the outputs of one prompt (the first output is judged, the others compared with
/// it); `reference`: llama.cpp's continuation of the same prompt ([`Reference`]), when known.
pub fn check(word: &str, outputs: &[Output], limits: &Limits, reference: Option<&[u32]>) -> Vec<CheckResult> {
    let mut r = Vec::new();
    if let Some(first) = outputs.first() {
        for o in &outputs[1..] {
            let agree = first.tokens.iter().zip(&o.tokens).take_while(|(a, b)| a == b).count();
            let n = first.tokens.len().max(o.tokens.len());
            r.push(CheckResult::new(
                format!("anticheat:agree:{}-{}", first.backend, o.backend),
                "tokens agreeing before the first difference",
                agree as f64,
                Op::Ge,
                n as f64,
            ));
        }
        let s = diversity::stats(&first.tokens, &first.step_entropies);
        r.extend(diversity::check("anticheat", &s, limits));
        let has = first.text.to_lowercase().contains(&word.to_lowercase());
        // Recorded, not judged: a small model may well leave the word out.
        let mut c = CheckResult::new("anticheat:word_present", "the word appears (recorded, not judged)", if has { 1.0 } else { 0.0 }, Op::Ge, 0.0);
        c.detail = Some(format!("word {word:?}; text: {:?}", first.text.chars().take(200).collect::<String>()));
        r.push(c);
        if let Some(want) = reference {
            let agree = first.tokens.iter().zip(want).take_while(|(a, b)| a == b).count();
            let mut c = CheckResult::new(
                "anticheat:reference",
                "tokens agreeing with llama.cpp's continuation before the first difference",
                agree as f64,
                Op::Ge,
                REFERENCE_PREFIX.min(want.len()) as f64,
            );
            c.detail = Some(format!("{agree} of llama.cpp's {} tokens (golden/anticheat/)", want.len()));
            r.push(c);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn spells_minutes() {
        assert_eq!(spell(0), "zero");
        assert_eq!(spell(13), "thirteen");
        assert_eq!(spell(40), "forty");
        assert_eq!(spell(46), "forty-six");
        assert_eq!(spell(59), "fifty-nine");
        assert!(prompt_now().1.starts_with("Write a haiku about GPU computing that includes the word "));
    }

    /// golden/anticheat/smollm2-135m.json: llama.cpp's own continuation of "four" loops (repeated
    /// 4-gram fraction 0.76), and the limits taken with it admit it, where the golden continuations'
    /// alone (0.70) did not; a three-token loop (a broken engine's "componentWillMount" over and
    /// over) still fails them.
    #[test]
    fn reference_limits_admit_llama_cpps_own_loops() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
        let r = Reference::load(&dir, "smollm2-135m").unwrap().expect("golden/anticheat/smollm2-135m.json");
        let four = diversity::stats(&r.minutes[4].tokens, &[]);
        assert!(four.repeated_4gram > 0.7, "{four:?}");
        let golden = diversity::Stats { distinct1: 0.6, distinct2: 0.9, longest_run: 2, repeated_4gram: 0.45, mean_entropy: 1.0 };
        assert!(four.repeated_4gram > Limits::from_golden(&[golden]).max_repeated_4gram);
        let l = limits(&[golden], Some(&r)).unwrap();
        assert!(diversity::check("anticheat", &four, &l).iter().all(|c| c.passed), "{l:?}");
        let looping: Vec<u32> = (0..32).map(|i| [11u32, 22, 33][i % 3]).collect();
        assert!(diversity::check("anticheat", &diversity::stats(&looping, &[]), &l).iter().any(|c| !c.passed));
        assert_eq!(limits(&[golden], None), Some(Limits::from_golden(&[golden])));
        assert!(Reference::load(&dir, "no-such-model").unwrap().is_none());
    }

    #[test]
    fn a_malformed_reference_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("anticheat")).unwrap();
        let write = |v: serde_json::Value| std::fs::write(dir.path().join("anticheat/m.json"), v.to_string()).unwrap();
        let minute = |i: u32| serde_json::json!({"minute": i, "word": spell(i), "tokens": [1, 2]});
        write(serde_json::json!({"model": "m", "minutes": (0..59).map(minute).collect::<Vec<_>>()}));
        let e = format!("{:#}", Reference::load(dir.path(), "m").unwrap_err());
        assert!(e.contains("m.json") && e.contains("59 prompts"), "{e}");
        let mut ms: Vec<_> = (0..60).map(minute).collect();
        ms.swap(3, 4);
        write(serde_json::json!({"model": "m", "minutes": ms}));
        assert!(format!("{:#}", Reference::load(dir.path(), "m").unwrap_err()).contains("prompt 3 is minute 4"));
        write(serde_json::json!({"model": "other", "minutes": (0..60).map(minute).collect::<Vec<_>>()}));
        assert!(format!("{:#}", Reference::load(dir.path(), "m").unwrap_err()).contains("\"other\""));
        std::fs::write(dir.path().join("anticheat/m.json"), "{").unwrap();
        assert!(format!("{:#}", Reference::load(dir.path(), "m").unwrap_err()).contains("not an anti-cheat reference"));
        write(serde_json::json!({"model": "m", "minutes": (0..60).map(minute).collect::<Vec<_>>()}));
        assert_eq!(Reference::load(dir.path(), "m").unwrap().unwrap().minutes.len(), 60);
    }

    fn output(backend: &str, tokens: &[u32]) -> Output {
        Output { backend: backend.into(), tokens: tokens.to_vec(), text: "forty-six cores".into(), step_entropies: vec![1.0; tokens.len()] }
    }

    #[test]
    fn backends_agree_token_by_token() {
        let limits = Limits { min_distinct1: 0.0, min_distinct2: 0.0, max_longest_run: 8, max_repeated_4gram: 1.0, min_mean_entropy: 0.0 };
        let agree = |other: &[u32]| {
            check("forty-six", &[output("cpu", &[1, 2, 3, 4]), output("cuda", other)], &limits, None)
                .into_iter()
                .find(|c| c.name == "anticheat:agree:cpu-cuda")
                .expect("two outputs are compared")
        };
        assert!(agree(&[1, 2, 3, 4]).passed);
        let differs = agree(&[1, 2, 9, 4]);
        assert!(!differs.passed);
        assert_eq!((differs.value, differs.limit), (2.0, 4.0));
        // A generation that stops early (end of generation) differs too.
        assert!(!agree(&[1, 2, 3]).passed);
        let alone = check("forty-six", &[output("cuda", &[1, 2, 3, 4])], &limits, None);
        assert!(alone.iter().all(|c| !c.name.starts_with("anticheat:agree")));
        assert!(alone.iter().all(|c| c.name != "anticheat:reference"), "no reference, no reference check");
    }

    /// The judged output must reproduce llama.cpp's continuation for REFERENCE_PREFIX tokens (all of
    /// a shorter one); what follows may differ; a canned or early-stopping output fails.
    #[test]
    fn the_first_output_follows_llama_cpp() {
        let limits = Limits { min_distinct1: 0.0, min_distinct2: 0.0, max_longest_run: 32, max_repeated_4gram: 1.0, min_mean_entropy: 0.0 };
        let want: Vec<u32> = (100..132).collect();
        let judged = |tokens: &[u32], want: &[u32]| {
            check("four", &[output("cpu", tokens)], &limits, Some(want)).into_iter().find(|c| c.name == "anticheat:reference").expect("a reference check")
        };
        assert!(judged(&want, &want).passed);
        let mut late = want.clone();
        late[REFERENCE_PREFIX] = 7;
        assert!(judged(&late, &want).passed, "a difference after the prefix passes");
        let mut early = want.clone();
        early[REFERENCE_PREFIX - 1] = 7;
        let c = judged(&early, &want);
        assert!(!c.passed && c.value == (REFERENCE_PREFIX - 1) as f64 && c.limit == REFERENCE_PREFIX as f64);
        assert!(!judged(&[1, 2, 3, 4], &want).passed, "an unrelated output fails");
        assert!(!judged(&want[..5], &want).passed, "stopping early fails");
        assert!(judged(&[100, 101, 102], &[100, 101, 102]).passed, "a reference shorter than the prefix: all of it");
    }
}
