/* Fused selective scan for one state (N = 1), forward and backward, in plain C.
 *
 * The "c" CPU backend of usfm_core/models/scan.py (glue: _scan_c.py, which compiles this file
 * on first use with the machine's C compiler and caches the shared library).  This file is a
 * template: the glue instantiates it twice, with REAL = float / SFX = f32 and REAL = double /
 * SFX = f64.
 *
 * Shapes (all C-contiguous): u, delta, y, hs, gy, gu, gdelta (B, D, L); A, Dv, bias (D,);
 * Bm, Cm (B, G, L) (group g serves channels g*D/G .. (g+1)*D/G - 1); last, glast (B, D).
 *
 * Why it is faster than the numba kernel: every loop except the two recurrences runs along
 * time, element-wise, and the compiler vectorises it (8 float lanes with AVX2): softplus,
 * sigmoid and exp come from the polynomial helpers below (no libm calls), and the reductions
 * are declared to it with `omp simd reduction` (compiled with -fopenmp-simd: no OpenMP runtime
 * is linked, so nothing clashes with torch's or numba's thread pools and fork stays safe).  The
 * two recurrences are single fused multiply-adds per step on a double state:
 *   forward   h_t = a_t h_{t-1} + w_t,            w_t = Δ_t u_t B_t
 *   backward  r_{t-1} = a_t r_t + a_t g_t C_t,    q_t = g_t C_t + r_t   (the adjoint of h_t)
 * The two recurrences carry a double state; element-wise products are REAL (8 float lanes).
 * In the backward, sums run in REAL over at most one chunk (CHUNK steps, or the ROWS channels
 * of one block for ∂B, ∂C) and are then added into double accumulators: cheaper than
 * converting every term to double (2026-12-01: the backward -15 %), and float32 gradients stay
 * within 1e-5 of the float64 reference on the tested shapes (tests/test_scan_c.py).
 */

#ifndef USFM_SCAN_COMMON
#define USFM_SCAN_COMMON
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef long long i64;
#define CHUNK 256

