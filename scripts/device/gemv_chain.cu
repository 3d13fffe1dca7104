// A gpt2-xl batch-1 decode step's matrix-vector products, alone, as a chain of kernels in one
// CUDA graph with programmatic dependent launch, the way the engine runs them: per layer a
// layer norm, QKV (4800 x 1600), attention output (1600 x 1600, residual), a layer norm, MLP
// first (6400 x 1600) and second (1600 x 6400, residual), f16 weights, 48 layers (2.95 GB, far
// past L2). Attention, the embedding and the head are left out. Prints microseconds a layer
// for each product design, so designs are compared in one process on one GPU.
//
//   nvcc -O3 -arch=sm_90 -o gemv_chain scripts/device/gemv_chain.cu && ./gemv_chain
//
// (The device machine has nvcc; pip's nvidia-cuda-nvcc builds it on a machine without a GPU.)
// It includes the engine's kernels.cu, so `engine` is the engine's own gemv1_f16 (without its
// L2 hand-on here, for the comparison); the other designs are written here, and the results
// are in docs/benchmarks.md (thirteenth session).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
#include "../../crates/gpt2rs-cuda/src/kernels.cu"

#define CK(x)                                                                          \
    do {                                                                               \
        cudaError_t err = (x);                                                         \
        if (err != cudaSuccess) {                                                      \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                  \
                    cudaGetErrorString(err));                                          \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

__global__ void fill_f16(unsigned short* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned z = (unsigned)i * 2654435761u ^ seed;
        z ^= z >> 15;
        float v = ((z & 0xffff) / 65536.f - 0.5f) * 0.05f;
        p[i] = F16::store(v);
    }
}

// Each lane reads all of its NP pieces of the warp's share of the row before the wait; `wpr`
// warps share a row. At the end each block asks L2 for its slice of the next matrix's first
// pf_bytes (kernels.cu's prefetch_slice_l2). NORM: the activations are the layer norm of the
// f32 residual stream xres, which each block computes for itself into shared memory (so no
// norm kernel runs before it); otherwise x.
template <int NP, bool NORM>
__device__ void prod_all(const unsigned short* __restrict__ x, const float* __restrict__ xres,
                         const float* __restrict__ gamma, const float* __restrict__ beta,
                         float eps, const unsigned char* __restrict__ w, int n, int k, int wpr,
                         const unsigned char* pf, unsigned pf_bytes, const Epi<F16>& e) {
    extern __shared__ uint4 row_shared[];
    __shared__ float red[32];
    pdl_launch_next();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int j = blockIdx.x * (8 / wpr) + warp / wpr, slice = warp % wpr;
    bool live = j < n;
    int jr = live ? j : 0;
    const uint4* wr = (const uint4*)(w + (size_t)jr * k * 2);
    int pieces = k / 8, step = wpr * 32, first = slice * 32 + lane;
    uint4 pre[NP];
#pragma unroll
    for (int p = 0; p < NP; p++) {
        int i = first + p * step;
        pre[p] = live && i < pieces ? __ldg(wr + i) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
    if (NORM) {
        // The row in f32 in shared memory, then its norm in f16 after it: each thread sums
        // the same elements in the same order as the layernorm kernel.
        float* xs = (float*)row_shared;
        unsigned short* hs = (unsigned short*)row_shared + 2 * k;
        float sum = 0.f;
        for (int i = tid; i < k; i += 256) {
            float v = xres[i];
            xs[i] = v;
            sum += v;
        }
        float mean = block_sum(sum, red) / k, d2 = 0.f;
        for (int i = tid; i < k; i += 256) {
            float d = xs[i] - mean;
            d2 += d * d;
        }
        float inv = rsqrtf(block_sum(d2, red) / k + eps);
        for (int i = tid; i < k; i += 256)
            hs[i] = F16::store((xs[i] - mean) * inv * gamma[i] + beta[i]);
        __syncthreads();
        x = hs;
    }
    float acc[1] = {0.f};
#pragma unroll
    for (int p = 0; p < NP; p++) {
        int i = first + p * step;
        if (i < pieces) WFloat<F16>::fma<F16, 1>(pre[p], i, nullptr, x, k, acc);
    }
    for (int o = 16; o > 0; o >>= 1) acc[0] += __shfl_xor_sync(FULL_MASK, acc[0], o);
    if (wpr == 1) {
        if (live && lane == 0) epilogue<F16>(e, acc[0], 0, j, n);
    } else {
        if (NORM) __syncthreads();  // the norm's block_sum is done with red
        if (lane == 0) red[warp] = acc[0];
        __syncthreads();
        if (live && slice == 0 && lane == 0) {
            float v = 0.f;
            for (int s2 = 0; s2 < wpr; s2++) v += red[warp + s2];
            epilogue<F16>(e, v, 0, j, n);
        }
    }
    if (tid == 0) prefetch_slice_l2(pf, pf_bytes);
}

#define PROD_ALL(NP)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) prod_all##NP(                        \
        const unsigned short* x, const unsigned char* w, int n, int k, int wpr,             \
        const unsigned char* pf, unsigned pf_bytes, EPI_PARAMS(F16)) {                      \
        prod_all<NP, false>(x, nullptr, nullptr, nullptr, 0.f, w, n, k, wpr, pf, pf_bytes,  \
                            EPI_VALUE(F16));                                                \
    }
