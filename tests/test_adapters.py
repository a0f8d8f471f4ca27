"""LoRA adapters on disk (w2s/lora.py, w2s/export.py): a LoRA run writes PEFT's layout, which transformers + peft load
to the same logits as w2s; an adapter PEFT wrote loads in w2s; an adapter directory loads as its base with the
adapter merged, or for training as live LoRA layers that a LoRA run continues; the merged copy only on request;
tensor-parallel ranks merge their slices of the adapter. On a tiny random Llama, one CPU process, fp32.

    python -m pytest -q tests/test_adapters.py
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_model  # noqa: E402

import w2s  # noqa: E402
from w2s.lora import (  # noqa: E402
    PEFT_PREFIX,
    TARGETS,
    LoRALinear,
    adapter_applied,
    merged_weight,
    read_adapter,
)
from w2s.train import TrainConfig, train_sft  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 70, 4, 101], [1, 7, 7, 12, 90, 3, 64]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama2").save_pretrained(path)
    return path


def rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 128, (3,), generator=g).tolist(),
             "response_ids": torch.randint(3, 128, (4,), generator=g).tolist()} for _ in range(n)]


def cfg(**overrides):
    return TrainConfig(**{**dict(lr=5e-2, batch_size=4, micro_batch_size=4, max_steps=3, clip=None, progress=False,
                                 lora_rank=4, lora_alpha=8.0, seed=1), **overrides})


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """(adapter dir, the merged model train_sft returned) of a short LoRA SFT run on the base."""
    out = tmp_path_factory.mktemp("lora") / "model"
    model = train_sft(w2s.load_model(base, dtype=torch.float32), None, rows(), cfg(), out_dir=out)
    return out, model


def test_a_lora_run_writes_the_peft_layout_and_no_merged_copy(base, trained):
    out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == list(TARGETS)
    assert config["base_model_name_or_path"] == str(base.resolve())  # the pointer every loader follows
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
        a = f.get_tensor(f"{PEFT_PREFIX}layers.1.mlp.down_proj.lora_A.weight")
    assert len(names) == 2 * len(TARGETS) * 2 and a.shape == (4, 96) and a.dtype == torch.float32
    assert f"{PEFT_PREFIX}layers.0.self_attn.q_proj.lora_B.weight" in names
    # nothing as large as the base: no config.json, no model*.safetensors, no merged/ (export_merged is off)
    assert not (out / "config.json").exists() and not list(out.glob("model*.safetensors"))
    assert not (out / "merged").exists() and not (out / "ckpt").exists()


def test_transformers_and_peft_load_the_adapter_to_w2s_logits(base, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, returned = trained
    hf_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_base, out).eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits  # peft computes base + unmerged LoRA branch
    loaded = w2s.load_model(out, dtype=torch.float32)  # w2s: base + merged adapter
    torch.testing.assert_close(logits(loaded), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits(returned), expected, atol=2e-5, rtol=1e-5)
    assert (logits(w2s.load_model(base, dtype=torch.float32)) - expected).abs().max() > 1e-2  # it trained
    # transformers alone follows base_model_name_or_path (its peft integration), as vLLM's --lora-modules would
    direct = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(direct(IDS).logits, expected, atol=1e-6, rtol=1e-6)


def test_an_adapter_peft_wrote_loads_in_w2s(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"],
                                               init_lora_weights=False)).eval()  # random B: a non-zero update
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(IDS).logits
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    adapter = read_adapter(tmp_path)
    assert (adapter.rank, adapter.scale, adapter.targets) == (2, 3.0, ("q_proj", "v_proj", "up_proj"))
    torch.testing.assert_close(logits(w2s.load_model(tmp_path, dtype=torch.float32)), expected, atol=2e-5,
                               rtol=1e-5)


def test_applying_an_adapter_to_a_resident_base_leaves_it_exact(base, trained):
    """The pipeline's sampling path (adapter_applied on the resident base) computes exactly what loading the adapter
    directory computes, and the base is bit-identical afterwards: the next adapter needs no reread."""
    out, _ = trained
    model = w2s.load_model(base, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with adapter_applied(model, read_adapter(out)):
        assert torch.equal(logits(model), logits(w2s.load_model(out, dtype=torch.float32)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="do not fit the model's layer"):
        small = read_adapter(out)
        small.tensors = {k: (a[:, :5], b) for k, (a, b) in small.tensors.items()}
        with adapter_applied(model, small):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored after the error too


def test_training_from_an_adapter_continues_it(base, trained, tmp_path):
    """load_for_training(adapter dir) gives the base with the adapter as live LoRA layers: a LoRA run of the same
    shape starts from base + adapter and saves one adapter on the same base; another shape is one clear error; full
    fine-tuning merges the adapter first and exports a full model."""
    from w2s.checkpoint import load_for_training

    out, _ = trained
    model = load_for_training(out, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == len(TARGETS) * 2 and layers[0].lora_B.abs().sum() > 0  # the trained B, not zeros
    torch.testing.assert_close(logits(model), logits(w2s.load_model(out, dtype=torch.float32)), atol=1e-5, rtol=1e-5)
    recs = []
    continued = train_sft(model, None, rows(seed=1), cfg(max_steps=1, lr=1e-9), out_dir=tmp_path / "c",
                          on_step=recs.append)
    assert read_adapter(tmp_path / "c").base == str(base.resolve())  # still one adapter on the recipe's base
    torch.testing.assert_close(logits(continued), logits(w2s.load_model(out, dtype=torch.float32)), atol=1e-4,
                               rtol=1e-4)  # lr 1e-9: the continued adapter is the one it started from
    with pytest.raises(ValueError, match=r"adapter \(rank 4, alpha 8, .*cannot continue as lora_rank 8"):
        train_sft(load_for_training(out, dtype=torch.float32), None, rows(), cfg(lora_rank=8), out_dir=tmp_path / "x")
    full = train_sft(load_for_training(out, dtype=torch.float32), None, rows(), cfg(lora_rank=None, lr=1e-9,
                     max_steps=1), out_dir=tmp_path / "f")
    assert (tmp_path / "f" / "config.json").is_file() and not (tmp_path / "f" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(w2s.load_model(tmp_path / "f", dtype=torch.float32)), logits(full))
    torch.testing.assert_close(logits(full), logits(w2s.load_model(out, dtype=torch.float32)), atol=1e-4, rtol=1e-4)


def test_export_merged_writes_a_plain_hf_copy(base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    train_sft(w2s.load_model(base, dtype=torch.float32), None, rows(), cfg(export_merged=True, max_steps=1),
              out_dir=out)
    assert (out / "adapter_config.json").is_file() and (out / "merged" / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(w2s.load_model(out, dtype=torch.float32)), atol=1e-5,
                                   rtol=1e-5)


def test_an_adapter_written_over_another_is_incomplete_until_it_ends(trained, tmp_path, monkeypatch):
    """save_adapter writes adapter_config.json last so that its presence means complete: over an earlier adapter, a
    save that dies writing the weights leaves none (the earlier config, of another rank, would describe them)."""
    import safetensors.torch

    from w2s.lora import save_adapter

    adapter = read_adapter(trained[0])
    save_adapter(tmp_path / "a", adapter)
    assert (tmp_path / "a" / "adapter_config.json").is_file()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(tmp_path / "a", adapter)
    assert not (tmp_path / "a" / "adapter_config.json").exists()


def test_tensor_parallel_ranks_merge_their_slices(base, trained):
    """adapter_for_rank: a rank's slice of the merged weight equals the merge of its slices of W, A and B."""
    from w2s.tensor_parallel import adapter_for_rank, shard_slice

    out, _ = trained
    adapter, model = read_adapter(out), w2s.load_model(base, dtype=torch.float32)
    for rank in range(2):
        model.tp_size, model.tp_rank = 2, rank
        mine = adapter_for_rank(adapter, model)
        for name, (a, b) in adapter.tensors.items():
            w = model.get_submodule(name).weight
            dim, start, length = shard_slice(name + ".weight", model.cfg, rank, 2)
            full = merged_weight(w, a, b, adapter.scale).narrow(dim, start, length)
            torch.testing.assert_close(merged_weight(w.narrow(dim, start, length), *mine.tensors[name],
                                                     adapter.scale), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("change, says", [
    ("[1]", "adapter_config.json: expected a JSON object, got list"),
    ({"peft_type": "IA3"}, "adapter_config.json: expected a PEFT LoRA adapter (peft_type 'LORA' and an integer "
                           "r >= 1), got peft_type 'IA3', r 4"),
    ({"r": True}, "adapter_config.json: expected a PEFT LoRA adapter"),
    ({"use_dora": True}, "adapter_config.json: use_dora = True is not supported (expected False: plain LoRA"),
    ({"lora_alpha": "eight"}, "adapter_config.json: lora_alpha = 'eight': expected a number"),
    ({"base_model_name_or_path": ""}, "adapter_config.json: base_model_name_or_path is empty"),
    ({"base_model_name_or_path": "nowhere"}, "adapter_config.json: base_model_name_or_path 'nowhere' is not a "
                                             "directory here"),
    ("no weights", "adapter_model.safetensors: missing (an adapter directory needs adapter_model.safetensors"),
    ("a foreign tensor", "adapter_model.safetensors: unexpected tensor 'base_model.model.model.layers.0.mlp.fc."
                         "lora_A.weight'"),
    ("another rank", "adapter_model.safetensors: layers.0.self_attn.q_proj needs lora_A (r, in) and lora_B (out, r) "
                     "with r = 4, got [3, 64] and"),
])
def test_an_adapter_w2s_cannot_apply_is_one_line_naming_its_file(trained, tmp_path, change, says):
    """Every way an adapter directory can be unreadable ends the load in one error naming the file and what was
    expected, before any tensor is applied."""
    import shutil

    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(trained[0], adapter)
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if isinstance(change, dict):
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    elif change == "[1]":
        config.write_text(change)
    elif change == "no weights":
        weights.unlink()
    else:
        tensors = load_file(weights)
        key = f"{PEFT_PREFIX}layers.0.self_attn.q_proj.lora_A.weight"
        if change == "a foreign tensor":
            tensors[f"{PEFT_PREFIX}layers.0.mlp.fc.lora_A.weight"] = tensors[key].clone()
        else:
            tensors[key] = tensors[key][:3].contiguous()
        save_file(tensors, weights)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        w2s.load_model(adapter, dtype=torch.float32)
    assert str(error.value).startswith(str(adapter / says.split(":")[0]) + ":"), error.value
    assert says in str(error.value) and "\n" not in str(error.value), error.value


@pytest.mark.parametrize("layers, says", [(1, "tensors for 7 layers the base"),
                                          (3, "no tensors for 7 of the base's layers its target_modules name")])
def test_an_adapter_pointing_at_another_base_is_named_by_inspect_and_refused_from_headers(base, trained, tmp_path,
                                                                                        layers, says):
    import shutil

    from click.testing import CliRunner

    from w2s.checkpoint import validate_checkpoint
    from w2s.cli import main

    other, adapter = tmp_path / "other_base", tmp_path / "adapter"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    shutil.copytree(trained[0], adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(other)}))
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: {says}"):
        validate_checkpoint(adapter)
    out = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert out.exit_code == 1 and says in out.output, out.output
    validate_checkpoint(trained[0], tokenizer=False)  # its own base: fine (the tiny base has no tokenizer)
    on_adapter = tmp_path / "on_adapter"  # an adapter trained from an adapter: its base's config is two steps down
    shutil.copytree(trained[0], on_adapter)
    (on_adapter / "adapter_config.json").write_text(json.dumps({**adapter_config,
                                                                "base_model_name_or_path": str(trained[0])}))
    validate_checkpoint(on_adapter, tokenizer=False)
    out = CliRunner().invoke(main, ["inspect", str(on_adapter)])  # both adapters, then the base two steps down
    assert out.exit_code == 0 and out.output.count("LoRA rank") == 2 and "\nfamily " in out.output, out.output
    from safetensors import safe_open

    with safe_open(str(on_adapter / "adapter_model.safetensors"), "pt") as f:  # every A and every B
        n_lora = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    assert f"adapter parameters  {n_lora:,} " in out.output
    (on_adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "."}))
    itself = f"{on_adapter.resolve()} -> {on_adapter.resolve()}"
    with pytest.raises(ValueError, match=rf"adapter_config\.json: base_model_name_or_path '\.' leads back to "
                                         rf"{on_adapter.resolve()} \({itself}\); point it at the base checkpoint$"):
        validate_checkpoint(on_adapter)
    twin = tmp_path / "twin"  # two adapters pointing at each other: every reader would follow them forever
    shutil.copytree(trained[0], twin)
    for one, other in [(on_adapter, twin), (twin, on_adapter)]:
        (one / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(other)}))
    a, b = on_adapter.resolve(), twin.resolve()
    cycle = f"leads back to {a} ({a} -> {b} -> {a}); point it at the base checkpoint"
    with pytest.raises(ValueError, match=rf"on_adapter/adapter_config\.json: base_model_name_or_path .* "
                                         rf"{re.escape(cycle)}$"):
        validate_checkpoint(on_adapter)
    out = CliRunner().invoke(main, ["inspect", str(on_adapter)])
    assert out.exit_code == 1 and cycle in out.output, out.output


