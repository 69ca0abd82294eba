/* Causal depthwise convolution with K taps, SiLU, and optionally an L2 normalisation of groups of
   channels, forward and backward, fp32, for CPU.

   Per batch b, time t and channel c (x_t for t < 0 comes from `tail`, zeros when tail is NULL):

       pre_t = sum_{j<K} w[j][c] x_{t-K+1+j},      y_t = silu(pre_t) = pre_t sigmoid(pre_t)
       out_t = y_t / max(|y_t|_G, eps)  for the first `norm_channels` channels, in groups G of
               `group` channels (the heads of q and k); out_t = y_t for the others

   Backward: for a normalised group, gy = (gout - out (out . gout)) / max(|y|, eps) (gout / eps when
   |y| < eps, where the denominator is the constant eps), else gy = gout; then
   gpre_t = gy_t sigmoid(pre_t) (1 + pre_t (1 - sigmoid(pre_t))) and

       gx_p  = sum_j w[j][c] gpre_{p+K-1-j}          (0 <= p+K-1-j < T; p < 0 is the tail's gradient)
       gw[j] = sum_{b,t} gpre_t x_{t-K+1+j}

   One pass over the rows each way: the torch version of the same op makes ~25 passes over
   [B, T, C] (cat, K multiply-adds, SiLU, and in backward slice-gradients, zero fills and
   reductions), and F.normalize another dozen. The backward recomputes pre_t (cheaper than storing
   it) and keeps the last K rows of gpre in a ring buffer. Channels are the inner, contiguous
   dimension (vectorised by the compiler); threads take disjoint ranges of whole channel blocks
   and groups, so weight-gradient sums need no atomics; they are accumulated in double. exp is a
   vectorisable polynomial (below), not libm's.
   Layout: x rows may have any stride (a split view of the input projection); w is [K, C]
   (transposed by the caller); out, gout, gx are contiguous [B, T, C]; tail and gtail [B, K-1, C]. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../parallel.h"

#define MAX_TAPS 16
#define BLOCK 64 /* channels per inner block: a multiple of every SIMD width */

/* exp(x) for float, ~2 ulp on [-87, 88]: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 Taylor polynomial, then
   2^n by building the exponent bits. Written without branches or calls so that the compiler
   vectorises it. Below -87.3 it returns 0 and above 88.7 +inf, so sigmoid saturates to exactly
   0 and 1; in between the ends are clamped (only denormal results change, sigmoid's below 1e-37).
   NaN stays NaN (the polynomial carries it). */
