// CPU kernels for the decode step, where eager PyTorch pays more in per-op overhead and copies than in math.
// Built on first use by whale/kernels/__init__.py (torch.utils.cpp_extension); every kernel has a PyTorch
// fallback there, and tests/test_cpu_kernels.py checks each against a float64 computation.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name, " must be a contiguous float32 tensor");
}

// [tokens, heads, dim] float32 whose heads are contiguous; tokens may be strided (slices of a fused qkv)
void check_token_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2),
              name, " must be float32 [tokens, heads, dim] with contiguous heads");
}

// float32, or bfloat16 where the weight-only linears hand activations over in bf16
void check_activation(const torch::Tensor& t, const char* name) {
  TORCH_CHECK((t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16) && t.is_contiguous(),
              name, " must be a contiguous float32 or bfloat16 tensor");
}

template <typename In, typename Out>
void add_rms_norm_rows(float* r, const In* d, const float* w, Out* o, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* x = r + row * dim;
      const In* y = d + row * dim;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < dim; ++i) {
        x[i] += static_cast<float>(y[i]);
        squares += x[i] * x[i];
      }
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
      Out* z = o + row * dim;
      for (int64_t i = 0; i < dim; ++i) z[i] = static_cast<Out>(x[i] * inv * w[i]);
    }
  });
}

}  // namespace

// residual += delta (in place, fp32), then return rms_norm(residual) * weight in delta's dtype: the two halves
// of a decoder layer's residual connection and the next norm in one pass over the row. A bf16 delta (the
// output of a weight-only linear) gives a bf16 result, which is what the next such linear reads: no casts.
torch::Tensor add_rms_norm(torch::Tensor residual, torch::Tensor delta, torch::Tensor weight, double eps) {
  check_float(residual, "residual");
  check_activation(delta, "delta");
  check_float(weight, "weight");
  const int64_t dim = residual.size(-1);
  const int64_t rows = residual.numel() / dim;
  TORCH_CHECK(delta.numel() == residual.numel() && weight.numel() == dim, "add_rms_norm: shapes differ");
  auto out = torch::empty(residual.sizes(), delta.options());
  const float* w = weight.data_ptr<float>();
  if (delta.scalar_type() == torch::kBFloat16) {
    add_rms_norm_rows(residual.data_ptr<float>(), delta.data_ptr<at::BFloat16>(), w, out.data_ptr<at::BFloat16>(),
                      rows, dim, static_cast<float>(eps));
  } else {
    add_rms_norm_rows(residual.data_ptr<float>(), delta.data_ptr<float>(), w, out.data_ptr<float>(), rows, dim,
                      static_cast<float>(eps));
  }
  return out;
}

namespace {

template <typename T>
void silu_and_mul_rows(const T* in, T* o, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* g = in + row * 2 * n;
      const T* u = g + n;
      T* z = o + row * n;
      for (int64_t i = 0; i < n; ++i) {
        const float gate = static_cast<float>(g[i]);
        z[i] = static_cast<T>(gate / (1.f + std::exp(-gate)) * static_cast<float>(u[i]));
      }
    }
  });
}

}  // namespace

// [rows, 2 * n] (gate | up) -> [rows, n] silu(gate) * up in the input's dtype: SwiGLU's activation without two
// temporaries.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_activation(gate_up, "gate_up");
  const int64_t n = gate_up.size(-1) / 2;
  const int64_t rows = gate_up.numel() / (2 * n);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gate_up.options());
  if (gate_up.scalar_type() == torch::kBFloat16) {
    silu_and_mul_rows(gate_up.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, n);
  } else {
    silu_and_mul_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, n);
  }
  return out;
}

// Rotates the first `heads` heads of x [tokens, all heads, dim] in place (q and k of a fused qkv; v is left
// alone): x * cos + swap_halves(x) * signed_sin, the tables [tokens, dim] with sin negated on the first half.
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin, int64_t heads) {
  check_token_rows(x, "x");
  check_float(cos, "cos");
  check_float(signed_sin, "signed_sin");
  const int64_t tokens = x.size(0), dim = x.size(2), half = dim / 2, stride = x.stride(0);
  TORCH_CHECK(cos.numel() == tokens * dim && signed_sin.numel() == tokens * dim && heads <= x.size(1),
              "rotary_: table or head count does not fit x");
  float* xp = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = signed_sin.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + t * dim;
      const float* st = s + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + t * stride + h * dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * ct[i] + b * st[i];
          v[i + half] = b * ct[i + half] + a * st[i + half];
        }
      }
    }
  });
}

