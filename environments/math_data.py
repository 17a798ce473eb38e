"""Math problem datasets: evaluation / training files through tensorflow-datasets, and
procedural training problems from reasoning-gym.

**Files (jsonl or parquet) -> tfds.** ``MathFileBuilder`` is a ``tfds.core.GeneratorBasedBuilder``
that prepares any local jsonl / parquet file into ArrayRecord shards once (under
``data_dir``) and reads them back with ``as_data_source()`` -- random access, no TensorFlow
needed (tensorflow-datasets 4.9.10 + array_record). The columns are mapped by a
``FieldMap``: dotted paths (``reward_model.ground_truth``) and chat-message lists (the last
user message's ``content``) are understood, so DAPO-Math-17k's verl parquet and jsonl copies load
with ``FieldMap(prompt="prompt", answer="reward_model.ground_truth")``. The builder config name
includes a hash of the file paths, sizes, modification times and the field map, so a changed file
is prepared again. Records are stored in tfds's deterministic (key-hashed) order.

The bundled evaluation sets (``data/math/``, see its PROVENANCE.md) are ``aime2024``,
``aime2025``, ``math500`` and ``gsm8k_test``; ``bundled_math_builder(name, data_dir)`` builds them.

**Host sharding.** ``load_problems(builder, split, shard_index, shard_count)`` reads the
``shard_index``-th of ``shard_count`` even, disjoint, contiguous parts of a split
(``tfds.even_splits``); every host of a pod passes its process index / count.

**Procedural.** ``ProceduralProblems(name, seed, size)`` draws problems from a reasoning-gym
generator (``gsm_symbolic``, ``basic_arithmetic``, ``chain_sum``, ...): problem ``i`` depends only
on ``(name, seed, i)``. Sharding takes every ``shard_count``-th index. Answers are graded with
the generator's own exact scorer (``ProceduralProblems.grade`` is a ``MathToolEnv`` grader).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from environments.math_grading import Grade, extract_final_answer

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "math")
BUNDLED_SETS = ("aime2024", "aime2025", "math500", "gsm8k_test")
# The instruction the reference appends to every problem.
ANSWER_FORMAT_INSTRUCTION = "The answer format must be: \\boxed{'The final answer goes here.'}"


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """One problem: ``problem`` is the bare problem text (no instruction appended)."""

    id: str
    problem: str
    answer: str
    source: str


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the problem, the answer and the id (dotted paths allowed).

    ``id`` may be None: records are then named ``<file stem>-<line index>``.
    """

    prompt: str = "problem"
    answer: str = "answer"
    id: str | None = "id"


def _lookup(record: Mapping[str, Any], path: str, what: str, where: str) -> Any:
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(f"{where}: field {path!r} ({what}) not found; record keys: {sorted(record)}")
        value = value[key]
    return value


