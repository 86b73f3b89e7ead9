/* Batched modular exponentiation with one shared exponent, 8 bases at a time in the
 * eight 64-bit lanes of AVX-512 registers (vpmadd52luq / vpmadd52huq, "IFMA").
 *
 * Why: a committee member raises thousands of aggregate ciphertexts to the same
 * exponent 2*Delta*s_i modulo n^2. GMP does one base at a time with 64-bit limbs; with
 * IFMA eight bases share every instruction (the exponent is the same, so the control
 * flow is too), which is about twice GMP's speed for 4096-bit moduli.
 *
 * Numbers are held "vertically": limb i of the eight bases sits in one register, 52 bits
 * per limb. Montgomery multiplication is CIOS with R = 2^(52 L) >= 4N, results kept below
 * 2N ("almost Montgomery"), so no conditional subtraction until the caller's final mod N.
 * Accumulators take at most 4 L products of < 2^52 each before they are normalized,
 * which fits 64 bits while L <= MAX_LIMBS.
 *
 * Not constant time with respect to the exponent (table index and skipped multiplies by
 * the zero window), like GMP's mpz_powm that it replaces.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#define MAX_LIMBS 240
#define LANES 8
#define MASK52 ((1ULL << 52) - 1)

int sm_ifma_available(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma");
#else
    return 0;
#endif
}

int sm_max_limbs(void) { return MAX_LIMBS; }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TARGET __attribute__((target("avx512f,avx512ifma")))

/* r = a * b / R mod N (below 2N), every operand L normalized limbs per lane. */
TARGET static void mont_mul(__m512i *r, const __m512i *a, const __m512i *b, const __m512i *n,
                            __m512i n0inv, int L, __m512i *t) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i mask = _mm512_set1_epi64((long long)MASK52);
    for (int k = 0; k <= 2 * L; k++) t[k] = zero;
    for (int i = 0; i < L; i++) {
        __m512i *ti = t + i;
        const __m512i ai = a[i];
        __m512i x = _mm512_madd52lo_epu64(ti[0], ai, b[0]);
        const __m512i q = _mm512_madd52lo_epu64(zero, x, n0inv);
        x = _mm512_madd52lo_epu64(x, q, n[0]);
        const __m512i carry = _mm512_srli_epi64(x, 52);
        for (int j = 1; j < L; j++) {
            __m512i y = ti[j];
            y = _mm512_madd52lo_epu64(y, ai, b[j]);
            y = _mm512_madd52lo_epu64(y, q, n[j]);
            y = _mm512_madd52hi_epu64(y, ai, b[j - 1]);
            y = _mm512_madd52hi_epu64(y, q, n[j - 1]);
            ti[j] = y;
        }
        __m512i top = _mm512_madd52hi_epu64(ti[L], ai, b[L - 1]);
        ti[L] = _mm512_madd52hi_epu64(top, q, n[L - 1]);
        ti[1] = _mm512_add_epi64(ti[1], carry);
    }
    __m512i c = zero;
    for (int k = 0; k < L; k++) {
        __m512i y = _mm512_add_epi64(t[L + k], c);
        c = _mm512_srli_epi64(y, 52);
        r[k] = _mm512_and_si512(y, mask);
    }
    /* c is 0 here: the result is below 2N < R. */
}

/* 64-bit little-endian words -> 52-bit limbs, lane `lane` of dst. */
static void to_limbs(uint64_t *dst, const uint64_t *words, int nwords, int L, int lane) {
    for (int i = 0; i < L; i++) {
        int bit = 52 * i, w = bit >> 6, off = bit & 63;
        uint64_t v = 0;
        if (w < nwords) v = words[w] >> off;
        if (off > 12 && w + 1 < nwords) v |= words[w + 1] << (64 - off);
        dst[i * LANES + lane] = v & MASK52;
    }
}

static void from_limbs(uint64_t *words, int nwords, const uint64_t *src, int L, int lane) {
    memset(words, 0, (size_t)nwords * 8);
    for (int i = 0; i < L; i++) {
        uint64_t v = src[i * LANES + lane];
        int bit = 52 * i, w = bit >> 6, off = bit & 63;
        if (w < nwords) words[w] |= v << off;
        if (off > 12 && w + 1 < nwords) words[w + 1] |= v >> (64 - off);
    }
}

