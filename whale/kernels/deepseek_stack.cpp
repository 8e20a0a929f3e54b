// A DeepSeek decoder's layers (MLA over the latent cache + DeepSeekMoE) run for a decode step in one call, with
// every linear, kv_b's per-head products and the experts computed from a GGUF's blocks. It is
// DeepseekForCausalLM.forward (whale/models/deepseek.py) written out op for op with the same ATen calls and
// kernels, so its result is bit-identical to the Python layers; what it saves is the interpreter and dispatch
// overhead of ~40 eager ops a layer, which on V2-Lite's 27 layers cost more than a tenth of a step.
#include "kernels.h"

#include <ATen/ATen.h>

#include <limits>
#include <utility>

namespace {

// The model's shape and the router's settings (DeepseekConfig's names)
struct DeepseekShape {
  int64_t heads = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0, kv_lora_rank = 0;
  int64_t q_lora_rank = 0;  // 0: no query compression (V2-Lite)
  double rms_norm_eps = 1e-6, scale = 1.0;
  bool rope_interleave = true;
  int64_t num_experts_per_tok = 0, n_group = 1, topk_group = 1;
  int64_t topk_method = 0;  // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
  bool sigmoid = false, norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
};

constexpr double kLatentNormEps = 1e-6;  // q_a_layernorm and kv_a_layernorm, as the reference fixes them

// rotate_pairs (interleaved rope dims, the result listing the rotated even members, then the odd ones) or
// apply_rotary (halves), as deepseek.py / layers.py compute them. x [T, heads, D]; cos, sin [T, D].
torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleave) {
  const int64_t half = x.size(-1) / 2;
  if (interleave) {
    const auto c = cos.narrow(1, 0, half).unsqueeze(1), s = sin.narrow(1, 0, half).unsqueeze(1);
    const auto even = x.slice(-1, 0, std::nullopt, 2), odd = x.slice(-1, 1, std::nullopt, 2);
    return at::cat({even * c - odd * s, odd * c + even * s}, -1);
  }
  const auto rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

}  // namespace

class DeepseekDecodeStack {
 public:
  // per layer: [q_proj | kv_a] (or [q_a_proj | kv_a]), q_b_proj (or none), o_proj, a dense layer's [gate | up]
  // and down (none for a MoE layer)
  static constexpr int64_t kLinears = 5;
  // per layer: input_layernorm, q_a_layernorm (or empty), kv_a_layernorm, post_attention_layernorm weights;
  // kv_b's per-head k_b and v_b blocks; the router's weight and score-correction bias (empty where absent)
  static constexpr int64_t kTensors = 8;

  DeepseekDecodeStack(DeepseekShape shape, std::vector<std::shared_ptr<LinearKernel>> linears,
                      std::vector<std::shared_ptr<BlockExperts>> experts, std::vector<torch::Tensor> tensors,
                      std::vector<int64_t> head_types, torch::Tensor final_norm)
      : s_(shape), linears_(std::move(linears)), experts_(std::move(experts)), tensors_(std::move(tensors)),
        head_types_(std::move(head_types)), final_norm_(std::move(final_norm)) {
    const size_t layers = experts_.size();
    TORCH_CHECK(linears_.size() == layers * kLinears && tensors_.size() == layers * kTensors &&
                    head_types_.size() == layers * 2,
                "DeepseekDecodeStack: ", kLinears, " linears, ", kTensors, " tensors and 2 head types per layer");
    for (size_t layer = 0; layer < layers; ++layer) {
      const bool dense = experts_[layer] == nullptr;
      TORCH_CHECK(linears_[layer * kLinears] && linears_[layer * kLinears + 2] &&
                      (s_.q_lora_rank == 0) == !linears_[layer * kLinears + 1] &&
                      dense == (linears_[layer * kLinears + 3] && linears_[layer * kLinears + 4]),
                  "DeepseekDecodeStack: layer ", layer, " lacks a linear its shape needs");
    }
  }

