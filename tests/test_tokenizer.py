"""Tests for w2s/tokenizer.py: the real Mistral-7B SentencePiece model, its tokenizer.json conversion, a trained BPE.

    python -m pytest -q tests/test_tokenizer.py

References are independent of w2s: `sentencepiece` itself (ids and BOS id), transformers' slow->fast converter
(AutoTokenizer on a directory holding only tokenizer.model writes the tokenizer.json; needs protobuf) and
transformers' AutoTokenizer loading what w2s saved. transformers is a test-only dependency.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from w2s.tokenizer import load_tokenizer, train_bpe

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EDGE_TEXTS = [" Hello", "Hello", "  two  spaces ", " ", "", "\n\nline\ttab", "é ü 日本 🙂", "$80,000 + 5% = ?"]


def _mistral_model_path():
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed (it ships the Mistral-7B tokenizer.model)")
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"{path} not found in this mistral-common version")
    return path


@pytest.fixture(scope="module")
def gsm8k_questions():
    path = DATA / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def mistral_dirs(tmp_path_factory):
    """(dir with tokenizer.model only, dir with the tokenizer.json that transformers converted from it)."""
    model = _mistral_model_path()
    sp_dir = tmp_path_factory.mktemp("mistral_sp")
    shutil.copyfile(model, sp_dir / "tokenizer.model")
    pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers' SentencePiece converter needs protobuf")
    from transformers import AutoTokenizer

    json_dir = tmp_path_factory.mktemp("mistral_json")
    AutoTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(json_dir))
    assert (json_dir / "tokenizer.json").is_file() and not (json_dir / "tokenizer.model").exists()
    return sp_dir, json_dir


def test_mistral_sentencepiece_and_tokenizer_json_agree_on_gsm8k(mistral_dirs, gsm8k_questions):
    import sentencepiece

    sp_dir, json_dir = mistral_dirs
    sp_tok, json_tok = load_tokenizer(sp_dir), load_tokenizer(json_dir)
    assert (sp_tok.backend, json_tok.backend) == ("sentencepiece", "tokenizers")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    expected = [[reference.bos_id()] + ids for ids in reference.encode(gsm8k_questions)]

    sp_ids = sp_tok.encode_batch(gsm8k_questions)
    json_ids = json_tok.encode_batch(gsm8k_questions)
    mismatches = [q for q, a, b, c in zip(gsm8k_questions, sp_ids, json_ids, expected) if not a == b == c]
    assert not mismatches, f"{len(mismatches)} questions differ, first: {mismatches[0]!r}"
    for tok, ids in ((sp_tok, sp_ids), (json_tok, json_ids)):
        decoded = tok.decode_batch(ids)
        bad = [q for q, d in zip(gsm8k_questions, decoded) if d != q]
        assert not bad, f"{tok.backend}: decode(encode(x)) != x for {len(bad)} questions, first: {bad[0]!r}"
        assert tok.encode(gsm8k_questions[0]) == ids[0]


def test_mistral_special_ids_and_edge_texts(mistral_dirs):
    sp_dir, json_dir = mistral_dirs
    for tok in (load_tokenizer(sp_dir), load_tokenizer(json_dir)):
        # Mistral-7B: <unk>=0, <s>=1, </s>=2, no pad token (falls back to EOS), 32000 pieces.
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 32000)
        assert tok.stop_ids == {2} and tok.add_bos
        for text in EDGE_TEXTS:
            ids = tok.encode(text, eos=True)
            assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
            assert tok.decode(ids) == text, (tok.backend, text)
            assert tok.decode(tok.encode(text, bos=False)) == text
        assert tok.encode("Hello", bos=False) == [22557]
        # Special-token text maps to the special id in both backends, as in transformers.
        assert tok.encode("a</s>b", bos=False)[1] == 2
    sp_tok, json_tok = load_tokenizer(sp_dir), load_tokenizer(json_dir)
    for text in EDGE_TEXTS + ["a<s>b</s>c"]:
        ids = sp_tok.encode(text, eos=True)
        assert ids == json_tok.encode(text, eos=True)
        assert sp_tok.decode(ids, skip_special=False) == json_tok.decode(ids, skip_special=False)
    assert sp_tok.decode([1, 22557, 2], skip_special=False) == "<s> Hello</s>"


def test_directory_with_both_files_prefers_tokenizer_json(mistral_dirs, tmp_path):
    sp_dir, json_dir = mistral_dirs
    shutil.copyfile(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    shutil.copyfile(json_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).backend == "tokenizers"
    assert load_tokenizer(tmp_path / "tokenizer.model").backend == "sentencepiece"


def test_save_reload_and_auto_tokenizer(mistral_dirs, gsm8k_questions, tmp_path):
    from transformers import AutoTokenizer

    questions = gsm8k_questions[:100] + EDGE_TEXTS
    for source in mistral_dirs:
        tok = load_tokenizer(source)
        out = tok.save(tmp_path / tok.backend)
        if tok.backend == "sentencepiece":
            assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
        else:
            # The converted tokenizer.json leaves BOS to tokenizer_config.json, which AutoTokenizer ignores for a
            # tokenizer.json: save() writes the same file with a post-processor that adds BOS.
            saved, original = (json.loads((d / "tokenizer.json").read_text()) for d in (out, source))
            assert saved.pop("post_processor")["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}
            original.pop("post_processor")
            assert saved == original
        reloaded = load_tokenizer(out)
        ids = tok.encode_batch(questions)
        assert reloaded.encode_batch(questions) == ids
        assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        hf = AutoTokenizer.from_pretrained(str(out))
        assert [hf(q)["input_ids"] for q in questions] == ids, tok.backend


def test_add_bos_token_false_is_respected(mistral_dirs, tmp_path):
    shutil.copyfile(mistral_dirs[0] / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1 and not tok.add_bos
    assert tok.encode("Hello") == [22557]


@pytest.fixture(scope="module")
def trained(gsm8k_questions):
    return train_bpe(gsm8k_questions[:300], vocab_size=600)


def test_trained_bpe_round_trip_and_reload(trained, gsm8k_questions, tmp_path):
    from transformers import AutoTokenizer

    assert (trained.bos_id, trained.eos_id, trained.pad_id, trained.vocab_size) == (0, 1, 2, 600)
    texts = gsm8k_questions[300:500] + EDGE_TEXTS
    ids = trained.encode_batch(texts, eos=True)
    assert all(i[0] == 0 and i[-1] == 1 for i in ids)
    assert trained.decode_batch(ids) == texts
    # Byte-level BPE learned merges: fewer tokens than bytes.
    assert sum(map(len, ids)) < 0.5 * sum(len(t.encode()) for t in texts)

    out = trained.save(tmp_path / "bpe")
    reloaded = load_tokenizer(out)
    assert reloaded.encode_batch(texts, eos=True) == ids
    hf = AutoTokenizer.from_pretrained(str(out))
    assert [hf(t)["input_ids"] for t in texts] == [i[:-1] for i in ids]


def test_post_processor_bos_is_not_added_twice_and_stop_ids(trained, tmp_path):
    """A Llama-3-like tokenizer.json: the post-processor adds BOS, no tokenizer_config.json, a list of EOS ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    trained.save(tmp_path / "src")
    tk = HFTokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    tk.add_special_tokens(["<|eot_id|>"])
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert tk.encode("x y").ids[0] == 0  # the file itself adds BOS ...
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("x y")
    assert ids[0] == 0 and 0 not in ids[1:]  # ... and w2s adds it exactly once
    assert tok.add_bos and tok.eos_id == 1
    eot = tok.token_to_id("<|eot_id|>")
    assert eot == 600 and tok.stop_ids == {1, 2, eot}