// Paged attention for tokens that each see a prefix of their sequence's context, read straight from the
// block storage (no gathered copy of the context). The new k/v rows are written to their slots first.
//   q [T, H, D]; k, v [T, KV, D]; k_store, v_store [slots, KV, D]; slot_mapping [T];
//   context_index [B, S] storage slot of each context position; token_seq [T] the sequence of each token (a
//   sequence's tokens are consecutive); token_len [T] how many context positions the token sees (its own
//   included). Returns [T, H, D].
// Split-K ("flash decoding"): a work item is one sequence's context positions [c * kChunk, (c + 1) * kChunk):
// it reads each K and V row there once, whole (every KV head: one contiguous run per position, which the
// prefetcher streams), for all of the sequence's new tokens and heads, and leaves per (token, head) the chunk's
// max score, sum of exponentials and weighted sum of values; a second pass merges each token's chunks. Chunks are
// cut at absolute positions, so a token's result depends on its own context only: not on the batch, the other
// tokens of its sequence in the step (drafts being verified), or the thread count.
constexpr int64_t kChunk = 256;

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_store,
                              torch::Tensor v_store, torch::Tensor slot_mapping, torch::Tensor context_index,
                              torch::Tensor token_seq, torch::Tensor token_len, double scale) {
  check_token_rows(q, "q");
  check_token_rows(k, "k");
  check_token_rows(v, "v");
  check_float(k_store, "k_store");
  check_float(v_store, "v_store");
  for (auto* t : {&slot_mapping, &context_index, &token_seq, &token_len}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "indices must be contiguous int64");
  }
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  const int64_t group = heads / kv_heads, width = context_index.size(1), row = kv_heads * dim;
  TORCH_CHECK(heads % kv_heads == 0 && k_store.size(1) == kv_heads && k_store.size(2) == dim, "head shapes");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* lens = token_len.data_ptr<int64_t>();
  float* ks = k_store.data_ptr<float>();
  float* vs = v_store.data_ptr<float>();
  const int64_t capacity = k_store.size(0), sequences = context_index.size(0);
  for (int64_t t = 0; t < tokens; ++t) {  // the layout is the engine's; a bad one must not write out of bounds
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity && seq[t] >= 0 && seq[t] < sequences && lens[t] >= 1 &&
                    lens[t] <= width && (t == 0 || seq[t] >= seq[t - 1]),
                "paged_attention: token ", t, " has a slot, sequence or context length out of range");
    std::memcpy(ks + slots[t] * row, k.data_ptr<float>() + t * k.stride(0), row * sizeof(float));
    std::memcpy(vs + slots[t] * row, v.data_ptr<float>() + t * v.stride(0), row * sizeof(float));
  }
  const int64_t* context = context_index.data_ptr<int64_t>();
  // each sequence's tokens [first, end) and the longest context among them; work items (sequence, chunk)
  std::vector<int64_t> first(sequences, 0), end(sequences, 0), longest(sequences, 0);
  for (int64_t t = tokens - 1; t >= 0; --t) first[seq[t]] = t;
  for (int64_t t = 0; t < tokens; ++t) {
    end[seq[t]] = t + 1;
    longest[seq[t]] = std::max(longest[seq[t]], lens[t]);
  }
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t s = 0; s < sequences; ++s) {
    for (int64_t c = 0; c * kChunk < longest[s]; ++c) items.emplace_back(s, c);
  }
  const int64_t chunks = (width + kChunk - 1) / kChunk;
  auto stats = torch::empty({tokens, heads, chunks, 2}, q.options());  // (max score, sum of exponentials)
  auto sums = torch::empty({tokens, heads, chunks, dim}, q.options());  // exponential-weighted value sums
  float* st = stats.data_ptr<float>();
  float* sm = sums.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const int64_t q_stride = q.stride(0);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> scores;
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t s = items[item].first, c = items[item].second;
      const int64_t t0 = first[s], count = end[s] - t0;
      const int64_t j0 = c * kChunk, j1 = std::min(j0 + kChunk, longest[s]), n = j1 - j0;
      const int64_t* positions = context + s * width;
      scores.resize(count * heads * n);
      for (int64_t j = j0; j < j1; ++j) {
        const float* keys = ks + positions[j] * row;
        for (int64_t tt = 0; tt < count; ++tt) {
          if (j >= lens[t0 + tt]) continue;
          const float* queries = qp + (t0 + tt) * q_stride;
          for (int64_t h = 0; h < heads; ++h) {
            const float* query = queries + h * dim;
            const float* key = keys + (h / group) * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dim; ++i) dot += query[i] * key[i];
            scores[(tt * heads + h) * n + (j - j0)] = dot * fscale;
          }
        }
      }
      for (int64_t tt = 0; tt < count; ++tt) {
        const int64_t visible = std::min(lens[t0 + tt], j1) - j0;  // <= 0: the chunk is past the token
        for (int64_t h = 0; h < heads; ++h) {
          float* out_stats = st + (((t0 + tt) * heads + h) * chunks + c) * 2;
          std::fill(sm + (((t0 + tt) * heads + h) * chunks + c) * dim,
                    sm + (((t0 + tt) * heads + h) * chunks + c + 1) * dim, 0.f);
          if (visible <= 0) continue;  // never merged: the token's chunks end before this one
          float* e = scores.data() + (tt * heads + h) * n;
          const float peak = *std::max_element(e, e + visible);
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < visible; ++j) {
            e[j] = std::exp(e[j] - peak);
            total += e[j];
          }
          out_stats[0] = peak;
          out_stats[1] = total;
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        const float* values = vs + positions[j] * row;
        for (int64_t tt = 0; tt < count; ++tt) {
          if (j >= lens[t0 + tt]) continue;
          for (int64_t h = 0; h < heads; ++h) {
            const float p = scores[(tt * heads + h) * n + (j - j0)];
            const float* value = values + (h / group) * dim;
            float* o = sm + (((t0 + tt) * heads + h) * chunks + c) * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) o[i] += p * value[i];
          }
        }
      }
    }
  });
  auto out = torch::empty({tokens, heads, dim}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t stop) {
    for (int64_t th = begin; th < stop; ++th) {
      const int64_t used = (lens[th / heads] + kChunk - 1) / kChunk;  // the token's chunks, in order
      const float* stat = st + th * chunks * 2;
      float peak = stat[0];  // no infinities: -ffast-math assumes there are none
      for (int64_t c = 1; c < used; ++c) peak = std::max(peak, stat[c * 2]);
      float total = 0.f;
      float* o = op + th * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t c = 0; c < used; ++c) {
        const float weight = std::exp(stat[c * 2] - peak);
        total += stat[c * 2 + 1] * weight;
        const float* part = sm + (th * chunks + c) * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] += weight * part[i];
      }
      const float inv = 1.f / total;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) o[i] *= inv;
    }
  });
  return out;
}

