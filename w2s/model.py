"""One readable decoder-only Transformer for Llama-2/3/3.1, Mistral, Gemma and Gemma-2.

The families differ in a handful of places, each an explicit field of ModelConfig and commented where it acts:

    family    norm                 embed       MLP      attention                     logits
    llama     w * norm(x)          -           SwiGLU   GQA, rope (3.1: llama3 scale)  - (3.2 1B/3B: tied)
    mistral   w * norm(x)          -           SwiGLU   GQA, sliding window            -
    gemma     (1+w) * norm(x) fp32 * sqrt(D)   GeGLU    MQA/GQA, head_dim 256          tied
    gemma2    (1+w) ... + sandwich * sqrt(D)   GeGLU    scale 1/sqrt(qpas), softcap,   tied, final softcap
              norms around attn/MLP                     local/global alternating
    (qpas: config.json's query_pre_attn_scalar)

Module and parameter names mirror the Hugging Face checkpoints (minus the leading "model."), so loading and saving
is a rename of one prefix, not a converter. Every hot op goes through w2s/ops.py (Triton on GPU; on CPU torch SDPA,
the chunked linear losses or the reference).
There is no torch.distributed in here: FSDP2 and tensor parallelism are applied from outside (w2s/parallel.py).
Inference may fuse q/k/v and gate/up into one matmul each without changing the layers (w2s/fused.py).

The forward pass takes token ids with explicit positions:
  * training / scoring: right-padded (B, T) batches; padding sits after every real token, so plain causal attention
    never lets a real token see a pad, and the loss masks the pads;
  * sampling: a KVCache; each layer writes its keys/values at their positions and queries attend by position.

    python -m pytest tests/test_model.py   # parity with transformers for every family
"""

import math

import torch
import torch.nn as nn

