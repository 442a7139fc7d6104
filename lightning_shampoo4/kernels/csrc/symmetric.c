/* Rows r0 .. r1-1 of a symmetric matrix stored as an fp32 diagonal plus its 4- or 8-bit strict
 * upper triangle (lightning_shampoo4.quant.blockwise, "Symmetric storage"), written as dense fp32.
 *
 * Layout: triangle row t (0 .. n-2) holds x[t, t+1:], n-1-t values starting at flat element
 * S_t = sum_{k<t} (n-1-k); it is cut into blocks of `block` values, each with one fp32 scale,
 * the blocks of row t starting at scale B_t = sum_{k<t} ceil((n-1-k) / block), fp32 or bf16. With 4 bits, flat
 * element p is the low nibble of byte p/2 when p is even, the high nibble when odd; with 8 bits,
 * byte p. A value is
 * lut[code] * scale, one fp32 multiply: the same rounding as the torch reference, so the result
 * is bit-identical to it.
 *
 * Entries right of the diagonal of row i are triangle row i read in order; entries left of it
 * (x[i, j] = x[j, i], j < i) are column i of the triangle: they are decoded 16 triangle rows at a
 * time into a small tile and written transposed, so every read and write stays sequential.
 * With AVX-512 a 4-bit codebook's 16 values sit in one register and 16 codes are looked up at once.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define TILE 16   /* triangle rows per tile of the left part */
#define WIDTH 64  /* output rows rebuilt together (64 rows of order 1024: 256 KiB) */

#ifdef __AVX512F__
/* The codes of flat elements q .. q+15 as 16 bytes, from `bytes` loaded at byte q/2. */
static inline __m128i nibbles(__m128i bytes, int64_t q) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i nib = _mm_unpacklo_epi8(lo, hi); /* elements 2*(q/2) .. 2*(q/2)+15 in order */
    return (q & 1) ? _mm_alignr_epi8(_mm_unpackhi_epi8(lo, hi), nib, 1) : nib;
}
#endif

/* dst[k] = lut[4-bit code of flat element p + k] * s, k = 0 .. len-1 */
static void decode_run4(const uint8_t *codes, int64_t p, int64_t len, float s, const float *lut, float *dst) {
    int64_t k = 0;
#ifdef __AVX512F__
    const __m512 vlut = _mm512_loadu_ps(lut);
    const __m512 vs = _mm512_set1_ps(s);
    for (; k + 16 <= len; k += 16) {
        const int64_t q = p + k;
        const uint8_t *b = codes + (q >> 1);
        __m128i bytes = _mm_loadl_epi64((const __m128i *)b); /* 8 bytes: elements q .. q+15 if q is even */
        if (q & 1) bytes = _mm_insert_epi8(bytes, b[8], 8);  /* odd q: element q+15 is in the 9th byte */
        const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles(bytes, q)), vlut);
        _mm512_storeu_ps(dst + k, _mm512_mul_ps(v, vs));
    }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (k < len) { /* the last 1 .. 15 elements: only their bytes are read, only theirs written */
        const int64_t q = p + k, rem = len - k;
        const int64_t nbytes = ((q + rem - 1) >> 1) - (q >> 1) + 1;
        const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1u), codes + (q >> 1));
        const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles(bytes, q)), vlut);
        _mm512_mask_storeu_ps(dst + k, (__mmask16)((1u << rem) - 1u), _mm512_mul_ps(v, vs));
        return;
    }
#endif
#endif
    for (; k < len; ++k) {
        const int64_t q = p + k;
        dst[k] = lut[(codes[q >> 1] >> ((q & 1) << 2)) & 0x0F] * s;
    }
}

/* dst[k] = lut[8-bit code of flat element p + k] * s, k = 0 .. len-1 (a 256-entry table) */
static void decode_run8(const uint8_t *codes, int64_t p, int64_t len, float s, const float *lut, float *dst) {
    int64_t k = 0;
#ifdef __AVX512F__
    const __m512 vs = _mm512_set1_ps(s);
    for (; k + 16 <= len; k += 16) {
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + p + k)));
        _mm512_storeu_ps(dst + k, _mm512_mul_ps(_mm512_i32gather_ps(idx, lut, 4), vs));
    }
