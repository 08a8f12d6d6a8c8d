//! The process-wide CUDA context, the NVRTC-compiled kernels, and one [`Gpu`] per backend: a stream,
//! a cuBLAS handle, and the launch / allocation / copy helpers that turn driver errors into messages
//! naming the kernel and launch shape, or the buffer being allocated.
//!
//! Architecture invariants:
//! - cudarc's per-buffer event tracking is off (every buffer of a [`Gpu`] lives on its one stream),
//!   so a launch is exactly one `cuLaunchKernel` and a decode step can be captured as a CUDA graph.
//! - Kernels take raw device pointers ([`Arg::P`]); a pointer is only formed from a buffer that the
//!   caller keeps alive for as long as the work on the stream may use it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::{anyhow, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

/// What [`super::available`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// (major, minor)
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (the launch shapes of the decode kernels aim to fill them).
    pub multiprocessors: usize,
    pub total_mem: usize,
    pub driver_version: i32,
}

struct Shared {
    ctx: Arc<CudaContext>,
    info: DeviceInfo,
}

/// CUDA graph capture must not overlap device-wide synchronising calls from other threads (freeing
/// pinned memory, context synchronisation, module loading), or the capture is invalidated. Every
/// backend operation holds this lock shared; capturing a decode graph holds it exclusively (once
/// per backend, a few milliseconds).
static GPU_LOCK: RwLock<()> = RwLock::new(());

/// Shared hold of the capture lock (see [`GPU_LOCK`]).
pub fn shared_lock() -> RwLockReadGuard<'static, ()> {
    GPU_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive hold of the capture lock, for a graph capture.
pub fn exclusive_lock() -> RwLockWriteGuard<'static, ()> {
    GPU_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static KERNELS: OnceLock<Result<Arc<Kernels>, String>> = OnceLock::new();

fn shared() -> Result<&'static Shared, String> {
    SHARED.get_or_init(init_shared).as_ref().map_err(|e| e.clone())
}

fn init_shared() -> Result<Shared, String> {
    // SAFETY: these only try to dlopen the libraries (no symbol is called); they let us report a
    // missing library as an error instead of cudarc's panic on first use.
    let (cuda, nvrtc, cublas) =
        unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) };
    if !cuda {
        return Err("no NVIDIA driver: libcuda.so could not be loaded".into());
    }
    if !nvrtc {
        return Err("NVRTC (libnvrtc.so, CUDA 13) could not be loaded".into());
    }
    if !cublas {
        return Err("cuBLAS (libcublas.so, CUDA 13) could not be loaded".into());
    }
    let made = std::panic::catch_unwind(|| -> Result<Shared, String> {
        cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let n = CudaContext::device_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
        if n < 1 {
            return Err("no CUDA device".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("cannot create a CUDA context on device 0: {e}"))?;
        // SAFETY: called before any buffer exists; every buffer is then used on one stream only.
        unsafe { ctx.disable_event_tracking() };
        let info = DeviceInfo {
            name: ctx.name().map_err(|e| e.to_string())?,
            compute_capability: ctx.compute_capability().map_err(|e| e.to_string())?,
            multiprocessors: ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(|e| e.to_string())?
                as usize,
            total_mem: ctx.total_mem().map_err(|e| e.to_string())?,
            driver_version: driver_version(),
        };
        Ok(Shared { ctx, info })
    });
    match made {
        Ok(r) => r,
        Err(p) => Err(format!(
            "CUDA initialisation panicked: {}",
            p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        )),
    }
}

/// cuDriverGetVersion (e.g. 13000 for CUDA 13.0), 0 if it fails.
fn driver_version() -> i32 {
    let mut v = 0i32;
    // SAFETY: the driver library is loaded (checked by the caller) and v is a valid out-pointer.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        v
    } else {
        0
    }
}

/// Whether CUDA can be used here: the device's description, or why not.
pub fn available() -> Result<DeviceInfo, String> {
    shared().map(|s| s.info.clone())
}