PROD_ALL(4)
PROD_ALL(7)
PROD_ALL(13)

extern "C" __global__ void __launch_bounds__(256) prod_ln7(
    const float* xres, const float* gamma, const float* beta, float eps, const unsigned char* w,
    int n, int k, int wpr, const unsigned char* pf, unsigned pf_bytes, EPI_PARAMS(F16)) {
    prod_all<7, true>(nullptr, xres, gamma, beta, eps, w, n, k, wpr, pf, pf_bytes,
                      EPI_VALUE(F16));
}

// Only reads (no activations, no arithmetic but a xor): the bound the products approach.
extern "C" __global__ void read_only(const unsigned char* __restrict__ w, int n, int k, int wpr,
                                     unsigned* sink) {
    pdl_launch_next();
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int j = blockIdx.x * (8 / wpr) + warp / wpr, slice = warp % wpr;
    if (j >= n) return;
    const uint4* wr = (const uint4*)(w + (size_t)j * k * 2);
    int pieces = k / 8;
    unsigned h = 0;
    uint4 pre[7];
#pragma unroll
    for (int p = 0; p < 7; p++) {
        int i = slice * 32 + lane + p * wpr * 32;
        pre[p] = i < pieces ? __ldg(wr + i) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();
#pragma unroll
    for (int p = 0; p < 7; p++) h ^= pre[p].x ^ pre[p].y ^ pre[p].z ^ pre[p].w;
    if (h == 0x12345678u) sink[0] = h;
}

struct Mat {
    unsigned char* w;
    int n, k;
};

struct Design {
    const char* name;
    int kind;  // 0 engine gemv1_f16, 1 prod_all<NP>, 2 read_only, 3 prod_ln7 / prod_all7
    int np;
    int wpr[4];  // QKV, attention output, MLP first, MLP second
    unsigned pf_bytes;
    bool norms;
};

static cudaStream_t stream;

static void launch(const void* f, int grid, int smem, void** args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(256);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelExC(&cfg, f, args));
}

struct Bufs {
    float* xres;
    unsigned short *h, *qkv, *m;
    float *gamma, *beta, *bias;
    unsigned* sink;
};

static void product(const Design& d, int which, const Mat& mat, const Mat* next,
                    const unsigned short* x, int mode, float* out, unsigned short* act_out,
                    const Bufs& b) {
    int wpr = d.wpr[which];
    if (d.kind != 0 && d.np * wpr * 32 < mat.k / 8) {
        fprintf(stderr, "%s: %d pieces a lane do not cover a row of %d\n", d.name, d.np, mat.k);
        exit(1);
    }
    int grid = (mat.n * wpr + 7) / 8;
    int n = mat.n, k = mat.k, act = 2, c = 1600, layer = 0, nl = 48, fp = 0x7fffffff;
    float scale = 1.f;
    const float* bias = b.bias;
    unsigned long long* nullu = nullptr;
    const int* nulli = nullptr;
    const float* nullf = nullptr;
    const unsigned long long* nullcu = nullptr;
    const unsigned short* scales = nullptr;
    const unsigned char* pf = next ? next->w : nullptr;
    unsigned pf_bytes = next ? d.pf_bytes : 0;
    void* epi[] = {&mode, &out,    &bias, &act_out, &act,   &nullcu, &nulli, &nulli,
                   &c,    &layer,  &nl,   &scale,   &fp,    &nullu,  &nullf, &nullcu};
    if (d.kind == 0) {
        const unsigned char* none = nullptr;
        unsigned zero = 0;
        void* args[] = {&x, (void*)&mat.w, &scales, &n, &k, &wpr, &none, &zero, epi[0], epi[1], epi[2],
                        epi[3], epi[4], epi[5], epi[6], epi[7], epi[8], epi[9], epi[10],
                        epi[11], epi[12], epi[13], epi[14], epi[15]};
        launch((const void*)gemv1_f16, grid, 0, args);
    } else if (d.kind == 1) {
        void* args[] = {&x, (void*)&mat.w, &n, &k, &wpr, &pf, &pf_bytes, epi[0], epi[1], epi[2],
                        epi[3], epi[4], epi[5], epi[6], epi[7], epi[8], epi[9], epi[10],
                        epi[11], epi[12], epi[13], epi[14], epi[15]};
        const void* f = d.np == 4 ? (const void*)prod_all4
                        : d.np == 7 ? (const void*)prod_all7 : (const void*)prod_all13;
        launch(f, grid, 0, args);
    } else if (d.kind == 3 && (which == 0 || which == 2)) {
        float eps = 1e-5f;
        void* args[] = {(void*)&b.xres, (void*)&b.gamma, (void*)&b.beta, &eps, (void*)&mat.w,
                        &n, &k, &wpr, &pf, &pf_bytes, epi[0], epi[1], epi[2],
                        epi[3], epi[4], epi[5], epi[6], epi[7], epi[8], epi[9], epi[10],
                        epi[11], epi[12], epi[13], epi[14], epi[15]};
        launch((const void*)prod_ln7, grid, k * 6, args);
    } else if (d.kind == 3) {
        void* args[] = {&x, (void*)&mat.w, &n, &k, &wpr, &pf, &pf_bytes, epi[0], epi[1], epi[2],
                        epi[3], epi[4], epi[5], epi[6], epi[7], epi[8], epi[9], epi[10],
                        epi[11], epi[12], epi[13], epi[14], epi[15]};
        launch((const void*)prod_all7, grid, 0, args);
    } else {
        void* args[] = {(void*)&mat.w, &n, &k, &wpr, (void*)&b.sink};
        launch((const void*)read_only, grid, 0, args);
    }
}

