"""Tiny random Hugging Face checkpoints of every supported family, written with transformers' save_pretrained.

The parity tests (model, sampler, checkpoint) load these with w2s and compare against transformers on the same
weights. Configs are chosen so each family delta actually bites: Llama-3.1 rope scaling with a short original
context, Mistral and Gemma-2 sliding windows shorter than the test sequences, Gemma's head_dim != dim / heads,
Gemma-2 soft-caps small enough to change the logits.
"""

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama2": ("LlamaConfig", dict(rms_norm_eps=1e-5)),
    "llama31": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16)),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(head_dim=16, num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=24,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                     hidden_activation="gelu_pytorch_tanh")),
}


def hf_model(family, seed=0):
    """A transformers CausalLM of `family` with random weights large enough to exercise every op."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so (1 + w) vs w conventions are tested
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(family, path, seed=0, max_shard_size=None):
    """Write a tiny checkpoint of `family` to `path` (sharded when max_shard_size is given); returns the HF model."""
    model = hf_model(family, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def save_llama_with_biases(path):
    """A tiny Llama with q/k/v/o and MLP biases (Qwen-style attention_bias / mlp_bias), perturbed so that every bias
    is nonzero: fusing and tensor-parallel slicing must carry them (row-split biases added once, not tp times)."""
    import transformers

    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)


def store_output_matrix(path, copy=False):
    """Write an lm_head.weight into the tied checkpoint in `path` (one model.safetensors, e.g. save_hf("gemma")): a
    copy of the embeddings, or a different random matrix (a tied config that transformers then loads untied)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in state
    emb = state["model.embed_tokens.weight"]
    other = torch.randn(emb.shape, generator=torch.Generator().manual_seed(5))
    state["lm_head.weight"] = emb.clone() if copy else other
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def right_padded_batch(lengths, seed=0, pad_id=0):
    """(tokens (B, T), attention_mask (B, T)) with random ids (never the pad id) right-padded to max(lengths)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask, pad_id), mask.long()