def test_files_are_read_as_transformers_reads_them(trained, gsm8k_questions, tmp_path):
    """special_tokens_map.json's tokens win over tokenizer_config.json's and chat_template.jinja over the config's
    template (as in AutoTokenizer); truncation / padding stored in tokenizer.json are never applied; save() keeps
    the generation_config.json stop ids; a generator of texts is encoded, not consumed by the type check."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    src = trained.save(tmp_path / "src")
    tk = HFTokenizer.from_file(str(src / "tokenizer.json"))
    tk.enable_truncation(max_length=8)
    tk.enable_padding(pad_id=2, pad_token=trained.decode([2], skip_special=False))
    tk.save(str(src / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "config's"}))
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }} from the jinja file")
    pad_text = trained.decode([2], skip_special=False)
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": pad_text}}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok, hf = load_tokenizer(src), AutoTokenizer.from_pretrained(str(src))
    assert tok.eos_id == hf.eos_token_id == 2
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == \
        hf.apply_chat_template(messages, tokenize=False) == "Hi from the jinja file"
    texts = gsm8k_questions[:4]
    assert tok.encode_batch(texts) == [hf(t)["input_ids"] for t in texts] and len(tok.encode(texts[0])) > 8
    assert tok.encode_batch(t for t in texts) == tok.encode_batch(texts)
    assert load_tokenizer(tok.save(tmp_path / "copy")).stop_ids == tok.stop_ids == {1, 2}


def test_bad_inputs(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_tokenizer(tmp_path / "no_such_dir")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model: not a valid SentencePiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizers"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(_touch(tmp_path / "vocab.txt"))

    good = trained.save(tmp_path / "good")
    (good / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json:1: not valid JSON \("):
        load_tokenizer(good)
    (good / "tokenizer_config.json").write_text("{}")
    (good / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    with pytest.raises(ValueError, match="special_tokens_map.json: eos_token '<end>' is not in the vocabulary"):
        load_tokenizer(good)  # its tokens win over tokenizer_config.json's, as in transformers
    (good / "special_tokens_map.json").unlink()
    (good / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: bos_token '<bos>' is not in the vocabulary"):
        load_tokenizer(good)

    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary \[0, 600\)"):
        trained.decode([5, 600])
    with pytest.raises(ValueError, match="list of str"):
        trained.encode_batch("one string")
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_bpe(["abc"], vocab_size=100)


def _touch(path):
    path.write_text("x")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Chat templates: rendered by w2s and by transformers from the same tokenizer_config.json
# ---------------------------------------------------------------------------------------------------------------

# The chat_template strings published in the tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct and
# google/gemma-2b-it ("\\n" is a backslash-n inside the template's string literals, as in the JSON files).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
CHAT_TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
}  # fmt: skip
USER = {"role": "user", "content": "  A train leaves at 3 pm.\nWhen does it arrive?  "}
REPLY = {"role": "assistant", "content": "At 5 pm. The final answer is $\\boxed{5}$"}
FOLLOW_UP = {"role": "user", "content": "And é 日本 🙂 {braces} <tags>?"}
SYSTEM = {"role": "system", "content": "You are participating in an international Math competition."}


def _chat_dir(tmp_path, family, template):
    """A small trained BPE with the family's special tokens and a tokenizer_config.json holding the template."""
    tokens = CHAT_TOKENS[family]
    tok = train_bpe(["A train leaves at 3 pm. When does it arrive? At 5 pm."] * 20, vocab_size=300,
                    special_tokens=tokens)  # fmt: skip
    directory = tok.save(tmp_path / family)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("family, template", [("llama3", LLAMA3_TEMPLATE), ("gemma", GEMMA_TEMPLATE)])
