"""Model and checkpoint parity with transformers for every family, both directions, plus bad-input errors.

    python -m pytest -q tests/test_model.py
"""

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hf_tiny import FAMILIES, right_padded_batch, save_hf, store_output_matrix

import w2s
from w2s.config import ModelConfig

LENGTHS = [12, 7, 1]  # right-padded batch; 12 > the sliding windows (5) of mistral and gemma2


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits


def w2s_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def assert_valid_close(ours, ref, mask, tol=1e-4):
    valid = mask.bool()
    diff = (ours[valid] - ref[valid]).abs().max().item()
    assert diff <= tol, f"max abs logit diff {diff:.2e} > {tol}"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sharded", [False, True])
def test_load_hf_checkpoint_matches_transformers(family, sharded, tmp_path):
    hf = save_hf(family, tmp_path, max_shard_size="40KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = w2s.load_model(tmp_path, dtype=torch.float32)
    tokens, mask = right_padded_batch(LENGTHS)
    assert_valid_close(w2s_logits(model, tokens), hf_logits(hf, tokens, mask), mask)


def test_llama_with_attention_and_mlp_biases_matches_transformers(tmp_path):
    """attention_bias / mlp_bias (Qwen-style): every projection, o_proj and down_proj included, carries its bias."""
    import transformers
    from hf_tiny import save_llama_with_biases

    save_llama_with_biases(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    model = w2s.load_model(tmp_path, dtype=torch.float32)
    tokens, mask = right_padded_batch(LENGTHS)
    assert_valid_close(w2s_logits(model, tokens), hf_logits(hf, tokens, mask), mask)


def test_stored_weights_the_config_does_not_imply_are_refused_as_transformers_reports_them(tmp_path):
    """A checkpoint with biases under a config that lost attention_bias / mlp_bias: transformers loads it without the
    biases (its loading info lists them as unexpected) and so would every logit be wrong. Loading refuses it, and the
    header-only check names the same count. The rotary buffers older checkpoints store are no weights: they load."""
    import transformers
    from hf_tiny import save_llama_with_biases
    from safetensors.torch import load_file, save_file

    from w2s.checkpoint import checkpoint_problems

    save_llama_with_biases(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False, "mlp_bias": False}))
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    dropped = sorted(info["unexpected_keys"])
    assert len(dropped) == 14  # q, k, v, o and gate, up, down biases of the two blocks
    line = (f"{tmp_path}: checkpoint holds 14 tensor(s) config.json does not imply, e.g. {dropped[0]!r} (a key "
            f"missing from config.json, such as attention_bias or mlp_bias, or another architecture?)")
    assert checkpoint_problems(tmp_path, tokenizer=False) == [line]
    with pytest.raises(ValueError) as refused:
        w2s.load_model(tmp_path, dtype=torch.float32)
    assert str(refused.value) == line

    state = {n: t for n, t in load_file(tmp_path / "model.safetensors").items() if n not in dropped}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_problems(tmp_path, tokenizer=False) == []
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tokens, mask = right_padded_batch(LENGTHS)
    assert_valid_close(w2s_logits(w2s.load_model(tmp_path, dtype=torch.float32), tokens),
                       hf_logits(hf, tokens, mask), mask)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_model_loads_in_transformers(family, tmp_path):
    import transformers

    save_hf(family, tmp_path / "src")
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    w2s.save_model(model, tmp_path / "out", max_shard_bytes=30_000)  # forces several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tokens, mask = right_padded_batch(LENGTHS, seed=1)
    assert_valid_close(hf_logits(hf, tokens, mask), w2s_logits(model, tokens), mask)
    again = w2s.load_model(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(w2s_logits(again, tokens), w2s_logits(model, tokens))


def test_a_save_over_an_earlier_export_is_incomplete_until_it_ends(tmp_path, monkeypatch):
    """save_model's promise, a directory with a config.json is complete, holds when it writes over an earlier export:
    a save that dies while writing its shards leaves no config.json (the earlier one described other weights)."""
    import w2s.checkpoint as checkpoint

    save_hf("llama2", tmp_path / "src")
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    w2s.save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    assert (tmp_path / "out" / "config.json").is_file()
    written = []

    def dies_on_the_second_shard(tensors, filename, metadata=None):
        if written:
            raise OSError("No space left on device")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", dies_on_the_second_shard)
    with pytest.raises(OSError, match="No space left"):
        w2s.save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    assert written and not (tmp_path / "out" / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        w2s.load_model(tmp_path / "out")


def test_save_keeps_generation_config_and_merges_live_lora(tmp_path):
    """save_model writes back the loaded generation_config.json (Llama-3-Instruct's list of stop ids, default
    sampling), and merges LoRA layers still in the model: transformers would load them as unexpected keys, ignored."""
    import transformers

    from w2s.lora import inject_lora

    save_hf("llama2", tmp_path / "src")
    gen = {"bos_token_id": 1, "eos_token_id": [2, 5, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "src" / "generation_config.json").write_text(json.dumps(gen))
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    inject_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)  # B starts at zero: the adapter must change the logits to be seen
    w2s.save_model(model, tmp_path / "out")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").to_diff_dict() == \
        transformers.GenerationConfig.from_pretrained(tmp_path / "src").to_diff_dict()
    tokens, mask = right_padded_batch(LENGTHS, seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert_valid_close(hf_logits(hf, tokens, mask), w2s_logits(model, tokens), mask)


def test_save_writes_back_the_loaded_config_json_with_the_keys_w2s_does_not_read(tmp_path):
    """save_model writes the original config.json back rather than one rebuilt from w2s's fields, so keys w2s never
    reads (attention_dropout, which transformers trains with; initializer_range; pretraining_tp) reach transformers
    unchanged: it reads the same configuration from the export as from the source."""
    import transformers

    save_hf("llama2", tmp_path / "src")
    hf = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**hf, "attention_dropout": 0.25,
                                                              "initializer_range": 0.05}))
    w2s.save_model(w2s.load_model(tmp_path / "src", dtype=torch.float32), tmp_path / "out")
    original, saved = (transformers.AutoConfig.from_pretrained(tmp_path / d).to_dict() for d in ("src", "out"))
    original.pop("_name_or_path"), saved.pop("_name_or_path")  # the directory each was read from
    assert saved["attention_dropout"] == 0.25 and saved == original


