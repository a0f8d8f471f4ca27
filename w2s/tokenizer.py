"""One tokenizer interface over Hugging Face `tokenizers` (tokenizer.json) and `sentencepiece` (tokenizer.model).

    tok = load_tokenizer("path/to/checkpoint")      # a directory, or the tokenizer.json / tokenizer.model file
    ids = tok.encode("Janet's ducks lay 16 eggs")   # [bos, ...] when the model's convention prepends BOS
    text = tok.decode(ids)                          # special tokens dropped: decode(encode(x)) == x
    tok.bos_id, tok.eos_id, tok.stop_ids, tok.pad_id, tok.vocab_size
    tok.save("out_dir")                             # w2s and transformers' AutoTokenizer both reload it
    tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # instruct models: the checkpoint's chat template

Which file is used: a directory holding both files is read through tokenizer.json. It is the file transformers
itself loads first, it is the only one Llama-3 ships, and its Rust encoder batches in parallel. The test checks that
the two give the same ids on GSM8K (tests/test_tokenizer.py, `python -m pytest -q tests/test_tokenizer.py`).

Special tokens are handled by w2s, not by the backend, so both backends behave the same:
- The text is always encoded WITHOUT the backend's own special tokens (a tokenizer.json post-processor that adds
  BOS would otherwise add it a second time); `encode` then prepends BOS and appends EOS itself.
- Whether BOS is prepended (the model's convention) comes from, in order: tokenizer_config.json "add_bos_token";
  a tokenizer.json post-processor whose template starts with a special token (Llama-3's <|begin_of_text|>);
  otherwise "yes if the model has a BOS token" (Llama-2, Mistral and Gemma all prepend it).
- EOS is appended only where the caller asks (eos=True: the end of a training row). A tokenizer_config.json
  "add_eos_token": true is not followed: it would end every prompt with EOS, and a sampled answer must follow the
  prompt, not a finished sequence.
- Special-token strings that appear in the text ("<s>", "<|eot_id|>") become their ids in both backends, as
  transformers does; SentencePiece alone would spell them out piece by piece.

Chat templates (instruct models such as Llama-3-8B-Instruct): `apply_chat_template` renders the jinja2 template of
tokenizer_config.json ("chat_template") as transformers does: a sandboxed environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the loop controls, and the
special tokens (bos_token, eos_token, ...) as variables. The result is text; encode it with bos=False when the
template writes the BOS token itself (both templates of tests/test_tokenizer.py do).

`train_bpe` trains a small byte-level BPE (special tokens <s>, </s>, <pad>) for tests (the demo's tokenizer is
w2s/world.py train_world_tokenizer).
"""

import json
import re
import shutil
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from w2s.files import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Fallback names, used only when neither tokenizer_config.json nor the model file itself names the token.
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
# End-of-turn tokens of chat models: sampling should stop on them too, not only on the primary EOS.
_END_OF_TURN_NAMES = ("<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|im_end|>")


