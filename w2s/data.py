"""Training data: tokenize SFT rows and preference pairs, reject bad rows, group by length, collate micro-batches.

Rows come in as dicts. The keys say the format (the first that matches, in this order):

    SFT         {"prompt_ids": [int], "response_ids": [int]}   tokenized already, used as given
                {"messages": [{"role", "content"}, ...]}         a chat, rendered with the model's chat template
                {"prompt": str, "completion": str}               TRL's prompt-completion format
                {"prompt": [messages], "completion": [messages]} TRL's conversational prompt-completion
                {"prompt": str, "response": str}                 w2s's own (the pipeline's rows)
    preference  {"prompt_ids", "chosen_ids", "rejected_ids"}     tokenized already
                {"prompt": str, "chosen": str, "rejected": str}  text
                {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  TRL's conversational format
                                                                 (without "prompt": the messages chosen and rejected
                                                                 share at the start are the prompt, as in TRL)

Text rows. `prompt`/`response` and `prompt`/`chosen`/`rejected` are joined with one space, `prompt + " " +
response`; TRL's `prompt`/`completion` is joined verbatim, `prompt + completion`, as TRL does (its completions carry
their own leading space or newline). The sequence is encoded with the tokenizer's BOS convention, then EOS. The loss
covers the response tokens only: the first `n_prompt` tokens are the longest common prefix of that encoding and of
`encode(prompt)` (exactly the prompt's tokens whenever the tokenizer does not merge across the boundary).

Chat rows (`encode_chat`). The conversation is rendered by tokenizer.apply_chat_template and encoded once (BOS by the
model's convention, unless the template wrote it); no EOS is added, the template ends each turn its own way. The
loss covers every assistant turn (TRL's assistant-only loss) and nothing else, located by rendering prefixes: the
turn at index i starts where apply_chat_template(messages[:i], add_generation_prompt=True) ends (after the header
that opens the assistant's turn) and ends where apply_chat_template(messages[:i + 1]) ends, so it holds the reply and
the template's end-of-turn marker (<|eot_id|>, "<end_of_turn>\\n"). System and user turns and the headers carry no
loss. Boundaries are found as token prefixes, with the text rows' rule: a token the tokenizer merges across a boundary
belongs to the turn. In the conversational prompt-completion and preference formats only the assistant turns of the
completion (chosen, rejected) carry loss; the prompt's own assistant turns, if any, are context.

Bad rows, under `bad_rows="skip"` (report each with its location and count them) or `"error"` (stop at the first):
    none of the keys above (the message names the expected keys); missing/empty response, completion, chosen or
    rejected; a malformed message list or one without an assistant turn to learn; a conversation the chat template
    refuses (its raise_exception) or does not render prefix-wise; chosen == rejected; a sequence longer than
    max_seq_len; no response token to predict. A row's location is its `_where` key ("file.jsonl:12", set by
    w2s.files.read_jsonl(path, tag_lines=True)) or "row <index>". A jsonl line that is not a JSON object is not a
    bad row but a broken file: read_jsonl stops there with file:line. A tokenizer without a chat template stops the
    run at the first chat row (a setup error, not a bad row).

Batches: every optimizer step takes `batch_size` rows (globally, over all ranks and accumulation steps). Rows are
shuffled per epoch, then sorted by length inside windows of `group` batches, so each batch holds rows of similar
length and padding stays small; each batch is then cut into world_size * grad_accum contiguous micro-batch slots.
The schedule is a pure function of (seed, epoch): resuming needs only the step number.

    python -m pytest -q tests/test_train.py tests/test_formats.py
"""

import math
import random
import sys
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # target value that carries no loss (prompt tokens and padding)


@dataclass
class Example:
    tokens: list  # full sequence ids
    n_prompt: int  # the first n_prompt tokens carry no loss
    spans: tuple | None = None  # chat rows: ((start, end), ...) token ranges that carry loss; None: n_prompt onwards

    def loss_spans(self):
        """Token ranges [start, end) whose tokens are targets (a sequence's first token never is: no context)."""
        return self.spans if self.spans is not None else ((self.n_prompt, len(self.tokens)),)


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
    """Tokens that carry loss: those of the loss spans, except a sequence's very first (no context)."""
    return sum(max(end - max(start, 1), 0) for start, end in ex.loss_spans())


def encode_response(tokenizer, prompt, response, sep=" "):
    """Example for prompt + sep + response + EOS with the prompt masked (see module docstring). A text that already
    starts with the BOS token's text or ends with the EOS token's ("<s>...", "...</s>") gets no second one, as TRL
    appends EOS only when the text lacks it."""
    prompt_ids, full = (_one_bos(ids, tokenizer.bos_id) for ids in
                        tokenizer.encode_batch([prompt, prompt + sep + response], bos=True))
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None and full[-1:] != [tokenizer.eos_id] else []
    return Example(full + eos, common_prefix_len(prompt_ids, full))


def _one_bos(ids, bos):
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


