// A batch-1 decode pass through every layer in one kernel (appended to kernels.cu; it uses
// that file's formats, epilogue helpers and PDL calls).
//
// Why: a batch-1 step of gpt2 is ~85 dependent kernels of a few microseconds each, and the
// weights of one product only start to stream once the product before it is nearly done.
// Here one block per multiprocessor stays resident for the whole pass. Its producer warp
// streams the block's share of every weight matrix, layer after layer, into a ring of
// shared-memory slots with bulk copies (the copy engine, so no thread waits for memory),
// running up to the ring's size ahead. The 8 compute warps go through the phases of each
// layer, each phase starting when the other blocks' results it reads have arrived; weights
// keep arriving while they wait. Needs sm_90 (bulk copies, mbarriers); every block must be
// resident at once (one per multiprocessor, checked by the engine), or the waits never end.
//
// Phases of a layer (tick t names what each writes; see "Stamped words" below):
//   1. layer norm of x (each block the whole row, into shared memory), then its rows of the
//      QKV product: the key and value into the cache, and q (× scale), key and value as
//      stamped words `qkv` (tick 1);
//   2. attention: block b takes (head, chunk of positions) items b, b + G, ...; the chunk's
//      cached keys and values are read before its head's words of phase 1 arrive; each item
//      leaves its max, sum of exponentials and unnormalized output as stamped words `part`
//      (tick 2);
//   3. every block combines the chunks into the whole attention row, then its rows of the
//      output product, added into its rows of x (kept in shared memory), out as words `xs`
//      (tick 3);
//   4. layer norm of x from `xs`, its rows of the MLP's first product (+ bias, activation)
//      as words `mw`, two values a word (tick 4);
//   5. m from `mw`, its rows of the MLP's second product, added into x, out as `xs` (tick 5).
// The last layer also writes x itself, for the final norm after the kernel.
//
// Stamped words: blocks hand each other data as 64-bit words, a 32-bit payload in the low
// half and the tick of the phase that wrote it in the high half. One store carries both, so a
// reader that sees the tick it waits for has the value: no fence and no grid barrier, one
// round trip once the data is there (the tenth session's grid barriers cost two, plus the
// load after them). Ticks never repeat within 2^32 phases: pass E's phase ph of layer l is
// E · 5 · n_layer + 5 · l + ph. Reuse is safe because every block writes some words of `xs`
// and `mw` in every layer: a block can only overwrite a buffer after reading words that
// every other block wrote after its own last read of that buffer. The pass count E lives in
// `epoch`; block 0 adds one at the end, after every block has read it.
//
// Status: correct, and still slower than kernel by kernel, so the engine uses it only when
// asked (GPT2RS_CUDA_STEP=1). The tenth session's version met at grid barriers (about 18
// round trips a layer); these words made f16 slower, int8 and int4 faster (their scales now
// come in the slots). The profile says the compute warps' products and attention's chain,
// not the waits, are the critical path (docs/benchmarks.md, twelfth session). Compiled with
// STEP_PROFILE defined (GPT2RS_CUDA_DEFINES=STEP_PROFILE), block 0 and the last block print
// their cycles per phase every 256 passes.

#define STEP_CONSUMERS 256                   // compute threads: 8 warps
#define STEP_THREADS (STEP_CONSUMERS + 32)   // and the producer warp
#define STEP_SLOT_BYTES 16384                // a slot holds whole weight rows (and their scales)
#define STEP_MAX_SLOTS 16
#define STEP_MAX_SLOT_ROWS 64
#define STEP_HELD 8                          // row values a thread holds in the norms (c ≤ 2048)
#define STEP_M_HELD 16                       // words of m a thread reads (n_inner ≤ 8192)
#define STEP_SUMS 2048                       // floats of attention's per-group value sums
#define STEP_COMBINE_CHUNKS 2                // chunks whose words the combine asks for at once
#define STEP_SPIN_LIMIT (1u << 24)           // polls of one word before giving up (seconds)
#define STEP_MIN_CHUNK 256                   // attention's shortest chunk of positions

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
// The producer's arrival, announcing `bytes` that the slot's bulk copies will bring.
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

