/* Cross-entropy rows in place, for xent's fused head on the CPU (xent/_cpu_kernel.py builds and loads it).
 *
 * For each row r of a [rows, V] chunk of logits z (float32, or bfloat16 stored as uint16), with
 * u = t z (t = 1/T, the inverse temperature; 1 for cross-entropy) and M = max_j z_j:
 *   m = t M,  S = sum_j exp(t (z_j - M)),  lse = m + log S,  nll = t (M - z_y) + log S
 *   loss_r = a_r * nll + zs * lse^2                          (a_r = w_y, 1 without class weights)
 *   z_j   <- t * scale_r * (p_j * (a_r + 2 zs lse) - a_r [j = y]),   p_j = exp(u_j - m) / S
 * in one read and one write of the row (plus passes over a float32 copy of it that stays in cache),
 * where plain torch makes a pass per operation. With an entropy scale b_r (token log-probs with their
 * entropy H = -sum_j p_j log p_j = log S - sum_j p_j (u_j - m)), the gradient of b_r H is added:
 *   z_j   += -t * b_r * p_j * (log p_j + H) = -t * b_r * p_j * ((u_j - m) - sum_i p_i (u_i - m)).
 * u - m is formed as t (z - M), never as a difference of rounded products: the max's term is exactly 1 and a
 * row of equal logits gives exactly log V at any t. A row with a NaN, +inf, or only -inf logits gets a NaN
 * loss and a NaN gradient, as torch's softmax gives.
 *
 * exp is Cephes' single-precision polynomial (about 1 ulp over the range used, u - m <= 0), written so
 * that the compiler vectorises it; results below 2^-126 are flushed to 0 (a masked -inf logit gives 0).
 * float32 -> bfloat16 rounds to nearest even, as torch's .to(torch.bfloat16). With t = 1 every product
 * by t is exact, so cross-entropy's results do not depend on it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t v) { return bits_to_f32((uint32_t)v << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* exp(x) for x <= 0 (x = z - m); 0 below -87.3 (and for -inf). */
static inline float exp_nonpos(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    float two_n = bits_to_f32((uint32_t)((int32_t)n + 127) << 23);
    return x < -87.0f ? 0.0f : p * two_n;
}

/* e_j = exp(t (x_j - M)) into e (e may be x; NULL: not stored, the losses alone), their sum (in double: a
 * float32 sum in 16 lanes drifts by several ulp over a row of 10^5), and with es, sum_j e_j t (x_j - M)
 * for the entropy (0 where e_j = 0: a -inf logit adds 0 log 0 = 0). The four loops differ only in what
 * they store and sum: the sums are the same whether or not e is stored. */
static inline void row_exp(const float *x, float *e, int64_t V, float t, float M, double *s_out, double *es) {
    double s = 0.0, acc = 0.0;
    if (es && e) {
#pragma omp simd reduction(+ : s, acc)
        for (int64_t j = 0; j < V; j++) {
            float d = (x[j] - M) * t, v = exp_nonpos(d);
            e[j] = v;
            s += (double)v;
            acc += v > 0.0f ? (double)(v * d) : 0.0;
        }
    } else if (es) {
#pragma omp simd reduction(+ : s, acc)
        for (int64_t j = 0; j < V; j++) {
            float d = (x[j] - M) * t, v = exp_nonpos(d);
            s += (double)v;
            acc += v > 0.0f ? (double)(v * d) : 0.0;
        }
    } else if (e) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; j++) {
            float v = exp_nonpos((x[j] - M) * t);
            e[j] = v;
            s += (double)v;
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; j++) s += (double)exp_nonpos((x[j] - M) * t);
    }
    if (es) *es = acc;
    *s_out = s;
}

/* The row's max M (0 is returned for a row with a NaN, +inf, or only -inf, or whose t M overflows),
 * then row_exp. */
static inline int row_softmax(const float *x, float *e, int64_t V, float t, float *m_out, double *s_out,
                              double *es) {
    float m = -INFINITY;
    int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
    for (int64_t j = 0; j < V; j++) {
        m = x[j] > m ? x[j] : m;
        bad |= x[j] != x[j];
    }
    if (bad || !(m * t > -INFINITY && m * t < INFINITY)) return 0;
    *m_out = m;
    row_exp(x, e, V, t, m, s_out, es);
    return 1;
}

/* The loss, the gradient's factors and, with st, the statistics (correct, entropy, lse) of a row (max M,
 * target logit z_y): the gradient is e_j (c + k t (z_j - M)) - cy [j = y], e_j = exp(t (z_j - M)); k is 0
 * without the entropy. */