def _token_text(value):
    """tokenizer_config.json spells a token either as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _HFBackend:
    """tokenizer.json through the `tokenizers` library (Rust; BPE, byte-level BPE or Unigram)."""

    def __init__(self, tk):
        tk.no_truncation()  # a tokenizer.json saved after a truncated or padded call keeps those settings: as
        tk.no_padding()  # transformers does, never apply them (they would cut or pad every encode)
        self.tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = {tok_id for tok_id, added in tk.get_added_tokens_decoder().items() if added.special}

    @classmethod
    def from_file(cls, path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust error text is one line and says what is wrong
            raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from None

    def encode_batch(self, texts):
        # add_special_tokens=False: BOS/EOS are added by Tokenizer.encode, never by the post-processor.
        return [enc.ids for enc in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special):
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def template_bos(self):
        """The special token a TemplateProcessing post-processor puts first, or None (how Llama-3 says 'add BOS')."""
        processor = json.loads(self.tk.to_str()).get("post_processor")
        stack = [processor]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict):
                continue
            if node.get("type") == "Sequence":
                stack.extend(reversed(node.get("processors", [])))
            elif node.get("type") == "TemplateProcessing":
                first = (node.get("single") or [{}])[0]
                if "SpecialToken" in first:
                    return self.tk.token_to_id(first["SpecialToken"]["id"])
        return None


class _SPBackend:
    """tokenizer.model through the `sentencepiece` library (Llama-2, Mistral, Gemma)."""

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        # Control pieces (<s>, </s>, ...) and <unk>: sentencepiece never produces them from text, so w2s splits
        # their spelling out of the text itself, as the tokenizers backend does with its added special tokens.
        self.special_ids = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self.special_by_text = {sp.id_to_piece(i): i for i in self.special_ids}
        pattern = "|".join(re.escape(t) for t in sorted(self.special_by_text, key=len, reverse=True))
        self.special_pattern = re.compile(f"({pattern})") if pattern else None

    @classmethod
    def from_file(cls, path):
        import sentencepiece

        try:
            return cls(sentencepiece.SentencePieceProcessor(model_file=str(path)))
        except Exception as e:
            raise ValueError(f"{path}: not a valid SentencePiece tokenizer.model ({e})") from None

    def _encode_one(self, text):
        if self.special_pattern is None or not self.special_pattern.search(text):
            return self.sp.encode(text)
        ids = []
        for i, part in enumerate(self.special_pattern.split(text)):
            if i % 2:  # odd parts of re.split with one group are the separators: the special tokens
                ids.append(self.special_by_text[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts):
        return [self._encode_one(text) for text in texts]

    def decode(self, ids, skip_special):
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        # Keep special tokens as their text: decode the runs between them. A run that follows a special token keeps
        # its leading "▁" as a space (sentencepiece drops it only at the very start of a sentence).
        out, run = [], []
        for i in list(ids) + [None]:
            if i is not None and i not in self.special_ids:
                run.append(i)
                continue
            if run:
                text = self.sp.decode(run)
                if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run = []
            if i is not None:
                out.append(self.sp.id_to_piece(i))
        return "".join(out)

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only <unk> itself may map to the unk id.
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def native_id(self, name):
        """sentencepiece's own bos/eos/pad id (-1 means the model has none)."""
        i = getattr(self.sp, f"{name}_id")()
        return i if i >= 0 else None

    def template_bos(self):
        return None