#endif
    for (; k < len; ++k) dst[k] = lut[codes[p + k]] * s;
}

static void decode_run(int bits, const uint8_t *codes, int64_t p, int64_t len, float s, const float *lut,
                       float *dst) {
    if (bits == 4)
        decode_run4(codes, p, len, s, lut, dst);
    else
        decode_run8(codes, p, len, s, lut, dst);
}

/* Scale i: fp32, or bf16 (the upper half of an fp32, so widening it is exact). */
static inline float scale_at(const void *scales, int bf16, int64_t i) {
    if (!bf16) return ((const float *)scales)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)scales)[i] << 16;
    float s;
    memcpy(&s, &bits, sizeof s);
    return s;
}

/* Values at positions a .. b-1 of triangle row t (flat start S, first scale B) into dst. */
static void decode_row(int bits, const uint8_t *codes, const void *scales, int bf16, const float *lut,
                       int64_t block, int64_t S, int64_t B, int64_t a, int64_t b, float *dst) {
#ifdef __AVX512F__
    if (bits == 4 && block >= 16 && b - a >= 16) {
        /* 16 values at a time whatever the blocks: a run of 16 crosses at most one block end,
         * where the lanes past it take the next block's scale */
        const __m512 vlut = _mm512_loadu_ps(lut);
        int64_t blk = a / block, next = (blk + 1) * block, pos = a;
        for (; pos + 16 <= b; pos += 16) {
            __m512 vs = _mm512_set1_ps(scale_at(scales, bf16, B + blk));
            if (pos + 16 >= next) {
                if (pos + 16 > next)
                    vs = _mm512_mask_blend_ps((__mmask16)(0xFFFFu << (next - pos)), vs,
                                              _mm512_set1_ps(scale_at(scales, bf16, B + blk + 1)));
                ++blk;
                next += block;
            }
            const int64_t q = S + pos;
            const uint8_t *bytes = codes + (q >> 1);
            __m128i raw = _mm_loadl_epi64((const __m128i *)bytes);
            if (q & 1) raw = _mm_insert_epi8(raw, bytes[8], 8);
            const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles(raw, q)), vlut);
            _mm512_storeu_ps(dst + (pos - a), _mm512_mul_ps(v, vs));
        }
        dst += pos - a;
        a = pos;
    }
#endif
    for (int64_t pos = a; pos < b;) {
        const int64_t blk = pos / block;
        int64_t end = (blk + 1) * block;
        if (end > b) end = b;
        decode_run(bits, codes, S + pos, end - pos, scale_at(scales, bf16, B + blk), lut, dst + (pos - a));
        pos = end;
    }
}

static int64_t blocks_of(int64_t len, int64_t block) { return (len + block - 1) / block; }

