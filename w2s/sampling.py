"""The sampler: batched generation with a static KV cache, continuous batching and shared prefixes.

    outs = generate(model, tok, ["Q: 1+1?\\nA:", ...], n=4, temperature=1.0, top_p=0.95, stop=["\\n\\n"])
    outs[i][j] == {"text": str, "token_ids": [int], "num_tokens": int, "finish_reason": "eos" | "stop" | "length"}

    Streamed to a resumable jsonl file instead: w2s/sampling_jsonl.py (generate_to_jsonl, `w2s sample`).

This file is the way in: it encodes and checks the prompts, sizes the cache, splits the work over data-parallel
ranks and gathers the results. The engine that runs them (slots, prefill, decode steps, chunked prefill, CUDA
graphs, counter-based randomness, and the conventions of `token_ids`, `text` and `finish_reason`) is
w2s/sampling_engine.py.

Data parallel (torchrun, or any initialised process group): each data-parallel rank takes a strided shard of the
prompts (`generate_shard`); `generate` gathers results in input order on every rank. Tensor parallel models
(w2s/tensor_parallel.py) are used unchanged: ranks of one tensor-parallel group run the same prompts in lockstep
(they see identical all-reduced logits, so they make identical host decisions). Every rank encodes and checks ALL
prompts before the split, so bad input fails on every rank alike and all ranks size their caches the same.

    python -m pytest -q tests/test_sampling.py tests/test_sampling_dist.py   # the second: torchrun, tp=2 and dp=2
    python scripts/bench_sampling.py                                         # tokens/s, vs transformers on CPU
"""

import math
import time
import warnings

from w2s.data import is_token_id
from w2s.fused import fuse_projections
from w2s.parallel import check_joined, is_main
from w2s.sampling_engine import Engine, check_prompt_reads, round_up
from w2s.tokenizer import Tokenizer

MAX_NEW_TOKENS = 256  # the default completion budget of every entry point
CACHE_LEN_QUANTUM = 256  # default cache lengths round up to this when the decode state is kept across calls


# ------------------------------------------------------------------------------------------------ public API


def dp_layout(model):
    """(data-parallel rank, data-parallel size, is_writer) from the process group and the model's tensor parallel."""
    import torch.distributed as dist

    check_joined("sampling")
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, True
    tp = getattr(model, "tp_size", 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % tp:
        raise ValueError(f"world size {world} is not a multiple of the tensor-parallel size {tp}")
    return rank // tp, world // tp, rank % tp == 0


def _eos_ids(model, tokenizer):
    if tokenizer is not None:
        ids = getattr(tokenizer, "stop_ids", None) or {tokenizer.eos_id}
        return {i for i in ids if i is not None}
    # no tokenizer: config.json's eos ids and generation_config.json's (Llama-3-Instruct's <|eot_id|> is only there),
    # as transformers' generate stops at the generation config's
    ids = set()
    for eos in (model.cfg.eos_token_id, model.cfg.generation_config.get("eos_token_id")):
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def encode_prompts(tokenizer, prompts, vocab_size=None, names=None):
    """Token-id lists of the prompts (strings need a tokenizer; id lists pass through, each id a whole number in
    [0, vocab_size): one outside would index past the embedding table). names[i] is how an error calls prompt i."""
    strings = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    if strings and tokenizer is None:
        raise ValueError(f"prompt {strings[0]} is a string but no tokenizer was given (pass token-id lists instead)")
    encoded = {}
    if strings:
        texts = [prompts[i] for i in strings]
        batch = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, texts)
        encoded = dict(zip(strings, batch))
    out = []
    for i, p in enumerate(prompts):
        ids = encoded[i] if i in encoded else p
        name = f"prompt {i}" if names is None else names[i]
        if not isinstance(ids, (list, tuple)) or not ids or not all(map(is_token_id, ids)):
            raise ValueError(f"{name}: expected a non-empty string or list of token ids (whole numbers >= 0), got "
                             f"{type(p).__name__}")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"{name}: token id {max(ids)} is outside the model's vocabulary (ids 0 to "
                             f"{vocab_size - 1})")
        out.append(list(ids))
    return out



