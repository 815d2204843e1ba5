/* The kernels of gemv.c, attention.c and layer.c as PyTorch operators, llama::gemv, llama::attend
 * and llama::decode_layers (their schemas are defined in llama/native.py, which builds this file with
 * the C ones into one library).
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

#include "kernels.h"

namespace {

const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

/* A weight in `kind`'s layout (gemv.c), n rows of x's width k. */
Weight weight(c10::string_view kind, const at::Tensor& data, const std::optional<at::Tensor>& scales,
              const std::optional<at::Tensor>& zeros, int64_t group_size, int64_t n, int64_t k) {
    Weight w{};
    w.data = data.data_ptr(), w.n = n, w.k = k, w.group_size = group_size;
    if (kind == "float32") {
        TORCH_CHECK(data.scalar_type() == at::kFloat, "llama: a float32 weight must be float32");
        w.kind = WEIGHT_F32;
    } else if (kind == "bfloat16") {
        TORCH_CHECK(data.scalar_type() == at::kBFloat16, "llama: a bfloat16 weight must be bfloat16");
        w.kind = WEIGHT_BF16;
    } else if (kind == "int8" || kind == "int4") {
        TORCH_CHECK(scales.has_value(), "llama: an ", kind, " weight needs its scales");
        w.kind = kind == "int8" ? WEIGHT_INT8 : WEIGHT_INT4;
        w.scales = u16(*scales);
        if (w.kind == WEIGHT_INT4) {
            TORCH_CHECK(zeros.has_value(), "llama: an int4 weight needs its zeros");
            w.zeros = u16(*zeros);
        }
    } else {
        TORCH_CHECK(false, "llama: unknown weight kind ", kind);
    }
    return w;
}

/* The weight at t[i] of a list of weights, each [data] (float32 or bfloat16, (n, k)), [data, scales]
 * (int8 (n, k), scales (n,)) or [data, scales, zeros] (int4 in gemv.c's layout, (n, k / 2) uint8;
 * scales and zeros (n, k / group_size)); i moves past it. */
Weight next_weight(at::TensorList t, size_t& i) {
    TORCH_CHECK(i < t.size(), "llama::decode_layers: too few weights");
    const at::Tensor& data = t[i];
    const int64_t n = data.size(0);
    const size_t tensors = data.scalar_type() == at::kChar ? 2 : data.scalar_type() == at::kByte ? 3 : 1;
    TORCH_CHECK(i + tensors <= t.size(), "llama::decode_layers: too few weights");
    const size_t at = i;
    i += tensors;
    switch (data.scalar_type()) {
        case at::kFloat: return weight("float32", data, std::nullopt, std::nullopt, 0, n, data.size(1));
        case at::kBFloat16: return weight("bfloat16", data, std::nullopt, std::nullopt, 0, n, data.size(1));
        case at::kChar: return weight("int8", data, t[at + 1], std::nullopt, data.size(1), n, data.size(1));
        case at::kByte: {
            const int64_t k = 2 * data.size(1);
            return weight("int4", data, t[at + 1], t[at + 2], k / t[at + 1].size(1), n, k);
        }
        default: TORCH_CHECK(false, "llama::decode_layers: a weight of an unknown kind");
    }
}

/* y (M, n) float32 = x (M, K) W^T, W in `kind`'s layout (gemv.c). */
at::Tensor gemv_op(const at::Tensor& x, c10::string_view kind, const at::Tensor& data,
                   const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros, int64_t group_size,
                   int64_t n) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "llama::gemv takes x as a contiguous float32 matrix");
    const Weight w = weight(kind, data, scales, zeros, group_size, n, x.size(1));
    at::Tensor y = at::empty({x.size(0), n}, x.options());
    gemv(&w, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), at::get_num_threads());
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

/* h (B, T, dim) after the decoder layers and the final norm (layer.c), float32, or bfloat16 for a
 * bfloat16 model (norms of h's dtype; each operator's result rounded as the model's bfloat16
 * tensors are), writing the new tokens' keys and values into cache_k[i] and cache_v[i] ((B, Hkv,
 * S, D) views of the caches' rows, all laid out alike) for layer i: its norms' weights norms[2i]
 * (attention) and norms[2i + 1] (feed-forward), the final norm's last; its weights qkv, wo, w13
 * and w2 in turn in `weights` (see next_weight); last (B, T) int64 each token's position;
 * rope_theta the rotary angles' base. */
