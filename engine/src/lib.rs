//! lockstep-engine: a small LLM inference engine built to be compared, tensor by tensor, with llama.cpp.
//!
//! Layers, bottom up (see ARCHITECTURE.md at the repository root):
//! - [`gguf`]: the GGUF container over memmap2, every length checked.
//! - [`dequant`]: GGML block formats to f32.
//! - [`config`]: architecture hyper-parameters read from GGUF metadata (no per-model constants).
//! - [`tokenizer`], [`chat`]: the `tokenizers` crate built from GGUF metadata; chat templates via minijinja.
//! - [`taps`]: the observer through which every intermediate tensor leaves a backend; [`taps_file`]
//!   writes them to a safetensors dump (for any Rust engine).
//! - [`backend`]: the trait every backend implements; [`cpu`] is the f32 reference.
//! - [`sampler`]: greedy and seeded temperature / top-k / top-p sampling in llama.cpp's order.
//! - [`fetch`]: the registry models, fetched with pip into a cache outside the repository.

pub mod backend;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod dequant;
pub mod dump;
pub mod fault_plan;
pub mod faults;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod sampler;
pub mod taps;
pub mod taps_file;
pub mod tokenizer;