from w2s import ops
from w2s.config import ModelConfig, rope_inv_freq
from w2s.fused import GATE_UP, QKV, add_projection, linear, project


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, unit_offset):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x, residual=None):
        """norm(x); with the residual stream: (norm(residual + x), residual + x), one kernel when decoding."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, unit_offset=self.unit_offset)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, unit_offset=self.unit_offset)

    def reset_parameters(self):
        # Gemma stores w with the scale applied as (1 + w): zeros is the identity there, ones everywhere else.
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


class KVCache:
    """Static key/value cache: one (slots, K, max_len, D) buffer per layer; row = sequence slot, column = position.

    Head-major, so each (slot, kv head) holds its keys as one contiguous (max_len, D) block: decode attention reads
    a row's keys in one sweep.
    `write` stores a step's keys/values; `read` hands them out as (B, S, K, D) views, the layout the rest of the
    model speaks.
    `rows` maps the batch being run onto cache rows (None: batch row i is cache row i, all slots); several batch
    rows may map to one cache row (the sampler's mixed steps run each prompt token as a batch row of its own).
    `limit` bounds the positions attended over (the sampler sets it to the positions the steps before its next host
    look can reach, so decode reads less). Entries at positions beyond a sequence's current position may hold stale
    values: attention is causal by position, so they are never read before being overwritten.
    `shared = (row, P)`, set by the sampler, declares that positions [0, P) of every row hold the same keys and
    values as that row (a prompt prefix common to all); attention then gets them as a hint (the cascade).
    `row_prefix = (rows, lengths)`, (cache rows,) integer tensors the sampler keeps up to date in place, declares
    that positions [0, lengths[r]) of row r hold the same keys and values as row rows[r] (two samples of one
    prompt); decode attention gets it as a hint as well (ops.attention).
    `prompt_groups = (members, lengths, starts, M)`, tables the sampler keeps up to date in place as well, declares
    which rows hold one prompt's keys (w2s.kernels.decode_attention.attention_after_prompt_groups): a plain decode
    step on Triton then reads each prompt's keys once for all its rows (the per-prompt cascade).
    """

    def __init__(self, cfg: ModelConfig, slots, max_len, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.rows, self.limit, self.shared, self.row_prefix = max_len, None, max_len, None, None
        self.prompt_groups = None

    def write(self, layer, q, k, v, positions, inv_freq):
        """Rotate q (B, T, H, D) and k (B, T, K, D) to their (B, T) positions and write k and v into this layer's
        cache rows at those positions, in one kernel on GPU (ops.rope_cache_write); return the rotated q."""
        return ops.rope_cache_write(q, k, v, positions, inv_freq, self.k[layer], self.v[layer], self.rows)

    def read(self, layer, batch):
        """This layer's keys and values as views, no copy, and the cache row of each of the `batch` rows being run:
        ((batch, limit, K, D) twice, None) when batch row i is cache row i, else ((cache rows, limit, K, D) twice:
        every row of the cache, and `rows` (batch,): the cache row of each batch row), for attention's kv_rows."""
        keys, values = self.k[layer, :, :, : self.limit], self.v[layer, :, :, : self.limit]
        if self.rows is None:
            keys, values = keys[:batch], values[:batch]
        return keys.transpose(1, 2), values.transpose(1, 2), self.rows

    def shared_prefix(self, layer):
        """This layer's shared prefix keys/values ((P, K, D), (P, K, D)) while `shared` is declared, else None."""
        if self.shared is None:
            return None
        row, P = self.shared
        return self.k[layer, row, :, :P].transpose(0, 1), self.v[layer, row, :, :P].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.window = cfg.layer_window(layer_idx)  # None for global layers
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, K * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, K * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, cfg.dim, bias=cfg.attention_bias)

    def forward(self, x, positions, inv_freq, cache=None):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = project(self, x, QKV)  # (B, T, H*D), (B, T, K*D), (B, T, K*D): one matmul when fused for inference
        q = q.unflatten(-1, (cfg.n_heads, cfg.head_dim))  # (B, T, H, D)
        k, v = k.unflatten(-1, (cfg.n_kv_heads, cfg.head_dim)), v.unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        if cache is None:
            q, k = ops.rope(q, positions, inv_freq), ops.rope(k, positions, inv_freq)
            q_positions, shared, kv_rows, row_prefix, groups = None, None, None, None, None  # causal by index
        else:
            q = cache.write(self.layer_idx, q, k, v, positions, inv_freq)  # rotates q and k, caches k and v
            # (B or cache rows, S, K, D), key index == position; kv_rows (B,) or None
            k, v, kv_rows = cache.read(self.layer_idx, B)
            q_positions, shared, row_prefix = positions, cache.shared_prefix(self.layer_idx), cache.row_prefix
            groups = cache.prompt_groups
        out = ops.attention(q, k, v, q_positions=q_positions, sliding_window=self.window,
                            softcap=cfg.attn_logit_softcap, scale=cfg.attn_scale, shared_prefix=shared,
                            kv_rows=kv_rows, row_prefix=row_prefix, prompt_groups=groups)  # (B, T, H, D)
        # the layer, or its matmul outside it where that may run (one row on Triton: the matrix-vector kernel)
        return linear(self, "o_proj", out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        # Gemma: GeGLU with the tanh GELU; Llama/Mistral: SwiGLU.
        self.act = ops.geglu if cfg.activation == "gelu_pytorch_tanh" else ops.swiglu

    def forward(self, x, residual=None):
        """The MLP of x (B, T, D); with the residual stream (B, T, D): residual + MLP(x), the add in the down
        projection's matmul when fused for inference, which then writes the sum over `residual` (fused.add_projection:
        pass a stream you do not read again)."""
        gate, up = project(self, x, GATE_UP)  # (B, T, F) each: one matmul when fused for inference
        hidden = self.act(gate, up)
        return self.down_proj(hidden) if residual is None else add_projection(residual, self, "down_proj", hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        # HF naming trap: in Llama/Mistral/Gemma "post_attention_layernorm" is the norm BEFORE the MLP. In Gemma-2 it
        # really is applied to the attention output, and pre_/post_feedforward_layernorm wrap the MLP ("sandwich").
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x, positions, inv_freq, cache=None):
        # `h, x = norm(a, residual=x)` is `x = x + a; h = norm(x)`: the residual add and the MLP's input norm, one
        # kernel when decoding
        attention = self.self_attn(self.input_layernorm(x), positions, inv_freq, cache)
        if self.sandwich:  # Gemma-2
            h, x = self.pre_feedforward_layernorm(self.post_attention_layernorm(attention), residual=x)
            return x + self.post_feedforward_layernorm(self.mlp(h))
        h, x = self.post_attention_layernorm(attention, residual=x)
        return self.mlp(h, residual=x)  # x + mlp(h); x is this block's own sum, so it may be overwritten


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_unit_offset)
        # Tied configs (Gemma, Llama-3.2 1B/3B) use the embeddings as the output matrix: no lm_head parameter at all,
        # so nothing can drift apart.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Rotary inverse frequencies: derived from the config, never stored in checkpoints (non-persistent).
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def lm_head_weight(self):
        """The (V, D) output matrix (the embeddings when tied); the fused losses take it with the hidden states."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens, positions=None, cache=None, return_hidden=False):
        """tokens (B, T) int64, positions (B, T) or None for 0..T-1 -> logits (B, T, V), or hidden (B, T, D)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        h = self.embed_tokens(tokens)  # (B, T, D)
        if self.cfg.embed_scale:
            # Gemma: scale by sqrt(D), with the constant rounded to the activation dtype as the reference does. A
            # Python float, not a device tensor: no host-to-device copy, so the decode step can be a CUDA graph.
            h = h * float(torch.tensor(math.sqrt(self.cfg.dim), dtype=h.dtype))
        for layer in self.layers:
            h = layer(h, positions, self.inv_freq, cache)
        h = self.norm(h)
        if return_hidden:
            return h
        logits = ops.linear(h, self.lm_head_weight())  # (B, T, V); one row without gradients: the matvec on Triton
        if self.cfg.final_logit_softcap is not None:  # Gemma-2
            cap = self.cfg.final_logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    @torch.no_grad()
    def init_weights(self, std=0.02, generator=None):
        """Fresh random weights (for models the project pretrains itself and for tests)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.reset_buffers()
        return self

    def reset_buffers(self, device=None):
        """Recompute non-persistent buffers (after building on the meta device and assigning real weights)."""
        device = device or self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.cfg).to(device)
