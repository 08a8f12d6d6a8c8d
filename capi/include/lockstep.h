/*
 * lockstep.h: write a tap dump from a C, C++ or CUDA engine, for `lockstep compare`.
 *
 * A dump is a safetensors file in the goldens' naming (golden/README.md of the lockstep repository):
 * every tap is an f32 tensor under the key "s{step}/{tap}" with a 4-D shape [ne3, ne2, ne1, ne0]
 * (row-major, ggml's ne reversed; step 0 is the prefill of the prompt, step k the k-th single-token
 * decode step), and the prompt's token ids are the int32 tensor "tokens". Judge it with
 *
 *     lockstep compare --dump dump.safetensors --golden qwen2.5-coder-0.5b/exact/code
 *
 * Library: liblockstep_capi.so, built by `cargo build --release -p lockstep-capi` into target/release/.
 * Link with -L<dir> -llockstep_capi (and -Wl,-rpath,<dir> or LD_LIBRARY_PATH at run time).
 *
 *     lockstep_dump *d = lockstep_dump_open("dump.safetensors");
 *     if (!d) { fprintf(stderr, "%s\n", lockstep_last_error()); return 1; }
 *     lockstep_dump_set_tokens(d, prompt_ids, n_prompt);
 *     size_t shape[2] = {n_tokens, n_embd};
 *     lockstep_dump_record(d, "attn_norm-0", 0, LOCKSTEP_F32, shape, 2, host_ptr);
 *     ...
 *     if (lockstep_dump_close(d) != 0) fprintf(stderr, "%s\n", lockstep_last_error());
 *
 * Data pointers are host memory: copy device buffers to the host first (cudaMemcpy). Nothing in the
 * file is written before lockstep_dump_close, which writes a temporary file in the same directory and
 * renames it into place, so a dump is complete or absent.
 *
 * Errors: every function that can fail returns 0 (LOCKSTEP_OK) on success and a nonzero code on
 * failure (lockstep_dump_open returns NULL); lockstep_last_error() then says what and where. NULL
 * pointers and bad arguments are reported, never crash. A failed call records nothing and leaves the
 * handle usable.
 *
 * Threads: a handle must be used by one thread at a time; different handles are independent. The
 * last error is per thread.
 */
#ifndef LOCKSTEP_H
#define LOCKSTEP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An open dump. Opaque. */
typedef struct lockstep_dump lockstep_dump;

/* The element type of the data passed to lockstep_dump_record. Everything is stored as f32. */
enum lockstep_dtype {
    LOCKSTEP_F32 = 0,  /* IEEE binary32 (float) */
    LOCKSTEP_F16 = 1,  /* IEEE binary16 (__half, _Float16), 2 bytes each; converted exactly */
    LOCKSTEP_BF16 = 2, /* bfloat16 (__nv_bfloat16), 2 bytes each; converted exactly */
    LOCKSTEP_F64 = 3   /* IEEE binary64 (double); rounded to the nearest f32 */
};

/* Return codes. */
enum lockstep_status {
    LOCKSTEP_OK = 0,        /* success */
    LOCKSTEP_EINVAL = 1,    /* a NULL pointer or a bad argument; nothing recorded, the handle still usable */
    LOCKSTEP_EIO = 2,       /* the file could not be created or written */
    LOCKSTEP_EINTERNAL = 3  /* a bug in lockstep (caught); please report lockstep_last_error() */
};

/* Opens a dump to be written to `path` (a new file or one to replace). Creates the temporary file in
 * path's directory now, so a missing or read-only directory fails here, before the engine runs.
 * Returns NULL on failure (see lockstep_last_error()). */
lockstep_dump *lockstep_dump_open(const char *path);

/* Stores the prompt's token ids (n >= 1, each >= 0) as the int32 tensor "tokens" [n]. Once per dump.
 * Without it `lockstep compare` cannot check the tokenizer and says so. */
int lockstep_dump_set_tokens(lockstep_dump *d, const int32_t *ids, size_t n);

/* Records one tap: `data` holds shape[0] * ... * shape[rank-1] elements of `dtype` (enum
 * lockstep_dtype), row-major, last index fastest, at any alignment. rank <= 4; the shape is
 * left-padded with 1s to 4-D ({tokens, width} becomes [1, 1, tokens, width]); rank 0 is one value
 * (shape may then be NULL). `tap` is llama.cpp's name inside the step, e.g. "Qcur-0.rope", "kq-3",
 * "l_out-23", "result_output" (no "s{step}/" prefix, no '/'); each (step, tap) once. The data is
 * copied: the caller may reuse its buffer when the call returns. */
int lockstep_dump_record(lockstep_dump *d, const char *tap, uint32_t step, int dtype,
                         const size_t *shape, size_t rank, const void *data);

/* Writes the file (temporary file in the same directory, then rename) and frees `d`, also when the
 * write fails. `d` is invalid afterwards. */
int lockstep_dump_close(lockstep_dump *d);

/* Frees `d` without writing anything (e.g. the engine failed half-way). `d` is invalid afterwards. */
int lockstep_dump_discard(lockstep_dump *d);

/* This thread's last error message: "" after a successful call, never NULL. The string stays valid
 * until the next lockstep_* call on this thread other than lockstep_last_error(). */
const char *lockstep_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LOCKSTEP_H */
