"""The sampler's engine: slots, a static KV cache and the decode loop for one generation run. w2s/sampling.py turns a
caller's prompts and options into an `Engine` and runs it; read this file for what happens in between, and
w2s/sampling_draw.py for how a token is drawn from a step's logits.

How it works (one engine, `Engine`, driven by w2s.sampling.iter_generate):
  * The cache has `slots` rows (the decode batch) plus one spare row that holds a prefix shared by every prompt
    (the 4 few-shot demonstrations of the ICL stage). That prefix is prefilled once; each new sequence copies its
    keys/values and prefills only its own suffix. Decode attends a long prefix (64+ tokens) once per step for
    all rows, from the spare row, instead of once per row (cascade attention, chosen in w2s/ops.py: on CPU
    w2s/kernels/sdpa_attention.py, on GPU w2s/kernels/decode_attention.py).
  * A work item is (prompt, sample j). The n samples of a prompt share one prefill: the first is prefilled, the
    others copy its cache row. A sample admitted later, while a sibling is still running, copies the sibling's
    prompt rows and draws its token 0 from the last-position logits the prompt's prefill kept for it (kept only
    while samples of the prompt wait): no forward. Prefill rows run longest first, so that a forward pads its
    rows to similar lengths.
  * Decode runs the slots [0, R) every step (fixed shapes, so the step can be a CUDA graph) and keeps all state on
    device: the sampled token, position, count, a done flag (EOS or budget reached) and an output buffer. The host
    looks only every `sync_every` steps: it checks stop strings on the decoded text, harvests finished slots and
    refills them with waiting work (continuous batching). A finished slot idles at most sync_every - 1 steps, and
    the host looks sooner when every running slot's token budget ends sooner (no step past the last token).
  * Once no work is waiting, the batch drains: the slots still running are moved down into the lowest free slots
    (their cache rows and state copied; compact, on by default), so that R, the power of two that covers the highest
    running slot (on CPU the exact count), shrinks with them and a step stops computing rows that hold nothing.
  * The per-prompt cascade (prompt_cascade, off by default): the n samples of a prompt hold equal copies of its
    keys, and a decode step on Triton reads them once for all of them (one tile of the samples' queries a kv head,
    w2s/kernels/decode_attention.py's attention_after_prompt_groups), then each sample's own keys, merged. The host
    keeps the groups (the slots at work on each prompt) in tables it rewrites at each look that finds them changed.
    With chunked prefill the mixed steps read every row's keys themselves (kv_rows): no plain step runs while a
    prompt is still being prefilled, so a group's rows always hold its prompt when a plain step reads them.
  * Chunked prefill (prefill_chunk=C, off by default): while decode runs, a refilled slot's prompt is not prefilled
    in a forward of its own that every other slot waits for; its tokens ride in the next decode steps instead, up
    to C per step. Such a mixed step runs S + C query rows of one token each (every slot's next token, then the
    prompt tokens, each writing and reading its own cache row: attention's kv_rows), and a slot whose last prompt
    token is in it samples its token 0 there. The first admission, with no decode to join, is a prefill forward.
  * On CUDA the decode step is captured once per attention limit, rows R and kind (plain or mixed) as a CUDA graph and
    replayed (cuda_graphs, default on for CUDA, never used on CPU); nothing in the step may sync with the host. The KV
    cache, the slots' state and the graphs are kept for the next call on the same model (keep_state; w2s/decode_state.py
    says when a kept state is reused and when it is dropped). The cache write and RoPE run as one kernel per layer
    (ops.rope_cache_write), and q/k/v and gate/up as one matmul each (fused_projections, default on CUDA: w2s/fused.py).
  * Randomness is counter-based (ops.stream_keys, ops.stream_uniforms; the hash is written out in
    w2s/kernels/reference.py): the uniform for token t of sample j of prompt i is a hash of (seed, i, j, t), with
    i the prompt's index in the caller's list. A completion therefore does not depend on batch size, scheduling,
    chunking, shared-prefix use or data-parallel sharding: the same seed gives the same samples in every
    configuration (up to float rounding differences of batched matmuls, which can flip a draw that lands within
    ~1e-7 of a boundary).

Conventions: `token_ids` include the EOS token that ended a sequence; `text` never contains it. A stop string ends
the sequence at the first token whose text completes it; `token_ids` keep that token, `text` is cut just BEFORE the
stop string (the stop string itself is not included). "length" means max_new_tokens (or the cache end) was reached.

    python -m pytest -q tests/test_sampling.py    # the engine through generate, and driven by hand
"""

