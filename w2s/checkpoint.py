"""Hugging Face checkpoint I/O: safetensors in (single or sharded), HF-format directories out.

Loading builds the model on the meta device (no memory), then reads each tensor from disk straight into its final
dtype/device buffer and assigns it (`load_state_dict(assign=True)`): there is never a second copy of the model,
so peak host memory stays near one checkpoint plus one tensor. The safetensors format is simple enough to read by
hand: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw bytes.

Saving writes config.json, generation_config.json, model.safetensors (or, past max_shard_bytes, 5 GiB by default,
model-0000k-of-0000n.safetensors + model.safetensors.index.json) and the tokenizer files, which transformers'
from_pretrained and vLLM load unchanged.

A directory holding a LoRA adapter (w2s/lora.py: adapter_config.json + adapter_model.safetensors, the PEFT layout)
loads as its base checkpoint (base_model_name_or_path) with the adapter merged; load_for_training keeps the adapter
as live LoRA layers instead, so training can continue it.

`checkpoint_problems` / `validate_checkpoint` find, from config.json, the tokenizer and the safetensors headers alone,
every problem loading would hit (unsupported architecture, no or too large a tokenizer, a shard the index lists
but that is missing, a tensor whose bytes run past the end of its file, a missing tensor or a wrong shape, a stored
weight the config does not imply): a pipeline checks its checkpoints before its first stage, not an hour into it.

    python -m pytest -q tests/test_model.py tests/test_realrun.py tests/test_adapters.py
"""

