// A batch-1 decode pass through every layer in one kernel (appended to kernels.cu; it uses
// that file's formats, epilogue helpers and PDL calls).
//
// Why: a batch-1 step of gpt2 is ~85 dependent kernels of a few microseconds each, and the
// weights of one product only start to stream once the product before it is nearly done.
// Here one block per multiprocessor stays resident for the whole pass. Its producer warp
// streams the block's share of every weight matrix, layer after layer, into a ring of
// shared-memory slots with bulk copies (the copy engine, so no thread waits for memory),
// running up to the ring's size ahead. The 8 compute warps go through the phases of each
// layer and meet the other blocks at a grid barrier between phases; weights keep arriving
// while they wait. Needs sm_90 (bulk copies, mbarriers); every block must be resident at
// once (one per multiprocessor, checked by the engine), or the barriers never open.
//
// Phases of a layer (each ends at a grid barrier):
//   1. layer norm of x (each block the whole row, into shared memory), then its rows of the
//      QKV product: q (× scale, f32) into `q`, the key and value into the cache;
//   2. attention: block b takes (head, chunk of positions) items b, b + G, ...; each leaves
//      its max, sum of exponentials and unnormalized output in `part`;
//   3. every block combines the chunks into the whole attention row, then its rows of the
//      output product, added into x;
//   4. layer norm of x, its rows of the MLP's first product (+ bias, activation) into `m`;
//   5. m into shared memory, its rows of the MLP's second product, added into x.
// Data that blocks hand each other goes through L2 (ld/st .cg): L1 is not coherent.
//
// Status: correct (tests/against_cpu.rs) but slower than the kernel-by-kernel path on an
// H200, so the engine uses it only when asked (GPT2RS_CUDA_STEP=1). Every phase waits for at
// least one round trip to memory, each about a microsecond while the producers keep HBM busy,
// and a layer has about 18 of them (docs/benchmarks.md, tenth session). Compiled with
// STEP_PROFILE defined (a line `#define STEP_PROFILE` above this file's code), block 0 and
// the last block print their cycles per phase every 256 passes.

#define STEP_CONSUMERS 256                   // compute threads: 8 warps
#define STEP_THREADS (STEP_CONSUMERS + 32)   // and the producer warp
#define STEP_SLOT_BYTES 16384                // a slot holds whole weight rows
#define STEP_MAX_SLOTS 16
#define STEP_MAX_SLOT_ROWS 64
#define STEP_HELD 8                          // row values a thread holds in the norms (c ≤ 2048)
#define STEP_SUMS 2048                       // floats of attention's per-group value sums

// One layer's pointers, as the engine's decode_step.rs lays them out: the QKV, attention
// output, MLP first and MLP second matrices (their packed values, scales and f32 biases),
// the two norms, and the attention scale.
struct StepLayer {
    const unsigned char* w[4];
    const unsigned short* scales[4];
    const float* bias[4];
    const float* ln1_gamma;
    const float* ln1_beta;
    const float* ln2_gamma;
    const float* ln2_beta;
    float scale;
    int pad;
};

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned int count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
#endif
}
// The producer's arrival, announcing `bytes` that the slot's bulk copy will bring.
__device__ __forceinline__ void mbar_expect_bytes(unsigned long long* bar, unsigned int bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// Waits for the barrier's phase of this parity to complete.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned int parity) {
#if __CUDA_ARCH__ >= 900
    unsigned int done = 0;
    while (!done) {
        asm volatile(
            "{\n\t.reg .pred p;\n\t"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    }
#endif
}
// `bytes` (a multiple of 16) from global to shared memory by the copy engine; `bar` counts them.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned int bytes,
                                          unsigned long long* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
#endif
}

#ifdef STEP_PROFILE
// Measurement builds: cycles per phase, summed over layers, of thread 0 in blocks 0 and G - 1.
__device__ unsigned long long step_prof[2][16];
__device__ unsigned int step_prof_launches;
__shared__ unsigned long long step_prof_wait;
#define PROF(i)                                          \
    if (prof_on) {                                       \
        long long now = clock64();                       \
        prof[i] += now - prof_t;                         \
        prof_t = now;                                    \
    }
