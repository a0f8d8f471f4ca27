"""Training data: tokenize SFT rows and preference pairs, reject bad rows, group by length, collate micro-batches.

Rows come in as dicts, either text or already tokenized (tests and callers that tokenized themselves):

    SFT         {"prompt": str, "response": str}           or {"prompt_ids": [int], "response_ids": [int]}
    preference  {"prompt": str, "chosen": str, "rejected": str}
                                                           or {"prompt_ids", "chosen_ids", "rejected_ids"}

A text sequence is `prompt + " " + response` encoded with the tokenizer's BOS convention, then EOS. The loss
covers the response tokens only: the first `n_prompt` tokens are the longest common prefix of that encoding and
of `encode(prompt)` (exactly the prompt's tokens whenever the tokenizer does not merge across the boundary).
Id rows are used as given (add EOS to response_ids yourself if you want it learned).

Bad rows, under `bad_rows="skip"` (report each with its location and count them) or `"error"` (stop at the first):
    missing/empty response (SFT) or chosen/rejected (preference); chosen == rejected; a sequence longer than
    max_seq_len; no response token to predict. A row's location is its `_where` key ("file.jsonl:12", set by
    w2s.files.read_jsonl(path, tag_lines=True)) or "row <index>". A jsonl line that is not a JSON object is not a
    bad row but a broken file: read_jsonl stops there with file:line.

Batches: every optimizer step takes `batch_size` rows (globally, over all ranks and accumulation steps). Rows are
shuffled per epoch, then sorted by length inside windows of `group` batches, so each batch holds rows of similar
length and padding stays small; each batch is then cut into world_size * grad_accum contiguous micro-batch slots.
The schedule is a pure function of (seed, epoch): resuming needs only the step number.

    python -m pytest -q tests/test_train.py
"""

import random
import sys
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # target value that carries no loss (prompt tokens and padding)


@dataclass
class Example:
    tokens: list  # full sequence ids
    n_prompt: int  # the first n_prompt tokens carry no loss


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def where(row, index):
    """Human-readable location of a row for error messages."""
    return (row.get("_where") if isinstance(row, dict) else None) or f"row {index}"


def common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def n_targets(ex):
    """Response tokens that carry loss: every token after the prompt except a sequence's very first (no context)."""
    return len(ex.tokens) - max(ex.n_prompt, 1)


def encode_response(tokenizer, prompt, response):
    """Example for prompt + " " + response + EOS with the prompt masked (see module docstring)."""
    prompt_ids, full = tokenizer.encode_batch([prompt, prompt + " " + response], bos=True)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return Example(full + eos, common_prefix_len(prompt_ids, full))


def _text(row, key):
    value = row.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _ids(row, key):
    value = row.get(key)
    return list(value) if isinstance(value, (list, tuple)) and len(value) > 0 else None


class BadRows:
    """Applies the bad-row policy: collect (location, reason) and report, or raise at the first one."""

    def __init__(self, policy, kind):
        if policy not in ("skip", "error"):
            raise ValueError(f"bad_rows={policy!r}: expected 'skip' or 'error'")
        self.policy, self.kind, self.found = policy, kind, []

    def add(self, location, reason):
        if self.policy == "error":
            raise ValueError(f"{location}: {reason} (bad_rows='error'; use 'skip' to drop such rows)")
        self.found.append((location, reason))

    def report(self, n_rows, verbose=True, max_lines=20):
        if not self.found or not verbose:
            return
        for location, reason in self.found[:max_lines]:
            print(f"skipped {location}: {reason}", file=sys.stderr)
        if len(self.found) > max_lines:
            print(f"... and {len(self.found) - max_lines} more", file=sys.stderr)
        print(f"{self.kind}: skipped {len(self.found)} of {n_rows} rows (bad_rows='skip')", file=sys.stderr)


def encode_sft_rows(tokenizer, rows, max_seq_len, bad_rows="skip", verbose=True):
    """-> (examples, kept row indices, [(location, reason)] of skipped rows)."""
    bad = BadRows(bad_rows, "sft")
    examples, kept = [], []
    for i, row in enumerate(rows):
        loc = where(row, i)
        if not isinstance(row, dict):
            bad.add(loc, f"expected an object with prompt/response, got {type(row).__name__}")
            continue
        if "prompt_ids" in row or "response_ids" in row:
            prompt, response = _ids(row, "prompt_ids") or [], _ids(row, "response_ids")
            if response is None:
                bad.add(loc, "empty or missing 'response_ids'")
                continue
            ex = Example(prompt + response, len(prompt))
        else:
            if not isinstance(row.get("prompt"), str):
                bad.add(loc, "missing 'prompt' (expected a string)")
                continue
            response = _text(row, "response")
            if response is None:
                bad.add(loc, "empty or missing 'response'")
                continue
            ex = encode_response(tokenizer, row["prompt"], response)
        if len(ex.tokens) > max_seq_len:
            bad.add(loc, f"sequence of {len(ex.tokens)} tokens is longer than max_seq_len={max_seq_len}")
            continue
        if n_targets(ex) == 0:
            bad.add(loc, "no response token to predict (an empty prompt's first token has no context)")
            continue
        examples.append(ex)
        kept.append(i)
    bad.report(len(rows), verbose)
    return examples, kept, bad.found


