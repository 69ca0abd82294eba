/* The gated delta rule step by step, forward and backward, fp32, for CPU.

   Per (batch, head), with the state kept transposed, H = S^T of shape [Dk, Dv] (rows of Dv
   contiguous floats), a = exp(log_alpha_t), beta = beta_t:

       sk = H^T k                        (S_{t-1} k, [Dv])
       u  = beta (v - a sk)              ("new value", [Dv])
       H  = a H + k u^T                  (S_t = a S_{t-1} (I - beta k k^T) + beta v k^T)
       o  = H^T q                        (S_t q)

   Every step is a few passes over a [Dk, Dv] state that stays in L1 (16 KB at 64 x 64), all of
   them "row += scalar * row" or dot products of rows: about 6 Dk Dv FLOPs a step forward. On one
   CPU core this does the same work as the chunked form (kernels/delta/chunk.py) without its
   [C, C] intra-chunk matrices and their elementwise passes, which is what made that path slow.

   Backward (dH the gradient of the state after step t, carried backwards; H_prev the state
   before it, sk and u as above):

       dq    = H dO                      (dq_j = H_j . dO)
       dH   += q dO^T
       du    = dH^T k,   dk = dH u
       da    = <dH, H_prev> - beta du . sk
       dv    = beta du,  dbeta = du . (v - a sk)
       dsk   = -a beta du:   dk += H_prev dsk,   dH_prev = a dH + k dsk^T
       dlog_alpha = a da

   The forward stores the state every CHECKPOINT steps ([N, Dk, Dv] per head, N = ceil(T / 64));
   the backward recomputes each segment's states and sk from its checkpoint into a per-thread
   buffer, then walks it backwards. Heads run on POSIX threads (one (b, h) per job). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../parallel.h"

#define CHECKPOINT 64

typedef struct {
    int64_t T, Dk, Dv;
    const float *q, *k, *v, *log_alpha, *beta, *h0; /* this head's [T, Dk] ... [T], h0 [Dk, Dv] or NULL */
    float *o, *h_final, *checkpoints;               /* [T, Dv], [Dk, Dv], [N, Dk, Dv] */
    const float *grad_o, *grad_final;               /* backward: [T, Dv], [Dk, Dv] (H layout) */
    float *dq, *dk, *dv, *dlog_alpha, *dbeta, *dh0; /* backward outputs; dh0 [Dk, Dv] (H layout) */
} Head;

/* One forward step from the state H_prev [Dk, Dv] to H (which may be the same buffer); writes sk
   and u, and o = H^T q if o != NULL. */
static inline __attribute__((always_inline)) void step(int64_t Dk, int64_t Dv, const float *H_prev, float *H,
                                                       const float *restrict q, const float *restrict k,
                                                       const float *restrict v, float a, float beta,
                                                       float *restrict sk, float *restrict u, float *restrict o) {
    for (int64_t i = 0; i < Dv; i++) sk[i] = 0.0f;
    for (int64_t j = 0; j < Dk; j++) {
        const float *row = H_prev + j * Dv;
        for (int64_t i = 0; i < Dv; i++) sk[i] += k[j] * row[i];
    }
    for (int64_t i = 0; i < Dv; i++) u[i] = beta * (v[i] - a * sk[i]);
    if (o)
        for (int64_t i = 0; i < Dv; i++) o[i] = 0.0f;
    for (int64_t j = 0; j < Dk; j++) {
        const float *prev = H_prev + j * Dv;
        float *row = H + j * Dv;
        for (int64_t i = 0; i < Dv; i++) row[i] = a * prev[i] + k[j] * u[i];
        if (o)
            for (int64_t i = 0; i < Dv; i++) o[i] += q[j] * row[i];
    }
}

static inline __attribute__((always_inline)) void forward_impl(Head *h, const int64_t Dk, const int64_t Dv) {
    const int64_t T = h->T, size = Dk * Dv;
    float sk[Dv], u[Dv];
    float *H = h->h_final;
    if (h->h0)
        memcpy(H, h->h0, size * sizeof(float));
    else
        memset(H, 0, size * sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        if (t % CHECKPOINT == 0) memcpy(h->checkpoints + (t / CHECKPOINT) * size, H, size * sizeof(float));
        step(Dk, Dv, H, H, h->q + t * Dk, h->k + t * Dk, h->v + t * Dv, expf(h->log_alpha[t]), h->beta[t], sk, u,
             h->o + t * Dv);
    }
}

static inline __attribute__((always_inline)) float dot(const float *restrict x, const float *restrict y, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * y[i];
    return sum;
}

