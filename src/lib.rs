//! lockstep: the validation runner (suites, checks, localization, reports) and its CLI.
//!
//! Code map:
//! - [`golden`]: golden/manifest.json and taps safetensors files over memmap2 (sha256-verified).
//! - [`tapname`]: tap keys `s{step}/{name}-{layer}.{stage}` and graph order.
//! - [`metrics`]: rel L2, max abs, cosine, NMSE, KL, top-k, ranks, entropy (f64).
//! - [`checks`]: the nine checks; each yields {name, metric, value, limit, passed}.
pub mod checks;
pub mod compare;
pub mod dump_check;
pub mod error;
pub mod golden;
pub mod localize;
pub mod metrics;
pub mod noise;
pub mod ondemand;
pub mod pin;
pub mod probe;
pub mod report;
pub mod rows;
pub mod shards;
pub mod suite;
#[doc(hidden)]
pub mod synth;
pub mod tapname;
pub mod validate;
pub mod vocab;
