/* unihal's value checks in compiled code: whether every element of some integer tensors lies in
 * a range, for hal.compiled_checks. One call checks several tensors, because on the host path of
 * an operator the cost that matters is the call from Python (about 0.4 us through ctypes, where a
 * torch reduction with its two item() reads costs about 2.5 us), not the reading of the values.
 *
 * spec holds five int64 per tensor: its first element's address, its element count (the tensor is
 * contiguous), its element size in bytes (4: int32, 8: int64), and the bounds low and high of the
 * range [low, high). The loops keep a running minimum and maximum without branches, which
 * compilers vectorise; the bounds are compared once at the end. */
#include <stdint.h>

#define RANGE_OF(type, lowest, highest)                                      \
    static int outside_##type(const type *v, int64_t count, int64_t low, int64_t high) { \
        type smallest = highest, largest = lowest;                           \
        for (int64_t i = 0; i < count; i++) {                                \
            smallest = v[i] < smallest ? v[i] : smallest;                    \
            largest = v[i] > largest ? v[i] : largest;                       \
        }                                                                    \
        return count > 0 && ((int64_t)smallest < low || (int64_t)largest >= high); \
    }

RANGE_OF(int32_t, INT32_MIN, INT32_MAX)
RANGE_OF(int64_t, INT64_MIN, INT64_MAX)

/* Whether one of count values of size bytes (4: int32, 8: int64) at values lies outside
 * [low, high): 1 or 0; -1 for another size. */
static int outside(const void *values, int64_t size, int64_t count, int64_t low, int64_t high) {
    if (size == 4)
        return outside_int32_t((const int32_t *)values, count, low, high);
    if (size == 8)
        return outside_int64_t((const int64_t *)values, count, low, high);
    return -1;
}

/* 1 + the position of the first tensor holding a value outside its range; 0 when none does;
 * -1 - the position of a tensor whose element size is neither 4 nor 8. */
int hal_first_outside(int n, const int64_t *spec) {
    for (int t = 0; t < n; t++) {
        const int64_t *s = spec + 5 * t;
        int bad = outside((const void *)(intptr_t)s[0], s[2], s[1], s[3], s[4]);
        if (bad)
            return bad < 0 ? -1 - t : t + 1;
    }
    return 0;
}

/* hal_first_outside for tensors whose layouts were checked before (a remembered argument layout
 * fixes their dtypes, element counts and bounds): addresses holds each tensor's first element's
 * address, fixed four int64 per tensor (count, element size, low, high), so that a call passes
 * only what changes. A tensor of count 0 is not read (an optional argument not given). Returns as
 * hal_first_outside. */
int hal_first_outside_fixed(int n, const int64_t *addresses, const int64_t *fixed) {
    for (int t = 0; t < n; t++) {
        const int64_t *s = fixed + 4 * t;
        int bad = outside((const void *)(intptr_t)addresses[t], s[1], s[0], s[2], s[3]);
        if (bad)
            return bad < 0 ? -1 - t : t + 1;
    }
    return 0;
}

/* DeepGEMM's contiguous layout of grouped rows, checked in one pass: spec holds the address of
 * ids (int32 [m], contiguous), m, the alignment, the group count G, and the address of firsts
 * (int32 [m / alignment]). Each aligned block must be one group's rows followed only by -1
 * padding: every row after a block's first equals the row before it or is -1, so that the first
 * row's id, in [-1, G), is the only id a block holds. Returns 0 and each block's first id in
 * firsts when the layout is that; 1 otherwise (the caller's checks then name what is wrong). */
int hal_contiguous_blocks(const int64_t *spec) {
    const int32_t *ids = (const int32_t *)(intptr_t)spec[0];
    int64_t m = spec[1], align = spec[2], groups = spec[3];
    int32_t *firsts = (int32_t *)(intptr_t)spec[4];
    if (align <= 0 || m % align)
        return 1;
    for (int64_t b = 0; b < m / align; b++) {
        const int32_t *row = ids + b * align;
        int broken = row[0] < -1 || row[0] >= groups;
        for (int64_t i = 1; i < align; i++)
            broken |= (row[i] != -1) & (row[i] != row[i - 1]);
        if (broken)
            return 1;
        firsts[b] = row[0];
    }
    return 0;
}

/* A paged batch's lengths and the pages they read, in one pass: spec holds the address of the
 * table ([rows][cols], contiguous, elements of table_size bytes: 4 or 8), rows, cols, table_size,
 * the address of the lengths ([rows][k] int32, contiguous: a row is read up to the longest of its
 * k lengths), k, most, high and per_entry. Returns 1 when every length lies in [0, most] and every
 * entry a row reads (the first ceil(length / per_entry) of its row) lies in [0, high); 0
 * otherwise (the caller's checks then name what is wrong). */
int hal_pages_within(const int64_t *spec) {
    const char *table = (const char *)(intptr_t)spec[0];
    int64_t rows = spec[1], cols = spec[2], table_size = spec[3];
    const int32_t *lengths = (const int32_t *)(intptr_t)spec[4];
    int64_t k = spec[5], most = spec[6], high = spec[7], per_entry = spec[8];
    if (per_entry <= 0 || (table_size != 4 && table_size != 8))
        return 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t longest = 0;
        for (int64_t j = 0; j < k; j++) {
            int64_t length = lengths[r * k + j];
            if (length < 0 || length > most)
                return 0;
            longest = length > longest ? length : longest;
        }
        int64_t used = (longest + per_entry - 1) / per_entry;
        used = used < cols ? used : cols;
        if (outside(table + r * cols * table_size, table_size, used, 0, high))
            return 0;
    }
    return 1;
}
