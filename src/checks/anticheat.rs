//! Check 9: anti-cheat generation. The prompt is chosen at run time (the current minute spelled out,
//! "Write a haiku about GPU computing that includes the word forty-six"), so no output can be cached.
//! The backends must agree token by token and the output must pass the diversity gate; the report
//! records whether the word appears.

use super::diversity::{self, Limits};
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

/// One backend's generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Output {
    pub backend: String,
    pub tokens: Vec<u32>,
    pub text: String,
    pub step_entropies: Vec<f64>,
}

pub fn check(word: &str, outputs: &[Output], limits: &Limits) -> Vec<CheckResult> {
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

    fn output(backend: &str, tokens: &[u32]) -> Output {
        Output { backend: backend.into(), tokens: tokens.to_vec(), text: "forty-six cores".into(), step_entropies: vec![1.0; tokens.len()] }
    }

    #[test]
    fn backends_agree_token_by_token() {
        let limits = Limits { min_distinct1: 0.0, min_distinct2: 0.0, max_longest_run: 8, max_repeated_4gram: 1.0, min_mean_entropy: 0.0 };
        let agree = |other: &[u32]| {
            check("forty-six", &[output("cpu", &[1, 2, 3, 4]), output("cuda", other)], &limits)
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
        let alone = check("forty-six", &[output("cuda", &[1, 2, 3, 4])], &limits);
        assert!(alone.iter().all(|c| !c.name.starts_with("anticheat:agree")));
    }
}
