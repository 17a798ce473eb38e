"""bench/gpu_goals.sh: the GPU goals' script runs end to end (here on tiny CPU shapes) and prints
one summary line per figure."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import xla

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = dict(DECODE_MODEL="tiny", DECODE_BATCH="2", NEW_TOKENS="128", READ_MIB="16", REPEATS="2",
            TRAIN_PRESET="tiny", TRAIN_BATCH="2", TRAIN_SEQ_LEN="64", TRAIN_STEPS="1", PEAK_TFLOPS="1",
            FORMS="auto scanned")  # tiny's 2 layers: "auto" is the unrolled form already


@pytest.mark.slow
def test_the_script_prints_each_forms_decode_figures_and_the_train_mfu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, XLA_FLAGS=xla.flags(devices=None),
               **TINY)  # one device, as on the GPU
    done = subprocess.run(["bash", "bench/gpu_goals.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = done.stdout.strip().splitlines()[-4:]
    for line, form, draw in zip(summary, ("auto", "scanned", "auto"), ("greedy", "greedy", "0.6")):
        fields = dict(part.split("=") for part in line.split()[1:])
        assert line.startswith("decode ") and fields["decode_layers"] == form and fields["model"] == "tiny"
        assert fields["decode_form"] == {"auto": "unrolled", "scanned": "scanned"}[form]
        assert fields["top_p"] == draw  # the last decode line: temperature 1, top-p 0.6
        assert float(fields["tok_s"]) > 0 and float(fields["bandwidth_frac"]) > 0
    assert summary[3].startswith("train preset=tiny batch=2 seq_len=64 jax ") and "MFU" in summary[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"decode_{f}.{ext}" for f in ("auto", "scanned", "nucleus") for ext in ("json", "txt")] + ["train.txt"])
