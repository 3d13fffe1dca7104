// GPT-2's non-GEMM work on the GPU, compiled at run time by NVRTC for the GPU present.
//
// Activations of the residual stream stay f32; what feeds a GEMM (layer norm outputs,
// attention outputs, MLP activations) and the KV cache are stored in the weights' type `S::T`
// (f32, f16 or bf16 bit patterns), so cuBLAS multiplies like with like and accumulates in f32.
// No headers: the f16/bf16 conversions are single PTX instructions.

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (Hopper and later): each kernel lets the next one launch as
// soon as all its blocks have started, and waits for the previous one to finish (and its
// writes to be visible) before touching anything it wrote or reads. What comes before the
// wait may only read weights. Without the launch attribute, or before sm_90, both are no-ops.
__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
#define PDL_START() \
    pdl_launch_next(); \
    pdl_wait();
#define NEG_INF __int_as_float(0xff800000)

// Logits rows are padded to whole 32-byte pieces (GPT-2's 50,257 is odd): with an odd row
// stride cuBLAS falls back to old alignment-1 kernels for the LM head. The engine's
// logits_stride is the same.
__device__ __forceinline__ size_t logits_stride(int v) { return (size_t)((v + 7) & ~7); }

// A logit and its token as one orderable 64-bit key: atomicMax over keys keeps the largest
// logit and, among equal ones, the smallest token (as the host's argmax); NaN never wins.
__device__ __forceinline__ unsigned long long pick_key(float v, int j) {
    unsigned int u = __float_as_uint(v);
    u = v != v ? 0u : (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned int)(~j);
}

// Uniform noise in (0, 1) for `token` under `seed`: splitmix64, 23 bits (gpt2rs::engine::
// pick_noise does the same integer steps; with 24 the largest value rounded to 1.0).
__device__ __forceinline__ float pick_noise(unsigned long long seed, int token) {
    unsigned long long z = seed + (unsigned long long)(token + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 41) + 0.5f) * (1.f / 8388608.f);
}

// What picked row b ranks token j by: its logit v (greedy, inv_t[b] = 0), or the Gumbel-max
// draw v · inv_t[b] + gumbel(noise), a sample from softmax(v / temperature).
__device__ __forceinline__ float pick_score(float v, int b, int j, const float* inv_t,
                                            const unsigned long long* seeds) {
    float it = inv_t[b];
    if (it == 0.f) return v;
    return v * it - logf(-logf(pick_noise(seeds[b], j)));
}

struct F32 {
    static const bool HALF = false;  // f16: products summed in f16 pairs (see WFloat::fma)
    typedef float T;
    static __device__ __forceinline__ float load(T v) { return v; }
    static __device__ __forceinline__ T store(float f) { return f; }
};

