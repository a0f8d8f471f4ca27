"""The sampler's device state, kept across `generate` calls: the KV cache, the slots' state tensors and the decode
step's captured CUDA graphs.

A CUDA graph replays the decode step's kernels on the exact buffers it was captured with: the KV cache, the state
tensors below, the logits buffer and the model's weights. Capturing costs an eager warm-up step and a capture per
attention limit, rows run and step kind (plain, or mixed with prompt tokens), and allocating the cache costs time as
well, so the sampler (w2s/sampling_engine.py, on CUDA by default) keeps one state per model between calls:

    state = acquire(model, shapes, build)   # the kept state when it fits, else build() (which replaces it)
    release(model)                           # free it now (the KV cache can take gigabytes)

When a kept state is reused. `shapes` (slots, cache length, kv heads, prefill chunk, dtype, device) must be equal,
and every parameter and buffer of the model must still be at the address it had: a graph reads weights by address.
A weight changed in place (an optimizer step, load_state_dict) keeps its address, so the graphs read the new values
at their next replay and the state stays exact; a weight replaced by another tensor (model.to, LoRA injection,
tensor-parallel slicing, fusing the projections anew) moves, and the state is dropped and rebuilt. What a step bakes
in as Python values (sampling options, EOS ids, the shared-prefix length, the kernel backend) is the graphs'
`signature`: a run with another signature drops the graphs and keeps the buffers. One state per model, the last
used; a state still driven by a live engine is never handed to a second one (that one gets a fresh state of its
own).

    python -m pytest -q tests/test_decode_state.py    # reuse and invalidation on CPU; CUDA graphs on a GPU
"""

import itertools
import weakref

import torch

from w2s import ops
from w2s.model import KVCache

_KEPT = weakref.WeakKeyDictionary()  # model -> (shapes, weight addresses, DecodeState)


class DecodeState:
    """Device buffers of a sampler run over `slots` sequences of up to `cache_len` positions, and the decode step's
    graphs (one per attention limit, rows run and step kind, plain or mixed) once captured. The engine reads and
    writes the tensors in place."""

    def __init__(self, cfg, slots, cache_len, dtype, device, prefill_chunk=0):
        # One spare cache row (index `slots`) holds the shared prefix; decode touches only rows [0, slots), but for
        # the unused entries of a mixed step, which write the spare row's last position (never read).
        self.cache = KVCache(cfg, slots + 1, cache_len, dtype=dtype, device=device)
        long = dict(dtype=torch.long, device=device)
        # A mixed step's inputs besides the slots' own (w2s/sampling_engine.py, chunked prefill), one row of the
        # engine's plan copied in before the step: prefill_chunk prompt tokens, their positions and cache rows; for
        # each slot the step entry its next token is sampled from, and whether its prompt ends in this step (0/1).
        C = prefill_chunk
        self.step_inputs = torch.zeros(3 * C + 2 * slots, **long)
        self.chunk_tokens, self.chunk_positions, self.chunk_rows, self.pick, self.activate = self.step_inputs.split(
            [C, C, C, slots, slots])
        self.tokens = torch.zeros(slots, **long)  # last sampled token of each slot (fed next step)
        self.positions = torch.zeros(slots, **long)  # its position
        self.n_gen = torch.zeros(slots, **long)  # tokens generated so far
        self.budget = torch.ones(slots, **long)  # max tokens this slot may generate
        self.keys = torch.zeros(slots, **long)  # RNG stream key
        self.done = torch.ones(slots, dtype=torch.bool, device=device)  # empty slots count as done
        # generated ids; at most cache_len - 1 per sequence, so the last column is a trash can for finished slots
        self.out = torch.zeros(slots, cache_len + 1, **long)
        # For each cache row, a row holding the same prompt keys and how many positions they span (KVCache's
        # row_prefix, with the engine's share_prompt_reads): itself and 0 until the engine names another.
        self.prompt_rows = torch.arange(slots + 1, dtype=torch.int32, device=device)
        self.prompt_lens = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        # The per-prompt cascade's groups (KVCache's prompt_groups, with the engine's prompt_cascade): for each cache
        # row that leads a group, its member rows (-1: none) and the prompt positions they share; up to 128 query
        # rows of a kv head in one tile, so at most 128 / (query heads per kv head) members.
        self.group_members = torch.full((slots + 1, max(1, 128 // (cfg.n_heads // cfg.n_kv_heads))), -1,
                                        dtype=torch.int32, device=device)
        self.group_lens = torch.zeros(slots + 1, dtype=torch.int32, device=device)
        self.tables_for = None  # the slots' prompts these tables were last written for (write_prompt_tables)
        self.eos = None  # (E,) ids that end a sequence
        self.logits = None  # (slots, V) fp32 logits of the last decode step
        self.graphs, self.graph_pool, self.signature = {}, None, None  # {(limit, rows, mixed): CUDA graph}
        self.owner = None  # weakref to the engine driving this state

    def start(self, owner, signature, eos_ids):
        """Fresh-run values in every state tensor (in place: captured graphs keep reading them); graphs are kept
        when the run's signature is the one they were captured under."""
        self.owner = weakref.ref(owner)
        for t, value in ((self.tokens, 0), (self.positions, 0), (self.n_gen, 0), (self.budget, 1), (self.keys, 0),
                         (self.done, True), (self.out, 0)):
            t.fill_(value)
        self.cache.rows, self.cache.limit, self.cache.shared = None, self.cache.max_len, None
        self.cache.row_prefix = self.cache.prompt_groups = None
        self.prompt_rows.copy_(torch.arange(len(self.prompt_rows), device=self.prompt_rows.device))
        self.prompt_lens.zero_()
        self.group_members.fill_(-1)
        self.group_lens.zero_()
        self.tables_for = None
        if signature != self.signature:
            self.graphs, self.graph_pool, self.signature = {}, None, signature
            self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.tokens.device)

    def finish(self):
        self.owner = None

    def in_use(self):
        return self.owner is not None and self.owner() is not None

    def keep_logits(self, logits):
        """Store the step's logits (R, V) of slots [0, R), in fp32, in the one (slots, V) buffer Engine.logits reads
        (keep_logits); the rows of the slots the step did not run keep what they held."""
        if self.logits is None:
            self.logits = torch.zeros(len(self.tokens), logits.shape[-1], dtype=torch.float32, device=logits.device)
        self.logits[: len(logits)].copy_(logits)

    def write_prompt_tables(self, slot_prompts, group_width=0):
        """Which cache rows hold one prompt's keys, as decode attention takes it (in place: captured graphs read these
        tensors). slot_prompts: for each slot, (prompt, positions [0, n) its rows hold alike with every other slot
        of that prompt), or None when empty. Then
          * prompt_rows / prompt_lens (KVCache.row_prefix): a slot at work names the lowest slot at work on its
            prompt, for its n positions; an empty slot (and the spare row) names itself, for none;
          * with group_width, group_members / group_lens (KVCache.prompt_groups): the slots at work on one prompt
            in runs of at most group_width, each led by its lowest slot, which holds the run's members and n; an
            empty slot is a group of its own with no positions, so that every row a step runs is in one group.
        Nothing is written when the slots hold the prompts they held at the last call."""
        if slot_prompts == self.tables_for:
            return
        self.tables_for = slot_prompts
        rows, lens, first = list(range(len(self.prompt_rows))), [0] * len(self.prompt_lens), {}
        for s, held in enumerate(slot_prompts):
            if held is not None:
                rows[s], lens[s] = first.setdefault(held[0], s), held[1]
        self.prompt_rows.copy_(torch.tensor(rows, dtype=torch.int32))
        self.prompt_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        if not group_width:
            return
        members = torch.full(self.group_members.shape, -1, dtype=torch.int32)
        group_lens = torch.zeros(len(rows), dtype=torch.int32)
        runs, open_run = {}, {}  # leader -> its members; a prompt's first slot -> the leader of its latest run
        for s in range(len(rows)):
            if lens[s] == 0:  # an empty slot (or the spare row): alone, attending none of its keys here
                runs[s] = [s]
                continue
            leader = open_run.get(rows[s])
            if leader is None or len(runs[leader]) == group_width:
                leader = open_run[rows[s]] = s
                runs[s], group_lens[s] = [], lens[s]
            runs[leader].append(s)
        for leader, run in runs.items():
            members[leader, : len(run)] = torch.tensor(run, dtype=torch.int32)
        self.group_members.copy_(members)
        self.group_lens.copy_(group_lens)

    @torch.no_grad()
    def step(self, limit, eager_step, cuda_graphs, mixed, rows):
        """One decode step over cache positions [0, limit) and the slots [0, rows): eager_step() itself, or the
        replay of its CUDA graph for this limit, rows and kind (plain or mixed; captured on first use, after one
        eager warm-up step)."""
        self.cache.limit = limit
        if not cuda_graphs:
            return eager_step()
        key = (limit, rows, mixed)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay()
        # First step at this limit: run it eagerly on a side stream (warm-up, a real step), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager_step()
        torch.cuda.current_stream().wait_stream(side)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.graph_pool):
                eager_step()  # recorded, not executed
        except Exception as e:
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed ({e}); pass cuda_graphs=False "
                               "(scripts/sample.py --no-cuda-graphs) to run it eagerly") from e
        self.graphs[key] = graph