#else
#define PROF(i)
#endif

// The compute warps only (the producer warp never joins).
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;" ::"n"(STEP_CONSUMERS) : "memory");
}

// Sum or max over the compute threads, the same value in all of them. `red`: 8 floats.
__device__ float consumers_reduce(float v, float* red, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(FULL_MASK, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    consumers_sync();  // red is free
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    consumers_sync();
    float t = red[0];
    for (int i = 1; i < STEP_CONSUMERS / 32; i++) t = is_max ? fmaxf(t, red[i]) : t + red[i];
    return t;
}

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// Every block's compute threads meet here; what any of them wrote before is visible to all
// after (the block's barrier, then one release and acquire at GPU scope, as CUTLASS's
// GenericBarrier). `count` only grows (one arrival per block and barrier; a pass starts at a
// multiple of G), so the next barrier opens when it reaches `target` + G, and nothing is
// ever reset.
__device__ void grid_sync(unsigned long long* count, unsigned long long& target) {
    consumers_sync();
    if (threadIdx.x == 0) {
        target += gridDim.x;
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
        while (load_acquire(count) < target) {
        }
    }
    consumers_sync();
}

// The matrices of a layer: rows n and columns k.
__device__ __forceinline__ void step_dims(int mat, int c, int inner, int& n, int& k) {
    n = mat == 0 ? 3 * c : mat == 2 ? inner : c;
    k = mat == 3 ? inner : c;
}

// Block b's rows of an n-row matrix: [n·b / G, n·(b + 1) / G).
__device__ __forceinline__ int step_first_row(int n, int b) {
    return (int)((long long)n * b / gridDim.x);
}

// Weight rows per slot.
template <class W>
__device__ __forceinline__ int step_slot_rows(int k) {
    return min((int)(STEP_SLOT_BYTES / W::row_bytes(k)), STEP_MAX_SLOT_ROWS);
}

// The producer: the block's rows of every matrix, in the order the compute warps take them,
// slot after slot of the ring; a slot is refilled once they have released it.
template <class W>
__device__ void step_stream(const StepLayer* layers, int n_layer, int c, int inner,
                            unsigned char* ring, unsigned long long* full,
                            unsigned long long* empty, int slots) {
    unsigned int g = 0;
    for (int l = 0; l < n_layer; l++) {
        for (int mat = 0; mat < 4; mat++) {
            int n, k;
            step_dims(mat, c, inner, n, k);
            size_t rb = W::row_bytes(k);
            int rows = step_slot_rows<W>(k);
            int j1 = step_first_row(n, blockIdx.x + 1);
            const unsigned char* w = layers[l].w[mat];
            for (int j = step_first_row(n, blockIdx.x); j < j1; j += rows, g++) {
                int s = g % slots;
                unsigned int round = g / slots;
                if (round > 0) mbar_wait(empty + s, (round - 1) & 1);
                unsigned int bytes = (unsigned int)(min(rows, j1 - j) * rb);
                mbar_expect_bytes(full + s, bytes);
                bulk_copy(ring + (size_t)s * STEP_SLOT_BYTES, w + (size_t)j * rb, bytes, full + s);
            }
        }
    }
}

// layernorm(x) · gamma + beta into `out` (shared memory, S::T), every compute thread.
template <class S>
__device__ void step_norm(const float* x, const float* gamma, const float* beta,
                          typename S::T* out, int c, float eps, float* red) {
    int tid = threadIdx.x;
    float v[STEP_HELD], ga[STEP_HELD], be[STEP_HELD];
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        int i = tid + e * STEP_CONSUMERS;
        v[e] = i < c ? __ldcg(x + i) : 0.f;
        ga[e] = i < c ? gamma[i] : 0.f;
        be[e] = i < c ? beta[i] : 0.f;
    }
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) s += v[e];
    float mean = consumers_reduce(s, red, false) / c;
    float q = 0.f;
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        float d = tid + e * STEP_CONSUMERS < c ? v[e] - mean : 0.f;
        q += d * d;
    }
    float inv = rsqrtf(consumers_reduce(q, red, false) / c + eps);
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        int i = tid + e * STEP_CONSUMERS;
        if (i < c) out[i] = S::store((v[e] - mean) * inv * ga[e] + be[e]);
    }
    consumers_sync();
}