static inline float bits_f32(int32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline int32_t int_f32(float f) { int32_t b; memcpy(&b, &f, 4); return b; }
static inline double bits_f64(int64_t b) { double f; memcpy(&f, &b, 8); return f; }
static inline int64_t int_f64(double f) { int64_t b; memcpy(&b, &f, 8); return b; }

static inline float abs_f32(float x) { return __builtin_fabsf(x); }
static inline double abs_f64(double x) { return __builtin_fabs(x); }

/* exp: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, Taylor polynomial (degree 7 / 13:
 * below half an ulp), times 2^k added to the exponent bits.  k is read from the bits of
 * t = x log2e + 1.5*2^23 (2^52), which rounded it: integer ops only, so loops vectorise.
 * Arguments are clamped to [-86, 88] / [-700, 700]. */
static inline float exp_f32(float x) {
    x = -86.0f > x ? -86.0f : x;  /* maxps / minps forms: a NaN argument stays NaN */
    x = 88.0f < x ? 88.0f : x;
    const float shift = 12582912.0f;
    float t = x * 1.4426950408889634f + shift;
    float k = t - shift;
    float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
    int32_t kb = int_f32(t) - int_f32(shift);
    return bits_f32(int_f32(p) + (kb << 23));
}

static inline double exp_f64(double x) {
    x = -700.0 > x ? -700.0 : x;
    x = 700.0 < x ? 700.0 : x;
    const double shift = 6755399441055744.0;
    double t = x * 1.4426950408889634 + shift;
    double k = t - shift;
    double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;                       /* 1/13! */
    p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0; p = p * r + 1.0 / 40320.0; p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0; p = p * r + 1.0 / 120.0; p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0; p = p * r + 0.5; p = p * r + 1.0; p = p * r + 1.0;
    int64_t kb = int_f64(t) - int_f64(shift);
    return bits_f64(int_f64(p) + (kb << 52));
}

/* log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, odd series in s. */
static inline float log1p_unit_f32(float e) {
    float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 15;
    p = p * s2 + 1.0f / 13; p = p * s2 + 1.0f / 11; p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7; p = p * s2 + 1.0f / 5; p = p * s2 + 1.0f / 3; p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

static inline double log1p_unit_f64(double e) {
    double s = e / (2.0 + e), s2 = s * s;
    double p = 1.0 / 33;
    for (int k = 15; k >= 0; --k) p = p * s2 + 1.0 / (2 * k + 1);
    return 2.0 * s * p;
}
/* Whether this build runs its parallel split on OpenMP threads (else one thread). */
int usfm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
#endif /* USFM_SCAN_COMMON */

/* Δ = softplus(x) (torch's threshold 20) and its slope sigmoid(x), given e = exp(-|x|). */
static inline REAL softplus_from_SFX(REAL x, REAL e, REAL* slope) {
    REAL inv = (REAL)1 / ((REAL)1 + e);
    REAL sp = (x > 0 ? x : (REAL)0) + log1p_unit_SFX(e);
    *slope = x > 20 ? (REAL)1 : (x >= 0 ? inv : e * inv);
    return x > 20 ? x : sp;
}

/* Δ = softplus(x) and its slope, from one exp. */
static inline REAL softplus_SFX(REAL x, REAL* slope) {
    return softplus_from_SFX(x, exp_SFX(-abs_SFX(x)), slope);
}

/* Rows scanned together: their recurrences are independent FMA chains, so interleaving them
 * hides the FMA latency that bounds one chain (one step per ~4 cycles). */
#define ROWS 4

/* Forward prepass of one row's chunk: decay a = exp(Δ A) and drive w = Δ u B.  With softplus
 * it runs in three passes over the chunk (exp(-|x|); Δ and its slope; the decay and drive):
 * one pass would chain two exps, a division and log1p's series per element, a dependency
 * chain too long for the out-of-order window to overlap iterations (measured: the three
 * passes take 20 % less time).  Δ goes to dts when kept, else through w. */
static inline void fwd_prep_SFX(const REAL* xc, const REAL* uc, const REAL* bc, REAL ad,
                                REAL bd, int softplus, int tl, REAL* a, REAL* w, REAL* dts,
                                REAL* sgs) {
    if (softplus) {
        REAL* dtp = dts ? dts : w;
#pragma omp simd
        for (int i = 0; i < tl; ++i) a[i] = exp_SFX(-abs_SFX(xc[i] + bd));
        if (dts && sgs) {  /* keep Δ and its slope for the backward */
#pragma omp simd
            for (int i = 0; i < tl; ++i) dtp[i] = softplus_from_SFX(xc[i] + bd, a[i], &sgs[i]);
        } else {
#pragma omp simd
            for (int i = 0; i < tl; ++i) {
                REAL s;
                dtp[i] = softplus_from_SFX(xc[i] + bd, a[i], &s);
            }
        }
#pragma omp simd
        for (int i = 0; i < tl; ++i) {
            const REAL dt = dtp[i];
            a[i] = exp_SFX(dt * ad);
            w[i] = dt * uc[i] * bc[i];
        }
    } else {
#pragma omp simd
        for (int i = 0; i < tl; ++i) {
            REAL dt = xc[i] + bd;
            a[i] = exp_SFX(dt * ad);
            w[i] = dt * uc[i] * bc[i];
        }
    }
}

/* Forward over rows [lo, hi) of B*D.  Writes y, last and, when hs is not NULL, the states
 * h_t (rounded to REAL) for the backward, and with softplus also Δ and its slope (dts, sgs:
 * storing them costs less than recomputing softplus in the backward).  Rows go in blocks of
 * ROWS of one batch item. */
void usfm_fwd_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                  const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus, i64 dim,
                  i64 len, i64 groups, REAL* y, double* last, REAL* hs, REAL* dts, REAL* sgs,
                  i64 lo, i64 hi) {
    REAL a[ROWS][CHUNK], w[ROWS][CHUNK], hb[ROWS][CHUNK];
    const i64 dg = dim / groups;
    for (i64 row0 = lo; row0 < hi;) {
        const i64 b = row0 / dim;
        i64 nr = hi - row0, to_end = (b + 1) * dim - row0;
        nr = nr < to_end ? nr : to_end;
        nr = nr < ROWS ? nr : ROWS;
        const REAL *ur[ROWS], *xr[ROWS], *br[ROWS], *cr[ROWS];
        REAL *yr[ROWS], *ho[ROWS];
        REAL ad[ROWS], bd[ROWS], dd[ROWS];
        double h[ROWS];
        for (int j = 0; j < ROWS; ++j) {
            const i64 row = row0 + (j < nr ? j : 0), d = row - b * dim, g = d / dg;
            ur[j] = u + row * len; xr[j] = delta + row * len; yr[j] = y + row * len;
            br[j] = Bm + (b * groups + g) * len; cr[j] = Cm + (b * groups + g) * len;
            ad[j] = A[d]; bd[j] = bias[d]; dd[j] = Dv[d]; h[j] = 0.0;
        }
        for (i64 t0 = 0; t0 < len; t0 += CHUNK) {
            const int tl = len - t0 < CHUNK ? (int)(len - t0) : CHUNK;
            for (int j = 0; j < nr; ++j) {
                const i64 off = (row0 + j) * len + t0;
                const int keep = hs && softplus && dts && sgs;
                fwd_prep_SFX(xr[j] + t0, ur[j] + t0, br[j] + t0, ad[j], bd[j], softplus, tl,
                             a[j], w[j], keep ? dts + off : NULL, keep ? sgs + off : NULL);
                ho[j] = hs ? hs + off : hb[j];
            }
            if (nr == ROWS) {
                for (int i = 0; i < tl; ++i) {  /* ROWS independent one-FMA recurrences */
#pragma GCC unroll 4
                    for (int j = 0; j < ROWS; ++j) {
                        h[j] = (double)a[j][i] * h[j] + (double)w[j][i];
                        ho[j][i] = (REAL)h[j];
                    }
                }
            } else {
                for (int j = 0; j < nr; ++j) {
                    double hj = h[j];
                    for (int i = 0; i < tl; ++i) {
                        hj = (double)a[j][i] * hj + (double)w[j][i];
                        ho[j][i] = (REAL)hj;
                    }
                    h[j] = hj;
                }
            }
            for (int j = 0; j < nr; ++j) {
                const REAL *cc = cr[j] + t0, *uc = ur[j] + t0, *hj = ho[j];
                REAL* yc = yr[j] + t0;
                const REAL dj = dd[j];
#pragma omp simd
                for (int i = 0; i < tl; ++i) yc[i] = cc[i] * hj[i] + dj * uc[i];
            }
        }
        for (int j = 0; j < nr; ++j) last[row0 + j] = h[j];
        row0 += nr;
    }
}

/* Backward prepass of one row's chunk: Δ, its slope, the decay a, g C and w = a g C. */
static inline void bwd_prep_SFX(const REAL* xc, const REAL* gyc, const REAL* cc, REAL ad,
                                REAL bd, int softplus, const REAL* dts, const REAL* sgs, int tl,
                                REAL* dtb, REAL* sgb, REAL* ab, REAL* gcb, REAL* wb) {
    if (softplus && dts) {  /* Δ and its slope kept by the forward: read in place */
        (void)sgs; (void)dtb; (void)sgb;
#pragma omp simd
        for (int i = 0; i < tl; ++i) {
            REAL a = exp_SFX(dts[i] * ad), gc = gyc[i] * cc[i];
            ab[i] = a; gcb[i] = gc; wb[i] = a * gc;
        }
    } else if (softplus) {  /* three passes, as in fwd_prep */
#pragma omp simd
        for (int i = 0; i < tl; ++i) ab[i] = exp_SFX(-abs_SFX(xc[i] + bd));
#pragma omp simd
        for (int i = 0; i < tl; ++i) dtb[i] = softplus_from_SFX(xc[i] + bd, ab[i], &sgb[i]);
#pragma omp simd
        for (int i = 0; i < tl; ++i) {
            REAL a = exp_SFX(dtb[i] * ad), gc = gyc[i] * cc[i];
            ab[i] = a; gcb[i] = gc; wb[i] = a * gc;
        }
    } else {
#pragma omp simd
        for (int i = 0; i < tl; ++i) {
            REAL dt = xc[i] + bd;
            REAL a = exp_SFX(dt * ad), gc = gyc[i] * cc[i];
            dtb[i] = dt; sgb[i] = (REAL)1; ab[i] = a; gcb[i] = gc; wb[i] = a * gc;
        }
    }
}

/* Gradients of one channel over one chunk of tl steps, from its adjoints rj (the state's
 * gradient carried back from later steps) and gcj = ∂L/∂y · C: writes ∂u to guc and ∂Δ (raw,
 * before softplus) to gdc, adds ∂C and ∂B of each step to gcf, gbf (REAL, summed over the
 * caller's rows), and adds the chunk's REAL sums for ∂A, ∂D, ∂bias to the float64 accumulators.
 * h_{t-1} is read in place at hc - 1 except in the first chunk (first != 0), where h_{-1} = 0
 * and the shifted copy goes to hp (CHUNK REALs). */
static inline void bwd_grads_SFX(int tl, int first, const REAL* gcj, const REAL* rj,
                                 const REAL* gyc, const REAL* uc, const REAL* dtj,
                                 const REAL* sgj, const REAL* aj, const REAL* bc,
                                 const REAL* hc, REAL ad, REAL dd, REAL* hp, REAL* gcf,
                                 REAL* gbf, REAL* guc, REAL* gdc, double* ga_acc,
                                 double* gd_acc, double* gb_acc) {
    REAL ga = 0, gdd = 0, gbb = 0;  /* one chunk's sums (≤ CHUNK terms, see the header) */
    const REAL* hprev = hc - 1;
    if (first) {
        hp[0] = (REAL)0;
        memcpy(hp + 1, hc, (size_t)(tl - 1) * sizeof(REAL));
        hprev = hp;
    }
#pragma omp simd reduction(+ : ga, gdd, gbb)
    for (int i = 0; i < tl; ++i) {
        const REAL q = gcj[i] + rj[i];
        const REAL gyv = gyc[i], uu = uc[i], dt = dtj[i];
        const REAL su = q * bc[i];
        const REAL gla = q * aj[i] * hprev[i];
        gcf[i] += gyv * hc[i];
        gbf[i] += q * dt * uu;
        ga += gla * dt;
        guc[i] = gyv * dd + su * dt;
        const REAL graw = (gla * ad + su * uu) * sgj[i];
        gdc[i] = graw;
        gbb += graw;
        gdd += gyv * uu;
    }
    *ga_acc += (double)ga;
    *gd_acc += (double)gdd;
    *gb_acc += (double)gbb;
}

/* Backward over tasks [lo, hi) of B*G*parts: task (b, g, p) walks channels
 * g*dg + p*dg/parts .. g*dg + (p+1)*dg/parts - 1 (in blocks of ROWS) and adds its ∂B, ∂C
 * into its own rows gBp[p, b, g], gCp[p, b, g] ((parts, B, G, L) float64; the caller sums
 * over parts).  gA, gD, gbias are (B, D) float64 (the caller sums over B). */
void usfm_bwd_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                  const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus, i64 bsz,
                  i64 dim, i64 len, i64 groups, i64 parts, const REAL* hs, const REAL* dts,
                  const REAL* sgs, const REAL* gy,
                  const double* glast, REAL* gu, REAL* gdelta, double* gA, double* gD,
                  double* gbias, double* gBp, double* gCp, i64 lo, i64 hi) {
    REAL dtb[ROWS][CHUNK], sgb[ROWS][CHUNK], ab[ROWS][CHUNK], gcb[ROWS][CHUNK],
        wb[ROWS][CHUNK], hp[CHUNK];
    REAL rb[ROWS][CHUNK];  /* adjoints, rounded: read back only element-wise */
    const i64 dg = dim / groups;
    const i64 nc = (len + CHUNK - 1) / CHUNK;
    for (i64 task = lo; task < hi; ++task) {
        const i64 b = task / (groups * parts);
        const i64 rem = task - b * groups * parts;
        const i64 g = rem / parts, p = rem - g * parts;
        const i64 c_lo = g * dg + (p * dg) / parts, c_hi = g * dg + ((p + 1) * dg) / parts;
        const REAL *br = Bm + (b * groups + g) * len, *cr = Cm + (b * groups + g) * len;
        double* gbr = gBp + ((p * bsz + b) * groups + g) * len;
        double* gcr = gCp + ((p * bsz + b) * groups + g) * len;
        for (i64 d0 = c_lo; d0 < c_hi; d0 += ROWS) {
            const int nr = c_hi - d0 < ROWS ? (int)(c_hi - d0) : ROWS;
            double r[ROWS], ga_acc[ROWS], gd_acc[ROWS], gb_acc[ROWS];
            for (int j = 0; j < ROWS; ++j) {
                r[j] = j < nr ? glast[b * dim + d0 + j] : 0.0;
                ga_acc[j] = gd_acc[j] = gb_acc[j] = 0.0;
            }
            for (i64 k = nc - 1; k >= 0; --k) {
                const i64 t0 = k * CHUNK;
                const int tl = len - t0 < CHUNK ? (int)(len - t0) : CHUNK;
                const REAL *bc = br + t0, *cc = cr + t0;
                for (int j = 0; j < nr; ++j) {
                    const i64 row = b * dim + d0 + j;
                    const i64 off = row * len + t0;
                    bwd_prep_SFX(delta + off, gy + off, cc, A[d0 + j], bias[d0 + j], softplus,
                                 dts ? dts + off : NULL, sgs ? sgs + off : NULL, tl, dtb[j],
                                 sgb[j], ab[j], gcb[j], wb[j]);
                }
                if (nr == ROWS) {
                    for (int i = tl - 1; i >= 0; --i) {  /* ROWS adjoint recurrences */
#pragma GCC unroll 4
                        for (int j = 0; j < ROWS; ++j) {
                            rb[j][i] = (REAL)r[j];
                            r[j] = (double)ab[j][i] * r[j] + (double)wb[j][i];
                        }
                    }
                } else {
                    for (int j = 0; j < nr; ++j) {
                        double rj = r[j];
                        for (int i = tl - 1; i >= 0; --i) {
                            rb[j][i] = (REAL)rj;
                            rj = (double)ab[j][i] * rj + (double)wb[j][i];
                        }
                        r[j] = rj;
                    }
                }
                REAL gcf[CHUNK], gbf[CHUNK];  /* this block's ∂C, ∂B, summed over its rows */
                memset(gcf, 0, sizeof gcf); memset(gbf, 0, sizeof gbf);
                for (int j = 0; j < nr; ++j) {
                    const i64 d = d0 + j, row = b * dim + d;
                    const REAL *uc = u + row * len + t0, *gyc = gy + row * len + t0;
                    const REAL* hc = hs + row * len + t0;
                    REAL *guc = gu + row * len + t0, *gdc = gdelta + row * len + t0;
                    const int kept = softplus && dts;
                    const REAL *dtj = kept ? dts + row * len + t0 : dtb[j];
                    const REAL *sgj = kept ? sgs + row * len + t0 : sgb[j];
                    bwd_grads_SFX(tl, t0 == 0, gcb[j], rb[j], gyc, uc, dtj, sgj, ab[j], bc, hc,
                                  A[d], Dv[d], hp, gcf, gbf, guc, gdc, &ga_acc[j], &gd_acc[j],
                                  &gb_acc[j]);
                }
#pragma omp simd
                for (int i = 0; i < tl; ++i) {
                    gcr[t0 + i] += (double)gcf[i];
                    gbr[t0 + i] += (double)gbf[i];
                }
            }
            for (int j = 0; j < nr; ++j) {
                const i64 row = b * dim + d0 + j;
                gA[row] = ga_acc[j];
                gD[row] = gd_acc[j];
                gbias[row] = gb_acc[j];
            }
        }
    }
}