def _as_text(value: Any, what: str, where: str) -> str:
    """A field value as text: strings as is, numbers via str, chat lists -> last user content."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        users = [m for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _as_text(value[0], what, where)
    raise TypeError(f"{where}: {what} must be text, a number or a chat message list, "
                    f"got {type(value).__name__}")


def _read_records(path: str) -> Iterator[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({err})") from err
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from err
        yield from pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"unsupported file type {path!r}: use .jsonl or .parquet")


class MathFileConfig(tfds.core.BuilderConfig):
    """A set of split files and the field map used to read them."""

    def __init__(self, *, files: Mapping[str, str], fields: FieldMap, source: str):
        if not files:
            raise ValueError("files must name at least one split, e.g. {'train': 'x.jsonl'}")
        resolved = {}
        for split, path in files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"files[{split!r}]: no such file {path!r}")
            resolved[split] = os.path.abspath(path)
        fingerprint = json.dumps(
            {"files": {s: [p, os.path.getsize(p), os.path.getmtime(p)] for s, p in sorted(resolved.items())},
             "fields": dataclasses.asdict(fields)}, sort_keys=True)
        digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
        super().__init__(name=f"{source}_{digest}", version="1.0.0",
                         description=f"{source}: {', '.join(sorted(resolved))}")
        self.files, self.fields, self.source = resolved, fields, source


class MathFileBuilder(tfds.core.GeneratorBasedBuilder):
    """tfds builder over local jsonl / parquet math files (see module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list = []

    def __init__(self, *, config: MathFileConfig, data_dir: str):
        super().__init__(config=config, data_dir=data_dir, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, description=self.builder_config.description,
            features=tfds.features.FeaturesDict({"id": text, "problem": text, "answer": text,
                                                 "source": text}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in self.builder_config.files.items()}

    def _generate_examples(self, path: str):
        fields, source = self.builder_config.fields, self.builder_config.source
        stem = os.path.splitext(os.path.basename(path))[0]
        seen = set()
        for index, record in enumerate(_read_records(path)):
            where = f"{path} record {index}"
            problem = _as_text(_lookup(record, fields.prompt, "prompt", where), "prompt", where)
            answer = _as_text(_lookup(record, fields.answer, "answer", where), "answer", where)
            pid = (_as_text(_lookup(record, fields.id, "id", where), "id", where)
                   if fields.id is not None else f"{stem}-{index}")
            if pid in seen:
                raise ValueError(f"{where}: duplicate id {pid!r} (set FieldMap(id=None) to number records)")
            seen.add(pid)
            yield pid, {"id": pid, "problem": problem, "answer": answer, "source": source}


def math_file_builder(files: Mapping[str, str], data_dir: str, fields: FieldMap = FieldMap(),
                      source: str | None = None) -> MathFileBuilder:
    """A prepared builder over ``files`` (split name -> path); prepares on first use."""
    if source is None:
        source = os.path.splitext(os.path.basename(next(iter(files.values()))))[0]
    source = "".join(c if c.isalnum() else "_" for c in source).lower()
    builder = MathFileBuilder(config=MathFileConfig(files=files, fields=fields, source=source),
                              data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def bundled_math_builder(name: str, data_dir: str) -> MathFileBuilder:
    """A builder over one bundled evaluation set; its single split is ``test``."""
    if name not in BUNDLED_SETS:
        raise ValueError(f"unknown bundled math set {name!r}; choose one of {BUNDLED_SETS}")
    return math_file_builder({"test": os.path.join(BUNDLED_DIR, f"{name}.jsonl")}, data_dir,
                             source=name)


def _check_shard(shard_index: int, shard_count: int) -> None:
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_problems(builder: MathFileBuilder, split: str, shard_index: int = 0,
                  shard_count: int = 1) -> list[MathProblem]:
    """This host's part of ``split`` (tfds split syntax, e.g. ``train[:10%]``) as problems."""
    _check_shard(shard_index, shard_count)
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(f"unknown split {split!r}; available: {sorted(builder.info.splits)}")
    shard = tfds.even_splits(split, n=shard_count)[shard_index]
    source = builder.as_data_source(split=shard)
    return [MathProblem(**{k: _decode(v) for k, v in source[i].items()}) for i in range(len(source))]


class ProceduralProblems(Sequence[MathProblem]):
    """Problems from a reasoning-gym generator, deterministic in ``(name, seed, index)``.

    ``shard_index`` / ``shard_count`` keep indices ``shard_index, shard_index + shard_count,
    ...`` of the ``size`` generated problems.
    """

    def __init__(self, name: str, seed: int, size: int, shard_index: int = 0, shard_count: int = 1,
                 **generator_options: Any):
        import reasoning_gym

        _check_shard(shard_index, shard_count)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        try:
            self._dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **generator_options)
        except Exception as err:  # noqa: BLE001 (reasoning-gym raises plain errors for bad names/options)
            raise ValueError(f"reasoning-gym dataset {name!r} with options {generator_options}: {err}") from err
        self.name, self._indices = name, range(shard_index, size, shard_count)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):  # Sequence protocol: int -> MathProblem
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index = self._indices[i]
        entry = self._dataset[index]
        return MathProblem(id=f"{self.name}-{index}", problem=entry["question"],
                           answer=str(entry["answer"]), source=self.name)

    def grade(self, response: str, problem: MathProblem) -> Grade:
        """A ``MathToolEnv`` grader: the boxed answer of the response's answer window, scored
        by the generator; correct iff its score is 1 (reward +1, else -1)."""
        extracted = extract_final_answer(response)
        if extracted is None or not extracted.strip():
            return Grade(score=-1.0, correct=False, extracted=extracted, incomplete=True)
        try:
            correct = self.score(problem, extracted) >= 1.0
        except Exception as err:  # noqa: BLE001 (a generator's scorer failing on odd text)
            return Grade(score=-1.0, correct=False, extracted=extracted, incomplete=False,
                         grader_error=f"{type(err).__name__}: {err}")
        return Grade(score=1.0 if correct else -1.0, correct=correct, extracted=extracted,
                     incomplete=False)

    def score(self, problem: MathProblem, answer: str) -> float:
        """The generator's own score in [0, 1] of ``answer`` for ``problem``."""
        index = int(problem.id.rsplit("-", 1)[1])
        return float(self._dataset.score_answer(answer, self._dataset[index]))