/* The body of sm_powmod_batch, eight bases per pass. */
TARGET static int powmod_lanes(uint64_t *out, const uint64_t *bases, int count, int nwords,
                               const uint64_t *exp, int ebits, const uint64_t *mod,
                               const uint64_t *r2, uint64_t n0inv_scalar, int L, int window) {
    size_t vec = (size_t)L * sizeof(__m512i);
    int entries = 1 << window;
    __m512i *buf = aligned_alloc(64, vec * (size_t)(entries + 5) + sizeof(__m512i) * (2 * L + 2));
    if (!buf) return -2;
    __m512i *table = buf, *acc = buf + (size_t)entries * L, *x = acc + L, *nn = x + L,
            *rr = nn + L, *one = rr + L, *t = one + L;
    uint64_t *scratch = (uint64_t *)x;
    /* modulus and R^2 mod N, broadcast to every lane */
    uint64_t *tmp = (uint64_t *)acc;
    for (int lane = 0; lane < LANES; lane++) to_limbs(tmp, mod, nwords, L, lane);
    memcpy(nn, tmp, vec);
    for (int lane = 0; lane < LANES; lane++) to_limbs(tmp, r2, nwords, L, lane);
    memcpy(rr, tmp, vec);
    const __m512i n0inv = _mm512_set1_epi64((long long)n0inv_scalar);
    for (int i = 0; i < L; i++) one[i] = _mm512_setzero_si512();
    for (int lane = 0; lane < LANES; lane++) ((uint64_t *)one)[lane] = 1;  /* limb 0 */

    uint64_t *words = malloc((size_t)nwords * 8);
    if (!words) { free(buf); return -2; }
    for (int g = 0; g < count; g += LANES) {
        int lanes = count - g < LANES ? count - g : LANES;
        for (int lane = 0; lane < LANES; lane++) {
            if (lane < lanes) to_limbs(scratch, bases + (size_t)(g + lane) * nwords, nwords, L, lane);
            else {  /* padding lanes compute 1^e */
                for (int i = 0; i < L; i++) scratch[i * LANES + lane] = i == 0;
            }
        }
        /* table[0] = R mod N (Montgomery one), table[1] = x R mod N, table[k] = x^k R */
        mont_mul(&table[L], x, rr, nn, n0inv, L, t);
        mont_mul(&table[0], one, rr, nn, n0inv, L, t);
        for (int k = 2; k < entries; k++)
            mont_mul(&table[(size_t)k * L], &table[(size_t)(k - 1) * L], &table[L], nn, n0inv, L, t);
        /* left to right, `window` bits at a time from the top (ebits padded up) */
        int top = ((ebits + window - 1) / window) * window;
        int first = 1;
        for (int pos = top - window; pos >= 0; pos -= window) {
            int win = 0;
            for (int b = window - 1; b >= 0; b--) {
                int bit = pos + b;
                win = (win << 1) | (bit < ebits ? (int)((exp[bit >> 6] >> (bit & 63)) & 1) : 0);
            }
            if (first) { memcpy(acc, &table[(size_t)win * L], vec); first = 0; continue; }
            for (int s = 0; s < window; s++) mont_mul(acc, acc, acc, nn, n0inv, L, t);
            if (win) mont_mul(acc, acc, &table[(size_t)win * L], nn, n0inv, L, t);
        }
        if (first) memcpy(acc, &table[0], vec);
        mont_mul(acc, acc, one, nn, n0inv, L, t);  /* out of Montgomery form, below 2N */
        for (int lane = 0; lane < lanes; lane++) {
            from_limbs(words, nwords, (const uint64_t *)acc, L, lane);
            memcpy(out + (size_t)(g + lane) * nwords, words, (size_t)nwords * 8);
        }
    }
    free(words);
    free(buf);
    return 0;
}
#endif

/* out[k] = bases[k]^exp mod N, up to 2N-1 (the caller reduces mod N once).
 * Every number is nwords little-endian 64-bit words; N odd, bases below N, `r2` is
 * R^2 mod N for R = 2^(52 L), n0inv = -N^-1 mod 2^52, 4N <= R, L <= MAX_LIMBS.
 * Returns 0, -1 if the CPU lacks IFMA or a parameter is out of range, -2 out of memory. */
int sm_powmod_batch(uint64_t *out, const uint64_t *bases, int count, int nwords,
                    const uint64_t *exp, int ebits, const uint64_t *mod, const uint64_t *r2,
                    uint64_t n0inv, int L, int window) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (!sm_ifma_available() || L < 2 || L > MAX_LIMBS || window < 1 || window > 7 ||
        count < 0 || nwords < 1 || 52 * L < 64 * (nwords - 1) || ebits < 0)
        return -1;
    return powmod_lanes(out, bases, count, nwords, exp, ebits, mod, r2, n0inv, L, window);
#else
    (void)out; (void)bases; (void)count; (void)nwords; (void)exp; (void)ebits; (void)mod;
    (void)r2; (void)n0inv; (void)L; (void)window;
    return -1;
#endif
}