/* Entry points: split the tasks into `threads` contiguous ranges, one per OpenMP thread.
 * Built with -fopenmp this uses the process's one libgomp (torch's), so the ranges run on the
 * threads torch's parallel ops use, instead of competing with their spinning workers for the
 * cores; without OpenMP, or with one thread, the ranges run one after the other here. */
void usfm_fwd_par_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                      const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus, i64 dim,
                      i64 len, i64 groups, REAL* y, double* last, REAL* hs, REAL* dts,
                      REAL* sgs, i64 tasks, int threads) {
    if (threads <= 1 || tasks <= 1) {
        usfm_fwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, dim, len, groups, y, last, hs,
                     dts, sgs, 0, tasks);
        return;
    }
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int p = 0; p < threads; ++p)
        usfm_fwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, dim, len, groups, y, last, hs,
                     dts, sgs, tasks * p / threads, tasks * (p + 1) / threads);
}

void usfm_bwd_par_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                      const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus, i64 bsz,
                      i64 dim, i64 len, i64 groups, i64 parts, const REAL* hs, const REAL* dts,
                      const REAL* sgs, const REAL* gy, const double* glast, REAL* gu,
                      REAL* gdelta, double* gA, double* gD, double* gbias, double* gBp,
                      double* gCp, i64 tasks, int threads) {
    if (threads <= 1 || tasks <= 1) {
        usfm_bwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, bsz, dim, len, groups, parts, hs,
                     dts, sgs, gy, glast, gu, gdelta, gA, gD, gbias, gBp, gCp, 0, tasks);
        return;
    }
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int p = 0; p < threads; ++p)
        usfm_bwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, bsz, dim, len, groups, parts, hs,
                     dts, sgs, gy, glast, gu, gdelta, gA, gD, gbias, gBp, gCp,
                     tasks * p / threads, tasks * (p + 1) / threads);
}