struct F16 {
    static const bool HALF = true;
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
    static const bool HALF = false;
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

// acc[e] += p · v[e] for the V values of one 16-byte piece of a value row (softmax-weighted sums).
template <class S, int V>
__device__ __forceinline__ void add_weighted_piece(float* acc, uint4 piece, float p) {
    const typename S::T* vt = (const typename S::T*)&piece;
#pragma unroll
    for (int e = 0; e < V; e++) acc[e] += p * S::load(vt[e]);
}

// How a weight matrix is stored (the W of the product kernels), as rows of 16-byte pieces:
//   WFloat<S>  S::T elements, row-major [n, k] (16 / sizeof(T) a piece);
//   Q8         int8 in groups of 32 along k, one f16 scale per group (half a group a piece);
//   Q4         a group of 32 per piece: byte b holds element b in its low nibble and b + 16 in
//              its high one, each stored as q + 8; one f16 scale per group.
// Quantized rows are padded with zeros to whole groups (gpt2rs::quant's layout). Each format
// gives a row's size, its pieces, the scalar `at` (embedding rows, dequantizing, odd widths)
// and `fma`: one piece times R rows of activations, added into acc.
__device__ __forceinline__ int groups32(int k) { return (k + 31) >> 5; }

// Integers to floats without the conversion unit: the float with bits 0x4B000000 | u is
// exactly 2^23 + u for u < 2^23.
__device__ __forceinline__ float int8_value(unsigned int word, int b) {
    unsigned int u = ((word >> (8 * b)) & 0xffu) ^ 0x80u;  // two's complement, offset by 128
    return __uint_as_float(0x4B000000u | u) - 8388736.f;     // 2^23 + 128
}
__device__ __forceinline__ float int4_value(unsigned int word, int shift) {
    return __uint_as_float(0x4B000000u | ((word >> shift) & 0xfu)) - 8388616.f;  // 2^23 + 8
}

// Packed pairs of f16 (f16x2 in a 32-bit register).
__device__ __forceinline__ unsigned int h2_sub(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ unsigned int h2_mul(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ unsigned int h2_fma(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ float h2_sum(unsigned int h) {
    float lo, hi;
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi)
        : "r"(h));
    return lo + hi;
}

// The integer formats' weights as f16 pairs, exactly: the f16 with bits 0x6400 | u is 1024 + u
// for u < 1024, so a byte (or nibble) moved under 0x64 and 1024 + its offset subtracted is
// its value; times the group's scale it is the weight rounded to f16, as an f16 model holds
// it. Each run of 16 products is summed in f16 pairs (8 terms a half, weights × activations
// of order one), then added to the f32 accumulators: a third of the instructions of
// converting every value to f32, which the integer kernels were bound by.
template <int PAIRS>
__device__ __forceinline__ void fma_pairs(const unsigned int* w2, const unsigned int* x2,
                                          float* acc, int r) {
    unsigned int h = 0;
#pragma unroll
    for (int q = 0; q < PAIRS; q++) h = h2_fma(w2[q], x2[q], h);
    acc[r] += h2_sum(h);
}

#ifndef HALF_PAIRS
#define HALF_PAIRS 1
#endif
template <class S>
struct WFloat {
    typedef typename S::T T;
    static const int E = 16 / sizeof(T);  // values per piece
    static const bool SCALED = false;     // no group scales
    static __device__ __forceinline__ size_t row_bytes(int k) { return (size_t)k * sizeof(T); }
    static __device__ __forceinline__ int pieces(int k) { return k / E; }
    static __device__ __forceinline__ bool vec(int k) { return k % E == 0; }
    static __device__ __forceinline__ float at(const unsigned char* w, const unsigned short*,
                                               int j, int i, int k) {
        return S::load(((const T*)w)[(size_t)j * k + i]);
    }
    static __device__ __forceinline__ int group(int) { return 0; }
    template <class A, int R>
    static __device__ __forceinline__ void fma_s(uint4 piece, int p, unsigned int,
                                                 const typename A::T* x, int k, float* acc) {
        fma<A, R>(piece, p, nullptr, x, k, acc);
    }
    template <class A, int R>
    static __device__ __forceinline__ void fma(uint4 piece, int p, const unsigned short*,
                                               const typename A::T* x, int k, float* acc) {
        typedef typename A::T X;
        const T* wt = (const T*)&piece;
        if (HALF_PAIRS && S::HALF && A::HALF) {
            // f16 × f16: the piece's 8 products summed in f16 pairs, as the integer formats
            // do, instead of 16 conversions to f32 a piece, which bounded the persistent
            // decode kernel's products (HALF_PAIRS=0 in GPT2RS_CUDA_DEFINES restores them).
#pragma unroll
            for (int r = 0; r < R; r++) {
                uint4 xv = *(const uint4*)(x + (size_t)r * k + p * E);
                fma_pairs<4>((const unsigned int*)&piece, (const unsigned int*)&xv, acc, r);
            }
        } else {
#pragma unroll
            for (int r = 0; r < R; r++) {
                uint4 xv = *(const uint4*)(x + (size_t)r * k + p * E);
                const X* xt = (const X*)&xv;
#pragma unroll
                for (int q = 0; q < E; q++) acc[r] += S::load(wt[q]) * A::load(xt[q]);
            }
        }
    }
};

// The integer formats run with f16 activations (A = F16).
struct Q8 {
    static const int E = 16;
    static const bool SCALED = true;
    static __device__ __forceinline__ size_t row_bytes(int k) { return (size_t)groups32(k) * 32; }
    static __device__ __forceinline__ int pieces(int k) { return groups32(k) * 2; }
    // Whole groups only: a padded last group would read past the activations' row.
    static __device__ __forceinline__ bool vec(int k) { return k % 32 == 0; }
    static __device__ __forceinline__ float at(const unsigned char* w, const unsigned short* s,
                                               int j, int i, int k) {
        size_t g = (size_t)j * groups32(k) + (i >> 5);
        return F16::load(s[g]) * (float)((const signed char*)w)[g * 32 + (i & 31)];
    }
    static __device__ __forceinline__ void unpack(uint4 piece, int p, const unsigned short* srow,
                                                  float* v) {
        unsigned int wv[4] = {piece.x, piece.y, piece.z, piece.w};
        float d = F16::load(srow[p >> 1]);
#pragma unroll
        for (int q = 0; q < 16; q++) v[q] = d * int8_value(wv[q >> 2], q & 3);
    }
    // The group (scale index) of piece p.
    static __device__ __forceinline__ int group(int p) { return p >> 1; }
    template <class A, int R>
    static __device__ __forceinline__ void fma(uint4 piece, int p, const unsigned short* srow,
                                               const unsigned short* x, int k, float* acc) {
        fma_s<A, R>(piece, p, __ldg(srow + group(p)), x, k, acc);
    }
    // fma with the piece's scale s (f16 bits) already read.
    template <class A, int R>
    static __device__ __forceinline__ void fma_s(uint4 piece, int p, unsigned int s,
                                                 const unsigned short* x, int k, float* acc) {
        unsigned int d2 = s | (s << 16);
        unsigned int wv[4] = {piece.x, piece.y, piece.z, piece.w};
        unsigned int w2[8];  // values (0, 1), (2, 3), ... of the piece
#pragma unroll
        for (int q = 0; q < 4; q++) {
            unsigned int u = wv[q] ^ 0x80808080u;  // each byte offset by 128
            w2[2 * q] = h2_mul(h2_sub(__byte_perm(u, 0x64646464u, 0x4140), 0x64806480u), d2);
            w2[2 * q + 1] = h2_mul(h2_sub(__byte_perm(u, 0x64646464u, 0x4342), 0x64806480u), d2);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint4* xr = (const uint4*)(x + (size_t)r * k + p * 16);
            uint4 a = xr[0], b = xr[1];
            unsigned int x2[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            fma_pairs<8>(w2, x2, acc, r);
        }
    }
};

struct Q4 {
    static const int E = 32;
    static const bool SCALED = true;
    static __device__ __forceinline__ size_t row_bytes(int k) { return (size_t)groups32(k) * 16; }
    static __device__ __forceinline__ int pieces(int k) { return groups32(k); }
    static __device__ __forceinline__ bool vec(int k) { return k % 32 == 0; }
    static __device__ __forceinline__ float at(const unsigned char* w, const unsigned short* s,
                                               int j, int i, int k) {
        size_t g = (size_t)j * groups32(k) + (i >> 5);
        int e = i & 31;
        unsigned int b = w[g * 16 + (e & 15)];
        return F16::load(s[g]) * int4_value(b, e < 16 ? 0 : 4);
    }
    static __device__ __forceinline__ void unpack(uint4 piece, int p, const unsigned short* srow,
                                                  float* v) {
        unsigned int wv[4] = {piece.x, piece.y, piece.z, piece.w};
        float d = F16::load(srow[p]);
#pragma unroll
        for (int b = 0; b < 16; b++) {
            v[b] = d * int4_value(wv[b >> 2], 8 * (b & 3));
            v[b + 16] = d * int4_value(wv[b >> 2], 8 * (b & 3) + 4);
        }
    }
    static __device__ __forceinline__ int group(int p) { return p; }
    template <class A, int R>
    static __device__ __forceinline__ void fma(uint4 piece, int p, const unsigned short* srow,
                                               const unsigned short* x, int k, float* acc) {
        fma_s<A, R>(piece, p, __ldg(srow + group(p)), x, k, acc);
    }
    template <class A, int R>
    static __device__ __forceinline__ void fma_s(uint4 piece, int p, unsigned int s,
                                                 const unsigned short* x, int k, float* acc) {
        unsigned int d2 = s | (s << 16);
        unsigned int wv[4] = {piece.x, piece.y, piece.z, piece.w};
        // Word q holds values 4q..4q+3 in its low nibbles and 16 + those in its high ones;
        // masking two nibbles 16 bits apart gives the pairs (4q, 4q+2) and (4q+1, 4q+3).
        unsigned int w2[16];
#pragma unroll
        for (int q = 0; q < 4; q++) {
#pragma unroll
            for (int t = 0; t < 4; t++) {  // shifts 0, 8: low nibbles; 4, 12: high ones
                int shift = (t & 1) * 8 + (t >> 1) * 4;
                unsigned int v = ((wv[q] >> shift) & 0x000F000Fu) | 0x64006400u;
                w2[(t >> 1) * 8 + 2 * q + (t & 1)] = h2_mul(h2_sub(v, 0x64086408u), d2);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint4* xr = (const uint4*)(x + (size_t)r * k + p * 32);
            unsigned int xw[16];
#pragma unroll
            for (int h = 0; h < 4; h++) {
                uint4 v = xr[h];
                xw[4 * h] = v.x, xw[4 * h + 1] = v.y, xw[4 * h + 2] = v.z, xw[4 * h + 3] = v.w;
            }
            // The activations in the same pairs: (4q, 4q+2), (4q+1, 4q+3), then 16 on.
            unsigned int x2[16];
#pragma unroll
            for (int half = 0; half < 2; half++) {
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    unsigned int a = xw[half * 8 + 2 * q], b = xw[half * 8 + 2 * q + 1];
                    x2[half * 8 + 2 * q] = __byte_perm(a, b, 0x5410);
                    x2[half * 8 + 2 * q + 1] = __byte_perm(a, b, 0x7632);
                }
            }
            fma_pairs<8>(w2, x2, acc, r);
            fma_pairs<8>(w2 + 8, x2 + 8, acc, r);
        }
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

// x[r] = wte[tokens[r]] + wpe[pos[r]]; one block per row. Also clears the pass's n_picks
// pick keys (the LM head's matrix-vector kernel takes their maximum).
template <class W>
__device__ void embed(const int* tokens, const int* pos, const unsigned char* wte,
                      const unsigned short* wte_scales, const float* wpe, float* x, int c,
                      unsigned long long* picks, int n_picks) {
    int r = blockIdx.x, t = tokens[r];
    if (r == 0 && (int)threadIdx.x < n_picks) picks[threadIdx.x] = 0;
    const float* pe = wpe + (size_t)pos[r] * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        x[(size_t)r * c + i] = W::at(wte, wte_scales, t, i, c) + pe[i];
}

// out[j, i] = w[j, i] in S::T, [n, k] row-major: a quantized matrix for cuBLAS (passes of more
// rows than the matrix-vector kernels take), in f16 (S = F16). One thread per 16-byte piece.
template <class S, class W>
__device__ void dequantize(const unsigned char* w, const unsigned short* scales, int n, int k,
                           typename S::T* out) {
    int pieces = W::pieces(k);
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < (long long)n * pieces;
         t += (long long)gridDim.x * blockDim.x) {
        int j = (int)(t / pieces), p = (int)(t % pieces);
        uint4 piece = __ldg((const uint4*)(w + (size_t)j * W::row_bytes(k)) + p);
        float v[W::E];
        W::unpack(piece, p, scales + (size_t)j * groups32(k), v);
        typename S::T* o = out + (size_t)j * k + p * W::E;
        if (W::vec(k)) {
            // Whole pieces of f16: 16-byte stores.
#pragma unroll
            for (int e = 0; e < W::E; e += 8) {
                uint4 h;
                unsigned short* hs = (unsigned short*)&h;
#pragma unroll
                for (int q = 0; q < 8; q++) hs[q] = S::store(v[e + q]);
                *(uint4*)(o + e) = h;
            }
        } else {
#pragma unroll
            for (int e = 0; e < W::E; e++)
                if (p * W::E + e < k) o[e] = S::store(v[e]);
        }
    }
}

// One block per output row r, reading row src = (rows ? rows[r] : r) of x:
// out[r] = layernorm(x[src]) · gamma + beta in S::T. Each thread keeps up to LN_HELD of the
// row's values (and their gamma, beta, read before waiting on the previous kernel: they are
// weights) in registers between the passes; wider rows keep the rest in shared memory (c
// floats, dynamic). (Residual adds happen in the products' epilogues.)
#define LN_HELD 8
template <class S>
__device__ void layernorm(const float* __restrict__ x, const int* __restrict__ rows,
                          const float* __restrict__ gamma, const float* __restrict__ beta,
                          typename S::T* __restrict__ out, int c, float eps) {
    extern __shared__ float row[];
    __shared__ float red[32];
    int tid = threadIdx.x, bd = blockDim.x;
    float g[LN_HELD], b[LN_HELD], v[LN_HELD];
#pragma unroll
    for (int e = 0; e < LN_HELD; e++) {
        int i = tid + e * bd;
        g[e] = i < c ? gamma[i] : 0.f;
        b[e] = i < c ? beta[i] : 0.f;
    }
    pdl_launch_next();
    pdl_wait();
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    const float* xr = x + (size_t)src * c;
    int held = LN_HELD * bd;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < LN_HELD; e++) {
        int i = tid + e * bd;
        v[e] = i < c ? xr[i] : 0.f;
        s += v[e];
    }
    for (int i = held + tid; i < c; i += bd) {
        row[i] = xr[i];
        s += row[i];
    }
    float mean = block_sum(s, red) / c;
    float q = 0.f;
#pragma unroll
    for (int e = 0; e < LN_HELD; e++) {
        float d = tid + e * bd < c ? v[e] - mean : 0.f;
        q += d * d;
    }
    for (int i = held + tid; i < c; i += bd) {
        float d = row[i] - mean;
        q += d * d;
    }
    float inv = rsqrtf(block_sum(q, red) / c + eps);
    typename S::T* o = out + (size_t)r * c;
#pragma unroll
    for (int e = 0; e < LN_HELD; e++) {
        int i = tid + e * bd;
        if (i < c) o[i] = S::store((v[e] - mean) * inv * g[e] + b[e]);
    }
    for (int i = held + tid; i < c; i += bd)
        o[i] = S::store((row[i] - mean) * inv * gamma[i] + beta[i]);
}

// The sum (or max) of v over the wpr warps that share group g (warps g·wpr .. g·wpr + wpr - 1),
// in each of them; every thread of the block calls it. `red` holds one float per warp.
__device__ float group_reduce(float v, float* red, int g, int wpr, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(FULL_MASK, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // red is free
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[g * wpr];
    for (int i = 1; i < wpr; i++) r = is_max ? fmaxf(r, red[g * wpr + i]) : r + red[g * wpr + i];
    return r;
}

// softmax(q · Kᵀ) · V for head blockIdx.x of the query rows of group blockIdx.y: up to G
// consecutive rows of one sequence (groups[2y] = its first row, groups[2y + 1] = how many),
// row r over its cache positions 0..=pos[r]. Each key and value row is read once for the
// whole group (a prompt's rows share them: grouping 8 cuts a long prefill's cache reads 8×).
// Scores: one thread per position (the head's key in 16-byte pieces). Softmax: 8 / G warps
// per row. Values: threads in groups of d/V covering a value row, each group summing every
// groups-th position, so the loads of all positions are in flight together.
// Shared memory (floats): G·n_ctx scores, 8·blockDim.x partial sums, 32 for reductions, G·d
// for q. blockDim.x is 256 (8 warps, G ≤ 8).
template <class S, int G>
__device__ void attention(const float* q, const unsigned long long* caches, const int* pos,
                          const int* caps, const int* groups, typename S::T* out, int c,
                          int n_head, int layer, int n_layer, int n_ctx) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    extern __shared__ float smem[];
    __shared__ float inv_z[G];
    int h = blockIdx.x, tid = threadIdx.x, bd = blockDim.x;
    int first = groups[2 * blockIdx.y], count = groups[2 * blockIdx.y + 1];
    int d = c / n_head, n = pos[first + count - 1] + 1;  // the last row sees the most
    float* scores = smem;
    float* part = scores + G * n_ctx;
    float* red = part + 8 * bd;
    float* qs = red + 32;
    size_t cap = caps[first];
    const T* keys = (const T*)caches[first] + (size_t)layer * cap * c + h * d;
    const T* values = keys + (size_t)n_layer * cap * c;
    for (int i = tid; i < G * d; i += bd) {
        int g = i / d;
        qs[i] = g < count ? q[(size_t)(first + g) * c + h * d + i % d] : 0.f;
    }
    __syncthreads();
    // Vector loads need every head slice 16-byte aligned.
    bool vec = c % V == 0 && d % V == 0 && d / V <= bd;

    for (int s = tid; s < n; s += bd) {
        const T* k = keys + (size_t)s * c;
        float acc[G];
#pragma unroll
        for (int g = 0; g < G; g++) acc[g] = 0.f;
        if (vec) {
            for (int i = 0; i < d; i += V) {
                uint4 kv = *(const uint4*)(k + i);
                const T* kt = (const T*)&kv;
#pragma unroll
                for (int e = 0; e < V; e++) {
                    float kf = S::load(kt[e]);
#pragma unroll
                    for (int g = 0; g < G; g++) acc[g] += qs[g * d + i + e] * kf;
                }
            }
        } else {
            for (int i = 0; i < d; i++) {
                float kf = S::load(k[i]);
#pragma unroll
                for (int g = 0; g < G; g++) acc[g] += qs[g * d + i] * kf;
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) scores[g * n_ctx + s] = acc[g];
    }
    __syncthreads();
    {
        // Row g's softmax over its own positions; later positions (another row's) weigh 0.
        int wpr = (bd >> 5) / G, g = (tid >> 5) / wpr, t0 = tid - g * wpr * 32, step = wpr * 32;
        float* sg = scores + g * n_ctx;
        int ng = g < count ? pos[first + g] + 1 : 0;
        float m = NEG_INF;
        for (int s = t0; s < ng; s += step) m = fmaxf(m, sg[s]);
        m = group_reduce(m, red, g, wpr, true);
        float z = 0.f;
        for (int s = t0; s < n; s += step) {
            float e = s < ng ? expf(sg[s] - m) : 0.f;
            sg[s] = e;
            z += e;
        }
        z = group_reduce(z, red, g, wpr, false);
        if (t0 == 0) inv_z[g] = ng > 0 ? 1.f / z : 0.f;
    }
    __syncthreads();
    if (vec) {
        int per_row = d / V, pgroups = bd / per_row;
        int pg = tid / per_row, col = (tid % per_row) * V;
        float acc[G][8];  // V ≤ 8
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
        if (pg < pgroups) {
#pragma unroll 4
            for (int s = pg; s < n; s += pgroups) {
                uint4 vv = *(const uint4*)(values + (size_t)s * c + col);
                const T* vt = (const T*)&vv;
                float vf[8];
#pragma unroll
                for (int e = 0; e < V; e++) vf[e] = S::load(vt[e]);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float p = scores[g * n_ctx + s];
#pragma unroll
                    for (int e = 0; e < V; e++) acc[g][e] += p * vf[e];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            __syncthreads();  // part is free
            if (pg < pgroups) {
#pragma unroll
                for (int e = 0; e < V; e++) part[pg * d + col + e] = acc[g][e];
            }
            __syncthreads();
            if (g < count) {
                for (int i = tid; i < d; i += bd) {
                    float t = 0.f;
                    for (int j = 0; j < pgroups; j++) t += part[j * d + i];
                    out[(size_t)(first + g) * c + h * d + i] = S::store(t * inv_z[g]);
                }
            }
        }
    } else {
        for (int g = 0; g < count; g++) {
            int ng = pos[first + g] + 1;
            for (int col = tid; col < d; col += bd) {
                float acc = 0.f;
#pragma unroll 4
                for (int s = 0; s < ng; s++)
                    acc += scores[g * n_ctx + s] * S::load(values[(size_t)s * c + col]);
                out[(size_t)(first + g) * c + h * d + col] = S::store(acc * inv_z[g]);
            }
        }
    }
}

// The split attention kernels' last steps, for block z of a row and head's `active` chunk
// blocks, once `sums` holds the value pass's `pgroups` partial sums (d each) and the block is
// past a barrier. A row of one chunk writes `out` (the row and head's d values) itself.
// Otherwise the chunk's unnormalized output, max m and sum of exponentials l go to its `part`
// slot (d + 2 floats from slot `base`), and the last of the blocks to finish
// (threadFenceReduction's pattern) combines all of them, rescaled to the common max, into
// `out` and zeroes `count` for the next pass.
template <class S>
__device__ void finish_chunk(const float* sums, int pgroups, float m, float l, float* part,
                             size_t base, int z, int active, int d, unsigned int* count,
                             typename S::T* out, int bd) {
    __shared__ bool last;
    int tid = threadIdx.x;
    float* mine = part + (base + z) * (d + 2);
    for (int i = tid; i < d; i += bd) {
        float t = 0.f;
        for (int g = 0; g < pgroups; g++) t += sums[g * d + i];
        if (active == 1) {
            out[i] = S::store(t / l);
        } else {
            mine[2 + i] = t;
        }
    }
    if (active == 1) return;
    if (tid == 0) mine[0] = m, mine[1] = l;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(count, 1u) == (unsigned int)active - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    float top = NEG_INF;
    for (int j = 0; j < active; j++) top = fmaxf(top, __ldcg(part + (base + j) * (d + 2)));
    for (int i = tid; i < d; i += bd) {
        float num = 0.f, den = 0.f;
        for (int j = 0; j < active; j++) {
            const float* pj = part + (base + j) * (d + 2);
            float w = __expf(__ldcg(pj) - top);
            num += w * __ldcg(pj + 2 + i);
            den += w * __ldcg(pj + 1);
        }
        out[i] = S::store(num / den);
    }
    if (tid == 0) *count = 0;
}

// Decode attention split along the cache (flash-decoding), for passes whose rows × heads alone
// would leave most multiprocessors idle (batch 1 has n_head blocks). Block (h, y, z) takes the
// positions [z·chunk, (z+1)·chunk) of row groups[2y]'s cache (decode groups hold one row),
// chunk = max(ceil(n / gridDim.z), 64), so short caches use fewer blocks; when one block
// holds them all it writes the output itself. Otherwise each writes its range's score max,
// sum of exponentials and unnormalized output (d values) to `part`, and the last of the row's
// and head's blocks to finish combines them, rescaled to the common max, into `out` and
// zeroes the row's count for the next pass. Shared memory (floats): d for q, `chunk_cap`
// scores, 8·blockDim.x partial sums.
template <class S>
__device__ void attention_split(const float* q, const unsigned long long* caches, const int* pos,
                                const int* caps, const int* groups, typename S::T* out, int c,
                                int n_head, int layer, int n_layer, int chunk_cap, float* part,
                                unsigned int* counts) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    extern __shared__ float smem[];
    __shared__ float red[32];
    int h = blockIdx.x, z = blockIdx.z, tid = threadIdx.x, bd = blockDim.x;
    int r = groups[2 * blockIdx.y];
    int d = c / n_head, n = pos[r] + 1;
    int chunk = max((n + gridDim.z - 1) / gridDim.z, 64), active = (n + chunk - 1) / chunk;
    if (z >= active) return;  // the whole block: nothing below for it
    int lo = z * chunk, hi = min(n, lo + chunk);
    size_t cap = caps[r];
    const T* keys = (const T*)caches[r] + (size_t)layer * cap * c + h * d;
    const T* values = keys + (size_t)n_layer * cap * c;
    float* qs = smem;
    float* sc = qs + d;
    float* sums = sc + chunk_cap;
    for (int i = tid; i < d; i += bd) qs[i] = q[(size_t)r * c + h * d + i];
    __syncthreads();
    bool vec = c % V == 0 && d % V == 0;
    float m = NEG_INF;
    for (int s = lo + tid; s < hi; s += bd) {
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
        sc[s - lo] = acc;
        m = fmaxf(m, acc);
    }
    m = block_max(m, red);
    float l = 0.f;
    for (int s = lo + tid; s < hi; s += bd) {
        float e = __expf(sc[s - lo] - m);
        sc[s - lo] = e;
        l += e;
    }
    l = block_sum(l, red);  // its barriers also publish sc
    // Values: d / V threads cover a value row in 16-byte pieces, the block's groups of them
    // every groups-th position (all their loads in flight together); sums[g·d + i] per group.
    int per_row = vec ? d / V : d, pgroups = bd / per_row;
    int pg = tid / per_row, col = (tid % per_row) * (vec ? V : 1);
    if (pg < pgroups) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // V ≤ 8
        if (vec) {
#pragma unroll 4
            for (int s = lo + pg; s < hi; s += pgroups) {
                add_weighted_piece<S, V>(acc, *(const uint4*)(values + (size_t)s * c + col),
                                         sc[s - lo]);
            }
#pragma unroll
            for (int e = 0; e < V; e++) sums[pg * d + col + e] = acc[e];
        } else {
            for (int s = lo + pg; s < hi; s += pgroups)
                acc[0] += sc[s - lo] * S::load(values[(size_t)s * c + col]);
            sums[pg * d + col] = acc[0];
        }
    }
    __syncthreads();
    size_t base = (size_t)(r * n_head + h) * gridDim.z;
    finish_chunk<S>(sums, pgroups, m, l, part, base, z, active, d, counts + r * n_head + h,
                    out + (size_t)r * c + h * d, bd);
}

// 16-byte copies from global to shared memory that do not hold up the thread (sm_80 and later;
// before that, an ordinary load and store).
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    unsigned int dst = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
#else
    *(uint4*)smem = *(const uint4*)gmem;
#endif
}
// cp.async of 16 bytes, or 16 zero bytes when `ok` is false (nothing is read then).
__device__ __forceinline__ void copy16_async_or_zero(void* smem, const void* gmem, bool ok) {
#if __CUDA_ARCH__ >= 800
    unsigned int dst = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
                 "r"(ok ? 16 : 0)
                 : "memory");
#else
    *(uint4*)smem = ok ? *(const uint4*)gmem : make_uint4(0u, 0u, 0u, 0u);
#endif
}
// Closes this thread's group of copies issued so far.
__device__ __forceinline__ void copies_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void copies_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// Closes this thread's copies and waits for all of them.
__device__ __forceinline__ void copies_wait_all() {
    copies_commit();
    copies_wait<0>();
}

// Decode attention: softmax(q · Kᵀ) · V of row blockIdx.z (one new token of its sequence) and
// head blockIdx.y over its cache positions [z·ch, (z+1)·ch) for z = blockIdx.x, ch ≤ 128
// (≤ 64 for f32); blocks past the row's length leave at once. The keys and values of positions
// before the new one were written by earlier passes, so they are copied into shared memory
// before waiting for the QKV product (they stream in while it finishes); q and the new
// position's key and value come after. One position per thread for the scores; for the
// values, d / V threads cover a row in 16-byte pieces and the block's groups of them take
// every groups-th position. Rows in shared memory are padded by 16 bytes, so neither phase's
// loads meet in a bank. A row of one chunk writes its output; otherwise each block leaves its
// chunk's max, sum of exponentials and unnormalized output in `part`, and the last of the row's
// and head's blocks to finish combines them into `out` (as attention_split) and resets the
// count. Needs head slices of whole 16-byte pieces (d, c multiples of V) and d / V ≤ 128.
// Shared memory (dynamic): 2·ch·(d / V + 1) pieces, then d + ch + (128 / (d / V))·d floats.
#define DECODE_THREADS 128
template <class S>
__device__ void attention_decode(const float* q, const unsigned long long* caches, const int* pos,
                                 const int* caps, typename S::T* out, int c, int n_head,
                                 int layer, int n_layer, int ch, float* part,
                                 unsigned int* counts) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    extern __shared__ uint4 pieces_smem[];
    __shared__ float red[DECODE_THREADS / 32];
    pdl_launch_next();
    int z = blockIdx.x, h = blockIdx.y, r = blockIdx.z, tid = threadIdx.x;
    int d = c / n_head, n = pos[r] + 1, active = (n + ch - 1) / ch;
    if (z >= active) return;  // nothing of this row here: no wait needed either
    int lo = z * ch, len = min(n, lo + ch) - lo, old = min(n - 1 - lo, len);
    int pieces = d / V, rs = pieces + 1;  // a row's pieces, and its padded stride
    size_t cap = caps[r];
    const T* keys = (const T*)caches[r] + (size_t)layer * cap * c + h * d;
    const T* values = keys + (size_t)n_layer * cap * c;
    uint4* ks = pieces_smem;
    uint4* vs = ks + ch * rs;
    float* qs = (float*)(vs + ch * rs);
    float* sc = qs + d;
    float* sums = sc + ch;
    for (int t = tid; t < old * pieces; t += DECODE_THREADS) {
        int s = t / pieces, p = t - s * pieces;
        size_t at = (size_t)(lo + s) * c + p * V;
        copy16_async(ks + s * rs + p, keys + at);
        copy16_async(vs + s * rs + p, values + at);
    }
    pdl_wait();
    for (int i = tid; i < d; i += DECODE_THREADS) qs[i] = q[(size_t)r * c + h * d + i];
    if (old < len) {  // the new position is in this chunk
        size_t at = (size_t)(n - 1) * c;
        for (int p = tid; p < pieces; p += DECODE_THREADS) {
            ks[old * rs + p] = *(const uint4*)(keys + at + p * V);
            vs[old * rs + p] = *(const uint4*)(values + at + p * V);
        }
    }
    copies_wait_all();
    __syncthreads();
    float m = NEG_INF;
    for (int s = tid; s < len; s += DECODE_THREADS) {
        const uint4* kr = ks + s * rs;
        float acc = 0.f;
        for (int p = 0; p < pieces; p++) {
            uint4 kv = kr[p];
            const T* kt = (const T*)&kv;
#pragma unroll
            for (int e = 0; e < V; e++) acc += qs[p * V + e] * S::load(kt[e]);
        }
        sc[s] = acc;
        m = fmaxf(m, acc);
    }
    m = block_max(m, red);
    float l = 0.f;
    for (int s = tid; s < len; s += DECODE_THREADS) {
        float e = __expf(sc[s] - m);
        sc[s] = e;
        l += e;
    }
    l = block_sum(l, red);  // its barriers also publish sc
    int pgroups = DECODE_THREADS / pieces, pg = tid / pieces, col = tid - pg * pieces;
    if (pg < pgroups) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // V ≤ 8
        for (int s = pg; s < len; s += pgroups) {
            add_weighted_piece<S, V>(acc, vs[s * rs + col], sc[s]);
        }
#pragma unroll
        for (int e = 0; e < V; e++) sums[pg * d + col * V + e] = acc[e];
    }
    __syncthreads();
    size_t base = (size_t)(r * n_head + h) * gridDim.x;
    finish_chunk<S>(sums, pgroups, m, l, part, base, z, active, d, counts + r * n_head + h,
                    out + (size_t)r * c + h * d, DECODE_THREADS);
}

