//! lockstep's C ABI: C, C++ and CUDA engines write tap dumps that `lockstep compare` judges.
//!
//! The header is `capi/include/lockstep.h` (hand-written, with the contract of each function; the
//! surface is six functions, so a generator such as cbindgen would add a build step for little). Each
//! function is a thin shell over [`lockstep_engine::taps_file::SafetensorsTapWriter`]: arguments are
//! checked, input dtypes are converted to f32, and errors become a nonzero return plus a thread-local
//! message read with `lockstep_last_error()`. No panic crosses the boundary: every body runs under
//! `catch_unwind`.
//!
//! Return codes: [`LOCKSTEP_OK`] (0), [`LOCKSTEP_EINVAL`] (a NULL pointer or a bad argument: nothing
//! was recorded, the handle is still usable), [`LOCKSTEP_EIO`] (the file could not be written),
//! [`LOCKSTEP_EINTERNAL`] (a bug in this library, caught).

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use lockstep_engine::taps_file::SafetensorsTapWriter;

/// `dtype` of `lockstep_dump_record`: IEEE binary32.
pub const LOCKSTEP_F32: c_int = 0;
/// IEEE binary16 (`__half`, `_Float16`), passed as its 16 bits.
pub const LOCKSTEP_F16: c_int = 1;
/// bfloat16 (`__nv_bfloat16`), passed as its 16 bits.
pub const LOCKSTEP_BF16: c_int = 2;
/// IEEE binary64, rounded to the nearest f32 when stored.
pub const LOCKSTEP_F64: c_int = 3;

pub const LOCKSTEP_OK: c_int = 0;
pub const LOCKSTEP_EINVAL: c_int = 1;
pub const LOCKSTEP_EIO: c_int = 2;
pub const LOCKSTEP_EINTERNAL: c_int = 3;

/// The largest rank `lockstep_dump_record` takes: the goldens' shapes are 4-D `[ne3, ne2, ne1, ne0]`.
pub const MAX_RANK: usize = 4;

/// An open dump: `lockstep_dump*` in C, opaque there.
pub struct LockstepDump {
    writer: SafetensorsTapWriter,
}

thread_local! {
    /// The message of this thread's last failed call; empty after a successful one.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // A C string cannot hold NUL: replace any (from a path, say) so the message is never lost.
    let c = CString::new(msg.replace('\0', "\u{FFFD}")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// A failure: the code to return and the message for `lockstep_last_error`.
struct Failure(c_int, String);

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(LOCKSTEP_EINVAL, msg.into())
}

/// Runs `body`, turning an error or a panic into `fail` plus the thread's last error.
fn guarded<T>(fail: T, body: impl FnOnce() -> Result<T, Failure>) -> (T, c_int) {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => {
            set_last_error("");
            (v, LOCKSTEP_OK)
        }
        Ok(Err(Failure(code, msg))) => {
            set_last_error(&msg);
            (fail, code)
        }
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
            set_last_error(&format!("lockstep-capi internal error (a bug; please report it): {what}"));
            (fail, LOCKSTEP_EINTERNAL)
        }
    }
}

fn status(body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    guarded((), body).1
}

/// Reads a NUL-terminated string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a CStr, Failure> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL (checked above); NUL-terminated and valid for the call by the caller's contract.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// Views `count` elements of `size` bytes at `p` as bytes (so any alignment is fine).
///
/// # Safety
/// `p` is NULL or points to at least `count * size` readable bytes that stay valid during the call.
unsafe fn c_bytes<'a>(p: *const c_void, count: usize, size: usize, what: &str) -> Result<&'a [u8], Failure> {
    let len = count
        .checked_mul(size)
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("{what}: {count} elements of {size} bytes overflow the address space")))?;
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL but should hold {count} elements")));
    }
    // SAFETY: not NULL, len ≤ isize::MAX (checked above), u8 has alignment 1, and the caller promises
    // `len` readable bytes that nothing writes during the call.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// The handle behind `d`.
///
/// # Safety
/// `d` is NULL or a handle from `lockstep_dump_open` not yet closed, used by one thread at a time.
unsafe fn handle<'a>(d: *mut LockstepDump, func: &str) -> Result<&'a mut LockstepDump, Failure> {
    // SAFETY: the caller's contract: NULL (handled by as_mut) or a live, exclusively used Box allocation.
    unsafe { d.as_mut() }.ok_or_else(|| invalid(format!("{func}: the dump handle is NULL")))
}