def graph_signature(sampling, eos_ids, prefix_len, keep_logits=False, share_prompt_reads=False, prompt_cascade=0):
    """What a captured step bakes in besides buffer addresses: sampling options, EOS ids, the shared-prefix length,
    whether it copies its logits out, and the kernel choice (the backend, the prefix length from which decode runs
    the cascade, whether it reads a prompt's keys from the row named for them, and the per-prompt cascade's group
    width, 0 without it)."""
    return (tuple(sorted(sampling.items())), tuple(eos_ids), prefix_len, keep_logits, ops.get_backend(),
            ops.CASCADE_MIN_PREFIX, share_prompt_reads, prompt_cascade)


def weight_addresses(model):
    """(address, dtype, shape) of every parameter and buffer: what a captured graph reads the model through."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in itertools.chain(model.parameters(), model.buffers()))


def acquire(model, shapes, build):
    """The kept state of `model` when it was built for `shapes`, the model's tensors are where they were and no
    live engine drives it; else build() a new one, kept in its place unless the kept one is busy."""
    kept = _KEPT.get(model)
    addresses = weight_addresses(model)
    if kept is not None and kept[2].in_use():
        return build()  # a second engine on the same model at the same time (nested generators): its own state
    if kept is not None and kept[0] == shapes and kept[1] == addresses:
        return kept[2]
    kept = None
    _KEPT.pop(model, None)  # free the old cache before allocating the new one
    state = build()
    _KEPT[model] = (shapes, addresses, state)
    return state


def kept_state(model):
    """The state kept for `model`, or None."""
    kept = _KEPT.get(model)
    return None if kept is None else kept[2]


def release(model=None):
    """Free the state kept for `model` (every model's when None): its KV cache and graphs."""
    if model is None:
        _KEPT.clear()
    else:
        _KEPT.pop(model, None)
