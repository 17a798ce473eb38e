"""bench.decode_layers: argument checks and one end-to-end run on a scanned 6-layer tiny model."""
import pytest

from bench import decode_layers


def test_short_calls_must_be_shorter_than_long_ones():
    with pytest.raises(SystemExit):
        decode_layers.parse_args(["--new_tokens", "8", "--short_tokens", "8"])


def test_a_model_that_auto_already_unrolls_is_refused():
    with pytest.raises(SystemExit, match="per-layer step under 'auto' too"):
        decode_layers.main(["--preset", "tiny"])  # 2 layers: compiled unrolled anyway


def test_tiny_six_layer_run_prints_both_rates_and_equal_tokens(capsys):
    decode_layers.main(["--preset", "tiny", "--num_layers", "6", "--batch_sizes", "2",
                        "--prompt_len", "4", "--new_tokens", "24", "--short_tokens", "2", "--rounds", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert fields["batch"] == "2" and fields["same_tokens"] in ("True", "False")  # equality: tests/sampling
    assert float(fields["auto_tok_s"]) > 0 and float(fields["unrolled_tok_s"]) > 0
    assert float(fields["speedup"]) == pytest.approx(float(fields["unrolled_tok_s"]) / float(fields["auto_tok_s"]), rel=1e-2)
