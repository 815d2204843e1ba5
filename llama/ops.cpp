/* The kernels of gemv.c and attention.c as PyTorch operators, llama::gemv and llama::attend (their
 * schemas are defined in llama/native.py, which builds this file with the C ones into one library).
 *
 * Why C++: a decode step makes some 60 of these calls. Through a Python kernel each cost about 8
 * microseconds more than the kernel itself (the dispatcher boxing its arguments for Python, then
 * ctypes), half a millisecond a token on the study model; from C++ the dispatcher calls straight
 * in, from eager code and from torch.compile's C++ wrapper alike.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
void gemv_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int threads);
void gemv_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int threads);
void gemv_int8(const float* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scales, int64_t N, float* y,
               int threads);
void gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint16_t* scales, const uint16_t* zeros,
               int64_t G, int64_t N, float* y, int threads);
void attend(const float* q, int64_t B, int64_t T, int64_t H, int64_t D, const void* k, const void* v, int bf16,
            int64_t Hkv, int64_t S, int64_t sb, int64_t sh, int64_t ss, const int64_t* last, float* out, int threads);
}

namespace {

const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

/* y (M, n) float32 = x (M, K) W^T, W in `kind`'s layout (gemv.c). */
at::Tensor gemv_op(const at::Tensor& x, c10::string_view kind, const at::Tensor& data,
                   const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros, int64_t group_size,
                   int64_t n) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "llama::gemv takes x as a contiguous float32 matrix");
    const int64_t m = x.size(0), k = x.size(1);
    at::Tensor y = at::empty({m, n}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int threads = at::get_num_threads();
    if (kind == "float32") {
        gemv_f32(xp, m, k, data.data_ptr<float>(), n, yp, threads);
    } else if (kind == "bfloat16") {
        gemv_bf16(xp, m, k, u16(data), n, yp, threads);
    } else if (kind == "int8") {
        gemv_int8(xp, m, k, data.data_ptr<int8_t>(), u16(*scales), n, yp, threads);
    } else if (kind == "int4") {
        gemv_int4(xp, m, k, data.data_ptr<uint8_t>(), u16(*scales), u16(*zeros), group_size, n, yp, threads);
    } else {
        TORCH_CHECK(false, "llama::gemv: unknown kind ", kind);
    }
    return y;
}

/* out (B, T, H, D) float32: attention of q over keys and values up to each query's last position
 * (attention.c). */
at::Tensor attend_op(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& last) {
    TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(),
                "llama::attend takes q as a contiguous float32 (B, T, H, D) tensor");
    TORCH_CHECK(last.scalar_type() == at::kLong && last.is_contiguous(), "llama::attend takes last as contiguous int64");
    at::Tensor out = at::empty(q.sizes(), q.options());
    attend(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), q.size(3), keys.data_ptr(), values.data_ptr(),
           keys.scalar_type() == at::kBFloat16, keys.size(1), keys.size(2), keys.stride(0), keys.stride(1),
           keys.stride(2), last.data_ptr<int64_t>(), out.data_ptr<float>(), at::get_num_threads());
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama, CPU, m) {
    m.impl("gemv", gemv_op);
    m.impl("attend", attend_op);
}