class Tokenizer:
    """encode/decode with the model's BOS/EOS convention over either backend. Build with `load_tokenizer`."""

    def __init__(self, backend, config=None, source=None, generation_config=None):
        self._backend = backend
        self._config = dict(config or {})
        self._generation_config = dict(generation_config or {})
        self._source = Path(source) if source is not None else None  # the file it was read from (save copies it)
        where = str(self._source.parent / CONFIG_FILE) if self._source else CONFIG_FILE

        self.bos_id = self._resolve_token("bos_token", where, native="bos")
        template_bos = backend.template_bos()
        if self.bos_id is None:
            self.bos_id = template_bos
        if "add_bos_token" in self._config:
            self.add_bos = bool(self._config["add_bos_token"])
        else:
            self.add_bos = self.bos_id is not None
        if self.add_bos and self.bos_id is None:
            raise ValueError(f"{where}: add_bos_token is true but no bos_token is defined")

        self.eos_id = self._resolve_token("eos_token", where, native="eos", names=_EOS_NAMES)
        pad = self._resolve_token("pad_token", where, native="pad", names=_PAD_NAMES)
        self.pad_id = pad if pad is not None else self.eos_id  # padding is masked out; any id works, EOS is common

        # Every id that ends a generation: the primary EOS, generation_config.json's eos_token_id (an int or a list,
        # Llama-3 lists three) and end-of-turn tokens of chat models.
        stops = {self.eos_id} if self.eos_id is not None else set()
        gen_eos = (generation_config or {}).get("eos_token_id")
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        stops.update(i for i in map(backend.token_to_id, _END_OF_TURN_NAMES) if i is not None)
        self.stop_ids = frozenset(stops)

    def _resolve_token(self, key, where, native, names=()):
        """An id from tokenizer_config.json[key], else the model file's own, else a well-known name, else None."""
        text = _token_text(self._config.get(key))
        if text is not None:
            token_id = self._backend.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{where}: {key} {text!r} is not in the vocabulary")
            return token_id
        if isinstance(self._backend, _SPBackend):
            token_id = self._backend.native_id(native)
            if token_id is not None:
                return token_id
        for name in names:
            token_id = self._backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self):
        """Number of ids the tokenizer can produce (added tokens included); the embedding must be at least this."""
        return self._backend.vocab_size

    @property
    def backend(self):
        """'tokenizers' or 'sentencepiece'."""
        return "tokenizers" if isinstance(self._backend, _HFBackend) else "sentencepiece"

    def token_to_id(self, token):
        """The id of one token string, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    # ---- encode / decode --------------------------------------------------------------------------------------
    def encode(self, text, bos=True, eos=False):
        """Token ids of `text`. bos=True applies the model's BOS convention; eos=True appends the primary EOS."""
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts, bos=True, eos=False):
        """`encode` for a list of strings (the tokenizers backend runs them in parallel)."""
        texts = texts if isinstance(texts, str) else list(texts)  # a generator is read once, here
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_batch expects a list of str")
        if eos and self.eos_id is None:
            raise ValueError("encode(eos=True): this tokenizer has no eos_token")
        prefix = [self.bos_id] if bos and self.add_bos else []
        suffix = [self.eos_id] if eos else []
        return [prefix + ids + suffix for ids in self._backend.encode_batch(list(texts))]

    def decode(self, ids, skip_special=True):
        """Text of `ids`; skip_special=True drops BOS/EOS/pad and other special tokens."""
        ids = [int(i) for i in ids]  # accepts lists, tuples, numpy arrays and 1-D tensors
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"decode: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special)

    def decode_batch(self, batch, skip_special=True):
        return [self.decode(ids, skip_special=skip_special) for ids in batch]

    # ---- chat template ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The text of `messages` ([{"role", "content"}, ...]) in the checkpoint's chat template; with
        add_generation_prompt the header that opens the assistant's turn follows."""
        template = self._config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] (several named templates)
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            where = self._source.parent / CONFIG_FILE if self._source else CONFIG_FILE
            raise ValueError(f"{where}: no chat_template (a base model; prompt it with plain text instead)")
        # The special tokens tokenizer_config.json names (as transformers passes them); BOS / EOS found otherwise
        # (a tokenizer.json post-processor, a well-known name) fill in when the config does not name them.
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {key: _token_text(self._config.get(key)) for key in keys}
        special["bos_token"] = special["bos_token"] or self._id_to_token(self.bos_id)
        special["eos_token"] = special["eos_token"] or self._id_to_token(self.eos_id)
        special = {k: v for k, v in special.items() if v is not None}
        return _compile_chat_template(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **special)  # fmt: skip

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return (
            f"Tokenizer(backend={self.backend}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"add_bos={self.add_bos}, eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)}, pad_id={self.pad_id})"
        )

    # ---- save -------------------------------------------------------------------------------------------------
    def _id_to_token(self, token_id):
        if token_id is None:
            return None
        if isinstance(self._backend, _HFBackend):
            return self._backend.tk.id_to_token(token_id)
        return self._backend.sp.id_to_piece(token_id)

    def save(self, directory):
        """Write the tokenizer file (copied byte for byte when it came from a file), tokenizer_config.json,
        special_tokens_map.json and the generation_config.json it was loaded with (its stop ids), so that
        `load_tokenizer` and transformers' AutoTokenizer reload it unchanged."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = "tokenizer.json" if isinstance(self._backend, _HFBackend) else "tokenizer.model"
        target = directory / name
        hf_needs_rewrite = isinstance(self._backend, _HFBackend) and self._backend.template_bos() != (
            self.bos_id if self.add_bos else None)
        if hf_needs_rewrite:
            # transformers' AutoTokenizer adds BOS only through the tokenizer.json post-processor (it ignores
            # add_bos_token there), so write one that states w2s's convention: "<bos> $A", or just "$A".
            self._backend.tk.save(str(target))
            tk = type(self._backend.tk).from_file(str(target))
            tk.post_processor = self._bos_template()
            tk.save(str(target))
        elif self._source is not None and self._source.exists():
            if self._source.resolve() != target.resolve():
                shutil.copyfile(self._source, target)
        elif isinstance(self._backend, _HFBackend):
            self._backend.tk.save(str(target))
        else:
            target.write_bytes(self._backend.sp.serialized_model_proto())

        special = {
            "bos_token": self._id_to_token(self.bos_id),
            "eos_token": self._id_to_token(self.eos_id),
            "pad_token": self._id_to_token(self.pad_id),
        }
        if isinstance(self._backend, _SPBackend):
            special["unk_token"] = self._backend.sp.id_to_piece(self._backend.sp.unk_id())
        special = {k: v for k, v in special.items() if v is not None}
        # Keep the original config (chat template, tokenizer_class, ...) and state the conventions explicitly.
        config = {**self._config, **special, "add_bos_token": self.add_bos}
        config.setdefault("add_eos_token", False)
        _write_json(directory / CONFIG_FILE, config)
        _write_json(directory / SPECIAL_TOKENS_MAP_FILE, special)
        if self._generation_config and not (directory / GENERATION_CONFIG_FILE).is_file():
            # the stop ids it was loaded with (w2s.save_model writes the model's own over it afterwards)
            _write_json(directory / GENERATION_CONFIG_FILE, self._generation_config)
        return directory

    def _bos_template(self):
        from tokenizers.processors import TemplateProcessing

        if not self.add_bos:
            return TemplateProcessing(single="$A", pair="$A $B:1")
        bos = self._id_to_token(self.bos_id)
        return TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, self.bos_id)])

    # ---- training ---------------------------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts, vocab_size, min_frequency=2, special_tokens=("<s>", "</s>", "<pad>")):
        """Train a byte-level BPE on an iterable of strings. Special tokens get ids 0, 1, 2, ... in order; the first
        three are BOS, EOS and pad. Every string round-trips (byte-level: no unknown characters)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        special_tokens = list(special_tokens)
        if len(special_tokens) < 3:
            raise ValueError(f"train_bpe: special_tokens needs at least bos, eos, pad; got {special_tokens}")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise ValueError(f"train_bpe: vocab_size {vocab_size} < {len(alphabet) + len(special_tokens)} "
                             f"(256 bytes + {len(special_tokens)} special tokens)")
        tk = HFTokenizer(models.BPE())
        # add_prefix_space=False and use_regex=True: GPT-2 style word splitting, the text kept exactly as given.
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=alphabet, show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        bos, eos, pad = special_tokens[:3]
        config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "add_bos_token": True,
                  "add_eos_token": False}
        return cls(_HFBackend(tk), config=config)


