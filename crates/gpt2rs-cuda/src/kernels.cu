// GPT-2's non-GEMM work on the GPU, compiled at run time by NVRTC for the GPU present.
//
// Activations of the residual stream stay f32; what feeds a GEMM (layer norm outputs,
// attention outputs, MLP activations) and the KV cache are stored in the weights' type `S::T`
// (f32, f16 or bf16 bit patterns), so cuBLAS multiplies like with like and accumulates in f32.
// No headers: the f16/bf16 conversions are single PTX instructions.

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(T v) { return v; }
    static __device__ __forceinline__ T store(float f) { return f; }
};

struct F16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(T h) {
        float f;
        asm("{cvt.f32.f16 %0, %1;}" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ T store(float f) {
        T h;
        asm("{cvt.rn.f16.f32 %0, %1;}" : "=h"(h) : "f"(f));
        return h;
    }
};

struct BF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(T h) {
        return __uint_as_float(((unsigned int)h) << 16);
    }
    static __device__ __forceinline__ T store(float f) {
        T h;
        asm("{cvt.rn.bf16.f32 %0, %1;}" : "=h"(h) : "f"(f));
        return h;
    }
};

// Sum (or max) over the block; blockDim.x a multiple of 32. `red` holds 32 floats.
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? red[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// x[r] = wte[tokens[r]] + wpe[pos[r]]; one block per row.
template <class S>
__device__ void embed(const int* tokens, const int* pos, const typename S::T* wte,
                      const float* wpe, float* x, int c) {
    int r = blockIdx.x;
    const typename S::T* te = wte + (size_t)tokens[r] * c;
    const float* pe = wpe + (size_t)pos[r] * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) x[(size_t)r * c + i] = S::load(te[i]) + pe[i];
}

// One block per output row r, reading row src = (rows ? rows[r] : r) of x:
// if y: x[src] += y[src] + y_bias (the residual add of the previous projection), then
// out[r] = layernorm(x[src]) · gamma + beta in S::T. The row is kept in shared memory (c
// floats, dynamic) between the passes.
template <class S>
__device__ void add_layernorm(float* __restrict__ x, const float* __restrict__ y,
                              const float* __restrict__ y_bias, const int* __restrict__ rows,
                              const float* __restrict__ gamma, const float* __restrict__ beta,
                              typename S::T* __restrict__ out, int c, float eps) {
    extern __shared__ float row[];
    __shared__ float red[32];
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    float* xr = x + (size_t)src * c;
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = xr[i];
        if (y) {
            v += y[(size_t)src * c + i] + y_bias[i];
            xr[i] = v;
        }
        row[i] = v;
        s += v;
    }
    float mean = block_sum(s, red) / c;
    float q = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float d = row[i] - mean;
        q += d * d;
    }
    float inv = rsqrtf(block_sum(q, red) / c + eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        out[(size_t)r * c + i] = S::store((row[i] - mean) * inv * gamma[i] + beta[i]);
}

// Splits the QKV projection (no bias yet) of row r: q (f32, scaled) to `q`, k and v into the
// row's sequence cache at its position. A sequence's cache holds keys then values, each
// [n_layer][caps[r]][c] in S::T (caps[r]: the positions it has room for, grown in blocks).
// Grid: (rows, c / blockDim.x rounded up), one element a thread.
template <class S>
__device__ void qkv_store(const float* __restrict__ qkv, const float* __restrict__ bias,
                          float* __restrict__ q, const unsigned long long* __restrict__ caches,
                          const int* __restrict__ pos, const int* __restrict__ caps, int c,
                          int layer, int n_layer, float scale) {
    int r = blockIdx.x, i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= c) return;
    size_t cap = caps[r];
    typename S::T* keys = (typename S::T*)caches[r] + ((size_t)layer * cap + pos[r]) * c;
    typename S::T* values = keys + (size_t)n_layer * cap * c;
    const float* row = qkv + (size_t)r * 3 * c;
    q[(size_t)r * c + i] = (row[i] + bias[i]) * scale;
    keys[i] = S::store(row[c + i] + bias[c + i]);
    values[i] = S::store(row[2 * c + i] + bias[2 * c + i]);
}