static inline void row_terms(float M, double s, double es, float z_y, float a, float zs, float t, float scale,
                             float escale, int ent, float *loss, float *c, float *k, float *cy, float *st) {
    double rel = log(s), lse = (double)M * (double)t + rel;
    if (st) {
        st[0] = z_y >= M ? 1.0f : 0.0f;
        st[1] = (float)(rel - es / s);
        st[2] = (float)lse;
    }
    *loss = (float)((double)a * (((double)M - (double)z_y) * (double)t + rel) + (double)zs * lse * lse);
    double g = (double)scale * ((double)a + 2.0 * (double)zs * lse);
    if (ent) g += (double)escale * (es / s); /* -b p_j (d_j - sum_i p_i d_i): its sum_i p_i d_i part */
    *c = (float)(g * (double)t / s);
    *k = ent ? (float)(-(double)t * (double)escale / s) : 0.0f;
    *cy = scale * a * t;
}

/* One row of float32 logits, its gradient written over it (with grad; without, only the loss and the
 * statistics, the row only read). ent: add the entropy's gradient (escale); then the exponentials go to
 * tmp (V floats of scratch), since the last pass needs u_j - m beside them. */
static void ce_row_f32(float *x, int64_t V, int64_t y, float a, float zs, float t, float scale, float escale,
                       int grad, int ent, float *loss, float *st, float *tmp) {
    float *e = !grad ? NULL : ent ? tmp : x; /* without the gradient nothing is written back */
    float z_y = x[y], m, c, k, cy;
    double s, es = 0.0;
    if (!row_softmax(x, e, V, t, &m, &s, st || ent ? &es : NULL)) {
        for (int64_t j = 0; j < V; j++) x[j] = NAN;
        *loss = NAN;
        if (st) st[0] = st[1] = st[2] = NAN;
        return;
    }
    row_terms(m, s, es, z_y, a, zs, t, scale, escale, ent, loss, &c, &k, &cy, st);
    if (!grad) return;
    float e_y = e[y];
    if (e == x) {
#pragma omp simd
        for (int64_t j = 0; j < V; j++) x[j] = c * x[j];
        x[y] = c * e_y - cy;
        return;
    }
#pragma omp simd
    for (int64_t j = 0; j < V; j++) {
        float d = (x[j] - m) * t, v = e[j]; /* d as row_exp formed it */
        x[j] = v > 0.0f ? v * (c + k * d) : 0.0f; /* a -inf logit: 0, not 0 * inf */
    }
    x[y] = (e_y > 0.0f ? e_y * (c + k * ((z_y - m) * t)) : 0.0f) - cy;
}

/* One row of bfloat16 logits (uint16 bits), its gradient written over it with grad (without, the row is
 * only read); tmp: V floats of scratch. */
static void ce_row_bf16(uint16_t *row, int64_t V, int64_t y, float a, float zs, float t, float scale,
                        float escale, int grad, int ent, float *loss, float *st, float *tmp) {
    float m = -INFINITY;
    int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
    for (int64_t j = 0; j < V; j++) { /* the float32 copy and its max in one pass */
        float v = bf16_to_f32(row[j]);
        tmp[j] = v;
        m = v > m ? v : m;
        bad |= v != v;
    }
    if (bad || !(m * t > -INFINITY && m * t < INFINITY)) {
        for (int64_t j = 0; grad && j < V; j++) row[j] = 0x7fc0u;
        *loss = NAN;
        if (st) st[0] = st[1] = st[2] = NAN;
        return;
    }
    float z_y = tmp[y], c, k, cy;
    double s, es = 0.0;
    row_exp(tmp, grad ? tmp : NULL, V, t, m, &s, st || ent ? &es : NULL);
    row_terms(m, s, es, z_y, a, zs, t, scale, escale, ent, loss, &c, &k, &cy, st);
    if (!grad) return;
    float e_y = tmp[y];
    if (!ent) {
#pragma omp simd
        for (int64_t j = 0; j < V; j++) row[j] = f32_to_bf16(c * tmp[j]);
        row[y] = f32_to_bf16(c * e_y - cy);
        return;
    }
#pragma omp simd
    for (int64_t j = 0; j < V; j++) {
        float d = (bf16_to_f32(row[j]) - m) * t, v = tmp[j];
        row[j] = f32_to_bf16(v > 0.0f ? v * (c + k * d) : 0.0f);
    }
    row[y] = f32_to_bf16((e_y > 0.0f ? e_y * (c + k * ((z_y - m) * t)) : 0.0f) - cy);
}

/* The rows of a [rows, V] chunk (row stride ld), split over nthreads threads of the OpenMP runtime torch
 * itself runs on (its libgomp, already loaded, serves this library too), so no second pool spins
 * against torch's. wy: [rows] class weight of each target, or NULL. t: the inverse temperature (1 for
 * cross-entropy). Returns 0, or 1 when scratch could not be allocated (then some rows are not computed).
 * stats: [rows, 3] (correct, entropy, lse) of u = t z, or NULL. scale: [rows] each row's upstream
 * gradient, or NULL for the losses alone (no gradient written). escale: [rows] each row's upstream
 * gradient of its entropy (read only with scale), or NULL for none. */
