"""whale's HTTP front over engines that run elsewhere (SGLang, SGLang's model gateway, other whale servers):
`UpstreamEngine` has the local engine's `generate(prompt_ids, params, request_id)`, so every route, error and
control of the server stays whale's own, while the tokens come from the upstream (docs/upstream.md)."""

PROTOCOLS = ("sglang", "vllm")  # SGLang's /generate; vLLM's /v1/completions with token ids
