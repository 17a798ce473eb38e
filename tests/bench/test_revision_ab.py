"""bench.revision_ab: the base revision's package extracted under its own name, a bad revision
refused, and one end-to-end run of HEAD against the working tree."""
import re
import subprocess
import sys

import pytest

from bench import revision_ab


def test_the_base_package_is_extracted_with_its_imports_renamed(tmp_path):
    revision_ab.extract_base("HEAD", tmp_path)
    package = tmp_path / revision_ab.BASE_PACKAGE
    sources = list(package.rglob("*.py"))
    assert (package / "sampling" / "decode.py").exists() and len(sources) > 20
    for path in sources:
        assert not re.search(r"\bspear_jax\b", path.read_text()), path


def test_an_unknown_revision_is_refused_with_gits_message(tmp_path):
    with pytest.raises(SystemExit, match="--base 'no-such-revision'"):
        revision_ab.extract_base("no-such-revision", tmp_path)


def _sampler_sources_as_committed() -> bool:
    return subprocess.run(["git", "-C", str(revision_ab.REPO), "diff", "--quiet", "HEAD", "--", "spear_jax"]).returncode == 0


def test_head_against_the_working_tree_prints_a_ratio_per_batch(capsys):
    revision_ab.main(["--base", "HEAD", "--batch-sizes", "2", "--prompt-len", "4", "--new-tokens", "4",
                      "--rounds", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert fields["batch"] == "2"
    if _sampler_sources_as_committed():  # the same code on both sides: the same tokens
        assert fields["same_tokens"] == "True"
    assert revision_ab.BASE_PACKAGE not in sys.modules  # a later call imports its own revision
    ratios = [float(x) for x in fields["rounds"].split(",")]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    # the ratios are printed to two decimals, the median to three
    assert float(fields["speedup"]) == pytest.approx(sum(ratios) / 2, abs=0.006)


def test_truncation_without_a_temperature_is_refused():
    with pytest.raises(SystemExit):
        revision_ab.parse_args(["--base", "HEAD", "--top-p", "0.6"])
    args = revision_ab.parse_args(["--base", "HEAD", "--temperature", "1", "--top-p", "0.6", "--top-k", "40"])
    assert (args.top_p, args.top_k) == (0.6, 40)