// A stamped word (see the top of this file): `payload` with the tick of the phase writing it.
__device__ __forceinline__ void put_word(unsigned long long* p, unsigned int payload,
                                         unsigned int tick) {
    unsigned long long v = ((unsigned long long)tick << 32) | payload;
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void put_float(unsigned long long* p, float v, unsigned int tick) {
    put_word(p, __float_as_uint(v), tick);
}
__device__ __forceinline__ unsigned long long peek_word(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}
// Waits until each word w[e] that was read from at(e) (nullptr: no word) carries `tick`, in
// one loop over all of them (one loop per word makes the compiler spill the others), asking
// again for those not there yet.
template <int N, class At>
__device__ __forceinline__ void await_loaded(unsigned long long* w, unsigned int tick, At at) {
    for (unsigned int spins = 0;; spins++) {
        bool all = true;
#pragma unroll
        for (int e = 0; e < N; e++) all &= !at(e) || (unsigned int)(w[e] >> 32) == tick;
        if (all) return;
        if (spins == STEP_SPIN_LIMIT) __trap();
#pragma unroll
        for (int e = 0; e < N; e++)
            if (at(e) && (unsigned int)(w[e] >> 32) != tick) w[e] = peek_word(at(e));
    }
}

// Words i = tid + e · STEP_CONSUMERS < count of `src` (N per thread): each payload to
// take(e, payload) once it carries `tick`, every load issued before the first wait.
template <int N, class Take>
__device__ __forceinline__ void await_words(const unsigned long long* src, int count,
                                            unsigned int tick, Take take) {
    auto at = [&](int e) {
        int i = threadIdx.x + e * STEP_CONSUMERS;
        return i < count ? src + i : nullptr;
    };
    unsigned long long w[N];
#pragma unroll
    for (int e = 0; e < N; e++) w[e] = at(e) ? peek_word(at(e)) : 0;
    await_loaded<N>(w, tick, at);
#pragma unroll
    for (int e = 0; e < N; e++)
        if (at(e)) take(e, (unsigned int)w[e]);
}

// The payload of the word at p once it carries `tick`, as a float.
__device__ __forceinline__ float await_float(const unsigned long long* p, unsigned int tick) {
    unsigned long long w = peek_word(p);
    await_loaded<1>(&w, tick, [&](int) { return p; });
    return __uint_as_float((unsigned int)w);
}

// The matrices of a layer: rows n and columns k.
__device__ __forceinline__ void step_dims(int mat, int c, int inner, int& n, int& k) {
    n = mat == 0 ? 3 * c : mat == 2 ? inner : c;
    k = mat == 3 ? inner : c;
}

// Block b's rows of an n-row matrix (n even): [first(b), first(b + 1)) with first(b) =
// 2 · ⌊(n / 2) · b / G⌋, pairs of rows, so that the MLP's first product packs two values a word.
__device__ __forceinline__ int step_first_row(int n, int b) {
    return 2 * (int)((long long)(n / 2) * b / gridDim.x);
}

// Weight rows per slot: the rows, then (quantized formats) their scales, copied from the
// 16-byte boundary before them to the one after (the engine pads the scales to allow it).
template <class W>
__device__ __forceinline__ int step_slot_rows(int k) {
    int per_row = (int)W::row_bytes(k) + (W::SCALED ? 2 * groups32(k) : 0);
    int room = STEP_SLOT_BYTES - (W::SCALED ? 32 : 0);
    return min(room / per_row, STEP_MAX_SLOT_ROWS);
}
// Where a slot's scales start.
template <class W>
__device__ __forceinline__ size_t step_scales_at(int k) {
    return (size_t)step_slot_rows<W>(k) * W::row_bytes(k);
}
// The 16-byte boundary at or before the scales of row j.
__device__ __forceinline__ const unsigned char* step_scales_from(const unsigned short* scales,
                                                                  int j, int k) {
    return (const unsigned char*)((size_t)(scales + (size_t)j * groups32(k)) & ~(size_t)15);
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
            const unsigned short* sc = layers[l].scales[mat];
            for (int j = step_first_row(n, blockIdx.x); j < j1; j += rows, g++) {
                int s = g % slots;
                unsigned int round = g / slots;
                if (round > 0) mbar_wait(empty + s, (round - 1) & 1);
                int here = min(rows, j1 - j);
                unsigned int bytes = (unsigned int)(here * rb), scale_bytes = 0;
                const unsigned char* scale_src = nullptr;
                if (W::SCALED) {
                    scale_src = step_scales_from(sc, j, k);
                    size_t end = ((size_t)(sc + (size_t)(j + here) * groups32(k)) + 15) & ~(size_t)15;
                    scale_bytes = (unsigned int)(end - (size_t)scale_src);
                }
                unsigned char* slot = ring + (size_t)s * STEP_SLOT_BYTES;
                mbar_expect_bytes(full + s, bytes + scale_bytes);
                bulk_copy(slot, w + (size_t)j * rb, bytes, full + s);
                if (W::SCALED) bulk_copy(slot + step_scales_at<W>(k), scale_src, scale_bytes, full + s);
            }
        }
    }
}