/// The kernel sources, in compile order; each is compiled with `common.cuh` in front of it.
const COMMON: &str = include_str!("../../../kernels/common.cuh");
const SOURCES: [(&str, &str); 3] = [
    ("quant.cu", include_str!("../../../kernels/quant.cu")),
    ("ops.cu", include_str!("../../../kernels/ops.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
];

/// The compiled kernel modules, one per source file; a kernel is looked up by its `extern "C"` name
/// on first use and kept (candle's way), so nothing scans the sources for names.
pub struct Kernels {
    modules: Vec<(&'static str, Arc<cudarc::driver::CudaModule>)>,
    loaded: std::sync::Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    pub fn get(&self, name: &str) -> Result<CudaFunction> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = loaded.get(name) {
            return Ok(f.clone());
        }
        // cuModuleGetFunction answers "not found" for a module without it: try each module in turn
        let f = self
            .modules
            .iter()
            .find_map(|(_, m)| m.load_function(name).ok())
            .ok_or_else(|| anyhow!("no CUDA kernel named `{name}` in kernels/{{{}}}", self.modules.iter().map(|m| m.0).collect::<Vec<_>>().join(",")))?;
        loaded.insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// The constants the kernels share with the Rust side, as `#define`s put in front of every source:
/// one home for each (the launch wrappers in ops.rs and attn_decode.rs use the same Rust items).
pub fn kernel_constants() -> String {
    use crate::gguf::GgmlType;
    let mut s = String::from("// generated by engine/src/cuda/device.rs kernel_constants()\n");
    // ggml's type ids (ggml.h enum ggml_type), for the formats the kernels read
    for (name, ty) in [
        ("F32", GgmlType::F32),
        ("F16", GgmlType::F16),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q5_0", GgmlType::Q5_0),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4_K),
        ("Q6_K", GgmlType::Q6_K),
    ] {
        s += &format!("#define GT_{name} {}\n", ty.to_u32());
    }
    s += &format!("#define MV_MAX_T {}\n#define MV_RPW {}\n#define ATT_ROWS {}\n", super::ops::MV_MAX_T, super::ops::MV_RPW, super::ops::ATTN_ROWS);
    for (name, bit) in super::ops::AttnFault::BITS {
        s += &format!("#define {name} {bit}\n");
    }
    s
}

fn kernels(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Arc<Kernels>, String> {
    KERNELS
        .get_or_init(|| {
            let arch = format!("--gpu-architecture=compute_{}{}", cc.0, cc.1);
            let mut modules = Vec::new();
            // LOCKSTEP_KERNELS_DIR: read the sources from a directory instead of the embedded copies
            // (kernel development without rebuilding).
            let dir = std::env::var_os("LOCKSTEP_KERNELS_DIR").map(std::path::PathBuf::from);
            let read = |name: &str, embedded: &'static str| -> Result<String, String> {
                match &dir {
                    Some(d) => std::fs::read_to_string(d.join(name)).map_err(|e| format!("{}: {e}", d.join(name).display())),
                    None => Ok(embedded.to_string()),
                }
            };
            let common = read("common.cuh", COMMON)?;
            let constants = kernel_constants();
            for (file, embedded) in SOURCES {
                let src = read(file, embedded)?;
                let full = format!("{constants}\n#line 1 \"common.cuh\"\n{common}\n#line 1 \"{file}\"\n{src}");
                let opts =
                    cudarc::nvrtc::CompileOptions { options: vec![arch.clone(), "--std=c++17".into()], name: Some(file.to_string()), ..Default::default() };
                let ptx = cudarc::nvrtc::compile_ptx_with_opts(&full, opts).map_err(|e| match e {
                    cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                        format!("NVRTC failed to compile kernels/{file} ({nvrtc:?}):\n{}", log.to_string_lossy())
                    }
                    other => format!("NVRTC failed on kernels/{file}: {other:?}"),
                })?;
                let module = ctx.load_module(ptx).map_err(|e| format!("loading kernels/{file} into the driver: {e}"))?;
                modules.push((file, module));
            }
            Ok(Arc::new(Kernels { modules, loaded: Default::default() }))
        })
        .clone()
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer (0 for an optional output that is not wanted).
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// A stream with its kernels and cuBLAS handle.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Two side streams for independent work (the K and V projections beside Q); launches go to
    /// `side[active - 1]` while `active` is 1 or 2, else to `stream`.
    pub side: [Arc<CudaStream>; 2],
    active: std::sync::atomic::AtomicUsize,
    pub kernels: Arc<Kernels>,
    pub blas: CudaBlas,
    pub info: DeviceInfo,
    /// Synchronise after every launch (LOCKSTEP_CUDA_SYNC=1) so that a fault names its kernel.
    pub sync_each: bool,
    /// While a CUDA graph is being captured no synchronisation may happen.
    pub capturing: bool,
    /// Launch the PDL-aware kernels with programmatic dependent launch ([`Gpu::launch_pdl`]):
    /// compute capability 9.0 and up, unless LOCKSTEP_CUDA_PDL=0 (for comparing timings).
    pub pdl: bool,
    /// Decode matvecs (T = 1) with int8 activations (quant.cu `matvec1q_*`: x quantized per 32
    /// values as llama.cpp's q8_1, dp4a products): part of the shipped tier's fast arithmetic, off
    /// by default (the exact tier needs f32 x). Set by the CUDA backend (CudaOptions::int8_decode).
    /// A matrix whose staging would pass 48 KiB of shared memory keeps the unstaged f32 kernel.
    pub int8_decode: bool,
}

impl Gpu {
    pub fn new() -> Result<Gpu> {
        let _lock = shared_lock();
        let sh = shared().map_err(|e| anyhow!("CUDA is not available: {e}"))?;
        let kernels = kernels(&sh.ctx, sh.info.compute_capability).map_err(|e| anyhow!(e))?;
        let stream = sh.ctx.new_stream().context("creating a CUDA stream")?;
        let side = [sh.ctx.new_stream().context("creating a CUDA stream")?, sh.ctx.new_stream().context("creating a CUDA stream")?];
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("creating a cuBLAS handle: {e}"))?;
        // Default math: no TF32 tensor-op math, so SGEMM is full f32 (the exact tier needs it).
        // SAFETY: the handle is valid (just created) and the mode a valid enum value.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(|e| anyhow!("cublasSetMathMode: {e}"))?;
        }
        Ok(Gpu {
            ctx: sh.ctx.clone(),
            stream,
            side,
            active: std::sync::atomic::AtomicUsize::new(0),
            kernels,
            blas,
            info: sh.info.clone(),
            sync_each: std::env::var("LOCKSTEP_CUDA_SYNC").is_ok_and(|v| v == "1"),
            capturing: false,
            pdl: sh.info.compute_capability.0 >= 9 && !std::env::var("LOCKSTEP_CUDA_PDL").is_ok_and(|v| v == "0"),
            int8_decode: false,
        })
    }

    /// The prefill GEMMs' arithmetic: full f32 (the default; the exact tier needs it), or TF32 tensor
    /// cores (inputs rounded to 10-bit mantissas, f32 accumulation: llama.cpp's shipped path rounds
    /// its activations harder, to 8 bits, so the shipped tier may use this).
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        use cudarc::cublas::sys::cublasMath_t::{CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH};
        let mode = if on { CUBLAS_TF32_TENSOR_OP_MATH } else { CUBLAS_DEFAULT_MATH };
        // SAFETY: the handle is this Gpu's (valid while it lives) and the mode a valid enum value.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*self.blas.handle(), mode).result() }.map_err(|e| anyhow!("cublasSetMathMode: {e}"))
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().context("cuMemGetInfo")
    }

    /// Allocates `n` zeroed elements; on failure names `what` and the free memory.
    pub fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize, what: &str) -> Result<CudaSlice<T>> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            anyhow!("out of GPU memory? allocating {what} ({bytes} bytes) failed: {e} ({} MiB free of {} MiB)", free >> 20, total >> 20)
        })
    }

    /// Uploads `data` to a new buffer named `what` in errors.
    pub fn upload<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        let mut b = self.alloc::<T>(data.len(), what)?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut b).with_context(|| format!("copying {what} to the GPU"))?;
        }
        Ok(b)
    }

    /// Copies `n` values starting at element `off` of `b` to the host (synchronises the stream).
    pub fn download(&self, b: &CudaSlice<f32>, off: usize, n: usize) -> Result<Vec<f32>> {
        anyhow::ensure!(off + n <= b.len(), "download of {n} values at {off} from a buffer of {}", b.len());
        let v = self.stream.clone_dtoh(&b.slice(off..off + n)).context("copying from the GPU")?;
        self.sync()?;
        Ok(v)
    }

    /// Synchronises the whole device (all streams), holding the capture lock.
    pub fn device_sync(&self) -> Result<()> {
        let _lock = shared_lock();
        self.ctx.synchronize().context("CUDA device synchronisation")
    }

    /// Makes the side streams wait for the work queued so far on the main stream.
    pub fn fork(&self) -> Result<()> {
        let ev = self.stream.record_event(None).map_err(|e| anyhow::anyhow!("recording a CUDA event on the main stream: {e:?}"))?;
        for s in &self.side {
            s.wait(&ev).context("side stream wait")?;
        }
        Ok(())
    }

    /// Makes the main stream wait for the work queued on the side streams; launches go to main.
    pub fn join(&self) -> Result<()> {
        self.on(0);
        for s in &self.side {
            let ev = s.record_event(None).map_err(|e| anyhow::anyhow!("recording a CUDA event on a side stream: {e:?}"))?;
            self.stream.wait(&ev).context("main stream wait")?;
        }
        Ok(())
    }

    /// Sends the following launches to the main stream (0) or side stream 1 or 2.
    pub fn on(&self, i: usize) {
        self.active.store(i.min(2), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA stream synchronisation (an earlier kernel may have faulted)")
    }

    /// The stream launches go to now (see [`Gpu::on`]).
    fn active_stream(&self) -> &Arc<CudaStream> {
        match self.active.load(std::sync::atomic::Ordering::Relaxed) {
            0 => &self.stream,
            i => &self.side[i - 1],
        }
    }

    /// Launches kernel `name` on this stream.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
        let f = self.kernels.get(name)?;
        let stream = self.active_stream();
        let mut b = stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(i) => b.arg(i),
                Arg::L(l) => b.arg(l),
                Arg::F(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
        // SAFETY: every caller in ops.rs passes the argument list of the kernel's C signature, with
        // pointers into live buffers sized for the launch shape (checked there).
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("CUDA kernel {name} failed to launch (grid {grid:?}, block {block}, shared {smem} B): {e}"))?;
        self.after_launch(stream, name, grid, block)
    }

    /// [`Gpu::launch`] with programmatic dependent launch (when [`Gpu::pdl`]): the kernel may start
    /// while the previous kernel of the stream still runs, once all of that kernel's blocks have
    /// passed their `pdl_wait` (kernels/common.cuh), if that one is PDL-aware too. Only for
    /// PDL-aware kernels: they read nothing another kernel writes before `pdl_wait`, which returns
    /// when the previous kernel has completed and its writes are visible (so every earlier kernel
    /// has too).
    pub fn launch_pdl(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: u32, args: &[Arg]) -> Result<()> {
        use cudarc::driver::sys;
        if !self.pdl {
            return self.launch(name, grid, block, smem, args);
        }
        let f = self.kernels.get(name)?;
        let stream = self.active_stream();
        // cuLaunchKernelEx takes the address of each argument value: one 8-byte slot each, the value
        // in its low bytes (little-endian, as the kernel reads an i32 / f32 / pointer from it)
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::I(i) => i as u32 as u64,
                Arg::L(l) => l as u64,
                Arg::F(x) => x.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut std::ffi::c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut std::ffi::c_void).collect();
        // SAFETY: an all-zero CUlaunchAttribute is a valid (plain C) value; id and value are set next.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e}"))?;
        // SAFETY: as in `launch`: the caller passes the argument list of the kernel's C signature
        // with pointers into live buffers sized for the launch shape; `slots`, `params`, `attr` and
        // `cfg` outlive the call (the driver copies the argument values at launch).
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(|e| anyhow!("CUDA kernel {name} failed to launch (grid {grid:?}, block {block}, shared {smem} B, PDL): {e}"))?;
        self.after_launch(stream, name, grid, block)
    }

    /// With LOCKSTEP_CUDA_SYNC=1 (and no capture running), waits for the kernel just launched.
    fn after_launch(&self, stream: &CudaStream, name: &str, grid: (u32, u32, u32), block: u32) -> Result<()> {
        if self.sync_each && !self.capturing {
            stream.synchronize().map_err(|e| anyhow!("CUDA kernel {name} (grid {grid:?}, block {block}) faulted: {e}"))?;
        }
        Ok(())
    }
}

/// The raw device address of a buffer (event tracking is off, so nothing is recorded).
pub fn ptr<T>(b: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = b.device_ptr(stream);
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_constants_define_what_the_sources_use_and_the_sources_do_not() {
        let c = super::kernel_constants();
        for name in ["GT_Q4_K 12", "GT_Q6_K 14", "GT_F32 0", "MV_MAX_T 8", "MV_RPW 4", "ATT_ROWS 8", "ATTN_NO_CAUSAL_MASK 1", "ATTN_GQA_MODULO 4"] {
            assert!(c.contains(&format!("#define {name}\n")), "{name} missing from:\n{c}");
        }
        // one home: no source defines them again
        for (file, src) in super::SOURCES.iter().chain([&("common.cuh", super::COMMON)]) {
            for l in c.lines().filter_map(|l| l.strip_prefix("#define ")) {
                let name = l.split(' ').next().unwrap();
                assert!(!src.contains(&format!("#define {name} ")), "kernels/{file} defines {name} again");
            }
        }
    }
}