// mkldnn::_linear_pointwise on a weight oneDNN reordered once (quant.PackedBF16Linear), through the dispatcher:
// the op is registered by torch's mkldnn library, not exposed as an ATen function.
namespace {

torch::Tensor packed_bf16_linear(const torch::Tensor& x, const torch::Tensor& packed) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, c10::IValue(), std::string("none"), c10::List<std::optional<c10::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

// 4-bit groups in ATen's int4 packing (bf16 in and out); above `max_rows` rows the oneDNN-packed bf16 twin, when
// there is one (the hybrid kernels)
class Int4Kernel : public LinearKernel {
 public:
  static constexpr int64_t kGroupSize = 32;  // weights per Q4_0/Q4_1 block (quant.GROUP_SIZE)

  Int4Kernel(torch::Tensor packed, torch::Tensor scale_zero, torch::Tensor twin, int64_t max_rows)
      : packed_(std::move(packed)), scale_zero_(std::move(scale_zero)), twin_(std::move(twin)), max_rows_(max_rows) {}

  torch::Tensor forward(const torch::Tensor& x) const override {
    const torch::Tensor rows = x.to(torch::kBFloat16);
    if (x.size(0) > max_rows_) {
      TORCH_CHECK(twin_.numel() > 0, "Int4Kernel: no bf16 twin for a call of ", x.size(0), " rows");
      return packed_bf16_linear(rows, twin_);
    }
    return at::_weight_int4pack_mm_for_cpu(rows, packed_, kGroupSize, scale_zero_);
  }