// Where a product's rows go (see the phases above).
template <class S>
struct StepOut {
    float* x;
    float* q;
    typename S::T* m;
    typename S::T* keys;    // the cache's keys of this layer at the new position
    typename S::T* values;  // and its values
    int c, act;
};

// What row j of matrix `mat` adds to its product before the epilogue: its bias, and for the
// projections back into the residual stream the row's x (which only this block writes).
template <class S>
__device__ __forceinline__ float step_addend(int mat, const StepLayer& L, const StepOut<S>& o,
                                             int j) {
    float b = L.bias[mat][j];
    return mat == 1 || mat == 3 ? b + __ldcg(o.x + j) : b;
}

// Row j's result v (its product plus step_addend) to where it goes.
template <class S>
__device__ __forceinline__ void step_epilogue(int mat, const StepLayer& L, const StepOut<S>& o,
                                              int j, float v) {
    if (mat == 0) {
        if (j < o.c)
            __stcg(o.q + j, v * L.scale);
        else if (j < 2 * o.c)
            o.keys[j - o.c] = S::store(v);
        else
            o.values[j - 2 * o.c] = S::store(v);
    } else if (mat == 2) {
        o.m[j] = S::store(activate(v, o.act));
    } else {
        __stcg(o.x + j, v);
    }
}

// The block's rows of matrix `mat` times `act` (shared memory), then their epilogues. Warp w
// takes rows w, w + 8, ... as the producer's slots bring them, a whole row at a time (its sum
// in a fixed order: the result does not depend on timing), into `out` (shared memory, a
// float per row of the block); every warp waits for every slot and releases it (the empty
// barriers count 8), so no warp can release a slot's next use before it was filled. Each
// thread's row's addend is read before, so the epilogues at the end only store.
template <class S, class W>
__device__ void step_product(int mat, const StepLayer& L, const StepOut<S>& o, int inner,
                             const typename S::T* act, const unsigned char* ring,
                             unsigned long long* full, unsigned long long* empty, int slots,
                             unsigned int& g, float* out) {
    const int WARPS = STEP_CONSUMERS / 32;
    int n, k;
    step_dims(mat, o.c, inner, n, k);
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    size_t rb = W::row_bytes(k);
    int rows = step_slot_rows<W>(k), pieces = W::pieces(k);
    int j0 = step_first_row(n, blockIdx.x), count = step_first_row(n, blockIdx.x + 1) - j0;
    float addend = tid < count ? step_addend<S>(mat, L, o, j0 + tid) : 0.f;
    int uses = (count + rows - 1) / rows;
    for (int t = 0; t < uses; t++) {
        unsigned int at = g + t;
        int s = at % slots, first = t * rows, last = min(first + rows, count);
#ifdef STEP_PROFILE
        long long t0 = clock64();
#endif
        mbar_wait(full + s, (at / slots) & 1);
#ifdef STEP_PROFILE
        if (tid == 0) step_prof_wait += clock64() - t0;
#endif
        const uint4* slot = (const uint4*)(ring + (size_t)s * STEP_SLOT_BYTES);
        for (int r = first + (warp - first % WARPS + WARPS) % WARPS; r < last; r += WARPS) {
            const uint4* wr = slot + (size_t)(r - first) * (rb / 16);
            const unsigned short* sr = L.scales[mat] + (size_t)(j0 + r) * groups32(k);
            float acc = 0.f;
            for (int p = lane; p < pieces; p += 32) W::template fma<S, 1>(wr[p], p, sr, act, k, &acc);
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, off);
            if (lane == 0) out[r] = acc;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + s);
    }
    g += uses;
    consumers_sync();
    for (int r = tid; r < count; r += STEP_CONSUMERS) {
        float a = r == tid ? addend : step_addend<S>(mat, L, o, j0 + r);
        step_epilogue<S>(mat, L, o, j0 + r, out[r] + a);
    }
}

