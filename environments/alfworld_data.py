"""The ALFWorld game files: shipped archives, unpacking into a cache, and the game index.

``data/alfworld/json_2.1.1_<split>.tar.xz`` holds one split each (see its PROVENANCE.md). A
split is unpacked on first use into ``<cache>/json_2.1.1/<split>/`` after its archive's sha256
is checked; unpacking goes to a temporary folder that is renamed into place, so an interrupted
unpack never leaves a half split behind. ``<cache>`` is the ``cache_dir`` argument, else
``$SPEAR_JAX_ALFWORLD_CACHE``, else ``~/.cache/spear_jax/alfworld``.

A game is ``<split>/<task folder>/<trial folder>/game.tw-pddl``; its task type is the task
folder's prefix before the first "-" (e.g. ``pick_heat_then_place_in_recep-Egg-None-
CounterTop-13`` -> ``pick_heat_then_place_in_recep``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tarfile
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHIVE_DIR = REPO_ROOT / "data" / "alfworld"
CACHE_ENV_VAR = "SPEAR_JAX_ALFWORLD_CACHE"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/spear_jax/alfworld")
GAME_FILE = "game.tw-pddl"
VERSION_FOLDER = "json_2.1.1"

TASK_TYPES = (
    "pick_and_place_simple",
    "pick_two_obj_and_place",
    "look_at_obj_in_light",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_clean_then_place_in_recep",
)


@dataclasses.dataclass(frozen=True)
class SplitArchive:
    num_games: int
    sha256: str


SPLITS: dict[str, SplitArchive] = {
    "train": SplitArchive(3553, "0ce1ce500c53acaac545c425c120b22c47e2a3057e98a7d938ffe0aff024f16a"),
    "valid_seen": SplitArchive(140, "da11d0d82c5ecdd8dd67ea0e986ef3182255fa3bac237ce656fa66274e218707"),
    "valid_unseen": SplitArchive(134, "f41f911359ca7d14f6758fd09493786176a6dbcbdec37092b1f686e8eb2bef8e"),
    "valid_train": SplitArchive(200, "6fad9e3a00cc692596f8a3ea48424ce9c8b2fb31765ffd8b8408446a15711c35"),
}


@dataclasses.dataclass(frozen=True)
class GameRecord:
    """One ALFWorld game.

    Attributes:
      name: ``<task folder>/<trial folder>``, unique within a split.
      path: absolute path of its ``game.tw-pddl``.
      task_type: one of ``TASK_TYPES``.
    """

    name: str
    path: pathlib.Path
    task_type: str


def task_type_of(task_folder: str) -> str:
    """The task type encoded in a task folder name."""
    task_type = task_folder.split("-", 1)[0]
    if task_type not in TASK_TYPES:
        raise ValueError(f"task folder {task_folder!r} does not start with a known task type {TASK_TYPES}")
    return task_type


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir``, else ``$SPEAR_JAX_ALFWORLD_CACHE``, else ``~/.cache/spear_jax/alfworld``."""
    chosen = cache_dir or os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return pathlib.Path(chosen).expanduser().resolve()


def _check_split(split: str) -> SplitArchive:
    if split not in SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; choose one of {tuple(SPLITS)}")
    return SPLITS[split]


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_split(
    split: str,
    cache_dir: str | os.PathLike | None = None,
    archive_dir: str | os.PathLike = ARCHIVE_DIR,
) -> pathlib.Path:
    """Unpacks ``split`` into the cache if it is not there yet; returns the split's folder."""
    spec = _check_split(split)
    target = resolve_cache_dir(cache_dir) / VERSION_FOLDER / split
    if target.is_dir():
        return target
    archive = pathlib.Path(archive_dir) / f"{VERSION_FOLDER}_{split}.tar.xz"
    if not archive.is_file():
        raise FileNotFoundError(f"ALFWorld archive for split {split!r} not found at {archive}")
    digest = _sha256(archive)
    if digest != spec.sha256:
        raise ValueError(f"ALFWorld archive {archive} has sha256 {digest}, expected {spec.sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{split}-unpack-") as tmp:
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        unpacked = pathlib.Path(tmp) / VERSION_FOLDER / split
        count = sum(1 for _ in unpacked.glob(f"*/*/{GAME_FILE}"))
        if count != spec.num_games:
            raise ValueError(f"ALFWorld archive {archive} holds {count} games, expected {spec.num_games}")
        try:
            os.rename(unpacked, target)
        except OSError:
            if not target.is_dir():  # another process may have won the race; else it is an error
                raise
    return target


def list_games(
    split: str,
    cache_dir: str | os.PathLike | None = None,
    task_types: tuple[str, ...] | None = None,
) -> tuple[GameRecord, ...]:
    """The games of ``split`` (unpacked on first use), sorted by name, optionally filtered."""
    if task_types is not None:
        unknown = sorted(set(task_types) - set(TASK_TYPES))
        if unknown or not task_types:
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {task_types}")
    root = ensure_split(split, cache_dir)
    records = []
    for path in sorted(root.glob(f"*/*/{GAME_FILE}")):
        task_folder, trial_folder = path.parent.parent.name, path.parent.name
        record = GameRecord(f"{task_folder}/{trial_folder}", path, task_type_of(task_folder))
        if task_types is None or record.task_type in task_types:
            records.append(record)
    return tuple(records)

