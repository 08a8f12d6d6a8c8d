/*
 * record.c: a C engine's view of lockstep.h, run by capi/tests/c_program.rs.
 *
 *     record OUT.safetensors MISSING_DIR/x.safetensors
 *
 * Records a few taps of two steps in each dtype plus the prompt's tokens into OUT, and checks that
 * bad calls fail with a message and leave the handle usable. Prints one line per expected error
 * ("expected error: <message>") and "record.c: ok" at the end; exits 1 at the first unexpected
 * result. The Rust test reads OUT back and checks every value.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lockstep.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "record.c:%d: check failed: %s (last error: %s)\n", __LINE__, \
                    #cond, lockstep_last_error());                                       \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* A call that must fail with a nonzero code and a non-empty message. */
#define EXPECT_FAIL(call)                                             \
    do {                                                              \
        int rc_ = (call);                                             \
        CHECK(rc_ != LOCKSTEP_OK);                                    \
        CHECK(lockstep_last_error()[0] != '\0');                      \
        printf("expected error: %d %s\n", rc_, lockstep_last_error()); \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s OUT.safetensors MISSING_DIR/x.safetensors\n", argv[0]);
        return 2;
    }

    /* Failures before any handle exists. */
    CHECK(lockstep_dump_open(argv[2]) == NULL);
    CHECK(strstr(lockstep_last_error(), argv[2]) != NULL);
    printf("expected error: open %s\n", lockstep_last_error());
    CHECK(lockstep_dump_open(NULL) == NULL);
    printf("expected error: open %s\n", lockstep_last_error());
    EXPECT_FAIL(lockstep_dump_close(NULL));

    lockstep_dump *d = lockstep_dump_open(argv[1]);
    CHECK(d != NULL);
    CHECK(strcmp(lockstep_last_error(), "") == 0);

    const int32_t tokens[3] = {9707, 11, 1879};
    CHECK(lockstep_dump_set_tokens(d, tokens, 3) == LOCKSTEP_OK);

    /* s0/embd: f32 [3, 4] -> [1, 1, 3, 4]; value i*0.25 - 1 */
    float embd[12];
    for (int i = 0; i < 12; i++) embd[i] = (float)i * 0.25f - 1.0f;
    const size_t embd_shape[2] = {3, 4};
    CHECK(lockstep_dump_record(d, "embd", 0, LOCKSTEP_F32, embd_shape, 2, embd) == LOCKSTEP_OK);

    /* s0/Qcur-0.rope: f16 [3, 2, 2] -> [1, 3, 2, 2], as a CUDA engine holds __half:
     * 1, -2, 0.5, 65504 (largest f16), 2^-24 (smallest subnormal), -0, 0.099975586 (0x2E66), 3 ... */
    const uint16_t qcur[12] = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000,
                               0x2E66, 0x4200, 0x3C00, 0x3C00, 0xBC00, 0x0000};
    const size_t qcur_shape[3] = {3, 2, 2};
    CHECK(lockstep_dump_record(d, "Qcur-0.rope", 0, LOCKSTEP_F16, qcur_shape, 3, qcur) == LOCKSTEP_OK);

    /* s0/kq-0: bf16 [1, 2, 3, 3], values 1, -1.5, 3.140625 repeated */
    uint16_t kq[18];
    const uint16_t kq_vals[3] = {0x3F80, 0xBFC0, 0x4049};
    for (int i = 0; i < 18; i++) kq[i] = kq_vals[i % 3];
    const size_t kq_shape[4] = {1, 2, 3, 3};
    CHECK(lockstep_dump_record(d, "kq-0", 0, LOCKSTEP_BF16, kq_shape, 4, kq) == LOCKSTEP_OK);

    /* s1/l_out-0: f64 [1, 4] -> [1, 1, 1, 4], rounded to f32 */
    const double l_out[4] = {0.1, -3.5, 1e-3, 7.0e-40};
    const size_t l_out_shape[2] = {1, 4};
    CHECK(lockstep_dump_record(d, "l_out-0", 1, LOCKSTEP_F64, l_out_shape, 2, l_out) == LOCKSTEP_OK);

    /* s1/result_norm: rank 0, one value, shape NULL -> [1, 1, 1, 1] */
    const float one = 42.0f;
    CHECK(lockstep_dump_record(d, "result_norm", 1, LOCKSTEP_F32, NULL, 0, &one) == LOCKSTEP_OK);

    /* Bad calls: each fails, records nothing, and the handle stays usable. */
    const size_t rank5[5] = {1, 1, 1, 1, 1};
    EXPECT_FAIL(lockstep_dump_record(d, "embd", 2, LOCKSTEP_F32, rank5, 5, embd));
    EXPECT_FAIL(lockstep_dump_record(d, "embd", 2, 7, embd_shape, 2, embd));
    EXPECT_FAIL(lockstep_dump_record(d, "embd", 2, LOCKSTEP_F32, embd_shape, 2, NULL));
    EXPECT_FAIL(lockstep_dump_record(d, NULL, 2, LOCKSTEP_F32, embd_shape, 2, embd));
    EXPECT_FAIL(lockstep_dump_record(d, "s2/embd", 2, LOCKSTEP_F32, embd_shape, 2, embd));
    EXPECT_FAIL(lockstep_dump_record(d, "embd", 0, LOCKSTEP_F32, embd_shape, 2, embd)); /* twice */
    EXPECT_FAIL(lockstep_dump_record(NULL, "embd", 2, LOCKSTEP_F32, embd_shape, 2, embd));
    const int32_t negative[2] = {5, -7};
    EXPECT_FAIL(lockstep_dump_set_tokens(d, negative, 2));
    EXPECT_FAIL(lockstep_dump_set_tokens(d, tokens, 3)); /* tokens twice */

    /* still usable after the errors */
    CHECK(lockstep_dump_record(d, "embd", 1, LOCKSTEP_F32, embd_shape, 2, embd) == LOCKSTEP_OK);
    CHECK(strcmp(lockstep_last_error(), "") == 0);

    CHECK(lockstep_dump_close(d) == LOCKSTEP_OK);
    printf("record.c: ok\n");
    return 0;
}
