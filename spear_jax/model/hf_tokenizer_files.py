"""The tokenizer and chat-template files of a Hugging Face model directory.

``write_tokenizer_files`` writes what ``transformers.AutoTokenizer.from_pretrained`` (and vLLM)
load to get the project's token ids and chat template back:

* a ``tokenizer.json`` tokenizer (``HFTokenizer``): ``tokenizer.json`` + ``tokenizer_config.json``
  naming ``PreTrainedTokenizerFast``;
* a SentencePiece model (``SentencePieceTokenizer``, e.g. the ``tiny`` preset's): the model file
  as ``tokenizer.model`` + ``tokenizer_config.json`` naming ``LlamaTokenizer``, which transformers
  builds from the SentencePiece model, with ``add_prefix_space`` set from the model's
  ``add_dummy_prefix``, no BOS/EOS added by ``encode`` and ``legacy`` off (user-defined pieces
  such as ``<|im_start|>`` stay atomic).

Both configs carry the special tokens (BOS, EOS = the chat format's stop token, PAD) and the chat
template as Jinja, rendering exactly ``ChatTemplate.render_text``.
"""
from __future__ import annotations

import json
import os
import shutil

from spear_jax.model.chat_template import FORMATS
from spear_jax.model.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return json.dumps(text)


def chat_template_jinja(format: str) -> str:
    """Jinja chat template of chat ``format`` (``chatml`` | ``llama3``): the conversation prefix,
    then per message header + content + end token + separator, then the assistant header when
    ``add_generation_prompt`` (the text ``ChatTemplate.render_text`` produces)."""
    if format not in FORMATS:
        raise ValueError(f"unknown chat format {format!r}; available: {sorted(FORMATS)}")
    spec = FORMATS[format]
    names = "{" + ", ".join(f"{_jinja_string(k)}: {_jinja_string(v)}" for k, v in spec.role_names.items()) + "}"
    if spec.header_close is None:
        header = f"{_jinja_string(spec.header_open)} + names[role] + {_jinja_string(spec.header_text_after_role)}"
    else:
        header = (f"{_jinja_string(spec.header_open)} + names[role] + "
                  f"{_jinja_string(spec.header_close + spec.header_text_after_role)}")
    end = _jinja_string(spec.end_token + spec.text_after_end)
    return (
        f"{{% set names = {names} %}}"
        f"{{{{ {_jinja_string(''.join(spec.conversation_prefix))} }}}}"
        "{% for message in messages %}{% set role = message['role'] %}"
        f"{{{{ {header} + message['content'] + {end} }}}}"
        "{% endfor %}{% if add_generation_prompt %}{% set role = 'assistant' %}"
        f"{{{{ {header} }}}}{{% endif %}}"
    )


def _special_tokens(tokenizer: Tokenizer, eos_id: int) -> dict:
    tokens = {"eos_token": tokenizer.id_to_token(eos_id), "pad_token": tokenizer.id_to_token(tokenizer.pad_id)}
    if tokenizer.bos_id is not None:
        tokens["bos_token"] = tokenizer.id_to_token(tokenizer.bos_id)
    return tokens


def write_tokenizer_files(
    tokenizer: Tokenizer, chat_format: str, eos_id: int, directory: str, model_max_length: int
) -> list[str]:
    """Writes ``tokenizer``'s files and ``tokenizer_config.json`` (special tokens, EOS
    ``eos_id``, the chat template of ``chat_format``) into ``directory``; returns the file names."""
    config = {
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "chat_template": chat_template_jinja(chat_format),
        **_special_tokens(tokenizer, eos_id),
    }
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.path, os.path.join(directory, "tokenizer.model"))
        config.update(tokenizer_class="LlamaTokenizer", legacy=False,
                      add_prefix_space=bool(tokenizer.add_dummy_prefix), unk_token=tokenizer.id_to_token(tokenizer.unk_id))
        files = ["tokenizer.model"]
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        files = ["tokenizer.json"]
    else:
        raise TypeError(f"no Hugging Face file format for a {type(tokenizer).__name__}")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return files + ["tokenizer_config.json"]
