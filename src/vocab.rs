//! The runner's vocabulary as types: the backends a case runs on, the golden tiers and the checks a
//! suite may ask for. Each is spelled in suites/*.toml, report.json and on the command line exactly as
//! its serde name (`cpu`, `shipped`, `kv_cache`); the bug classes are
//! [`lockstep_engine::faults::BugClass`] (docs/bug-classes.md).

use serde::{Deserialize, Serialize};

/// An engine backend of lockstep's own engine (`--backend`, suites' `backends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The f32 reference (engine/src/cpu).
    Cpu,
    /// The CUDA backend (engine/src/cuda), where a device is usable.
    Cuda,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Cpu, Backend::Cuda];

    /// As in suite files and reports: `cpu`, `cuda` (also `lockstep_engine::backend::Backend::name`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A golden's tier (golden/README.md): `exact` (llama.cpp on f32 weights) or `shipped` (the quantized file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Exact,
    Shipped,
}

impl Tier {
    pub const ALL: [Tier; 2] = [Tier::Exact, Tier::Shipped];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Exact => "exact",
            Tier::Shipped => "shipped",
        }
    }

    /// The tier named `s` (a manifest record's `tier`), if it is one.
    pub fn from_name(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A check (src/checks/): what a suite case asks for (`checks = [...]`) and what each result in a report
/// belongs to ([`crate::checks::CheckResult::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// 1: the prompt's token ids (`tokens`).
    Tokens,
    /// 2: every tap within its limit (`taps:{family}`).
    Taps,
    /// 3: logits of every step, and the greedy continuation (`logits:*`, `continuation`).
    Logits,
    /// 4: invariants of the taps (`invariants:*`).
    Invariants,
    /// 5: prefill of N vs N−1 plus a decode step (`kv_cache`).
    KvCache,
    /// 6: each layer fed the golden input (`isolated`).
    Isolated,
    /// 7: diversity of the greedy generation (`diversity:greedy:*`).
    Diversity,
    /// 7, sampled: diversity of a seeded sampled generation (`diversity:sampled:*`).
    DiversitySampled,
    /// 8: the sampler's distribution (`sampler:*`).
    Sampler,
    /// 9: a generation from a prompt that changes every minute, the backends compared
    /// (`anticheat:*`, `diversity:anticheat:*`).
    Anticheat,
    /// Each backend's own dequantization vs gguf-py's (`dequant:{TYPE}`).
    Dequant,
    /// The CUDA graph's decode logits vs the tapped run's (`graph_decode`): never asked for, it runs on
    /// CUDA whenever taps are checked.
    GraphDecode,
}

impl Check {
    /// The checks a suite may list, in the order the runner runs them.
    pub const SUITE: [Check; 11] = [
        Check::Tokens,
        Check::Taps,
        Check::Logits,
        Check::Invariants,
        Check::KvCache,
        Check::Isolated,
        Check::Diversity,
        Check::DiversitySampled,
        Check::Sampler,
        Check::Anticheat,
        Check::Dequant,
    ];

    /// Without a `checks` list: not anticheat (a minute-dependent prompt), diversity_sampled, nor dequant
    /// (it needs golden/dequant/{model}: registry and tiny models only).
    pub fn suite_default() -> Vec<Check> {
        Check::SUITE.into_iter().filter(|c| !matches!(c, Check::Anticheat | Check::DiversitySampled | Check::Dequant)).collect()
    }

    /// The check a result named `name` belongs to: `{check}` or `{check}:{part}` (`taps:Qcur.rope`,
    /// `dequant:Q4_K`), `continuation` (the logits check's greedy run), `diversity:{greedy|sampled|
    /// anticheat}:{stat}` (the anti-cheat generation's diversity is the anti-cheat check's). The one
    /// place a result's name is read; None for a name no check makes.
    pub fn of_result(name: &str) -> Option<Check> {
        let (head, rest) = name.split_once(':').map_or((name, None), |(h, r)| (h, Some(r)));
        match (head, rest.and_then(|r| r.split(':').next())) {
            ("continuation", None) => Some(Check::Logits),
            ("diversity", Some("greedy")) => Some(Check::Diversity),
            ("diversity", Some("sampled")) => Some(Check::DiversitySampled),
            ("diversity", Some("anticheat")) => Some(Check::Anticheat),
            ("diversity", _) => None,
            (h, _) => Check::SUITE.into_iter().chain([Check::GraphDecode]).find(|c| c.name() == h),
        }
    }

    /// As in suite files: `tokens`, `kv_cache`, …
    pub fn name(self) -> &'static str {
        match self {
            Check::Tokens => "tokens",
            Check::Taps => "taps",
            Check::Logits => "logits",
            Check::Invariants => "invariants",
            Check::KvCache => "kv_cache",
            Check::Isolated => "isolated",
            Check::Diversity => "diversity",
            Check::DiversitySampled => "diversity_sampled",
            Check::Sampler => "sampler",
            Check::Anticheat => "anticheat",
            Check::Dequant => "dequant",
            Check::GraphDecode => "graph_decode",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serde_spellings() {
        for c in Check::SUITE.into_iter().chain([Check::GraphDecode]) {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
        for b in Backend::ALL {
            assert_eq!(serde_json::to_value(b).unwrap(), b.name());
            assert_eq!(<Backend as clap::ValueEnum>::to_possible_value(&b).unwrap().get_name(), b.name());
        }
        for t in Tier::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
            assert_eq!(Tier::from_name(t.name()), Some(t));
        }
    }
}