static inline float exp_poly(float x) {
    float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* keeps the exponent bits in range */
    float n = nearbyintf(clamped * 1.44269504088896341f);
    float r = clamped - n * 0.693145751953125f; /* Cody-Waite: ln2 split into a high part with zeros */
    r = r - n * 1.428606765330187045e-06f; /* and the low part */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float result = p * scale;
    result = x > 88.7f ? INFINITY : result;
    return x < -87.3f ? 0.0f : result;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

typedef struct {
    int64_t B, T, C, K, x_stride_b, x_stride_t, norm_channels, group;
    float eps;
    const float *x, *tail, *w, *gy;
    float *y, *gx, *gtail, *gw;
    int64_t c_begin, c_end;
    int failed; /* set by a job that could not allocate its buffers */
} Job;

/* x_{b, t} row pointer for t in [-(K-1), T): the tail for t < 0 (NULL if it is all zeros). */
static inline const float *x_row(const Job *j, int64_t b, int64_t t) {
    if (t >= 0) return j->x + b * j->x_stride_b + t * j->x_stride_t;
    if (!j->tail) return NULL;
    return j->tail + (b * (j->K - 1) + (j->K - 1 + t)) * j->C;
}

static void pre_activation(const Job *j, int64_t b, int64_t t, int64_t c0, int64_t n, float *pre) {
    for (int64_t i = 0; i < n; i++) pre[i] = 0.0f;
    for (int64_t tap = 0; tap < j->K; tap++) {
        const float *row = x_row(j, b, t - j->K + 1 + tap);
        if (!row) continue;
        const float *w = j->w + tap * j->C + c0;
        row += c0;
        for (int64_t i = 0; i < n; i++) pre[i] += w[i] * row[i];
    }
}

/* Normalise, in place, the groups of row[c_begin..c_end) that lie in the first norm_channels
   channels (row is indexed by absolute channel). */
static void normalise_groups(const Job *j, float *row) {
    int64_t end = j->c_end < j->norm_channels ? j->c_end : j->norm_channels;
    for (int64_t g0 = j->c_begin; g0 < end; g0 += j->group) {
        float squares = 0.0f;
        for (int64_t i = 0; i < j->group; i++) squares += row[g0 + i] * row[g0 + i];
        float norm = sqrtf(squares);
        float inverse = 1.0f / (norm > j->eps ? norm : j->eps);
        for (int64_t i = 0; i < j->group; i++) row[g0 + i] *= inverse;
    }
}

static void *forward_job(void *arg) {
    const Job *j = arg;
    float pre[BLOCK];
    for (int64_t b = 0; b < j->B; b++)
        for (int64_t t = 0; t < j->T; t++) {
            float *row = j->y + (b * j->T + t) * j->C;
            for (int64_t c0 = j->c_begin; c0 < j->c_end; c0 += BLOCK) {
                int64_t n = j->c_end - c0 < BLOCK ? j->c_end - c0 : BLOCK;
                pre_activation(j, b, t, c0, n, pre);
                float *out = row + c0;
                for (int64_t i = 0; i < n; i++) out[i] = pre[i] * sigmoid(pre[i]);
            }
            if (j->norm_channels > j->c_begin) normalise_groups(j, row);
        }
    return NULL;
}

#define FLUSH 64 /* time steps summed in fp32 before a weight-gradient partial sum goes into double */

/* Rows are visited in order (b, t) and, inside a row, the thread's channels in blocks: every
   access is sequential. Per thread: the last K rows of gpre (ring), the fp32 partial and the
   double weight-gradient sums, each [K, width] (width = the thread's channels; ~36 KB at 768). */
static void *backward_job(void *arg) {
    Job *j = arg;
    const int64_t K = j->K, T = j->T, C = j->C, c_begin = j->c_begin, width = j->c_end - j->c_begin;
    /* ring: gpre of step t at ring[(t % K) * width]; then the fp32 weight-gradient partial sums,
       and this row's pre-activation and silu output */
    float *ring = calloc((size_t)((2 * K + 2) * width), sizeof(float));
    float *partial = ring + K * width, *pre = partial + K * width, *y = pre + width;
    double *gw = calloc((size_t)(K * width), sizeof(double));
    if (!ring || !gw) {
        free(ring);
        free(gw);
        j->failed = 1;
        return NULL;
    }
    for (int64_t b = 0; b < j->B; b++) {
        for (int64_t t = 0; t < T + K - 1; t++) {
            if (t < T) {
                float *gpre = ring + (t % K) * width;
                const float *g = j->gy + (b * T + t) * C + c_begin;
                for (int64_t c0 = c_begin; c0 < j->c_end; c0 += BLOCK) {
                    int64_t n = j->c_end - c0 < BLOCK ? j->c_end - c0 : BLOCK, at = c0 - c_begin;
                    pre_activation(j, b, t, c0, n, pre + at);
                    for (int64_t i = at; i < at + n; i++) {
                        y[i] = pre[i] * sigmoid(pre[i]);
                        gpre[i] = g[i];
                    }
                }
                /* through the normalisation: gy = (gout - out (out . gout)) / max(|y|, eps) */
                int64_t norm_end = (j->c_end < j->norm_channels ? j->c_end : j->norm_channels) - c_begin;
                for (int64_t g0 = 0; g0 < norm_end; g0 += j->group) {
                    float squares = 0.0f, dot = 0.0f;
                    for (int64_t i = g0; i < g0 + j->group; i++) {
                        squares += y[i] * y[i];
                        dot += y[i] * g[i];
                    }
                    float norm = sqrtf(squares);
                    float inverse = 1.0f / (norm > j->eps ? norm : j->eps);
                    float along = norm > j->eps ? dot * inverse * inverse : 0.0f; /* (out . gout) / |y| */
                    for (int64_t i = g0; i < g0 + j->group; i++) gpre[i] = (g[i] - y[i] * along) * inverse;
                }
                for (int64_t i = 0; i < width; i++) {
                    float s = sigmoid(pre[i]);
                    gpre[i] *= s * (1.0f + pre[i] * (1.0f - s));
                }
                for (int64_t tap = 0; tap < K; tap++) {
                    const float *row = x_row(j, b, t - K + 1 + tap);
                    if (!row) continue;
                    row += c_begin;
                    float *acc = partial + tap * width;
                    for (int64_t i = 0; i < width; i++) acc[i] += gpre[i] * row[i];
                }
                if ((t + 1) % FLUSH == 0 || t == T - 1)
                    for (int64_t i = 0; i < K * width; i++) {
                        gw[i] += partial[i];
                        partial[i] = 0.0f;
                    }
            }
            /* gx at p = t - (K-1): sum over taps j of w[j] gpre_{t-j} (steps outside [0, T) give nothing). */
            int64_t p = t - (K - 1);
            float *out = p >= 0 ? j->gx + (b * T + p) * C
                                : (j->gtail ? j->gtail + (b * (K - 1) + (K - 1 + p)) * C : NULL);
            if (!out) continue;
            for (int64_t c = c_begin; c < j->c_end; c++) out[c] = 0.0f;
            for (int64_t tap = 0; tap < K; tap++) {
                int64_t s = t - tap;
                if (s < 0 || s >= T) continue;
                const float *src = ring + (s % K) * width - c_begin;
                const float *w = j->w + tap * C;
                for (int64_t c = c_begin; c < j->c_end; c++) out[c] += w[c] * src[c];
            }
        }
    }
    for (int64_t tap = 0; tap < K; tap++)
        for (int64_t i = 0; i < width; i++) j->gw[tap * C + c_begin + i] = (float)gw[tap * width + i];
    free(ring);
    free(gw);
    return NULL;
}

/* Split channels into `threads` ranges of whole blocks and run `fn` on each (the caller's thread
   takes the first). Returns 0; -1 if K is out of range, -3 if the normalised channels are not whole groups,
   -2 if a job could not allocate its buffers. */
static int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

static int run(Job base, int threads, void *(*fn)(void *)) {
    if (base.K < 1 || base.K > MAX_TAPS) return -1;
    if (base.norm_channels < 0 || base.norm_channels > base.C ||
        (base.norm_channels > 0 && (base.group < 1 || base.norm_channels % base.group != 0)))
        return -3;
    /* ranges are whole blocks and, where groups are normalised, whole groups */
    int64_t unit = base.norm_channels > 0 ? BLOCK / gcd(BLOCK, base.group) * base.group : BLOCK;
    int64_t units = (base.C + unit - 1) / unit;
    if (units == 0 || base.B == 0 || base.T == 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > units) threads = (int)units;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    Job jobs[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].c_begin = units * i / threads * unit;
        int64_t end = units * (i + 1) / threads * unit;
        jobs[i].c_end = end < base.C ? end : base.C;
    }
    run_jobs(jobs, sizeof(Job), threads, fn);
    for (int i = 0; i < threads; i++)
        if (jobs[i].failed) return -2;
    return 0;
}

int short_conv_silu_forward(int64_t B, int64_t T, int64_t C, int64_t K, const float *x, int64_t x_stride_b,
                            int64_t x_stride_t, const float *tail, const float *w, float *y, int64_t norm_channels,
                            int64_t group, float eps, int threads) {
    Job j = {B, T, C, K, x_stride_b, x_stride_t, norm_channels, group, eps,
             x, tail, w, NULL, y, NULL, NULL, NULL, 0, 0, 0};
    return run(j, threads, forward_job);
}

int short_conv_silu_backward(int64_t B, int64_t T, int64_t C, int64_t K, const float *x, int64_t x_stride_b,
                             int64_t x_stride_t, const float *tail, const float *w, const float *gy, float *gx,
                             float *gtail, float *gw, int64_t norm_channels, int64_t group, float eps, int threads) {
    Job j = {B, T, C, K, x_stride_b, x_stride_t, norm_channels, group, eps,
             x, tail, w, gy, NULL, gx, gtail, gw, 0, 0, 0};
    return run(j, threads, backward_job);
}