// Attention items of this block: softmax(q · Kᵀ) · V of head h over positions [lo, lo + len),
// left unnormalized in part[item] as (max, sum of exponentials, d sums).
template <class S>
__device__ void step_attention(const float* q, const typename S::T* keys,
                               const typename S::T* values, int c, int n_head, int n, int ch,
                               int chunks, float* part, float* qs, float* sc, float* sums,
                               float* red) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    int tid = threadIdx.x, d = c / n_head;
    int pieces = d / V, pgroups = STEP_CONSUMERS / pieces;
    int pg = tid / pieces, col = tid - pg * pieces;
    for (int item = blockIdx.x; item < n_head * chunks; item += gridDim.x) {
        int h = item / chunks, lo = (item - h * chunks) * ch, len = min(n, lo + ch) - lo;
        const T* kh = keys + h * d;
        const T* vh = values + h * d;
        // A position's key, 8 pieces at a time, all asked for before any is used (q too).
        const int KP = 8;
        uint4 kv[KP];
        const uint4* kr = (const uint4*)(kh + (size_t)(lo + tid) * c);
#pragma unroll
        for (int u = 0; u < KP; u++)
            if (tid < len && u < pieces) kv[u] = __ldcg(kr + u);
        for (int i = tid; i < d; i += STEP_CONSUMERS) qs[i] = __ldcg(q + h * d + i);
        consumers_sync();
        float mx = NEG_INF;
        for (int s = tid; s < len; s += STEP_CONSUMERS) {
            kr = (const uint4*)(kh + (size_t)(lo + s) * c);
            float acc = 0.f;
            for (int p0 = 0; p0 < pieces; p0 += KP) {
                if (s != tid || p0 > 0) {
#pragma unroll
                    for (int u = 0; u < KP; u++)
                        if (p0 + u < pieces) kv[u] = __ldcg(kr + p0 + u);
                }
#pragma unroll
                for (int u = 0; u < KP; u++) {
                    if (p0 + u >= pieces) break;
                    const T* kt = (const T*)&kv[u];
#pragma unroll
                    for (int e = 0; e < V; e++) acc += qs[(p0 + u) * V + e] * S::load(kt[e]);
                }
            }
            sc[s] = acc;
            mx = fmaxf(mx, acc);
        }
        mx = consumers_reduce(mx, red, true);
        float l = 0.f;
        for (int s = tid; s < len; s += STEP_CONSUMERS) {
            float e = __expf(sc[s] - mx);
            sc[s] = e;
            l += e;
        }
        l = consumers_reduce(l, red, false);  // its barriers also publish sc
        if (pg < pgroups) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // V ≤ 8
            // 4 positions' pieces asked for at a time.
            for (int s0 = pg; s0 < len; s0 += 4 * pgroups) {
                uint4 vv[4];
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int s = s0 + u * pgroups;
                    if (s < len) vv[u] = __ldcg((const uint4*)(vh + (size_t)(lo + s) * c) + col);
                }
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int s = s0 + u * pgroups;
                    if (s >= len) break;
                    add_weighted_piece<S, V>(acc, vv[u], sc[s]);
                }
            }
#pragma unroll
            for (int e = 0; e < V; e++) sums[pg * d + col * V + e] = acc[e];
        }
        consumers_sync();
        float* out = part + (size_t)item * (d + 2);
        for (int i = tid; i < d; i += STEP_CONSUMERS) {
            float t = 0.f;
            for (int g = 0; g < pgroups; g++) t += sums[g * d + i];
            __stcg(out + 2 + i, t);
        }
        if (tid == 0) {
            __stcg(out, mx);
            __stcg(out + 1, l);
        }
        consumers_sync();  // qs, sc and sums are free for the next item
    }
}