// Two values in S::T as one 32-bit register, the first in the low half (mma's operand order).
template <class S>
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)S::store(lo) | ((unsigned int)S::store(hi) << 16);
}

// d += a · b on the tensor cores: a 16×16 tile of A (4 registers, row-major), a 16×8 tile of B
// (2 registers, column-major), f32 accumulators in PTX's m16n8k16 fragment layout.
// Not `volatile`: it only computes, so the compiler may interleave independent products.
template <class S>
struct Mma;
template <>
struct Mma<F16> {
    static __device__ __forceinline__ void run(float* d, const unsigned int* a, unsigned int b0,
                                               unsigned int b1) {
#if __CUDA_ARCH__ >= 800
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};
template <>
struct Mma<BF16> {
    static __device__ __forceinline__ void run(float* d, const unsigned int* a, unsigned int b0,
                                               unsigned int b1) {
#if __CUDA_ARCH__ >= 800
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

#define MMA_D 64     // head size (every GPT-2 size has 64)
#define MMA_ROWS 64  // query rows per block: 16 per warp, 4 warps
#define MMA_KEYS 64  // keys per tile
#define MMA_PAD 72   // shared rows' stride in elements: ldmatrix's 8 rows hit distinct banks
#define MMA_SETS 2   // sets of 4 warps, each taking every other tile of keys
#define MMA_TILE_BYTES (MMA_KEYS * MMA_PAD * 2)
// Dynamic shared memory of attention_mma: per set, two stages of a K and a V tile.
#define MMA_SHARED_BYTES (MMA_SETS * 2 * 2 * MMA_TILE_BYTES)

// Waits for the 128 threads of set `set` (named barrier 1 + set; 0 is __syncthreads').
// The ids are constants so that ptxas counts 3 barriers, not all 16.
__device__ __forceinline__ void set_sync(int set) {
    if (set == 0)
        asm volatile("bar.sync 1, 128;" ::: "memory");
    else
        asm volatile("bar.sync 2, 128;" ::: "memory");
}
// Four 8×8 matrices of 16-bit values from shared memory, lane l giving the address of row
// l % 8 of matrix l / 8: mma B fragments (`trans` for a matrix stored k-major).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix4(unsigned int* r, const void* smem) {
#if __CUDA_ARCH__ >= 750
    unsigned int a = (unsigned int)__cvta_generic_to_shared(smem);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#endif
}

// The attention of a group of up to MMA_ROWS consecutive query rows of one sequence (a prompt
// chunk; see `attention` for groups and the cache) for head blockIdx.x, on the tensor cores
// (sm_80 and later, f16 / bf16, 256 threads, MMA_SHARED_BYTES of dynamic shared memory):
// FlashAttention-2's loop, split in two along the keys. The block's two sets of 4 warps take
// alternate tiles of 64 keys (so a prompt's last rows, which see every key, wait half as
// long), and set 0 merges set 1's partial softmax into its own at the end. In a set each warp
// holds 16 rows' q as mma A fragments. Tiles of K and V are copied into the set's shared
// memory as they lie in the cache ([key][dim]) with cp.async, two tiles in flight, so the
// copies need no registers and the next tile arrives while this one's products run; ldmatrix
// turns them into B fragments (V transposed on the way). S = q·Kᵀ in f32, masked causally by
// position on the tiles that reach past a row; each row's running max and sum rescale what it
// has so far (online softmax); P, rounded to S::T, is multiplied into O = P·V straight from
// the S accumulators' registers.
template <class S>
__device__ void attention_mma(const float* q, const unsigned long long* caches, const int* pos,
                              const int* caps, const int* groups, typename S::T* out, int c,
                              int layer, int n_layer) {
    typedef typename S::T T;
    extern __shared__ __align__(16) unsigned char mma_smem[];
    int h = blockIdx.x, lane = threadIdx.x & 31, set = threadIdx.x >> 7;
    int tid = threadIdx.x & 127, warp = tid >> 5;  // within the set
    // This set's stages, each a K then a V tile of [key][dim].
    T* tiles = (T*)(mma_smem + set * 4 * MMA_TILE_BYTES);
    const int TILE = MMA_KEYS * MMA_PAD;
    int g = lane >> 2, t = lane & 3;  // fragment row and column pair
    int first = groups[2 * blockIdx.y], count = groups[2 * blockIdx.y + 1];
    int n = pos[first + count - 1] + 1;
    size_t cap = caps[first];
    const T* keys = (const T*)caches[first] + (size_t)layer * cap * c + h * MMA_D;
    const T* values = keys + (size_t)n_layer * cap * c;
    // This thread's rows (g and g + 8 of its warp's 16) and their positions; -1 masks every key.
    int r0 = warp * 16 + g, r1 = r0 + 8;
    int p0 = r0 < count ? pos[first + r0] : -1, p1 = r1 < count ? pos[first + r1] : -1;
    int pmin = min(p0, p1);
    bool busy = warp * 16 < count;

    // A tile is 64 keys × 128 bytes of K and of V: each thread copies 4 pieces of 16 bytes of
    // each (8 threads per key row). Keys past n are zeros (P is 0 there, and 0 · garbage
    // could be NaN).
    const int PIECES = MMA_KEYS * 8 / 128;
    auto fetch = [&](int base, int stage) {
#pragma unroll
        for (int u = 0; u < PIECES; u++) {
            int i = tid + 128 * u, key = i >> 3, part = (i & 7) * 8;
            bool ok = base + key < n;
            size_t at = (size_t)(ok ? base + key : 0) * c + part;
            T* kt = tiles + 2 * stage * TILE;
            copy16_async_or_zero(kt + key * MMA_PAD + part, keys + at, ok);
            copy16_async_or_zero(kt + TILE + key * MMA_PAD + part, values + at, ok);
        }
    };
    // Set s takes the tiles at keys 64 · (s + 2i).
    const int STRIDE = MMA_SETS * MMA_KEYS;
    int start = set * MMA_KEYS;
    if (start < n) fetch(start, 0);
    copies_commit();

    unsigned int qa[4][4];  // A fragments of q, by 16 dims
    {
        const float* q0 = q + (size_t)(first + min(r0, count - 1)) * c + h * MMA_D + 2 * t;
        const float* q1 = q + (size_t)(first + min(r1, count - 1)) * c + h * MMA_D + 2 * t;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            int d0 = kk * 16;
            qa[kk][0] = pack2<S>(q0[d0], q0[d0 + 1]);
            qa[kk][1] = pack2<S>(q1[d0], q1[d0 + 1]);
            qa[kk][2] = pack2<S>(q0[d0 + 8], q0[d0 + 9]);
            qa[kk][3] = pack2<S>(q1[d0 + 8], q1[d0 + 9]);
        }
    }
    float o[8][4];  // O's accumulators, by 8 dims
#pragma unroll
    for (int j = 0; j < 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // running max and sum per row
    // ldmatrix addresses: lane l gives row l % 8 of matrix l / 8. For K (by 8 keys j): keys
    // 8j + l % 8, dims 8 · (l / 8) (+ 32 for the second load). For V (by 16 keys kk and 16
    // dims jj): keys 16kk + 8 · (l / 8 % 2) + l % 8, dims 16jj + 8 · (l / 16).
    int k_off = (lane & 7) * MMA_PAD + (lane >> 3) * 8;
    int v_off = (((lane >> 3) & 1) * 8 + (lane & 7)) * MMA_PAD + (lane >> 4) * 8;

    for (int base = start, stage = 0; base < n; base += STRIDE, stage ^= 1) {
        // The set is done with the other stage (its tile before): refill it with the next.
        set_sync(set);
        if (base + STRIDE < n) {
            fetch(base + STRIDE, stage ^ 1);
            copies_commit();
            copies_wait<1>();  // this tile's copies are in; the next one's may fly
        } else {
            copies_wait<0>();
        }
        set_sync(set);  // and the whole set's
        if (!busy) continue;
        const T* kt = tiles + 2 * stage * TILE;
        const T* vt = kt + TILE;

        float sc[8][4];  // scores, by 8 keys: (row g, keys 2t, 2t+1), (row g + 8, same keys)
#pragma unroll
        for (int j = 0; j < 8; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
            unsigned int b[8];  // B fragments for dims 0-31, then 32-63
            ldmatrix4<false>(b, kt + 8 * j * MMA_PAD + k_off);
            ldmatrix4<false>(b + 4, kt + 8 * j * MMA_PAD + k_off + 32);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) Mma<S>::run(sc[j], qa[kk], b[2 * kk], b[2 * kk + 1]);
        }
        float x0 = m0, x1 = m1;
        // Only tiles that reach past a row's position need the causal mask.
        bool edge = base + MMA_KEYS - 1 > pmin;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (edge) {
                    int key = base + 8 * j + 2 * t + e;
                    if (key > p0) sc[j][e] = NEG_INF;
                    if (key > p1) sc[j][2 + e] = NEG_INF;
                }
                x0 = fmaxf(x0, sc[j][e]);
                x1 = fmaxf(x1, sc[j][2 + e]);
            }
        }
        // The quad of threads holding a row agree on its max.
#pragma unroll
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
            x0 = fmaxf(x0, __shfl_xor_sync(FULL_MASK, x0, o2));
            x1 = fmaxf(x1, __shfl_xor_sync(FULL_MASK, x1, o2));
        }
        // A row with no key yet keeps max -inf: shift by 0 so exp gives 0, not NaN.
        float s0 = x0 == NEG_INF ? 0.f : x0, s1 = x1 == NEG_INF ? 0.f : x1;
        float k0 = __expf(m0 - s0), k1 = __expf(m1 - s1);
        m0 = x0, m1 = x1;
        l0 *= k0, l1 *= k1;