def test_a_fractional_alpha_the_adapters_own_targets_and_its_dropout_are_saved_as_peft_reads_them(trained, tmp_path):
    """save_adapter writes lora_alpha 12.5 (not truncated: the scale is alpha / r), target_modules of the layers it
    holds tensors for, and lora_dropout; PEFT's LoraConfig and read_adapter read them back."""
    from peft import LoraConfig

    from w2s.lora import Adapter, save_adapter

    full = read_adapter(trained[0])
    kept = {n: t for n, t in full.tensors.items() if n.endswith(("q_proj", "v_proj"))}
    save_adapter(tmp_path, Adapter(rank=4, alpha=12.5, base=full.base, tensors=kept, dropout=0.1,
                                   targets=("q_proj", "v_proj")))
    peft_config = LoraConfig.from_pretrained(str(tmp_path))
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (4, 12.5, 0.1)
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}
    back = read_adapter(tmp_path)
    assert (back.alpha, back.scale, back.dropout, back.targets) == (12.5, 12.5 / 4, 0.1, ("q_proj", "v_proj"))


def test_peft_defaults_and_a_peft_state_dicts_tensor_names_read_as_peft_reads_them(base, tmp_path):
    """An adapter_config.json without lora_alpha has PEFT's default (LoraConfig().lora_alpha); tensors saved from a
    PeftModel's state_dict carry the adapter's name (`.lora_A.default.weight`) and are the same tensors."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"],
                                               init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(IDS).logits
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    named = {k: v.contiguous() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    assert all(".default.weight" in k for k in named)
    save_file(named, tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(logits(w2s.load_model(tmp_path, dtype=torch.float32)), expected, atol=2e-5, rtol=1e-5)
    del config["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert read_adapter(tmp_path, tensors=False).alpha == LoraConfig().lora_alpha


@pytest.mark.parametrize("change, says", [
    ({"use_rslora": True}, "use_rslora = True is not supported"),  # scale alpha / sqrt(r): other weights
    ({"r": 0}, "expected a PEFT LoRA adapter (peft_type 'LORA' and an integer r >= 1), got peft_type 'LORA', r 0"),
])
def test_rslora_and_a_zero_rank_are_refused_in_one_line(trained, tmp_path, change, says):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained[0], adapter)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ValueError) as error:
        w2s.load_model(adapter, dtype=torch.float32)
    assert str(error.value).startswith(f"{config}: ") and says in str(error.value), error.value
    assert "\n" not in str(error.value)


def test_an_adapter_without_tokenizer_files_reads_its_bases_tokenizer_and_identity(base, trained, tmp_path):
    """An adapter directory is named by where it is (absolute), tokenized with its base's tokenizer when it has none
    of its own, and identified with its base too: a changed base changes the adapter's fingerprint."""
    import shutil

    from w2s.checkpoint import fingerprint, tokenizer_dir

    out, _ = trained
    assert not (out / "tokenizer.json").exists() and not (base / "tokenizer.json").exists()
    assert tokenizer_dir(out) == base
    with_tokenizer = tmp_path / "with_tokenizer"
    shutil.copytree(out, with_tokenizer)
    (with_tokenizer / "tokenizer.json").write_text("{}")
    assert tokenizer_dir(with_tokenizer) == with_tokenizer
    assert fingerprint(out)["base"] == fingerprint(base) and fingerprint(base)["base"] is None