@pytest.mark.parametrize("cls_name, family", [("LlamaConfig", "llama2"), ("MistralConfig", "mistral"),
                                              ("GemmaConfig", "gemma"), ("Gemma2Config", "gemma2")])
def test_absent_optional_config_keys_take_transformers_defaults(cls_name, family, tmp_path):
    """A config.json without rms_norm_eps, sliding_window, the activation, the context length, tied embeddings, the
    special token ids, Llama's or Mistral's kv heads, or Gemma-2's scalar and soft-caps reads them as transformers'
    config classes default them, not as w2s's own constructor does."""
    import transformers

    save_hf(family, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "hidden_act", "hidden_activation", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "rope_theta"):
        hf.pop(key, None)
    if family in ("llama2", "mistral"):  # Gemma's kv heads: the test below
        hf.pop("num_key_value_heads")
        hf["num_attention_heads"] = 16  # a multiple of Mistral's default 8 kv heads; head_dim stays explicit
    cfg = ModelConfig.from_hf(hf)
    ref = getattr(transformers, cls_name)(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert cfg.norm_eps == ref.rms_norm_eps
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.sliding_window == getattr(ref, "sliding_window", None)
    assert cfg.activation == (ref.hidden_activation if family == "gemma2" else ref.hidden_act)
    assert (cfg.max_seq_len, cfg.tie_embeddings, cfg.n_kv_heads) == \
        (ref.max_position_embeddings, ref.tie_word_embeddings, ref.num_key_value_heads)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    if family == "gemma2":
        assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap) == \
            (ref.query_pre_attn_scalar, ref.attn_logit_softcapping, ref.final_logit_softcapping)


