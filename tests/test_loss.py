"""The model's chunked loss against F.cross_entropy over the full logits: loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, LOSS_CHUNK_ROWS, GPTConfig, linear_cross_entropy

VOCAB = 1000
# More rows than one chunk holds, and not a multiple of it: two chunks, the second partial.
BATCH, SEQ = 4, 1100
assert LOSS_CHUNK_ROWS < BATCH * SEQ < 2 * LOSS_CHUNK_ROWS


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=SEQ, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32))


def batch_with_ignored_targets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets[0, :300] = -1  # a run of ignored positions, across no chunk edge
    targets[1, -1] = -1
    targets[torch.rand(BATCH, SEQ, generator=gen) < 0.1] = -1  # and scattered ones
    return idx, targets


def reference_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss: every logit materialised, fp32, positions with target -1 ignored."""
    logits = model.lm_head(model.hidden_states(idx))
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def loss_and_grads(model: GPT, loss: torch.Tensor, scale: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    (loss * scale).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def ours_and_reference(model: GPT, autocast_dtype: torch.dtype | None = None,
                       scale: float = 1.0) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor]],
                                                    tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    idx, targets = batch_with_ignored_targets()
    results = []
    for loss_of in (lambda: model(idx, targets)[1], lambda: reference_loss(model, idx, targets)):
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            loss = loss_of()
        results.append(loss_and_grads(model, loss, scale))
    return results[0], results[1]


def test_fp32_loss_and_gradients_equal_full_logits_cross_entropy():
    (loss, grads), (ref_loss, ref_grads) = ours_and_reference(small_model())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert grads.keys() == ref_grads.keys() == {n for n, _ in small_model().named_parameters()}
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5, name
        assert grad.abs().max() > 0, name


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1.0), (torch.float16, 2.0**16)],
                         ids=["bf16", "fp16-scaled"])
def test_low_precision_autocast_matches_within_its_tolerance(dtype: torch.dtype, scale: float):
    """Under autocast both losses round the same matmuls; fp16 with the GradScaler's
    default scale, where an unscaled 1/rows factor inside an fp16 matmul would underflow."""
    (loss, grads), (ref_loss, ref_grads) = ours_and_reference(small_model(1), dtype, scale)
    assert abs(loss.item() - ref_loss.item()) <= 1e-2
    for name, grad in grads.items():
        ref = ref_grads[name]
        # Per tensor: within 2% of its largest entry, and pointing the same way.
        assert (grad - ref).abs().max().item() <= 0.02 * ref.abs().max().item(), name
        assert F.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.999, name


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 200, 10_000])
def test_any_chunk_size_gives_the_full_logits_result(chunk_rows: int):
    gen = torch.Generator().manual_seed(chunk_rows)
    x = torch.randn(200, 16, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16, generator=gen)).requires_grad_()
    targets = torch.randint(0, 300, (200,), generator=gen)
    targets[::9] = -1
    loss = linear_cross_entropy(x, weight, targets, chunk_rows)
    grads = torch.autograd.grad(3.0 * loss, (x, weight))
    ref = F.cross_entropy(x @ weight.T, targets, ignore_index=-1)
    ref_grads = torch.autograd.grad(3.0 * ref, (x, weight))
    assert abs(loss.item() - ref.item()) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert (grad - ref_grad).abs().max().item() <= 1e-6


def test_without_gradients_only_the_loss_is_computed():
    model = small_model(2).eval()
    idx, targets = batch_with_ignored_targets(2)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        ref = reference_loss(model, idx, targets)
    assert logits is None and loss is not None and not loss.requires_grad
    assert abs(loss.item() - ref.item()) <= 1e-5


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products run under it, whatever calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunks", [1, 3])
def test_no_grad_computes_the_loss_alone_with_one_matmul_per_chunk(chunks: int):
    """Validation runs under torch.no_grad on weights that require grad: it must pay for the
    logits only, not for the two gradient products per chunk a training forward makes."""
    rows, width = 90, 16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, width, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, width, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    chunk_rows = -(-rows // chunks)
    reference = F.cross_entropy(x.detach() @ weight.detach().T, targets)
    with torch.no_grad(), MatmulCounter() as counted:
        loss = linear_cross_entropy(x, weight, targets, chunk_rows)
    assert counted.matmuls == chunks and not loss.requires_grad
    assert abs(loss.item() - reference.item()) <= 1e-5
    with MatmulCounter() as counted:
        loss = linear_cross_entropy(x, weight, targets, chunk_rows)
    assert counted.matmuls == 3 * chunks and loss.requires_grad


def test_compiled_model_has_the_same_loss_and_gradients():
    """The default CUDA training path is compiled; fullgraph fails on any graph break."""
    model = small_model(3)
    idx, targets = batch_with_ignored_targets(3)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = loss_and_grads(model, compiled(idx, targets)[1])
    ref_loss, ref_grads = loss_and_grads(model, reference_loss(model, idx, targets))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 1e-5, name