/* ---------------------------------------------------------------------------------------------
 * SS2D: the four-direction scan of VMamba fused with its cross-scan and cross-merge.
 *
 * u and y are (B, D, L) maps in row-major order (L = H W); delta, hs, dts, sgs, gdelta are
 * (B, 4, D, L) and Bm, Cm (B, 4, L) in each direction's own order; A, Dv, bias are (4 D,)
 * (channel k D + d).  Direction k reads position pos_k(t) of the map at step t:
 *   k = 0  row-major           pos = t
 *   k = 1  column-major        t = w H + h  ->  pos = h W + w
 *   k = 2, 3  k = 0, 1 reversed (t -> L - 1 - t)
 * and y[pos] is the sum of the four directions' outputs there.  One block is the four
 * directions of one channel: they run as the ROWS interleaved recurrences, gather u (and, in
 * the backward, the output gradient) from the same row of the map, which stays in cache, and
 * add their outputs (input gradients) into the same row, so no thread shares an output row and
 * the (B, 4, D, L) copies of cross-scan and cross-merge are never made.
 * ------------------------------------------------------------------------------------------ */

/* The column-major directions read the map's transpose, made once per channel: then every
 * direction reads (and adds into) a contiguous run, forwards or backwards, and vectorises. */
static inline void transpose_SFX(const REAL* src, i64 H, i64 W, REAL* dst) {
    for (i64 h = 0; h < H; ++h)  /* dst (W, H) = src (H, W)^T */
        for (i64 w = 0; w < W; ++w) dst[w * H + h] = src[h * W + w];
}