/* Returns 0, or -2 if its buffers could not be allocated. */
static inline __attribute__((always_inline)) int backward_impl(Head *h, const int64_t Dk, const int64_t Dv) {
    const int64_t T = h->T, size = Dk * Dv;
    /* states[m]: the state after m steps of the segment (states[0] = its checkpoint); sks[m], us[m] of step m */
    float *states = malloc((size_t)((CHECKPOINT + 1) * size + 2 * CHECKPOINT * Dv + 3 * Dv + size) * sizeof(float));
    if (!states) return -2;
    float *sks = states + (CHECKPOINT + 1) * size, *us = sks + CHECKPOINT * Dv, *du = us + CHECKPOINT * Dv;
    float *dsk = du + Dv, *da_lanes = dsk + Dv, *dH = da_lanes + Dv;
    memcpy(dH, h->grad_final, size * sizeof(float));
    int64_t segments = (T + CHECKPOINT - 1) / CHECKPOINT;
    for (int64_t s = segments - 1; s >= 0; s--) {
        int64_t t0 = s * CHECKPOINT, t1 = t0 + CHECKPOINT < T ? t0 + CHECKPOINT : T;
        memcpy(states, h->checkpoints + s * size, size * sizeof(float));
        for (int64_t t = t0; t < t1; t++) {
            int64_t m = t - t0;
            step(Dk, Dv, states + m * size, states + (m + 1) * size, NULL, h->k + t * Dk, h->v + t * Dv, expf(h->log_alpha[t]),
                 h->beta[t], sks + m * Dv, us + m * Dv, NULL);
        }
        for (int64_t t = t1 - 1; t >= t0; t--) {
            int64_t m = t - t0;
            const float *H = states + (m + 1) * size, *H_prev = states + m * size;
            const float *q = h->q + t * Dk, *k = h->k + t * Dk, *v = h->v + t * Dv, *dO = h->grad_o + t * Dv;
            const float *sk = sks + m * Dv, *u = us + m * Dv;
            const float a = expf(h->log_alpha[t]), beta = h->beta[t];
            float *dq = h->dq + t * Dk, *dk = h->dk + t * Dk;
            /* o = H^T q:  dq = H dO,  dH += q dO^T;  then du = dH^T k and <dH, H_prev>, summed lane by
               lane over the rows (one horizontal sum per step, not per row) */
            for (int64_t i = 0; i < Dv; i++) du[i] = da_lanes[i] = 0.0f;
            for (int64_t j = 0; j < Dk; j++) {
                float *row = dH + j * Dv;
                const float *prev = H_prev + j * Dv;
                dq[j] = dot(H + j * Dv, dO, Dv);
                for (int64_t i = 0; i < Dv; i++) {
                    row[i] += q[j] * dO[i];
                    du[i] += k[j] * row[i];
                    da_lanes[i] += row[i] * prev[i];
                }
            }
            float da = 0.0f;
            for (int64_t i = 0; i < Dv; i++) da += da_lanes[i];
            /* u = beta (v - a sk) */
            float dbeta = 0.0f, du_sk = 0.0f;
            float *dv = h->dv + t * Dv;
            for (int64_t i = 0; i < Dv; i++) {
                dv[i] = beta * du[i];
                dbeta += du[i] * (v[i] - a * sk[i]);
                du_sk += du[i] * sk[i];
                dsk[i] = -a * beta * du[i];
            }
            da -= beta * du_sk;
            /* H = a H_prev + k u^T and sk = H_prev^T k:  dk = dH u + H_prev dsk (one sum per row),
               dH_prev = a dH + k dsk^T */
            for (int64_t j = 0; j < Dk; j++) {
                float *row = dH + j * Dv;
                const float *prev = H_prev + j * Dv;
                float sum = 0.0f;
                for (int64_t i = 0; i < Dv; i++) {
                    sum += row[i] * u[i] + prev[i] * dsk[i];
                    row[i] = a * row[i] + k[j] * dsk[i];
                }
                dk[j] = sum;
            }
            h->dbeta[t] = dbeta;
            h->dlog_alpha[t] = a * da;
        }
    }
    if (h->dh0) memcpy(h->dh0, dH, size * sizeof(float));
    free(states);
    return 0;
}

/* The head sizes the model uses get their own copies with Dk, Dv known at compile time: the
   row loops are then fixed-length vector code without the generic loops' prologues and checks,
   about twice as fast at 64 x 64. Any other size takes the generic copy. */