def test_an_adapter_is_loaded_with_its_absolute_directory_as_name_or_path(trained, monkeypatch):
    out, _ = trained
    monkeypatch.chdir(out.parent)
    assert w2s.load_model(out.name, dtype=torch.float32).name_or_path == str(out.resolve())


def test_validating_an_adapter_validates_its_base_too(base, trained, tmp_path):
    """The adapter fits its base, but the base's shard is truncated: loading would fail, so validation does."""
    import os
    import shutil

    from w2s.checkpoint import validate_checkpoint

    broken, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base, broken)
    shard = broken / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    shutil.copytree(trained[0], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(broken)}))
    with pytest.raises(ValueError, match=rf"^{shard}: tensor .* \(truncated"):
        validate_checkpoint(adapter, tokenizer=False)


def test_a_full_model_saved_over_an_adapter_loads_as_itself(base, trained, tmp_path):
    """save_model into an adapter's directory removes the adapter: left beside the weights, it would win on load."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    model = w2s.load_model(base, dtype=torch.float32)
    w2s.save_model(model, out)
    assert read_adapter(out) is None and not (out / "adapter_model.safetensors").exists()
    assert torch.equal(logits(w2s.load_model(out, dtype=torch.float32)), logits(model))


def _small_tokenizer(path):
    """A word-level tokenizer whose ids fit the tiny base's 128 embeddings (the export copies it beside the weights)."""
    from tokenizers import Tokenizer, models

    path.mkdir(parents=True)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(16)}, unk_token="t0")).save(str(path / "tokenizer.json"))
    return w2s.load_tokenizer(path)