static inline void add_transposed_SFX(REAL* dst, i64 H, i64 W, const REAL* src) {
    for (i64 h = 0; h < H; ++h)  /* dst (H, W) += src (W, H)^T */
        for (i64 w = 0; w < W; ++w) dst[h * W + w] += src[w * H + h];
}

/* Steps t0 .. t0 + tl - 1 of direction k as a contiguous run: row (row-major map) for k = 0,
 * rowT (its transpose) for k = 1, and reversed copies of them in buf for k = 2, 3. */
static inline const REAL* dir_run_SFX(const REAL* row, const REAL* rowT, int k, i64 t0, int tl,
                                      i64 len, REAL* buf) {
    if (k < 2) return (k == 0 ? row : rowT) + t0;
    const REAL* src = (k == 2 ? row : rowT) + (len - 1 - t0);
#pragma omp simd
    for (int i = 0; i < tl; ++i) buf[i] = src[-i];
    return buf;
}

/* The transpose of dir_run: add v into the positions direction k visits at t0 .. t0 + tl - 1
 * (of row for k = 0, 2 and of rowT, the transposed accumulator, for k = 1, 3). */
static inline void dir_add_SFX(REAL* row, REAL* rowT, int k, i64 t0, int tl, i64 len,
                               const REAL* v) {
    REAL* base = (k == 0 || k == 2) ? row : rowT;
    if (k < 2) {
        REAL* dst = base + t0;
#pragma omp simd
        for (int i = 0; i < tl; ++i) dst[i] += v[i];
    } else {
        REAL* dst = base + (len - 1 - t0);
#pragma omp simd
        for (int i = 0; i < tl; ++i) dst[-i] += v[i];
    }
}

