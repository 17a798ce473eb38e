"""Stop-sequence and eos detection on device against a numpy reference."""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_jax.sampling import stops
from tests.sampling.reference import reference_first_stop


def device_first_stop(generated, stop_sequences, eos_ids):
    table = stops.StopTable.make(eos_ids, stop_sequences)
    window = stops.empty_window(1, table)
    for n, token in enumerate(generated, start=1):
        token = jnp.asarray([token], jnp.int32)
        window = stops.push(window, token, jnp.asarray([True]))
        if bool(stops.is_eos(token, table)[0]):
            return n, "eos"
        if bool(stops.ends_with_stop(window, table)[0]):
            return n, "stop"
    return None, None


def test_multi_token_stop_and_eos():
    assert device_first_stop([5, 1, 2, 3, 9], [(1, 2, 3)], ()) == (4, "stop")
    assert device_first_stop([5, 1, 2, 4, 1, 2, 3], [(1, 2, 3), (7,)], ()) == (7, "stop")
    assert device_first_stop([5, 1, 2, 3], [(1, 2, 3)], (2,)) == (3, "eos")
    assert device_first_stop([3, 2, 1], [(1, 2, 3)], ()) == (None, None)
    # a stop sequence longer than the minimum window
    long = tuple(range(10, 22))
    assert device_first_stop([1] + list(long) + [2], [long], ()) == (13, "stop")


def test_window_starts_empty_so_earlier_tokens_never_match():
    # the window holds generated tokens only: (.., 1) before generation + (2,) does not match
    assert device_first_stop([2, 5], [(1, 2)], ()) == (None, None)


def test_inactive_rows_keep_their_window():
    table = stops.StopTable.make((), [(1, 2)])
    window = stops.empty_window(2, table)
    window = stops.push(window, jnp.asarray([1, 1]), jnp.asarray([True, False]))
    window = stops.push(window, jnp.asarray([2, 2]), jnp.asarray([True, True]))
    np.testing.assert_array_equal(np.asarray(stops.ends_with_stop(window, table)), [True, False])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=10),
       st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), max_size=3),
       st.lists(st.integers(0, 6), max_size=2).map(tuple))
def test_matches_numpy_reference(generated, stop_sequences, eos_ids):
    assert device_first_stop(generated, stop_sequences, eos_ids) == reference_first_stop(
        generated, stop_sequences, eos_ids)
