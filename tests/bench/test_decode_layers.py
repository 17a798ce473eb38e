"""bench.decode_layers: argument checks, the break-even, and one end-to-end run on a scanned
6-layer tiny model."""
import math

import pytest

from bench import decode_layers


def test_short_calls_must_be_shorter_than_long_ones():
    with pytest.raises(SystemExit):
        decode_layers.parse_args(["--new_tokens", "8", "--short_tokens", "8"])


def test_breakeven_is_the_longer_first_call_over_the_per_step_saving():
    first = {"scanned": 4.0, "unrolled": 7.0}
    # B = 8: 8 / 100 - 8 / 200 = 0.04 s saved a step; 3 s more to start: 75 steps
    assert decode_layers.breakeven_steps(8, {"scanned": 100.0, "unrolled": 200.0}, first) == pytest.approx(75.0)
    assert decode_layers.breakeven_steps(8, {"scanned": 100.0, "unrolled": 200.0},
                                         {"scanned": 7.0, "unrolled": 4.0}) == 0.0
    assert math.isinf(decode_layers.breakeven_steps(8, {"scanned": 200.0, "unrolled": 100.0}, first))
    assert math.isinf(decode_layers.breakeven_steps(8, {"scanned": 100.0, "unrolled": float("nan")}, first))


def test_tiny_six_layer_run_prints_both_rates_and_equal_tokens(capsys):
    decode_layers.main(["--preset", "tiny", "--num_layers", "6", "--batch_sizes", "2",
                        "--prompt_len", "4", "--new_tokens", "24", "--short_tokens", "2", "--rounds", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert fields["batch"] == "2" and fields["same_tokens"] in ("True", "False")  # equality: tests/sampling
    assert float(fields["scanned_tok_s"]) > 0 and float(fields["unrolled_tok_s"]) > 0
    assert float(fields["speedup"]) == pytest.approx(
        float(fields["unrolled_tok_s"]) / float(fields["scanned_tok_s"]), rel=1e-2)
    assert float(fields["scanned_first_call_s"]) > 0 and float(fields["unrolled_first_call_s"]) > 0
    assert float(fields["breakeven_steps"]) >= 0