#pragma unroll
        for (int j = 0; j < 8; j++) o[j][0] *= k0, o[j][1] *= k0, o[j][2] *= k1, o[j][3] *= k1;
        unsigned int pa[4][4];  // P as A fragments, by 16 keys
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float e0 = __expf(sc[j][0] - s0), e1 = __expf(sc[j][1] - s0);
            float e2 = __expf(sc[j][2] - s1), e3 = __expf(sc[j][3] - s1);
            l0 += e0 + e1, l1 += e2 + e3;
            pa[j >> 1][(j & 1) * 2] = pack2<S>(e0, e1);
            pa[j >> 1][(j & 1) * 2 + 1] = pack2<S>(e2, e3);
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int jj = 0; jj < 4; jj++) {
                unsigned int b[4];  // dims 16jj.. +7 (b[0], b[1]) and +8.. +15 (b[2], b[3])
                ldmatrix4<true>(b, vt + 16 * kk * MMA_PAD + 16 * jj + v_off);
                Mma<S>::run(o[2 * jj], pa[kk], b[0], b[1]);
                Mma<S>::run(o[2 * jj + 1], pa[kk], b[2], b[3]);
            }
        }
    }
#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l0 += __shfl_xor_sync(FULL_MASK, l0, o2);
        l1 += __shfl_xor_sync(FULL_MASK, l1, o2);
    }
    // Set 1 leaves its O, maxima and sums in shared memory (value v of thread tid at
    // [v][tid], so the stores do not conflict); set 0 rescales both to the larger maximum.
    __syncthreads();  // every tile is used up
    float* merge = (float*)mma_smem;
    if (set == 1) {
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) merge[(4 * j + e) * 128 + tid] = o[j][e];
        merge[32 * 128 + tid] = m0, merge[33 * 128 + tid] = m1;
        merge[34 * 128 + tid] = l0, merge[35 * 128 + tid] = l1;
    }
    __syncthreads();
    if (set == 1) return;
    {
        float n0 = merge[32 * 128 + tid], n1 = merge[33 * 128 + tid];
        float x0 = fmaxf(m0, n0), x1 = fmaxf(m1, n1);
        // Rows with no key in either set keep -inf: their factors are 0.
        float a0 = x0 == NEG_INF ? 0.f : __expf(m0 - x0), b0 = x0 == NEG_INF ? 0.f : __expf(n0 - x0);
        float a1 = x1 == NEG_INF ? 0.f : __expf(m1 - x1), b1 = x1 == NEG_INF ? 0.f : __expf(n1 - x1);
        l0 = l0 * a0 + merge[34 * 128 + tid] * b0;
        l1 = l1 * a1 + merge[35 * 128 + tid] * b1;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            o[j][0] = o[j][0] * a0 + merge[(4 * j) * 128 + tid] * b0;
            o[j][1] = o[j][1] * a0 + merge[(4 * j + 1) * 128 + tid] * b0;
            o[j][2] = o[j][2] * a1 + merge[(4 * j + 2) * 128 + tid] * b1;
            o[j][3] = o[j][3] * a1 + merge[(4 * j + 3) * 128 + tid] * b1;
        }
    }
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int col = h * MMA_D + 8 * j + 2 * t;
        if (r0 < count)
            *(unsigned int*)(out + (size_t)(first + r0) * c + col) =
                pack2<S>(o[j][0] * i0, o[j][1] * i0);
        if (r1 < count)
            *(unsigned int*)(out + (size_t)(first + r1) * c + col) =
                pack2<S>(o[j][2] * i1, o[j][3] * i1);
    }
}

