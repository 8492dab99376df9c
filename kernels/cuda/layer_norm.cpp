// torch binding for layer_norm_kernels.cu: shape/dtype checks, output allocation, current stream.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

int megagpt_ln_fwd(int dtype, const void* x, const void* w, const void* b, void* y, float* mean,
                   float* rstd, int64_t m, int64_t n, float eps, cudaStream_t s);
int megagpt_ln_bwd(int dtype, const void* dy, const void* x, const void* w, const float* mean,
                   const float* rstd, void* dx, float* dw_part, float* db_part, void* dw, void* db,
                   int64_t m, int64_t n, int64_t chunks, cudaStream_t s);

static int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "megagpt cuda layer_norm: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

static void check(const at::Tensor& x2, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(x2.is_cuda() && x2.is_contiguous() && x2.dim() == 2, "x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && w.numel() == x2.size(1) && b.numel() == x2.size(1),
              "weight/bias must be contiguous with hidden-size elements");
  TORCH_CHECK(w.scalar_type() == x2.scalar_type() && b.scalar_type() == x2.scalar_type(),
              "x, weight and bias must share a dtype");
}

std::vector<at::Tensor> forward(at::Tensor x2, at::Tensor w, at::Tensor b, double eps) {
  check(x2, w, b);
  const c10::cuda::CUDAGuard guard(x2.device());
  const int64_t m = x2.size(0), n = x2.size(1);
  auto y = at::empty_like(x2);
  auto opts = x2.options().dtype(at::kFloat);
  auto mean = at::empty({m}, opts), rstd = at::empty({m}, opts);
  int err = megagpt_ln_fwd(dtype_code(x2), x2.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), m, n, (float)eps,
                           c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "megagpt cuda layer_norm forward launch failed: ", cudaGetErrorString((cudaError_t)err));
  return {y, mean, rstd};
}

std::vector<at::Tensor> backward(at::Tensor dy2, at::Tensor x2, at::Tensor w, at::Tensor b,
                                 at::Tensor mean, at::Tensor rstd) {
  check(x2, w, b);
  dy2 = dy2.contiguous();
  const int64_t m = x2.size(0), n = x2.size(1);
  const c10::cuda::CUDAGuard guard(x2.device());
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x2.get_device());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(m, 4 * sms));
  auto dx = at::empty_like(x2);
  auto part = at::empty({2, chunks, n}, x2.options().dtype(at::kFloat));
  auto dw = at::empty_like(w), db = at::empty_like(b);
  int err = megagpt_ln_bwd(dtype_code(x2), dy2.data_ptr(), x2.data_ptr(), w.data_ptr(),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                           part[0].data_ptr<float>(), part[1].data_ptr<float>(), dw.data_ptr(),
                           db.data_ptr(), m, n, chunks, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "megagpt cuda layer_norm backward launch failed: ", cudaGetErrorString((cudaError_t)err));
  return {dx, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "LayerNorm forward (CUDA)");
  m.def("backward", &backward, "LayerNorm backward (CUDA)");
}