@pytest.mark.parametrize("cls_name, family", [("GemmaConfig", "gemma"), ("Gemma2Config", "gemma2")])
def test_gemma_configs_without_head_dim_or_kv_heads_take_transformers_defaults(cls_name, family, tmp_path):
    """Gemma's config classes default head_dim to 256 (not hidden / heads) and keep their own kv-head counts."""
    import transformers

    save_hf(family, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("head_dim"), hf.pop("num_key_value_heads")
    hf["num_attention_heads"] = 16  # a multiple of either family's default kv heads
    cfg = ModelConfig.from_hf(hf)
    ref = getattr(transformers, cls_name)(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert (cfg.head_dim, cfg.n_kv_heads) == (ref.head_dim, ref.num_key_value_heads) != (64 // 16, 16)


def test_gelu_is_the_tanh_form_for_gemma_only(tmp_path):
    """transformers reads Gemma's legacy hidden_act "gelu" as the tanh approximation; Gemma-2's "gelu" is the exact
    GELU, which w2s has no kernel for: refused, never computed as the tanh form."""
    save_hf("gemma", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("hidden_activation", None)
    assert ModelConfig.from_hf({**hf, "hidden_act": "gelu"}).activation == "gelu_pytorch_tanh"
    hf2 = json.loads((save_hf("gemma2", tmp_path / "g2") and tmp_path / "g2" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"activation 'gelu' is not supported"):
        ModelConfig.from_hf({**hf2, "hidden_activation": "gelu"})



# Llama-3.1's published config.json: the pre-transformers-5 keys rope_theta / rope_scaling, not rope_parameters
LLAMA31_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 256, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def _transformers_config(hf):
    import transformers

    return getattr(transformers, hf["architectures"][0].replace("ForCausalLM", "Config"))(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_llama31_rope_keys_of_published_checkpoints_give_transformers_frequencies(type_key):
    """A Llama-3.1 config.json as Meta publishes it (rope_theta and rope_scaling at the top level; older exports name
    the scaling "type") gives transformers' llama3 inverse frequencies: head_dim 128 and an original context of 8,192
    put frequencies in all three bands (kept, interpolated, divided by the factor)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from w2s.config import rope_inv_freq

    scaling = dict(LLAMA31_CONFIG["rope_scaling"])
    scaling[type_key] = scaling.pop("rope_type")
    hf = {**LLAMA31_CONFIG, "rope_scaling": scaling}
    cfg = ModelConfig.from_hf(hf)
    ref = _transformers_config(hf)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](ref, "cpu")
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 500000.0
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    ratio = unscaled / expected
    assert ratio.min() == pytest.approx(1.0) and ratio.max() == pytest.approx(8.0)  # all three bands are present
    assert ((ratio > 1.01) & (ratio < 7.99)).any()
    torch.testing.assert_close(rope_inv_freq(cfg), expected, rtol=1e-6, atol=0)


def test_a_llama31_frequency_exactly_at_the_low_band_edge_is_interpolated_as_in_transformers():
    """transformers' llama3 scaling counts a wavelength equal to original_ctx / low_freq_factor as medium (both band
    edges inclusive), where the interpolation weight is 0: that frequency is divided by the factor, not kept. Here
    inv_freq 1 (the first of head_dim 4) has its wavelength fp32(2 pi) exactly on the low edge."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from w2s.config import rope_inv_freq

    edge = float(torch.tensor(2 * math.pi, dtype=torch.float32))  # as the scaling compares it, in fp32
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 8192 / edge, "high_freq_factor": 4000.0,
               "original_max_position_embeddings": 8192}
    hf = {**LLAMA31_CONFIG, "head_dim": 4, "rope_theta": 10000.0, "rope_scaling": scaling}
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](_transformers_config(hf), "cpu")
    assert expected[0].item() == pytest.approx(1 / 8)  # the edge frequency is scaled, not left at 1
    torch.testing.assert_close(rope_inv_freq(ModelConfig.from_hf(hf)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}])
def test_rope_scalings_without_a_w2s_implementation_are_refused(scaling):
    """Linear, dynamic-NTK and YaRN scaling change the frequencies (or the attention scale) in ways w2s does not
    compute: a model read as unscaled would give wrong logits past the original context, so it is refused."""
    with pytest.raises(ValueError, match=rf"rope scaling type '{scaling.get('rope_type', scaling.get('type'))}' "
                                         r"is not supported"):
        ModelConfig.from_hf({**LLAMA31_CONFIG, "rope_scaling": scaling})


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_an_absent_head_dim_is_hidden_over_query_heads_as_in_transformers(arch):
    """Without head_dim, Llama and Mistral split the hidden size over the query heads (not the kv heads)."""
    hf = {**LLAMA31_CONFIG, "architectures": [arch], "hidden_size": 96, "num_attention_heads": 6,
          "num_key_value_heads": 2}
    hf.pop("rope_scaling")
    assert ModelConfig.from_hf(hf).head_dim == _transformers_config(hf).head_dim == 16


def test_a_gemma2_config_without_layer_types_alternates_as_transformers_does(tmp_path):
    """Gemma-2 configs written before transformers listed layer_types: transformers makes the even layers sliding and
    the odd ones global, and w2s's per-layer windows must follow."""
    save_hf("gemma2", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("layer_types")
    hf["num_hidden_layers"] = 5
    cfg, ref = ModelConfig.from_hf(hf), _transformers_config(hf)
    assert [cfg.layer_window(i) for i in range(5)] == \
        [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types] == [5, None, 5, None, 5]


def test_gemma2_soft_caps_set_to_null_are_off_and_hidden_activation_wins(tmp_path):
    """An explicit null soft-cap (exports for attention kernels without capping) turns capping off, as in
    transformers, rather than taking the default; hidden_activation is the one Gemma-2's MLP uses over hidden_act."""
    save_hf("gemma2", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.update(attn_logit_softcapping=None, final_logit_softcapping=None, hidden_act="silu")
    cfg, ref = ModelConfig.from_hf(hf), _transformers_config(hf)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == \
        (ref.attn_logit_softcapping, ref.final_logit_softcapping) == (None, None)
    assert cfg.activation == ref.hidden_activation == "gelu_pytorch_tanh"


@pytest.mark.parametrize("layer_types", [["sliding_attention"], ["sliding_attention", "full_attention"] * 2,
                                         ["sliding_attention", "bogus"], ["sliding_attention", "chunked_attention"]])
def test_gemma2_layer_types_of_another_length_or_kind_are_one_clear_error(layer_types, tmp_path):
    """transformers' config refuses a layer_types list whose length is not num_hidden_layers, or an unknown kind;
    chunked_attention it accepts, but Gemma-2's attention has no such mask. w2s reads only the two kinds a Gemma-2
    runs: anything else would index past the list, or run a layer as global attention, instead of one error."""
    save_hf("gemma2", tmp_path)
    hf = {**json.loads((tmp_path / "config.json").read_text()), "num_hidden_layers": 2, "layer_types": layer_types}
    if "chunked_attention" not in layer_types:
        with pytest.raises(Exception, match="layer_types"):  # a ValueError wrapped in huggingface_hub's own error
            _transformers_config(hf)
    with pytest.raises(ValueError, match=r"layer_types=.*: expected num_hidden_layers=2 entries, each "
                                         r"'sliding_attention' or 'full_attention'$"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_config_json_rebuilt_without_the_original_reads_in_transformers_as_the_original(family, tmp_path):
    """A ModelConfig that carries no original config.json (built by hand) writes one from its fields: transformers
    must read the same model from it (kv heads, windows per layer, soft-caps, rope scaling, ties, activation)."""
    import transformers

    save_hf(family, tmp_path)
    original = transformers.AutoConfig.from_pretrained(tmp_path)
    rebuilt = _transformers_config(ModelConfig.from_pretrained(tmp_path).replace(hf_config={}).to_hf())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                "tie_word_embeddings", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(rebuilt, key, None) == getattr(original, key, None), key
    # the activation each family's MLP applies: Gemma's hidden_activation (Gemma-2's config has no hidden_act)
    assert (getattr(rebuilt, "hidden_activation", None) or rebuilt.hidden_act) == \
        (getattr(original, "hidden_activation", None) or original.hidden_act)


def test_family_deltas_are_read_from_config(tmp_path):
    save_hf("gemma2", tmp_path)
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert (cfg.family, cfg.norm_unit_offset, cfg.embed_scale, cfg.sandwich_norms, cfg.tie_embeddings) == \
        ("gemma2", True, True, True, True)
    assert [cfg.layer_window(i) for i in range(3)] == [5, None, 5]
    assert cfg.attn_scale == pytest.approx(24 ** -0.5)


def test_dtype_conversion_is_explicit(tmp_path):
    save_hf("llama2", tmp_path)
    model = w2s.load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # rope frequencies stay fp32 whatever the weights' dtype


def test_hidden_states_feed_the_lm_head(tmp_path):
    save_hf("gemma2", tmp_path)
    model = w2s.load_model(tmp_path, dtype=torch.float32)
    tokens, _ = right_padded_batch([6, 6])
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        logits = hidden @ model.lm_head_weight().t()
        logits = 3.0 * torch.tanh(logits / 3.0)  # gemma2's final soft-cap from hf_tiny
    torch.testing.assert_close(logits, w2s_logits(model, tokens))


# ---------------------------------------------------------------- bad input: one clear error naming the file


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        w2s.load_model(tmp_path)


def test_unknown_architecture(tmp_path):
    save_hf("llama2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: architectures=\['GPT2LMHeadModel'\] is not supported"):
        w2s.load_model(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", "2", r"num_hidden_layers='2': expected a whole number >= 1"),
    ("num_key_value_heads", 0.5, r"num_key_value_heads=0\.5: expected a whole number >= 1"),
    ("rms_norm_eps", float("nan"), r"rms_norm_eps=nan: expected a finite number > 0"),
    ("rope_theta", -1.0, r"rope_theta=-1\.0: expected a finite number > 0"),
    ("rope_theta", float("inf"), r"rope_theta=inf: expected a finite number > 0"),
    ("rms_norm_eps", 0, r"rms_norm_eps=0: expected a finite number > 0"),
    ("num_attention_heads", 0, r"num_attention_heads=0: expected a whole number >= 1"),
    ("num_key_value_heads", 0, r"num_key_value_heads=0: expected a whole number >= 1"),
    ("head_dim", 0, r"head_dim=0: expected a whole number >= 1"),
    ("vocab_size", True, r"vocab_size=True: expected a whole number >= 1"),
    ("num_hidden_layers", None, r"missing key 'num_hidden_layers' required for LlamaForCausalLM"),
])  # fmt: skip
def test_config_values_of_the_wrong_type_are_one_clear_error(tmp_path, key, value, message):
    """A string where a size goes, or a NaN epsilon (which would sample token 0 forever), is one line naming the key
    and what was expected."""
    save_hf("llama2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=rf"config\.json: {message}$"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list$"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama\xff"}')  # a byte that is not UTF-8
    with pytest.raises(ValueError, match=r"config\.json: not UTF-8 \(byte 0xff at byte 22\)$"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("value", [["LlamaForCausalLM"], "config.json", None])
def test_a_parsed_config_that_is_not_an_object_is_one_clear_error_from_from_hf(value):
    """ModelConfig.from_hf is public (a config dict from anywhere, not only read_json's checked file): a list, string
    or null is a ValueError naming the source and the type, not an AttributeError from inside the parser."""
    with pytest.raises(ValueError, match=rf"^hub: expected a JSON object of model options, got "
                                         rf"{type(value).__name__}$"):
        ModelConfig.from_hf(value, source="hub")


def test_missing_shard(tmp_path):
    save_hf("llama2", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name + ".*is missing"):
        w2s.load_model(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for text in ('{"metadata": {}}', '{"weight_map": {"a": 3}}', "[1]"):  # not the layout save_pretrained writes
        index.write_text(text)
        with pytest.raises(ValueError, match=rf"^{index}: (not a safetensors index|expected a JSON object)"):
            w2s.load_model(tmp_path)


def test_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    """save_pretrained re-saving a sharded directory as one file leaves the old index: transformers loads
    model.safetensors first, and so must w2s (it refused the directory, or read other weights when shards remained)."""
    from transformers import AutoModelForCausalLM

    save_hf("llama2", tmp_path, seed=0, max_shard_size="40KB")  # index + shards of seed 0
    save_hf("llama2", tmp_path / "other", seed=1)
    (tmp_path / "other" / "model.safetensors").rename(tmp_path / "model.safetensors")  # seed 1 as one file beside
    tokens, mask = right_padded_batch([7])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ref = hf_logits(hf, tokens, mask)
    assert_valid_close(ref, w2s_logits(w2s.load_model(tmp_path, dtype=torch.float32), tokens), mask)
    for shard in tmp_path.glob("model-*.safetensors"):
        shard.unlink()  # only the stale index is left beside the file
    assert_valid_close(ref, w2s_logits(w2s.load_model(tmp_path, dtype=torch.float32), tokens), mask)


@pytest.mark.parametrize("copy", [True, False])
def test_a_tied_config_with_a_stored_output_matrix_loads_as_transformers(copy, tmp_path):
    """Gemma ties the output matrix to the embeddings and stores no lm_head.weight. A checkpoint that stores one anyway
    keeps the tie when it is a copy of the embeddings; when it differs, transformers (5.x) unties the two and uses
    the stored matrix (with a warning), and so does w2s: same logits, and inspect says so."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from w2s.cli import main

    save_hf("gemma", tmp_path)
    store_output_matrix(tmp_path, copy=copy)
    tokens, mask = right_padded_batch(LENGTHS)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == copy
    if copy:
        model = w2s.load_model(tmp_path, dtype=torch.float32)
    else:
        with pytest.warns(UserWarning, match=r"config\.json ties the output matrix .* loading it untied"):
            model = w2s.load_model(tmp_path, dtype=torch.float32)
    assert model.cfg.tie_embeddings == copy and (model.lm_head is None) == copy
    assert_valid_close(w2s_logits(model, tokens), hf_logits(hf, tokens, mask), mask)
    out = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert out.exit_code == 0 and "but an lm_head.weight is stored too: untied on load if it differs" in out.output


def test_index_pointing_at_a_shard_without_the_tensor(tmp_path):
    save_hf("llama2", tmp_path, max_shard_size="40KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(f for f in shards if f != index["weight_map"][name])
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"model-.*\.safetensors: no tensor '{re.escape(name)}', which config"):
        w2s.load_model(tmp_path)


def test_wrong_tensor_shape(tmp_path):
    save_hf("llama2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\..*' has shape"):
        w2s.load_model(tmp_path)


def test_tokenizer_larger_than_embedding(tmp_path):
    from tokenizers import Tokenizer, models

    save_hf("llama2", tmp_path)
    vocab = {f"t{i}": i for i in range(200)}  # 200 > the checkpoint's 128 embeddings
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer has 200 tokens but config.json vocab_size is 128"):
        w2s.load_model(tmp_path)
    for shard in tmp_path.glob("*.safetensors"):
        shard.write_bytes(b"")  # known from the small files: refused before any weight is read
    with pytest.raises(ValueError, match="tokenizer has 200 tokens but config.json vocab_size is 128"):
        w2s.load_model(tmp_path)


def test_peak_memory_while_loading_stays_near_checkpoint_size(tmp_path):
    """Meta-device build + assign: loading an fp32 checkpoint into fp32 costs ~1x its size, not 2x."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import resource, torch, w2s
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = w2s.load_model({str(tmp_path)!r}, dtype=torch.float32)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth <= 1.3 * size, f"peak RSS grew {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_cpu_sdpa_fast_path_equals_the_reference_attention(heads, monkeypatch):
    """ops.attention's CPU fast path (plain causal -> torch SDPA) computes w2s/kernels/reference.py, values and
    grads."""
    from w2s import ops
    from w2s.kernels import reference

    H, K = heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, n, 8, generator=g, requires_grad=True) for n in (H, K, K))
    monkeypatch.setattr(ops, "_backend", "auto")
    fast = ops.attention(q, k, v, scale=0.3)
    ref = reference.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(fast.shape, generator=g)
    grads_fast = torch.autograd.grad(fast, (q, k, v), upstream)
    grads_ref = torch.autograd.grad(ref, (q, k, v), upstream)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_cpu_sdpa_masked_path_equals_the_reference_attention(window, monkeypatch):
    """The no-grad path with positions over a cache (sampling), incl. kv_lengths, GQA and an empty row -> zeros."""
    from w2s import ops
    from w2s.kernels import reference

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 11, 2, 8, generator=g), torch.randn(3, 11, 2, 8)
    positions = torch.tensor([[4, 5], [9, 10], [0, 1]])
    kv_lengths = torch.tensor([11, 6, 0])  # row 2 sees no key at all
    monkeypatch.setattr(ops, "_backend", "auto")
    fast = ops.attention(q, k, v, q_positions=positions, kv_lengths=kv_lengths, sliding_window=window)
    ref = reference.attention(q, k, v, q_positions=positions, kv_lengths=kv_lengths, sliding_window=window)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert fast[2].abs().max() == 0


@pytest.mark.parametrize("case, expected", [
    (dict(), "sdpa"),  # plain causal, differentiable
    (dict(softcap=5.0), "reference"),  # SDPA has no soft-cap
    (dict(window=3), "reference"),  # not plain, and a gradient is wanted
    (dict(window=3, grad=False), "sdpa"),
    (dict(positions=True), "reference"),
    (dict(positions=True, grad=False), "sdpa"),
    (dict(positions=True, grad=False, softcap=5.0), "reference"),
    (dict(positions=True, no_grad_mode=True), "reference"),  # the rule reads requires_grad, not the grad mode
    (dict(S=12, grad=False), "sdpa"),  # T != S without positions: the masked path
    (dict(S=12), "reference"),
    (dict(backend="reference"), "reference"),
    (dict(backend="reference", positions=True, grad=False), "reference"),
])
def test_cpu_attention_takes_sdpa_exactly_where_it_did(case, expected, monkeypatch):
    """ops.attention on CPU: SDPA (w2s/kernels/sdpa_attention.py) under `auto` for plain causal calls and for calls
    that want no gradient, none with a soft-cap; the reference everywhere else. Implementations stubbed."""
    from w2s import ops
    from w2s.kernels import reference, sdpa_attention

    monkeypatch.setattr(ops, "_backend", case.get("backend", "auto"))
    monkeypatch.setattr(sdpa_attention, "attention", lambda *a, **k: "sdpa")
    monkeypatch.setattr(reference, "attention", lambda *a, **k: "reference")
    T, S = 9, case.get("S", 9)
    q, k = torch.zeros(2, T, 4, 8, requires_grad=case.get("grad", True)), torch.zeros(2, S, 2, 8)
    positions = torch.arange(T).expand(2, T) if case.get("positions") else None
    with torch.set_grad_enabled(not case.get("no_grad_mode", False)):
        got = ops.attention(q, k, k, q_positions=positions, sliding_window=case.get("window"),
                            softcap=case.get("softcap"))
    assert got == expected


@pytest.mark.parametrize("P, cascade", [(63, False), (64, True)])
def test_cpu_shared_prefix_reaches_sdpa_from_the_threshold_on(P, cascade, monkeypatch):
    from w2s import ops
    from w2s.kernels import sdpa_attention

    monkeypatch.setattr(ops, "_backend", "auto")
    seen = []
    monkeypatch.setattr(sdpa_attention, "attention", lambda *a, shared_prefix, **k: seen.append(shared_prefix))
    q, k = torch.zeros(2, 1, 4, 8), torch.zeros(2, 80, 2, 8)
    prefix = (k[0, :P], k[0, :P])
    ops.attention(q, k, k, q_positions=torch.full((2, 1), 70), shared_prefix=prefix)
    assert ops.CASCADE_MIN_PREFIX == 64 and seen == [prefix if cascade else None]


@pytest.mark.parametrize("heads, T", [((4, 2), 1), ((4, 4), 2), ((6, 1), 1)])
def test_cpu_shared_prefix_hint_changes_no_value(heads, T, monkeypatch):
    """Keys [0, P) equal in every row: the cascade path (prefix attended once, merged by log-sum-exp) computes
    w2s/kernels/reference.py's attention over the whole rows; queries inside the prefix fall back to the masked path."""
    from w2s import ops
    from w2s.kernels import reference, sdpa_attention

    H, K = heads
    B, S, P, D = 3, 13, 5, 8
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, T, H, D, generator=g)
    k, v = torch.randn(B, S, K, D, generator=g), torch.randn(B, S, K, D, generator=g)
    k_p, v_p = torch.randn(P, K, D, generator=g), torch.randn(P, K, D, generator=g)
    k[:, :P], v[:, :P] = k_p, v_p
    monkeypatch.setattr(ops, "_backend", "auto")
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", P)  # tiny shapes: take the path at this prefix length
    calls = []
    cascade = sdpa_attention.attention_after_shared_prefix
    monkeypatch.setattr(sdpa_attention, "attention_after_shared_prefix", lambda *a: calls.append(1) or cascade(*a))
    for positions in (torch.tensor([[5, 6], [9, 10], [11, 12]])[:, :T], torch.tensor([[3, 4], [9, 10], [7, 8]])[:, :T]):
        fast = ops.attention(q, k, v, q_positions=positions, scale=0.4, shared_prefix=(k_p, v_p))
        ref = reference.attention(q, k, v, q_positions=positions, scale=0.4)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert calls == [1]  # the first positions are all >= P; the second has a query inside the prefix


# ---------------------------------------------------------------- checkpoint layout details (mutation audit)


def test_a_lone_shard_under_another_name_loads_and_two_without_an_index_are_refused(tmp_path):
    """A directory with one .safetensors file under another name (a one-shard save) loads it; several without an
    index cannot be told apart from a partial copy: refused naming them, never loaded from the first."""
    save_hf("llama2", tmp_path / "ref")
    (tmp_path / "ref" / "model.safetensors").rename(tmp_path / "ref" / "model-00001-of-00001.safetensors")
    model = w2s.load_model(tmp_path / "ref", dtype=torch.float32)
    hf = save_hf("llama2", tmp_path / "same")  # the same seed: the weights the renamed file holds
    tokens, mask = right_padded_batch(LENGTHS)
    assert_valid_close(w2s_logits(model, tokens), hf_logits(hf, tokens, mask), mask)

    save_hf("llama2", tmp_path / "sharded", max_shard_size="40KB")
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json \(found "
                                                r"\['model-00001-of-"):
        w2s.load_model(tmp_path / "sharded")


def test_a_tensor_missing_from_the_checkpoint_is_one_error_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf("llama2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint lacks 1 tensor\(s\) the config implies, e\.g\. "
                                         r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        w2s.load_model(tmp_path)


def test_name_or_path_is_the_absolute_directory_even_from_a_relative_path(tmp_path, monkeypatch):
    """An adapter trained from the model points back at name_or_path: a relative one would break from another cwd."""
    save_hf("llama2", tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert w2s.load_model("ckpt", dtype=torch.float32).name_or_path == str(tmp_path.resolve() / "ckpt")


def test_a_structure_only_load_has_the_requested_dtype(tmp_path):
    """device="meta" (FSDP ranks > 0) builds the model in the dtype rank 0 loads, so the shards they receive fit."""
    save_hf("llama2", tmp_path)
    model = w2s.load_model(tmp_path, dtype=torch.bfloat16, device="meta")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}


def test_a_tokenizer_exactly_as_large_as_the_embedding_loads(tmp_path):
    from tokenizers import Tokenizer, models

    save_hf("llama2", tmp_path)
    vocab = {f"t{i}": i for i in range(128)}  # every id has an embedding row (hf_tiny's vocab is 128)
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    w2s.load_model(tmp_path, dtype=torch.float32)


def test_a_truncated_shard_is_named_from_its_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    import os

    import w2s.checkpoint as checkpoint

    save_hf("llama2", tmp_path)
    shard = tmp_path / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=rf"^{shard}: tensor .* but the file has {shard.stat().st_size} bytes "
                                         rf"\(truncated"):
        w2s.load_model(tmp_path)


def test_a_tensors_byte_count_unlike_its_dtype_and_shape_is_a_problem(tmp_path):
    """A header whose dtype says F16 over the bytes of an F32 tensor (twice the bytes its shape needs) is named."""
    from w2s.checkpoint import checkpoint_problems

    save_hf("llama2", tmp_path)
    shard = tmp_path / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "F16"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # the same length: the data stays in place
    assert len(text) == n
    shard.write_bytes(raw[:8] + text + raw[8 + n:])
    assert checkpoint_problems(tmp_path, tokenizer=False) == [
        f"{shard}: tensor '{name}' spans 256 bytes, expected 128 for shape [64] in F16"]  # 64 x 4 bytes vs 64 x 2


def test_identity_files_ignore_evaluation_records_but_not_the_tokenizer_model(tmp_path):
    """A checkpoint's identity changes with its weights, config and tokenizer files, not with the records an
    evaluation wrote beside them (scripts/evaluate.py's default output)."""
    from w2s.checkpoint import identity_files

    save_hf("llama2", tmp_path)
    before = identity_files(tmp_path)
    assert {name for name, _, _ in before} == {"config.json", "generation_config.json", "model.safetensors"}
    (tmp_path / "eval.jsonl.meta.json").write_text("{}")
    (tmp_path / "eval.jsonl.result.json").write_text("{}")
    assert identity_files(tmp_path) == before
    (tmp_path / "tokenizer.model").write_bytes(b"pieces")
    assert [name for name, _, _ in identity_files(tmp_path)] == [name for name, _, _ in before] + ["tokenizer.model"]


def _hub_split(directory, max_shard_bytes):
    """huggingface_hub's sharding (what save_pretrained writes) of the tensors w2s saved in `directory`, in name
    order: {file: sorted tensor names}, total_size."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    state = {}
    for f in directory.glob("*.safetensors"):
        state.update({k: v.clone() for k, v in load_file(f).items()})
    split = split_torch_state_dict_into_shards(dict(sorted(state.items())), max_shard_size=max_shard_bytes)
    return {f: sorted(names) for f, names in split.filename_to_tensors.items()}, split.metadata["total_size"]


def test_shards_and_index_are_the_layout_save_pretrained_writes(tmp_path):
    """Shard boundaries (a shard holds tensors up to exactly max_shard_bytes), file names model-0000k-of-0000n and the
    index's total_size as huggingface_hub computes them; each file carries the {"format": "pt"} metadata
    transformers writes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    save_hf("llama2", tmp_path / "src")
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    sizes = [t.numel() * t.element_size() for _, t in sorted(load_file(tmp_path / "src" / "model.safetensors").items())]
    limit = sum(sizes[:3])  # the first three tensors fill a shard exactly
    w2s.save_model(model, tmp_path / "out", max_shard_bytes=limit)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files, total = _hub_split(tmp_path / "out", limit)
    assert len(files) > 2
    assert {f: sorted(n for n, s in index["weight_map"].items() if s == f) for f in files} == files
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(files)
    assert index["metadata"]["total_size"] == total
    w2s.save_model(model, tmp_path / "one")
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as written_by_transformers:
        expected = written_by_transformers.metadata()
    for f in [*(tmp_path / "out").glob("*.safetensors"), tmp_path / "one" / "model.safetensors"]:
        with safe_open(f, "pt") as opened:
            assert opened.metadata() == expected


def test_a_save_over_a_sharded_export_leaves_none_of_its_shards(tmp_path):
    """Shards of an earlier, larger save are not in the new index: left there, they would be read as part of the
    directory (its identity, a copy, a lone-shard load)."""
    save_hf("llama2", tmp_path / "src")
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    w2s.save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    w2s.save_model(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_save_model_dtype_is_the_dtype_written_and_the_one_transformers_reads(tmp_path):
    import transformers
    from safetensors import safe_open

    save_hf("llama2", tmp_path / "src")
    model = w2s.load_model(tmp_path / "src", dtype=torch.float32)
    w2s.save_model(model, tmp_path / "out", dtype=torch.bfloat16)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_validate_names_the_first_shape_problem_and_counts_the_rest(tmp_path):
    """intermediate_size 80 in config.json against 96 stored: gate, up and down of both blocks (6 tensors) differ."""
    from w2s.checkpoint import validate_checkpoint

    save_hf("llama2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has "
                                         rf"shape \[\d+, \d+\], expected \[\d+, \d+\] from config\.json \(and 5 more "
                                         rf"problem\(s\): w2s inspect {re.escape(str(tmp_path))}\)$"):
        validate_checkpoint(tmp_path, tokenizer=False)


def test_a_structure_only_load_of_a_tied_checkpoint_needs_no_weights(tmp_path):
    """device="meta" reads config.json alone: a tied (Gemma) directory without its safetensors still gives the
    structure, tied as config.json says."""
    save_hf("gemma", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    model = w2s.load_model(tmp_path, dtype=torch.float32, device="meta")
    assert model.cfg.tie_embeddings and model.lm_head is None


# ---------------------------------------------------------------- fresh weights, embedding scale, KV cache


def tiny_hf(cls_name, seed=0, **extra):
    """A transformers CausalLM (freshly initialized by transformers) of hf_tiny's shape with `extra` config keys, and
    the w2s ModelConfig read from its config."""
    import transformers
    from hf_tiny import COMMON

    hf_cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    hf_cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    return hf, ModelConfig.from_hf(hf_cfg.to_dict())


@pytest.mark.parametrize("cls_name, extra", [("LlamaConfig", dict(attention_bias=True, mlp_bias=True)),
                                             ("GemmaConfig", dict(head_dim=32))])
def test_init_weights_draws_what_transformers_initializes(cls_name, extra):
    """init_weights with its default std is transformers' own init of the same architecture: linear and embedding
    weights normal(0, initializer_range = 0.02), biases zero, norm weights the identity (ones; zeros for Gemma's
    (1 + w)). Spreads compared to those of the transformers model's own draw."""
    from w2s.model import Transformer

    hf, cfg = tiny_hf(cls_name, **extra)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_params["lm_head.weight" if name == "lm_head.weight" else "model." + name]
        assert p.shape == ref.shape, name
        if ref.std() == 0:  # a constant init: norms and biases
            assert torch.equal(p, ref), name
        else:
            assert abs(p.mean()) < 0.1 * ref.std(), name
            assert p.std().item() == pytest.approx(ref.std().item(), rel=0.1), name
    assert hf.config.initializer_range == 0.02


def test_init_weights_of_a_model_built_on_meta_recomputes_the_rotary_frequencies():
    """The meta-device build (to_empty leaves buffers uninitialized) gets transformers' rotary frequencies back."""
    from w2s.model import Transformer

    hf, cfg = tiny_hf("LlamaConfig", rope_theta=500000.0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").init_weights(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=1e-6)


def test_gemma_embedding_scale_is_rounded_to_the_activation_dtype_as_in_transformers(tmp_path):
    """bf16 Gemma multiplies the embeddings by sqrt(hidden) rounded to bf16 (sqrt(48) = 6.928... -> 6.9375), as
    transformers' scaled embedding does: the first block sees exactly transformers' input embeddings."""
    hf, _ = tiny_hf("GemmaConfig", hidden_size=48, head_dim=16)
    hf.save_pretrained(tmp_path)
    model = w2s.load_model(tmp_path, dtype=torch.bfloat16)
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    tokens, _ = right_padded_batch([9, 4])
    with torch.no_grad():
        model(tokens)
        expected = hf.to(torch.bfloat16).model.embed_tokens(tokens)
    assert torch.bfloat16 == seen[0].dtype == expected.dtype and torch.equal(seen[0], expected)


def test_decoding_through_a_kv_cache_gives_transformers_logits(tmp_path):
    """KVCache used directly (no sampler): a prompt written into two of three cache rows, then one token per step up
    to the cache's last position; every step's logits are transformers' over the whole sequence so far."""
    from w2s.model import KVCache

    hf = save_hf("llama2", tmp_path)
    model = w2s.load_model(tmp_path, dtype=torch.float32)
    tokens, mask = right_padded_batch([8, 8])
    cache = KVCache(model.cfg, slots=3, max_len=8)
    with torch.no_grad():
        ours = [model(tokens[:, :5], cache=cache)]
        for t in range(5, 8):
            ours.append(model(tokens[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert_valid_close(torch.cat(ours, dim=1), hf_logits(hf, tokens, mask), mask)


def test_kv_cache_hands_out_the_keys_written_to_a_row_and_its_shared_prefix():
    """Keys and values written to cache row 2 only (rotation by angle 0: zero frequencies) come back from `read`
    through `rows`, and `shared_prefix` of (row 2, P) is their first P positions, not another row's."""
    from w2s.model import KVCache

    cfg = ModelConfig(family="llama", vocab_size=16, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                      hidden_dim=8)
    cache = KVCache(cfg, slots=3, max_len=6)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 2, 4, generator=g), torch.randn(1, 4, 2, 4)
    cache.rows = torch.tensor([2])
    assert torch.equal(cache.write(1, q, k, v, torch.arange(4)[None], torch.zeros(2)), q)
    keys, values, rows = cache.read(1, 1)
    assert keys.shape == values.shape == (3, 6, 2, 4) and torch.equal(rows, cache.rows)
    assert torch.equal(keys[2, :4], k[0]) and torch.equal(values[2, :4], v[0])
    assert not keys[:2].any() and not cache.k[0].any()  # other rows, other layer: untouched
    cache.rows, cache.shared = None, (2, 3)
    prefix_k, prefix_v = cache.shared_prefix(1)
    assert torch.equal(prefix_k, k[0, :3]) and torch.equal(prefix_v, v[0, :3])


def test_reset_buffers_puts_the_rotary_frequencies_on_the_weights_device_by_default():
    """Without a device argument the buffers follow the weights (a model on CUDA keeps its frequencies on CUDA; here
    the meta device stands in for it)."""
    from w2s.model import Transformer

    cfg = ModelConfig(family="llama", vocab_size=16, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4,
                      hidden_dim=8)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.inv_freq = torch.zeros(2)  # somewhere else
    model.reset_buffers()
    assert model.inv_freq.device.type == "meta" and model.inv_freq.shape == (2,)
