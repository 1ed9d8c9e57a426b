"""mustafar_triton._gluon_compat: which triton versions and GPUs run the Gluon kernels, and the tl
kernels taking over elsewhere with one warning, never an import error."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import triton

from mustafar_triton import _gluon_compat as compat

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)


def gluon_runs_on_recording(device, calls=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [compat.gluon_runs_on(device) for _ in range(calls)]
    return results, [w for w in caught if "mustafar_triton" in str(w.message)]


def test_minor_version_parsing():
    assert compat.triton_minor_version("3.6.0") == "3.6"
    assert compat.triton_minor_version("3.10.1+git1234abc") == "3.10"
    assert compat.triton_minor_version("4.0") == "4.0"


def test_this_triton_is_checked():
    """CI runs on checked versions only (3.6.0 and the newest, .ci/run): Gluon is importable and
    its version is listed."""
    assert compat.GLUON_IMPORT_ERROR is None
    assert compat.gluon_unavailable_reason() is None, triton.__version__
    assert compat.GluonASTSource is not None


def test_unchecked_version_has_a_reason():
    reason = compat.gluon_unavailable_reason("3.99.0")
    assert "3.99.0" in reason and "3.6" in reason


def test_cpu_tensors_never_run_gluon_and_never_warn(fresh_warning):
    results, ours = gluon_runs_on_recording(torch.device("cpu"))
    assert results == [False, False] and ours == []


def test_unchecked_triton_falls_back_with_one_warning(fresh_warning, monkeypatch):
    monkeypatch.setattr(compat.triton, "__version__", "3.99.0")
    results, ours = gluon_runs_on_recording(CUDA, calls=3)
    assert results == [False] * 3
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "3.99.0" in str(ours[0].message) and "tl kernels" in str(ours[0].message)


def test_gpu_before_ampere_falls_back_with_one_warning(fresh_warning, monkeypatch):
    monkeypatch.setattr(compat, "has_mma_v2", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    results, ours = gluon_runs_on_recording(CUDA)
    assert results == [False, False]
    assert len(ours) == 1 and "Tesla T4 (sm_75)" in str(ours[0].message)


def test_checked_triton_on_ampere_or_newer_runs_gluon(fresh_warning, monkeypatch):
    monkeypatch.setattr(compat, "has_mma_v2", lambda device: True)
    results, ours = gluon_runs_on_recording(CUDA)
    assert results == [True, True] and ours == []


@pytest.mark.skipif(triton.__version__.startswith("3.6") and tuple(map(int, np.__version__.split(".")[:2])) >= (2, 4),
                    reason="triton 3.6's interpreter needs numpy < 2.4 (the GPU machine has numpy 2.5)")
def test_triton_without_the_gluon_names_imports_and_runs_the_tl_kernels(tmp_path):
    """With a Gluon module the kernels import missing (a release that moved mma_v2), `import
    mustafar_triton` works, the kernels run (interpreter, exact round trip and a decode against
    float64), and a CUDA device is refused Gluon with one warning naming the import."""
    script = textwrap.dedent("""
        import warnings
        import triton.experimental.gluon.language.nvidia.ampere as ampere
        del ampere.mma_v2  # as if a release had moved it

        import torch
        import mustafar_triton as mt
        from mustafar_triton import _gluon_compat as compat
        assert compat.GLUON_IMPORT_ERROR is not None
        x = torch.randn(1, 2, 19, 64, dtype=torch.float16)
        packed = mt.prune_and_pack(x, 0.5)
        assert torch.equal(mt.unpack(packed), mt.reference.prune_topk(x, 0.5))
        q = torch.randn(1, 4, 64, dtype=torch.float16)
        out = mt.sparse_decode_attention(q, packed, packed)
        want = mt.reference.sparse_decode_attention(q, packed, packed)
        assert (out.double() - want).abs().max() < 2e-3, (out.double() - want).abs().max()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not compat.gluon_runs_on(torch.device("cuda"))
            assert not compat.gluon_runs_on(torch.device("cuda"))
        assert len(caught) == 1 and "mma_v2" in str(caught[0].message), caught
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