/* Forward over map rows [lo, hi) of B*D: y (B, D, L) merged; hs, dts, sgs (B, 4, D, L) kept
 * for the backward when hs is not NULL (dts, sgs only with softplus).  work: 2 L REALs. */
static void ss2d_fwd_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                         const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus,
                         i64 dim, i64 H, i64 W, REAL* y, REAL* hs, REAL* dts, REAL* sgs,
                         i64 lo, i64 hi, REAL* work) {
    REAL a[ROWS][CHUNK], w[ROWS][CHUNK], hb[ROWS][CHUNK], rev[ROWS][CHUNK], yb[CHUNK];
    const i64 len = H * W;
    REAL *uT = work, *yT = work + len;
    const int keep = hs && softplus && dts && sgs;
    for (i64 row = lo; row < hi; ++row) {
        const i64 b = row / dim, d = row - b * dim;
        const REAL* urow = u + row * len;
        REAL* yrow = y + row * len;
        memset(yrow, 0, (size_t)len * sizeof(REAL));
        memset(yT, 0, (size_t)len * sizeof(REAL));
        transpose_SFX(urow, H, W, uT);
        const REAL *xr[ROWS], *br[ROWS], *cr[ROWS], *up[ROWS];
        REAL *ho[ROWS], ad[ROWS], bd[ROWS], dd[ROWS];
        i64 off[ROWS];
        double h[ROWS];
        for (int k = 0; k < ROWS; ++k) {
            const i64 ch = k * dim + d;
            off[k] = (b * ROWS * dim + ch) * len;
            xr[k] = delta + off[k];
            br[k] = Bm + (b * ROWS + k) * len; cr[k] = Cm + (b * ROWS + k) * len;
            ad[k] = A[ch]; bd[k] = bias[ch]; dd[k] = Dv[ch]; h[k] = 0.0;
        }
        for (i64 t0 = 0; t0 < len; t0 += CHUNK) {
            const int tl = len - t0 < CHUNK ? (int)(len - t0) : CHUNK;
            for (int k = 0; k < ROWS; ++k) {
                up[k] = dir_run_SFX(urow, uT, k, t0, tl, len, rev[k]);
                fwd_prep_SFX(xr[k] + t0, up[k], br[k] + t0, ad[k], bd[k], softplus, tl, a[k],
                             w[k], keep ? dts + off[k] + t0 : NULL,
                             keep ? sgs + off[k] + t0 : NULL);
                ho[k] = hs ? hs + off[k] + t0 : hb[k];
            }
            for (int i = 0; i < tl; ++i) {  /* the four directions' recurrences, interleaved */
#pragma GCC unroll 4
                for (int k = 0; k < ROWS; ++k) {
                    h[k] = (double)a[k][i] * h[k] + (double)w[k][i];
                    ho[k][i] = (REAL)h[k];
                }
            }
            for (int k = 0; k < ROWS; ++k) {
                const REAL *cc = cr[k] + t0, *uc = up[k], *hk = ho[k];
                const REAL dk = dd[k];
#pragma omp simd
                for (int i = 0; i < tl; ++i) yb[i] = cc[i] * hk[i] + dk * uc[i];
                dir_add_SFX(yrow, yT, k, t0, tl, len, yb);
            }
        }
        add_transposed_SFX(yrow, H, W, yT);
    }
}

