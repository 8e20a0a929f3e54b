"""DeepSeekMoE: the router (greedy, group_limited_greedy, noaux_tc; softmax or sigmoid scores) in fp32, routed
experts dispatched grouped by expert, and the always-on shared experts.

Parameter names are Hugging Face's (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`,
`mlp.experts.{e}.gate_proj.weight`, `mlp.shared_experts.*`), so a checkpoint loads without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from whale.config import DeepseekConfig
from whale.kernels import cpu_ops
from whale.models.gguf_blocks import BlockLinear
from whale.models.layers import SwiGLU


class DeepseekGate(nn.Module):
    """Chooses `num_experts_per_tok` experts per token and their weights, all in fp32."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method = config.topk_method
        self.scoring = config.scoring_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unknown topk_method {self.method!r}")
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, device="meta"))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, device="meta"))

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[tokens, n_group] -> [tokens, n_experts] bool: experts of the `topk_group` best groups."""
        chosen = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        return keep.repeat_interleave(self.num_experts // self.n_group, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, k], weights [T, k] fp32)."""
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        grouped = (-1, self.n_group, self.num_experts // self.n_group)
        if self.method == "greedy":
            choice = scores
        elif self.method == "group_limited_greedy":
            choice = scores.masked_fill(~self._group_mask(scores.view(grouped).amax(-1)), 0.0)
        else:  # noaux_tc: the bias steers the choice only; group score = sum of its two best biased scores
            biased = scores + self.e_score_correction_bias.float()
            group_scores = biased.view(grouped).topk(2, dim=-1).values.sum(-1)
            choice = biased.masked_fill(~self._group_mask(group_scores), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


def dispatch_by_expert(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       experts: nn.ModuleList) -> torch.Tensor:
    """sum_k weights[t, k] * experts[ids[t, k]](x[t]): tokens sorted by expert, each chosen expert run once over
    its tokens (no per-token loop, no dense all-expert compute)."""
    flat_ids = ids.flatten()
    order = flat_ids.argsort(stable=True)
    token_of = order // ids.shape[1]
    routed = torch.zeros_like(x)
    start = 0
    for expert_id, count in enumerate(torch.bincount(flat_ids, minlength=len(experts)).tolist()):
        if count == 0:
            continue
        tokens = token_of[start:start + count]
        pair_weights = weights.flatten()[order[start:start + count]]
        routed.index_add_(0, tokens, experts[expert_id](x[tokens]) * pair_weights[:, None].to(x.dtype))
        start += count
    return routed


# the gathered small-batch path copies the chosen experts' weights; above this many values, loop instead
GATHER_LIMIT = 1 << 22


class DeepseekMoE(nn.Module):
    """Routed experts + shared experts. Tokens are sorted by expert and each chosen expert runs once over
    its tokens (no per-token loop, no dense all-expert compute)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = DeepseekGate(config)
        self.experts = nn.ModuleList(SwiGLU(hidden, inter) for _ in range(config.n_routed_experts))
        self.shared_experts = SwiGLU(hidden, inter * config.n_shared_experts) if config.n_shared_experts else None
        self.block_experts = None  # the compiled call over the experts' GGUF blocks, when they are all blocks

    def pack_experts(self) -> None:
        """After loading: stack the experts into one [E, 2I, H] gate|up and one [E, H, I] down tensor and make
        each expert's parameters views of them (no extra memory), so a few tokens run all their experts in two
        batched matmuls."""
        inter = self.experts[0].gate_proj.weight.shape[0]
        self.gate_up = torch.stack([torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in self.experts])
        self.down = torch.stack([e.down_proj.weight for e in self.experts])
        for i, expert in enumerate(self.experts):
            expert.gate_proj.weight = nn.Parameter(self.gate_up[i, :inter], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(self.gate_up[i, inter:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.down[i], requires_grad=False)

    def use_block_experts(self) -> bool:
        """After loading experts that compute from a GGUF's blocks (BlockLinear): run them all, shared expert
        included, in one compiled call a step (`BlockExperts`: every chosen expert's gate|up in one parallel
        pass, then every down), instead of three kernel calls per chosen expert from Python. False (nothing
        changed) unless every matrix is one block part without a bias."""
        mlps = [*self.experts, *([self.shared_experts] if self.shared_experts is not None else [])]
        linears = [getattr(m, name, None) for m in mlps for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, BlockLinear) and len(p.weights) == 1 and p.bias is None for p in linears):
            return False
        self.block_experts = cpu_ops().BlockExperts([p.weights[0] for p in linears], [p.types[0] for p in linears],
                                                    self.shared_experts is not None)
        return True

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair in one bmm over the gathered expert weights: for decode of small experts,
        where per-expert calls cost more than the copy."""
        flat = ids.flatten()
        pairs = x.repeat_interleave(ids.shape[1], dim=0).unsqueeze(-1)
        gate, up = torch.bmm(self.gate_up[flat], pairs).squeeze(-1).chunk(2, dim=-1)
        out = torch.bmm(self.down[flat], (torch.nn.functional.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (out * weights.flatten()[:, None].to(x.dtype)).view(*ids.shape, -1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        if self.block_experts is not None:
            return self.block_experts.forward(x, ids, weights)
        if hasattr(self, "gate_up") and ids.numel() * self.gate_up[0].numel() <= GATHER_LIMIT:
            routed = self._gathered(x, ids, weights)
            return routed + self.shared_experts(x) if self.shared_experts is not None else routed
        routed = dispatch_by_expert(x, ids, weights, self.experts)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed
