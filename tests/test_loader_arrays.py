"""data.ShardLoader.next_arrays: the loader's batches as NumPy arrays, on both backends.

The reference is brute force: the windows are cut straight from the tokens the test wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import data

BACKENDS = [
    "numpy",
    pytest.param("native", marks=pytest.mark.skipif(
        data.NATIVE_MODULE is None, reason="the _loader extension is not built "
        "(pip install -e .)")),
]
B, T = 3, 16


def write_shards(directory: Path) -> tuple[list[Path], np.ndarray]:
    """Two shards, and every (T+1)-token window of stride T in file order."""
    rng = np.random.default_rng(0)
    paths, windows = [], []
    for i, n in enumerate((200, 137)):
        tokens = rng.integers(0, 50257, n).astype(np.uint16)
        paths.append(directory / f"toy_train_{i:06d}.bin")
        data.write_shard(paths[-1], tokens)
        windows += [tokens[s:s + T + 1] for s in range(0, n - T, T)]
    return paths, np.stack(windows).astype(np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arrays_are_the_windows_in_order_across_shards(tmp_path: Path, backend: str) -> None:
    paths, windows = write_shards(tmp_path)
    with data.ShardLoader(paths, B, T, backend=backend) as loader:
        for step in range(len(windows) // B + 2):  # past the shard boundary and the epoch end
            x, y = loader.next_arrays()
            assert isinstance(x, np.ndarray) and x.dtype == np.int64 and x.shape == (B, T)
            expected = windows[np.arange(step * B, step * B + B) % len(windows)]
            np.testing.assert_array_equal(x, expected[:, :-1])
            np.testing.assert_array_equal(y, expected[:, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_arrays_equal_tensors_with_shuffling_and_resume(tmp_path: Path, backend: str) -> None:
    paths, _ = write_shards(tmp_path)
    def shuffled() -> data.ShardLoader:
        return data.ShardLoader(paths, B, T, shuffle=True, seed=7, backend=backend)

    with shuffled() as arrays, shuffled() as tensors:
        for _ in range(5):
            x, y = arrays.next_arrays()
            x_t, y_t = tensors.next_batch()
            np.testing.assert_array_equal(x, x_t.numpy())
            np.testing.assert_array_equal(y, y_t.numpy())
        state = arrays.state_dict()
        assert state["step"] == 5
        following = arrays.next_arrays()[0]
    with shuffled() as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(resumed.next_arrays()[0], following)