class BadRow(Exception):
    """Why one row cannot be used (the bad-row policy reports or raises it)."""


SFT_KEYS = "messages, prompt + completion, prompt + response, or prompt_ids + response_ids"
PAIR_KEYS = "prompt + chosen + rejected (text or lists of messages), or prompt_ids + chosen_ids + rejected_ids"


def _messages(value, key):
    """A list of {"role": str, "content": str} messages, or BadRow naming what is wrong with row[key]."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' must be a non-empty list of {{\"role\", \"content\"}} messages")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"'{key}'[{j}] is not a {{\"role\": str, \"content\": str}} message")
    return value


def _encode_rendered(tokenizer, texts):
    """Ids of chat-template renderings: BOS by the model's convention unless the template already wrote it."""
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None
    out = tokenizer.encode_batch(texts, bos=False)
    return [([bos] if bos is not None and ids[:1] != [bos] else []) + ids for ids in out]


def encode_chat(tokenizer, messages, first_trained=0):
    """Example of a conversation in the model's chat template; loss on the assistant turns at index >= first_trained
    (module docstring: each turn located by rendering the conversation's prefixes)."""
    from jinja2 import TemplateError

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained]
    if not turns:
        raise BadRow("no assistant message to learn from (the loss covers assistant turns only)")
    try:
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        # per turn: the text up to the end of its generation prompt, and the text through its end-of-turn marker
        bounds = [tokenizer.apply_chat_template(messages[:i + extra], add_generation_prompt=not extra)
                  for i in turns for extra in (0, 1)]
    except TemplateError as e:
        raise BadRow(f"the chat template refuses this conversation ({e})") from None
    if not all(full.startswith(text) for text in bounds):
        raise BadRow("the chat template does not render the conversation's beginning as the beginning of the whole, "
                     "so its assistant turns cannot be located")
    tokens, *ids = _encode_rendered(tokenizer, [full, *bounds])
    ends = [common_prefix_len(b, tokens) for b in ids]  # token offsets: (turn start, turn end) per turn
    spans = tuple((start, end) for start, end in zip(ends[::2], ends[1::2]) if end > start)
    return Example(tokens, spans[0][0] if spans else len(tokens), spans=spans)


def _text(row, key, hint=""):
    """row[key] as a non-blank string, else BadRow saying which: missing (then `hint`), not a string, or empty."""
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if key not in row:
        raise BadRow(f"missing '{key}'{hint}")
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise BadRow(f"'{key}' must be a string, got {got}")
    raise BadRow(f"empty '{key}'")


def is_token_id(t):
    """A whole number >= 0 (JSON's true is an int to Python, and 7.5 would be truncated by the collate)."""
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def pair_weight_problem(row):
    """Why a pair's optional "weight" (its loss weight, w2s/train.py pair_weights) is not one, or None: it must be a
    finite number >= 0 (NaN and true are not)."""
    w = row.get("weight", 1.0)
    if isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < math.inf:
        return None
    return f"'weight' must be a finite number >= 0, got {w!r}"


def _ids(row, key):
    """The token ids under `key`; None when absent, null or empty; BadRow when not a list of whole numbers >= 0 (a
    float, a bool or a string is never truncated, cast or dropped silently)."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(map(is_token_id, value)):
        raise BadRow(f"'{key}' must be a list of token ids (whole numbers >= 0)")
    return list(value) or None


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


def sft_example(tokenizer, row):
    """The Example of one SFT row in any of the module docstring's formats, or BadRow."""
    if "prompt_ids" in row or "response_ids" in row:
        prompt, response = _ids(row, "prompt_ids") or [], _ids(row, "response_ids")
        if response is None:
            raise BadRow("empty or missing 'response_ids'")
        return Example(prompt + response, len(prompt))
    if "messages" in row:
        return encode_chat(tokenizer, _messages(row["messages"], "messages"))
    prompt = row.get("prompt")
    if "completion" in row and isinstance(prompt, list):  # TRL's conversational prompt-completion
        prompt = _messages(prompt, "prompt")
        return encode_chat(tokenizer, prompt + _messages(row["completion"], "completion"), first_trained=len(prompt))
    if "prompt" not in row:
        raise BadRow(f"no training text: expected the keys {SFT_KEYS}; got {sorted(k for k in row if k != '_where')}")
    if not isinstance(prompt, str):
        raise BadRow("'prompt' must be a string (or, with a list of messages as completion, a list of messages)")
    key = "completion" if "completion" in row else "response"
    text = _text(row, key, hint=f"; expected the keys {SFT_KEYS}")
    return encode_response(tokenizer, prompt, text, sep="" if key == "completion" else " ")


def encode_sft_rows(tokenizer, rows, max_seq_len, bad_rows="skip", verbose=True, vocab_size=None):
    """-> (examples, kept row indices, [(location, reason)] of skipped rows)."""
    return _encode_rows(rows, "sft", SFT_KEYS, lambda row: sft_example(tokenizer, row), lambda ex: [ex], max_seq_len,
                        bad_rows, verbose, vocab_size)


