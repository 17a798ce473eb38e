"""Train the small SentencePiece model of the ``tiny`` preset (spear_jax/model/assets/tiny_spm.model).

Training text, generated offline:
  * TextWorldExpress: episodes of every game (train fold), half following the gold action
    sequence and half taking random valid actions; task descriptions, observations, valid-action
    lists and actions, written as ChatML turns with <think>/<action> tags as the agents see them.
  * Math: problems and solutions from data/math/*.jsonl (GSM8K test, MATH-500, AIME), with
    <tool_call>/<tool_response> wrapped snippets.
  * Python: a few standard-library modules (code with indentation).

The model keeps whitespace exactly (identity normalisation, no whitespace collapsing, no dummy
prefix, whitespace-only pieces allowed), falls back to bytes for unseen characters, splits
digits, and reserves atomic symbols for the chat and tool markers.

    python scripts/train_tokenizer.py --math_dir /work/shared/data/math
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random

import sentencepiece as spm

USER_SYMBOLS = [
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<action>", "</action>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
]
STDLIB_MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "fractions.py", "heapq.py",
                  "bisect.py", "statistics.py", "string.py", "functools.py", "random.py"]


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def textworld_express_text(episodes: int, seed: int) -> list[str]:
    from textworld_express import TextWorldExpressEnv

    rng = random.Random(seed)
    env = TextWorldExpressEnv(envStepLimit=50)
    docs = []
    for game in env.getGameNames():
        env.load(gameName=game, gameParams="")
        seeds = env.getValidSeedsTrain()
        for episode in range(episodes):
            obs, info = env.reset(seed=seeds[episode % len(seeds)], gameFold="train", generateGoldPath=True)
            gold = env.getGoldActionSequence() if episode % 2 == 0 else None
            parts = [chatml("system", "You are an agent in a text world. Think, then act with "
                                      "<action>...</action>."),
                     chatml("user", f"Task: {info['taskDescription']}\n\n{obs}\n\nValid actions: "
                                    + ", ".join(sorted(info["validActions"])))]
            for step in range(len(gold) if gold else rng.randint(3, 15)):
                action = gold[step] if gold else rng.choice(sorted(info["validActions"]))
                thought = f"I should {action} next." if rng.random() < 0.5 else "Let me look at the options."
                parts.append(chatml("assistant", f"<think>{thought}</think>\n<action>{action}</action>"))
                obs, reward, done, info = env.step(action)
                parts.append(chatml("user", f"{obs}\nScore: {info['score']}"))
                if done:
                    break
            docs.append("".join(parts))
    env.close()
    return docs


def math_text(math_dir: str) -> list[str]:
    docs = []
    for path in sorted(glob.glob(os.path.join(math_dir, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                reply = row.get("solution", "") + f"\n\nThe answer is \\boxed{{{row['answer']}}}."
                docs.append(chatml("user", row["problem"]) + chatml("assistant", reply))
                docs.append(
                    "<tool_call>\nprint(" + repr(row["answer"]) + ")\n</tool_call>\n<tool_response>\n"
                    + str(row["answer"]) + "\n</tool_response>\n"
                )
    return docs


def python_text() -> list[str]:
    docs = []
    for module in STDLIB_MODULES:
        with open(os.path.join(os.path.dirname(os.__file__), module)) as f:
            docs.append(f.read())
    return docs


def train(docs: list[str], output_prefix: str, vocab_size: int, seed: int) -> None:
    # SentencePiece reads one sentence per line; keep newlines inside a document by training on
    # line-sized sentences that include their trailing newline as the byte "\n" symbol.
    sentences = []
    for doc in docs:
        sentences.extend(line + "\n" for line in doc.split("\n") if line)
    random.Random(seed).shuffle(sentences)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        user_defined_symbols=USER_SYMBOLS + ["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math_dir", default="/work/shared/data/math")
    parser.add_argument("--episodes_per_game", type=int, default=200)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_prefix", default=os.path.join(
        os.path.dirname(__file__), "..", "spear_jax", "model", "assets", "tiny_spm"))
    args = parser.parse_args()
    if not os.path.isdir(args.math_dir):
        raise FileNotFoundError(f"--math_dir {args.math_dir!r} does not exist")
    docs = textworld_express_text(args.episodes_per_game, args.seed)
    n_twx = len(docs)
    docs += math_text(args.math_dir)
    n_math = len(docs) - n_twx
    docs += python_text()
    print(f"documents: {n_twx} TextWorldExpress episodes, {n_math} math, {len(STDLIB_MODULES)} Python; "
          f"{sum(map(len, docs)) / 1e6:.1f} M characters")
    train(docs, args.output_prefix, args.vocab_size, args.seed)
    os.remove(args.output_prefix + ".vocab")
    print(f"wrote {args.output_prefix}.model")


if __name__ == "__main__":
    main()