@lru_cache(maxsize=8)
def _compile_chat_template(template):
    """A jinja2 template in the environment transformers renders chat templates in (templates are untrusted code:
    sandboxed, immutable)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} marks assistant text for training masks; rendering keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

        def _keep(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def train_bpe(texts, vocab_size, **kwargs):
    """Same as `Tokenizer.train_bpe`."""
    return Tokenizer.train_bpe(texts, vocab_size, **kwargs)


def tokenizer_file(directory):
    """The tokenizer file load_tokenizer reads in a directory (tokenizer.json before tokenizer.model), or None."""
    return next((Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()), None)


def load_tokenizer(path):
    """A `Tokenizer` from a checkpoint directory (tokenizer.json preferred over tokenizer.model) or from one of the
    two files directly. tokenizer_config.json and generation_config.json beside it are read when present."""
    path = Path(path)
    if path.is_dir():
        directory, file = path, tokenizer_file(path)
        if file is None:
            raise FileNotFoundError(f"{directory}: no tokenizer file; expected one of {', '.join(TOKENIZER_FILES)}")
    elif path.is_file():
        directory, file = path.parent, path
    else:
        raise FileNotFoundError(f"{path}: no such tokenizer directory or file; expected a directory holding one of "
                                f"{', '.join(TOKENIZER_FILES)}, or the file itself")

    if ".json" in file.suffixes:
        backend = _HFBackend.from_file(file)
    elif ".model" in file.suffixes:  # also mistral-common's "tokenizer.model.v1"
        backend = _SPBackend.from_file(file)
    else:
        raise ValueError(f"{file}: unknown tokenizer file type; expected tokenizer.json or tokenizer.model")

    config = read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else {}
    # As transformers reads them: special_tokens_map.json's tokens over tokenizer_config.json's, and a
    # chat_template.jinja (where newer transformers saves the template) over the config's chat_template.
    if (directory / SPECIAL_TOKENS_MAP_FILE).is_file():
        tokens = read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(tokens.get(key))
            if text and backend.token_to_id(text) is None:
                raise ValueError(f"{directory / SPECIAL_TOKENS_MAP_FILE}: {key} {text!r} is not in the vocabulary")
            if text:
                config[key] = text
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        config["chat_template"] = (directory / CHAT_TEMPLATE_FILE).read_text()
    gen_path = directory / GENERATION_CONFIG_FILE
    generation_config = read_json(gen_path) if gen_path.is_file() else {}
    return Tokenizer(backend, config=config, source=file, generation_config=generation_config)
