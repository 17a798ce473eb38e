"""bench.compile_time: the ratio and table arithmetic, and one end-to-end run on the tiny preset
(the update and decode programs it lowers are the trainer's and the sampler's)."""
import pytest

from bench import compile_time


def _seconds():
    """(layers, scan_layers, program) -> (wall, cpu) seconds."""
    return {(2, True, "update"): (10.0, 4.0), (2, True, "decode"): (5.0, 2.0),
            (28, True, "update"): (12.0, 5.0), (28, True, "decode"): (9.0, 3.0),
            (2, False, "update"): (8.0, 3.0), (2, False, "decode"): (4.0, 1.0),
            (28, False, "update"): (40.0, 20.0), (28, False, "decode"): (24.0, 9.0)}


def test_depth_ratio_is_the_worse_program_on_wall_clock():
    seconds = _seconds()
    assert compile_time.depth_ratio(seconds, True, (2, 28)) == pytest.approx(9.0 / 5.0)  # decode
    assert compile_time.depth_ratio(seconds, False, (2, 28)) == pytest.approx(6.0)  # decode 24 / 4


def test_table_lists_scanned_rows_first_by_depth():
    lines = compile_time.format_table(_seconds())
    assert lines[0].split() == ["layers", "layout", "update_s", "update_cpu_s", "decode_s", "decode_cpu_s"]
    assert [line.split()[:2] for line in lines[1:]] == [["2", "scan"], ["28", "scan"], ["2", "unrolled"],
                                                         ["28", "unrolled"]]
    assert lines[2].split()[2:] == ["12.00", "5.00", "9.00", "3.00"]


def test_layers_need_two_positive_depths():
    with pytest.raises(SystemExit):
        compile_time.parse_args(["--layers", "28"])
    assert compile_time.parse_args(["--layers", "2,8,28"]).layers == (2, 8, 28)


def test_tiny_run_ends_with_the_ratio_line(capsys):
    compile_time.main(["--preset", "tiny", "--layers", "1,2", "--no_unrolled", "--batch", "2",
                       "--seq_len", "16", "--prompt_len", "4", "--cache_len", "16", "--new_tokens", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("compile_time_ratio=") and float(lines[-1].split("=")[1]) > 0
    assert [line.split()[:2] for line in lines[-3:-1]] == [["1", "scan"], ["2", "scan"]]