/// Opens a dump that will be written to `path` at `lockstep_dump_close`. NULL on failure.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn lockstep_dump_open(path: *const c_char) -> *mut LockstepDump {
    guarded(std::ptr::null_mut(), || {
        // SAFETY: forwarded contract of this function.
        let path = unsafe { c_str(path, "lockstep_dump_open: path") }?;
        if path.is_empty() {
            return Err(invalid("lockstep_dump_open: path is empty"));
        }
        let path = path_from_c(path)?;
        let writer = SafetensorsTapWriter::new(&path).map_err(|e| Failure(LOCKSTEP_EIO, format!("lockstep_dump_open: {e}")))?;
        Ok(Box::into_raw(Box::new(LockstepDump { writer })))
    })
    .0
}

#[cfg(unix)]
fn path_from_c(p: &CStr) -> Result<PathBuf, Failure> {
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(p.to_bytes())))
}

#[cfg(not(unix))]
fn path_from_c(p: &CStr) -> Result<PathBuf, Failure> {
    p.to_str().map(PathBuf::from).map_err(|_| invalid(format!("lockstep_dump_open: path {p:?} is not UTF-8")))
}

/// Stores the prompt's `n` token ids as the i32 tensor `tokens`.
///
/// # Safety
/// `d` as for [`lockstep_dump_record`]; `ids` is NULL or points to `n` readable `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn lockstep_dump_set_tokens(d: *mut LockstepDump, ids: *const i32, n: usize) -> c_int {
    status(|| {
        // SAFETY: forwarded contract of this function.
        let dump = unsafe { handle(d, "lockstep_dump_set_tokens") }?;
        let file = dump.writer.path().display().to_string();
        let fail = |m: String| invalid(format!("{file}: lockstep_dump_set_tokens: {m}"));
        if n == 0 {
            return Err(fail("n is 0: a prompt has at least one token".into()));
        }
        // SAFETY: forwarded contract: `n` readable int32_t at `ids`.
        let bytes = unsafe { c_bytes(ids.cast(), n, 4, "ids") }.map_err(|Failure(_, m)| fail(m))?;
        let mut out = Vec::with_capacity(n);
        for (i, c) in bytes.chunks_exact(4).enumerate() {
            let id = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            out.push(u32::try_from(id).map_err(|_| fail(format!("ids[{i}] = {id} is negative")))?);
        }
        dump.writer.set_tokens(&out).map_err(|e| invalid(format!("lockstep_dump_set_tokens: {e}")))
    })
}

/// Records tap `tap` of step `step` (stored as f32 under `s{step}/{tap}`, shape left-padded to 4-D).
///
/// # Safety
/// `d` is NULL or an open handle used by one thread at a time; `tap` is NULL or NUL-terminated;
/// `shape` is NULL or points to `rank` readable `size_t`; `data` is NULL or points to the product of
/// the shape's elements of `dtype`, readable during the call.
#[no_mangle]
pub unsafe extern "C" fn lockstep_dump_record(
    d: *mut LockstepDump,
    tap: *const c_char,
    step: u32,
    dtype: c_int,
    shape: *const usize,
    rank: usize,
    data: *const c_void,
) -> c_int {
    status(|| {
        // SAFETY: forwarded contract of this function.
        let dump = unsafe { handle(d, "lockstep_dump_record") }?;
        let file = dump.writer.path().display().to_string();
        // SAFETY: forwarded contract of this function.
        let tap = unsafe { c_str(tap, "tap") }.map_err(|Failure(_, m)| invalid(format!("{file}: lockstep_dump_record (step {step}): {m}")))?;
        let tap = tap.to_str().map_err(|_| invalid(format!("{file}: lockstep_dump_record (step {step}): tap name {tap:?} is not UTF-8")))?;
        let fail = |m: String| invalid(format!("{file}: lockstep_dump_record(s{step}/{tap}): {m}"));
        let size = match dtype {
            LOCKSTEP_F32 => 4,
            LOCKSTEP_F16 | LOCKSTEP_BF16 => 2,
            LOCKSTEP_F64 => 8,
            other => return Err(fail(format!("unknown dtype {other}: expected LOCKSTEP_F32 (0), LOCKSTEP_F16 (1), LOCKSTEP_BF16 (2) or LOCKSTEP_F64 (3)"))),
        };
        if rank > MAX_RANK {
            return Err(fail(format!("rank {rank} > {MAX_RANK}: tap shapes are 4-D [ne3, ne2, ne1, ne0] (golden/README.md)")));
        }
        // SAFETY: forwarded contract: `rank` readable size_t at `shape`.
        let dims = unsafe { c_bytes(shape.cast(), rank, size_of::<usize>(), "shape") }.map_err(|Failure(_, m)| fail(m))?;
        let mut shape4 = [1usize; MAX_RANK];
        for (i, c) in dims.chunks_exact(size_of::<usize>()).enumerate() {
            shape4[MAX_RANK - rank + i] = usize::from_ne_bytes(c.try_into().expect("chunks_exact gives size_of::<usize>() bytes"));
        }
        let count = shape4.iter().try_fold(1usize, |n, &x| n.checked_mul(x)).ok_or_else(|| fail(format!("shape {shape4:?} overflows size_t")))?;
        // SAFETY: forwarded contract: `count` readable elements of `dtype` at `data`.
        let bytes = unsafe { c_bytes(data, count, size, "data") }.map_err(|Failure(_, m)| fail(format!("{m} (shape {shape4:?})")))?;
        let values = to_f32(bytes, dtype);
        dump.writer.record(step as usize, tap, shape4, &values).map_err(|e| invalid(format!("lockstep_dump_record: {e}")))
    })
}