def check_distribution(temperature, top_p, top_k):
    """A clear ValueError for a sampling distribution that cannot be drawn from (checked by every generate call, and
    before any work by `w2s sample`, evaluate.py and the recipe's sampling stages)."""
    if not 0 <= temperature < math.inf:  # "not": NaN fails too
        raise ValueError(f"temperature={temperature}: expected a finite number >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: expected >= 0")


def _check_options(tokenizer, n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS, stop=(),
                   prefill_chunk=0, sync_every=8, max_batch=256, share_prompt_reads=False, prompt_cascade=False, **_):
    """Normalized stop strings; a clear ValueError for impossible options (the other options pass through)."""
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(s for s in stop if s)
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text (pass tokenizer=...)")
    counts = {"n": n, "max_new_tokens": max_new_tokens, "top_k": top_k, "prefill_chunk": prefill_chunk,
              "sync_every": sync_every, "max_batch": max_batch}
    if not_ints := [f"{k}={v!r}" for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool)]:
        raise ValueError(f"{', '.join(not_ints)}: expected whole numbers")
    if min(n, max_new_tokens, sync_every, max_batch) < 1:
        raise ValueError(f"n={n}, max_new_tokens={max_new_tokens}, sync_every={sync_every} and max_batch={max_batch} "
                         f"must all be >= 1")
    check_distribution(temperature, top_p, top_k)
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 0 (prompt tokens per decode step; 0 is off)")
    check_prompt_reads(share_prompt_reads, prompt_cascade)
    return stop


def _cache_len_for(ids, max_new_tokens, cache_len, names=None, quantum=1, trained=None):
    """The KV positions per slot (default: longest prompt + max_new_tokens, rounded up to a multiple of `quantum`
    but not past `trained` positions); a prompt that does not fit is an error.

    Computed over ALL prompts before any data-parallel split, so every rank uses the same cache (same shapes, same
    numerics) and a bad prompt fails on every rank alike instead of hanging the others at a collective."""
    if not ids:
        return cache_len or 1
    if not cache_len:
        cache_len = needed = max(len(p) for p in ids) + max_new_tokens
        cache_len = max(needed, min(round_up(needed, quantum), trained or float("inf")))
    for i, p in enumerate(ids):
        if len(p) >= cache_len:
            name = f"prompt {i}" if names is None else names[i]
            raise ValueError(f"{name} has {len(p)} tokens but the KV cache holds {cache_len} positions "
                             f"(raise cache_len or shorten the prompt)")
    return cache_len


def check_prompts(tokenizer, prompts, names, vocab_size, max_new_tokens, cache_len=None):
    """What the sampler would refuse in these prompts, refused before a model is loaded: a string without a
    tokenizer, a token id past vocab_size, a prompt as long as an explicit cache_len or longer (no position left for
    a new token). names[i] names prompt i (file:line)."""
    _cache_len_for(encode_prompts(tokenizer, prompts, vocab_size, names=names), max_new_tokens, cache_len, names=names)


def _use_cuda_graphs(model, cuda_graphs):
    """cuda_graphs resolved: None means on for a CUDA model; True on another device is an error."""
    device = model.embed_tokens.weight.device
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA model (this one is on {device})")
    return device.type == "cuda" if cuda_graphs is None else cuda_graphs


