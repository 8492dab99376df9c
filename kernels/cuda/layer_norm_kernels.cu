// CUDA LayerNorm forward/backward: the hand-written "CUDA side" of megagpt's fused kernels.
//
// Why a separate, torch-free .cu: it compiles with plain nvcc in seconds (CI checks that on CPU
// machines), while layer_norm.cpp holds the torch binding. All math accumulates in fp32; x/y/w/b
// and dx/dw/db share one storage type (float, __half or __nv_bfloat16).
//   forward : one block per row, two-pass mean/variance over the row (stable), writes y, mean, rstd.
//   backward: one block per row for dx; dweight/dbias in two stages: per-(row-chunk, column)
//             fp32 partials, then a column sum over chunks (deterministic, no atomics).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace megagpt_ln {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

// Sum of `v` over the block; every thread gets the result. `shared` holds kThreads/32 floats.
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = (threadIdx.x < (blockDim.x >> 5)) ? shared[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  return shared[0];
}

template <typename T>
__global__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                       T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
                       int64_t n, float eps) {
  __shared__ float shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  const float mu = block_sum(s, shared) / n;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = to_f(xr[i]) - mu;
    ss += d * d;
  }
  const float rs = rsqrtf(block_sum(ss, shared) / n + eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = from_f<T>((to_f(xr[i]) - mu) * rs * to_f(w[i]) + to_f(b[i]));
  if (threadIdx.x == 0) { mean[row] = mu; rstd[row] = rs; }
}

template <typename T>
__global__ void ln_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                          const float* __restrict__ mean, const float* __restrict__ rstd,
                          T* __restrict__ dx, int64_t n) {
  __shared__ float shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  const T* dyr = dy + row * n;
  const float mu = mean[row], rs = rstd[row];
  float a = 0.f, c = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float wdy = to_f(w[i]) * to_f(dyr[i]);
    a += wdy * (to_f(xr[i]) - mu) * rs;
    c += wdy;
  }
  const float c1 = block_sum(a, shared) / n;
  const float c2 = block_sum(c, shared) / n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float xhat = (to_f(xr[i]) - mu) * rs;
    dx[row * n + i] = from_f<T>((to_f(w[i]) * to_f(dyr[i]) - (xhat * c1 + c2)) * rs);
  }
}

// Stage 1: block (32 columns x 8 row-lanes) sums dy*xhat and dy over its chunk of rows.
template <typename T>
__global__ void ln_bwd_dwdb_partial(const T* __restrict__ dy, const T* __restrict__ x,
                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                    float* __restrict__ dw_part, float* __restrict__ db_part,
                                    int64_t m, int64_t n, int64_t rows_per_chunk) {
  __shared__ float sw[8][33], sb[8][33];
  const int64_t col = (int64_t)blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = min(r0 + rows_per_chunk, m);
  float aw = 0.f, ab = 0.f;
  if (col < n) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const float g = to_f(dy[r * n + col]);
      aw += g * (to_f(x[r * n + col]) - mean[r]) * rstd[r];
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int k = 1; k < 8; ++k) { aw += sw[k][threadIdx.x]; ab += sb[k][threadIdx.x]; }
    dw_part[(int64_t)blockIdx.y * n + col] = aw;
    db_part[(int64_t)blockIdx.y * n + col] = ab;
  }
}

// Stage 2: column sums over the chunks.
template <typename T>
__global__ void ln_bwd_dwdb_final(const float* __restrict__ dw_part, const float* __restrict__ db_part,
                                  T* __restrict__ dw, T* __restrict__ db, int64_t chunks, int64_t n) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float aw = 0.f, ab = 0.f;
  for (int64_t g = 0; g < chunks; ++g) { aw += dw_part[g * n + col]; ab += db_part[g * n + col]; }
  dw[col] = from_f<T>(aw);
  db[col] = from_f<T>(ab);
}

template <typename T>
void fwd(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
         int64_t m, int64_t n, float eps, cudaStream_t s) {
  if (m == 0) return;
  ln_fwd<T><<<(unsigned)m, kThreads, 0, s>>>((const T*)x, (const T*)w, (const T*)b, (T*)y, mean, rstd, n, eps);
}

template <typename T>
void bwd(const void* dy, const void* x, const void* w, const float* mean, const float* rstd, void* dx,
         float* dw_part, float* db_part, void* dw, void* db, int64_t m, int64_t n, int64_t chunks,
         cudaStream_t s) {
  if (m == 0) return;
  ln_bwd_dx<T><<<(unsigned)m, kThreads, 0, s>>>((const T*)dy, (const T*)x, (const T*)w, mean, rstd, (T*)dx, n);
  const int64_t per = (m + chunks - 1) / chunks;
  dim3 grid((unsigned)((n + 31) / 32), (unsigned)chunks);
  ln_bwd_dwdb_partial<T><<<grid, dim3(32, 8), 0, s>>>((const T*)dy, (const T*)x, mean, rstd, dw_part, db_part, m, n, per);
  ln_bwd_dwdb_final<T><<<(unsigned)((n + 255) / 256), 256, 0, s>>>(dw_part, db_part, (T*)dw, (T*)db, chunks, n);
}

}  // namespace megagpt_ln

// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Returns the launch error (cudaSuccess if ok).
int megagpt_ln_fwd(int dtype, const void* x, const void* w, const void* b, void* y, float* mean,
                   float* rstd, int64_t m, int64_t n, float eps, cudaStream_t s) {
  using namespace megagpt_ln;
  if (dtype == 0) fwd<float>(x, w, b, y, mean, rstd, m, n, eps, s);
  else if (dtype == 1) fwd<__half>(x, w, b, y, mean, rstd, m, n, eps, s);
  else fwd<__nv_bfloat16>(x, w, b, y, mean, rstd, m, n, eps, s);
  return (int)cudaGetLastError();
}

int megagpt_ln_bwd(int dtype, const void* dy, const void* x, const void* w, const float* mean,
                   const float* rstd, void* dx, float* dw_part, float* db_part, void* dw, void* db,
                   int64_t m, int64_t n, int64_t chunks, cudaStream_t s) {
  using namespace megagpt_ln;
  if (dtype == 0) bwd<float>(dy, x, w, mean, rstd, dx, dw_part, db_part, dw, db, m, n, chunks, s);
  else if (dtype == 1) bwd<__half>(dy, x, w, mean, rstd, dx, dw_part, db_part, dw, db, m, n, chunks, s);
  else bwd<__nv_bfloat16>(dy, x, w, mean, rstd, dx, dw_part, db_part, dw, db, m, n, chunks, s);
  return (int)cudaGetLastError();
}
