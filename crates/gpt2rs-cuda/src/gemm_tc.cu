// Tensor-core products of up to 64 rows whose weights stream through shared memory (compiled
// after kernels.cu, whose Epi, Mma, copy16_async and tile_epilogue it uses).
//
// Status: correct (against_cpu's tensor-core test), but on the H200 no faster than cuBLAS at
// 16 rows and 1.3-1.8x slower at 32-64 (docs/benchmarks.md, fifteenth session), so the
// engine runs it only where GPT2RS_CUDA_GEMM_ROWS asks.
//
// gemv_tc loads every warp's weights and x straight into registers, which holds too few
// loads in flight for batches past 8 rows (fourth session, docs/benchmarks.md); cuBLAS does
// better there but needs a separate epilogue kernel or a split-K reduction. gemm_tc keeps
// gemv_tc's fused epilogues and picks, and feeds the tensor cores the way cuBLAS does: a
// block's weight tile and x stream in 64-wide k chunks into GEMM_STAGES shared-memory stages
// through cp.async, GEMM_STAGES - 1 chunks in flight while one is multiplied, and x is
// fetched once per block and chunk, not once per warp.
//
// Block (tile, ks) of GEMM_WARPS warps takes GEMM_TR weight rows, each warp 16 of them as mma
// A tiles against all rows of x as NT B tiles of 8; the warps never need each other's sums.
// In a 32-wide k step lane (g, t) reads 16 bytes of its weight rows g and g + 8 and of x row
// g at k + 8t, the permuted k order of gemv_tc (the same for both operands, so the sums are
// unchanged). gridDim.y = KS > 1 splits k: the KS blocks of a tile sum it across their
// cluster's shared memory (sm_90 on), or through global memory (see tile_finish).
#define GEMM_WARPS 4
#define GEMM_TR (16 * GEMM_WARPS)
#define GEMM_BK 64
#ifndef GEMM_STAGES
#define GEMM_STAGES 4
#endif

// Where 16-byte piece p (0-7) of tile row `row` sits in a stage: rows are 128 bytes, and odd
// rows swap their halves, so the 8 lanes of a quarter warp (rows g and g + 1, pieces t or
// 4 + t) read 8 different banks.
__device__ __forceinline__ int stage_piece(int row, int p) { return row * 8 + (p ^ ((row & 1) << 2)); }

// Waits until every thread of every block of this block's cluster has arrived; what each
// wrote to its shared memory before is visible to all after (sm_90 and later).
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
#endif
}

// `p` (this block's shared memory) in block `rank` of this block's cluster, as a pointer
// ordinary loads read (sm_90 and later; before, `p` itself, for a launch with no clusters).
__device__ __forceinline__ const float* in_cluster_block(const float* p, int rank) {
#if __CUDA_ARCH__ >= 900
    return (const float*)__cluster_map_shared_rank((void*)p, (unsigned int)rank);
#else
    return p;
#endif
}

