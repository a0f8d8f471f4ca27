"""The data formats of w2s/data.py: TRL's prompt/completion, chat messages, TRL's conversational prompt-completion
and preference rows give the same tokens, targets and loss as the equivalent prompt/response (or id) rows; chat rows
carry loss on the assistant turns only, the same tokens transformers marks with return_assistant_tokens_mask; bad rows
name the keys that were expected.

    python -m pytest -q tests/test_formats.py
"""

import json

import pytest
import torch

from w2s import data
from w2s.config import ModelConfig
from w2s.model import Transformer
from w2s.tokenizer import load_tokenizer, train_bpe
from w2s.train import TrainConfig, train_preference, train_sft

# Meta-Llama-3-8B-Instruct's template with {% generation %} around what the assistant writes (its reply and
# <|eot_id|>): the markers transformers' return_assistant_tokens_mask (TRL's assistant_only_loss) reads.
LLAMA3_GENERATION = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# google/gemma-2b-it's template (no BOS handling of its own beyond bos_token; refuses a system turn).
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
SPECIAL = {"llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>"),
           "gemma": ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")}
TEMPLATES = {"llama3": LLAMA3_GENERATION, "gemma": GEMMA}

USER = {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many now?"}
REPLY = {"role": "assistant", "content": "3+4=7\n#### 7"}
FOLLOW_UP = {"role": "user", "content": "And if he eats 2?"}
REPLY_2 = {"role": "assistant", "content": "7-2=5\n#### 5"}
WRONG = {"role": "assistant", "content": "3+4=8\n#### 8"}
SYSTEM = {"role": "system", "content": "Answer with a worked solution."}


@pytest.fixture(scope="module", params=["llama3", "gemma"])
def chat_dir(request, tmp_path_factory):
    """A small byte-level BPE with the family's special tokens and its chat template in tokenizer_config.json."""
    texts = [USER["content"], REPLY["content"], FOLLOW_UP["content"], REPLY_2["content"], SYSTEM["content"]] * 20
    tok = train_bpe(texts, vocab_size=300, special_tokens=SPECIAL[request.param])
    directory = tok.save(tmp_path_factory.mktemp(request.param))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATES[request.param]}))
    return directory


@pytest.fixture(scope="module")
def tok(chat_dir):
    return load_tokenizer(chat_dir)


def tiny_model(seed=0):
    cfg = ModelConfig(family="llama", vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, max_seq_len=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(seed))


def first_losses(fn, tokenizer, rows, **kwargs):
    """The logged metrics of two optimizer steps of fn on rows (same model init, same config)."""
    recs = []
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=2, micro_batch_size=1, progress=False, seed=0)
    fn(tiny_model(), tokenizer, rows, cfg, on_step=recs.append, **kwargs)
    return [{k: v for k, v in r.items() if k not in ("tok_per_s", "mfu", "peak_mem_gib")} for r in recs]


def same_examples(a, b):
    """Two encodings are the same training data: tokens, and the (tokens, targets) a batch of them collates to."""
    assert [ex.tokens for ex in a] == [ex.tokens for ex in b]
    for x, y in zip(data.collate(a, 0), data.collate(b, 0)):
        assert torch.equal(x, y)


def encode(tokenizer, rows, pairs=False):
    fn = data.encode_pair_rows if pairs else data.encode_sft_rows
    encoded, kept, bad = fn(tokenizer, rows, max_seq_len=256, bad_rows="error")
    assert len(kept) == len(rows) and not bad
    return [e for p in encoded for e in (p.chosen, p.rejected)] if pairs else encoded


def target_text(tokenizer, ex):
    """The text of each loss span of an Example, special tokens kept."""
    return [tokenizer.decode(ex.tokens[s:e], skip_special=False) for s, e in ex.loss_spans()]