  // x: the embedded tokens [T, hidden] float32; cos, sin [T, qk_rope_head_dim] (the step's rotary tables);
  // latent_stores [layers, slots, kv_lora_rank + qk_rope_head_dim] and the step's layout, as paged_attention
  // takes them. Returns the final norm of the last layer's output.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor latent_stores,
                        torch::Tensor slot_mapping, torch::Tensor context_index, torch::Tensor token_seq,
                        torch::Tensor token_len) const {
    const int64_t tokens = x.size(0), hidden = x.size(1), heads = s_.heads;
    const int64_t nope = s_.qk_nope_head_dim, rope = s_.qk_rope_head_dim, rank = s_.kv_lora_rank;
    const int64_t layers = static_cast<int64_t>(experts_.size());
    for (int64_t layer = 0; layer < layers; ++layer) {
      const torch::Tensor* w = tensors_.data() + layer * kTensors;
      const auto linear = [&](int64_t which, const torch::Tensor& in) {
        return linears_[layer * kLinears + which]->forward(in.contiguous());
      };
      // attention (DeepseekAttention.forward)
      auto fused = linear(0, at::rms_norm(x, {hidden}, w[0], s_.rms_norm_eps));
      torch::Tensor q;
      int64_t kv_at = heads * (nope + rope);
      if (s_.q_lora_rank > 0) {
        q = linear(1, at::rms_norm(fused.narrow(1, 0, s_.q_lora_rank), {s_.q_lora_rank}, w[1], kLatentNormEps));
        kv_at = s_.q_lora_rank;
      } else {
        q = fused.narrow(1, 0, kv_at);
      }
      q = q.view({tokens, heads, nope + rope});
      const auto kv = fused.narrow(1, kv_at, rank + rope);
      const auto c_kv = at::rms_norm(kv.narrow(1, 0, rank), {rank}, w[2], kLatentNormEps);
      const auto q_pe = rotate(q.narrow(2, nope, rope), cos, sin, s_.rope_interleave);
      const auto k_pe = rotate(kv.narrow(1, rank, rope).unsqueeze(1), cos, sin, s_.rope_interleave).squeeze(1);
      const auto absorbed = block_heads(q.narrow(2, 0, nope), w[4], head_types_[2 * layer]);
      // PagedKVCache.attend_latent: MQA over the cached [c_kv | k_pe] rows, keys and values alike
      const auto rows = at::cat({c_kv, k_pe}, -1).unsqueeze(1);
      const auto store = latent_stores.select(0, layer).unsqueeze(1);
      const auto attended = paged_attention(at::cat({absorbed, q_pe}, -1), rows, rows, store, store, slot_mapping,
                                            context_index, token_seq, token_len, s_.scale)
                                .narrow(2, 0, rank)
                                .contiguous();
      const auto values = block_heads(attended, w[5], head_types_[2 * layer + 1]);
      x = x + linear(2, values.reshape({tokens, heads * s_.v_head_dim}));
      // MLP (DeepseekMoE.forward with its compiled experts, or SwiGLU)
      const auto normed = at::rms_norm(x, {hidden}, w[3], s_.rms_norm_eps);
      if (experts_[layer]) {
        const auto [ids, weights] = route(normed, w[6], w[7]);
        x = x + experts_[layer]->forward(normed, ids, weights);
      } else {
        const auto gate_up = linear(3, normed);
        const int64_t inter = gate_up.size(1) / 2;
        x = x + linear(4, at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter));
      }
    }
    return at::rms_norm(x, {hidden}, final_norm_, s_.rms_norm_eps);
  }

 private:
  // DeepseekGate.forward: expert ids [T, k] and their weights
  std::pair<torch::Tensor, torch::Tensor> route(const torch::Tensor& x, const torch::Tensor& weight,
                                                const torch::Tensor& bias) const {
    const auto scores = s_.sigmoid ? at::linear(x, weight).sigmoid() : at::linear(x, weight).softmax(-1);
    const int64_t experts = weight.size(0);
    const std::vector<int64_t> grouped = {-1, s_.n_group, experts / s_.n_group};
    const auto group_mask = [&](const torch::Tensor& group_scores) {
      const auto chosen = std::get<1>(group_scores.topk(s_.topk_group, -1));
      const auto keep = at::zeros_like(group_scores, group_scores.options().dtype(at::kBool)).scatter_(1, chosen, true);
      return keep.repeat_interleave(experts / s_.n_group, 1);
    };
    torch::Tensor choice = scores;
    if (s_.topk_method == 1) {
      choice = scores.masked_fill(group_mask(scores.view(grouped).amax(-1)).logical_not(), 0.0);
    } else if (s_.topk_method == 2) {  // the bias steers the choice only
      const auto biased = scores + bias;
      const auto group_scores = std::get<0>(biased.view(grouped).topk(2, -1)).sum(-1);
      choice = biased.masked_fill(group_mask(group_scores).logical_not(), -std::numeric_limits<double>::infinity());
    }
    const auto ids = std::get<1>(choice.topk(s_.num_experts_per_tok, -1));
    auto weights = scores.gather(1, ids);
    if (s_.norm_topk_prob) weights = weights / (weights.sum(-1, true) + 1e-20);
    return {ids, weights * s_.routed_scaling_factor};
  }

  DeepseekShape s_;
  std::vector<std::shared_ptr<LinearKernel>> linears_;
  std::vector<std::shared_ptr<BlockExperts>> experts_;
  std::vector<torch::Tensor> tensors_;
  std::vector<int64_t> head_types_;
  torch::Tensor final_norm_;
};

void bind_deepseek_stack(pybind11::module& m) {
  pybind11::class_<DeepseekShape>(m, "DeepseekShape")
      .def(pybind11::init<>())
      .def_readwrite("heads", &DeepseekShape::heads)
      .def_readwrite("qk_nope_head_dim", &DeepseekShape::qk_nope_head_dim)
      .def_readwrite("qk_rope_head_dim", &DeepseekShape::qk_rope_head_dim)
      .def_readwrite("v_head_dim", &DeepseekShape::v_head_dim)
      .def_readwrite("kv_lora_rank", &DeepseekShape::kv_lora_rank)
      .def_readwrite("q_lora_rank", &DeepseekShape::q_lora_rank)
      .def_readwrite("rms_norm_eps", &DeepseekShape::rms_norm_eps)
      .def_readwrite("scale", &DeepseekShape::scale)
      .def_readwrite("rope_interleave", &DeepseekShape::rope_interleave)
      .def_readwrite("num_experts_per_tok", &DeepseekShape::num_experts_per_tok)
      .def_readwrite("n_group", &DeepseekShape::n_group)
      .def_readwrite("topk_group", &DeepseekShape::topk_group)
      .def_readwrite("topk_method", &DeepseekShape::topk_method)
      .def_readwrite("sigmoid", &DeepseekShape::sigmoid)
      .def_readwrite("norm_topk_prob", &DeepseekShape::norm_topk_prob)
      .def_readwrite("routed_scaling_factor", &DeepseekShape::routed_scaling_factor);
  pybind11::class_<DeepseekDecodeStack>(m, "DeepseekDecodeStack")
      .def(pybind11::init<DeepseekShape, std::vector<std::shared_ptr<LinearKernel>>,
                          std::vector<std::shared_ptr<BlockExperts>>, std::vector<torch::Tensor>, std::vector<int64_t>,
                          torch::Tensor>())
      .def("forward", &DeepseekDecodeStack::forward);
}