def encode_pair_rows(tokenizer, rows, max_seq_len, bad_rows="skip", verbose=True):
    """-> (pairs, kept row indices, [(location, reason)] of skipped rows)."""
    bad = BadRows(bad_rows, "preference")
    pairs, kept = [], []
    for i, row in enumerate(rows):
        loc = where(row, i)
        if not isinstance(row, dict):
            bad.add(loc, f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")
            continue
        if "prompt_ids" in row or "chosen_ids" in row:
            prompt = _ids(row, "prompt_ids") or []
            chosen, rejected = _ids(row, "chosen_ids"), _ids(row, "rejected_ids")
            if chosen is None or rejected is None:
                bad.add(loc, "empty or missing 'chosen_ids' / 'rejected_ids'")
                continue
            if chosen == rejected:
                bad.add(loc, "chosen == rejected (the pair carries no preference)")
                continue
            pair = Pair(Example(prompt + chosen, len(prompt)), Example(prompt + rejected, len(prompt)))
        else:
            if not isinstance(row.get("prompt"), str):
                bad.add(loc, "missing 'prompt' (expected a string)")
                continue
            chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
            if chosen is None or rejected is None:
                bad.add(loc, "empty or missing 'chosen' / 'rejected'")
                continue
            if chosen.strip() == rejected.strip():
                bad.add(loc, "chosen == rejected (the pair carries no preference)")
                continue
            pair = Pair(encode_response(tokenizer, row["prompt"], chosen),
                        encode_response(tokenizer, row["prompt"], rejected))
        longest = max(len(pair.chosen.tokens), len(pair.rejected.tokens))
        if longest > max_seq_len:
            bad.add(loc, f"sequence of {longest} tokens is longer than max_seq_len={max_seq_len}")
            continue
        if n_targets(pair.chosen) == 0 or n_targets(pair.rejected) == 0:
            bad.add(loc, "no response token to predict (an empty prompt's first token has no context)")
            continue
        pairs.append(pair)
        kept.append(i)
    bad.report(len(rows), verbose)
    return pairs, kept, bad.found


# ---------------------------------------------------------------------------------------------- batching


def epoch_batches(lengths, batch_size, seed, epoch, group=32):
    """Global batches (lists of example indices) of one epoch: shuffled, then length-grouped.

    Windows of `group` batches are sorted by length (longest first) and cut into batches; the batch order is then
    shuffled again so long and short batches interleave. The last batch may be smaller than batch_size.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    # Keep the one possibly short batch last, so every other step has exactly batch_size rows.
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) != batch_size]
    rng.shuffle(full)
    return full + short


def split_slots(batch, n_slots):
    """Cut a length-sorted global batch into n_slots contiguous micro-batches (sizes differ by at most one)."""
    q, r = divmod(len(batch), n_slots)
    out, start = [], 0
    for s in range(n_slots):
        size = q + (1 if s < r else 0)
        out.append(batch[start:start + size])
        start += size
    return out


def collate(examples, pad_id):
    """Right-padded (tokens, targets) (B, T) int64 for next-token prediction with the prompt masked.

    tokens[b, t] = seq[t] and targets[b, t] = seq[t + 1] for t < len - 1; targets before the response and over the
    padding are IGNORE_INDEX. An empty list gives one all-ignored dummy row (a rank with no rows left in a short
    last batch must still run forward/backward, because FSDP's collectives need every rank).
    """
    if not examples:
        return torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
    T = max(len(ex.tokens) for ex in examples) - 1
    T = max(T, 1)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        seq = torch.tensor(ex.tokens, dtype=torch.long)
        n = len(ex.tokens) - 1
        tokens[b, :n] = seq[:-1]
        targets[b, :n] = seq[1:]
        # position t predicts token t+1: the response starts at token n_prompt, i.e. at target index n_prompt - 1.
        targets[b, : max(ex.n_prompt - 1, 0)] = IGNORE_INDEX
    return tokens, targets


def collate_pairs(pairs, pad_id):
    """(tokens, targets) (2P, T): the P chosen sequences, then the P rejected ones, in one padded batch."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