// layernorm(v) · gamma + beta into `out` (shared memory, S::T), every compute thread; v holds
// the thread's elements tid + e · STEP_CONSUMERS of the row, ga and be those of the norm.
template <class S>
__device__ void step_norm(const float* v, const float* ga, const float* be, typename S::T* out,
                          int c, float eps, float* red) {
    int tid = threadIdx.x;
    float s = 0.f;
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

// The norm of x at `tick` (from the words `xs`; tick 0: x itself, the embedding kernel's):
// gamma and beta are asked for first, as they do not wait for anyone.
template <class S>
__device__ void step_norm_of_x(const float* x, const unsigned long long* xs, unsigned int tick,
                               const float* gamma, const float* beta, typename S::T* out, int c,
                               float eps, float* red) {
    float v[STEP_HELD], ga[STEP_HELD], be[STEP_HELD];
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        int i = threadIdx.x + e * STEP_CONSUMERS;
        ga[e] = i < c ? gamma[i] : 0.f;
        be[e] = i < c ? beta[i] : 0.f;
    }
    if (tick == 0) {
#pragma unroll
        for (int e = 0; e < STEP_HELD; e++) {
            int i = threadIdx.x + e * STEP_CONSUMERS;
            v[e] = i < c ? __ldcg(x + i) : 0.f;
        }
    } else {
#pragma unroll
        for (int e = 0; e < STEP_HELD; e++) v[e] = 0.f;
        await_words<STEP_HELD>(xs, c, tick, [&](int e, unsigned int u) { v[e] = __uint_as_float(u); });
    }
    step_norm<S>(v, ga, be, out, c, eps, red);
}

// Where a product's rows go (see the phases above).
template <class S>
struct StepOut {
    float* x;                  // x itself (the last layer's result)
    unsigned long long* xs;    // x's words
    unsigned long long* qkv;   // q, the new key and value (f32 words, 3c)
    unsigned long long* mw;    // m, two S::T a word
    typename S::T* keys;       // the cache's keys of this layer at the new position
    typename S::T* values;     // and its values
    float* x_own;              // this block's rows of x (shared memory)
    unsigned int tick;         // the product's phase
    bool last;                 // the last layer's second MLP product: x out too
    int c, act;
};

// The result v of row j (r-th of the block) of matrix `mat`, its bias added, to where it goes.
template <class S>
__device__ __forceinline__ void step_epilogue(int mat, const StepLayer& L, const StepOut<S>& o,
                                              int j, int r, float v) {
    if (mat == 0) {
        int c = o.c;
        if (j < c) {
            put_float(o.qkv + j, v * L.scale, o.tick);
            return;
        }
        typename S::T t = S::store(v);
        if (j < 2 * c)
            o.keys[j - c] = t;
        else
            o.values[j - 2 * c] = t;
        // Attention reads the new key and value as later passes will: rounded to S::T.
        put_float(o.qkv + j, S::load(t), o.tick);
    } else {
        v += o.x_own[r];
        o.x_own[r] = v;
        put_float(o.xs + j, v, o.tick);
        if (o.last) o.x[j] = v;
    }
}