// The warp's largest `best` and, among equal ones, the smallest `bi`, in every lane.
__device__ __forceinline__ void warp_best(float& best, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL_MASK, best, o);
        int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
}

// Keeps every token (plain greedy or temperature picks).
struct KeepAll {
    __device__ __forceinline__ bool operator()(float, int) const { return true; }
};

// pick_key of the best pick_score among row's kept tokens (row b of the picked rows), as the
// host picks (NaN never wins); the whole block calls it, and thread 0 gets the answer.
template <class Keep>
__device__ unsigned long long best_pick(const float* __restrict__ row, int v, int b,
                                        const float* inv_t, const unsigned long long* seeds,
                                        Keep keep) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    float best = NEG_INF;
    int bi = 0x7fffffff;
    // Each thread walks its indices upwards, so a strict > keeps its first largest.
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        if (!keep(row[i], i)) continue;
        float x = pick_score(row[i], b, i, inv_t, seeds);
        if (x > best) {
            best = x;
            bi = i;
        }
    }
    warp_best(best, bi);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        best_v[warp] = best;
        best_i[warp] = bi;
    }
    __syncthreads();
    unsigned long long key = 0;
    if (warp == 0) {
        bool live = lane < (int)(blockDim.x >> 5);
        best = live ? best_v[lane] : NEG_INF;
        bi = live ? best_i[lane] : 0x7fffffff;
        warp_best(best, bi);
        // A row of nothing but -inf or NaN: the host's argmax answers 0 too.
        key = bi == 0x7fffffff ? pick_key(NEG_INF, 0) : pick_key(best, bi);
    }
    return key;
}

// picks[b] = the pick of row first + b of logits (f32, v a row); one block per row.
__device__ void argmax_rows(const float* __restrict__ logits, int first, int v,
                            unsigned long long* picks, const float* inv_t,
                            const unsigned long long* seeds) {
    const float* row = logits + (first + blockIdx.x) * logits_stride(v);
    unsigned long long key = best_pick(row, v, blockIdx.x, inv_t, seeds, KeepAll());
    if (threadIdx.x == 0) picks[blockIdx.x] = key;
}

// exp(x) for x ≤ 0 in exactly the rounded steps of gpt2rs::pick::pick_exp (no contraction:
// every product, difference and fused multiply-add is explicit), so host and GPU agree on
// every bit of the probabilities top-p sums.
__device__ __forceinline__ float pick_exp(float x) {
    float t = __fmul_rn(x, __int_as_float(0x3FB8AA3B));  // log2(e)
    float n = floorf(t);
    if (!(n >= -126.f)) return 0.f;
    float f = __fsub_rn(t, n);
    float p = 1.5252734e-5f;
    p = __fmaf_rn(p, f, 1.540353e-4f);
    p = __fmaf_rn(p, f, 0.0013333558f);
    p = __fmaf_rn(p, f, 0.009618129f);
    p = __fmaf_rn(p, f, 0.05550411f);
    p = __fmaf_rn(p, f, 0.2402265f);
    p = __fmaf_rn(p, f, 0.6931472f);
    p = __fmaf_rn(p, f, 1.0f);
    return __fmul_rn(p, __int_as_float(((int)n + 127) << 23));
}

// A probability in units of 2^-24 (gpt2rs::pick::pick_mass); 0 below x = -18.
__device__ __forceinline__ unsigned long long pick_mass(float x) {
    return x >= -18.f ? __float2ull_rn(__fmul_rn(pick_exp(x), 16777216.f)) : 0ull;
}

// The kept set of a filtered pick (gpt2rs::pick::Kept): score bits ≥ score_min, order key ≥
// key_min.
struct KeepFiltered {
    float inv;
    unsigned int score_min;
    unsigned long long key_min;
    __device__ __forceinline__ bool operator()(float v, int j) const {
        float s = __fmul_rn(v, inv);
        unsigned long long key = pick_key(s, j);
        return (unsigned int)(key >> 32) >= score_min && key >= key_min;
    }
};

// Adds one token of mass q to bin d of the histogram for every lane with `in`; the whole warp
// calls it together. Scores crowd into a few bins, so lanes with the same digit are combined
// first: one atomic per distinct digit and warp (a warp's masses, each ≤ 2^24, fit 32 bits).
__device__ __forceinline__ void histogram_add(unsigned int* counts, unsigned long long* masses,
                                              bool in, unsigned int d, unsigned int q) {
#if __CUDA_ARCH__ >= 800
    unsigned int peers = __match_any_sync(FULL_MASK, in ? d : 0xffffffffu);
    unsigned int sum = __reduce_add_sync(peers, q);
    if (in && (int)(threadIdx.x & 31) == __ffs(peers) - 1) {
        atomicAdd(&counts[d], (unsigned int)__popc(peers));
        if (sum) atomicAdd(&masses[d], (unsigned long long)sum);
    }
#else
    if (in) {
        atomicAdd(&counts[d], 1u);
        if (q) atomicAdd(&masses[d], (unsigned long long)q);
    }
#endif
}