def rendered_ids(tokenizer, messages, add_generation_prompt):
    """Ids of a rendering as a hand-made reference: the template writes BOS, so nothing is added."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt), bos=False)


# ---------------------------------------------------------------------------------------------- SFT


def test_trl_prompt_completion_is_prompt_response_joined_verbatim(tok):
    """TRL's completion carries its own separator; w2s's response gets one space. The same text, the same data."""
    plain = [{"prompt": "Question: 3 apples and 4 more?\nAnswer:", "response": "3+4=7\n#### 7"},
             {"prompt": "Question: 7 apples, 2 eaten?\nAnswer:", "response": "7-2=5\n#### 5"}]
    trl = [{"prompt": r["prompt"], "completion": " " + r["response"]} for r in plain]
    same_examples(encode(tok, trl), encode(tok, plain))
    assert first_losses(train_sft, tok, trl) == first_losses(train_sft, tok, plain)


def test_a_text_with_its_own_bos_or_eos_token_gets_no_second_one(tok):
    """TRL appends EOS only to a text that lacks it; w2s also adds BOS only to a prompt that lacks it."""
    bos, eos = tok.decode([tok.bos_id], skip_special=False), tok.decode([tok.eos_id], skip_special=False)
    plain = {"prompt": "Question: 3 apples and 4 more?\nAnswer:", "response": "3+4=7\n#### 7"}
    marked = {"prompt": bos + plain["prompt"], "response": plain["response"] + eos}
    (ex,) = encode(tok, [plain])
    assert ex.tokens[0] == tok.bos_id != ex.tokens[1] and ex.tokens[-1] == tok.eos_id != ex.tokens[-2]
    same_examples(encode(tok, [marked]), [ex])


def test_chat_messages_equal_the_rendered_prompt_and_reply_as_ids(tok):
    """A one-turn chat is its rendered generation prompt (no loss) followed by the rest of the rendering (loss):
    tokens, targets and the training loss of the equivalent id rows."""
    chats = [[USER, REPLY], [FOLLOW_UP, REPLY_2]]
    rows, id_rows = [], []
    for chat in chats:
        prompt = rendered_ids(tok, chat[:-1], add_generation_prompt=True)
        full = rendered_ids(tok, chat, add_generation_prompt=False)
        assert full[: len(prompt)] == prompt
        rows.append({"messages": chat})
        id_rows.append({"prompt_ids": prompt, "response_ids": full[len(prompt):]})
    same_examples(encode(tok, rows), encode(tok, id_rows))
    assert first_losses(train_sft, tok, rows) == first_losses(train_sft, tok, id_rows)
    # the conversational prompt-completion row is the same chat with the prompt marked by the split
    trl = [{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats]
    same_examples(encode(tok, trl), encode(tok, rows))


def test_chat_loss_covers_every_assistant_turn_and_nothing_else(tok):
    [ex] = encode(tok, [{"messages": [USER, REPLY, FOLLOW_UP, REPLY_2]}])
    end = "<|eot_id|>" if "<|eot_id|>" in tok.apply_chat_template([USER]) else "<end_of_turn>\n"
    assert target_text(tok, ex) == [REPLY["content"] + end, REPLY_2["content"] + end]
    tokens, targets = data.collate([ex], 0)
    learned = [t for t in targets[0].tolist() if t != data.IGNORE_INDEX]
    assert learned == [t for s, e in ex.loss_spans() for t in ex.tokens[s:e]]
    assert data.n_targets(ex) == len(learned)
    # the prompt side of the conversational format is context: its assistant turn carries no loss
    [ctx] = encode(tok, [{"prompt": [USER, REPLY, FOLLOW_UP], "completion": [REPLY_2]}])
    assert ctx.tokens == ex.tokens and target_text(tok, ctx) == [REPLY_2["content"] + end]


def test_assistant_tokens_are_those_transformers_marks(chat_dir, tok):
    """Our prefix-rendering rule against transformers' {% generation %} mask (TRL's assistant_only_loss)."""
    if "start_header" not in tok.apply_chat_template([USER]):
        pytest.skip("the generation markers are in the Llama-3 template only")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(chat_dir))
    chat = [SYSTEM, USER, REPLY, FOLLOW_UP, REPLY_2]
    out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    [ex] = encode(tok, [{"messages": chat}])
    assert ex.tokens == list(out["input_ids"])
    ours = [any(s <= i < e for s, e in ex.loss_spans()) for i in range(len(ex.tokens))]
    assert ours == [bool(m) for m in out["assistant_masks"]]


# ---------------------------------------------------------------------------------------------- preference


def test_conversational_pairs_equal_the_rendered_text_as_ids(tok):
    pairs = [{"prompt": [USER], "chosen": [REPLY], "rejected": [WRONG]},
             {"prompt": [USER, REPLY, FOLLOW_UP], "chosen": [REPLY_2], "rejected": [WRONG]}]
    id_pairs = []
    for p in pairs:
        prompt = rendered_ids(tok, p["prompt"], add_generation_prompt=True)
        sides = [rendered_ids(tok, p["prompt"] + p[k], add_generation_prompt=False)[len(prompt):]
                 for k in ("chosen", "rejected")]
        id_pairs.append({"prompt_ids": prompt, "chosen_ids": sides[0], "rejected_ids": sides[1]})
    same_examples(encode(tok, pairs, pairs=True), encode(tok, id_pairs, pairs=True))
    for loss in ("dpo", "orpo"):
        assert (first_losses(train_preference, tok, pairs, loss=loss)
                == first_losses(train_preference, tok, id_pairs, loss=loss))
    # TRL's implicit prompt: whole conversations, the shared beginning is the prompt
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    same_examples(encode(tok, implicit, pairs=True), encode(tok, pairs, pairs=True))


def test_text_pairs_keep_the_one_space_join(tok):
    """Plain-text pairs are w2s's format (the pipeline's pairs): prompt + " " + chosen, as prompt/response rows."""
    pair = {"prompt": "Question: 3 apples and 4 more?\nAnswer:", "chosen": "#### 7", "rejected": "#### 8"}
    chosen, rejected = encode(tok, [pair], pairs=True)
    same_examples([chosen, rejected], encode(tok, [{"prompt": pair["prompt"], "response": pair[k]}
                                                   for k in ("chosen", "rejected")]))


# ---------------------------------------------------------------------------------------------- bad rows


def test_bad_rows_name_the_expected_keys(tok, capsys):
    rows = [{"question": "q", "answer": "a", "_where": "d.jsonl:1"},
            {"messages": [USER], "_where": "d.jsonl:2"},
            {"messages": [{"role": "user", "content": None}], "_where": "d.jsonl:3"},
            {"prompt": "q", "_where": "d.jsonl:4"},
            {"prompt": "q", "completion": "", "_where": "d.jsonl:5"},
            {"messages": [USER, REPLY]}]
    _, kept, bad = data.encode_sft_rows(tok, rows, max_seq_len=256)
    assert kept == [5]
    reasons = dict(bad)
    assert reasons["d.jsonl:1"] == ("no training text: expected the keys messages, prompt + completion, prompt + "
                                    "response, or prompt_ids + response_ids; got ['answer', 'question']")
    assert reasons["d.jsonl:2"].startswith("no assistant message to learn from")
    assert reasons["d.jsonl:3"] == "'messages'[0] is not a {\"role\": str, \"content\": str} message"
    assert reasons["d.jsonl:4"].startswith("missing 'response'; expected the keys messages, prompt + comp")
    assert reasons["d.jsonl:5"] == "empty 'completion'"
    assert "skipped 5 of 6 rows" in capsys.readouterr().err
    # A key of the wrong type is said to be one, not to be missing.
    wrong = [{"prompt": "q", "completion": 5, "_where": "d.jsonl:6"},
             {"prompt": "q", "response": None, "_where": "d.jsonl:7"}]
    assert dict(data.encode_sft_rows(tok, wrong, max_seq_len=256, verbose=False)[2]) == {
        "d.jsonl:6": "'completion' must be a string, got int", "d.jsonl:7": "'response' must be a string, got null"}
    pairs = [{"prompt": "q", "chosen": "a", "rejected": 3, "_where": "d.jsonl:8"},
             {"prompt": "q", "rejected": "b", "_where": "d.jsonl:9"}]
    assert dict(data.encode_pair_rows(tok, pairs, max_seq_len=256, verbose=False)[2]) == {
        "d.jsonl:8": "'rejected' must be a string, got int", "d.jsonl:9": "missing 'chosen'"}

    pairs = [{"prompt": [USER], "chosen": [REPLY], "rejected": [REPLY], "_where": "p.jsonl:1"},
             {"question": "q", "_where": "p.jsonl:2"},
             {"prompt": [USER], "chosen": "3+4=7", "rejected": [WRONG], "_where": "p.jsonl:3"}]
    _, kept, bad = data.encode_pair_rows(tok, pairs, max_seq_len=256)
    reasons = dict(bad)
    assert kept == [] and reasons["p.jsonl:1"] == "chosen == rejected (the pair carries no preference)"
    assert "expected the keys prompt + chosen + rejected (text or lists of messages)" in reasons["p.jsonl:2"]
    assert reasons["p.jsonl:3"].startswith("'chosen' must be a non-empty list")


def test_token_id_rows_hold_whole_numbers_inside_the_vocabulary(tok, capsys):
    """An id that is not a whole number >= 0 (7.5, true, "abc", null) is never cast, dropped or left to the collate,
    and an id past the embedding table never reaches the first step: each is a bad row, named; the trainer passes
    the model's vocabulary."""
    rows = [{"prompt_ids": [3, 4], "response_ids": [6, 299], "_where": "i.jsonl:1"},
            {"prompt_ids": [3, 4], "response_ids": [6, 300], "_where": "i.jsonl:2"},
            {"prompt_ids": [3, -1], "response_ids": [6], "_where": "i.jsonl:3"},
            {"prompt_ids": "abc", "response_ids": [6], "_where": "i.jsonl:4"}]
    rows += [{"response_ids": [6, bad], "_where": f"i.jsonl:{5 + k}"} for k, bad in enumerate([None, 7.5, True, "a"])]
    _, kept, bad = data.encode_sft_rows(tok, rows, max_seq_len=256, vocab_size=300)
    assert kept == [0]
    reasons = dict(bad)
    assert reasons["i.jsonl:2"] == "token id 300 is outside the model's vocabulary (ids 0 to 299)"
    not_ids = "must be a list of token ids (whole numbers >= 0)"
    assert reasons["i.jsonl:3"] == reasons["i.jsonl:4"] == f"'prompt_ids' {not_ids}"
    assert all(reasons[f"i.jsonl:{k}"] == f"'response_ids' {not_ids}" for k in range(5, 9))
    pairs = [{"prompt_ids": [3], "chosen_ids": [5], "rejected_ids": [6], "weight": w, "_where": f"w.jsonl:{k}"}
             for k, w in enumerate([0.5, "heavy", float("nan"), -5, True])]
    pairs.append({"prompt_ids": [3], "chosen_ids": [5], "rejected_ids": [6, 7.9], "_where": "w.jsonl:5"})
    _, kept, bad = data.encode_pair_rows(tok, pairs, max_seq_len=256, vocab_size=300)
    reasons = dict(bad)
    assert kept == [0] and reasons["w.jsonl:1"] == "'weight' must be a finite number >= 0, got 'heavy'"
    assert [reasons[f"w.jsonl:{k}"].split(", got ")[1] for k in (2, 3, 4)] == ["nan", "-5", "True"]
    assert reasons["w.jsonl:5"] == "'rejected_ids' must be a list of token ids (whole numbers >= 0)"
    capsys.readouterr()
    cfg = TrainConfig(lr=1e-3, max_steps=1, batch_size=1, micro_batch_size=1, progress=False, bad_rows="error")
    with pytest.raises(ValueError, match=r"^i\.jsonl:2: token id 300 is outside the model's vocabulary"):
        train_sft(tiny_model(), tok, rows[:2], cfg)


