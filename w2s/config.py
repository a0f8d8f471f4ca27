"""Model configuration, read from a Hugging Face config.json.

One dataclass covers every supported family; the family deltas are fields with the family's values, so model.py
reads `cfg.norm_unit_offset` rather than `if family == "gemma"`. Supported `architectures`:

    LlamaForCausalLM    Llama-2, Llama-3, Llama-3.1 (rope_scaling type "llama3"), Llama-3.2
    MistralForCausalLM  Mistral-7B (GQA, optional sliding window)
    GemmaForCausalLM    Gemma (1): (1+w) fp32 RMSNorm, sqrt(d) embedding scale, GeGLU-tanh, tied embeddings
    Gemma2ForCausalLM   Gemma-2: + pre/post norms, query_pre_attn_scalar, attention and final soft-caps,
                        alternating sliding-window / global layers

    python -c "from w2s.config import ModelConfig; print(ModelConfig.from_pretrained('path/to/ckpt'))"
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from w2s.files import read_json

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}

# What transformers' config classes (LlamaConfig, ...) give a key config.json leaves out, where families differ.
# Llama's kv heads default to one per query head (no entry).
FAMILY_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "num_key_value_heads": 8},
    "gemma": {"max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
              "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 16},
    "gemma2": {"max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
               "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 4},
}


@dataclass
class ModelConfig:
    family: str  # llama | mistral | gemma | gemma2
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # intermediate_size of the MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # silu -> SwiGLU; gelu_pytorch_tanh -> GeGLU (Gemma)
    # Gemma deltas
    norm_unit_offset: bool = False  # RMSNorm scale (1 + w) computed in fp32
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim)
    # Gemma-2 deltas
    sandwich_norms: bool = False  # extra post-attention and post-feedforward norms
    query_pre_attn_scalar: float | None = None  # attention scale = query_pre_attn_scalar ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)  # per layer "sliding_attention" | "full_attention"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save
    # the original generation_config.json (stop ids, default sampling), written back on save
    generation_config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def attn_scale(self):
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, i):
        """The sliding window of layer i, or None for global attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return self.sliding_window  # Mistral: every layer

    def n_params(self, embeddings=True):
        """Parameter count from the shapes (no model needed; `w2s inspect` and MFU use it)."""
        D, F, hd = self.dim, self.hidden_dim, self.head_dim
        attn = D * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads) + D
        mlp = 3 * D * F + (2 * F + D if self.mlp_bias else 0)
        norms = D * (4 if self.sandwich_norms else 2)
        total = self.n_layers * (attn + mlp + norms) + D
        if embeddings:
            total += self.vocab_size * D * (1 if self.tie_embeddings else 2)
        return total

    @classmethod
    def from_hf(cls, hf: dict, source="config.json"):
        """Build from a parsed HF config dict; unknown architectures and missing keys get one clear error. An
        optional key that is absent takes transformers' default for the family (LlamaConfig, Gemma2Config, ...)."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object of model options, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in FAMILIES:
            raise ValueError(f"{source}: architectures={archs!r} is not supported; expected one of "
                             f"{', '.join(FAMILIES)}")
        family = FAMILIES[arch]

        def need(key):
            if key not in hf or hf[key] is None:
                raise ValueError(f"{source}: missing key {key!r} required for {arch}")
            return count(key, hf[key])

        def count(key, value):  # a size: "2" or 2.0 would fail later as a TypeError deep in the model
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{source}: {key}={value!r}: expected a whole number >= 1")
            return value

        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        gemma, gemma2 = family in ("gemma", "gemma2"), family == "gemma2"
        defaults = FAMILY_DEFAULTS[family]  # absent keys take transformers' family defaults (Gemma: head_dim 256)
        # absent or null takes the default; a 0 is refused like any other size < 1 (not replaced by the default)
        n_kv, head_dim = hf.get("num_key_value_heads"), hf.get("head_dim")
        n_kv = count("num_key_value_heads", defaults.get("num_key_value_heads", n_heads) if n_kv is None else n_kv)
        head_dim = count("head_dim", (256 if gemma else dim // n_heads) if head_dim is None else head_dim)
        if n_heads % n_kv:
            raise ValueError(f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        # transformers >= 5 folds rope_theta/rope_scaling into rope_parameters; real checkpoints use the old keys.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = hf.get("rope_scaling") or rope
        scaling_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if scaling_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope scaling type {scaling_type!r} is not supported (default, llama3)")
        n_layers = need("num_hidden_layers")
        layer_types = list(hf.get("layer_types") or [])
        if gemma2 and not layer_types:  # older Gemma-2 configs: even layers local, odd layers global
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        if layer_types and (len(layer_types) != n_layers or not set(layer_types) <= {"sliding_attention",
                                                                                     "full_attention"}):
            raise ValueError(f"{source}: layer_types={layer_types!r}: expected num_hidden_layers={n_layers} entries, "
                             f"each 'sliding_attention' or 'full_attention'")
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or defaults["hidden_act"]
        if family == "gemma" and activation == "gelu":
            activation = "gelu_pytorch_tanh"  # Gemma (1) says "gelu" but was trained with the tanh form; transformers
            # maps it there for Gemma alone (Gemma-2's "gelu" is the exact one, which w2s has no kernel for)
        if activation not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation {activation!r} is not supported (silu, gelu_pytorch_tanh)")
        for key, value in (("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)), ("rope_theta", rope_theta)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{source}: {key}={value!r}: expected a finite number > 0")
        return cls(
            family=family, vocab_size=need("vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=need("intermediate_size"),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            rope_scaling=scaling if scaling_type == "llama3" else None,
            max_seq_len=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_embeddings=hf.get("tie_word_embeddings", gemma), attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), activation=activation, norm_unit_offset=gemma, embed_scale=gemma,
            sandwich_norms=gemma2, query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma2 else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0) if gemma2 else None,  # an explicit null: none
            final_logit_softcap=hf.get("final_logit_softcapping", 30.0) if gemma2 else None,
            sliding_window=hf.get("sliding_window", 4096) if family in ("mistral", "gemma2") else None,
            layer_types=layer_types, hf_config=hf,
            **{key: hf.get(key, defaults.get(key)) for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: no config.json (expected a Hugging Face checkpoint directory)")
        cfg = cls.from_hf(read_json(cfg_file), source=str(cfg_file))
        gen_file = cfg_file.parent / "generation_config.json"
        if gen_file.is_file():
            cfg.generation_config = read_json(gen_file)
        return cfg

    def to_hf(self):
        """The config.json to write next to saved weights: the original one when we have it, else rebuilt."""
        if self.hf_config:
            return dict(self.hf_config)
        arch = {v: k for k, v in FAMILIES.items()}[self.family]
        hf = {
            "architectures": [arch], "model_type": self.family, "vocab_size": self.vocab_size,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "hidden_act": self.activation, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling:
            hf["rope_scaling"] = self.rope_scaling
        if self.family in ("gemma", "gemma2"):
            hf["hidden_activation"] = self.activation
        if self.family in ("mistral", "gemma2"):
            hf["sliding_window"] = self.sliding_window
        if self.family == "gemma2":
            hf.update(query_pre_attn_scalar=self.query_pre_attn_scalar, attn_logit_softcapping=self.attn_logit_softcap,
                      final_logit_softcapping=self.final_logit_softcap, layer_types=self.layer_types)
        return hf

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies (head_dim/2,) fp32, with Llama-3.1's frequency-dependent scaling when configured.

    Llama-3.1 leaves high frequencies (wavelength < original_ctx / high_freq_factor) alone, divides low ones
    (wavelength > original_ctx / low_freq_factor) by `factor`, and interpolates smoothly between the two.
    """
    import torch

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    if not cfg.rope_scaling:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_medium, interpolated, out)