static void norm(const Bufs& b) {
    const int* rows = nullptr;
    int c = 1600;
    float eps = 1e-5f;
    void* args[] = {(void*)&b.xres, &rows, (void*)&b.gamma, (void*)&b.beta, (void*)&b.h, &c, &eps};
    launch((const void*)layernorm_f16, 1, c * 4, args);
}

int main(int argc, char** argv) {
    const int L = 48, C = 1600;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<Mat> mats;
    int shapes[4][2] = {{3 * C, C}, {C, C}, {4 * C, C}, {C, 4 * C}};
    size_t total = 0;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < 4; s++) {
            Mat m{nullptr, shapes[s][0], shapes[s][1]};
            size_t bytes = (size_t)m.n * m.k * 2;
            CK(cudaMalloc(&m.w, bytes));
            fill_f16<<<1024, 256, 0, stream>>>((unsigned short*)m.w, bytes / 2, l * 4 + s);
            total += bytes;
            mats.push_back(m);
        }
    Bufs b;
    CK(cudaMalloc(&b.xres, 4 * C * 4));
    CK(cudaMalloc(&b.h, 4 * C * 2));
    CK(cudaMalloc(&b.qkv, 3 * C * 2));
    CK(cudaMalloc(&b.m, 4 * C * 2));
    CK(cudaMalloc(&b.gamma, 4 * C * 4));
    CK(cudaMalloc(&b.beta, 4 * C * 4));
    CK(cudaMalloc(&b.bias, 4 * C * 4));
    CK(cudaMalloc(&b.sink, 4));
    CK(cudaMemset(b.xres, 0, 4 * C * 4));
    CK(cudaMemset(b.beta, 0, 4 * C * 4));
    CK(cudaMemset(b.bias, 0, 4 * C * 4));
    fill_f16<<<8, 256, 0, stream>>>(b.h, 4 * C, 7);
    fill_f16<<<8, 256, 0, stream>>>(b.qkv, 3 * C, 8);
    fill_f16<<<8, 256, 0, stream>>>(b.m, 4 * C, 9);
    {
        std::vector<float> ones(4 * C, 1.f);
        CK(cudaMemcpy(b.gamma, ones.data(), 4 * C * 4, cudaMemcpyHostToDevice));
    }
    CK(cudaStreamSynchronize(stream));

    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, gemv1_f16, 256, 0));
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, gemv1_f16));
    printf("gemv1_f16: %d registers, %d blocks an SM\n", fa.numRegs, occ);
    CK(cudaFuncGetAttributes(&fa, prod_ln7));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, prod_ln7, 256, 9600));
    printf("prod_ln7: %d registers, %d blocks an SM\n", fa.numRegs, occ);
    const void* alls[3] = {(const void*)prod_all4, (const void*)prod_all7, (const void*)prod_all13};
    for (int i = 0; i < 3; i++) {
        CK(cudaFuncGetAttributes(&fa, alls[i]));
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, alls[i], 256, 0));
        printf("prod_all%d: %d registers, %d blocks an SM\n", i == 0 ? 4 : i == 1 ? 7 : 13,
               fa.numRegs, occ);
    }

    // A big read for the copy rate.
    {
        unsigned char* big;
        size_t bytes = (size_t)2 << 30;
        CK(cudaMalloc(&big, bytes));
        CK(cudaMemset(big, 1, bytes));
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        float best = 1e9;
        for (int r = 0; r < 5; r++) {
            cudaEventRecord(e0, stream);
            CK(cudaMemcpyAsync(big + bytes / 2, big, bytes / 2, cudaMemcpyDeviceToDevice, stream));
            cudaEventRecord(e1, stream);
            CK(cudaEventSynchronize(e1));
            float ms;
            cudaEventElapsedTime(&ms, e0, e1);
            best = ms < best ? ms : best;
        }
        printf("copy 1 GiB: %.3f ms, %.2f TB/s (read + write)\n", best,
               2.0 * (bytes / 2) / best / 1e9);
        CK(cudaFree(big));
    }

    std::vector<Design> designs = {
        {"engine (wpr 1,2,1,2)", 0, 0, {1, 2, 1, 2}, 0, true},
        {"engine wpr 1,4,1,4", 0, 0, {1, 4, 1, 4}, 0, true},
        {"engine wpr 2,4,2,4", 0, 0, {2, 4, 2, 4}, 0, true},
        {"all-in-regs 7 (wpr 1,1,1,4)", 1, 7, {1, 1, 1, 4}, 0, true},
        {"all-in-regs 4 (wpr 2,2,2,8)", 1, 4, {2, 2, 2, 8}, 0, true},
        {"all-in-regs 13 (wpr 1,1,1,2)", 1, 13, {1, 1, 1, 2}, 0, true},
        {"all 7 + L2 prefetch 2 MB", 1, 7, {1, 1, 1, 4}, 2u << 20, true},
        {"all 7 + L2 prefetch 6 MB", 1, 7, {1, 1, 1, 4}, 6u << 20, true},
        {"all 7 + L2 prefetch 1 MB", 1, 7, {1, 1, 1, 4}, 1u << 20, true},
        {"all 7 + L2 prefetch 3 MB", 1, 7, {1, 1, 1, 4}, 3u << 20, true},
        {"norms in the products, all 7", 3, 7, {1, 1, 1, 4}, 0, false},
        {"norms in the products + pf 2 MB", 3, 7, {1, 1, 1, 4}, 2u << 20, false},
        {"norms in the products + pf 1 MB", 3, 7, {1, 1, 1, 4}, 1u << 20, false},
        {"engine, no norms", 0, 0, {1, 2, 1, 2}, 0, false},
        {"all 7, no norms", 1, 7, {1, 1, 1, 4}, 0, false},
        {"read only 7, no norms", 2, 7, {1, 1, 1, 4}, 0, false},
        {"read only 7, norms", 2, 7, {1, 1, 1, 4}, 0, true},
    };
    std::vector<cudaGraphExec_t> execs;
    for (auto& d : designs) {
        cudaGraph_t g;
        CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        for (int l = 0; l < L; l++) {
            const Mat* m = &mats[4 * l];
            const Mat* after = l + 1 < L ? &mats[4 * l + 4] : nullptr;
            if (d.norms) norm(b);
            product(d, 0, m[0], &m[1], b.h, EPI_ACT, nullptr, b.qkv, b);
            product(d, 1, m[1], &m[2], b.qkv, EPI_RESIDUAL, b.xres, nullptr, b);
            if (d.norms) norm(b);
            product(d, 2, m[2], &m[3], b.h, EPI_ACT, nullptr, b.m, b);
            product(d, 3, m[3], after, b.m, EPI_RESIDUAL, b.xres, nullptr, b);
        }
        CK(cudaStreamEndCapture(stream, &g));
        cudaGraphExec_t ex;
        CK(cudaGraphInstantiate(&ex, g, 0));
        execs.push_back(ex);
    }
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    const int reps = 30;
    for (int round = 0; round < 3; round++) {
        printf("round %d\n", round);
        for (size_t i = 0; i < designs.size(); i++) {
            for (int r = 0; r < 3; r++) CK(cudaGraphLaunch(execs[i], stream));
            cudaEventRecord(e0, stream);
            for (int r = 0; r < reps; r++) CK(cudaGraphLaunch(execs[i], stream));
            cudaEventRecord(e1, stream);
            CK(cudaEventSynchronize(e1));
            float ms;
            cudaEventElapsedTime(&ms, e0, e1);
            double us = ms * 1000.0 / reps / L;
            printf("  %-34s %7.2f us a layer  %5.2f TB/s of weights  (%.3f ms for 48)\n",
                   designs[i].name, us, total / L / us / 1e6, ms / reps);
        }
    }
    CK(cudaGetLastError());
    return 0;
}
