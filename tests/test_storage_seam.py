"""No module writes outside the storage seam (`prep/io.py` over `prep/storage.py`): an AST check, like the layer
test, over prep/, train/ and pipelines/. What must stay local is allow-listed with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("prep", "train", "pipelines")
SEAM = {"prep/io.py", "prep/storage.py"}

# (module or folder prefix, call) -> why it writes outside the seam
ALLOWED = {
    ("prep/synth/", "*"): "the synthetic archive writer: an archive (--root) is a local folder",
    ("train/loop.py", ".mkdir"): "a run dir is local: metrics.jsonl is appended and TensorBoard writes it",
    ("train/loop.py", "open"): "metrics.jsonl, appended line by line while a run goes (run dirs are local)",
    ("train/checkpoint.py", "os.link"): "step-N.pt as a hard link of last.pt (run dirs are local)",
    ("train/checkpoint.py", "os.replace"): "publishes that link atomically",
    ("train/checkpoint.py", ".unlink"): "prunes old numbered checkpoints (run dirs are local)",
    ("train/evaluate.py", ".mkdir"): "the evaluation's report folder (local: --out)",
    ("pipelines/study.py", ".mkdir"): "the study's local output folder",
    ("pipelines/demo.py", ".mkdir"): "the demo's local output folder",
    ("train/finetune.py", ".mkdir"): "a fine-tuning run dir is local, like a pretraining run's",
    ("train/finetune.py", ".rename"): "pandas Series.rename (a column label, no file)",
    ("train/data.py", ".rename"): "pandas Series.rename (a column label, no file)",
    ("pipelines/contrast_detail.py", ".mkdir"): "the benchmark's local output folder",
    ("pipelines/contrast_detail.py", ".rename"): "pandas DataFrame.rename (column labels, no file)",
    ("train/detect_report.py", ".mkdir"): "the detection's local output folder (--out stays local)",
    ("pipelines/softlabel_study.py", ".mkdir"): "the study's local output folder",
    ("pipelines/cd_extract.py", ".mkdir"): "the benchmark's local patch cache folder",
}

PATH_WRITES = {".write_text", ".write_bytes", ".unlink", ".rmdir", ".mkdir", ".touch", ".rename", ".symlink_to",
               ".hardlink_to"}
OS_WRITES = {"os.replace", "os.rename", "os.remove", "os.unlink", "os.link", "os.symlink", "os.makedirs",
             "os.mkdir", "os.rmdir", "os.truncate"}
# writers that take a target: which positional argument it is (a plain name is a handle or an in-memory buffer)
TARGETED = {"torch.save": 1, "np.save": 0, "numpy.save": 0, ".savefig": 0, ".to_parquet": 0, ".to_csv": 0,
            "pq.write_table": 1, ".save_as": 0, "pydicom.dcmwrite": 0, "cv2.imwrite": 0}


def dotted(node: ast.AST) -> str:
    """`os.replace`, `.unlink` (a method of anything), `open`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = node.value
        return f"{base.id}.{node.attr}" if isinstance(base, ast.Name) and base.id in (
            "os", "shutil", "torch", "np", "numpy", "pq", "pydicom", "cv2") else f".{node.attr}"
    return ""


def is_write_mode(call: ast.Call) -> bool:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def writes(source: str) -> list[tuple[int, str]]:
    """(line, call) of every write outside the seam's functions in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name == "open" and is_write_mode(node) or name in PATH_WRITES | OS_WRITES or name.startswith("shutil."):
            found.append((node.lineno, name))
        elif name in TARGETED:
            index = TARGETED[name]
            target = node.args[index] if len(node.args) > index else None
            if target is not None and not isinstance(target, ast.Name):
                found.append((node.lineno, name))
    return found


def allowed(module: str, call: str) -> bool:
    return any(module.startswith(prefix) and what in ("*", call) for prefix, what in ALLOWED)


def test_no_module_writes_outside_the_storage_seam():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = path.relative_to(REPO).as_posix()
            if module in SEAM:
                continue
            offenders += [f"{module}:{line} {call}" for line, call in writes(path.read_text())
                          if not allowed(module, call)]
    assert offenders == [], "write through prep.io (atomic_open, write_bytes_atomic, write_json_atomic)"


def test_the_check_sees_each_kind_of_write():
    source = """
import os, shutil, torch
open(p, "w"); open(p, mode="ab"); open(p)
out.write_text("x"); (d / "x").unlink(); os.replace(a, b); shutil.rmtree(d)
torch.save(state, run / "last.pt"); torch.save(state, handle); fig.savefig(out / "a.png"); fig.savefig(buf)
"""
    assert [call for _, call in writes(source)] == ["open", "open", ".write_text", ".unlink", "os.replace",
                                                    "shutil.rmtree", "torch.save", ".savefig"]
    assert allowed("prep/synth/archive.py", "shutil.rmtree") and not allowed("pipelines/build.py", ".unlink")