// The block's rows of matrix `mat` times `act` (shared memory), then their epilogues. Warp w
// takes rows w, w + 8, ... as the producer's slots bring them, a whole row at a time (its sum
// in a fixed order: the result does not depend on timing), into `out` (shared memory, a
// float per row of the block); every warp waits for every slot and releases it (the empty
// barriers count 8), so no warp can release a slot's next use before it was filled. Each
// thread's first biases are asked for before the products, so the epilogues mostly store.
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
    int rows = step_slot_rows<W>(k), pieces = W::pieces(k), groups = groups32(k);
    int j0 = step_first_row(n, blockIdx.x), count = step_first_row(n, blockIdx.x + 1) - j0;
    // Rows a thread finishes: pairs for the MLP's first product (one word), else one.
    int per = mat == 2 ? 2 : 1, r0 = tid * per;
    float b0 = r0 < count ? L.bias[mat][j0 + r0] : 0.f;
    float b1 = per == 2 && r0 + 1 < count ? L.bias[mat][j0 + r0 + 1] : 0.f;
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
        const unsigned char* slot = ring + (size_t)s * STEP_SLOT_BYTES;
        // The slot's scales, from where the producer's copy of them started.
        const unsigned short* ss = nullptr;
        if (W::SCALED) {
            const unsigned short* src = L.scales[mat] + (size_t)(j0 + first) * groups;
            ss = (const unsigned short*)(slot + step_scales_at<W>(k)) +
                 (((size_t)src & 15) >> 1);
        }
        for (int r = first + (warp - first % WARPS + WARPS) % WARPS; r < last; r += WARPS) {
            const uint4* wr = (const uint4*)slot + (size_t)(r - first) * (rb / 16);
            const unsigned short* sr = ss + (size_t)(r - first) * groups;
            float acc = 0.f;
            for (int p = lane; p < pieces; p += 32) {
                unsigned int scale = W::SCALED ? sr[W::group(p)] : 0u;
                W::template fma_s<S, 1>(wr[p], p, scale, act, k, &acc);
            }
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, off);
            if (lane == 0) out[r] = acc;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + s);
    }
    g += uses;
    consumers_sync();
    for (int r = r0; r < count; r += STEP_CONSUMERS * per) {
        bool mine = r == r0;
        float v = out[r] + (mine ? b0 : L.bias[mat][j0 + r]);
        if (per == 2) {
            float v1 = out[r + 1] + (mine ? b1 : L.bias[mat][j0 + r + 1]);
            unsigned int lo = S::store(activate(v, o.act));
            unsigned int hi = S::store(activate(v1, o.act));
            put_word(o.mw + (j0 + r) / 2, lo | (hi << 16), o.tick);
        } else {
            step_epilogue<S>(mat, L, o, j0 + r, r, v);
        }
    }
}