// The largest digit d (8 bits at `shift`) for which `fits` holds of the running sums of the
// block's histogram, scanned upwards; thread 0 scans, everyone gets d and the sums below it.
// Radix selection: each round narrows the answer's prefix by 8 bits.
__device__ void radix_round(const unsigned int* counts, const unsigned long long* masses,
                            unsigned long long below_in, unsigned long long cut, int above_in,
                            int k, bool by_mass, int* digit, unsigned long long* below_out,
                            int* above_out) {
    if (threadIdx.x == 0) {
        if (by_mass) {
            // top-p: the highest non-empty digit whose tokens below weigh at most the cut.
            unsigned long long acc = below_in, chosen_below = below_in;
            int chosen = 0;
            for (int d = 0; d < 256; d++) {
                if (counts[d] > 0 && acc <= cut) {
                    chosen = d;
                    chosen_below = acc;
                }
                acc += masses[d];
            }
            *digit = chosen;
            *below_out = chosen_below;
        } else {
            // top-k: from the top, the digit where the count reaches k.
            int above = above_in, chosen = 0;
            for (int d = 255; d >= 0; d--) {
                if (above + (int)counts[d] >= k) {
                    chosen = d;
                    break;
                }
                above += counts[d];
            }
            *digit = chosen;
            *above_out = above;
        }
    }
    __syncthreads();
}

// A pick with top-k / top-p (gpt2rs::pick::PickRule::Sample): row b of the picked rows is row
// first + b of logits. top-k's threshold by radix selection of the k-th largest score's bits;
// top-p's by radix selection over the order keys of the last token whose followers weigh at
// most floor((1 - top_p) · total), masses in fixed point; then the Gumbel-max pick among the
// kept tokens. One block per row, the row read from L2 once per round.
__device__ void pick_filtered(const float* __restrict__ logits, int first, int v,
                              unsigned long long* picks, const float* inv_t,
                              const unsigned long long* seeds, const int* top_ks,
                              const float* top_ps) {
    __shared__ unsigned int counts[256];
    __shared__ unsigned long long masses[256];
    __shared__ float red[32];
    __shared__ int digit, above;
    __shared__ unsigned long long below, total;
    int b = blockIdx.x, tid = threadIdx.x, bd = blockDim.x;
    const float* row = logits + (first + b) * logits_stride(v);
    float inv = inv_t[b];
    int k = top_ks[b];
    float top_p = top_ps[b];
    KeepFiltered keep{inv, 0u, 0ull};

    if (k > 0 && k < v) {
        unsigned int prefix = 0, mask = 0;
        if (tid == 0) above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += bd) counts[i] = 0;
            __syncthreads();
            // Warp-uniform trips: histogram_add needs every lane.
            for (int base = 0; base < v; base += bd) {
                int j = base + tid;
                unsigned int u =
                    j < v ? (unsigned int)(pick_key(__fmul_rn(row[j], inv), j) >> 32) : 0u;
                bool in = j < v && (u & mask) == prefix;
                histogram_add(counts, masses, in, (u >> shift) & 255, 0u);
            }
            __syncthreads();
            radix_round(counts, masses, 0, 0, above, k, false, &digit, &below, &above);
            prefix |= (unsigned int)digit << shift;
            mask |= 255u << shift;
            __syncthreads();  // digit and above read before the next round writes them
        }
        keep.score_min = prefix;
    }
    if (top_p < 1.f) {
        float m = NEG_INF;
        for (int j = tid; j < v; j += bd) m = fmaxf(m, __fmul_rn(row[j], inv));
        m = block_max(m, red);
        if (tid == 0) total = 0;
        __syncthreads();
        unsigned long long part = 0;
        for (int j = tid; j < v; j += bd) {
            float s = __fmul_rn(row[j], inv);
            if (keep(row[j], j)) part += pick_mass(__fsub_rn(s, m));
        }
        atomicAdd(&total, part);
        __syncthreads();
        unsigned long long cut = (unsigned long long)floor((double)(1.f - top_p) * (double)total);
        unsigned long long prefix = 0, mask = 0;
        if (tid == 0) below = 0;
        for (int shift = 56; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += bd) {
                counts[i] = 0;
                masses[i] = 0;
            }
            __syncthreads();
            for (int base = 0; base < v; base += bd) {
                int j = base + tid;
                float x = j < v ? row[j] : 0.f;
                float s = __fmul_rn(x, inv);
                unsigned long long key = pick_key(s, j);
                bool in = j < v && (key & mask) == prefix && keep(x, j);
                unsigned int q = in ? (unsigned int)pick_mass(__fsub_rn(s, m)) : 0u;
                histogram_add(counts, masses, in, (unsigned int)(key >> shift) & 255, q);
            }
            __syncthreads();
            radix_round(counts, masses, below, cut, 0, 0, true, &digit, &below, &above);
            prefix |= (unsigned long long)digit << shift;
            mask |= 255ull << shift;
            __syncthreads();
        }
        keep.key_min = prefix;
    }
    unsigned long long key = best_pick(row, v, b, inv_t, seeds, keep);
    if (tid == 0) picks[b] = key;
}

// GPT-2's activations: 0 gelu (tanh), 1 gelu (erf), 2 relu.
__device__ __forceinline__ float activate(float v, int act) {
    if (act == 0) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    if (act == 1) return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
    return fmaxf(v, 0.f);
}

// What a matrix product's result v = (x · wᵀ)[r, j] becomes (its epilogue):
//   PLAIN     out[r, j] = v (f32, rows logits_stride(n) apart; the LM head); rows r >=
//             first_pick are instead reduced to their largest v into picks[r - first_pick]
//             (see pick_key), in matrix-vector kernels only
//   ACT       act_out[r, j] = act(v + bias[j])                     (S::T; the MLP's first layer)
//   RESIDUAL  out[r, j] += v + bias[j]                             (f32; x, the residual stream)
//   QKV       v + bias[j]: q (f32, × scale) for j < c, else into the row's K or V cache
#define EPI_PLAIN 0
#define EPI_ACT 1
#define EPI_RESIDUAL 2
#define EPI_QKV 3

// Where an epilogue writes. QKV: each row's sequence cache holds keys then values, each
// [n_layer][caps[r]][c] in S::T (caps[r]: the positions it has room for).
template <class S>
struct Epi {
    int mode;
    float* out;
    const float* bias;
    typename S::T* act_out;
    int act;
    const unsigned long long* caches;
    const int* pos;
    const int* caps;
    int c, layer, n_layer;
    float scale;
    int first_pick;
    unsigned long long* picks;
    const float* pick_inv_t;
    const unsigned long long* pick_seeds;
};

template <class S>
__device__ __forceinline__ void epilogue(const Epi<S>& e, float v, int r, int j, int n) {
    if (e.mode == EPI_PLAIN) {
        e.out[r * logits_stride(n) + j] = v;
    } else if (e.mode == EPI_ACT) {
        e.act_out[(size_t)r * n + j] = S::store(activate(v + e.bias[j], e.act));
    } else if (e.mode == EPI_RESIDUAL) {
        e.out[(size_t)r * n + j] += v + e.bias[j];
    } else {
        v += e.bias[j];
        int c = e.c;
        if (j < c) {
            e.out[(size_t)r * c + j] = v * e.scale;
            return;
        }
        size_t cap = e.caps[r];
        typename S::T* keys =
            (typename S::T*)e.caches[r] + ((size_t)e.layer * cap + e.pos[r]) * c;
        if (j < 2 * c) {
            keys[j - c] = S::store(v);
        } else {
            keys[(size_t)e.n_layer * cap * c + j - 2 * c] = S::store(v);
        }
    }
}

// This block's share of the first `bytes` at `p` (16-byte aligned) into L2, the grid's blocks
// taking equal slices in order: a hint, no result.
__device__ __forceinline__ void prefetch_slice_l2(const unsigned char* p, unsigned int bytes) {
#if __CUDA_ARCH__ >= 900
    unsigned int blocks = gridDim.x * gridDim.y, b = blockIdx.y * gridDim.x + blockIdx.x;
    unsigned int per = (bytes / blocks + 15u) & ~15u;
    unsigned int at = b * per;
    if (bytes == 0 || at >= bytes) return;
    unsigned int size = min(per, bytes - at);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + at), "r"(size)
                 : "memory");
#endif
}

// x · wᵀ for r < R rows of x (S::T, [R, k]), j < n rows of w (format W, see WFloat), with f32
// accumulation, through `epilogue`: decode's matrix-vector products, each weight read once
// (16-byte pieces) for all R rows. `wpr` warps (1, 2, 4 or 8) share a weight row, each summing
// every wpr-th piece of it, so a matrix with few long rows still has enough loads in flight;
// blocks of 256 threads hold 8 / wpr rows.
//
// `next`, `next_bytes`: the start of the next product's matrix, which each block asks L2 for a
// slice of as it leaves (cp.async.bulk.prefetch.L2, sm_90 on), so the memory keeps streaming
// through the end of this kernel and the start of the next; 0 bytes for none.
template <class S, class W, int R>
__device__ void gemv(const typename S::T* __restrict__ x, const unsigned char* __restrict__ w,
                     const unsigned short* __restrict__ scales, int n, int k, int wpr,
                     const unsigned char* next, unsigned int next_bytes, const Epi<S>& e) {
    __shared__ float red[8 * R];
    __shared__ float fin[8][R];
    pdl_launch_next();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int j = blockIdx.x * (8 / wpr) + warp / wpr, slice = warp % wpr;
    bool live = j < n, vec = W::vec(k);
    int jr = live ? j : 0;
    const uint4* wr = (const uint4*)(w + (size_t)jr * W::row_bytes(k));
    // The row's scales (quantized formats; unused otherwise).
    const unsigned short* sr = scales + (size_t)jr * groups32(k);
    int pieces = W::pieces(k), step = wpr * 32, first = slice * 32 + lane;
    // The first pieces of this warp's share of the row are read before waiting for x (the
    // previous kernel's output), so they stream in while that kernel finishes.
    const int PRE = 4;
    uint4 pre[PRE];
    if (live && vec) {
#pragma unroll
        for (int p = 0; p < PRE; p++) {
            int i = first + p * step;
            if (i < pieces) pre[p] = __ldg(wr + i);
        }
    }
    pdl_wait();

    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    if (live && vec) {
#pragma unroll
        for (int p = 0; p < PRE; p++) {
            int i = first + p * step;
            if (i < pieces) W::template fma<S, R>(pre[p], i, sr, x, k, acc);
        }
#pragma unroll 4
        for (int i = first + PRE * step; i < pieces; i += step)
            W::template fma<S, R>(__ldg(wr + i), i, sr, x, k, acc);
    } else if (live) {
        for (int i = slice * 32 + lane; i < k; i += wpr * 32) {
            float wf = W::at(w, scales, j, i, k);
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] += wf * S::load(x[(size_t)r * k + i]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(FULL_MASK, acc[r], o);

    bool picking = e.mode == EPI_PLAIN && e.first_pick < R;
    if (picking && tid < 8 * R) fin[tid / R][tid % R] = NEG_INF;
    // Row r of x for weight row j is done: its epilogue, or its candidate for the pick.
    auto finish = [&](int r, float v) {
        if (picking && r >= e.first_pick) {
            fin[warp / wpr][r] = pick_score(v, r - e.first_pick, j, e.pick_inv_t, e.pick_seeds);
        } else {
            epilogue<S>(e, v, r, j, n);
        }
    };
    if (wpr == 1) {
        if (picking) __syncthreads();  // fin is initialized
        if (live && lane == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) finish(r, acc[r]);
        }
    } else {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) red[warp * R + r] = acc[r];
        }
        __syncthreads();
        if (live && slice == 0 && lane < R) {
            float v = 0.f;
            for (int s2 = 0; s2 < wpr; s2++) v += red[(warp + s2) * R + lane];
            finish(lane, v);
        }
    }
    if (tid == 0) prefetch_slice_l2(next, next_bytes);
    if (!picking) return;
    __syncthreads();
    // One atomic per picked row and block: the best of its 8 / wpr weight rows.
    if (tid >= e.first_pick && tid < R) {
        int r = tid, base = blockIdx.x * (8 / wpr);
        unsigned long long best = 0;
        for (int t = 0; t < 8 / wpr && base + t < n; t++) {
            unsigned long long key = pick_key(fin[t][r], base + t);
            best = key > best ? key : best;
        }
        atomicMax(e.picks + (r - e.first_pick), best);
    }
}

