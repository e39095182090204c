"""data.ShardLoader: order, coverage, resume, bad shards and robustness, on both backends.

References are brute force: every window is enumerated straight from the token arrays
the test wrote, independently of the loader's own index arithmetic.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data

NATIVE = data.NATIVE_MODULE is not None
BACKENDS = [
    "numpy",
    pytest.param("native", marks=pytest.mark.skipif(
        not NATIVE, reason="the _loader extension is not built (pip install -e .)")),
]


def write_shards(directory: Path, lengths: list[int], seed: int = 0,
                 vocab: int = 50257) -> tuple[list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, vocab, n).astype(np.uint16)
        path = directory / f"toy_train_{i:06d}.bin"
        data.write_shard(path, tokens)
        paths.append(path)
        arrays.append(tokens)
    return paths, arrays


def all_windows(arrays: list[np.ndarray], T: int) -> list[bytes]:
    """Every (T+1)-token window of stride T, shard by shard, in file order."""
    out = []
    for tokens in arrays:
        for start in range(0, len(tokens) - T, T):
            out.append(tokens[start:start + T + 1].astype(np.int64).tobytes())
    return out


def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """Rebuild each sample's T+1 tokens from x and y."""
    full = torch.cat([x, y[:, -1:]], dim=1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    return [r.numpy().tobytes() for r in full]


def take(loader: data.ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


@pytest.fixture
def shards(tmp_path: Path) -> tuple[list[Path], list[np.ndarray]]:
    # Odd lengths so shard ends waste a few tokens; one shard too short for any window.
    return write_shards(tmp_path, [1000, 517, 40, 1301, 777])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_order_is_every_window_in_file_order(shards, backend):
    paths, arrays = shards
    T, B = 32, 3
    windows = all_windows(arrays, T)
    with data.ShardLoader(paths, B, T, backend=backend) as loader:
        got = [r for x, y in take(loader, 3 * len(windows) // B + 2) for r in rows(x, y)]
    assert x_shape_ok(got, T)
    stream = windows * 4  # epochs repeat in the same order; batches span epoch ends
    assert got == stream[:len(got)]


def x_shape_ok(got: list[bytes], T: int) -> bool:
    return all(len(r) == 8 * (T + 1) for r in got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_cover_one_epoch_exactly_once(shards, backend, world_size, shuffle):
    paths, arrays = shards
    T, B = 16, 5
    windows = all_windows(arrays, T)
    loaders = [data.ShardLoader(paths, B, T, rank=r, world_size=world_size, shuffle=shuffle,
                                seed=7, backend=backend) for r in range(world_size)]
    global_batches = -(-len(windows) // (B * world_size))
    seen: list[bytes] = []
    for _ in range(global_batches):
        for loader in loaders:
            seen.extend(rows(*loader.next_batch()))
    for loader in loaders:
        loader.close()
    epoch = seen[:len(windows)]
    assert sorted(epoch) == sorted(windows)
    if not shuffle:
        assert epoch == windows


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_together_equal_one_process_with_w_times_the_batch(shards, backend):
    paths, _ = shards
    T, B, W = 16, 4, 3
    with data.ShardLoader(paths, B * W, T, shuffle=True, seed=1, backend=backend) as whole:
        expected = [rows(*b) for b in take(whole, 12)]
    ranks = [data.ShardLoader(paths, B, T, rank=r, world_size=W, shuffle=True, seed=1,
                              backend=backend) for r in range(W)]
    for step in range(12):
        combined = [row for loader in ranks for row in rows(*loader.next_batch())]
        assert combined == expected[step]
    for loader in ranks:
        loader.close()


def test_shuffle_permutes_shards_and_samples_anew_each_epoch(shards):
    paths, arrays = shards
    T, B = 16, 1
    windows = all_windows(arrays, T)
    n = len(windows)

    def epochs(seed: int, count: int) -> list[list[bytes]]:
        with data.ShardLoader(paths, B, T, shuffle=True, seed=seed, backend="numpy") as loader:
            flat = [r for b in take(loader, count * n) for r in rows(*b)]
        return [flat[i * n:(i + 1) * n] for i in range(count)]

    e0, e1 = epochs(3, 2)
    assert sorted(e0) == sorted(windows) and sorted(e1) == sorted(windows)
    assert e0 != windows and e1 != e0
    assert epochs(3, 1)[0] == e0
    assert epochs(4, 1)[0] != e0
    # Shard order is permuted too, and each shard's windows stay together within an epoch.
    owner = {w: i for i, a in enumerate(arrays) for w in all_windows([a], T)}
    runs = [owner[e0[0]]] + [owner[b] for a, b in zip(e0, e0[1:], strict=False)
                             if owner[a] != owner[b]]
    assert sorted(runs) == sorted(set(owner.values())) and runs != sorted(runs)


def test_permutation_is_a_bijection_fixed_by_its_key():
    for n in (0, 1, 2, 17, 1000):
        perm = data.seeded_permutation(n, data.order_key(5, 2, 1))
        assert sorted(perm.tolist()) == list(range(n))
    a = data.seeded_permutation(50, data.order_key(5, 0, 0))
    assert np.array_equal(a, data.seeded_permutation(50, data.order_key(5, 0, 0)))
    assert not np.array_equal(a, data.seeded_permutation(50, data.order_key(5, 1, 0)))


def splitmix64_reference(state: int) -> int:
    """The published splitmix64 step, in plain Python integers."""
    mask = (1 << 64) - 1
    z = (state + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix_is_splitmix64():
    values = np.array([0, 1, 2**63, 2**64 - 1, 123456789], dtype=np.uint64)
    got = data._mix64(values).tolist()
    assert got == [splitmix64_reference(int(v)) for v in values]
    # Known first output of splitmix64 seeded with 0.
    assert splitmix64_reference(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_at_any_batch_gives_the_same_batches(shards, backend, world_size):
    paths, _ = shards
    T, B = 16, 6
    rank = world_size - 1
    kwargs = dict(rank=rank, world_size=world_size, shuffle=True, seed=11, backend=backend)
    with data.ShardLoader(paths, B, T, **kwargs) as loader:
        reference = [rows(*b) for b in take(loader, 60)]
    for stop in (0, 1, 7, 23, 41):
        with data.ShardLoader(paths, B, T, **kwargs) as first:
            take(first, stop)
            state = first.state_dict()
            take(first, 3)  # prefetching beyond the saved point must not leak into the state
        with data.ShardLoader(paths, B, T, **kwargs) as resumed:
            resumed.load_state_dict(state)
            assert [rows(*b) for b in take(resumed, 60 - stop)] == reference[stop:]


def test_state_dict_survives_weights_only_checkpoint(shards, tmp_path):
    paths, _ = shards
    with data.ShardLoader(paths, 4, 16, shuffle=True, seed=2, backend="numpy") as loader:
        take(loader, 9)
        torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
        expected = rows(*loader.next_batch())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    with data.ShardLoader(paths, 4, 16, shuffle=True, seed=2, backend="numpy") as loader:
        loader.load_state_dict(state)
        assert rows(*loader.next_batch()) == expected


@pytest.mark.parametrize("change", [
    {"batch_size": 5}, {"seq_len": 8}, {"world_size": 2}, {"seed": 1}, {"shuffle": False},
    {"files": "fewer"},
])
def test_load_state_dict_rejects_another_loaders_state(shards, change):
    paths, _ = shards
    settings = dict(files=paths, batch_size=4, seq_len=16, world_size=1, seed=0, shuffle=True)
    other = dict(settings, **change)
    if other["files"] == "fewer":
        other["files"] = paths[:-1]
    with data.ShardLoader(**other, backend="numpy") as saver:
        state = saver.state_dict()
    with data.ShardLoader(**settings, backend="numpy") as loader:
        key = next(iter(change))
        with pytest.raises(ValueError, match=key if key != "files" else "shard files"):
            loader.load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_restarts_epoch_zero(shards, backend):
    paths, _ = shards
    with data.ShardLoader(paths, 4, 16, shuffle=True, seed=5, backend=backend) as loader:
        first = [rows(*b) for b in take(loader, 5)]
        take(loader, 40)
        loader.reset()
        assert [rows(*b) for b in take(loader, 5)] == first


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["first", "last", "unused tail"])
def test_vocab_check_covers_every_token_of_a_window_and_no_other(tmp_path, backend, where):
    # Token 0 is in no window but the first one, as its first token, and token 6T in none but
    # the last, as its last token: a check that skips either end of a window misses one.
    T, windows = 16, 6
    tokens = np.arange(windows * T + 1 + 5, dtype=np.uint16) % 100
    tokens[{"first": 0, "last": windows * T, "unused tail": windows * T + 3}[where]] = 100
    path = tmp_path / "edge_train_000000.bin"
    data.write_shard(path, tokens)
    with data.ShardLoader([path], 2, T, vocab_size=100, backend=backend) as loader:
        if where == "unused tail":
            take(loader, 2 * windows)  # two epochs: the tail token is never part of a sample
        else:
            with pytest.raises(data.ShardFormatError, match="edge_train_000000.bin.*token id 100"):
                take(loader, windows // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_at_or_above_vocab_size_names_the_shard(tmp_path, backend):
    tokens = np.arange(400, dtype=np.uint16) % 100
    tokens[250] = 100
    path = tmp_path / "bad_train_000000.bin"
    data.write_shard(path, tokens)
    with data.ShardLoader([path], 2, 20, vocab_size=100, backend=backend) as loader:
        with pytest.raises(data.ShardFormatError, match="bad_train_000000.bin.*token id 100"):
            take(loader, 20)
    with data.ShardLoader([path], 2, 20, vocab_size=101, backend=backend) as loader:
        take(loader, 20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token", [data.VOCAB_SIZE, 50303])
def test_padding_ids_past_gpt2s_vocabulary_are_refused_by_default(tmp_path, backend, token):
    tokens = np.arange(400, dtype=np.uint16)
    tokens[250] = token  # a padding row of the 50304-row embedding: no GPT-2 token
    path = tmp_path / "pad_train_000000.bin"
    data.write_shard(path, tokens)
    with data.ShardLoader([path], 2, 20, backend=backend) as loader:
        with pytest.raises(data.ShardFormatError, match=f"pad_train_000000.bin: token id "
                                                        f"{token} near token 240 .* 50257"):
            take(loader, 10)


def corrupt(path: Path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    if kind == "magic":
        header[0] = 12345
    elif kind == "version":
        header[1] = 2
    elif kind == "count":
        header[2] += 1
    elif kind == "negative":
        header[2] = -4
    if kind in ("magic", "version", "count", "negative"):
        raw[:1024] = header.tobytes()
    elif kind == "truncated":
        raw = raw[:-3]
    elif kind == "trailing":
        raw += b"\0\0"
    elif kind == "short-header":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["magic", "version", "count", "negative", "truncated",
                                  "trailing", "short-header"])
def test_every_bin_header_corruption_names_the_file(tmp_path, backend, kind):
    paths, _ = write_shards(tmp_path, [500, 500])
    corrupt(paths[1], kind)
    with pytest.raises(data.ShardFormatError, match=paths[1].name):
        data.ShardLoader(paths, 2, 16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("array", [
    np.zeros(100, dtype=np.int32), np.zeros((10, 10), dtype=np.uint16),
    np.zeros(100, dtype=">u2"),
])
def test_bad_npy_shards_name_the_file(tmp_path, backend, array):
    path = tmp_path / "x_train_000000.npy"
    np.save(path, array)
    with pytest.raises(data.ShardFormatError, match=path.name):
        data.ShardLoader([path], 2, 16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_npy_shards_give_the_same_batches_as_bin(tmp_path, backend):
    paths, arrays = write_shards(tmp_path, [900, 650])
    npy = [path.with_suffix(".npy") for path in paths]
    np.save(npy[0], arrays[0])
    with open(npy[1], "wb") as f:  # format 2.0: a 4-byte header length, so another offset
        np.lib.format.write_array(f, arrays[1], version=(2, 0))
    with data.ShardLoader(paths, 3, 16, shuffle=True, backend=backend) as a, \
            data.ShardLoader(npy, 3, 16, shuffle=True, backend=backend) as b:
        for _ in range(50):
            assert rows(*a.next_batch()) == rows(*b.next_batch())


def test_files_are_shard_paths_and_find_shards_lists_a_folder(shards, tmp_path):
    paths, arrays = shards
    found = data.find_shards(tmp_path, "train")
    assert found == paths
    with data.ShardLoader(found, 2, 16, backend="numpy") as by_find, \
            data.ShardLoader([str(p) for p in paths], 2, 16, backend="numpy") as by_str:
        for _ in range(30):
            assert rows(*by_find.next_batch()) == rows(*by_str.next_batch())
    with data.ShardLoader(paths[0], 3, 16, backend="numpy") as one:  # a single path
        assert [r for b in take(one, 2) for r in rows(*b)] == all_windows(arrays[:1], 16)[:6]
    with pytest.raises(FileNotFoundError, match="find_shards"):
        data.ShardLoader(tmp_path, 2, 16, backend="numpy")
    with pytest.raises(ValueError, match="empty"):
        data.ShardLoader([], 2, 16, backend="numpy")


def test_bad_arguments_raise_clear_errors(shards):
    paths, _ = shards
    with pytest.raises(ValueError, match="rank 2"):
        data.ShardLoader(paths, 2, 16, rank=2, world_size=2, backend="numpy")
    with pytest.raises(ValueError, match="backend"):
        data.ShardLoader(paths, 2, 16, backend="cuda")
    with pytest.raises(ValueError, match="seq_len"):
        data.ShardLoader(paths, 2, 5000, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_shard_under_a_running_loader_raises(tmp_path, backend):
    paths, _ = write_shards(tmp_path, [20000, 20000])
    loader = data.ShardLoader(paths, 4, 64, backend=backend)
    take(loader, 2)
    with open(paths[1], "r+b") as f:
        f.truncate(2000)
    with pytest.raises(data.ShardFormatError, match=paths[1].name):
        take(loader, 400)
    loader.close()


def test_returned_cpu_tensors_are_never_overwritten(shards):
    paths, _ = shards
    backend = "native" if NATIVE else "numpy"
    with data.ShardLoader(paths, 4, 16, shuffle=True, backend=backend) as loader:
        kept = take(loader, 30)
        snapshot = [(x.clone(), y.clone()) for x, y in kept]
        take(loader, 30)
    for (x, y), (sx, sy) in zip(kept, snapshot, strict=True):
        assert torch.equal(x, sx) and torch.equal(y, sy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_thread_in_next_batch_gets_an_immediate_error(shards, backend):
    paths, _ = shards
    with data.ShardLoader(paths, 2, 16, backend=backend) as reference:
        expected = [rows(*b) for b in take(reference, 3)]
    with data.ShardLoader(paths, 2, 16, backend=backend) as loader:
        # The first caller is held inside next_batch() until the test lets it go, so the
        # second call certainly overlaps it: no timing involved.
        source = loader._source
        assert source is not None
        unpatched = source.next_batch
        inside, go_on = threading.Event(), threading.Event()

        def held_next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            if threading.current_thread() is first:
                inside.set()
                go_on.wait(timeout=30)  # only a broken lock makes this wait time out
            return unpatched(step)

        source.next_batch = held_next_batch  # type: ignore[method-assign]
        got: list[list[bytes]] = []
        first = threading.Thread(target=lambda: got.append(rows(*loader.next_batch())))
        first.start()
        try:
            assert inside.wait(timeout=60)
            for call in (loader.next_batch, loader.reset):
                with pytest.raises(RuntimeError, match="one consumer"):
                    call()
        finally:
            go_on.set()
            first.join(timeout=60)
        source.next_batch = unpatched  # type: ignore[method-assign]
        got += [rows(*b) for b in take(loader, 2)]
    assert got == expected  # the refused calls neither took nor skipped a batch
