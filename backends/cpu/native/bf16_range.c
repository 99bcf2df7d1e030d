/* Whether a bf16 matrix holds a nonzero value below 2^-56 in magnitude, for the cpu backend of
 * unihal (hal.backends.cpu.gemm_bf16).
 *
 * Why: torch's bf16 matmul on CPUs (oneDNN: AVX-512 BF16 vdpbf16ps, or AMX tdpbf16ps) treats
 * subnormal inputs as zero and flushes subnormal results, where DeepGEMM's BF16 GEMM contract is
 * exact products summed in fp32. If every nonzero |a| and |b| is at least 2^-56, each value is a
 * multiple of 2^-63 (8 significant bits), each product a multiple of 2^-126, and so is every partial
 * sum in fp32 (below 2^-103 such a multiple is exact in fp32; above, fp32's own spacing is coarser):
 * no product or partial sum is ever subnormal, nothing is flushed, and the bf16 matmul computes
 * the contract's sums (in its own order, which the contract leaves open). Otherwise the caller
 * takes the fp32 path.
 *
 * Built with the other native kernels (cc -O3 -march=native ...) and called through ctypes.
 * Self-contained: the exported symbol is prefixed hal_bf16_, all else is static. Plain C written
 * for the compiler to vectorise: one pass, a bit OR per element, at memory speed (4096 x 7168 on the
 * 2-core Zen 5 host: 0.8 ms; the same test as torch elementwise ops 53-67 ms, half of the
 * m = 4096, n = 2112, k = 7168 GEMM itself).
 */

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* bf16 magnitudes (bits & 0x7fff) 1 .. TINY_BELOW - 1 are the nonzero values below 2^-56: exponent
 * field < 127 - 56 = 71. Zero (0) and everything from 2^-56 up, inf and NaN included, are not. */
#define TINY_BELOW (71u << 7)

static int row_has_tiny(const uint16_t *restrict x, int64_t n) {
    unsigned any = 0;
    for (int64_t i = 0; i < n; i++) any |= (uint16_t)((x[i] & 0x7fffu) - 1u) < (uint16_t)(TINY_BELOW - 1u);
    return any != 0;
}

/* x: rows x cols bf16 bits, row r at x + r * ld. Returns 1 if some element is tiny, else 0. */
int hal_bf16_has_tiny(const uint16_t *x, int64_t rows, int64_t cols, int64_t ld, int threads) {
    int found = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) reduction(| : found) if (rows * cols >= (1 << 20))
#else
    (void)threads;
#endif
    for (int64_t r = 0; r < rows; r++) found |= row_has_tiny(x + r * ld, cols);
    return found;
}