// Attention items of this block: softmax(q · Kᵀ) · V of head h over positions [lo, lo + len),
// left unnormalized as the words part[item · (d + 2) ..] = (max, sum of exponentials, d sums)
// at `part_tick`. The new position n - 1's q, key and value are phase 1's words `qkv` (at
// `tick`); every earlier position's key and value come from the cache, asked for before
// those words arrive. `qs` holds 3d floats (q, the new key, the new value).
template <class S>
__device__ void step_attention(const unsigned long long* qkv, unsigned int tick,
                               const typename S::T* keys, const typename S::T* values, int c,
                               int n_head, int n, int ch, int chunks, unsigned long long* part,
                               unsigned int part_tick, float* qs, float* sc, float* sums,
                               float* red) {
    typedef typename S::T T;
    const int V = 16 / sizeof(T);
    int tid = threadIdx.x, d = c / n_head;
    int pieces = d / V, pgroups = STEP_CONSUMERS / pieces;
    int pg = tid / pieces, col = tid - pg * pieces;
    for (int item = blockIdx.x; item < n_head * chunks; item += gridDim.x) {
        int h = item / chunks, lo = (item - h * chunks) * ch, len = min(n, lo + ch) - lo;
        int fresh = n - 1 - lo;  // the new position's index in the chunk (≥ len: not in it)
        const T* kh = keys + h * d;
        const T* vh = values + h * d;
        // A cached position's key, 8 pieces at a time (a position per thread), and the first
        // 4 positions of each value group, all asked for before the wait.
        const int KP = 8;
        uint4 kv[KP], vv[4];
        const uint4* kr = (const uint4*)(kh + (size_t)(lo + tid) * c);
#pragma unroll
        for (int u = 0; u < KP; u++)
            if (tid < len && tid != fresh && u < pieces) kv[u] = __ldcg(kr + u);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int s = pg + u * pgroups;
            if (pg < pgroups && s < len && s != fresh)
                vv[u] = __ldcg((const uint4*)(vh + (size_t)(lo + s) * c) + col);
        }
        for (int i = tid; i < 3 * d; i += STEP_CONSUMERS) {
            int which = i / d;  // q, key, value
            const unsigned long long* src = qkv + which * c + h * d + (i - which * d);
            qs[i] = await_float(src, tick);
        }
        consumers_sync();
        float mx = NEG_INF;
        for (int s = tid; s < len; s += STEP_CONSUMERS) {
            float acc = 0.f;
            if (s == fresh) {
                for (int e = 0; e < d; e++) acc += qs[e] * qs[d + e];
            } else {
                kr = (const uint4*)(kh + (size_t)(lo + s) * c);
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
            for (int s0 = pg; s0 < len; s0 += 4 * pgroups) {
                if (s0 != pg) {
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        int s = s0 + u * pgroups;
                        if (s < len && s != fresh)
                            vv[u] = __ldcg((const uint4*)(vh + (size_t)(lo + s) * c) + col);
                    }
                }
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    int s = s0 + u * pgroups;
                    if (s >= len) break;
                    if (s == fresh) {
#pragma unroll
                        for (int e = 0; e < V; e++) acc[e] += sc[s] * qs[2 * d + col * V + e];
                    } else {
                        add_weighted_piece<S, V>(acc, vv[u], sc[s]);
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < V; e++) sums[pg * d + col * V + e] = acc[e];
        }
        consumers_sync();
        unsigned long long* out = part + (size_t)item * (d + 2);
        for (int i = tid; i < d; i += STEP_CONSUMERS) {
            float t = 0.f;
            for (int g = 0; g < pgroups; g++) t += sums[g * d + i];
            put_float(out + 2 + i, t, part_tick);
        }
        if (tid == 0) {
            put_float(out, mx, part_tick);
            put_float(out + 1, l, part_tick);
        }
        consumers_sync();  // qs, sc and sums are free for the next item
    }
}

// The attention row from every head's chunks (the words `part` at `tick`), into `att` (shared
// memory, S::T): each chunk's weight exp(max - the head's max) and the head's sum first
// (`stats`: 2 floats per item). The values of up to STEP_COMBINE_CHUNKS chunks are asked for
// together with the statistics, so that a short cache costs one round trip.
template <class S>
__device__ void step_combine(const unsigned long long* part, unsigned int tick,
                             typename S::T* att, int c, int n_head, int chunks, float* stats) {
    const int CG = STEP_COMBINE_CHUNKS;
    int d = c / n_head, tid = threadIdx.x;
    // Word u of a group of chunks from z0: element tid + (u % STEP_HELD) · STEP_CONSUMERS of
    // chunk z0 + u / STEP_HELD.
    const int N = CG * STEP_HELD;
    auto word = [&](int z0, int u) -> const unsigned long long* {
        int z = z0 + u / STEP_HELD, i = tid + (u % STEP_HELD) * STEP_CONSUMERS, h = i / d;
        if (z >= chunks || i >= c) return nullptr;
        return part + ((size_t)h * chunks + z) * (d + 2) + 2 + (i - h * d);
    };
    unsigned long long w[N];
#pragma unroll
    for (int u = 0; u < N; u++) w[u] = word(0, u) ? peek_word(word(0, u)) : 0;
    for (int it = tid; it < 2 * n_head * chunks; it += STEP_CONSUMERS)
        stats[it] = await_float(part + (size_t)(it >> 1) * (d + 2) + (it & 1), tick);
    consumers_sync();
    for (int h = tid; h < n_head; h += STEP_CONSUMERS) {
        float* sh = stats + 2 * h * chunks;
        float mx = NEG_INF, l = 0.f;
        for (int z = 0; z < chunks; z++) mx = fmaxf(mx, sh[2 * z]);
        for (int z = 0; z < chunks; z++) {
            float wz = __expf(sh[2 * z] - mx);
            sh[2 * z] = wz;
            l += wz * sh[2 * z + 1];
        }
        for (int z = 0; z < chunks; z++) sh[2 * z] /= l;
    }
    consumers_sync();
    float o[STEP_HELD];
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) o[e] = 0.f;
    for (int z0 = 0; z0 < chunks; z0 += CG) {
        if (z0 > 0) {
#pragma unroll
            for (int u = 0; u < N; u++) w[u] = word(z0, u) ? peek_word(word(z0, u)) : 0;
        }
        await_loaded<N>(w, tick, [&](int u) { return word(z0, u); });
#pragma unroll
        for (int u = 0; u < N; u++) {
            int z = z0 + u / STEP_HELD, i = tid + (u % STEP_HELD) * STEP_CONSUMERS;
            if (word(z0, u)) o[u % STEP_HELD] += stats[2 * ((i / d) * chunks + z)] * __uint_as_float((unsigned int)w[u]);
        }
    }