at::Tensor decode_layers_op(const at::Tensor& h, at::TensorList norms, double eps, at::TensorList weights,
                            double rope_theta, at::TensorList cache_k, at::TensorList cache_v, const at::Tensor& last,
                            int64_t n_heads) {
    const size_t n_layers = cache_k.size();
    TORCH_CHECK(h.dim() == 3 && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
                "llama::decode_layers takes h as float32 or bfloat16 (B, T, dim)");
    const bool rounded = h.scalar_type() == at::kBFloat16;
    TORCH_CHECK(n_layers > 0 && cache_v.size() == n_layers && norms.size() == 2 * n_layers + 1,
                "llama::decode_layers takes a key cache, a value cache and two norms a layer, and the final norm");
    TORCH_CHECK(last.scalar_type() == at::kLong && last.is_contiguous() && last.numel() == h.size(0) * h.size(1),
                "llama::decode_layers takes last as contiguous int64 (B, T)");
    for (const at::Tensor& norm : norms)
        TORCH_CHECK(norm.scalar_type() == h.scalar_type() && norm.is_contiguous() && norm.numel() == h.size(2),
                    "llama::decode_layers takes the norms' weights contiguous, in h's dtype");
    std::vector<Layer> layers(n_layers);
    std::vector<void*> k(n_layers), v(n_layers);
    size_t at = 0;
    for (size_t i = 0; i < n_layers; i++) {
        for (const at::Tensor& c : {cache_k[i], cache_v[i]})
            TORCH_CHECK(c.strides() == cache_k[0].strides() && c.sizes() == cache_k[0].sizes() &&
                        c.scalar_type() == cache_k[0].scalar_type(), "llama::decode_layers takes caches laid out alike");
        layers[i].attention_norm = norms[2 * i].data_ptr();
        layers[i].ffn_norm = norms[2 * i + 1].data_ptr();
        layers[i].eps = static_cast<float>(eps);
        layers[i].qkv = next_weight(weights, at);
        layers[i].wo = next_weight(weights, at);
        layers[i].w13 = next_weight(weights, at);
        layers[i].w2 = next_weight(weights, at);
        k[i] = cache_k[i].data_ptr(), v[i] = cache_v[i].data_ptr();
    }
    TORCH_CHECK(at == weights.size(), "llama::decode_layers: more weights than four a layer");
    const at::Tensor& c = cache_k[0];
    const int64_t B = h.size(0), T = h.size(1), Hkv = c.size(1), D = c.size(3), dim = h.size(2);
    TORCH_CHECK(c.size(0) == B && n_heads % Hkv == 0 && D % 16 == 0 && c.stride(3) == 1,
                "llama::decode_layers takes caches of B rows, KV heads dividing n_heads, D a multiple of 16");
    for (const Layer& L : layers)
        TORCH_CHECK(L.qkv.n == (n_heads + 2 * Hkv) * D && L.qkv.k == dim && L.wo.n == dim && L.wo.k == n_heads * D &&
                    L.w13.k == dim && L.w13.n == 2 * L.w2.k && L.w2.n == dim,
                    "llama::decode_layers: a layer's weights do not match h, the heads and the caches");
    const int threads = at::get_num_threads();
    at::Tensor out = h.to(h.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/true,
                          at::MemoryFormat::Contiguous);  // one copy, which the layers overwrite
    at::Tensor work = at::empty({layers_work(layers.data(), n_layers, B, T, n_heads, Hkv, D, threads)}, out.options());
    decode_layers(out.data_ptr<float>(), layers.data(), n_layers, norms[2 * n_layers].data_ptr(), rope_theta, B, T,
                  n_heads, Hkv, D, k.data(), v.data(), c.scalar_type() == at::kBFloat16, c.size(2), c.stride(0),
                  c.stride(1), c.stride(2), last.data_ptr<int64_t>(), rounded, work.data_ptr<float>(), threads);
    return out.to(h.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(llama, CPU, m) {
    m.impl("gemv", gemv_op);
    m.impl("attend", attend_op);
    m.impl("decode_layers", decode_layers_op);
}