def make_engine(model, tokenizer, prompts, n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                stop=(), seed=0, max_batch=256, cache_len=None, shared_prefix=True, sync_every=8, cuda_graphs=None,
                keep_state=None, fused_projections=None, prefill_chunk=0, prompt_indices=None,
                share_prompt_reads=False, compact=True, prompt_cascade=False):
    """The Engine that `iter_generate` runs (None without prompts); arguments as `generate`. Callers that want the
    engine's counters (decode_steps, tokens_generated) drive `engine.run()` themselves."""
    stop = _check_options(tokenizer, n, temperature, top_p, top_k, max_new_tokens, stop, prefill_chunk, sync_every,
                          max_batch, share_prompt_reads, prompt_cascade)
    ids = encode_prompts(tokenizer, prompts, model.cfg.vocab_size)
    if not ids:
        return None
    cache_len = _cache_len_for(ids, max_new_tokens, cache_len)
    trained = model.cfg.max_seq_len
    if trained and cache_len > trained:  # RoPE past the trained context runs, but the model never saw it
        warnings.warn(f"the KV cache holds {cache_len} positions but the model was trained on {trained} "
                      f"(config.json max_position_embeddings): completions past it are unreliable", stacklevel=3)
    cuda_graphs = _use_cuda_graphs(model, cuda_graphs)
    on_cuda = model.embed_tokens.weight.device.type == "cuda"
    if on_cuda if fused_projections is None else fused_projections:
        fuse_projections(model)  # before the state is acquired: fusing moves the weights it addresses
    # A vocabulary padded past the tokenizer's (a multiple of 64 or 128, say) has rows with no text: never draw them,
    # as serving engines do. Only w2s's own tokenizer counts its added tokens in vocab_size (transformers' does not).
    text_vocab = tokenizer.vocab_size if isinstance(tokenizer, Tokenizer) else None
    return Engine(
        model, ids, n, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
        eos_ids=_eos_ids(model, tokenizer), stop=stop, decode=tokenizer.decode if tokenizer is not None else None,
        slots=max(1, min(max_batch, len(ids) * n)), cache_len=cache_len, global_index=prompt_indices,
        shared_prefix=shared_prefix, sync_every=sync_every, cuda_graphs=cuda_graphs, prefill_chunk=prefill_chunk,
        keep_state=cuda_graphs if keep_state is None else keep_state, share_prompt_reads=share_prompt_reads,
        compact=compact, prompt_cascade=prompt_cascade,
        text_vocab=text_vocab if text_vocab is not None and text_vocab < model.cfg.vocab_size else None)


def iter_generate(model, tokenizer, prompts, **options):
    """Yield (index into `prompts`, [n completions]) as prompts finish, in completion order. Options as `generate`;
    `prompt_indices` are the indices the RNG uses (default: 0..len-1). No data-parallel split here."""
    engine = make_engine(model, tokenizer, prompts, **options)
    if engine is not None:
        yield from engine.run()


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="prompt", dynamic_ncols=True, desc="sampling")


def generate_shard(model, tokenizer, prompts, todo=None, names=None, progress=True, **options):
    """An iterator of (index into prompts, [n completions]) over this data-parallel rank's share of `todo` (indices
    into prompts; default all), in completion order. options: those of `generate`.

    Every prompt is encoded and checked, and the cache sized, over ALL prompts on every rank before the split and
    before this returns (cheap next to sampling): errors are raised here, everywhere alike, and all ranks run the
    same shapes. names[i] is how an error calls prompt i. The progress bar (rank 0) counts the prompts outside
    `todo` as done."""
    options["stop"] = _check_options(tokenizer, **options)
    ids = encode_prompts(tokenizer, prompts, model.cfg.vocab_size, names)
    keep = options.get("keep_state")
    keep = _use_cuda_graphs(model, options.get("cuda_graphs")) if keep is None else keep
    # a kept decode state serves the next call when its cache length is the same: quantize the default
    options["cache_len"] = _cache_len_for(ids, options.get("max_new_tokens", MAX_NEW_TOKENS), options.get("cache_len"),
                                          names, quantum=CACHE_LEN_QUANTUM if keep else 1,
                                          trained=model.cfg.max_seq_len)
    todo = list(range(len(prompts))) if todo is None else todo
    dp_rank, dp_size, _ = dp_layout(model)
    mine = todo[dp_rank::dp_size]
    return _run_shard(model, tokenizer, ids, mine, dp_size, len(prompts) - len(todo), progress, options)