void ls4_symmetric_rows(int64_t bits, const uint8_t *codes, const void *scales, int64_t bf16_scales,
                        const float *diag, const float *lut,
                        int64_t n, int64_t block, int64_t r0, int64_t r1, float *out, int64_t ld) {
    float tile[TILE * WIDTH];
    int64_t Su = 0, Bu = 0; /* flat start and first scale of triangle row i, the next output row */
    for (int64_t t = 0; t < r0; ++t) {
        Su += n - 1 - t;
        Bu += blocks_of(n - 1 - t, block);
    }
    /* WIDTH output rows at a time, left part then right part, so they are written while cached */
    for (int64_t i0 = r0; i0 < r1; i0 += WIDTH) {
        const int64_t i1 = (i0 + WIDTH < r1) ? i0 + WIDTH : r1;
        int64_t S = 0, B = 0; /* of triangle row j */
        /* left of the diagonal: x[i, j] for j < i, from triangle rows j = 0 .. i1-2 */
        for (int64_t j0 = 0; j0 < i1 - 1; j0 += TILE) {
            const int64_t jn = (j0 + TILE < i1 - 1) ? TILE : i1 - 1 - j0;
            for (int64_t jj = 0; jj < jn; ++jj) { /* tile[jj][i - i0] = x[j, i] for j < i */
                const int64_t j = j0 + jj, ia = (i0 > j + 1) ? i0 : j + 1;
                if (ia < i1) decode_row(bits, codes, scales, bf16_scales, lut, block, S, B, ia - j - 1, i1 - j - 1, tile + jj * WIDTH + (ia - i0));
                S += n - 1 - j;
                B += blocks_of(n - 1 - j, block);
            }
            for (int64_t i = (i0 > j0 + 1 ? i0 : j0 + 1); i < i1; ++i) {
                float *row = out + (i - r0) * ld + j0;
                int64_t valid = i - j0; /* tile rows j0 + jj with j0 + jj < i */
                if (valid > jn) valid = jn;
#ifdef __AVX512F__
                const __m512i vidx = _mm512_add_epi32(
                    _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32(WIDTH)),
                    _mm512_set1_epi32((int)(i - i0)));
                const __mmask16 m = (__mmask16)((1u << valid) - 1u);
                _mm512_mask_storeu_ps(row, m, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, vidx, tile, 4));
#else
                for (int64_t jj = 0; jj < valid; ++jj) row[jj] = tile[jj * WIDTH + (i - i0)];
#endif
            }
        }
        /* the diagonal and right of it: triangle row i read in order */
        for (int64_t i = i0; i < i1; ++i) {
            float *row = out + (i - r0) * ld;
            row[i] = diag[i];
            if (i < n - 1) decode_row(bits, codes, scales, bf16_scales, lut, block, Su, Bu, 0, n - 1 - i, row + i + 1);
            Su += n - 1 - i;
            Bu += blocks_of(n - 1 - i, block);
        }
    }
}

/* ---- the row-block layout (lightning_shampoo4.quant.blockwise.quantize) ---------------------
 * rows x cols values, flat element r * cols + c; each row cut into blocks of `block` values with
 * one scale each (scale r * ceil(cols / block) + c / block); written as dense fp32 rows r0 .. r1-1. */
void ls4_dequantize_rows(int64_t bits, const uint8_t *codes, const void *scales, int64_t bf16_scales,
                         const float *lut, int64_t cols, int64_t block, int64_t r0, int64_t r1, float *out) {
    const int64_t per_row = blocks_of(cols, block);
    for (int64_t r = r0; r < r1; ++r)
        decode_row(bits, codes, scales, bf16_scales, lut, block, r * cols, r * per_row, 0, cols, out + (r - r0) * cols);
}

/* ---- quantizing: the strict upper triangle of x into codes and one scale per block ---------- */

/* The nearest bf16 (ties to even) as the upper half of an fp32: the rounding of Tensor.to(bfloat16). */
static inline uint32_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

/* The codebook index of normalized value v: how many of the nm sorted midpoints lie strictly
 * below it (mids holds them padded with +inf to `size`, a power of two). */
static inline int code_of(float v, const float *mids, int size) {
    int idx = 0;
    for (int step = size >> 1; step > 0; step >>= 1)
        if (mids[idx + step - 1] < v) idx += step;
    return idx;
}

#ifdef __AVX512F__
/* code_of for 16 values; a 4-bit codebook's padded midpoints sit in one register */
static inline __m512i codes_of16(__m512 v, const float *mids, int size) {
    __m512i idx = _mm512_setzero_si512();
    if (size == 16) {
        const __m512 vm = _mm512_loadu_ps(mids);
        for (int step = 8; step > 0; step >>= 1) {
            const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
            const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(probe, vm), v, _CMP_LT_OQ);
            idx = _mm512_mask_add_epi32(idx, lt, idx, _mm512_set1_epi32(step));
        }
        return idx;
    }
    for (int step = size >> 1; step > 0; step >>= 1) {
        const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
        const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_i32gather_ps(probe, mids, 4), v, _CMP_LT_OQ);
        idx = _mm512_mask_add_epi32(idx, lt, idx, _mm512_set1_epi32(step));
    }
    return idx;
}
#endif

