// What the kernel sources share (they build into one extension): the kernels one calls from another and the
// classes the compiled layer stacks hold.
#pragma once

#include <torch/extension.h>

#include <memory>
#include <tuple>
#include <vector>

// cpu_ops.cpp
torch::Tensor add_rms_norm(torch::Tensor residual, torch::Tensor delta, torch::Tensor weight, double eps);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_store,
                              torch::Tensor v_store, torch::Tensor slot_mapping, torch::Tensor context_index,
                              torch::Tensor token_seq, torch::Tensor token_len, double scale);

// ggml_blocks.cpp
torch::Tensor block_linear(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types);
torch::Tensor block_heads(torch::Tensor x, torch::Tensor w, int64_t type);
torch::Tensor block_rows(torch::Tensor weight, int64_t type, torch::Tensor ids, int64_t k);
std::tuple<torch::Tensor, int64_t> pack_rows(torch::Tensor weight, int64_t type, bool mapped);

// One linear's kernel as a compiled layer stack calls it: y = x W^T for x [rows, K] (float32 or bf16).
class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) const = 0;
};

// A DeepSeek MoE layer's experts straight from their GGUF blocks, in one call a step (ggml_blocks.cpp).
class BlockExperts {
 public:
  // per expert gate, up, down (uint8 [rows, bytes a row]) and their ggml types; the shared expert, if any, last
  BlockExperts(std::vector<torch::Tensor> weights, std::vector<int64_t> types, bool shared);
  // x [T, H] float32, ids [T, k] int64, weights [T, k] float32 -> [T, H] float32
  torch::Tensor forward(torch::Tensor x, torch::Tensor ids, torch::Tensor weights) const;

 private:
  std::vector<torch::Tensor> weights_;
  std::vector<int64_t> types_;
  int64_t shared_;
};

void bind_block_experts(pybind11::module& m);   // ggml_blocks.cpp
void bind_deepseek_stack(pybind11::module& m);  // deepseek_stack.cpp
