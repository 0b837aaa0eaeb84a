/* Full-batch SGD of small ReLU MLPs on a closed-form loss, fused over tiles of samples.
 *
 * The native engine of common/synthetic/fastfit.py (built and loaded by common/synthetic/native.py; plain C, no Python or torch
 * headers, so it compiles in about a second). One call trains one run: one model on a CE / CE + KL loss, or the two
 * models of Alg. 1's joint training on CE + CE + agreement, for `epochs` epochs of SGD with momentum, and writes the
 * weights back into the caller's (torch) arrays.
 *
 * Why a kernel: the synthetic experiments train hundreds of 50-16-16-4 MLPs on 6000 samples, and through torch each
 * epoch is ~25 small ops whose (16, 6000) intermediates and the (50, 6000) input fall out of L2 between ops. Here one
 * tile of T samples goes forward, through the loss's gradient and backward while it is in L1 / L2 (~40 KB), and the
 * weight gradients accumulate over the tiles. The hidden activations are sample-major with the units padded to a
 * multiple of the vector width V (padded units have zero weights and bias, stay exactly zero and receive zero
 * gradient), so every product is a broadcast-FMA on V units and no reduction crosses vector lanes. Logits are
 * transposed to class-major tiles for the loss, which is vectorised over samples.
 *
 * Semantics are those of autograd + torch.optim.SGD (momentum, no dampening, no weight decay) on the loss summed
 * over models, each model's loss the mean over the n samples; only the order of float additions differs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION 1
#define V 8            /* floats per vector (the iota in valid_mask and the 8 x 8 transpose assume 8) */
#define T 96           /* samples per tile: a multiple of V and of the blocking factors 6 and 2 below */
#define SB 6           /* samples per register block in the forward and input-gradient products */
#define MAXL 8         /* layers per model */
#define MAXC 64        /* classes */

enum { LOSS_CE = 0, LOSS_CE_KL = 1, LOSS_JOINT_NCJSD = 2, LOSS_JOINT_MSE = 3, LOSS_JOINT_L1 = 4 };
enum { OK = 0, ERR_ARGS = -1, ERR_MEMORY = -2 };

typedef float vf __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
typedef float vf_u __attribute__((vector_size(V * 4), aligned(4)));   /* unaligned access */
typedef int32_t vi_u __attribute__((vector_size(V * 4), aligned(4)));

static inline vf ld(const float *p) { return *(const vf_u *)p; }
static inline void st(float *p, vf v) { *(vf_u *)p = v; }
static inline vf bc(float s) { return (vf){s, s, s, s, s, s, s, s}; }   /* not {0} + s: that adds -0.0 + s */
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }   /* m ? a : b */
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vf relu(vf a) { return (vf)((vi)a & (a > bc(0.0f))); }
static inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

/* two-vector shuffle with constant indices: GCC >= 12 and clang have __builtin_shufflevector, older GCC only
 * __builtin_shuffle */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* r[i][j] <- r[j][i], an 8 x 8 block in registers (unpack, shuffle, then swap 128-bit halves) */