/// Native-endian `bytes` of `dtype` as f32 (f16/bf16 exactly, f64 rounded to nearest).
fn to_f32(bytes: &[u8], dtype: c_int) -> Vec<f32> {
    match dtype {
        LOCKSTEP_F32 => bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect(),
        LOCKSTEP_F16 => bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect(),
        LOCKSTEP_BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect(),
        LOCKSTEP_F64 => bytes.chunks_exact(8).map(|c| f64::from_ne_bytes(c.try_into().expect("chunks_exact gives 8 bytes")) as f32).collect(),
        _ => unreachable!("dtype checked by the caller"),
    }
}

/// Writes the dump (temporary file + rename) and frees the handle, also when writing fails.
///
/// # Safety
/// `d` is NULL or an open handle; it is invalid after this call.
#[no_mangle]
pub unsafe extern "C" fn lockstep_dump_close(d: *mut LockstepDump) -> c_int {
    status(|| {
        if d.is_null() {
            return Err(invalid("lockstep_dump_close: the dump handle is NULL"));
        }
        // SAFETY: not NULL, and by contract a live handle from Box::into_raw in lockstep_dump_open that
        // the caller gives up now; the Box is dropped (freed) on every path below.
        let dump = unsafe { Box::from_raw(d) };
        dump.writer.finish().map_err(|e| Failure(LOCKSTEP_EIO, format!("lockstep_dump_close: {e}")))
    })
}

/// Frees the handle without writing anything (the engine failed half-way, say).
///
/// # Safety
/// `d` is NULL or an open handle; it is invalid after this call.
#[no_mangle]
pub unsafe extern "C" fn lockstep_dump_discard(d: *mut LockstepDump) -> c_int {
    status(|| {
        if d.is_null() {
            return Err(invalid("lockstep_dump_discard: the dump handle is NULL"));
        }
        // SAFETY: as in lockstep_dump_close: a live Box allocation, freed here (its temporary file removed).
        drop(unsafe { Box::from_raw(d) });
        Ok(())
    })
}