/* Backward over tasks [lo, hi) of B*parts: task (b, p) walks channels p*D/parts ..
 * (p+1)*D/parts - 1 of batch item b.  gu (B, D, L) merged, gdelta (B, 4, D, L); gA, gD, gbias
 * (B, 4 D) float64 (the caller sums over B); gBp, gCp (parts, B, 4, L) float64 (the caller
 * sums over parts).  work: 3 L REALs. */
static void ss2d_bwd_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                         const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus,
                         i64 bsz, i64 dim, i64 H, i64 W, i64 parts, const REAL* hs,
                         const REAL* dts, const REAL* sgs, const REAL* gy, REAL* gu,
                         REAL* gdelta, double* gA, double* gD, double* gbias, double* gBp,
                         double* gCp, i64 lo, i64 hi, REAL* work) {
    REAL dtb[ROWS][CHUNK], sgb[ROWS][CHUNK], ab[ROWS][CHUNK], gcb[ROWS][CHUNK],
        wb[ROWS][CHUNK], rb[ROWS][CHUNK], grev[ROWS][CHUNK], urev[CHUNK], gub[CHUNK], hp[CHUNK],
        gcf[CHUNK], gbf[CHUNK];  /* one direction's ∂C, ∂B of a chunk */
    const i64 len = H * W;
    const i64 nc = (len + CHUNK - 1) / CHUNK;
    const int kept = softplus && dts;
    REAL *uT = work, *gyT = work + len, *guT = work + 2 * len;
    for (i64 task = lo; task < hi; ++task) {
        const i64 b = task / parts, p = task - b * parts;
        const i64 d_lo = (p * dim) / parts, d_hi = ((p + 1) * dim) / parts;
        for (i64 d = d_lo; d < d_hi; ++d) {
            const i64 row = b * dim + d;
            const REAL *urow = u + row * len, *gyrow = gy + row * len;
            REAL* gurow = gu + row * len;
            memset(gurow, 0, (size_t)len * sizeof(REAL));
            memset(guT, 0, (size_t)len * sizeof(REAL));
            transpose_SFX(urow, H, W, uT);
            transpose_SFX(gyrow, H, W, gyT);
            const REAL *br[ROWS], *cr[ROWS], *gyp[ROWS];
            double *gbr[ROWS], *gcr[ROWS], r[ROWS], ga_acc[ROWS], gd_acc[ROWS], gb_acc[ROWS];
            REAL ad[ROWS], bd[ROWS], dd[ROWS];
            i64 off[ROWS];
            for (int k = 0; k < ROWS; ++k) {
                const i64 ch = k * dim + d;
                off[k] = (b * ROWS * dim + ch) * len;
                br[k] = Bm + (b * ROWS + k) * len; cr[k] = Cm + (b * ROWS + k) * len;
                gbr[k] = gBp + ((p * bsz + b) * ROWS + k) * len;
                gcr[k] = gCp + ((p * bsz + b) * ROWS + k) * len;
                ad[k] = A[ch]; bd[k] = bias[ch]; dd[k] = Dv[ch];
                r[k] = ga_acc[k] = gd_acc[k] = gb_acc[k] = 0.0;
            }
            for (i64 c = nc - 1; c >= 0; --c) {
                const i64 t0 = c * CHUNK;
                const int tl = len - t0 < CHUNK ? (int)(len - t0) : CHUNK;
                for (int k = 0; k < ROWS; ++k) {
                    gyp[k] = dir_run_SFX(gyrow, gyT, k, t0, tl, len, grev[k]);
                    bwd_prep_SFX(delta + off[k] + t0, gyp[k], cr[k] + t0, ad[k], bd[k],
                                 softplus, kept ? dts + off[k] + t0 : NULL,
                                 kept ? sgs + off[k] + t0 : NULL, tl, dtb[k], sgb[k], ab[k],
                                 gcb[k], wb[k]);
                }
                for (int i = tl - 1; i >= 0; --i) {  /* the four adjoint recurrences */
#pragma GCC unroll 4
                    for (int k = 0; k < ROWS; ++k) {
                        rb[k][i] = (REAL)r[k];
                        r[k] = (double)ab[k][i] * r[k] + (double)wb[k][i];
                    }
                }
                for (int k = 0; k < ROWS; ++k) {
                    const i64 o = off[k] + t0;
                    const REAL *bc = br[k] + t0, *hc = hs + o, *gyc = gyp[k];
                    const REAL *dtj = kept ? dts + o : dtb[k], *sgj = kept ? sgs + o : sgb[k];
                    const REAL* uc = dir_run_SFX(urow, uT, k, t0, tl, len, urev);
                    REAL* gdc = gdelta + o;
                    double *gbk = gbr[k] + t0, *gck = gcr[k] + t0;
                    memset(gcf, 0, (size_t)tl * sizeof(REAL));
                    memset(gbf, 0, (size_t)tl * sizeof(REAL));
                    bwd_grads_SFX(tl, t0 == 0, gcb[k], rb[k], gyc, uc, dtj, sgj, ab[k], bc, hc,
                                  ad[k], dd[k], hp, gcf, gbf, gub, gdc, &ga_acc[k], &gd_acc[k],
                                  &gb_acc[k]);
#pragma omp simd
                    for (int i = 0; i < tl; ++i) {  /* one row: the same as adding in double */
                        gck[i] += (double)gcf[i];
                        gbk[i] += (double)gbf[i];
                    }
                    dir_add_SFX(gurow, guT, k, t0, tl, len, gub);
                }
            }
            add_transposed_SFX(gurow, H, W, guT);
            for (int k = 0; k < ROWS; ++k) {
                const i64 ch = b * ROWS * dim + k * dim + d;
                gA[ch] = ga_acc[k];
                gD[ch] = gd_acc[k];
                gbias[ch] = gb_acc[k];
            }
        }
    }
}