static inline void transpose(vf *r) {
    vf a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        a[i + 1] = SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)   /* b[i + 2j] = rows i..i+3 at column 2j (and 2j + 4), b[i + 2j + 1] the next */
        for (int j = 0; j < 2; j++) {
            b[i + 2 * j] = SHUFFLE(a[i + j], a[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            b[i + 2 * j + 1] = SHUFFLE(a[i + j], a[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 4; i++) {
        r[i] = SHUFFLE(b[i], b[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = SHUFFLE(b[i], b[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* e^x for x <= 0 (every call site: softmax arguments, -|a - b|), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
 * e^r by a degree-6 polynomial, 2^n through the exponent bits. Arguments below -87 are clamped (e^-87 ~ 1.6e-38,
 * still a normal float): the result is then ~1e-38 where float32 exp gives a denormal or 0. */
static inline vf vexp(vf x) {
    x = vmax(x, bc(-87.0f));
    vf n = (x * bc(1.44269504088896341f) + bc(12582912.0f)) - bc(12582912.0f);   /* round to nearest */
    vf r = x - n * bc(0.693359375f) + n * bc(2.12194440e-4f);
    vf p = bc(1.9875691500e-4f);
    p = p * r + bc(1.3981999507e-3f);
    p = p * r + bc(8.3334519073e-3f);
    p = p * r + bc(4.1665795894e-2f);
    p = p * r + bc(1.6666665459e-1f);
    p = p * r + bc(5.0000001201e-1f);
    p = p * r * r + r + bc(1.0f);
    return p * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

/* ln x for positive normal x (every call site has x >= 1), Cephes' logf. */
static inline vf vlog(vf x) {
    vi bits = (vi)x;
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);
    vf m = (vf)((bits & 0x007fffff) | 0x3f000000);                  /* x = m 2^e, m in [0.5, 1) */
    vi small = m < bc(0.70710678118654752f);
    e = e - sel(small, bc(1.0f), bc(0.0f));
    m = sel(small, m + m, m) - bc(1.0f);
    vf z = m * m;
    vf y = bc(7.0376836292e-2f);
    y = y * m - bc(1.1514610310e-1f);
    y = y * m + bc(1.1676998740e-1f);
    y = y * m - bc(1.2420140846e-1f);
    y = y * m + bc(1.4249322787e-1f);
    y = y * m - bc(1.6668057665e-1f);
    y = y * m + bc(2.0000714765e-1f);
    y = y * m - bc(2.4999993993e-1f);
    y = y * m + bc(3.3333331174e-1f);
    y = y * m * z - e * bc(2.12194440e-4f) - z * bc(0.5f);
    return m + y + e * bc(0.693359375f);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The three products of a layer on one tile. A layer maps K inputs to po (padded) outputs; its weights are held
 * input-major, wt[k * po + o]. The layer's input is addressed as in[s * ss + k * sk]: the tile-major model input
 * (ss = 1, sk = T) or a sample-major hidden activation (ss = padded width, sk = 1). */

/* out[s][o] = act(b[o] + sum_k in(s, k) wt[k][o]) for the T samples of the tile */
#define FWD_BLOCK(NV)                                                                                           \
    for (int s = 0; s < T; s += SB) {                                                                           \
        vf a[SB][NV];                                                                                           \
        for (int i = 0; i < SB; i++)                                                                            \
            for (int j = 0; j < NV; j++) a[i][j] = ld(b + ob + j * V);                                          \
        const float *p = in + s * ss;                                                                           \
        for (int k = 0; k < K; k++) {                                                                           \
            vf w[NV];                                                                                           \
            for (int j = 0; j < NV; j++) w[j] = ld(wt + k * po + ob + j * V);                                   \
            const float *q = p + k * sk;                                                                        \
            for (int i = 0; i < SB; i++) {                                                                      \
                vf xi = bc(q[i * ss]);                                                                          \
                for (int j = 0; j < NV; j++) a[i][j] += xi * w[j];                                              \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < SB; i++)                                                                            \
            for (int j = 0; j < NV; j++) st(out + (s + i) * po + ob + j * V, use_relu ? relu(a[i][j]) : a[i][j]); \
    }

__attribute__((noinline)) static void layer_forward(const float *in, long ss, long sk, int K, const float *wt,
                                                    const float *b, int po, int use_relu, float *out) {
    int ob = 0;
    for (; ob + 2 * V <= po; ob += 2 * V) FWD_BLOCK(2)
    for (; ob < po; ob += V) FWD_BLOCK(1)
}

/* gw[k][o] += sum_s in(s, k) g[s][o] and gb[o] += sum_s g[s][o]: KB inputs at a time, so that KB x NV independent
 * accumulators hide the FMA latency (one input alone would be a dependency chain of T FMAs). */
#define WGRAD_BLOCK2(KB)                                                                                        \
    for (; k + KB <= K; k += KB) {                                                                              \
        vf a[KB][2];                                                                                            \
        for (int i = 0; i < KB; i++) a[i][0] = a[i][1] = bc(0.0f);                                              \
        for (int s = 0; s < T; s++) {                                                                           \
            vf g0 = ld(g + s * po + ob), g1 = ld(g + s * po + ob + V);                                          \
            const float *q = in + s * ss + k * sk;                                                              \
            for (int i = 0; i < KB; i++) {                                                                      \
                vf xi = bc(q[i * sk]);                                                                          \
                a[i][0] += xi * g0;                                                                             \
                a[i][1] += xi * g1;                                                                             \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < KB; i++) {                                                                          \
            float *w = gw + (k + i) * po + ob;                                                                  \
            st(w, ld(w) + a[i][0]);                                                                             \
            st(w + V, ld(w + V) + a[i][1]);                                                                     \
        }                                                                                                       \
    }
/* one output vector: even and odd samples in separate accumulators */
#define WGRAD_BLOCK1(KB)                                                                                        \
    for (; k + KB <= K; k += KB) {                                                                              \
        vf a[KB][2];                                                                                            \
        for (int i = 0; i < KB; i++) a[i][0] = a[i][1] = bc(0.0f);                                              \
        for (int s = 0; s < T; s += 2) {                                                                        \
            vf g0 = ld(g + s * po + ob), g1 = ld(g + (s + 1) * po + ob);                                        \
            const float *q = in + s * ss + k * sk;                                                              \
            for (int i = 0; i < KB; i++) {                                                                      \
                a[i][0] += bc(q[i * sk]) * g0;                                                                  \
                a[i][1] += bc(q[i * sk + ss]) * g1;                                                             \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < KB; i++) {                                                                          \
            float *w = gw + (k + i) * po + ob;                                                                  \
            st(w, ld(w) + a[i][0] + a[i][1]);                                                                   \
        }                                                                                                       \
    }

__attribute__((noinline)) static void layer_weight_grad(const float *in, long ss, long sk, int K, const float *g,
                                                        int po, float *gw, float *gb) {
    for (int ob = 0; ob < po; ob += V) {
        vf a0 = bc(0.0f), a1 = bc(0.0f);
        for (int s = 0; s < T; s += 2) {
            a0 += ld(g + s * po + ob);
            a1 += ld(g + (s + 1) * po + ob);
        }
        st(gb + ob, ld(gb + ob) + a0 + a1);
    }
    int ob = 0;
    for (; ob + 2 * V <= po; ob += 2 * V) {
        int k = 0;
        WGRAD_BLOCK2(8) WGRAD_BLOCK2(4) WGRAD_BLOCK2(2) WGRAD_BLOCK2(1)
    }
    for (; ob < po; ob += V) {
        int k = 0;
        WGRAD_BLOCK1(8) WGRAD_BLOCK1(4) WGRAD_BLOCK1(2) WGRAD_BLOCK1(1)
    }
}

/* gin[s][k] = [act[s][k] > 0] sum_{o < O} g[s][o] wr[o][k]: the gradient at the layer's (ReLU) input, with the
 * weights output-major, wr[o * pi + k], and act the input activation (padded width pi). */
#define IGRAD_BLOCK(NV)                                                                                         \
    for (int s = 0; s < T; s += SB) {                                                                           \
        vf a[SB][NV];                                                                                           \
        for (int i = 0; i < SB; i++)                                                                            \
            for (int j = 0; j < NV; j++) a[i][j] = bc(0.0f);                                                    \
        const float *q = g + s * po;                                                                            \
        for (int o = 0; o < O; o++) {                                                                           \
            vf w[NV];                                                                                           \
            for (int j = 0; j < NV; j++) w[j] = ld(wr + o * pi + kb + j * V);                                   \
            for (int i = 0; i < SB; i++) {                                                                      \
                vf gi = bc(q[i * po + o]);                                                                      \
                for (int j = 0; j < NV; j++) a[i][j] += gi * w[j];                                              \
            }                                                                                                   \
        }                                                                                                       \
        for (int i = 0; i < SB; i++)                                                                            \
            for (int j = 0; j < NV; j++) {                                                                      \
                long at = (long)(s + i) * pi + kb + j * V;                                                      \
                st(gin + at, (vf)((vi)a[i][j] & (ld(act + at) > bc(0.0f))));                                    \
            }                                                                                                   \
    }

__attribute__((noinline)) static void layer_input_grad(const float *g, int po, int O, const float *wr, int pi,
                                                       const float *act, float *gin) {
    int kb = 0;
    for (; kb + 2 * V <= pi; kb += 2 * V) IGRAD_BLOCK(2)
    for (; kb < pi; kb += V) IGRAD_BLOCK(1)
}

/* ---------------------------------------------------------------------------------------------------------------
 * Logit gradients on class-major tiles z[c * T + s], vectorised over V samples. Samples at or past `valid` (the
 * padding of the last tile) get a zero gradient. inv_n = 1 / n: every loss is a mean over the n samples. */

typedef struct {
    int kind, n_classes;
    float ce_weight, kl_scale, inv_temperature, weight;
} Loss;

static inline vi target_mask(vi y, int c) { return y == c; }
static inline vi valid_mask(int s, int valid) { return ((vi){0, 1, 2, 3, 4, 5, 6, 7} + s) < valid; }

/* p[c] = softmax(scale * z)[c] over the classes, for the V samples at s */
static inline void softmax(const float *z, int s, int C, float scale, vf *p) {
    vf m = ld(z + s) * scale;
    for (int c = 1; c < C; c++) m = vmax(m, ld(z + c * T + s) * scale);
    vf sum = bc(0.0f);
    for (int c = 0; c < C; c++) {
        p[c] = vexp(ld(z + c * T + s) * scale - m);
        sum += p[c];
    }
    vf inv = bc(1.0f) / sum;
    for (int c = 0; c < C; c++) p[c] *= inv;
}

/* the non-target distribution (renormalised over c != y): p[c] and log p[c], both 0 at the target */
static inline void nontarget(const float *z, int s, vi y, int C, vf *p, vf *logp) {
    vf top = bc(-INFINITY);
    for (int c = 0; c < C; c++) top = vmax(top, sel(target_mask(y, c), bc(-INFINITY), ld(z + c * T + s)));
    vf sum = bc(0.0f);
    for (int c = 0; c < C; c++) {
        vi t = target_mask(y, c);
        logp[c] = sel(t, bc(0.0f), ld(z + c * T + s) - top);
        p[c] = sel(t, bc(0.0f), vexp(logp[c]));
        sum += p[c];
    }
    vf inv = bc(1.0f) / sum, log_sum = vlog(sum);
    for (int c = 0; c < C; c++) {
        vi t = target_mask(y, c);
        p[c] *= inv;
        logp[c] = sel(t, bc(0.0f), logp[c] - log_sum);
    }
}

/* d JS(P, Q) / d z_c through P's non-target softmax: P_c (h_c - sum_k P_k h_k), h = (log P - log M) / 2 */
static inline void js_grad(const vf *p, const vf *logp, const vf *logm, int C, vf *out) {
    vf mean = bc(0.0f);
    for (int c = 0; c < C; c++) mean += p[c] * ((logp[c] - logm[c]) * bc(0.5f));
    for (int c = 0; c < C; c++) out[c] = p[c] * ((logp[c] - logm[c]) * bc(0.5f) - mean);
}

static inline __attribute__((always_inline)) void loss_grad_c(const Loss *L, int n_models, float *const *z,
                                                               float *const *g, const int32_t *y, const float *teacher,
                                                               int valid, float inv_n, int C) {
    vf p[MAXC], q[MAXC], pa[MAXC], la[MAXC], pb[MAXC], lb[MAXC], m[MAXC], ja[MAXC], jb[MAXC];
    for (int s = 0; s < T; s += V) {
        vi yy = *(const vi_u *)(y + s), ok = valid_mask(s, valid);
        for (int k = 0; k < n_models; k++) {   /* the cross-entropy part of every model */
            softmax(z[k], s, C, 1.0f, p);
            for (int c = 0; c < C; c++) {
                vf onehot = sel(target_mask(yy, c), bc(1.0f), bc(0.0f));
                st(g[k] + c * T + s, (p[c] - onehot) * bc(L->ce_weight));
            }
            if (L->kind == LOSS_CE_KL) {
                if (L->inv_temperature != 1.0f) softmax(z[k], s, C, L->inv_temperature, p);
                for (int c = 0; c < C; c++) {
                    float *gc = g[k] + c * T + s;
                    st(gc, ld(gc) + (p[c] - ld(teacher + c * T + s)) * bc(L->kl_scale));
                }
            }
        }
        if (L->kind == LOSS_JOINT_NCJSD) {
            nontarget(z[0], s, yy, C, pa, la);
            nontarget(z[1], s, yy, C, pb, lb);
            for (int c = 0; c < C; c++) {   /* log M = log((P + Q) / 2) from the log-probabilities */
                vf d = la[c] - lb[c];
                vf u = vexp(sel(d > bc(0.0f), -d, d));
                m[c] = vmax(la[c], lb[c]) + vlog(bc(1.0f) + u) - bc(0.69314718055994531f);
            }
            js_grad(pa, la, m, C, ja);
            js_grad(pb, lb, m, C, jb);
            for (int c = 0; c < C; c++) {
                st(g[0] + c * T + s, ld(g[0] + c * T + s) + ja[c] * bc(L->weight));
                st(g[1] + c * T + s, ld(g[1] + c * T + s) + jb[c] * bc(L->weight));
            }
        } else if (L->kind == LOSS_JOINT_MSE || L->kind == LOSS_JOINT_L1) {
            for (int c = 0; c < C; c++) {
                vf d = ld(z[0] + c * T + s) - ld(z[1] + c * T + s);
                if (L->kind == LOSS_JOINT_L1)
                    d = sel(d > bc(0.0f), bc(1.0f), sel(d < bc(0.0f), bc(-1.0f), bc(0.0f)));
                q[c] = d * bc(L->weight);
                st(g[0] + c * T + s, ld(g[0] + c * T + s) + q[c]);
                st(g[1] + c * T + s, ld(g[1] + c * T + s) - q[c]);
            }
        }
        for (int k = 0; k < n_models; k++)
            for (int c = 0; c < C; c++) {
                float *gc = g[k] + c * T + s;
                st(gc, (vf)((vi)(ld(gc) * bc(inv_n)) & ok));
            }
    }
}

/* the class count as a compile-time constant for the common small cases: the class loops unroll and the per-class
 * vectors stay in registers */
__attribute__((noinline)) static void loss_grad(const Loss *L, int n_models, float *const *z, float *const *g,
                                                const int32_t *y, const float *teacher, int valid, float inv_n) {
    switch (L->n_classes) {
    case 2: loss_grad_c(L, n_models, z, g, y, teacher, valid, inv_n, 2); break;
    case 3: loss_grad_c(L, n_models, z, g, y, teacher, valid, inv_n, 3); break;
    case 4: loss_grad_c(L, n_models, z, g, y, teacher, valid, inv_n, 4); break;
    default: loss_grad_c(L, n_models, z, g, y, teacher, valid, inv_n, L->n_classes);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * One model: its padded parameters, gradients, momentum buffers and per-tile activations. */

typedef struct {
    int L, dims[MAXL + 1], pad[MAXL + 1];   /* pad[0] = dims[0] (inputs are broadcast, never vector-loaded) */
    float *wt[MAXL], *wr[MAXL], *b[MAXL];   /* input-major weights, output-major copy (l >= 1), bias */
    float *gw[MAXL], *gb[MAXL], *mw[MAXL], *mb[MAXL];
    float *act[MAXL + 1], *grad[MAXL + 1];  /* sample-major tiles: act[l] is layer l's input (l >= 1) */
    float *x;                               /* the input, tile-major: x[(t * dims[0] + k) * T + s] */
    float *zt, *gt;                         /* class-major logits and their gradient, one tile */
} Net;

static float *alloc_zero(size_t n, int *failed) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    float *p = bytes ? aligned_alloc(64, bytes) : NULL;
    if (bytes && !p) *failed = 1;
    if (p) memset(p, 0, bytes);
    return p;
}

static void net_free(Net *net) {
    for (int l = 0; l < MAXL; l++) {
        free(net->wt[l]); free(net->wr[l]); free(net->b[l]);
        free(net->gw[l]); free(net->gb[l]); free(net->mw[l]); free(net->mb[l]);
    }
    for (int l = 0; l <= MAXL; l++) { free(net->act[l]); free(net->grad[l]); }
    free(net->x); free(net->zt); free(net->gt);
}

static int net_init(Net *net, int L, const int *dims, float *const *w, float *const *b, const float *x, int n,
                    int tiles) {
    int failed = 0;
    memset(net, 0, sizeof *net);
    net->L = L;
    for (int l = 0; l <= L; l++) {
        net->dims[l] = dims[l];
        net->pad[l] = l == 0 ? dims[0] : round_up(dims[l], V);
    }
    for (int l = 0; l < L; l++) {
        int pi = net->pad[l], po = net->pad[l + 1];
        net->wt[l] = alloc_zero((size_t)pi * po, &failed);
        net->wr[l] = alloc_zero((size_t)pi * po, &failed);
        net->b[l] = alloc_zero(po, &failed);
        net->gw[l] = alloc_zero((size_t)pi * po, &failed);
        net->gb[l] = alloc_zero(po, &failed);
        net->mw[l] = alloc_zero((size_t)pi * po, &failed);
        net->mb[l] = alloc_zero(po, &failed);
    }
    for (int l = 1; l <= L; l++) {
        net->act[l] = alloc_zero((size_t)T * net->pad[l], &failed);
        net->grad[l] = alloc_zero((size_t)T * net->pad[l], &failed);
    }
    int D = dims[0], C = dims[L];
    net->x = alloc_zero((size_t)tiles * D * T, &failed);
    net->zt = alloc_zero((size_t)C * T, &failed);
    net->gt = alloc_zero((size_t)C * T, &failed);
    if (failed) return ERR_MEMORY;
    for (int l = 0; l < L; l++) {
        int po = net->pad[l + 1];
        for (int o = 0; o < dims[l + 1]; o++) {
            net->b[l][o] = b[l][o];
            for (int k = 0; k < dims[l]; k++) net->wt[l][k * po + o] = w[l][(long)o * dims[l] + k];
        }
    }
    for (int t = 0; t < tiles; t++)
        for (int k = 0; k < D; k++) {
            int len = n - t * T < T ? n - t * T : T;
            memcpy(net->x + ((long)t * D + k) * T, x + (long)k * n + (long)t * T, (size_t)len * sizeof(float));
        }
    return OK;
}

static void net_forward(Net *net, int t) {
    int L = net->L, D = net->dims[0];
    for (int l = 0; l < L; l++) {
        const float *in = l == 0 ? net->x + (long)t * D * T : net->act[l];
        long ss = l == 0 ? 1 : net->pad[l], sk = l == 0 ? T : 1;
        layer_forward(in, ss, sk, net->dims[l], net->wt[l], net->b[l], net->pad[l + 1], l < L - 1, net->act[l + 1]);
    }
    int C = net->dims[L], pc = net->pad[L];
    for (int c0 = 0; c0 < C; c0 += V)   /* logits, sample-major (T, pc) -> class-major (C, T) */
        for (int s = 0; s < T; s += V) {
            vf r[V];
            for (int i = 0; i < V; i++) r[i] = ld(net->act[L] + (s + i) * pc + c0);
            transpose(r);
            for (int i = 0; i < V && c0 + i < C; i++) st(net->zt + (c0 + i) * T + s, r[i]);
        }
}

static void net_backward(Net *net, int t) {
    int L = net->L, D = net->dims[0], C = net->dims[L], pc = net->pad[L];
    for (int c0 = 0; c0 < C; c0 += V)   /* class-major (C, T) -> sample-major (T, pc), padded classes 0 */
        for (int s = 0; s < T; s += V) {
            vf r[V];
            for (int i = 0; i < V; i++) r[i] = c0 + i < C ? ld(net->gt + (c0 + i) * T + s) : bc(0.0f);
            transpose(r);
            for (int i = 0; i < V; i++) st(net->grad[L] + (s + i) * pc + c0, r[i]);
        }
    for (int l = L - 1; l >= 0; l--) {
        const float *in = l == 0 ? net->x + (long)t * D * T : net->act[l];
        long ss = l == 0 ? 1 : net->pad[l], sk = l == 0 ? T : 1;
        layer_weight_grad(in, ss, sk, net->dims[l], net->grad[l + 1], net->pad[l + 1], net->gw[l], net->gb[l]);
        if (l > 0)
            layer_input_grad(net->grad[l + 1], net->pad[l + 1], net->dims[l + 1], net->wr[l], net->pad[l],
                             net->act[l], net->grad[l]);
    }
}

static void sgd(float *p, const float *g, float *buf, int n, float lr, float momentum) {
    if (momentum != 0.0f)
        for (int i = 0; i < n; i++) { buf[i] = momentum * buf[i] + g[i]; p[i] -= lr * buf[i]; }
    else
        for (int i = 0; i < n; i++) p[i] -= lr * g[i];
}

static void net_step_begin(Net *net) {   /* zero the gradients; wr = wt transposed for the input gradients */
    for (int l = 0; l < net->L; l++) {
        int pi = net->pad[l], po = net->pad[l + 1];
        memset(net->gw[l], 0, sizeof(float) * pi * po);
        memset(net->gb[l], 0, sizeof(float) * po);
        if (l > 0)
            for (int k = 0; k < pi; k++)
                for (int o = 0; o < po; o++) net->wr[l][o * pi + k] = net->wt[l][k * po + o];
    }
}

static void net_step_end(Net *net, float lr, float momentum) {
    for (int l = 0; l < net->L; l++) {
        sgd(net->wt[l], net->gw[l], net->mw[l], net->pad[l] * net->pad[l + 1], lr, momentum);
        sgd(net->b[l], net->gb[l], net->mb[l], net->pad[l + 1], lr, momentum);
    }
}

static void net_store(const Net *net, float *const *w, float *const *b) {
    for (int l = 0; l < net->L; l++) {
        int po = net->pad[l + 1], in = net->dims[l];
        for (int o = 0; o < net->dims[l + 1]; o++) {
            b[l][o] = net->b[l][o];
            for (int k = 0; k < in; k++) w[l][(long)o * in + k] = net->wt[l][k * po + o];
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * Entry points */

int cmkd_abi_version(void) { return ABI_VERSION; }

/* The kernel's vector e^x (for x <= 0) and ln x (for x > 0), elementwise on n floats: for the tests. */
static void map(vf (*f)(vf), const float *x, float *out, int n, float pad) {
    for (int i = 0; i < n; i += V) {
        float buf[V];
        int len = n - i < V ? n - i : V;
        for (int j = 0; j < V; j++) buf[j] = j < len ? x[i + j] : pad;
        st(buf, f(ld(buf)));
        memcpy(out + i, buf, (size_t)len * sizeof(float));
    }
}
void cmkd_vexp(const float *x, float *out, int n) { map(vexp, x, out, n, 0.0f); }
void cmkd_vlog(const float *x, float *out, int n) { map(vlog, x, out, n, 1.0f); }

/* Train n_models (1, or 2 for a joint loss) models of one run for `epochs` full-batch epochs.
 *   n_layers[m], dims[m * (MAXL + 1) + l]   model m's layer count and widths (dims[0] inputs ... dims[L] classes)
 *   weights[m * MAXL + l], biases[m * MAXL + l]   layer l of model m: (dims[l+1], dims[l]) row-major and
 *                                            (dims[l+1]); read at the start, overwritten with the trained values
 *   inputs[m]                                model m's input, (dims[0], n) row-major (feature-major)
 *   labels                                   (n) class indices in [0, n_classes)
 *   teacher                                  LOSS_CE_KL: the teacher's softmax(z_t / T), (n_classes, n); else NULL
 *   params                                   CE: ce_weight; CE_KL: ce_weight, kl_scale, 1/T; JOINT_NCJSD: weight;
 *                                            JOINT_MSE / JOINT_L1: the agreement gradient's scale
 * Returns 0, or a negative error code (bad arguments, out of memory). */
int cmkd_train(int n_models, const int *n_layers, const int *dims, float *const *weights, float *const *biases,
               const float *const *inputs, const int64_t *labels, int n, int n_classes, const float *teacher,
               int loss_kind, const float *params, int epochs, float lr, float momentum) {
    int joint = loss_kind == LOSS_JOINT_NCJSD || loss_kind == LOSS_JOINT_MSE || loss_kind == LOSS_JOINT_L1;
    if (n_models != (joint ? 2 : 1) || n < 1 || epochs < 0 || n_classes < 2 || n_classes > MAXC ||
        loss_kind < LOSS_CE || loss_kind > LOSS_JOINT_L1 || (loss_kind == LOSS_CE_KL && !teacher))
        return ERR_ARGS;
    for (int m = 0; m < n_models; m++) {
        const int *d = dims + m * (MAXL + 1);
        if (n_layers[m] < 1 || n_layers[m] > MAXL || d[n_layers[m]] != n_classes) return ERR_ARGS;
        for (int l = 0; l <= n_layers[m]; l++)
            if (d[l] < 1) return ERR_ARGS;
    }
    Loss loss = {loss_kind, n_classes, 1.0f, 0.0f, 1.0f, 0.0f};
    if (loss_kind == LOSS_CE) loss.ce_weight = params[0];
    if (loss_kind == LOSS_CE_KL) {
        loss.ce_weight = params[0];
        loss.kl_scale = params[1];
        loss.inv_temperature = params[2];
    }
    if (joint) loss.weight = params[0];

    int tiles = (n + T - 1) / T, status = OK;
    Net nets[2];
    int32_t *y = calloc((size_t)tiles * T, sizeof(int32_t));
    float *tp = loss_kind == LOSS_CE_KL ? calloc((size_t)tiles * n_classes * T, sizeof(float)) : NULL;
    int built = 0;
    if (!y || (loss_kind == LOSS_CE_KL && !tp)) status = ERR_MEMORY;
    for (; status == OK && built < n_models; built++)
        status = net_init(&nets[built], n_layers[built], dims + built * (MAXL + 1), weights + built * MAXL,
                          biases + built * MAXL, inputs[built], n, tiles);
    if (status == OK) {
        for (int s = 0; s < n; s++) {
            if (labels[s] < 0 || labels[s] >= n_classes) { status = ERR_ARGS; break; }
            y[s] = (int32_t)labels[s];
        }
        for (int t = 0; tp && t < tiles; t++)   /* the teacher's probabilities, class-major tiles like the logits */
            for (int c = 0; c < n_classes; c++)
                for (int s = t * T; s < n && s < (t + 1) * T; s++)
                    tp[((long)t * n_classes + c) * T + s - t * T] = teacher[(long)c * n + s];
    }
    float *z[2], *g[2];
    for (int m = 0; m < n_models; m++) { z[m] = nets[m].zt; g[m] = nets[m].gt; }
    for (int e = 0; status == OK && e < epochs; e++) {
        for (int m = 0; m < n_models; m++) net_step_begin(&nets[m]);
        for (int t = 0; t < tiles; t++) {
            for (int m = 0; m < n_models; m++) net_forward(&nets[m], t);
            loss_grad(&loss, n_models, z, g, y + (long)t * T, tp ? tp + (long)t * n_classes * T : NULL,
                      n - t * T, 1.0f / (float)n);
            for (int m = 0; m < n_models; m++) net_backward(&nets[m], t);
        }
        for (int m = 0; m < n_models; m++) net_step_end(&nets[m], lr, momentum);
    }
    for (int m = 0; m < built; m++) {
        if (status == OK) net_store(&nets[m], weights + m * MAXL, biases + m * MAXL);
        net_free(&nets[m]);
    }
    free(y);
    free(tp);
    return status;
}