template <class S, int PER, int THREADS, int TR>
__device__ void tile_epilogue(const float* v, int q_lo, int q_hi, int j0, int rows, int n,
                              const Epi<S>& e, unsigned long long* best);

// The end of a tensor-core product tile (gemv_tc, gemm_tc): v[q] is element
// idx = threadIdx.x + q·THREADS of the block's TR × rows tile (weight row j0 + idx % TR, x row
// idx / TR; consecutive threads take consecutive weight rows, so the epilogue's writes are
// coalesced). With gridDim.y = KS > 1 each block of the tile leaves its partial sums in `part`
// and the last to finish adds them in ks order (the result does not depend on timing) and
// resets the tile's count. Then the epilogue, or the LM head's picks through `best` (TC keys,
// cleared by the caller before a barrier). The block asks L2 for its slice of `next`.
template <class S, int PER, int THREADS, int TR>
__device__ void tile_finish(float* v, int j0, int rows, int n, float* part,
                            unsigned int* counts, const unsigned char* next,
                            unsigned int next_bytes, const Epi<S>& e, unsigned long long* best,
                            bool* last) {
    const int ELEMS = PER * THREADS;
    int tid = threadIdx.x, tile = blockIdx.x, ks = blockIdx.y, KS = gridDim.y;
    if (tid == 0) prefetch_slice_l2(next, next_bytes);
    if (KS > 1) {
        float* tile_part = part + (size_t)tile * KS * ELEMS;
#pragma unroll
        for (int q = 0; q < PER; q++) tile_part[(size_t)ks * ELEMS + tid + q * THREADS] = v[q];
        __threadfence();
        __syncthreads();
        if (tid == 0) *last = atomicAdd(counts + tile, 1u) == (unsigned int)KS - 1;
        __syncthreads();
        if (!*last) return;
        __threadfence();
        // One split at a time, all of a thread's elements at once: PER loads in flight per
        // round trip to L2 instead of one (the sums keep their ks order).
#pragma unroll
        for (int q = 0; q < PER; q++) v[q] = 0.f;
        for (int z = 0; z < KS; z++) {
            const float* split = tile_part + (size_t)z * ELEMS + tid;
#pragma unroll
            for (int q = 0; q < PER; q++) v[q] += __ldcg(split + q * THREADS);
        }
        if (tid == 0) counts[tile] = 0;
    }
    tile_epilogue<S, PER, THREADS, TR>(v, 0, PER, j0, rows, n, e, best);
}

// The epilogue (or the LM head's picks) of elements q_lo <= q < q_hi of a tile in
// tile_finish's order; the same q range for the whole block.
template <class S, int PER, int THREADS, int TR>
__device__ void tile_epilogue(const float* v, int q_lo, int q_hi, int j0, int rows, int n,
                              const Epi<S>& e, unsigned long long* best) {
    int tid = threadIdx.x;
    bool picking = e.mode == EPI_PLAIN && e.first_pick < rows;
    if (!picking) {
#pragma unroll
        for (int q = 0; q < PER; q++) {
            int idx = tid + q * THREADS, j = j0 + idx % TR, r = idx / TR;
            if (q >= q_lo && q < q_hi && j < n && r < rows) epilogue<S>(e, v[q], r, j, n);
        }
        return;
    }
    // Lanes in groups of G share a row: its best key among them first (shuffles), then one
    // shared atomic per group, not one per lane.
    const int G = TR < 32 ? TR : 32;
#pragma unroll
    for (int q = 0; q < PER; q++) {
        if (q < q_lo || q >= q_hi) continue;
        int idx = tid + q * THREADS, j = j0 + idx % TR, r = idx / TR;
        unsigned long long key = 0;
        if (j < n && r < rows) {
            if (r >= e.first_pick) {
                float score = pick_score(v[q], r - e.first_pick, j, e.pick_inv_t, e.pick_seeds);
                key = pick_key(score, j);
            } else {
                epilogue<S>(e, v[q], r, j, n);
            }
        }
#pragma unroll
        for (int o = G / 2; o > 0; o >>= 1) {
            unsigned long long other = __shfl_xor_sync(FULL_MASK, key, o);
            key = other > key ? other : key;
        }
        if ((tid & (G - 1)) == 0 && key != 0) atomicMax(&best[r], key);
    }
    __syncthreads();
    if (tid >= e.first_pick && tid < rows) atomicMax(e.picks + (tid - e.first_pick), best[tid]);
}

// x · wᵀ for up to 8·NT rows on the tensor cores (f16 / bf16 weights and activations, k a
// multiple of 32): decode batches and short mixed passes, each weight still read once for all
// rows, with gemv's epilogues (picks included). Block (tile, ks) of TC_WARPS warps takes 16·MT
// weight rows as mma A tiles and all rows of x as NT B tiles of 8 rows, over its share of the
// 32-wide k steps, which its warps take in turn. In a step lane (g, t) loads 16 bytes of
// weight rows g and g + 8 and of x row g, at k + 8t: mma's k order inside a step is permuted
// the same way for both operands, so the sums are unchanged and no shuffle or shared-memory
// staging is needed. The warps meet in shared memory. With gridDim.y = KS > 1 (matrices with
// too few tiles to fill the GPU) each block writes its tile's partial sums to `part`, and the
// last of the tile's blocks adds them in ks order (the result does not depend on timing) and
// resets the tile's count. `next`, `next_bytes`: as in gemv.
#define TC_WARPS 8
#define TC_MT 1
#define TC_UNROLL 4
template <class S, int NT>
__device__ void gemv_tc(const typename S::T* __restrict__ x, const typename S::T* __restrict__ w,
                        int rows, int n, int k, float* part, unsigned int* counts,
                        const unsigned char* next, unsigned int next_bytes, const Epi<S>& e) {
    const int MT = TC_MT, TR = 16 * MT, TC = 8 * NT, HALF = TC_WARPS / 2;
    const int ELEMS = TR * TC, PER = (ELEMS + 32 * TC_WARPS - 1) / (32 * TC_WARPS);
    __shared__ float red[HALF][TR][TC + 1];
    __shared__ unsigned long long best[TC];
    __shared__ bool last;
    pdl_launch_next();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int tile = blockIdx.x, ks = blockIdx.y, KS = gridDim.y, j0 = tile * TR;
    int steps = k >> 5, s_lo = steps * ks / KS, s_hi = steps * (ks + 1) / KS;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    const uint4* wr[MT][2];
    bool wok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int j = j0 + 16 * mt + 8 * h + g;
            wok[mt][h] = j < n;
            wr[mt][h] = (const uint4*)(w + (size_t)(j < n ? j : 0) * k) + t;
        }
    // Each warp takes every TC_WARPS-th step of the block's range, TC_UNROLL at a time (a
    // round), with two rounds' weights in registers: the next round's loads are in flight
    // while this one's products run (the buffers alternate by name, so nothing waits on a
    // register copy). x comes from L2 one step ahead of its products.
    const int U = NT >= 8 ? TC_UNROLL / 2 : TC_UNROLL, ROUND = TC_WARPS * U;
    typedef uint4 Round[U][MT][2];
    auto load_round = [&](Round& a, int base) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            int st = base + u * TC_WARPS;
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int h = 0; h < 2; h++)
                    a[u][mt][h] = st < s_hi && wok[mt][h] ? __ldg(wr[mt][h] + 4 * st) : zero;
        }
    };
    Round ra, rb;
    int base = s_lo + warp;
    // The first round's weights stream in while the previous kernel finishes.
    load_round(ra, base);
    pdl_wait();
    const uint4* xr[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int r = 8 * nt + g;
        xok[nt] = r < rows;
        xr[nt] = (const uint4*)(x + (size_t)(r < rows ? r : 0) * k) + t;
    }
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[mt][nt][q] = 0.f;
    auto load_x = [&](uint4* b, int st) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) b[nt] = st < s_hi && xok[nt] ? xr[nt][4 * st] : zero;
    };
    auto products = [&](const Round& a, int base) {
        uint4 b[U][NT];
        load_x(b[0], base);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (base + u * TC_WARPS >= s_hi) break;
            if (u + 1 < U) load_x(b[u + 1], base + (u + 1) * TC_WARPS);
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                // Lane (g, t) holds k + 8t .. 8t + 7 of rows g (lo) and g + 8 (hi): mma's k
                // slots 2t, 2t + 1, 2t + 8, 2t + 9 are the first four, then the last four.
                const uint4 lo = a[u][mt][0], hi = a[u][mt][1];
                const unsigned int a0[4] = {lo.x, hi.x, lo.y, hi.y};
                const unsigned int a1[4] = {lo.z, hi.z, lo.w, hi.w};
                // All tiles' first halves, then their second: NT accumulations in flight.
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    Mma<S>::run(acc[mt][nt], a0, b[u][nt].x, b[u][nt].y);
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    Mma<S>::run(acc[mt][nt], a1, b[u][nt].z, b[u][nt].w);
            }
        }
    };
    for (; base < s_hi; base += 2 * ROUND) {
        load_round(rb, base + ROUND);
        products(ra, base);
        if (base + ROUND >= s_hi) break;
        load_round(ra, base + 2 * ROUND);
        products(rb, base + ROUND);
    }
    // The warps' sums into one per tile element: the second half hands theirs to the first,
    // which then leave theirs in `red`. Accumulator q is weight row g (+ 8 for q >= 2) and x
    // row 2t (+ 1 for odd q) of its tile.
    auto share = [&](bool add) {
        float(*mine)[TC + 1] = red[warp % HALF];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    float& cell = mine[16 * mt + g + 8 * (q >> 1)][8 * nt + 2 * t + (q & 1)];
                    if (add) acc[mt][nt][q] += cell;
                    else cell = acc[mt][nt][q];
                }
    };
    if (warp >= HALF) share(false);
    if (tid < TC) best[tid] = 0;
    __syncthreads();
    if (warp < HALF) share(true);
    __syncthreads();
    if (warp < HALF) share(false);
    __syncthreads();
    // Element idx of the tile: weight row idx % TR (consecutive threads, so the epilogue's
    // writes are coalesced), x row idx / TR.
    float v[PER];
