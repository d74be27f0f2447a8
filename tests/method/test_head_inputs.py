"""scripts/head_inputs.py: how plainly each input a latent head can read shows the annotator type."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "head_inputs.py"


def load_script():
    spec = importlib.util.spec_from_file_location("head_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_centred_rows_are_what_a_centred_head_reads():
    script = load_script()
    x = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # mean (2, 2): rows (-1, 1) and (1, -1), already of unit RMS
    np.testing.assert_allclose(script.centred(x), [[-1.0, 1.0], [1.0, -1.0]], atol=1e-5)


def test_the_tag_the_tiny_model_reads_is_found_by_the_probe_under_either_pool(capsys):
    """On the toy the prompt shows the type's tag, so the prior's input separates the types under either pool; the
    table has a row per head input and pool, each accuracy a fraction."""
    script = load_script()
    argv = ["experiment=synthetic_benchmark", "data.visibility=always", "data.conflict=1.0", "data.n_eval=100"]
    assert script.main(argv) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| prior") or ln.startswith("| post")]
    table = {ln.split(" | ")[0][2:]: [float(v) for v in ln.strip(" |").split(" | ")[1:]] for ln in rows}
    assert sorted(table) == sorted(
        f"{head}, pool={pool}"
        for head in ("prior", "posterior concat", "posterior diff", "posterior concat_diff")
        for pool in ("last", "mean")
    )
    assert all(0.0 <= a <= 1.0 and len(v) == 3 for v in table.values() for a in v)
    assert min(table["prior, pool=last"] + table["prior, pool=mean"]) >= 0.95