/* Entry points of the fused SS2D scan: each range gets its own work buffers (malloc'd; a
 * failed allocation returns -1 before anything is written, and the caller raises). */
int usfm_ss2d_fwd_par_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                          const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus,
                          i64 dim, i64 H, i64 W, REAL* y, REAL* hs, REAL* dts, REAL* sgs,
                          i64 tasks, int threads) {
    if (threads > tasks) threads = (int)tasks;
    if (threads < 1) threads = 1;
    const i64 per = 2 * H * W;
    REAL* work = (REAL*)malloc((size_t)(per * threads) * sizeof(REAL));
    if (!work) return -1;
    if (threads == 1) {
        ss2d_fwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, dim, H, W, y, hs, dts, sgs, 0,
                     tasks, work);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int p = 0; p < threads; ++p)
            ss2d_fwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, dim, H, W, y, hs, dts, sgs,
                         tasks * p / threads, tasks * (p + 1) / threads, work + per * p);
    }
    free(work);
    return 0;
}

int usfm_ss2d_bwd_par_SFX(const REAL* u, const REAL* delta, const REAL* A, const REAL* Bm,
                          const REAL* Cm, const REAL* Dv, const REAL* bias, int softplus,
                          i64 bsz, i64 dim, i64 H, i64 W, i64 parts, const REAL* hs,
                          const REAL* dts, const REAL* sgs, const REAL* gy, REAL* gu,
                          REAL* gdelta, double* gA, double* gD, double* gbias, double* gBp,
                          double* gCp, i64 tasks, int threads) {
    if (threads > tasks) threads = (int)tasks;
    if (threads < 1) threads = 1;
    const i64 per = 3 * H * W;
    REAL* work = (REAL*)malloc((size_t)(per * threads) * sizeof(REAL));
    if (!work) return -1;
    if (threads == 1) {
        ss2d_bwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, bsz, dim, H, W, parts, hs, dts,
                     sgs, gy, gu, gdelta, gA, gD, gbias, gBp, gCp, 0, tasks, work);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int p = 0; p < threads; ++p)
            ss2d_bwd_SFX(u, delta, A, Bm, Cm, Dv, bias, softplus, bsz, dim, H, W, parts, hs,
                         dts, sgs, gy, gu, gdelta, gA, gD, gbias, gBp, gCp,
                         tasks * p / threads, tasks * (p + 1) / threads, work + per * p);
    }
    free(work);
    return 0;
}
