"""model_jax.sample_token against model.sample_next_token on the same logits.

The two draw differently (JAX: the Gumbel-max trick, argmax of logits plus Gumbel noise;
PyTorch: the inverse of the cumulative probabilities at a uniform draw), so one uniform draw
does not give both the same token. What must agree is what they draw from: the kept token
set (top-k: the k largest logits, ties aside) and the probabilities over it. Both are checked
against the set and the softmax worked out here: JAX draw by draw, since its Gumbel noise can
be generated again from the same key; PyTorch by its frequencies over many draws and the
exact set of tokens it ever draws. JAX's sampler has no top-p; PyTorch's is checked here
against the same worked-out nucleus on these logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import model_jax  # noqa: E402
from model import sample_next_token  # noqa: E402

VOCAB = 40
DRAWS = 4000


def distinct_logits(seed: int) -> np.ndarray:
    """VOCAB distinct logits within 1.5 of each other: every token of a kept set of up to
    ~20 has a probability of at least 1/(20 e^1.5) ~ 1%, so DRAWS draws reach each of them,
    and a token wrongly kept or dropped shows."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(VOCAB) * (1.5 / VOCAB)).astype(np.float32)


def kept_by_top_k(logits: np.ndarray, k: int) -> set[int]:
    return {int(i) for i in np.argsort(-logits, kind="stable")[:k]}


def kept_by_top_p(probs: np.ndarray, p: float) -> set[int]:
    """Tokens by falling probability until their sum first reaches p."""
    kept, total = set(), 0.0
    for i in np.argsort(-probs, kind="stable"):
        kept.add(int(i))
        total += float(probs[i])
        if total >= p:
            break
    return kept


def restricted_softmax(logits: np.ndarray, kept: set[int], temperature: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    mask = np.zeros(VOCAB, dtype=bool)
    mask[list(kept)] = True
    weights = np.where(mask, np.exp(scaled - scaled.max()), 0.0)
    return weights / weights.sum()


def jax_draws(logits: np.ndarray, key: jax.Array, temperature: float,
              top_k: int | None) -> np.ndarray:
    rows = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, VOCAB))
    return np.asarray(model_jax.sample_token(rows, key, temperature, top_k))


def torch_draws(logits: np.ndarray, seed: int, temperature: float, top_k: int | None,
                top_p: float | None = None) -> np.ndarray:
    rows = torch.from_numpy(logits).expand(DRAWS, -1)
    generator = torch.Generator().manual_seed(seed)
    return sample_next_token(rows, temperature, top_k, top_p, generator)[:, 0].numpy()


def assert_frequencies_follow(draws: np.ndarray, probs: np.ndarray) -> None:
    """Nothing drawn outside the kept set, every kept token drawn, and each token's frequency
    within 5 standard errors of its probability."""
    counts = np.bincount(draws, minlength=VOCAB)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(probs))
    tolerance = 5 * np.sqrt(probs * (1 - probs) / DRAWS) + 1e-9
    assert np.all(np.abs(counts / DRAWS - probs) <= tolerance), (counts / DRAWS, probs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("k", [1, 2, 5, 17, VOCAB])
def test_top_k_keeps_the_same_k_tokens_in_both(k: int, temperature: float) -> None:
    logits = distinct_logits(k)
    kept = kept_by_top_k(logits, k)
    assert len(kept) == k
    probs = restricted_softmax(logits, kept, temperature)

    # JAX, draw by draw: each token is the argmax over the kept set of the scaled logits
    # plus the Gumbel noise jax.random.categorical draws from this key.
    key = jax.random.key(k)
    drawn = jax_draws(logits, key, temperature, k)
    noise = np.asarray(jax.random.gumbel(key, (DRAWS, VOCAB), jnp.float32))
    scaled = np.asarray(jnp.asarray(logits) / temperature)
    mask = np.full(VOCAB, -np.inf, dtype=np.float32)
    mask[list(kept)] = 0.0
    np.testing.assert_array_equal(drawn, np.argmax(scaled + mask + noise, axis=-1))
    assert set(drawn.tolist()) == kept  # every kept token is reached, nothing else

    # PyTorch on the same logits: the same kept set, drawn in the same proportions.
    picked = torch_draws(logits, k, temperature, k)
    assert set(picked.tolist()) == set(drawn.tolist()) == kept
    assert_frequencies_follow(picked, probs)
    assert_frequencies_follow(drawn, probs)


def test_without_top_k_both_draw_from_the_whole_softmax() -> None:
    logits = distinct_logits(99)
    probs = restricted_softmax(logits, set(range(VOCAB)), 1.0)
    key = jax.random.key(99)
    drawn = jax_draws(logits, key, 1.0, None)
    noise = np.asarray(jax.random.gumbel(key, (DRAWS, VOCAB), jnp.float32))
    np.testing.assert_array_equal(drawn, np.argmax(logits + noise, axis=-1))
    assert_frequencies_follow(drawn, probs)
    assert_frequencies_follow(torch_draws(logits, 99, 1.0, None), probs)


def test_greedy_picks_the_same_token_in_both() -> None:
    logits = np.stack([distinct_logits(seed) for seed in range(8)])
    jax_greedy = np.asarray(model_jax.sample_token(jnp.asarray(logits), jax.random.key(0), 0.0))
    torch_greedy = sample_next_token(torch.from_numpy(logits), temperature=0)[:, 0].numpy()
    np.testing.assert_array_equal(jax_greedy, torch_greedy)
    np.testing.assert_array_equal(jax_greedy, logits.argmax(axis=-1))


@pytest.mark.parametrize("top_k, top_p", [(None, 0.3), (None, 0.75), (12, 0.5)])
def test_pytorch_top_p_keeps_the_worked_out_nucleus(top_k: int | None, top_p: float) -> None:
    """The PyTorch half of top-p (JAX's sampler has none): the smallest set of the most
    likely tokens, after top-k, whose probability reaches p."""
    logits = distinct_logits(7)
    candidates = kept_by_top_k(logits, top_k or VOCAB)
    nucleus = kept_by_top_p(restricted_softmax(logits, candidates, 1.0), top_p)
    assert 1 < len(nucleus) < len(candidates)
    picked = torch_draws(logits, 7, 1.0, top_k, top_p)
    assert_frequencies_follow(picked, restricted_softmax(logits, nucleus, 1.0))
