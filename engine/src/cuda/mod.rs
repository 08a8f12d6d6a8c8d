//! The CUDA backend: the same graph as the CPU reference ([`crate::cpu`]), on an NVIDIA GPU.
//!
//! - [`device`]: the process-wide context (cudarc, libraries loaded at run time, so the crate builds
//!   and its CPU tests run on machines without CUDA), kernels from `kernels/*.cu` compiled by NVRTC
//!   on first use for the device's own compute capability, launch and allocation helpers.
//! - [`ops`]: one launch wrapper per kernel. Each kernel's CPU twin is named in its .cu file; the
//!   tests in `engine/tests/cuda_kernels.rs` compare the two.
//! - [`weights`]: weights uploaded in their GGUF formats (F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K,
//!   Q6_K), dequantized in registers by the matrix-vector kernels; prefill GEMMs dequantize one
//!   matrix at a time into an f32 scratch and use cuBLAS SGEMM without TF32.
//! - [`backend`]: [`CudaBackend`], implementing [`crate::backend::Backend`], f32 activations and KV
//!   cache, taps under the CPU backend's names, decode steps replayed as one CUDA graph.
//! - [`bench`]: llama-bench style prompt-processing / generation timing for any backend.

pub mod attn_decode;
pub mod backend;
pub mod bench;
pub mod device;
pub mod ops;
pub mod weights;

pub use backend::{CudaBackend, CudaOptions};
pub use device::{available, DeviceInfo, Gpu};