// The attention row from every head's chunks, into `att` (shared memory, S::T): each chunk's
// weight exp(max - the head's max) and the head's sum first (`stats`: 2 floats per item).
template <class S>
__device__ void step_combine(const float* part, typename S::T* att, int c, int n_head,
                             int chunks, float* stats) {
    int d = c / n_head, tid = threadIdx.x;
    for (int it = tid; it < n_head * chunks; it += STEP_CONSUMERS) {
        stats[2 * it] = __ldcg(part + (size_t)it * (d + 2));
        stats[2 * it + 1] = __ldcg(part + (size_t)it * (d + 2) + 1);
    }
    consumers_sync();
    for (int h = tid; h < n_head; h += STEP_CONSUMERS) {
        float* sh = stats + 2 * h * chunks;
        float mx = NEG_INF, l = 0.f;
        for (int z = 0; z < chunks; z++) mx = fmaxf(mx, sh[2 * z]);
        for (int z = 0; z < chunks; z++) {
            float w = __expf(sh[2 * z] - mx);
            sh[2 * z] = w;
            l += w * sh[2 * z + 1];
        }
        for (int z = 0; z < chunks; z++) sh[2 * z] /= l;
    }
    consumers_sync();
    // Each thread's (up to STEP_HELD) elements: one chunk's values of all of them asked for
    // at once, so a chunk costs one round trip to memory.
    float o[STEP_HELD];
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) o[e] = 0.f;
    for (int z = 0; z < chunks; z++) {
        float v[STEP_HELD];
#pragma unroll
        for (int e = 0; e < STEP_HELD; e++) {
            int i = tid + e * STEP_CONSUMERS, h = i / d;
            size_t at = ((size_t)h * chunks + z) * (d + 2) + 2 + (i - h * d);
            v[e] = i < c ? __ldcg(part + at) : 0.f;
        }
#pragma unroll
        for (int e = 0; e < STEP_HELD; e++) {
            int i = tid + e * STEP_CONSUMERS;
            if (i < c) o[e] += stats[2 * ((i / d) * chunks + z)] * v[e];
        }
    }
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        int i = tid + e * STEP_CONSUMERS;
        if (i < c) att[i] = S::store(o[e]);
    }
    consumers_sync();
}

// The pass: x (f32, the embedded new token) through every layer, for the one sequence whose
// cache is caches[0] (caps[0] positions) with the new token at pos[0]. q (c floats), m (inner
// S::T) and part (see step_attention: at most n_head · ⌈n_ctx / 64⌉ items) are scratch;
// `count` is the grid barrier's. Shared memory (dynamic): `slots` slots, then max(c, inner)
// S::T (padded to 16 bytes), then floats: n_ctx, STEP_SUMS, d, 2 · n_head · ⌈n_ctx / 64⌉,
// and one per row of the block's largest share of a matrix.
template <class S, class W>
__device__ void decode_step(const StepLayer* layers, int n_layer, float* x, float* q,
                            typename S::T* m, float* part, const unsigned long long* caches,
                            const int* pos, const int* caps, int c, int inner, int n_head,
                            int n_ctx, int act, float eps, int slots,
                            unsigned long long* count) {
    typedef typename S::T T;
    extern __shared__ __align__(128) unsigned char step_smem[];
    __shared__ __align__(8) unsigned long long full[STEP_MAX_SLOTS], empty[STEP_MAX_SLOTS];
    __shared__ float red[STEP_CONSUMERS / 32];
    int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < slots; s++) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, STEP_CONSUMERS / 32);
        }
#if __CUDA_ARCH__ >= 900
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
    }
    __syncthreads();
    pdl_launch_next();
    unsigned char* ring = step_smem;
    if (tid >= STEP_CONSUMERS) {
        if (tid == STEP_CONSUMERS)
            step_stream<W>(layers, n_layer, c, inner, ring, full, empty, slots);
        return;
    }
    T* act_s = (T*)(ring + (size_t)slots * STEP_SLOT_BYTES);
    float* sc = (float*)(act_s + ((max(c, inner) + 7) & ~7));
    float* att_sums = sc + n_ctx;
    float* qs = att_sums + STEP_SUMS;
    float* stats = qs + c / n_head;
    float* rows_out = stats + 2 * n_head * ((n_ctx + 63) / 64);
    pdl_wait();  // x is the embedding kernel's
    // Where the barrier count stands: a multiple of G, as no block has arrived yet at this
    // pass's first barrier while this one has not.
    unsigned long long target = load_acquire(count) / gridDim.x * gridDim.x;

    int n = pos[0] + 1;
    size_t cap = caps[0];
    T* cache = (T*)caches[0];
    // Attention items: a head in chunks of at least 64 positions, about as many as the
    // blocks each head gets.
    int per_head = max(1, (int)gridDim.x / n_head);
    int ch = max(64, (n + per_head - 1) / per_head);
    int chunks = (n + ch - 1) / ch;
    unsigned int g = 0;