import contextlib
import dataclasses
import json
import math
import struct
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from w2s.config import ModelConfig
from w2s.files import read_json, with_usual_permissions, write_atomic
from w2s.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_base_dir,
    attach_adapter,
    check_fits,
    inject_lora,
    lora_layers,
    lora_scale,
    merge_adapter,
    merge_lora_state_dict,
    read_adapter,
)
from w2s.model import Transformer
from w2s.parallel import rank
from w2s.tokenizer import load_tokenizer, tokenizer_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_safetensors_header(path):
    """(header dict, byte offset where tensor data starts) of one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (bad JSON header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_files(path):
    """{tensor name: shard file} for a checkpoint directory, single-file or sharded. model.safetensors wins over an
    index, as in transformers: save_pretrained re-saving a sharded directory as one file leaves the old index."""
    path = Path(path)
    index, single = path / INDEX_FILE, path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in read_safetensors_header(single)[0]}
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ValueError(f"{index}: not a safetensors index (expected a 'weight_map' of tensor name -> shard file)")
        shards = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(shards.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {index} is missing")
        return shards
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:  # a lone shard under another name
        return {name: path / found[0] for name in read_safetensors_header(path / found[0])[0]}
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found {found or 'no .safetensors files'})")


def read_tensor(file, info, data_start, dtype, device):
    """Read one tensor's bytes into a fresh buffer; convert dtype/device explicitly (never silently)."""
    src_dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if src_dtype is None:
        raise ValueError(f"{file}: unsupported safetensors dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(data_start + begin)
        if f.readinto(buf.numpy()) != end - begin:
            raise ValueError(f"{file}: truncated tensor data")
    t = buf.view(src_dtype).reshape(info["shape"])
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def load_state_dict(path, expected: dict, dtype=None, device="cpu", cfg=None):
    """Read every tensor `expected` names (HF name -> meta tensor with the expected shape) from a checkpoint dir;
    given the model's `cfg`, `expected` is the whole model and a stored weight outside it is refused too."""
    files = checkpoint_files(path)
    missing = [n for n in expected if n not in files]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. {missing[0]!r}")
    if cfg is not None and (problem := unimplied_tensors_problem(path, files, expected, cfg)):
        raise ValueError(problem)
    headers = {f: read_safetensors_header(f) for f in set(files.values())}
    state = {}
    for name, meta in expected.items():
        file = files[name]
        header, data_start = headers[file]
        info = header.get(name)
        if info is None:  # the index names a shard that does not hold the tensor
            raise ValueError(f"{file}: no tensor {name!r}, which config.json implies")
        if list(info["shape"]) != list(meta.shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {info['shape']}, expected {list(meta.shape)} "
                             f"from config.json")
        state[name] = read_tensor(file, info, data_start, dtype, device)
    return state


def checkpoint_config(path):
    """The ModelConfig a checkpoint loads with: config.json's, except that a tied config whose checkpoint also stores
    an lm_head.weight unlike its embedding table is untied, as transformers (5.x) loads it: the stored output
    matrix is used, with a warning. Only that case reads tensors (those two); the usual tied checkpoint stores no
    lm_head.weight, or a copy of the embeddings."""
    cfg = ModelConfig.from_pretrained(path)
    try:
        if not cfg.tie_embeddings or "lm_head.weight" not in checkpoint_files(path):
            return cfg
    except FileNotFoundError:  # no weights: loading them says so (a structure-only load needs none)
        return cfg
    with torch.device("meta"):
        shape = torch.empty(cfg.vocab_size, cfg.dim)
    stored = load_state_dict(path, {"lm_head.weight": shape, "model.embed_tokens.weight": shape})
    if torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"]):
        return cfg
    warnings.warn(f"{path}: config.json ties the output matrix to the embeddings, but the checkpoint stores a "
                  f"different lm_head.weight: loading it untied, as transformers does (set tie_word_embeddings to "
                  f"false in config.json to silence this)", stacklevel=2)
    return dataclasses.replace(cfg, tie_embeddings=False)


def hf_name(name):
    """Our parameter name -> the checkpoint's (Llama-style HF checkpoints prefix the body with 'model.')."""
    return name if name.startswith("lm_head.") else "model." + name


def load_model(path, dtype=torch.bfloat16, device="cpu"):
    """Load an HF checkpoint directory (config.json + safetensors) of a supported family as a w2s Transformer.

    device="meta" reads only config.json (and, in checkpoint_config's one exception, two tensors): the model's
    structure without weights (FSDP ranks > 0, which get their shards from rank 0 when training shards the model;
    see load_for_training). An adapter directory loads its base with the adapter merged. `model.name_or_path`
    records the directory (as transformers does): a LoRA adapter trained from the model points back at it.
    """
    adapter = read_adapter(path)
    if adapter is not None:
        model = load_model(adapter_base_dir(path, adapter), dtype=dtype, device=device)
        if torch.device(device).type != "meta":
            merge_adapter(model, adapter)
        model.name_or_path = str(Path(path).resolve())
        return model
    model = _load_plain(path, dtype, device)
    model.name_or_path = str(Path(path).resolve())
    return model


def unimplied_tensors_problem(path, stored_names, expected_names, cfg):
    """One line naming the stored tensors config.json does not call for (None when there are none): loading would
    drop them without a word, as a bias under a config without attention_bias, or another architecture's weights.
    Not weights to lose: the rotary frequencies older transformers saved as buffers, and a tied checkpoint's copy of
    its embeddings as lm_head.weight (checkpoint_config unties the model when the copy differs)."""
    extra = sorted(n for n in stored_names if n not in expected_names and not n.endswith("rotary_emb.inv_freq")
                   and not (n == "lm_head.weight" and cfg.tie_embeddings))
    if extra:
        return (f"{path}: checkpoint holds {len(extra)} tensor(s) config.json does not imply, e.g. {extra[0]!r} "
                f"(a key missing from config.json, such as attention_bias or mlp_bias, or another architecture?)")
    return None


def _load_plain(path, dtype, device):
    cfg = checkpoint_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        return model.to(dtype).eval()
    check_tokenizer_fits(path, cfg)  # before the weights: a mismatch is known from the small files alone
    check_shard_sizes(path)  # so is a truncated shard, from the headers, instead of after reading the tensors before it
    expected = {hf_name(n): p for n, p in model.state_dict().items()}
    state = load_state_dict(path, expected, dtype=dtype, device=device, cfg=cfg)
    model.load_state_dict({n: state[hf_name(n)] for n in model.state_dict()}, assign=True)
    model.reset_buffers(torch.device(device))
    return model.eval()


def load_for_training(path, dtype=torch.float32):
    """Load a checkpoint to train under FSDP2 without every rank reading all of it.

    Rank 0 (or a plain single process) reads the weights into host memory; under torchrun every other rank builds the
    model on the meta device (no memory, no disk) and receives its shards from rank 0 when the training loop shards
    the model (w2s.parallel.fill_from_rank0). A 70B checkpoint is then read once (~140 GB of host memory in bf16)
    instead of once per rank (8 x 140 GB). Only for w2s.train: the meta ranks' model is unusable until the loop has
    filled it.

    An adapter directory gives its base with the adapter as live LoRA layers (rank 0 loads A and B): a LoRA run
    continues that adapter, a full fine-tune merges it first (w2s/lora.py prepare_lora).
    """
    device = "cpu" if rank() == 0 else "meta"
    adapter = read_adapter(path)
    if adapter is None:
        return load_model(path, dtype=dtype, device=device)
    model = load_model(adapter_base_dir(path, adapter), dtype=dtype, device=device)
    return attach_adapter(model, adapter, load_tensors=device != "meta")


def model_config(path):
    """The config.json of the model in `path`, read without the weights: `path`'s, or for a LoRA adapter its base's
    (an adapter's base may be an adapter too: the chain is followed, as load_model follows it)."""
    adapter = read_adapter(path, tensors=False)
    return model_config(adapter_base_dir(path, adapter)) if adapter is not None else ModelConfig.from_pretrained(path)


def tokenizer_dir(path):
    """Where the tokenizer of the checkpoint in `path` lives: `path`, or for an adapter without tokenizer files of its
    own, its base's."""
    path = Path(path)
    if tokenizer_file(path) is not None:
        return path
    adapter = read_adapter(path, tensors=False)
    return tokenizer_dir(adapter_base_dir(path, adapter)) if adapter is not None else path


def identity_files(path):
    """[(name, size, mtime)] of a checkpoint directory's weight, config and tokenizer files: what identifies it
    without reading 140 GB. Not the records of an evaluation or a sampling run written into it (OUT.jsonl.meta.json,
    OUT.jsonl.result.json: scripts/evaluate.py's default output), which would change it under their own resume."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")) + sorted(path.glob("tokenizer.model"))
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files
            if not f.name.endswith((".jsonl.meta.json", ".jsonl.result.json"))]


def fingerprint(path):
    """Identity of a checkpoint directory without reading its weights (identity_files), and for an adapter its base's
    fingerprint too (a copied or rewritten file changes it)."""
    path = Path(path)
    found = [list(entry) for entry in identity_files(path)]
    adapter = read_adapter(path, tensors=False)
    return {"files": found, "base": fingerprint(adapter_base_dir(path, adapter)) if adapter is not None else None}


def check_tokenizer_fits(path, cfg):
    """A tokenizer that can emit ids past the embedding table would index out of range later: refuse it now."""
    path = Path(path)
    if tokenizer_file(path) is None:
        return
    tok = load_tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok.vocab_size} tokens but config.json vocab_size is "
                         f"{cfg.vocab_size} (the embedding table must cover every token id)")


def checkpoint_problems(path, tokenizer=True):
    """Every problem loading the checkpoint in `path` would hit, one line each, from config.json, the tokenizer and
    the safetensors headers only (no tensor data is read: instant for 70B); [] when it loads. tokenizer=False skips
    the tokenizer (a checkpoint sampled from token ids)."""
    path = Path(path)
    try:
        cfg = ModelConfig.from_pretrained(path)  # a supported architecture and a readable config
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems = []
    if tokenizer and tokenizer_file(path) is None:
        problems.append(f"{path}: no tokenizer.json or tokenizer.model (expected the model's tokenizer beside its "
                        f"config.json)")
    elif tokenizer:
        try:
            check_tokenizer_fits(path, cfg)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    try:
        files = checkpoint_files(path)
    except (FileNotFoundError, ValueError) as e:
        return problems + [str(e)]
    headers, shard_problems = _read_shard_headers(files)
    problems += shard_problems
    with torch.device("meta"):
        expected = {hf_name(n): list(p.shape) for n, p in Transformer(cfg).state_dict().items()}
    for name, shape in expected.items():
        header = headers.get(files.get(name), {})
        if name not in files or (files[name] in headers and name not in header):
            problems.append(f"{files.get(name, path)}: no tensor {name!r}, which config.json implies")
        elif name in header and list(header[name]["shape"]) != shape:
            problems.append(f"{files[name]}: tensor {name!r} has shape {header[name]['shape']}, expected {shape} "
                            f"from config.json")
    if problem := unimplied_tensors_problem(path, files, expected, cfg):
        problems.append(problem)
    return problems


def _byte_range_problems(file, header, data_start):
    """Tensors of one safetensors file (its header, where its data starts) whose dtype is unknown, whose byte count
    does not match their shape, or whose bytes lie past the end of the file (a truncated copy)."""
    size, problems = file.stat().st_size, []
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype is None:
            problems.append(f"{file}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            continue
        need = math.prod(info.get("shape", ())) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != need:
            problems.append(f"{file}: tensor {name!r} spans {end - begin} bytes, expected {need} for shape "
                            f"{info.get('shape')} in {info['dtype']}")
        elif data_start + end > size:
            problems.append(f"{file}: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes "
                            f"(truncated: copy the shard again)")
    return problems


def _read_shard_headers(files):
    """({shard: its header}, problems): each shard's header read, and what is wrong with a shard itself (an
    unreadable header, a tensor whose bytes lie past the end of the file, ...)."""
    headers, problems = {}, []
    for file in sorted(set(files.values())):
        try:
            headers[file], data_start = read_safetensors_header(file)
        except ValueError as e:
            problems.append(str(e))
            continue
        problems += _byte_range_problems(file, headers[file], data_start)
    return headers, problems


def check_shard_sizes(path):
    """One ValueError line for the first shard whose header is unreadable or whose tensors lie past its end."""
    problems = _read_shard_headers(checkpoint_files(path))[1]
    if problems:
        raise ValueError(problems[0])


def adapter_problems(path, adapter):
    """Every problem applying the adapter read from `path` to its base, one line each, from the adapter's tensors
    and the base's config.json alone (a meta-device model): a tensor for a layer the base lacks or of another shape,
    a layer of the base its target_modules name that it holds nothing for."""
    base = adapter_base_dir(path, adapter)
    cfg = model_config(base)
    with torch.device("meta"):
        model = Transformer(cfg)
    inject_lora(model, adapter.rank, adapter.alpha, targets=adapter.targets)
    layers, where = lora_layers(model), Path(path) / ADAPTER_WEIGHTS
    problems = []
    if extra := sorted(set(adapter.tensors) - set(layers)):
        problems.append(f"{where}: tensors for {len(extra)} layers the base {base} ({cfg.n_layers} blocks) lacks, e.g. "
                        f"{extra[0]}: another base model?")
    if missing := sorted(set(layers) - set(adapter.tensors)):
        problems.append(f"{where}: no tensors for {len(missing)} of the base's layers its target_modules name, e.g. "
                        f"{missing[0]}: another base model?")
    for name in sorted(set(layers) & set(adapter.tensors)):
        try:
            check_fits(name, layers[name], *adapter.tensors[name])
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return problems


def validate_checkpoint(path, tokenizer=True):
    """Raise one ValueError line (the first problem, and how many more) when checkpoint_problems finds any.
    An adapter directory is checked as its adapter (readable, complete, shaped for its base) and its base."""
    adapter = read_adapter(path)
    if adapter is not None:
        problems = adapter_problems(path, adapter)
        if not problems:
            return validate_checkpoint(adapter_base_dir(path, adapter), tokenizer)
    else:
        problems = checkpoint_problems(path, tokenizer)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): w2s inspect {path})" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


@contextlib.contextmanager
def naming_path(path):
    """A disk-full or I/O error raised while writing `path` names it (write() and fsync() errors carry no file
    name, and safetensors' own error type is not an OSError)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"{e.strerror or e} (writing {path})", str(path)) from e
    except SafetensorError as e:
        raise OSError(f"{path}: writing failed ({e})") from e


DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def save_model(model, path, tokenizer=None, dtype=None, max_shard_bytes=5 * 2**30, state_dict=None):
    """Write an HF-format directory that transformers and vLLM load unchanged.

    `state_dict` overrides model.state_dict() (FSDP or LoRA callers pass a gathered / merged full state dict). LoRA
    layers still in the model (or its state dict) are merged into the weights written: transformers and vLLM would
    ignore them. generation_config.json keeps the loaded checkpoint's (stop ids, default sampling). Shards are
    written first and the index + config last, so a directory with a config.json is complete.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = state_dict if state_dict is not None else model.state_dict()
    if any(name.endswith(".lora_A") for name in state):
        state = merge_lora_state_dict(state, lora_scale(model))
    tensors = {}
    for name, t in state.items():
        t = t.detach()
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        tensors[hf_name(name)] = t.to("cpu").contiguous()
    # Greedy sharding by bytes, in name order, as HF does.
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name], size + nbytes
    shards.append(current)
    # A stale shard from an earlier save would shadow the new ones and an adapter would win over them; an earlier
    # config.json goes first, so that the directory reads as incomplete until this save writes its own.
    stale = [path / "config.json", *path.glob("model*.safetensors"), path / INDEX_FILE, path / ADAPTER_CONFIG,
             path / ADAPTER_WEIGHTS]
    for old in stale:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        with naming_path(path / SINGLE_FILE):
            save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        with_usual_permissions(path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with naming_path(path / fname):
                save_file(shard, str(path / fname), metadata={"format": "pt"})
            with_usual_permissions(path / fname)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(path / INDEX_FILE, json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    gen = cfg.generation_config or {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                                      ("eos_token_id", cfg.eos_token_id),
                                                      ("pad_token_id", cfg.pad_token_id)) if v is not None}
    write_atomic(path / "generation_config.json", json.dumps(gen, indent=2))
    hf = cfg.to_hf()
    first = next(iter(tensors.values()))
    hf["torch_dtype"] = DTYPE_NAMES.get(first.dtype, "float32")
    hf.pop("dtype", None)
    write_atomic(path / "config.json", json.dumps(hf, indent=2))
    return path