// softmax(q · Kᵀ) · V for head blockIdx.x of row blockIdx.y over its cache positions
// 0..=pos[r]. Every position is independent work: one thread per position for the scores
// (the head's key read in 16-byte pieces), then threads in groups of d/V covering a value row,
// each group summing every groups-th position, so the loads of all positions are in flight
// together instead of one chain per thread.
// Shared memory (floats): n_ctx scores, 8·blockDim.x partial sums, 32 for reductions, d for q.
template <class S>
__device__ void attention(const float* q, const unsigned long long* caches, const int* pos,
                          const int* caps, typename S::T* out, int c, int n_head, int layer,
                          int n_layer, int n_ctx) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    extern __shared__ float smem[];
    int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x, bd = blockDim.x;
    int d = c / n_head, n = pos[r] + 1;
    float* scores = smem;
    float* part = scores + n_ctx;
    float* red = part + 8 * bd;
    float* qs = red + 32;
    size_t cap = caps[r];
    const T* keys = (const T*)caches[r] + (size_t)layer * cap * c + h * d;
    const T* values = keys + (size_t)n_layer * cap * c;
    for (int i = tid; i < d; i += bd) qs[i] = q[(size_t)r * c + h * d + i];
    __syncthreads();
    // Vector loads need every head slice 16-byte aligned.
    bool vec = c % V == 0 && d % V == 0 && d / V <= bd;

    for (int s = tid; s < n; s += bd) {
        const T* k = keys + (size_t)s * c;
        float acc = 0.f;
        if (vec) {
            for (int i = 0; i < d; i += V) {
                uint4 kv = *(const uint4*)(k + i);
                const T* kt = (const T*)&kv;
#pragma unroll
                for (int e = 0; e < V; e++) acc += qs[i + e] * S::load(kt[e]);
            }
        } else {
            for (int i = 0; i < d; i++) acc += qs[i] * S::load(k[i]);
        }
        scores[s] = acc;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int s = tid; s < n; s += bd) m = fmaxf(m, scores[s]);
    m = block_max(m, red);
    float z = 0.f;
    for (int s = tid; s < n; s += bd) {
        float e = expf(scores[s] - m);
        scores[s] = e;
        z += e;
    }
    z = block_sum(z, red);  // ends past a barrier, so every score above is visible
    float inv = 1.f / z;
    if (vec) {
        int per_row = d / V, groups = bd / per_row;
        int g = tid / per_row, col = (tid % per_row) * V;
        float acc[8];  // V ≤ 8
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = 0.f;
        if (g < groups) {
#pragma unroll 4
            for (int s = g; s < n; s += groups) {
                uint4 vv = *(const uint4*)(values + (size_t)s * c + col);
                const T* vt = (const T*)&vv;
                float p = scores[s];
#pragma unroll
                for (int e = 0; e < V; e++) acc[e] += p * S::load(vt[e]);
            }
#pragma unroll
            for (int e = 0; e < V; e++) part[g * d + col + e] = acc[e];
        }
        __syncthreads();
        for (int i = tid; i < d; i += bd) {
            float t = 0.f;
            for (int j = 0; j < groups; j++) t += part[j * d + i];
            out[(size_t)r * c + h * d + i] = S::store(t * inv);
        }
    } else {
        for (int col = tid; col < d; col += bd) {
            float acc = 0.f;
#pragma unroll 4
            for (int s = 0; s < n; s++) acc += scores[s] * S::load(values[(size_t)s * c + col]);
            out[(size_t)r * c + h * d + col] = S::store(acc * inv);
        }
    }
}

// GPT-2's activations: 0 gelu (tanh), 1 gelu (erf), 2 relu.
__device__ __forceinline__ float activate(float v, int act) {
    if (act == 0) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    if (act == 1) return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    return fmaxf(v, 0.f);
}

// out = act(y + bias) over [rows, n].
template <class S>
__device__ void bias_act(const float* y, const float* bias, typename S::T* out, int n,
                         unsigned long long total, int act) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < total;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = S::store(activate(y[i] + bias[i % n], act));
    }
}


