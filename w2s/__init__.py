"""w2s: weak-to-strong reasoning (Yang, Ma, Liu 2024) from scratch in PyTorch.

Public API (documented in the README):

    model = w2s.load_model("path/to/hf_ckpt", dtype=torch.bfloat16, device="cuda")   # (B, T) ids -> (B, T, V)
    tok = w2s.load_tokenizer("path/to/hf_ckpt")                                      # .encode / .decode / ids
    w2s.save_model(model, "out_dir", tokenizer=tok)                                   # HF format (sharded past 5 GiB)
    outs = w2s.generate(model, tok, ["Question: 1+1?\\nAnswer:"], n=4, temperature=1.0)

Imports are lazy so that `import w2s` (and `w2s --help`) stays fast.
"""

__all__ = ["load_model", "save_model", "load_tokenizer", "generate", "ModelConfig", "Transformer"]


def __getattr__(name):
    if name in ("load_model", "save_model"):
        from w2s import checkpoint

        return getattr(checkpoint, name)
    if name == "load_tokenizer":
        from w2s.tokenizer import load_tokenizer

        return load_tokenizer
    if name == "generate":
        from w2s.sampling import generate

        return generate
    if name == "ModelConfig":
        from w2s.config import ModelConfig

        return ModelConfig
    if name == "Transformer":
        from w2s.model import Transformer

        return Transformer
    raise AttributeError(f"module 'w2s' has no attribute {name!r}")