def test_template_refusals_are_bad_rows_and_no_template_is_one_error(tok, tmp_path):
    if "start_of_turn" in tok.apply_chat_template([USER]):  # gemma refuses a system turn
        _, kept, bad = data.encode_sft_rows(tok, [{"messages": [SYSTEM, USER, REPLY], "_where": "c:1"}], 256)
        assert kept == [] and bad == [("c:1", "the chat template refuses this conversation (System role not "
                                              "supported)")]
    base = load_tokenizer(train_bpe(["plain text"] * 5, vocab_size=270).save(tmp_path / "base"))
    with pytest.raises(ValueError, match="no chat_template") as err:
        data.encode_sft_rows(base, [{"messages": [USER, REPLY]}], max_seq_len=256)
    assert len(str(err.value).splitlines()) == 1


def test_a_token_merged_across_the_prompt_boundary_belongs_to_the_response(tok):
    """"How many no" + "w?": the byte-level BPE encodes the prompt alone as ... ' ', 'n', 'o' but the whole text as
    ... ' ', 'now', '?': 'now' starts in the prompt, and the module docstring's rule gives it to the response."""
    [ex] = encode(tok, [{"prompt": "How many no", "completion": "w?"}])
    eos = tok.decode([tok.eos_id], skip_special=False)
    assert "now" in [tok.decode([t]) for t in ex.tokens]  # the merge this row is about
    assert target_text(tok, ex) == ["now?" + eos]


def test_a_chat_rows_prompt_is_what_precedes_its_first_assistant_reply(tok):
    """Example.n_prompt: the first n_prompt tokens carry no loss, so with two assistant turns it is where the first
    reply starts, the end of the rendered generation prompt of the first user turn."""
    [ex] = encode(tok, [{"messages": [USER, REPLY, FOLLOW_UP, REPLY_2]}])
    assert ex.n_prompt == len(rendered_ids(tok, [USER], add_generation_prompt=True)) == ex.loss_spans()[0][0]


def test_an_empty_prompt_message_list_is_a_bad_row(tok):
    _, kept, bad = data.encode_sft_rows(tok, [{"prompt": [], "completion": [REPLY], "_where": "c:1"}], 256,
                                        verbose=False)
    assert kept == [] and bad == [("c:1", "'prompt' must be a non-empty list of {\"role\", \"content\"} messages")]