static void forward_head(Head *h) {
    if (h->Dk == 64 && h->Dv == 64) forward_impl(h, 64, 64);
    else if (h->Dk == 32 && h->Dv == 32) forward_impl(h, 32, 32);
    else if (h->Dk == 16 && h->Dv == 16) forward_impl(h, 16, 16);
    else forward_impl(h, h->Dk, h->Dv);
}

static int backward_head(Head *h) {
    if (h->Dk == 64 && h->Dv == 64) return backward_impl(h, 64, 64);
    if (h->Dk == 32 && h->Dv == 32) return backward_impl(h, 32, 32);
    if (h->Dk == 16 && h->Dv == 16) return backward_impl(h, 16, 16);
    return backward_impl(h, h->Dk, h->Dv);
}

typedef struct {
    Head *heads;
    int64_t begin, end;
    int backward, status;
} Job;

static void *run_job(void *arg) {
    Job *job = arg;
    for (int64_t i = job->begin; i < job->end; i++) {
        if (job->backward) {
            int status = backward_head(&job->heads[i]);
            if (status) job->status = status;
        } else {
            forward_head(&job->heads[i]);
        }
    }
    return NULL;
}

static int run(Head *heads, int64_t n, int threads, int backward) {
    if (n == 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > n) threads = (int)n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    Job jobs[MAX_THREADS];
    for (int i = 0; i < threads; i++) jobs[i] = (Job){heads, n * i / threads, n * (i + 1) / threads, backward, 0};
    run_jobs(jobs, sizeof(Job), threads, run_job);
    for (int i = 0; i < threads; i++)
        if (jobs[i].status) return jobs[i].status;
    return 0;
}

static Head *heads_for(int64_t BH, int64_t T, int64_t Dk, int64_t Dv, const float *q, const float *k, const float *v,
                       const float *log_alpha, const float *beta, const float *h0, float *checkpoints) {
    Head *heads = calloc((size_t)BH, sizeof(Head));
    if (!heads) return NULL;
    int64_t N = (T + CHECKPOINT - 1) / CHECKPOINT;
    for (int64_t i = 0; i < BH; i++)
        heads[i] = (Head){T, Dk, Dv, q + i * T * Dk, k + i * T * Dk, v + i * T * Dv, log_alpha + i * T, beta + i * T,
                          h0 ? h0 + i * Dk * Dv : NULL, NULL, NULL, checkpoints + i * N * Dk * Dv,
                          NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    return heads;
}

/* Inputs contiguous [BH, T, Dk] / [BH, T, Dv] / [BH, T]; states in H layout [BH, Dk, Dv];
   checkpoints [BH, ceil(T / CHECKPOINT), Dk, Dv]. Returns 0, -2 if out of memory, -4 if Dv > 4096. */
int delta_rule_forward(int64_t BH, int64_t T, int64_t Dk, int64_t Dv, const float *q, const float *k, const float *v,
                       const float *log_alpha, const float *beta, const float *h0, float *o, float *h_final,
                       float *checkpoints, int threads) {
    if (Dv > 4096) return -4; /* sk and u live on the stack */
    Head *heads = heads_for(BH, T, Dk, Dv, q, k, v, log_alpha, beta, h0, checkpoints);
    if (!heads) return -2;
    for (int64_t i = 0; i < BH; i++) {
        heads[i].o = o + i * T * Dv;
        heads[i].h_final = h_final + i * Dk * Dv;
    }
    int status = run(heads, BH, threads, 0);
    free(heads);
    return status;
}

int delta_rule_backward(int64_t BH, int64_t T, int64_t Dk, int64_t Dv, const float *q, const float *k, const float *v,
                        const float *log_alpha, const float *beta, float *checkpoints, const float *grad_o,
                        const float *grad_final, float *dq, float *dk, float *dv, float *dlog_alpha, float *dbeta,
                        float *dh0, int threads) {
    Head *heads = heads_for(BH, T, Dk, Dv, q, k, v, log_alpha, beta, NULL, checkpoints);
    if (!heads) return -2;
    for (int64_t i = 0; i < BH; i++) {
        Head *h = &heads[i];
        h->grad_o = grad_o + i * T * Dv;
        h->grad_final = grad_final + i * Dk * Dv;
        h->dq = dq + i * T * Dk;
        h->dk = dk + i * T * Dk;
        h->dv = dv + i * T * Dv;
        h->dlog_alpha = dlog_alpha + i * T;
        h->dbeta = dbeta + i * T;
        h->dh0 = dh0 ? dh0 + i * Dk * Dv : NULL;
    }
    int status = run(heads, BH, threads, 1);
    free(heads);
    return status;
}