/// This thread's last error message, `""` after a successful call; never NULL. Valid until the next
/// `lockstep_*` call on this thread other than `lockstep_last_error`.
#[no_mangle]
pub extern "C" fn lockstep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: lockstep_last_error never returns NULL and the string lives until the next call.
        unsafe { CStr::from_ptr(lockstep_last_error()) }.to_string_lossy().into_owned()
    }

    fn open(dir: &tempfile::TempDir) -> *mut LockstepDump {
        let p = CString::new(dir.path().join("d.safetensors").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        let d = unsafe { lockstep_dump_open(p.as_ptr()) };
        assert!(!d.is_null(), "{}", last_error());
        d
    }

    #[test]
    fn null_pointers_are_errors_not_crashes() {
        let tap = CString::new("embd").unwrap();
        let x = [1.0f32];
        // SAFETY: every pointer is NULL or valid; NULLs are what is tested.
        unsafe {
            assert!(lockstep_dump_open(std::ptr::null()).is_null());
            assert!(last_error().contains("path is NULL"), "{}", last_error());
            assert_eq!(lockstep_dump_close(std::ptr::null_mut()), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_discard(std::ptr::null_mut()), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_set_tokens(std::ptr::null_mut(), [1].as_ptr(), 1), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_record(std::ptr::null_mut(), tap.as_ptr(), 0, LOCKSTEP_F32, std::ptr::null(), 0, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("handle is NULL"), "{}", last_error());
        }
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        let shape = [1usize];
        // SAFETY: d is open; NULL arguments are what is tested.
        unsafe {
            assert_eq!(lockstep_dump_record(d, std::ptr::null(), 0, LOCKSTEP_F32, shape.as_ptr(), 1, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, std::ptr::null(), 1, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("shape is NULL"), "{}", last_error());
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, shape.as_ptr(), 1, std::ptr::null()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("data is NULL"), "{}", last_error());
            assert_eq!(lockstep_dump_set_tokens(d, std::ptr::null(), 3), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_discard(d), LOCKSTEP_OK);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "discard writes nothing and removes the temporary file");
    }

    #[test]
    fn bad_arguments_leave_the_handle_usable() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        let tap = CString::new("embd").unwrap();
        let x = [1.0f32; 4];
        // SAFETY: d is open, every pointer valid for the lengths passed.
        unsafe {
            let s5 = [1usize; 5];
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, s5.as_ptr(), 5, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("rank 5 > 4") && last_error().contains("s0/embd") && last_error().contains("d.safetensors"), "{}", last_error());
            let s = [2usize, 2];
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, 9, s.as_ptr(), 2, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("unknown dtype 9"), "{}", last_error());
            let huge = [usize::MAX, 2];
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, huge.as_ptr(), 2, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("overflows"), "{}", last_error());
            let slash = CString::new("s0/embd").unwrap();
            assert_eq!(lockstep_dump_record(d, slash.as_ptr(), 0, LOCKSTEP_F32, s.as_ptr(), 2, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert_eq!(lockstep_dump_set_tokens(d, [5, -1].as_ptr(), 2), LOCKSTEP_EINVAL);
            assert!(last_error().contains("ids[1] = -1 is negative"), "{}", last_error());
            assert_eq!(lockstep_dump_set_tokens(d, [5].as_ptr(), 0), LOCKSTEP_EINVAL);
            // still usable: a good record succeeds and clears the error
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, s.as_ptr(), 2, x.as_ptr().cast()), LOCKSTEP_OK);
            assert_eq!(last_error(), "");
            assert_eq!(lockstep_dump_record(d, tap.as_ptr(), 0, LOCKSTEP_F32, s.as_ptr(), 2, x.as_ptr().cast()), LOCKSTEP_EINVAL);
            assert!(last_error().contains("recorded twice"), "{}", last_error());
            assert_eq!(lockstep_dump_close(d), LOCKSTEP_OK);
        }
        let bytes = std::fs::read(dir.path().join("d.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names(), ["s0/embd"]);
        assert_eq!(st.tensor("s0/embd").unwrap().shape(), [1, 1, 2, 2]);
    }

    #[test]
    fn unaligned_data_and_every_dtype_convert_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        // f64 values at an odd address: read byte-wise, no alignment assumed
        let vals = [0.1f64, -2.5, 1e-40];
        let mut buf = [0u8; 1 + 24];
        for (i, v) in vals.iter().enumerate() {
            buf[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_ne_bytes());
        }
        let bf = [half::bf16::from_f32(-1.5).to_bits(), half::bf16::from_f32(3.0e38).to_bits()];
        let tap = CString::new("l_out-0").unwrap();
        let tap2 = CString::new("kq-0").unwrap();
        // SAFETY: d open; buf has 24 bytes from offset 1; bf has 2 u16.
        unsafe {
            assert_eq!(
                lockstep_dump_record(d, tap.as_ptr(), 2, LOCKSTEP_F64, [3usize].as_ptr(), 1, buf.as_ptr().add(1).cast()),
                LOCKSTEP_OK,
                "{}",
                last_error()
            );
            assert_eq!(lockstep_dump_record(d, tap2.as_ptr(), 0, LOCKSTEP_BF16, [2usize].as_ptr(), 1, bf.as_ptr().cast()), LOCKSTEP_OK, "{}", last_error());
            assert_eq!(lockstep_dump_close(d), LOCKSTEP_OK, "{}", last_error());
        }
        let bytes = std::fs::read(dir.path().join("d.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f = |k: &str| -> Vec<f32> { st.tensor(k).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
        assert_eq!(f("s2/l_out-0"), [0.1f64 as f32, -2.5, 1e-40f64 as f32]);
        assert_eq!(f("s0/kq-0"), [-1.5, half::bf16::from_f32(3.0e38).to_f32()]);
    }

    #[test]
    fn a_missing_directory_fails_at_open_naming_the_path() {
        let p = CString::new("/nonexistent-lockstep-dir/x/d.safetensors").unwrap();
        // SAFETY: a valid C string.
        assert!(unsafe { lockstep_dump_open(p.as_ptr()) }.is_null());
        assert!(last_error().contains("/nonexistent-lockstep-dir/x/d.safetensors"), "{}", last_error());
    }
}