/* The search tables of one codebook. mids: its sorted midpoints padded with +inf to `size` (a
 * power of two) and `nk` more; cells (optional, else NULL): `ncells` cells, each with a number of
 * midpoints below every value that can fall in the cell or its neighbours, so that a value's code
 * is cells[c] plus how many of the next `nk` midpoints lie below it (one lookup and nk comparisons
 * instead of a binary search; exact even when rounding puts a value one cell off). The cells split
 * [-1, 1] evenly (shift 0: for evenly spread maps), or the values' order-preserving bit patterns
 * (shift > 0: cell = (key >> shift) - first, so cells shrink toward 0 as the dynamic maps' codes do). */
typedef struct {
    const float *mids;
    int64_t size;
    const int32_t *cells;
    int64_t ncells, nk, shift, first;
} search_t;

static inline int64_t cell_of(float v, const search_t *sr) {
    int64_t c;
    if (sr->shift) {
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        c = (int64_t)(key >> sr->shift) - sr->first;
    } else {
        const float f = (v + 1.0f) * (0.5f * (float)sr->ncells);
        c = f < 0.0f ? 0 : (int64_t)f;
    }
    return c < 0 ? 0 : (c > sr->ncells - 1 ? sr->ncells - 1 : c);
}

static inline int code_in(float v, const search_t *sr) {
    if (!sr->cells) return code_of(v, sr->mids, (int)sr->size);
    const int base = sr->cells[cell_of(v, sr)];
    int code = base;
    for (int64_t t = 0; t < sr->nk; ++t) code += sr->mids[base + t] < v;
    return code;
}

#ifdef __AVX512F__
static inline __m512i codes_in16(__m512 v, const search_t *sr) {
    if (!sr->cells) return codes_of16(v, sr->mids, (int)sr->size);
    __m512i c;
    if (sr->shift) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32((int)0x80000000u));
        const __m512i key = _mm512_xor_si512(u, flip);
        c = _mm512_sub_epi32(_mm512_srli_epi32(key, (unsigned)sr->shift), _mm512_set1_epi32((int)sr->first));
    } else {
        const __m512 f = _mm512_mul_ps(_mm512_add_ps(v, _mm512_set1_ps(1.0f)),
                                       _mm512_set1_ps(0.5f * (float)sr->ncells));
        c = _mm512_cvttps_epi32(_mm512_max_ps(f, _mm512_setzero_ps()));
    }
    c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32((int)(sr->ncells - 1)));
    const __m512i base = _mm512_i32gather_epi32(c, sr->cells, 4);
    __m512i code = base;
    for (int64_t t = 0; t < sr->nk; ++t) {
        const __m512 m = _mm512_i32gather_ps(_mm512_add_epi32(base, _mm512_set1_epi32((int)t)), sr->mids, 4);
        code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(m, v, _CMP_LT_OQ), code, _mm512_set1_epi32(1));
    }
    return code;
}
#endif

/* Codes of `len` values of `row` in blocks of `block`, one scale each (scales[nb], nb + 1, ...;
 * fp32, or bf16 bits when bf16_scales) into row_codes; *nb advances past the blocks. Returns 0;
 * 1 when a value is not finite, 2 when a scale overflows bf16. */