#pragma unroll
    for (int e = 0; e < STEP_HELD; e++) {
        int i = tid + e * STEP_CONSUMERS;
        if (i < c) att[i] = S::store(o[e]);
    }
    consumers_sync();
}

// m (two S::T a word, `inner` values) from the words `mw` at `tick` into `act` (shared memory).
template <class S>
__device__ void step_read_m(const unsigned long long* mw, unsigned int tick, typename S::T* act,
                            int inner) {
    unsigned int* pairs = (unsigned int*)act;
    await_words<STEP_M_HELD>(mw, inner / 2, tick, [&](int e, unsigned int u) {
        pairs[threadIdx.x + e * STEP_CONSUMERS] = u;
    });
    consumers_sync();
}

// The pass: x (f32, the embedded new token) through every layer, for the one sequence whose
// cache is caches[0] (caps[0] positions) with the new token at pos[0]; the last layer's x
// back into x. The words (see the top of this file): xs (c), qkv (3c), part (at most
// n_head · ⌈n_ctx / 64⌉ items of d + 2), mw (inner / 2); `epoch` counts passes. Shared memory
// (dynamic): `slots` slots, then max(c, inner) S::T (padded to 16 bytes), then floats: n_ctx,
// STEP_SUMS, 3d, 2 · n_head · ⌈n_ctx / 64⌉, one per row of the block's largest share of a
// matrix, and one per row of its share of x.
template <class S, class W>
__device__ void decode_step(const StepLayer* layers, int n_layer, float* x,
                            unsigned long long* xs, unsigned long long* qkv,
                            unsigned long long* part, unsigned long long* mw,
                            const unsigned long long* caches, const int* pos, const int* caps,
                            int c, int inner, int n_head, int n_ctx, int act, float eps,
                            int slots, unsigned long long* epoch) {
    typedef typename S::T T;
    extern __shared__ __align__(128) unsigned char step_smem[];
    __shared__ __align__(8) unsigned long long full[STEP_MAX_SLOTS], empty[STEP_MAX_SLOTS];
    __shared__ float red[STEP_CONSUMERS / 32];
    __shared__ unsigned int pass;
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
    int d = c / n_head;
    T* act_s = (T*)(ring + (size_t)slots * STEP_SLOT_BYTES);
    float* sc = (float*)(act_s + ((max(c, inner) + 7) & ~7));
    float* att_sums = sc + n_ctx;
    float* qs = att_sums + STEP_SUMS;
    float* stats = qs + 3 * d;
    float* rows_out = stats + 2 * n_head * ((n_ctx + 63) / 64);
    float* x_own = rows_out + 2 * ((max(3 * c, inner) / 2 + gridDim.x - 1) / gridDim.x);
    if (tid == 0) pass = (unsigned int)__ldcg(epoch);
    pdl_wait();  // x is the embedding kernel's
    int xj0 = step_first_row(c, blockIdx.x), xcount = step_first_row(c, blockIdx.x + 1) - xj0;
    for (int r = tid; r < xcount; r += STEP_CONSUMERS) x_own[r] = __ldcg(x + xj0 + r);
    consumers_sync();
    unsigned int base = pass * 5u * (unsigned int)n_layer;

    int n = pos[0] + 1;
    size_t cap = caps[0];
    T* cache = (T*)caches[0];
    // Attention items: a head in chunks of at least STEP_MIN_CHUNK positions (so a short
    // cache is one chunk, one round trip in the combine), about as many as the blocks each
    // head gets. (64 measured the same on gpt2-xl at 32-160 positions.)
    int per_head = max(1, (int)gridDim.x / n_head);
    int ch = max(STEP_MIN_CHUNK, (n + per_head - 1) / per_head);
    int chunks = (n + ch - 1) / ch;
    unsigned int g = 0;
#ifdef STEP_PROFILE
    bool prof_on = tid == 0 && (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1);
    long long prof[16] = {0}, prof_t = clock64();
    if (tid == 0) step_prof_wait = 0;
#endif
    // The layer's pointers in shared memory: in registers they would be live all layer long.
    __shared__ StepLayer layer_s;
    const StepLayer& L = layer_s;
    for (int l = 0; l < n_layer; l++) {
        consumers_sync();  // every thread is done with the last layer's
        if (tid == 0) layer_s = layers[l];
        consumers_sync();
        unsigned int t0 = base + 5u * l;  // phase p of this layer writes at tick t0 + p
        T* keys = cache + (size_t)l * cap * c;
        T* values = keys + (size_t)n_layer * cap * c;
        StepOut<S> o = {x,     xs,    qkv,   mw, keys + (size_t)(n - 1) * c,
                        values + (size_t)(n - 1) * c, x_own, t0 + 1, false, c, act};
        step_norm_of_x<S>(x, xs, l == 0 ? 0u : t0, L.ln1_gamma, L.ln1_beta, act_s, c, eps, red);
        PROF(0)
        step_product<S, W>(0, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(1)
        step_attention<S>(qkv, t0 + 1, keys, values, c, n_head, n, ch, chunks, part, t0 + 2, qs,
                          sc, att_sums, red);
        PROF(2)
        step_combine<S>(part, t0 + 2, act_s, c, n_head, chunks, stats);
        PROF(3)
        o.tick = t0 + 3;
        step_product<S, W>(1, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(4)
        step_norm_of_x<S>(x, xs, t0 + 3, L.ln2_gamma, L.ln2_beta, act_s, c, eps, red);
        PROF(5)
        o.tick = t0 + 4;
        step_product<S, W>(2, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(6)
        step_read_m<S>(mw, t0 + 4, act_s, inner);
        PROF(7)
        o.tick = t0 + 5;
        o.last = l + 1 == n_layer;
        step_product<S, W>(3, L, o, inner, act_s, ring, full, empty, slots, g, rows_out);
        PROF(8)
    }
    // Every block has read `epoch` (block 0 has read words that all of them wrote after).
    consumers_sync();
    if (blockIdx.x == 0 && tid == 0) atomicAdd(epoch, 1ull);
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

#define DECODE_STEP(S, W, name)                                                                  \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, 1) decode_step_##name(            \
        const StepLayer* layers, int n_layer, float* x, unsigned long long* xs,                  \
        unsigned long long* qkv, unsigned long long* part, unsigned long long* mw,               \
        const unsigned long long* caches, const int* pos, const int* caps, int c, int inner,     \
        int n_head, int n_ctx, int act, float eps, int slots, unsigned long long* epoch) {       \
        decode_step<S, W>(layers, n_layer, x, xs, qkv, part, mw, caches, pos, caps, c, inner,    \
                          n_head, n_ctx, act, eps, slots, epoch);                                \
    }
DECODE_STEP(F16, WFloat<F16>, f16)
DECODE_STEP(BF16, WFloat<BF16>, bf16)
DECODE_STEP(F16, Q8, q8)
DECODE_STEP(F16, Q4, q4)