#ifdef STEP_PROFILE
    bool prof_on = tid == 0 && (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1);
    long long prof[16] = {0}, prof_t = clock64();
    if (tid == 0) step_prof_wait = 0;
#endif
    for (int l = 0; l < n_layer; l++) {
        const StepLayer L = layers[l];
        T* keys = cache + (size_t)l * cap * c;
        T* values = keys + (size_t)n_layer * cap * c;
        StepOut<S> o = {x, q, m, keys + (size_t)(n - 1) * c, values + (size_t)(n - 1) * c, c,
                        act};
        step_norm<S>(x, L.ln1_gamma, L.ln1_beta, act_s, c, eps, red);
        PROF(0)
        step_product<S, W>(0, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(1)
        grid_sync(count, target);
        PROF(2)
        step_attention<S>(q, keys, values, c, n_head, n, ch, chunks, part, qs, sc, att_sums,
                          red);
        PROF(3)
        grid_sync(count, target);
        PROF(4)
        step_combine<S>(part, act_s, c, n_head, chunks, stats);
        PROF(5)
        step_product<S, W>(1, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(6)
        grid_sync(count, target);
        PROF(7)
        step_norm<S>(x, L.ln2_gamma, L.ln2_beta, act_s, c, eps, red);
        PROF(8)
        step_product<S, W>(2, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(9)
        grid_sync(count, target);
        PROF(10)
        for (int i = tid; i < inner / 8; i += STEP_CONSUMERS)
            ((uint4*)act_s)[i] = __ldcg((const uint4*)m + i);
        consumers_sync();
        PROF(11)
        step_product<S, W>(3, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(12)
        if (l + 1 < n_layer) grid_sync(count, target);
        PROF(13)
    }
#ifdef STEP_PROFILE
    if (prof_on) {
        prof[14] = step_prof_wait;
        int which = blockIdx.x == 0 ? 0 : 1;
        for (int i = 0; i < 15; i++) atomicAdd(&step_prof[which][i], (unsigned long long)prof[i]);
        if (blockIdx.x == 0) {
            unsigned int k = atomicAdd(&step_prof_launches, 1u) + 1;
            if (k % 256 == 0) {
                for (int b = 0; b < 2; b++) {
                    printf("step_prof block %d (us/step):", b == 0 ? 0 : gridDim.x - 1);
                    for (int i = 0; i < 15; i++) {
                        printf(" %d:%.1f", i, step_prof[b][i] / 256.0 / 1980.0);
                        step_prof[b][i] = 0;
                    }
                    printf("\n");
                }
            }
        }
    }
#endif
}

#define DECODE_STEP(S, W, name)                                                                \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, 1) decode_step_##name(          \
        const StepLayer* layers, int n_layer, float* x, float* q, S::T* m, float* part,        \
        const unsigned long long* caches, const int* pos, const int* caps, int c, int inner,   \
        int n_head, int n_ctx, int act, float eps, int slots, unsigned long long* count) {     \
        decode_step<S, W>(layers, n_layer, x, q, m, part, caches, pos, caps, c, inner, n_head, \
                          n_ctx, act, eps, slots, count);                                      \
    }
DECODE_STEP(F16, WFloat<F16>, f16)
DECODE_STEP(BF16, WFloat<BF16>, bf16)
DECODE_STEP(F16, Q8, q8)
DECODE_STEP(F16, Q4, q4)