static int encode_row(const float *row, int64_t len, int64_t block, const search_t *sr,
                      int64_t bf16_scales, void *scales, int64_t *nb, uint8_t *row_codes) {
    for (int64_t b0 = 0; b0 < len; b0 += block, ++*nb) {
        const int64_t b1 = (b0 + block < len) ? b0 + block : len;
        float amax = 0.0f;
        int finite = 1;
        int64_t k0 = b0;
#ifdef __AVX512F__
        if (b1 - b0 >= 16) { /* the maximum is exact in any order; a NaN or inf lane fails the block */
            __m512 vmax = _mm512_setzero_ps();
            __mmask16 bad = 0;
            for (; k0 + 16 <= b1; k0 += 16) {
                const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(row + k0));
                bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.402823466e38f), _CMP_NLE_UQ);
                vmax = _mm512_max_ps(vmax, a);
            }
            finite = bad == 0;
            amax = _mm512_reduce_max_ps(vmax);
        }
#endif
        for (int64_t k = k0; k < b1; ++k) {
            const float a = row[k] < 0 ? -row[k] : row[k];
            finite &= a <= 3.402823466e38f; /* false for inf and NaN */
            amax = a > amax ? a : amax;
        }
        if (!finite) return 1;
        if (bf16_scales) {
            const uint32_t h = bf16_bits(amax);
            if ((h & 0x7F80u) == 0x7F80u) return 2; /* rounded up to inf */
            ((uint16_t *)scales)[*nb] = (uint16_t)h;
            const uint32_t u = h << 16;
            memcpy(&amax, &u, sizeof amax); /* blocks are normalized by the stored scale */
        } else {
            ((float *)scales)[*nb] = amax;
        }
        const float safe = amax > 0 ? amax : 1.0f;
        int64_t k = b0;
#ifdef __AVX512F__
        const __m512 vs = _mm512_set1_ps(safe);
        for (; k + 16 <= b1; k += 16) {
            const __m512i c = codes_in16(_mm512_div_ps(_mm512_loadu_ps(row + k), vs), sr);
            _mm_storeu_si128((__m128i *)(row_codes + k), _mm512_cvtepi32_epi8(c));
        }
#endif
        for (; k < b1; ++k) row_codes[k] = (uint8_t)code_in(row[k] / safe, sr);
    }
    return 0;
}

/* Store the `len` codes of row_codes at flat elements p, p + 1, ...: bytes (8 bits), or nibbles
 * (element q: low nibble of byte q/2 when even, high when odd; a byte left half full gets its
 * high nibble from the next call, which must come in order). */
static void pack_run(int64_t bits, uint8_t *codes, int64_t p, const uint8_t *row_codes, int64_t len) {
    if (bits == 8) {
        memcpy(codes + p, row_codes, (size_t)len);
        return;
    }
    int64_t k = 0;
    if (p & 1) {
        codes[p >> 1] = (uint8_t)(codes[p >> 1] | (row_codes[0] << 4));
        k = 1;
    }
    uint8_t *dst = codes + ((p + k) >> 1);
    for (; k + 1 < len; k += 2) *dst++ = (uint8_t)(row_codes[k] | (row_codes[k + 1] << 4));
    if (k < len) *dst = row_codes[k]; /* its high nibble: the next run's first code, or 0 */
}

/* Quantize the strict upper triangle of the n x n fp32 matrix x (x[i][j] at x + i*rs + j*cs)
 * in the layout above: scales (fp32, or bf16 bits when bf16_scales) and codes (4-bit packed or
 * 8-bit). mids .. nk: the codebook's search tables (search_t). `work`: room
 * for 2n fp32. Returns 0; 1 when a value is not finite, 2 when a scale overflows bf16 (what was
 * written is then incomplete: the caller falls back to the torch quantizer, which reports it). */