def _stored_dtypes(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_full_run_that_returns_no_model_still_exports_it_in_the_input_dtype(base, tmp_path):
    """return_model=False frees the gathered weights after the export, not before it: out_dir gets the model in the
    dtype it was loaded in (bf16 here, trained in fp32 master weights) with the tokenizer."""
    import transformers

    out = tmp_path / "model"
    model = w2s.load_model(base, dtype=torch.bfloat16)
    assert train_sft(model, _small_tokenizer(tmp_path / "tok"), rows(), cfg(lora_rank=None, max_steps=1),
                     out_dir=out, return_model=False) is None
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert _stored_dtypes(out / "model.safetensors") == {"BF16"}
    assert (out / "tokenizer.json").is_file()


def test_a_lora_run_that_returns_no_model_saves_every_adapter_tensor_in_fp32(base, tmp_path):
    """return_model=False: the adapter (A and B of every layer, the fp32 values trained, not rounded to the bf16 the
    base was loaded in), its dropout and the tokenizer are written; nothing is returned."""
    out = tmp_path / "model"
    model = w2s.load_model(base, dtype=torch.bfloat16)
    assert train_sft(model, _small_tokenizer(tmp_path / "tok"), rows(), cfg(max_steps=1, lora_dropout=0.25),
                     out_dir=out, return_model=False) is None
    assert _stored_dtypes(out / "adapter_model.safetensors") == {"F32"}
    adapter = read_adapter(out)
    assert len(adapter.tensors) == len(TARGETS) * 2 and adapter.dropout == 0.25  # hf_tiny's llama2: 2 blocks
    a, b = adapter.tensors[f"layers.0.self_attn.{TARGETS[0]}"]
    assert not torch.equal(a, a.bfloat16().float()) and not torch.equal(b, b.bfloat16().float())
    assert (out / "tokenizer.json").is_file()


def test_a_merged_export_without_a_returned_model_writes_the_merged_copy(base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    assert train_sft(w2s.load_model(base, dtype=torch.float32), _small_tokenizer(tmp_path / "tok"), rows(),
                     cfg(export_merged=True, max_steps=1), out_dir=out, return_model=False) is None
    assert (out / "merged" / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(w2s.load_model(out, dtype=torch.float32)), atol=1e-5,
                                   rtol=1e-5)


def test_return_model_base_gives_the_untouched_base_weights(base, tmp_path):
    """return_model="base" (the pipeline keeps the base resident and applies the saved adapter itself): the returned
    weights are exactly those loaded (bf16 here), not merged with the adapter, also when a merged copy is written."""
    loaded = w2s.load_model(base, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    returned = train_sft(loaded, None, rows(), cfg(max_steps=1, export_merged=True), out_dir=tmp_path / "model",
                         return_model="base")
    assert (tmp_path / "model" / "merged" / "config.json").is_file()
    state = returned.state_dict()
    assert state.keys() == before.keys() and {v.dtype for v in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("lora_rank", [4, None])
def test_a_run_without_out_dir_returns_the_trained_model(base, lora_rank):
    """Nothing to write (export_merged names no directory without out_dir): the merged model comes back."""
    options = cfg(lora_rank=lora_rank, max_steps=1, export_merged=lora_rank is not None)
    model = train_sft(w2s.load_model(base, dtype=torch.float32), None, rows(), options)
    assert isinstance(model, w2s.Transformer) and not any(".lora_" in k for k in model.state_dict())