def _encode_rows(rows, kind, keys, encode, sequences, max_seq_len, bad_rows, verbose, vocab_size=None):
    """Each row encoded (encode(row) -> an item whose sequences(item) are Examples), or reported as bad with its
    location: not an object, not encodable, a sequence longer than max_seq_len, a token id past vocab_size (the
    model's embedding table), or one with no token to predict.
    -> (items, kept row indices, [(location, reason)] of skipped rows)."""
    bad = BadRows(bad_rows, kind)
    items, kept = [], []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object with the keys {keys}, got {type(row).__name__}")
            item = encode(row)
            _check_length(max((ex.tokens for ex in sequences(item)), key=len), max_seq_len)
            if vocab_size is not None and (largest := max(max(ex.tokens) for ex in sequences(item))) >= vocab_size:
                raise BadRow(f"token id {largest} is outside the model's vocabulary (ids 0 to {vocab_size - 1})")
            if any(n_targets(ex) == 0 for ex in sequences(item)):
                raise BadRow("no response token to predict (an empty prompt's first token has no context)")
        except BadRow as e:
            bad.add(where(row, i), str(e))
            continue
        items.append(item)
        kept.append(i)
    bad.report(len(rows), verbose)
    return items, kept, bad.found


def _check_length(tokens, max_seq_len):
    if len(tokens) > max_seq_len:
        raise BadRow(f"sequence of {len(tokens)} tokens is longer than max_seq_len={max_seq_len}")


def _conversational_pair(tokenizer, row):
    """TRL's conversational preference row -> Pair; without "prompt", the messages chosen and rejected share at the
    start are the prompt (TRL's implicit prompt)."""
    chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
    if "prompt" in row:
        prompt = _messages(row["prompt"], "prompt")
    else:
        shared = common_prefix_len(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if chosen == rejected:
        raise BadRow("chosen == rejected (the pair carries no preference)")
    return Pair(encode_chat(tokenizer, prompt + chosen, first_trained=len(prompt)),
                encode_chat(tokenizer, prompt + rejected, first_trained=len(prompt)))


def pair_example(tokenizer, row):
    """The Pair of one preference row in any of the module docstring's formats, or BadRow."""
    if problem := pair_weight_problem(row):
        raise BadRow(problem)
    if "prompt_ids" in row or "chosen_ids" in row:
        prompt = _ids(row, "prompt_ids") or []
        chosen, rejected = _ids(row, "chosen_ids"), _ids(row, "rejected_ids")
        if chosen is None or rejected is None:
            raise BadRow("empty or missing 'chosen_ids' / 'rejected_ids'")
        if chosen == rejected:
            raise BadRow("chosen == rejected (the pair carries no preference)")
        return Pair(Example(prompt + chosen, len(prompt)), Example(prompt + rejected, len(prompt)))
    if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
        return _conversational_pair(tokenizer, row)
    if not isinstance(row.get("prompt"), str):
        raise BadRow(f"missing 'prompt' (expected a string or a list of messages); expected the keys {PAIR_KEYS}; "
                     f"got {sorted(k for k in row if k != '_where')}")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise BadRow("chosen == rejected (the pair carries no preference)")
    return Pair(encode_response(tokenizer, row["prompt"], chosen), encode_response(tokenizer, row["prompt"], rejected))


def encode_pair_rows(tokenizer, rows, max_seq_len, bad_rows="skip", verbose=True, vocab_size=None):
    """-> (pairs, kept row indices, [(location, reason)] of skipped rows)."""
    return _encode_rows(rows, "preference", PAIR_KEYS, lambda row: pair_example(tokenizer, row),
                        lambda pair: [pair.chosen, pair.rejected], max_seq_len, bad_rows, verbose, vocab_size)


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

    tokens[b, t] = seq[t] and targets[b, t] = seq[t + 1] where token t + 1 is in a loss span (Example.loss_spans:
    the response, or a chat row's assistant turns); elsewhere, and over the padding, targets are IGNORE_INDEX. An
    empty list gives one all-ignored dummy row (a rank with no rows left in a short last batch must still run
    forward/backward, because FSDP's collectives need every rank).
    """
    if not examples:
        return torch.full((1, 1), pad_id, dtype=torch.long), torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
    T = max(len(ex.tokens) for ex in examples) - 1
    T = max(T, 1)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        seq = torch.tensor(ex.tokens, dtype=torch.long)
        tokens[b, : len(ex.tokens) - 1] = seq[:-1]
        # position t predicts token t+1: a span of tokens [start, end) is target indices [start - 1, end - 1).
        for start, end in ex.loss_spans():
            start = max(start, 1)
            targets[b, start - 1 : end - 1] = seq[start:end]
    return tokens, targets


def collate_pairs(pairs, pad_id):
    """(tokens, targets) (2P, T): the P chosen sequences, then the P rejected ones, in one padded batch."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
