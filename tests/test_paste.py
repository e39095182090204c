"""model.py stands alone: pasted into a fresh interpreter (a notebook cell), with every other
module of this project out of reach, it builds, trains a step, generates and round-trips its
Hugging Face export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every module of the project, the compiled loader included. The editable install makes
# them importable from anywhere, so a finder at the front of sys.meta_path refuses them.
PROJECT_MODULES = sorted({p.stem for p in REPO.glob("*.py")} | {"_loader"})

CELL = '''
import sys
blocked = set(sys.argv[1].split(","))


class RefuseProject:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ImportError(f"the pasted model.py imported the project's {name!r}")
        return None


sys.meta_path.insert(0, RefuseProject)
with open(sys.argv[2]) as f:
    exec(compile(f.read(), "<pasted model.py>", "exec"))

import os

torch.manual_seed(0)
model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 12))
_, loss = model(idx[:, :-1], idx[:, 1:])
loss.backward()
assert model.transformer.wte.weight.grad is not None
model.eval()
logits, _ = model(idx)
assert logits.shape == (2, 12, GPT2_VOCAB_SIZE)
out = model.generate(idx, 8, top_k=20, generator=torch.Generator().manual_seed(0))
assert out.shape == (2, 20) and torch.equal(out[:, :12], idx)
model.save_hf(sys.argv[3])
assert sorted(os.listdir(sys.argv[3])) == ["config.json", "model.safetensors"]
again = GPT.from_pretrained(sys.argv[3]).eval()
with torch.no_grad():
    assert torch.equal(again(idx)[0], logits)
assert not blocked & set(sys.modules), blocked & set(sys.modules)
print("pasted model.py ran")
'''


def test_model_py_runs_pasted_alone(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CELL, ",".join(PROJECT_MODULES), str(REPO / "model.py"),
         str(tmp_path / "hf")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "pasted model.py ran"


def test_the_cell_would_notice_a_project_import(tmp_path: Path) -> None:
    """The guard itself: the same cell fails on a model.py that imports data.py."""
    importing = tmp_path / "model.py"
    importing.write_text((REPO / "model.py").read_text() + "\nimport data\n")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CELL, ",".join(PROJECT_MODULES), str(importing),
         str(tmp_path / "hf")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "imported the project's 'data'" in proc.stderr