def test_chat_template_renders_as_transformers(tmp_path, family, template):
    from transformers import PreTrainedTokenizerFast

    directory = _chat_dir(tmp_path, family, template)
    ours, theirs = load_tokenizer(directory), PreTrainedTokenizerFast.from_pretrained(str(directory))
    conversations = [[USER], [USER, REPLY, FOLLOW_UP]] + ([[SYSTEM, USER]] if family == "llama3" else [])
    for messages in conversations:
        for add in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected, (messages, add)
    text = ours.apply_chat_template([USER])
    assert text.startswith(CHAT_TOKENS[family][0])  # the template writes BOS: encode with bos=False
    assert ours.encode(text, bos=False)[0] == ours.bos_id


def test_chat_template_errors_and_helpers(tmp_path):
    import jinja2
    from transformers import PreTrainedTokenizerFast

    gemma = load_tokenizer(_chat_dir(tmp_path, "gemma", GEMMA_TEMPLATE))
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        gemma.apply_chat_template([SYSTEM, USER])
    helpers = ("{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
               "{{ m | tojson }}\n  {% endfor %}{{ eos_token }}")  # fmt: skip
    directory = _chat_dir(tmp_path / "h", "llama3", helpers)
    expected = PreTrainedTokenizerFast.from_pretrained(str(directory)).apply_chat_template(
        [FOLLOW_UP, USER], tokenize=False)  # fmt: skip
    assert load_tokenizer(directory).apply_chat_template([FOLLOW_UP, USER], add_generation_prompt=False) == expected

    base = train_bpe(["plain text"] * 5, vocab_size=270).save(tmp_path / "base")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: no chat_template") as err:
        load_tokenizer(base).apply_chat_template([USER])
    assert len(str(err.value).splitlines()) == 1


def test_instruct_model_stops_on_its_end_of_turn_token(tmp_path):
    """Llama-3-Instruct's generation_config.json lists <|end_of_text|> and <|eot_id|>; the sampler stops on both."""
    from w2s.sampling import _eos_ids

    directory = _chat_dir(tmp_path, "llama3", LLAMA3_TEMPLATE)
    tok = load_tokenizer(directory)
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.eos_id == end and eot in tok.stop_ids
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eot]}))
    assert _eos_ids(None, load_tokenizer(directory)) == {end, eot}
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))
    assert _eos_ids(None, load_tokenizer(directory)) == {end, eot}