// Dynamic shared memory: GEMM_STAGES stages of (GEMM_TR + 8·NT) rows of 128 bytes.
// `clustered` (sm_90 on, launched in clusters of the KS blocks of a tile): a split tile is
// summed in shared memory across the cluster, each block adding up and finishing 1 / KS of
// it, instead of through `part` by the tile's last block.
template <class S, int NT>
__device__ void gemm_tc(const typename S::T* __restrict__ x, const typename S::T* __restrict__ w,
                        int rows, int n, int k, float* part, unsigned int* counts,
                        const unsigned char* next, unsigned int next_bytes, const Epi<S>& e,
                        bool clustered) {
    const int TC = 8 * NT, THREADS = 32 * GEMM_WARPS, PER = GEMM_TR * TC / THREADS;
    const int STAGE = (GEMM_TR + TC) * 8;  // 16-byte pieces
    extern __shared__ uint4 stages[];
    __shared__ unsigned long long best[TC];
    __shared__ bool last;
    pdl_launch_next();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int j0 = blockIdx.x * GEMM_TR, ks = blockIdx.y, KS = gridDim.y;
    int chunks = k / GEMM_BK, c_lo = chunks * ks / KS, c_hi = chunks * (ks + 1) / KS;
    // Chunk c of the block's weight rows (rows past n read as zeros) into stage s.
    auto load_w = [&](int s, int c) {
        if (c >= c_hi) return;
        uint4* dst = stages + s * STAGE;
        for (int p = tid; p < GEMM_TR * 8; p += THREADS) {
            int row = p >> 3, j = j0 + row;
            const typename S::T* src = w + (size_t)(j < n ? j : 0) * k + c * GEMM_BK + (p & 7) * 8;
            copy16_async_or_zero(dst + stage_piece(row, p & 7), src, j < n);
        }
    };
    // Chunk c of x (rows past `rows` read as zeros) into stage s.
    auto load_x = [&](int s, int c) {
        if (c >= c_hi) return;
        uint4* dst = stages + s * STAGE + GEMM_TR * 8;
        for (int p = tid; p < TC * 8; p += THREADS) {
            int row = p >> 3;
            const typename S::T* src =
                x + (size_t)(row < rows ? row : 0) * k + c * GEMM_BK + (p & 7) * 8;
            copy16_async_or_zero(dst + stage_piece(row, p & 7), src, row < rows);
        }
    };
    // The first stages' weights stream in while the previous kernel finishes; x is its output.
    for (int s = 0; s < GEMM_STAGES - 1; s++) load_w(s, c_lo + s);
    pdl_wait();
    for (int s = 0; s < GEMM_STAGES - 1; s++) {
        load_x(s, c_lo + s);
        copies_commit();
    }
    // B tiles holding no row of x are skipped (the same for every lane).
    int nts = (rows + 7) >> 3;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc[nt][q] = 0.f;
    for (int c = c_lo; c < c_hi; c++) {
        // Chunk c has landed (one group is committed per chunk), and every warp is done with
        // the stage it used last round, which now takes chunk c + GEMM_STAGES - 1.
        copies_wait<GEMM_STAGES - 2>();
        __syncthreads();
        int i = c - c_lo, refill = (i + GEMM_STAGES - 1) % GEMM_STAGES;
        load_w(refill, c + GEMM_STAGES - 1);
        load_x(refill, c + GEMM_STAGES - 1);
        copies_commit();
        const uint4* ws = stages + (i % GEMM_STAGES) * STAGE;
        const uint4* xs = ws + GEMM_TR * 8;
        int lo_row = 16 * warp + g;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int p = 4 * h + t;
            // mma's k slots 2t, 2t + 1, 2t + 8, 2t + 9 are a piece's first four values, then
            // its last four.
            const uint4 lo = ws[stage_piece(lo_row, p)], hi = ws[stage_piece(lo_row + 8, p)];
            const unsigned int a0[4] = {lo.x, hi.x, lo.y, hi.y};
            const unsigned int a1[4] = {lo.z, hi.z, lo.w, hi.w};
            uint4 b[NT];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                if (nt < nts) b[nt] = xs[stage_piece(8 * nt + g, p)];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                if (nt < nts) Mma<S>::run(acc[nt], a0, b[nt].x, b[nt].y);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                if (nt < nts) Mma<S>::run(acc[nt], a1, b[nt].z, b[nt].w);
        }
    }
    copies_wait<0>();
    __syncthreads();
    // The tile through shared memory, transposed so that consecutive threads take consecutive
    // weight rows. Accumulator q is weight row g (+ 8 for q >= 2) and x row 2t (+ 1 for odd q).
    float* tile = (float*)stages;  // [TC][GEMM_TR + 1]
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++)
            tile[(8 * nt + 2 * t + (q & 1)) * (GEMM_TR + 1) + 16 * warp + g + 8 * (q >> 1)] =
                acc[nt][q];
    if (tid < TC) best[tid] = 0;
    __syncthreads();
    float v[PER];
    auto at = [&](int q) {
        int idx = tid + q * THREADS;
        return (idx / GEMM_TR) * (GEMM_TR + 1) + idx % GEMM_TR;
    };
    if (KS > 1 && clustered) {
        // Block ks sums elements q_lo <= q < q_hi over the cluster's blocks (in ks order,
        // as through `part`) and finishes them; no block leaves while others read it.
        cluster_sync();
        int q_lo = PER * ks / KS, q_hi = PER * (ks + 1) / KS;
#pragma unroll
        for (int q = 0; q < PER; q++) v[q] = 0.f;
        for (int z = 0; z < KS; z++) {
            const float* theirs = in_cluster_block(tile, z);
#pragma unroll
            for (int q = 0; q < PER; q++)
                if (q >= q_lo && q < q_hi) v[q] += theirs[at(q)];
        }
        if (tid == 0) prefetch_slice_l2(next, next_bytes);
        tile_epilogue<S, PER, THREADS, GEMM_TR>(v, q_lo, q_hi, j0, rows, n, e, best);
        cluster_sync();
        return;
    }
#pragma unroll
    for (int q = 0; q < PER; q++) v[q] = tile[at(q)];
    tile_finish<S, PER, THREADS, GEMM_TR>(v, j0, rows, n, part, counts, next, next_bytes, e,
                                          best, &last);
}

#define GEMM_TC(S, name, NT)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * GEMM_WARPS)                               \
        gemm_tc##NT##_##name(const S::T* x, const S::T* w, int rows, int n, int k, float* part, \
                             unsigned int* counts, const unsigned char* next,                   \
                             unsigned int next_bytes, EPI_PARAMS(S), int clustered) {           \
        gemm_tc<S, NT>(x, w, rows, n, k, part, counts, next, next_bytes, EPI_VALUE(S),         \
                       clustered != 0);                                                         \
    }
GEMM_TC(F16, f16, 2) GEMM_TC(F16, f16, 4) GEMM_TC(F16, f16, 8)
GEMM_TC(BF16, bf16, 2) GEMM_TC(BF16, bf16, 4) GEMM_TC(BF16, bf16, 8)