import torch

from w2s import decode_state, ops
from w2s.decode_state import DecodeState
from w2s.sampling_draw import logits_from_hidden, sample_from_logits

# ------------------------------------------------------------------------------------------------ helpers


def check_prompt_reads(share_prompt_reads, prompt_cascade):
    """A clear error for the per-prompt cascade beside the other way of reading a prompt's keys once."""
    if prompt_cascade and share_prompt_reads:
        raise ValueError("prompt_cascade=True runs without share_prompt_reads=True: each is a way to read a prompt's "
                         "keys once for its samples; choose one")


def kv_config(model):
    """The config the attention layers actually run with (tensor parallelism gives each rank a share of heads)."""
    return model.layers[0].self_attn.cfg


def _is_eos(tokens, eos):
    """(B,) bool: tokens (B,) that are one of the eos ids (E,). A broadcast compare, not torch.isin, whose CUDA path
    for more than ~10 elements calls unique() (a host sync that breaks CUDA-graph capture)."""
    return (tokens[:, None] == eos[None, :]).any(dim=-1)


def round_up(x, m):
    return -(-x // m) * m


def _find_stop(text, stops, start=0):
    """Index of the earliest occurrence of any stop string in text[start:], or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


# ------------------------------------------------------------------------------------------------ the engine


class Engine:
    """Slots, cache and device state for one generation run. Drive it with `run()` (a generator of results).

    prompts: list of token-id lists; global_index: the caller's index of each (keys the RNG; data parallel);
    eos_ids: ids that end a sequence; stop: stop strings (need `decode`); keep_state: take the device state from,
    and leave it in, w2s/decode_state.py's per-model store; prefill_tokens: the token budget of one prefill forward
    (rows x longest); prefill_chunk: prompt tokens per mixed decode step (chunked prefill; 0: off); keep_logits:
    copy each decode step's (slots, V) logits into one fp32 buffer, `logits` then holds the last step's (tests,
    inspection; off: no copy per step); share_prompt_reads: decode reads the keys of a prompt's positions from one
    row of its samples for all of them (each still holds its copy), so that on the GPU those reads meet in L2
    (`_name_prompt_rows`); compact: move the running slots down as the batch drains, so a step runs fewer rows
    (`_compact`); prompt_cascade: a plain decode step on Triton reads each prompt's keys once for all its samples
    at work and each sample's own keys after them, merged (the per-prompt cascade; its groups:
    DecodeState.write_prompt_tables);
    text_vocab: draw only ids below it (a model whose vocabulary is padded past its tokenizer's: ids without text).
    """

    def __init__(self, model, prompts, n, *, temperature, top_k, top_p, max_new_tokens, seed, eos_ids, stop=(),
                 decode=None, slots, cache_len, global_index=None, shared_prefix=True, sync_every=8,
                 cuda_graphs=False, prefill_tokens=8192, prefill_chunk=0, keep_state=False,
                 keep_logits=False, text_vocab=None, share_prompt_reads=False, compact=True, prompt_cascade=False):
        self.model, self.prompts, self.n = model, prompts, n
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.text_vocab = text_vocab
        self.max_new, self.seed, self.stop, self.decode = max_new_tokens, seed, tuple(stop), decode
        self.eos_set = set(eos_ids)
        self.slots, self.cache_len, self.sync_every = slots, cache_len, sync_every
        self.prefill_tokens, self.prefill_chunk, self.cuda_graphs = prefill_tokens, prefill_chunk, cuda_graphs
        check_prompt_reads(share_prompt_reads, prompt_cascade)
        self.keep_logits, self.share_prompt_reads, self.compact = keep_logits, share_prompt_reads, compact
        self.prompt_cascade = prompt_cascade
        self.global_index = list(range(len(prompts))) if global_index is None else list(global_index)
        weight = model.embed_tokens.weight
        dev = self.device = weight.device
        self.prefix_len = self._shared_prefix_len() if shared_prefix else 0

        # Device state (cache, per-slot tensors, captured graphs): kept across calls when keep_state, else fresh.
        cfg = kv_config(model)
        build = lambda: DecodeState(cfg, slots, cache_len, weight.dtype, dev, prefill_chunk)  # noqa: E731
        shapes = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, slots, cache_len, prefill_chunk, weight.dtype, dev)
        self.state = st = decode_state.acquire(model, shapes, build) if keep_state else build()
        eos = sorted(self.eos_set) or [-1]
        # the per-prompt cascade's group width: a prompt's samples at work, in runs of at most this many rows
        self.group_width = min(1 << (n - 1).bit_length(), st.group_members.shape[1]) if prompt_cascade else 0
        signature = decode_state.graph_signature({**self.sampling, "text_vocab": text_vocab}, eos, self.prefix_len,
                                                 keep_logits, share_prompt_reads, self.group_width)
        st.start(self, signature, eos)
        if share_prompt_reads:
            st.cache.row_prefix = (st.prompt_rows, st.prompt_lens)
        if prompt_cascade:
            st.cache.prompt_groups = (st.group_members, st.group_lens, st.prompt_lens, self.group_width)
        self.cache, self.tokens, self.positions, self.n_gen = st.cache, st.tokens, st.positions, st.n_gen
        self.budget, self.keys, self.done, self.out, self.eos = st.budget, st.keys, st.done, st.out, st.eos
        self.trash = self.out.shape[1] - 1  # the column finished slots write into

        # Host bookkeeping.
        self.work = [None] * slots  # (prompt, sample) each slot runs, or None
        self.prefilling = {}  # slot -> (prompt tokens not yet run, position of the first): chunked prefill's queue
        self.checked_tokens = [0] * slots  # generated tokens already searched for stop strings
        self.unstarted = [n] * len(prompts)  # samples of each prompt not yet given a slot
        self.prompt_logits = {}  # prompt -> (V,) fp32 logits at its last position, while samples of it wait
        self.stop_window = max((len(x.encode()) for x in self.stop), default=0) + 2  # tokens of overlap
        self.tokens_generated = 0
        self.decode_steps = 0  # steps run
        self.mixed_steps = 0  # of which carried prompt tokens (chunked prefill)
        self.rows = slots  # R: a plain step runs slots [0, R), which hold every slot at work (_rows_to_run)
        self.decode_rows = 0  # rows the steps ran (live or not): occupancy = live slot-steps / decode_rows
        self.prefill_forwards = 0  # prefill forwards run (admissions, the shared prefix)
        self.prefill_token_rows = self.prefill_real_tokens = 0  # their rows x length, and the prompt tokens in them

    logits = property(lambda self: self.state.logits if self.keep_logits else None,
                      doc="(slots, V) fp32 logits of the last decode step with keep_logits (of the rows it ran; the "
                      "others keep older ones), else None")
    graphs = property(lambda self: self.state.graphs, doc="{(attention limit, rows, mixed): captured CUDA graph}")

    # ---- prefix sharing ---------------------------------------------------------------------------------------
    def _shared_prefix_len(self):
        """Longest token prefix common to all prompts, leaving every prompt at least one token of its own."""
        if len(self.prompts) < 2:
            return 0
        first, length = self.prompts[0], min(len(p) for p in self.prompts) - 1
        for p in self.prompts[1:]:
            i = 0
            while i < length and p[i] == first[i]:
                i += 1
            length = i
        return max(length, 0)

    def _copy_rows(self, src, dst, length):
        """Copy cache positions [0, length) of row src into rows dst (list), every layer."""
        if length <= 0 or not dst:
            return
        dst = torch.tensor(dst, device=self.device)
        for buf in (self.cache.k, self.cache.v):  # (layers, rows, K, max_len, D)
            buf[:, dst, :, :length] = buf[:, src : src + 1, :, :length]

    # ---- prefill ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_rows(self, rows):
        """Prefill rows [(slot, token list, start position)] into the cache; return last-token logits (R, V)."""
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))  # longest first: a forward pads its rows
        rows = [rows[r] for r in order]  # to its first one's length, so similar lengths run together
        out = []
        i = 0
        while i < len(rows):  # chunk so that (rows x longest) stays under the prefill token budget
            j, T = i + 1, len(rows[i][1])
            while j < len(rows) and T * (j - i + 1) <= self.prefill_tokens:
                j += 1
            chunk = rows[i:j]
            self.prefill_forwards += 1
            self.prefill_token_rows += len(chunk) * T
            self.prefill_real_tokens += sum(len(ids) for _, ids, _ in chunk)
            tokens = torch.zeros(len(chunk), T, dtype=torch.long)
            positions = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, (_, ids, start) in enumerate(chunk):
                tokens[r, : len(ids)] = torch.tensor(ids)
                # Right padding: pads sit after the real tokens, at positions clamped into the cache; they write
                # garbage at positions beyond the prompt, which decode overwrites before any query can read them.
                positions[r] = (start + torch.arange(T)).clamp(max=self.cache_len - 1)
            last = torch.tensor([len(ids) - 1 for _, ids, _ in chunk])
            self.cache.rows = torch.tensor([s for s, _, _ in chunk], device=self.device)
            self.cache.limit = max(start + len(ids) for _, ids, start in chunk)
            # Many queries per row: no cascade (flash prefill); the rows being filled may still be named for an
            # earlier prompt's keys (_name_prompt_rows runs after), so no prompt-row reads or groups either.
            shared, self.cache.shared = self.cache.shared, None
            row_prefix, self.cache.row_prefix = self.cache.row_prefix, None
            groups, self.cache.prompt_groups = self.cache.prompt_groups, None
            try:
                hidden = self.model(tokens.to(self.device), positions.to(self.device), cache=self.cache,
                                    return_hidden=True)  # (R, T, D)
            finally:
                self.cache.rows, self.cache.limit, self.cache.shared = None, self.cache_len, shared
                self.cache.row_prefix, self.cache.prompt_groups = row_prefix, groups
            out.append(logits_from_hidden(self.model, hidden[torch.arange(len(chunk)), last.to(self.device)]))
            i = j
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[order] = torch.arange(len(order))
        return torch.cat(out)[inverse.to(self.device)]  # in the callers' row order

    def prefill_shared_prefix(self):
        if self.prefix_len:
            self._forward_rows([(self.slots, self.prompts[0][: self.prefix_len], 0)])
            # every sequence starts with a copy of this row, so decode may read the prefix from it once per step
            self.cache.shared = (self.slots, self.prefix_len)

    @torch.no_grad()
    def admit(self, items, free):
        """Start work items [(prompt, sample)] in the free slots (same length lists): prefill, sample token 0."""
        live = {self.work[s][0]: s for s in range(self.slots) if self.work[s] is not None}  # prompt -> a live slot
        rows, row_of, copies = [], {}, {}  # copies: prefill row index -> the slots that copy it after the forward
        kept = []  # prompts whose kept logits some admitted slots sample from
        source = []  # for each admitted slot: ("row", prefill row) or ("kept", index into kept) of its logits
        for s, (p, j) in zip(free, items):
            ids = self.prompts[p]
            self.unstarted[p] -= 1
            if p in row_of:  # a sibling prefilled in this same batch: copy its rows after the forward
                copies.setdefault(row_of[p], []).append(s)
                source.append(("row", row_of[p]))
            elif p in live:
                # A sibling is still running: its rows [0, L) are this prompt, and the prompt's logits were kept at
                # its prefill, which ran here (while decode runs, chunked prefill admits through admit_into_batch).
                self._copy_rows(live[p], [s], len(ids))
                source.append(("kept", len(kept)))
                kept.append(p)
            else:  # prefill from the shared prefix on
                self._copy_rows(self.slots, [s], self.prefix_len)
                row_of[p] = len(rows)
                source.append(("row", len(rows)))
                rows.append((s, ids[self.prefix_len :], self.prefix_len))
            self.work[s] = (p, j)
            self.checked_tokens[s] = 0
        parts = [self._forward_rows(rows)] if rows else []  # the prefill's (R, V) logits; the kept rows follow
        for r, slots in copies.items():  # one copy a prompt, into all its siblings' rows
            src_slot, _, _ = rows[r]
            self._copy_rows(src_slot, slots, len(self.prompts[self.work[src_slot][0]]))
        for p, r in row_of.items():  # samples of p still wait: keep its logits for them
            if self.unstarted[p]:
                self.prompt_logits[p] = parts[0][r].clone()
        logits = torch.cat(parts + [self.prompt_logits[p][None] for p in kept])  # (R + kept, V)
        for p in {p for p, _ in items}:
            if not self.unstarted[p]:
                self.prompt_logits.pop(p, None)
        index = [r if kind == "row" else len(rows) + r for kind, r in source]
        slot_t, keys, budget = self._start_slots(free, items)
        first = self._draw(logits[torch.tensor(index, device=self.device)], keys, torch.zeros_like(keys))
        self.tokens[slot_t] = first
        self.n_gen[slot_t] = 1
        self.out[slot_t, 0] = first
        self.done[slot_t] = _is_eos(first, self.eos) | (budget <= 1)

    def _name_prompt_rows(self):
        """With share_prompt_reads or prompt_cascade, tell the state which prompt each slot at work holds and over
        how many positions its rows equal its siblings' (DecodeState.write_prompt_tables). Those positions are
        bitwise the same in every row of a prompt at work: one prefill (a sample waits while a sibling's prompt is
        prefilled in the decode steps), copied to the others. With chunked prefill the last one is left out: a sample
        admitted beside a running sibling runs it again, in a mixed step of another shape. Called at each look, after
        its admissions and compaction and before its decode steps read the rows they filled (the tables are written
        only when the slots' prompts changed)."""
        if not (self.share_prompt_reads or self.prompt_cascade):
            return
        rerun = 1 if self.prefill_chunk else 0  # the prompt positions at the end that a row may hold of its own
        self.state.write_prompt_tables([None if w is None else (w[0], len(self.prompts[w[0]]) - rerun)
                                        for w in self.work], self.group_width)

    def _start_slots(self, free, items):
        """Slot state of work items [(prompt, sample)] entering slots `free`: position after the prompt, RNG key,
        token budget. Returns the slots, keys and budgets as device tensors."""
        dev = self.device
        slot_t = torch.tensor(free, device=dev)
        prompt_len = torch.tensor([len(self.prompts[p]) for p, _ in items], device=dev)
        keys = ops.stream_keys(self.seed, torch.tensor([self.global_index[p] for p, _ in items], device=dev),
                               torch.tensor([j for _, j in items], device=dev))
        budget = (self.cache_len - prompt_len).clamp(max=self.max_new)
        self.positions[slot_t] = prompt_len
        self.budget[slot_t] = budget
        self.keys[slot_t] = keys
        return slot_t, keys, budget

    # ---- chunked prefill: prompts join the decode batch ----------------------------------------------------------
    @torch.no_grad()
    def admit_into_batch(self, queue, free):
        """Start queued work [(prompt, sample)] (popped from the end) in the free slots without a prefill forward:
        their prompt tokens ride in the next decode steps (_plan_mixed_steps). A sample whose prompt a sibling is
        still prefilling waits in the queue; once the sibling generates, its rows are copied and only the last
        prompt token is run again."""
        generating = {self.work[s][0]: s for s in range(self.slots)
                      if self.work[s] is not None and s not in self.prefilling}
        in_flight = {self.work[s][0] for s in self.prefilling}
        started, waiting = [], []
        while queue and len(started) < len(free):
            p, j = queue.pop()
            if p in in_flight:
                waiting.append((p, j))
                continue
            s, ids = free[len(started)], self.prompts[p]
            self.unstarted[p] -= 1
            if not self.unstarted[p]:
                self.prompt_logits.pop(p, None)
            if p in generating:
                self._copy_rows(generating[p], [s], len(ids) - 1)
                self.prefilling[s] = (ids[-1:], len(ids) - 1)
            else:
                self._copy_rows(self.slots, [s], self.prefix_len)
                self.prefilling[s] = (ids[self.prefix_len :], self.prefix_len)
                in_flight.add(p)
            self.work[s] = (p, j)
            self.checked_tokens[s] = 0
            started.append((p, j))
        queue.extend(reversed(waiting))
        if started:
            slot_t, _, _ = self._start_slots(free[: len(started)], started)
            self.n_gen[slot_t] = 0  # the first token sampled (at the step that runs the last prompt token) is token 0
            self.done[slot_t] = True  # not generating yet: the decode entries of these slots change no state

    def _plan_mixed_steps(self):
        """The prompt tokens of the next decode steps: each step carries up to prefill_chunk tokens of the slots being
        prefilled, oldest first. A slot whose last prompt token is in a step samples its token 0 from that entry
        (pick) in that step and generates from the next one (activate). Unused entries write into the spare row's
        last position, which nothing reads. -> (steps, 3C + 2S) long on device (DecodeState.step_inputs' layout), one
        row per step: [prompt tokens (C) | their positions (C) | their cache rows (C) | pick (S) | activate (S)]."""
        C, S = self.prefill_chunk, self.slots
        plan = []
        while self.prefilling and len(plan) < self.sync_every:
            tokens, positions, rows, pick, activate = [], [], [], list(range(S)), [0] * S
            for s, (ids, start) in list(self.prefilling.items()):  # oldest first (dict order)
                take = min(C - len(tokens), len(ids))
                tokens += ids[:take]
                positions += range(start, start + take)
                rows += [s] * take
                if take < len(ids):  # the chunk is full: the rest of this prompt goes first in the next step
                    self.prefilling[s] = (ids[take:], start + take)
                    break
                del self.prefilling[s]
                pick[s], activate[s] = S + len(tokens) - 1, 1
                if len(tokens) == C:
                    break
            pad = C - len(tokens)
            plan.append(tokens + [0] * pad + positions + [self.cache_len - 1] * pad + rows + [S] * pad + pick
                        + activate)
        return torch.tensor(plan, device=self.device)

    # ---- decode -----------------------------------------------------------------------------------------------
    def _draw(self, logits, keys, steps):
        """Tokens (rows,) from logits (rows, V), row i drawing its uniform for its step steps[i] from its stream
        keys[i] (ops.stream_uniforms: one kernel on GPU). Greedy draws none."""
        uniforms = ops.stream_uniforms(keys, steps) if self.sampling["temperature"] > 0 else None
        if self.text_vocab is not None:  # (rows, text_vocab): the columns past it are padding, with no text
            logits = logits[:, : self.text_vocab]
        return sample_from_logits(logits, uniforms, **self.sampling)

    def _step_eager(self, rows, mixed=False):
        """One decode step for slots [0, rows), all on device, updating the state tensors in place (through views of
        their first rows). A mixed step runs every slot, and also the prompt tokens of state.step_inputs (chunked
        prefill), and starts the slots whose prompts end."""
        tokens, positions, n_gen, budget, keys, done, out = (
            t[:rows] for t in (self.tokens, self.positions, self.n_gen, self.budget, self.keys, self.done, self.out))
        if mixed:
            logits, act = self._mixed_logits()
            live = ~done | act
        else:  # batch row i is cache row i: the cache's rows [0, rows)
            logits = self.model(tokens[:, None], positions[:, None], cache=self.cache)[:, -1]  # (R, V)
            live = ~done
        nxt = self._draw(logits, keys, n_gen)  # (R,)
        col = torch.where(live, n_gen, self.trash)  # finished rows write into the trash column
        out.scatter_(1, col[:, None], nxt[:, None])
        n_gen.add_(live)  # +1 for every running row (a bool adds as 0 / 1)
        torch.where(live, nxt, tokens, out=tokens)
        if mixed:  # a slot starting now keeps its position (its token 0 goes there next step) and is not done yet
            positions.add_(live & ~act)
            done.logical_and_(~act)
        else:
            positions.add_(live)
        # a row that is not live is done already, so every row may take the test
        done.logical_or_(_is_eos(nxt, self.eos) | (n_gen >= budget))
        if self.keep_logits:
            self.state.keep_logits(logits)

    def _mixed_logits(self):
        """The forward of a mixed step: S + C query rows of one token each, every slot's next token and then C
        prompt tokens, each writing and reading its own cache row (several rows may share one). -> the slots'
        logits (S, V), each from the entry state.pick names, and state.activate as bool (S,)."""
        st = self.state
        tokens = torch.cat([self.tokens, st.chunk_tokens])[:, None]  # (S + C, 1)
        positions = torch.cat([self.positions, st.chunk_positions])[:, None]
        self.cache.rows = torch.cat([torch.arange(self.slots, device=self.device), st.chunk_rows])  # (S + C,)
        try:
            hidden = self.model(tokens, positions, cache=self.cache, return_hidden=True)[:, 0]  # (S + C, D)
        finally:
            self.cache.rows = None
        return logits_from_hidden(self.model, hidden[st.pick]), st.activate.bool()

    def step(self, limit, mixed=False):
        """One decode step attending over cache positions [0, limit), over slots [0, self.rows) (a mixed step: all);
        replays a CUDA graph per limit, rows and kind if enabled. mixed: state.step_inputs holds this step's prompt
        tokens."""
        rows = self.slots if mixed else self.rows
        self.decode_steps += 1
        self.mixed_steps += mixed
        self.decode_rows += rows
        return self.state.step(limit, lambda: self._step_eager(rows, mixed), self.cuda_graphs, mixed, rows)

    def _steps_before_look(self, tokens_left):
        """Decode steps to run before the next host look: sync_every, or fewer when every slot at work has fewer
        tokens left in its budget (tokens_left: one count a slot; a step after the last of them would compute rows
        nothing reads, and the look that frees the slots would come later). Not while prompts are prefilled inside
        the steps: their slots start during them, with their whole budget ahead."""
        if self.prefilling:
            return self.sync_every
        return max(0, min(self.sync_every, max(tokens_left)))

    def _rows_to_run(self):
        """R: the rows a plain step runs, enough to hold every slot at work (_rows_covering the highest one)."""
        return self._rows_covering(max((s + 1 for s, w in enumerate(self.work) if w is not None), default=1))

    def _rows_covering(self, n):
        """The rows a step runs to cover slots [0, n): on CUDA the power of two at or above n (at most the slots), so
        that a run captures few graphs (and an eager run computes the shapes a graphed one does); on CPU, n."""
        return min(self.slots, 1 << (n - 1).bit_length()) if self.cuda_graphs or self.device.type == "cuda" else n

    def _compact(self):
        """With no work waiting, move the slots at work beyond the rows their count needs (_rows_covering) into the
        lowest free slots: their cache rows (the positions written so far) and state move with them, and the slots
        they leave are empty (done). Samples do not change: a draw depends on (prompt, sample, step), not the slot."""
        at_work = [s for s, w in enumerate(self.work) if w is not None]
        need = self._rows_covering(len(at_work))
        movers = [s for s in at_work if s >= need]
        if not movers:
            return
        free = [s for s in range(need) if self.work[s] is None][: len(movers)]
        src, dst = torch.tensor(movers, device=self.device), torch.tensor(free, device=self.device)
        written = max(self.positions[src].tolist())  # positions [0, written) hold keys (the next token's is unwritten)
        for buf in (self.cache.k, self.cache.v):  # (layers, rows, K, max_len, D)
            for layer in buf:  # a layer at a time: the gather's temporary copy is one layer's rows, not all
                layer[dst, :, :written] = layer[src, :, :written]
        for t in (self.tokens, self.positions, self.n_gen, self.budget, self.keys, self.done, self.out):
            t[dst] = t[src]
        self.done[src] = True
        for s, d in zip(movers, free):
            self.work[d], self.work[s] = self.work[s], None
            self.checked_tokens[d] = self.checked_tokens[s]

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _finish(self, s, ids, done):
        """The completion dict of slot s from its generated ids (host list); checks stop strings."""
        reason = None
        if self.stop:
            text = self.decode(ids)
            if _find_stop(text, self.stop) >= 0:
                m = len(ids)  # shortest prefix of tokens whose text contains a stop string
                while m > 1 and _find_stop(self.decode(ids[: m - 1]), self.stop) >= 0:
                    m -= 1
                ids, reason = ids[:m], "stop"
        if reason is None:
            if not done:
                return None  # still running, no stop string yet
            reason = "eos" if ids and ids[-1] in self.eos_set else "length"
        text = None
        if self.decode is not None:
            text = self.decode(ids[:-1] if reason == "eos" else ids)
            if reason == "stop":
                text = text[: _find_stop(text, self.stop)]
        return {"text": text, "token_ids": ids, "num_tokens": len(ids), "finish_reason": reason}

    def _sync(self):
        """Host look at the state: finished slots' completions [(slot, dict)] (their slots are freed)."""
        done, n_gen = torch.stack([self.done.long(), self.n_gen]).tolist()
        busy = [s for s in range(self.slots) if self.work[s] is not None and s not in self.prefilling]
        check = [s for s in busy if done[s] or self.stop]
        finished = []
        if check:
            width = max(n_gen[s] for s in check)
            rows = self.out[torch.tensor(check, device=self.device), :width].tolist()
            newly_stopped = []
            for s, row in zip(check, rows):
                ids = row[: n_gen[s]]
                if not done[s]:
                    # Decode only the tokens new since the last look, plus enough earlier ones to hold any stop
                    # string (each token is >= 1 byte), so a long sequence costs O(length) decoding, not O(length^2).
                    # A stop string this misses (tokenizer quirks at the window's edge) is still found by the full
                    # decode in _finish when the sequence ends: it only costs the steps until then.
                    start = max(0, self.checked_tokens[s] - self.stop_window)
                    self.checked_tokens[s] = len(ids)
                    if _find_stop(self.decode(ids[start:]), self.stop) < 0:
                        continue
                    newly_stopped.append(s)
                finished.append((s, self._finish(s, ids, True)))
            if newly_stopped:
                self.done[torch.tensor(newly_stopped, device=self.device)] = True
        return finished

    def run(self):
        """Yield (prompt index, [n completion dicts]) as prompts finish (all n samples), until all are done."""
        try:
            yield from self._run()
        finally:
            self.state.finish()  # a kept state may serve the next engine

    def _run(self):
        queue = [(p, j) for p in range(len(self.prompts)) for j in range(self.n)]
        queue.reverse()  # pop() from the end = input order
        pending = {}  # prompt -> {sample: completion}
        self.prefill_shared_prefix()
        free = list(range(self.slots))
        while True:
            if free and queue and self.prefill_chunk and any(w is not None for w in self.work):
                self.admit_into_batch(queue, free)  # decode is running: the new prompts join its steps
            elif free and queue:
                take = min(len(free), len(queue))
                items = [queue.pop() for _ in range(take)]
                self.admit(items, free[:take])
            if all(w is None for w in self.work):
                return
            if self.compact and not queue and not self.prefilling:
                self._compact()  # the batch drains: run fewer rows
            self._name_prompt_rows()  # the tables as the slots stand now: admitted, moved, finished ones gone
            self.rows = self._rows_to_run()
            positions, n_gen, budget = torch.stack([self.positions, self.n_gen, self.budget]).tolist()
            at_work = [s for s in range(self.slots) if self.work[s] is not None]
            steps = self._steps_before_look([budget[s] - n_gen[s] for s in at_work])
            # Attend over the positions those steps can reach. With CUDA graphs, rounded up to 64 so that few
            # distinct shapes are captured; without, exact (on CPU, decode attention reads every key up to the
            # limit, so a rounded-up limit reads keys for nothing).
            live_max = max(positions[s] for s in at_work)
            limit = min(self.cache_len, round_up(live_max + steps, 64 if self.cuda_graphs else 1))
            plan = self._plan_mixed_steps() if self.prefilling else ()
            for k in range(steps):
                if k < len(plan):
                    self.state.step_inputs.copy_(plan[k])
                self.step(limit, mixed=k < len(plan))
            free = []
            for s, completion in self._sync():
                p, j = self.work[s]
                self.work[s] = None
                free.append(s)
                self.tokens_generated += completion["num_tokens"]
                pending.setdefault(p, {})[j] = completion
                if len(pending[p]) == self.n:
                    done = pending.pop(p)
                    yield p, [done[k] for k in range(self.n)]
            free.sort()