def _run_shard(model, tokenizer, ids, mine, dp_size, n_done, progress, options):

    bar = _progress(len(ids), progress and is_main())
    bar.update(n_done)
    start, tokens = time.perf_counter(), 0
    try:
        for local, completions in iter_generate(model, tokenizer, [ids[i] for i in mine], prompt_indices=mine,
                                                **options):
            yield mine[local], completions
            tokens += sum(c["num_tokens"] for c in completions)
            bar.update(dp_size)  # approximate across ranks: each rank advances at about the same rate
            bar.set_postfix_str(f"{tokens * dp_size / (time.perf_counter() - start):.0f} tok/s", refresh=False)
    finally:
        bar.close()


def generate(model, tokenizer, prompts, n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
             stop=(), seed=0, max_batch=256, cache_len=None, shared_prefix=True, sync_every=8, cuda_graphs=None,
             keep_state=None, fused_projections=None, prefill_chunk=0, share_prompt_reads=False, compact=True,
             prompt_cascade=False, progress=True):
    """Complete every prompt n times; returns, per prompt in input order, a list of n completion dicts.

    prompts: strings (tokenizer required) or lists of token ids (tokenizer may be None; then `text` is None and
    EOS ids come from model.cfg). temperature 0 is greedy. stop: strings that end a completion (needs a tokenizer).
    max_batch: decode slots (sequences in flight). cache_len: KV positions per slot (default: longest prompt +
    max_new_tokens); a longer prompt is an error. shared_prefix: prefill the longest common token prefix once.
    sync_every: decode steps between host looks. cuda_graphs: replay the decode step as a CUDA graph (default on
    for CUDA). keep_state: keep the KV cache and captured graphs for the next call on this model (default: with
    CUDA graphs; then the default cache_len is rounded up to a multiple of CACHE_LEN_QUANTUM); they are freed with
    the model or by w2s.decode_state.release(model).
    fused_projections: run q/k/v and gate/up as one matmul each (default on CUDA; w2s/fused.py). prefill_chunk:
    while decode runs, the prompts entering freed slots join the decode steps, up to this many prompt tokens per
    step, instead of a prefill forward of their own (chunked prefill; 0, the default, is off).
    share_prompt_reads: decode reads a prompt's keys from one of its samples' cache rows for all of them, so that
    on the GPU those reads meet in L2 (the same samples; off by default: on an H200 it changed no decode step's
    time, BENCHMARKS.md). compact: once no prompt waits, move the running samples into the lowest slots so that each
    step runs fewer rows as the batch drains (the same samples; on by default). prompt_cascade: a decode step on
    Triton reads each prompt's keys once for all its samples at work and each sample's own keys after them, merged
    (the per-prompt cascade; the same samples up to float rounding; off by default, not yet timed on a GPU; not with
    share_prompt_reads; with prefill_chunk, the mixed steps read each sample's keys as before).
    Under an initialised process group each data-parallel rank runs a shard and every rank returns the full,
    input-ordered result, identical to a one-process run with the same seed.
    """
    import torch.distributed as dist

    results = dict(generate_shard(
        model, tokenizer, prompts, progress=progress, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
        max_new_tokens=max_new_tokens, stop=stop, seed=seed, max_batch=max_batch, cache_len=cache_len,
        shared_prefix=shared_prefix, sync_every=sync_every, cuda_graphs=cuda_graphs, keep_state=keep_state,
        fused_projections=fused_projections, prefill_chunk=prefill_chunk, share_prompt_reads=share_prompt_reads,
        compact=compact, prompt_cascade=prompt_cascade))
    if dp_layout(model)[1] > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        for part in gathered:
            results.update(part)
    return [results[i] for i in range(len(prompts))]
