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


# ---------------------------------------------------------------------------------------------------------------
# Conventions pinned by the mutation audit: each expected value comes from the backend library or transformers
# ---------------------------------------------------------------------------------------------------------------


def test_unk_text_and_id_read_and_decode_as_transformers_does(mistral_dirs):
    """"<unk>" in the text is the unk id, as the added special token of the converted tokenizer.json makes it; decoding
    drops it with the other special tokens; a run of text decoded first keeps no leading space."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(mistral_dirs[1]))
    text = "a<unk>b"
    expected = hf(text, add_special_tokens=False)["input_ids"]
    assert 0 in expected
    for tok in map(load_tokenizer, mistral_dirs):
        ids = tok.encode(text, bos=False)
        assert ids == expected, tok.backend
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), tok.backend
        hello = tok.encode("Hello", bos=False, eos=True)
        assert tok.decode(hello, skip_special=False) == hf.decode(hello, skip_special_tokens=False), tok.backend


def test_a_tokenizer_model_under_its_versioned_name_loads(mistral_dirs):
    """mistral-common ships tokenizer.model.v1: read as a SentencePiece model like tokenizer.model."""
    import sentencepiece

    path = _mistral_model_path()
    tok = load_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert tok.backend == "sentencepiece" and (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.encode("Hello") == [sp.bos_id()] + sp.encode("Hello")


def test_sentencepiece_special_ids_at_zero_are_the_models_own(tmp_path):
    """A SentencePiece model whose pad is id 0 under an unusual name ([PAD]): id 0 is a real id, not "none"."""
    import io

    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a train leaves at 3 pm when does it arrive"] * 50), model_writer=proto,
        vocab_size=24, pad_id=0, pad_piece="[PAD]", unk_id=1, bos_id=2, eos_id=3, minloglevel=2)  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    tok = load_tokenizer(tmp_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (sp.pad_id(), sp.bos_id(), sp.eos_id()) == (0, 2, 3)


def _word_level_dir(tmp_path, post_processor=None, config=None, generation_config=None):
    """A word-level tokenizer.json (no BOS/EOS/pad names w2s would find by itself) with optional files beside it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "<first>": 1, "<second>": 2, "a": 3, "b": 4, "c": 5}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<first>", "<second>"])
    if post_processor is not None:
        tk.post_processor = post_processor
    tmp_path.mkdir(parents=True, exist_ok=True)
    tk.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path, tk


def test_bos_of_a_sequence_post_processor_is_the_token_it_puts_first(tmp_path):
    """Llama-3's tokenizer.json nests its TemplateProcessing in a Sequence (after ByteLevel): BOS is the token the
    whole post-processor puts first, as the tokenizers library itself encodes."""
    from tokenizers import processors

    first = processors.TemplateProcessing(single="<first> $A", special_tokens=[("<first>", 1)])
    second = processors.TemplateProcessing(single="<second> $A", special_tokens=[("<second>", 2)])
    for name, processor in [("llama3", processors.Sequence([processors.ByteLevel(), first])),
                            ("two", processors.Sequence([first, second]))]:
        directory, tk = _word_level_dir(tmp_path / name, processor)
        tok = load_tokenizer(directory)
        assert tok.encode("a b c") == tk.encode("a b c").ids == [1, 3, 4, 5], name


def test_add_bos_token_without_a_bos_token_and_eos_without_an_eos_token_are_refused(tmp_path):
    directory, _ = _word_level_dir(tmp_path / "bos", config={"add_bos_token": True})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: add_bos_token is true but no bos_token"):
        load_tokenizer(directory)
    tok = load_tokenizer(_word_level_dir(tmp_path / "eos")[0])
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (None, None, False)
    with pytest.raises(ValueError, match=r"eos=True\): this tokenizer has no eos_token"):
        tok.encode("a", eos=True)


def test_a_single_generation_config_eos_id_is_a_stop_id(tmp_path):
    """generation_config.json's eos_token_id may be one int (transformers' GenerationConfig reads either form)."""
    import transformers

    directory, _ = _word_level_dir(tmp_path, config={"eos_token": "<second>"}, generation_config={"eos_token_id": 5})
    assert transformers.GenerationConfig.from_pretrained(directory).eos_token_id == 5
    assert load_tokenizer(directory).stop_ids == {2, 5}


def test_negative_ids_are_refused_by_decode(trained):
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary \[0, 600\)"):
        trained.decode([5, -1])


def test_a_list_of_named_chat_templates_renders_the_default_one(tmp_path):
    """tokenizer_config.json may hold [{"name", "template"}, ...]: transformers renders the one named "default"."""
    from transformers import PreTrainedTokenizerFast

    templates = [{"name": "tool_use", "template": "tools: {{ messages[0]['content'] }}"},
                 {"name": "default", "template": "default: {{ messages[0]['content'] }}"}]
    directory = _chat_dir(tmp_path, "llama3", templates)
    expected = PreTrainedTokenizerFast.from_pretrained(str(directory)).apply_chat_template([USER], tokenize=False)
    assert expected.startswith("default: ")
    assert load_tokenizer(directory).apply_chat_template([USER]) == expected