int xent_ce_rows_f32(float *z, int64_t ld, int64_t rows, int64_t V, const int64_t *target,
                     const float *scale, const float *escale, const float *wy, float zs, float t, float *loss,
                     float *stats, int nthreads) {
    int failed = 0, ent = scale != NULL && escale != NULL;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *tmp = ent ? (float *)malloc(sizeof(float) * (size_t)V) : NULL;
        failed = ent && tmp == NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (!ent || tmp)
                ce_row_f32(z + r * ld, V, target[r], wy ? wy[r] : 1.0f, zs, t, scale ? scale[r] : 0.0f,
                           ent ? escale[r] : 0.0f, scale != NULL, ent, &loss[r], stats ? stats + 3 * r : NULL,
                           tmp);
        free(tmp);
    }
    return failed;
}

int xent_ce_rows_bf16(uint16_t *z, int64_t ld, int64_t rows, int64_t V, const int64_t *target,
                      const float *scale, const float *escale, const float *wy, float zs, float t, float *loss,
                      float *stats, int nthreads) {
    int failed = 0, ent = scale != NULL && escale != NULL;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *tmp = (float *)malloc(sizeof(float) * (size_t)V);
        failed = tmp == NULL;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (tmp)
                ce_row_bf16(z + r * ld, V, target[r], wy ? wy[r] : 1.0f, zs, t, scale ? scale[r] : 0.0f,
                            ent ? escale[r] : 0.0f, scale != NULL, ent, &loss[r], stats ? stats + 3 * r : NULL,
                            tmp);
        free(tmp);
    }
    return failed;
}

/* The evaluation statistics of one row of float32 logits x (only read), in two reads of the row (the
 * second from cache): the max, the count of logits above z_y and the NaN check, then the exponentials'
 * sums. st[0..3] = loss (m - z_y) + log S, entropy log S - sum_j e_j (x_j - m) / S, top-1 probability
 * 1/S, Brier sum_j e_j^2 / S^2 - 2 exp(z_y - m) / S + 1; rank = 1 + #{j : x_j > z_y} (ties in the
 * target's favour), V + 1 where the loss is not finite. A row with a NaN, +inf, or only -inf logits
 * gets NaN statistics. st: the row's loss, its entropy n floats further on, and so on. */
static void eval_row_f32(const float *x, int64_t V, int64_t y, float *st, int64_t n, int64_t *rank) {
    float z_y = x[y], m = -INFINITY;
    int bad = 0;
    int64_t above = 0;
#pragma omp simd reduction(max : m) reduction(| : bad) reduction(+ : above)
    for (int64_t j = 0; j < V; j++) {
        m = x[j] > m ? x[j] : m;
        bad |= x[j] != x[j];
        above += x[j] > z_y;
    }
    if (bad || !(m > -INFINITY && m < INFINITY)) {
        st[0] = st[n] = st[2 * n] = st[3 * n] = NAN;
        *rank = V + 1;
        return;
    }
    double s = 0.0, t = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s, t, q)
    for (int64_t j = 0; j < V; j++) {
        float d = x[j] - m, v = exp_nonpos(d);
        s += (double)v;
        t += v > 0.0f ? (double)v * (double)d : 0.0; /* a -inf logit adds 0 log 0 = 0 */
        q += (double)v * (double)v;
    }
    double rel = log(s), loss = ((double)m - (double)z_y) + rel;
    double q_y = exp((double)z_y - (double)m) / s;
    st[0] = (float)loss;
    st[n] = (float)(rel - t / s);
    st[2 * n] = (float)(1.0 / s); /* the max's exponential is exp(0) = 1 */
    st[3 * n] = (float)(q / (s * s) - 2.0 * q_y + 1.0);
    *rank = isfinite(loss) ? 1 + above : V + 1;
}

/* The evaluation statistics of the rows of a [rows, V] chunk of float32 logits (row stride ld; only
 * read): stats [4, rows] (loss, entropy, top-1 probability, Brier), rank [rows]. */
void xent_eval_rows_f32(const float *z, int64_t ld, int64_t rows, int64_t V, const int64_t *target,
                        float *stats, int64_t *rank, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) eval_row_f32(z + r * ld, V, target[r], stats + r, rows, &rank[r]);
}

/* dst[i] = (fresh ? 0 : dst[i]) + alpha * src[i] over n elements: a bfloat16 product accumulated into a
 * float32 sum in one pass (torch's mixed-dtype add_ converts to a float32 temporary first: two). */
void xent_acc_bf16(float *dst, const uint16_t *src, int64_t n, float alpha, int fresh, int nthreads) {
    if (fresh) {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++) dst[i] = alpha * bf16_to_f32(src[i]);
    } else {
#pragma omp parallel for simd num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++) dst[i] += alpha * bf16_to_f32(src[i]);
    }
}

/* The ABI version the loader checks: bump it with any change of the functions' signatures. */
int xent_ce_rows_abi(void) { return 7; }
