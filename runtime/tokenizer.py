"""The converted directory's tokenizer: tokenizer.json read by Hugging Face `tokenizers`, the named
special tokens and the chat template of tokenizer_config.json (or chat_template.jinja), and the
incremental decoder that turns generated tokens into text as they come."""
import os
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders

from ..formats import FormatError, files
from .chat_template import ChatTemplate

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
# The tokens that transformers hands to chat templates by name (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """encode / decode as transformers does for Qwen3 (no tokens added around the text; decode
    skips special tokens), and the chat template."""

    def __init__(self, backend, special_tokens, chat_template_source, where):
        self._backend = backend
        self.special_tokens = special_tokens  # {"eos_token": "<|im_end|>", ...}: the template sees them
        self._chat_template_source = chat_template_source
        self._chat_template = None
        self._where = where

    @classmethod
    def from_directory(cls, directory):
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not os.path.lexists(path):
            raise ValueError(f"{directory}: no {TOKENIZER_FILE}: this model has no tokenizer (token ids only)")
        try:
            backend = BackendTokenizer.from_str(_read_text(path))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
            raise FormatError(f"{path}: not a tokenizer file: {error}") from None
        config = _read_json(directory / CONFIG_FILE)
        special_tokens = _named_special_tokens({**_read_json(directory / SPECIAL_TOKENS_FILE), **config})
        template = directory / TEMPLATE_FILE  # transformers prefers it to tokenizer_config.json's
        source = _read_text(template) if os.path.lexists(template) else config.get("chat_template")
        return cls(backend, special_tokens, source, directory)

    def encode(self, text):
        """Token ids of `text` as it is: special tokens written in it are recognised, none added."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decoder(self):
        """A new IncrementalDecoder over this tokenizer."""
        return IncrementalDecoder(self)

    def token_bytes(self, token):
        """The bytes one token stands for: with a byte-level vocabulary (Qwen's) a token may hold
        part of a UTF-8 character, which decode() would show as U+FFFD. An id the tokenizer lacks
        stands for none, as decode() gives it no text: a model's output head may have more rows
        than its tokenizer has tokens (Qwen3's 151936 for 151669), and the model may pick one."""
        piece = self._backend.id_to_token(int(token))
        if piece is None:
            return b""
        if not isinstance(self._backend.decoder, decoders.ByteLevel) or \
                int(token) in self._backend.get_added_tokens_decoder():  # added tokens are stored as text
            return self.decode([token], skip_special_tokens=False).encode()
        return bytes(BYTE_OF_CHARACTER[c] for c in piece)

    @property
    def chat_template(self):
        """The ChatTemplate, compiled on first use."""
        if self._chat_template is None:
            if self._chat_template_source is None:
                raise ValueError(f"{self._where}: no chat template (neither {TEMPLATE_FILE} nor a chat_template "
                                 f"in {CONFIG_FILE})")
            self._chat_template = ChatTemplate(self._chat_template_source, self.special_tokens)
        return self._chat_template


def _byte_level_alphabet():
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in a vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHARACTER = _byte_level_alphabet()


def _read_text(path):
    """A text file of the directory, which may be hostile: a regular file of bounded size, UTF-8."""
    with files.open_regular(path, str(path), FormatError) as f:
        data = files.read_bounded(f, files.MAX_JSON_BYTES, str(path), FormatError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"{path}: not UTF-8 text: {error}") from None


def _read_json(path):
    """The JSON object in `path`, {} when there is no such file."""
    if not os.path.lexists(path):
        return {}
    document = files.parse_json(_read_text(path), str(path), FormatError)
    if not isinstance(document, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return document


def _named_special_tokens(config):
    """bos_token, eos_token, ... as strings; tokenizer_config.json writes each as a string or as an
    AddedToken object {"content": ...}."""
    tokens = {}
    for name in NAMED_SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


class IncrementalDecoder:
    """Text of a growing token sequence, piece by piece, at constant cost per token: each step
    decodes only a short window (the tokens since the last emitted piece and the one before), and
    holds back a piece while it ends in an incomplete UTF-8 character (decoded as U+FFFD), so that
    no character is ever emitted half. The pieces, finish() included, join into
    tokenizer.decode(all tokens)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids = []
        self._prefix_start = 0  # the window's first token: context for the decoder (spaces, merges)
        self._read_start = 0    # the first token whose text is not emitted yet

    def add(self, token):
        """The new text that `token` completes ('' while a character is still incomplete)."""
        self._ids.append(int(token))
        prefix = self._tokenizer.decode(self._ids[self._prefix_start:self._read_start])
        text = self._tokenizer.decode(self._ids[self._prefix_start:])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self._prefix_start, self._read_start = self._read_start, len(self._ids)
        return text[len(prefix):]

    def finish(self):
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD, as in decode)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_start:self._read_start])
        text = self._tokenizer.decode(self._ids[self._prefix_start:])
        self._prefix_start = self._read_start = len(self._ids)
        return text[len(prefix):]
