"""A DeepSeek-V3-architecture model from Hugging Face transformers, decoding through hal.

The model is transformers' own ``DeepseekV3ForCausalLM`` (random weights from a small config with
the real MLA dimensions: kv_lora_rank 512, rope 64, grouped top-k routing, routed + shared experts).
Its linear weights are quantised to DeepSeek-V3's FP8 checkpoint format (e4m3 weights with 128x128
``weight_scale_inv`` blocks), saved and loaded as safetensors, and dequantised back into the
transformers model, which is the reference. The hal path runs the same weights:

- attention: MLA with the up-projections absorbed (as DeepSeek's inference code does), the latent
  cache in pages of 64, prefill and decode through ``hal.flash_mla_with_kvcache`` (causal over the
  prompt's tokens);
- every linear layer: per-token FP8 activation casts and ``hal.gemm_fp8_fp8_bf16_nt``;
- experts: tokens grouped by expert into 128-row segments, ``hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``
  for gate/up and down, weighted with the router's probabilities; shared experts as linears.

It prefills a prompt, decodes N tokens greedily, and compares every step's logits with
transformers' eager forward (float32, dequantised weights) on the same context: cos diff below
``--bound``, and hal's token transformers' argmax or a tie within the logits' difference. It
exits 1 otherwise, and prints tokens/s and each hal operator's share of the run. The backend is an environment
variable: ``HAL_BACKEND=opencl python examples/deepseek_v3.py``. ``--ep 2`` shards the experts over
two local gloo processes (``hal.ep.Buffer`` dispatch and combine) and checks the tokens equal the
single-process run.

    python examples/deepseek_v3.py --tokens 16 --batch 2
    python examples/deepseek_v3.py --ep 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb, apply_rotary_pos_emb_interleave

import hal

PAGE = 64
BLOCK = 128


def small_config(layers: int = 2, hidden: int = 256, vocab: int = 512) -> DeepseekV3Config:
    """Few layers and a small hidden size, the real MLA dimensions, routed + shared experts, grouped routing."""
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=512, routed_scaling_factor=2.5, rope_interleave=True,
    )


# --- the FP8 checkpoint -----------------------------------------------------------------------------


def _quantisable(name: str, tensor: torch.Tensor) -> bool:
    """DeepSeek-V3 checkpoints keep embeddings, norms, the router and the output head in bf16."""
    return tensor.dim() >= 2 and "embed" not in name and "lm_head" not in name and "norm" not in name and not name.endswith("gate.weight")


def save_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: Path) -> None:
    """Every linear weight as e4m3 plus a float32 ``<name>_scale_inv`` per 128x128 block, in safetensors."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if not _quantisable(name, tensor):
            tensors[name] = tensor.contiguous()
            continue
        matrices = tensor.reshape(-1, *tensor.shape[-2:])  # experts' 3-d weights: one quantisation per expert
        parts = [hal.per_block_cast_to_fp8(m.contiguous()) for m in matrices]
        tensors[name] = torch.stack([p[0] for p in parts]).view(*tensor.shape[:-2], *parts[0][0].shape)
        tensors[f"{name}_scale_inv"] = torch.stack([p[1] for p in parts]).view(*tensor.shape[:-2], *parts[0][1].shape)
    save_file(tensors, str(path))