// out[r, j] = Σ_i x[r, i] · w[j, i] for r < R, j < n: decode's matrix-vector products, one warp
// per weight row, so each weight is read once (16-byte loads) for all R rows of x. Both in S::T;
// out f32 [R, n].
// With `act_out`, writes act(v + bias[j]) in S::T there instead (the MLP's first layer).
template <class S, int R>
__device__ void gemv(const typename S::T* __restrict__ x, const typename S::T* __restrict__ w,
                     float* __restrict__ out, int n, int k, const float* __restrict__ bias,
                     typename S::T* __restrict__ act_out, int act) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    int j = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (j >= n) return;
    const T* wr = w + (size_t)j * k;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    if (k % V == 0) {
#pragma unroll 4
        for (int i = lane * V; i < k; i += 32 * V) {
            uint4 wv = *(const uint4*)(wr + i);
            const T* wt = (const T*)&wv;
#pragma unroll
            for (int r = 0; r < R; r++) {
                uint4 xv = *(const uint4*)(x + (size_t)r * k + i);
                const T* xt = (const T*)&xv;
#pragma unroll
                for (int e = 0; e < V; e++) acc[r] += S::load(wt[e]) * S::load(xt[e]);
            }
        }
    } else {
        for (int i = lane; i < k; i += 32) {
            float wf = S::load(wr[i]);
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] += wf * S::load(x[(size_t)r * k + i]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
        if (lane == 0) {
            if (act_out) {
                act_out[(size_t)r * n + j] = S::store(activate(v + bias[j], act));
            } else {
                out[(size_t)r * n + j] = v;
            }
        }
    }
}

#define GEMV(S, name, R)                                                                     \
    extern "C" __global__ void gemv##R##_##name(const S::T* x, const S::T* w, float* out, int n, \
                                               int k, const float* bias, S::T* act_out,       \
                                               int act) {                                     \
        gemv<S, R>(x, w, out, n, k, bias, act_out, act);                                      \
    }

#define INSTANTIATE(S, name)                                                                  \
    extern "C" __global__ void embed_##name(const int* tokens, const int* pos,                \
                                            const S::T* wte, const float* wpe, float* x,      \
                                            int c) {                                          \
        embed<S>(tokens, pos, wte, wpe, x, c);                                                \
    }                                                                                         \
    extern "C" __global__ void add_layernorm_##name(float* x, const float* y,                 \
                                                    const float* y_bias, const int* rows,     \
                                                    const float* gamma, const float* beta,    \
                                                    S::T* out, int c, float eps) {            \
        add_layernorm<S>(x, y, y_bias, rows, gamma, beta, out, c, eps);                       \
    }                                                                                         \
    extern "C" __global__ void qkv_store_##name(const float* qkv, const float* bias, float* q, \
                                                const unsigned long long* caches,             \
                                                const int* pos, const int* caps, int c,       \
                                                int layer, int n_layer, float scale) {        \
        qkv_store<S>(qkv, bias, q, caches, pos, caps, c, layer, n_layer, scale);              \
    }                                                                                         \
    extern "C" __global__ void attention_##name(const float* q,                               \
                                                const unsigned long long* caches,             \
                                                const int* pos, const int* caps, S::T* out,   \
                                                int c, int n_head, int layer, int n_layer,    \
                                                int n_ctx) {                                  \
        attention<S>(q, caches, pos, caps, out, c, n_head, layer, n_layer, n_ctx);            \
    }                                                                                         \
    extern "C" __global__ void bias_act_##name(const float* y, const float* bias, S::T* out,  \
                                               int n, unsigned long long total, int act) {    \
        bias_act<S>(y, bias, out, n, total, act);                                             \
    }

INSTANTIATE(F32, f32)
INSTANTIATE(F16, f16)
INSTANTIATE(BF16, bf16)

#define GEMVS(S, name) \
    GEMV(S, name, 1) GEMV(S, name, 2) GEMV(S, name, 3) GEMV(S, name, 4) \
    GEMV(S, name, 5) GEMV(S, name, 6) GEMV(S, name, 7) GEMV(S, name, 8)
GEMVS(F32, f32)
GEMVS(F16, f16)
GEMVS(BF16, bf16)