def test_a_chat_template_gets_the_bos_token_the_post_processor_adds(tmp_path):
    """No tokenizer_config.json bos_token: the template's bos_token is the token tokenizer.json's post-processor puts
    first (the BOS w2s prepends), not an empty string."""
    from tokenizers import processors

    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    processor = processors.TemplateProcessing(single="<first> $A", special_tokens=[("<first>", 1)])
    directory, _ = _word_level_dir(tmp_path, processor, config={"chat_template": template})
    assert load_tokenizer(directory).apply_chat_template([{"role": "user", "content": "a b"}]) == "<first>a b"


def test_add_bos_token_false_over_a_bos_post_processor_is_saved_for_transformers(tmp_path):
    """tokenizer_config.json turns BOS off although tokenizer.json's post-processor adds it: save() writes a
    post-processor without it, so that AutoTokenizer (which follows tokenizer.json) encodes as w2s does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    processor = processors.TemplateProcessing(single="<first> $A", special_tokens=[("<first>", 1)])
    directory, tk = _word_level_dir(tmp_path / "src", processor, config={"add_bos_token": False,
                                                                          "bos_token": "<first>"})
    plain = tk.encode("a b c", add_special_tokens=False).ids
    tok = load_tokenizer(directory)
    assert tok.encode("a b c") == plain
    hf = AutoTokenizer.from_pretrained(str(tok.save(tmp_path / "out")))
    assert hf("a b c")["input_ids"] == plain


def test_vocab_size_counts_added_tokens_as_transformers_does(trained, tmp_path):
    """An added special token (<|eot_id|>, past the trained vocabulary) is an id the embedding must cover."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    directory = trained.save(tmp_path / "t")
    tk = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    tk.add_special_tokens(["<|eot_id|>"])
    tk.save(str(directory / "tokenizer.json"))
    tok = load_tokenizer(directory)
    assert tok.vocab_size == len(AutoTokenizer.from_pretrained(str(directory))) == 601
    assert tok.decode([600], skip_special=False) == "<|eot_id|>"


def test_well_known_token_names_stand_in_for_a_missing_tokenizer_config(tmp_path):
    """A tokenizer.json alone (Llama-3's and Gemma's spellings, no tokenizer_config.json): EOS, pad and the
    end-of-turn stop token are found by name, and the chat template gets that EOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    names = ["<|end_of_text|>", "<|finetune_right_pad_id|>", "<end_of_turn>"]
    tk = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(names)
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    eos, pad, end_of_turn = map(tk.token_to_id, names)
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (eos, pad, {eos, end_of_turn})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"
                                                                                 "{{ eos_token }}"}))
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "a<|end_of_text|>"


def test_special_tokens_maps_unk_token_wins_in_the_chat_template_as_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    template = "{{ unk_token }}|{{ messages[0]['content'] }}"
    directory, _ = _word_level_dir(tmp_path, config={"chat_template": template, "unk_token": "[UNK]"})
    (directory / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<second>"}))
    messages = [{"role": "user", "content": "a"}]
    expected = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(messages, tokenize=False)
    assert load_tokenizer(directory).apply_chat_template(messages) == expected == "<second>|a"


def test_save_copies_the_tokenizer_file_byte_for_byte_and_keeps_a_generation_config_there(tmp_path):
    """A tokenizer.json that needs no new post-processor is copied as it was written (here compact JSON), and a
    checkpoint directory's own generation_config.json is not replaced by the one the tokenizer was loaded with."""
    from tokenizers import processors

    processor = processors.TemplateProcessing(single="<first> $A", special_tokens=[("<first>", 1)])
    directory, _ = _word_level_dir(tmp_path / "src", processor, config={"bos_token": "<first>"},
                                   generation_config={"eos_token_id": 2})
    compact = json.dumps(json.loads((directory / "tokenizer.json").read_text()), separators=(",", ":"))
    (directory / "tokenizer.json").write_text(compact)
    out = tmp_path / "out"
    out.mkdir()
    own = {"eos_token_id": 5, "temperature": 0.6}
    (out / "generation_config.json").write_text(json.dumps(own))
    load_tokenizer(directory).save(out)
    assert (out / "tokenizer.json").read_text() == compact
    assert json.loads((out / "generation_config.json").read_text()) == own


def test_train_bpe_needs_room_for_every_byte_and_special_token():
    with pytest.raises(ValueError, match=r"vocab_size 258 < 259 \(256 bytes \+ 3 special tokens\)"):
        train_bpe(["abc"], vocab_size=258)