def load_fp8_checkpoint(model: DeepseekV3ForCausalLM, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load the checkpoint: dequantised weights into the transformers model (the reference), and the
    FP8 weights with their scales returned for the hal path."""
    tensors = load_file(str(path))
    fp8, state = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scales = tensors[f"{name}_scale_inv"]
            fp8[name] = (tensor, scales)
            values = tensor.float().reshape(-1, *tensor.shape[-2:])
            blocks = scales.reshape(-1, *scales.shape[-2:])
            expanded = blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, : values.shape[1], : values.shape[2]]
            state[name] = (values * expanded).view(tensor.shape)
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True)
    return fp8


# --- the hal path ---------------------------------------------------------------------------------


class Timers:
    """Seconds spent per hal operator (synchronised on a GPU), and in total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def run(self, name: str, fn, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start
        return result


class HalDeepseekV3:
    """The transformers model's weights, run through hal operators with a paged latent cache."""

    def __init__(self, model: DeepseekV3ForCausalLM, fp8: dict[str, tuple[torch.Tensor, torch.Tensor]], max_tokens: int, batch: int,
                 buffer: hal.ep.Buffer | None = None) -> None:
        self.model, self.fp8, self.config, self.buffer = model, fp8, model.config, buffer
        self.timers = Timers()
        cfg = self.config
        self.pages_per_seq = -(-max_tokens // PAGE)
        self.caches = [torch.zeros(batch * self.pages_per_seq, PAGE, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=torch.bfloat16)
                       for _ in range(cfg.num_hidden_layers)]
        self.block_table = torch.arange(batch * self.pages_per_seq, dtype=torch.int32).view(batch, self.pages_per_seq)
        self.lengths = torch.zeros(batch, dtype=torch.int32)
        heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.absorbed = []
        for layer in model.model.layers:  # W_UK and W_UV from kv_b_proj, absorbed into q and out
            w = layer.self_attn.kv_b_proj.weight.detach().float().view(heads, nope + v, cfg.kv_lora_rank)
            self.absorbed.append((w[:, :nope], w[:, nope:]))

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x bf16 [T, K] @ W.T with W the FP8 weight ``name`` (per-token activation cast, blockwise GEMM)."""
        weight = self.fp8[f"{name}.weight"]
        out = torch.empty(x.shape[0], weight[0].shape[0], dtype=torch.bfloat16)
        if x.shape[0]:
            a = self.timers.run("per_token_cast_to_fp8", hal.per_token_cast_to_fp8, x.contiguous())
            self.timers.run("gemm_fp8_nt", hal.gemm_fp8_fp8_bf16_nt, a, weight, out)
        return out

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor, s_q: int) -> torch.Tensor:
        cfg, attn, prefix = self.config, self.model.model.layers[i].self_attn, f"model.layers.{i}.self_attn"
        tokens = x.shape[0]
        batch = tokens // s_q
        q = self.linear(f"{prefix}.q_b_proj", attn.q_a_layernorm(self.linear(f"{prefix}.q_a_proj", x)))
        q = q.view(batch, s_q, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.linear(f"{prefix}.kv_a_proj_with_mqa", x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = attn.kv_a_layernorm(latent)
        cos, sin = self.model.model.rotary_emb(x, positions.view(batch, s_q))
        rope = apply_rotary_pos_emb_interleave if cfg.rope_interleave else apply_rotary_pos_emb
        q_rot, k_rot = rope(q_rot.transpose(1, 2), k_rot.view(batch, 1, s_q, -1), cos, sin)
        # Write this step's latents into each sequence's pages.
        slot = positions.view(batch, s_q)
        page = self.block_table.gather(1, (slot // PAGE).long())
        entries = torch.cat([latent.view(batch, s_q, -1), k_rot.view(batch, s_q, -1)], dim=-1).to(torch.bfloat16)
        self.caches[i][page.flatten().long(), (slot % PAGE).flatten().long(), 0] = entries.view(tokens, -1)
        w_uk, w_uv = self.absorbed[i]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope.float(), w_uk)
        query = torch.cat([q_latent, q_rot.transpose(1, 2).float()], dim=-1).to(torch.bfloat16)
        seqlens = self.lengths + s_q
        metadata, splits = hal.get_mla_metadata(seqlens, s_q * cfg.num_attention_heads, 1)
        out_latent, _ = self.timers.run(
            "mla_decode", hal.flash_mla_with_kvcache, query, self.caches[i], self.block_table, seqlens, cfg.kv_lora_rank,
            metadata, splits, softmax_scale=attn.scaling, causal=True,
        )
        values = torch.einsum("bshc,hvc->bshv", out_latent.float(), w_uv).to(torch.bfloat16)
        return self.linear(f"{prefix}.o_proj", values.reshape(tokens, -1))

    def dense_mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(f"{prefix}.gate_proj", x), self.linear(f"{prefix}.up_proj", x)
        return self.linear(f"{prefix}.down_proj", (torch.nn.functional.silu(gate.float()) * up.float()).to(torch.bfloat16))

    def grouped_experts(self, prefix: str, x: torch.Tensor, rows: torch.Tensor, expert: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Rows ``x[rows]`` through experts ``expert`` (of ``first .. first + count``): grouped into
        128-row segments per expert, gate/up and down as grouped FP8 GEMMs. Returns float32 [len(rows), hidden]."""
        order = torch.sort(expert, stable=True).indices
        rows, expert = rows[order], expert[order] - first
        counts = torch.bincount(expert, minlength=count).tolist()
        padded = [-(-c // BLOCK) * BLOCK for c in counts]
        index = torch.cat([torch.tensor([e] * c + [-1] * (p - c), dtype=torch.int32) for e, (c, p) in enumerate(zip(counts, padded))])
        where = (index >= 0).nonzero().squeeze(1)
        grouped = torch.zeros(index.numel(), x.shape[1], dtype=torch.bfloat16)
        grouped[where] = x[rows]
        gate_up, down = self.fp8[f"{prefix}.experts.gate_up_proj"], self.fp8[f"{prefix}.experts.down_proj"]
        local = slice(first, first + count)
        gate_up, down = (gate_up[0][local], gate_up[1][local]), (down[0][local], down[1][local])
        hidden = torch.empty(index.numel(), gate_up[0].shape[1], dtype=torch.bfloat16)
        out = torch.empty(index.numel(), x.shape[1], dtype=torch.bfloat16)
        if index.numel():
            a = self.timers.run("per_token_cast_to_fp8", hal.per_token_cast_to_fp8, grouped)
            self.timers.run("m_grouped_gemm_fp8_nt_contiguous", hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, a, gate_up, hidden, index)
            g, u = hidden.float().chunk(2, dim=-1)
            act = (torch.nn.functional.silu(g) * u).to(torch.bfloat16).masked_fill((index < 0)[:, None], 0)
            a = self.timers.run("per_token_cast_to_fp8", hal.per_token_cast_to_fp8, act)
            self.timers.run("m_grouped_gemm_fp8_nt_contiguous", hal.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous, a, down, out, index)
        result = torch.empty(rows.numel(), x.shape[1], dtype=torch.float32)
        result[order] = out[where].float()
        return result

    def experts(self, i: int, x: torch.Tensor) -> torch.Tensor:
        moe, prefix = self.model.model.layers[i].mlp, f"model.layers.{i}.mlp"
        _, weights, experts = moe.gate(x.float())
        if self.buffer is not None:
            return self.experts_parallel(prefix, x, weights, experts)
        rows, slot = (experts >= 0).nonzero(as_tuple=True)
        routed = self.grouped_experts(prefix, x, rows, experts[rows, slot], 0, self.config.n_routed_experts)
        combined = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        combined.index_add_(0, rows, routed * weights[rows, slot, None])
        return (combined + self.dense_mlp(f"{prefix}.shared_experts", x).float()).to(torch.bfloat16)

    def experts_parallel(self, prefix: str, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Experts sharded over the EP group: hal.ep.Buffer sends each token to the ranks holding its
        experts, each rank runs its own experts, combine sums every token's weighted copies back."""
        buffer, world, rank = self.buffer, self.buffer.group_size, self.buffer.rank
        local = self.config.n_routed_experts // world
        topk_idx = experts.to(torch.int64)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, self.config.n_routed_experts)
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=weights.float(), num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        )
        rows, slot = (recv_idx >= 0).nonzero(as_tuple=True)
        routed = self.grouped_experts(prefix, recv_x, rows, recv_idx[rows, slot] + rank * local, rank * local, local)
        partial = torch.zeros(recv_x.shape[0], x.shape[1], dtype=torch.float32)
        partial.index_add_(0, rows, routed * recv_w[rows, slot, None])
        combined, _, _ = buffer.combine(partial, handle)
        return (combined + self.dense_mlp(f"{prefix}.shared_experts", x).float()).to(torch.bfloat16)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` [batch, s_q] (the prompt, or one token each) and return logits float32 [batch, s_q, vocab]."""
        batch, s_q = input_ids.shape
        positions = (self.lengths[:, None] + torch.arange(s_q, dtype=torch.int32)[None, :]).flatten()
        m = self.model.model
        x = m.embed_tokens(input_ids).view(batch * s_q, -1).to(torch.bfloat16)
        for i, layer in enumerate(m.layers):
            x = x + self.attention(i, layer.input_layernorm(x), positions, s_q)
            h = layer.post_attention_layernorm(x)
            x = x + (self.experts(i, h) if i >= self.config.first_k_dense_replace else self.dense_mlp(f"model.layers.{i}.mlp", h))
        self.lengths += s_q
        logits = self.model.lm_head(m.norm(x).to(self.model.lm_head.weight.dtype))
        return logits.float().view(batch, s_q, -1)


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def build(seed: int, layers: int) -> tuple[DeepseekV3ForCausalLM, dict]:
    torch.manual_seed(seed)
    config = small_config(layers)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        # Trained models route decisively and predict peaked distributions; at init (std 0.02)
        # routing and logits are near ties that any rounding flips. Spread them as training would.
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.weight.normal_(0, 0.5)
        model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.5)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_fp8_checkpoint(model, path)
        fp8 = load_fp8_checkpoint(model, path)
    return model, fp8


def run(seed: int = 0, layers: int = 2, batch: int = 2, prompt: int = 8, tokens: int = 8, bound: float = 5e-4, verbose: bool = True,
        buffer: hal.ep.Buffer | None = None) -> dict:
    """Prefill and decode greedily through hal; at every step compare with transformers' eager forward
    (float32, dequantised weights) on the same context.

    A step is consistent when hal's logits are within ``bound`` (cos diff) of transformers' and hal's
    token is transformers' argmax, or a token whose transformers logit is within twice the largest
    logit difference of the maximum (a tie at that precision: no correct FP8 implementation can be
    asked to break it the same way). Returns the tokens, per-step facts and timings.
    """
    model, fp8 = build(seed, layers)
    reference = DeepseekV3ForCausalLM(model.config).float().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed + 1))
    hal_model = HalDeepseekV3(model, fp8, prompt + tokens, batch, buffer)
    start = time.perf_counter()
    logits = hal_model.step(ids)
    generated, steps = [], []
    context = ids
    for step in range(tokens):
        with torch.no_grad():
            ref = reference(context).logits[:, -1].float()
        ours = logits[:, -1]
        next_token = ours.argmax(-1, keepdim=True)
        slack = 2 * (ours - ref).abs().amax(dim=-1)
        chosen = ref.gather(1, next_token).squeeze(1)
        facts = {"diff": cos_diff(ours, ref), "argmax_equal": bool(torch.equal(next_token.squeeze(1), ref.argmax(-1))),
                 "within_tie": bool((chosen >= ref.amax(-1) - slack).all())}
        steps.append(facts)
        generated.append(next_token)
        if verbose:
            note = "same token" if facts["argmax_equal"] else "a near tie" if facts["within_tie"] else "A DIFFERENT TOKEN"
            print(f"step {step:2d}: tokens {next_token.flatten().tolist()}, logits cos diff vs transformers {facts['diff']:.2e} ({note})")
        context = torch.cat([context, next_token], dim=1)
        if step + 1 < tokens:
            logits = hal_model.step(next_token)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        greedy = reference.generate(ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids))[:, prompt:]
    return {"tokens": torch.cat(generated, dim=1), "generate_tokens": greedy, "steps": steps, "bound": bound, "seconds": elapsed,
            "tokens_per_second": batch * tokens / elapsed, "operator_seconds": dict(hal_model.timers.seconds),
            "consistent": all(f["diff"] < bound and f["within_tie"] for f in steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--bound", type=float, default=5e-4, help="largest allowed logits cos diff to transformers (FP8 activations: about 2e-5)")
    parser.add_argument("--ep", type=int, default=0, metavar="RANKS", help="shard the experts over RANKS local gloo processes (hal.ep.Buffer)")
    args = parser.parse_args(argv)
    if args.ep:
        return run_expert_parallel(args)
    result = run(args.seed, args.layers, args.batch, args.prompt, args.tokens, args.bound)
    seconds = result["seconds"]
    print(f"{result['tokens_per_second']:.1f} tokens/s ({args.batch} x {args.tokens} tokens in {seconds:.2f} s, backend {hal.select('mla_decode').backend.name})")
    for name, spent in sorted(result["operator_seconds"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:36s} {spent:7.3f} s  {spent / seconds:6.1%} of the run")
    worst = max(f["diff"] for f in result["steps"])
    ties = sum(not f["argmax_equal"] for f in result["steps"])
    same = torch.equal(result["tokens"], result["generate_tokens"])
    print(f"worst logits cos diff {worst:.2e} (bound {args.bound:g}); {ties} step(s) where hal took a near tie; "
          f"greedy tokens {'equal' if same else 'differ from'} transformers' generate()")
    if not result["consistent"]:
        print("hal's decode is NOT consistent with transformers' forward")
    return 0 if result["consistent"] else 1


def _ep_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    buffer = hal.ep.Buffer(timeout_s=120)
    result = run(args.seed, args.layers, args.batch, args.prompt, args.tokens, args.bound, verbose=rank == 0, buffer=buffer)
    return {"tokens": result["tokens"], "consistent": result["consistent"], "tokens_per_second": result["tokens_per_second"]}


def run_expert_parallel(args: argparse.Namespace) -> int:
    """Every rank holds the dense weights and 1/RANKS of the experts and decodes the same batch;
    all must produce the single-process tokens."""
    from hal.ep.launch import run_local

    outcomes = run_local(_ep_rank, args.ep, args, timeout_s=600)
    if not all(o.returned for o in outcomes):
        print("a rank failed: " + "; ".join(f"rank {o.rank}: {o.error}" for o in outcomes if not o.returned))
        return 1
    single = run(args.seed, args.layers, args.batch, args.prompt, args.tokens, args.bound, verbose=False)
    same = all(torch.equal(o.value["tokens"], single["tokens"]) for o in outcomes)
    print(f"{args.ep} ranks: {outcomes[0].value['tokens_per_second']:.1f} tokens/s; tokens {'equal' if same else 'DIFFER from'} the single-process run")
    return 0 if same and all(o.value["consistent"] for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