#pragma unroll
    for (int q = 0; q < PER; q++) {
        int idx = tid + q * 32 * TC_WARPS, i = idx % TR, r = idx / TR;
        float sum = 0.f;
        if (idx < ELEMS) {
#pragma unroll
            for (int h = 0; h < HALF; h++) sum += red[h][i][r];
        }
        v[q] = sum;
    }
    tile_finish<S, PER, 32 * TC_WARPS, TR>(v, j0, rows, n, part, counts, next, next_bytes, e,
                                           best, &last);
}

// The epilogues after a cuBLAS product y[rows, n] (f32), elementwise (longer passes' path).
// A thread takes 4 consecutive columns (one 16-byte load when n allows) of rows blockIdx.y,
// blockIdx.y + gridDim.y, ...: no per-element division to find its row.
template <class S>
__device__ void epilogue_rows(const float* y, int rows, int n, const Epi<S>& e) {
    int j = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= n) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float* yr = y + (size_t)r * n;
        if ((n & 3) == 0) {
            float4 v = *(const float4*)(yr + j);
            epilogue<S>(e, v.x, r, j, n);
            epilogue<S>(e, v.y, r, j + 1, n);
            epilogue<S>(e, v.z, r, j + 2, n);
            epilogue<S>(e, v.w, r, j + 3, n);
        } else {
            for (int t = j; t < j + 4 && t < n; t++) epilogue<S>(e, yr[t], r, t, n);
        }
    }
}

// The epilogue's parameters, in the order every product kernel takes them.
#define EPI_PARAMS(S)                                                                         \
    int mode, float *out, const float *bias, S::T *act_out, int act,                          \
        const unsigned long long *caches, const int *pos, const int *caps, int c, int layer,  \
        int n_layer, float scale, int first_pick, unsigned long long *picks,                  \
        const float *pick_inv_t, const unsigned long long *pick_seeds
#define EPI_VALUE(S)                                                                              \
    Epi<S> {                                                                                      \
        mode, out, bias, act_out, act, caches, pos, caps, c, layer, n_layer, scale, first_pick,   \
            picks, pick_inv_t, pick_seeds                                                         \
    }

// The kernels of a weight format W with activations S, named for the format.
// B: the one-row kernels are held to the registers of B blocks a multiprocessor (0: no bound);
// the engine's warps a row follow the occupancy. Measured on the H200 (thirteenth session):
// B = 6 took f16 and int8 decode 1-5% faster, slowed int4 by 7%; 8 was slower everywhere.
// For measurements (GPT2RS_CUDA_DEFINES): GEMV1_MIN_BLOCKS=B sets B for every format,
// GEMV1_UNBOUNDED drops the bound everywhere.
#if defined(GEMV1_MIN_BLOCKS)
#define GEMV_BOUNDS(R, B) __launch_bounds__(256, (R) == 1 ? GEMV1_MIN_BLOCKS : 1)
#elif defined(GEMV1_UNBOUNDED)
#define GEMV_BOUNDS(R, B)
#else
#define GEMV_BOUNDS(R, B) GEMV_BOUNDS_##B(R)
#endif
#define GEMV_BOUNDS_0(R)
#define GEMV_BOUNDS_6(R) __launch_bounds__(256, (R) == 1 ? 6 : 1)
#define GEMV(S, W, name, R, B)                                                                \
    extern "C" __global__ void GEMV_BOUNDS(R, B) gemv##R##_##name(                            \
        const S::T* x, const unsigned char* w, const unsigned short* scales, int n, int k,    \
        int wpr, const unsigned char* next, unsigned int next_bytes, EPI_PARAMS(S)) {         \
        gemv<S, W, R>(x, w, scales, n, k, wpr, next, next_bytes, EPI_VALUE(S));               \
    }
#define WEIGHT_KERNELS(S, W, name, B)                                                         \
    extern "C" __global__ void embed_##name(const int* tokens, const int* pos,                \
                                            const unsigned char* wte,                         \
                                            const unsigned short* wte_scales,                 \
                                            const float* wpe, float* x, int c,                \
                                            unsigned long long* picks, int n_picks) {         \
        PDL_START();                                                                          \
        embed<W>(tokens, pos, wte, wte_scales, wpe, x, c, picks, n_picks);                    \
    }                                                                                         \
    GEMV(S, W, name, 1, B) GEMV(S, W, name, 2, B) GEMV(S, W, name, 3, B)                      \
    GEMV(S, W, name, 4, B) GEMV(S, W, name, 5, B) GEMV(S, W, name, 6, B)                      \
    GEMV(S, W, name, 7, B) GEMV(S, W, name, 8, B)

#define ATTENTION(S, name, G)                                                                 \
    extern "C" __global__ void attention##G##_##name(                                         \
        const float* q, const unsigned long long* caches, const int* pos, const int* caps,    \
        const int* groups, S::T* out, int c, int n_head, int layer, int n_layer, int n_ctx) { \
        PDL_START();                                                                          \
        attention<S, G>(q, caches, pos, caps, groups, out, c, n_head, layer, n_layer, n_ctx); \
    }

#define ATTENTION_SPLIT(S, name)                                                              \
    extern "C" __global__ void attention_split_##name(                                        \
        const float* q, const unsigned long long* caches, const int* pos, const int* caps,    \
        const int* groups, S::T* out, int c, int n_head, int layer, int n_layer,              \
        int chunk_cap, float* part, unsigned int* counts) {                                   \
        PDL_START();                                                                          \
        attention_split<S>(q, caches, pos, caps, groups, out, c, n_head, layer, n_layer,      \
                           chunk_cap, part, counts);                                          \
    }

// Tensor-core attention for prompt chunks (f16 and bf16 activations; see attention_mma).
#define ATTENTION_MMA(S, name)                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) attention_mma_##name(                \
        const float* q, const unsigned long long* caches, const int* pos, const int* caps,    \
        const int* groups, S::T* out, int c, int layer, int n_layer) {                        \
        PDL_START();                                                                          \
        attention_mma<S>(q, caches, pos, caps, groups, out, c, layer, n_layer);               \
    }
ATTENTION_MMA(F16, f16)
ATTENTION_MMA(BF16, bf16)

// The kernels of activations in S, named for it.
#define INSTANTIATE(S, name)                                                                  \
    extern "C" __global__ void layernorm_##name(const float* x, const int* rows,              \
                                                const float* gamma, const float* beta,        \
                                                S::T* out, int c, float eps) {                \
        layernorm<S>(x, rows, gamma, beta, out, c, eps);                                      \
    }                                                                                         \
    ATTENTION(S, name, 1)                                                                     \
    ATTENTION(S, name, 8)                                                                     \
    ATTENTION_SPLIT(S, name)                                                                  \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS) attention_decode_##name(     \
        const float* q, const unsigned long long* caches, const int* pos, const int* caps,    \
        S::T* out, int c, int n_head, int layer, int n_layer, int ch, float* part,            \
        unsigned int* counts) {                                                               \
        attention_decode<S>(q, caches, pos, caps, out, c, n_head, layer, n_layer, ch, part,   \
                            counts);                                                          \
    }                                                                                         \
    extern "C" __global__ void argmax_##name(const float* logits, int first, int v,           \
                                             unsigned long long* picks, const float* inv_t,   \
                                             const unsigned long long* seeds) {               \
        PDL_START();                                                                          \
        argmax_rows(logits, first, v, picks, inv_t, seeds);                                   \
    }                                                                                         \
    extern "C" __global__ void pick_filtered_##name(                                          \
        const float* logits, int first, int v, unsigned long long* picks, const float* inv_t, \
        const unsigned long long* seeds, const int* top_ks, const float* top_ps) {            \
        PDL_START();                                                                          \
        pick_filtered(logits, first, v, picks, inv_t, seeds, top_ks, top_ps);                 \
    }                                                                                         \
    extern "C" __global__ void epilogue_rows_##name(const float* y, int rows, int n,          \
                                                    EPI_PARAMS(S)) {                          \
        PDL_START();                                                                          \
        epilogue_rows<S>(y, rows, n, EPI_VALUE(S));                                           \
    }

INSTANTIATE(F32, f32)
INSTANTIATE(F16, f16)
INSTANTIATE(BF16, bf16)

WEIGHT_KERNELS(F32, WFloat<F32>, f32, 0)
WEIGHT_KERNELS(F16, WFloat<F16>, f16, 6)
WEIGHT_KERNELS(BF16, WFloat<BF16>, bf16, 6)
// Tensor-core products of up to 64 rows (see gemv_tc) for f16 and bf16 weights.
#define GEMV_TC(S, name, NT)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * TC_WARPS, 2)                             \
        gemv_tc##NT##_##name(const S::T* x, const S::T* w, int rows, int n, int k,            \
                             float* part, unsigned int* counts, const unsigned char* next,    \
                             unsigned int next_bytes, EPI_PARAMS(S)) {                        \
        gemv_tc<S, NT>(x, w, rows, n, k, part, counts, next, next_bytes, EPI_VALUE(S));       \
    }
GEMV_TC(F16, f16, 1) GEMV_TC(F16, f16, 2) GEMV_TC(F16, f16, 4) GEMV_TC(F16, f16, 8)
GEMV_TC(BF16, bf16, 1) GEMV_TC(BF16, bf16, 2) GEMV_TC(BF16, bf16, 4) GEMV_TC(BF16, bf16, 8)
// Integer weights run with f16 activations (and KV cache), and expand into f16 for cuBLAS.
#define QUANT_KERNELS(W, name, B)                                                             \
    WEIGHT_KERNELS(F16, W, name, B)                                                           \
    extern "C" __global__ void dequantize_##name(const unsigned char* w,                      \
                                                 const unsigned short* scales, int n, int k,  \
                                                 F16::T* out) {                               \
        PDL_START();                                                                          \
        dequantize<F16, W>(w, scales, n, k, out);                                             \
    }
QUANT_KERNELS(Q8, q8, 6)
QUANT_KERNELS(Q4, q4, 0)