int64_t ls4_quantize_symmetric(int64_t bits, const float *x, int64_t rs, int64_t cs, int64_t n, int64_t block,
                               const float *mids, int64_t size, const int32_t *cells, int64_t ncells, int64_t nk,
                               int64_t shift, int64_t first, int64_t bf16_scales, uint8_t *codes, void *scales,
                               float *work) {
    const search_t sr = {mids, size, cells, ncells, nk, shift, first};
    uint8_t *row_codes = (uint8_t *)(work + n);
    int64_t p = 0, nb = 0; /* flat element, block */
    for (int64_t i = 0; i + 1 < n; ++i) {
        const int64_t len = n - 1 - i;
        const float *src = x + i * rs + (i + 1) * cs;
        const float *row = src;
        if (cs != 1) { /* a transposed view: gather the row first */
            for (int64_t k = 0; k < len; ++k) work[k] = src[k * cs];
            row = work;
        }
        const int err = encode_row(row, len, block, &sr, bf16_scales, scales, &nb, row_codes);
        if (err) return err;
        pack_run(bits, codes, p, row_codes, len);
        p += len;
    }
    return 0;
}

/* One exponential-moving-average step of a stored symmetric matrix S, read from (codes, scales,
 * diag) and written to (codes_out, scales_out, diag_out) in the same layout (the scales of each
 * fp32, or bf16 bits when bf16_scales / bf16_out):
 *     S_new = (S * beta) + (o * alpha)     (each product rounded, then the sum: no FMA)
 * for the fp32 n x n matrix o (row i at o + i * ld; only its upper triangle is read), row by
 * row without forming S: the triangle row is decoded, updated and encoded in `work` (room for
 * 2n fp32). mids, size: as for ls4_quantize_symmetric. Returns as ls4_quantize_symmetric. */
int64_t ls4_symmetric_ema(int64_t bits, const uint8_t *codes, const void *scales, int64_t bf16_scales,
                          const float *diag, const float *lut, const float *o, int64_t ld, int64_t n, int64_t block,
                          float beta, float alpha, const float *mids, int64_t size, const int32_t *cells,
                          int64_t ncells, int64_t nk, int64_t shift, int64_t first, int64_t bf16_out,
                          uint8_t *codes_out, void *scales_out, float *diag_out, float *work) {
    const search_t sr = {mids, size, cells, ncells, nk, shift, first};
    uint8_t *row_codes = (uint8_t *)(work + n);
    int64_t p = 0, nb_in = 0, nb_out = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float *orow = o + i * ld;
        diag_out[i] = diag[i] * beta + orow[i] * alpha;
        const int64_t len = n - 1 - i;
        if (len <= 0) break;
        decode_row((int)bits, codes, scales, (int)bf16_scales, lut, block, p, nb_in, 0, len, work);
        nb_in += blocks_of(len, block);
        for (int64_t k = 0; k < len; ++k) {
            const float kept = work[k] * beta, added = orow[i + 1 + k] * alpha;
            work[k] = kept + added;
        }
        const int err = encode_row(work, len, block, &sr, bf16_out, scales_out, &nb_out, row_codes);
        if (err) return err;
        pack_run(bits, codes_out, p, row_codes, len);
        p += len;
    }
    return 0;
}

/* Quantize rows x cols fp32 values (row r at x + r * cols) in the row-block layout: each row cut
 * into blocks of `block` values with one scale each (fp32, or bf16 bits when bf16_scales), codes
 * 4-bit packed (flat element p: low nibble of byte p/2 when even, high when odd) or 8-bit. mids,
 * size: as for ls4_quantize_symmetric. `work`: room for `cols` bytes. Returns 0; 1 when a value
 * is not finite, 2 when a scale overflows bf16 (the caller then falls back to torch). */
int64_t ls4_quantize_rows(int64_t bits, const float *x, int64_t rows, int64_t cols, int64_t block, const float *mids,
                          int64_t size, const int32_t *cells, int64_t ncells, int64_t nk, int64_t shift,
                          int64_t first, int64_t bf16_scales, uint8_t *codes, void *scales, uint8_t *work) {
    const search_t sr = {mids, size, cells, ncells, nk, shift, first};
    int64_t nb = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int err = encode_row(x + r * cols, cols, block, &sr, bf16_scales, scales, &nb, work);
        if (err) return err;
        pack_run(bits, codes, r * cols, work, cols);
    }
    return 0;
}