 private:
  torch::Tensor packed_, scale_zero_, twin_;
  int64_t max_rows_;
};

// straight from a GGUF's blocks (ggml_blocks.cpp); float32 out
class BlockKernel : public LinearKernel {
 public:
  BlockKernel(std::vector<torch::Tensor> weights, std::vector<int64_t> types)
      : weights_(std::move(weights)), types_(std::move(types)) {}

  torch::Tensor forward(const torch::Tensor& x) const override { return block_linear(x, weights_, types_); }

 private:
  std::vector<torch::Tensor> weights_;
  std::vector<int64_t> types_;
};

// A dense decoder's layers (Llama / Qwen2 / Qwen3-style: q/k/v biases, q/k norms, or neither), run for a step in
// one call: what the Python layer loop does, minus ~150 us of interpreter and dispatch overhead per layer, which
// at batch 1 cost as much as the matmuls themselves. The linears are kernels over their quantized weights.
class DenseDecodeStack {
 public:
  static constexpr int64_t kLinears = 4;  // per layer: qkv, o, gate_up, down
  static constexpr int64_t kTensors = 5;  // per layer, in the constructor's list

  // per layer: post_attention_layernorm's weight and the following norm's (the next layer's input norm, or the
  // final norm), then the fused q/k/v bias (fp32; Qwen2) or an empty tensor, then the per-head q and k norms'
  // weights (Qwen3) or two empty tensors
  DenseDecodeStack(std::vector<std::shared_ptr<LinearKernel>> linears, std::vector<torch::Tensor> tensors,
                   int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : linears_(std::move(linears)), tensors_(std::move(tensors)), heads_(heads), kv_heads_(kv_heads),
        head_dim_(head_dim), eps_(eps), scale_(scale) {
    TORCH_CHECK(tensors_.size() % kTensors == 0 && linears_.size() == tensors_.size() / kTensors * kLinears,
                "DenseDecodeStack: ", kLinears, " linears and ", kTensors, " tensors per layer");
  }

  // residual [T, hidden] fp32 (updated in place), normed: the first layer's input norm of it; the stores
  // [layers, slots, kv_heads, head_dim]. Returns the final norm of the residual stream (in the dtype the last
  // linear answered in: bf16 from the 4-bit kernels, fp32 from the block kernels).
  torch::Tensor forward(torch::Tensor residual, torch::Tensor normed, torch::Tensor cos, torch::Tensor signed_sin,
                        torch::Tensor k_stores, torch::Tensor v_stores, torch::Tensor slot_mapping,
                        torch::Tensor context_index, torch::Tensor token_seq, torch::Tensor token_len) const {
    const int64_t tokens = residual.size(0), q_heads = heads_ + kv_heads_;
    torch::Tensor x = normed;
    const int64_t layers = static_cast<int64_t>(tensors_.size()) / kTensors;
    for (int64_t layer = 0; layer < layers; ++layer) {
      const torch::Tensor* w = tensors_.data() + layer * kTensors;
      const auto& linear = [&](int64_t which, const torch::Tensor& in) {
        return linears_[layer * kLinears + which]->forward(in);
      };
      auto qkv = linear(0, x).to(torch::kFloat32);  // a new tensor unless the kernel answered fp32 itself
      if (w[2].numel() > 0) qkv.add_(w[2]);  // as Python's + fp32 bias: the sum in fp32
      qkv = qkv.view({tokens, q_heads + kv_heads_, head_dim_});
      if (w[3].numel() > 0) {  // Qwen3: each head's q and k through its RMSNorm, as the Python layer does
        qkv = at::cat({at::rms_norm(qkv.narrow(1, 0, heads_), {head_dim_}, w[3], eps_),
                       at::rms_norm(qkv.narrow(1, heads_, kv_heads_), {head_dim_}, w[4], eps_),
                       qkv.narrow(1, q_heads, kv_heads_)}, 1);
      }
      rotary_(qkv, cos, signed_sin, q_heads);
      auto attention = paged_attention(qkv.narrow(1, 0, heads_), qkv.narrow(1, heads_, kv_heads_),
                                       qkv.narrow(1, q_heads, kv_heads_), k_stores.select(0, layer),
                                       v_stores.select(0, layer), slot_mapping, context_index, token_seq,
                                       token_len, scale_);
      x = add_rms_norm(residual, linear(1, attention.view({tokens, heads_ * head_dim_})), w[0], eps_);
      auto act = silu_and_mul(linear(2, x));
      x = add_rms_norm(residual, linear(3, act), w[1], eps_);
    }
    return x;
  }

 private:
  std::vector<std::shared_ptr<LinearKernel>> linears_;
  std::vector<torch::Tensor> tensors_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
};

// logits[rows[k]] = -inf wherever bit v of words[k] (word v / 32, bit v % 32) is clear: the output grammars'
// allowed-token bitmasks applied in place, one pass (a bool unpack and masked_fill took ~3 ms at 16 x 49k).
void mask_logits_(torch::Tensor logits, torch::Tensor words, torch::Tensor rows) {
  check_float(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits: [rows, vocab], contiguous");
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.dim() == 2 && words.is_contiguous(),
              "words: int32 [masked rows, words], contiguous");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.numel() == words.size(0), "rows: int64, one per mask");
  const int64_t vocab = logits.size(1), width = words.size(1);
  TORCH_CHECK(width * 32 >= vocab, "words: too few for the vocabulary");
  float* base = logits.data_ptr<float>();
  const int32_t* bits = words.data_ptr<int32_t>();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, words.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      TORCH_CHECK(row_ids[k] >= 0 && row_ids[k] < logits.size(0), "rows: out of range");
      float* row = base + row_ids[k] * vocab;
      const uint32_t* word = reinterpret_cast<const uint32_t*>(bits + k * width);
      for (int64_t w = 0; w * 32 < vocab; ++w) {
        const uint32_t allowed = word[w];
        if (allowed == 0xFFFFFFFFu) continue;
        const int64_t first = w * 32, count = std::min<int64_t>(32, vocab - first);
        float* out = row + first;
        if (allowed == 0) {
          std::fill(out, out + count, -inf);
          continue;
        }
        for (int64_t b = 0; b < count; ++b) {  // branch-free: random bits would mispredict half the time
          out[b] = ((allowed >> b) & 1u) ? out[b] : -inf;
        }
      }
    }
  });
}

// DeepSeek-V4's hyper-connection weights, per token, in float32: the N streams [T, N, D] flattened and
// RMS-normalised (no weight); mixes = that . fn^T (fn [(2 + N) N, N D]); pre = sigmoid(mix * scale0 + base) + eps,
// post = 2 sigmoid(mix * scale1 + base), comb = softmax_rows(mix * scale2 + base) + eps, then Sinkhorn: columns
// normalised, then `iters` - 1 times rows and columns, each sum + eps. Returns [T, N], [T, N], [T, N, N]: one call
// for the hundred-odd small ops of the PyTorch path (models/deepseek_v4.py, `hyper_weights`).
std::vector<torch::Tensor> hyper_weights(torch::Tensor streams, torch::Tensor fn, torch::Tensor base,
                                         torch::Tensor scale, int64_t iters, double eps, double norm_eps) {
  check_float(streams, "streams");
  check_float(fn, "fn");
  check_float(base, "base");
  check_float(scale, "scale");
  TORCH_CHECK(streams.dim() == 3 && streams.is_contiguous() && fn.is_contiguous(), "hyper_weights: layout");
  const int64_t tokens = streams.size(0), n = streams.size(1), width = n * streams.size(2);
  const int64_t mixes = (2 + n) * n;
  TORCH_CHECK(fn.size(0) == mixes && fn.size(1) == width && base.numel() == mixes && scale.numel() == 3,
              "hyper_weights: fn, base or scale do not fit the streams");
  auto options = streams.options();
  auto pre = torch::empty({tokens, n}, options), post = torch::empty({tokens, n}, options);
  auto comb = torch::empty({tokens, n, n}, options);
  const float *x = streams.data_ptr<float>(), *w = fn.data_ptr<float>(), *b = base.data_ptr<float>();
  const float* s = scale.contiguous().data_ptr<float>();
  float *pre_out = pre.data_ptr<float>(), *post_out = post.data_ptr<float>(), *comb_out = comb.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mix(mixes);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = x + t * width;
      float squares = 0.f;
      for (int64_t i = 0; i < width; ++i) squares += row[i] * row[i];
      const float inv = 1.f / std::sqrt(squares / width + static_cast<float>(norm_eps));
      for (int64_t k = 0; k < mixes; ++k) {
        const float* wk = w + k * width;
        float dot = 0.f;
        for (int64_t i = 0; i < width; ++i) dot += row[i] * wk[i];
        mix[k] = dot * inv;
      }
      for (int64_t j = 0; j < n; ++j) {
        pre_out[t * n + j] = 1.f / (1.f + std::exp(-(mix[j] * s[0] + b[j]))) + e;
        post_out[t * n + j] = 2.f / (1.f + std::exp(-(mix[n + j] * s[1] + b[n + j])));
      }
      float* c = comb_out + t * n * n;
      for (int64_t r = 0; r < n; ++r) {
        float top = -INFINITY;
        for (int64_t q = 0; q < n; ++q) {
          c[r * n + q] = mix[2 * n + r * n + q] * s[2] + b[2 * n + r * n + q];
          top = std::max(top, c[r * n + q]);
        }
        float total = 0.f;
        for (int64_t q = 0; q < n; ++q) total += (c[r * n + q] = std::exp(c[r * n + q] - top));
        for (int64_t q = 0; q < n; ++q) c[r * n + q] = c[r * n + q] / total + e;
      }
      auto columns = [&] {
        for (int64_t q = 0; q < n; ++q) {
          float total = 0.f;
          for (int64_t r = 0; r < n; ++r) total += c[r * n + q];
          for (int64_t r = 0; r < n; ++r) c[r * n + q] /= total + e;
        }
      };
      columns();
      for (int64_t step = 1; step < iters; ++step) {
        for (int64_t r = 0; r < n; ++r) {
          float total = 0.f;
          for (int64_t q = 0; q < n; ++q) total += c[r * n + q];
          for (int64_t q = 0; q < n; ++q) c[r * n + q] /= total + e;
        }
        columns();
      }
    }
  });
  return {pre, post, comb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearKernel, std::shared_ptr<LinearKernel>>(m, "LinearKernel")
      .def("forward", &LinearKernel::forward);
  pybind11::class_<Int4Kernel, LinearKernel, std::shared_ptr<Int4Kernel>>(m, "Int4Kernel")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, int64_t>());
  pybind11::class_<BlockKernel, LinearKernel, std::shared_ptr<BlockKernel>>(m, "BlockKernel")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<int64_t>>());
  pybind11::class_<DenseDecodeStack>(m, "DenseDecodeStack")
      .def(pybind11::init<std::vector<std::shared_ptr<LinearKernel>>, std::vector<torch::Tensor>, int64_t, int64_t,
                          int64_t, double, double>())
      .def("forward", &DenseDecodeStack::forward);
  bind_block_experts(m);
  bind_deepseek_stack(m);
  m.def("add_rms_norm", &add_rms_norm, "residual += delta; rms_norm(residual) * weight");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("rotary_", &rotary_, "rotate the leading heads in place");
  m.def("block_linear", &block_linear, "x W^T straight from ggml blocks (W: parts stacked by rows)");
  m.def("block_heads", &block_heads, "per head x_h W_h^T straight from ggml blocks");
  m.def("block_rows", &block_rows, "rows of a ggml block matrix as float32");
  m.def("pack_rows", &pack_rows, "a block matrix's rows in the packed kernels' layout, and its type",
        pybind11::arg("weight"), pybind11::arg("type"), pybind11::arg("mapped") = false);
  m.def("paged_attention", &paged_attention, "attention over paged K/V storage");
  m.def("mask_logits_", &mask_logits_, "-inf where an allowed-token bitmask is clear, in place");
  m.def("hyper_weights", &hyper_weights, "DeepSeek-V4's hyper-connection weights (pre, post, Sinkhorn comb)");
}
