"""Sparse checkpoint sizes (issue "a sparse model you can ship"): ``st.save_sparse`` against ``torch.save`` of the
same dense state dict (``export_state()``), for the protocol models at their headline sparsities.

    python benchmarks/sparse_checkpoint_size.py     # writes benchmarks/results/sparse_checkpoint_size.json
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, commit, environment  # noqa: E402

import sparsetrain as st  # noqa: E402
from sparsetrain.models import build_model  # noqa: E402

CASES = {
    "vgg16 static 95%": ("vgg16", {}, {"sparsity": 0.95}),
    "gpt width 512 fan-in 90% (head dense)": (
        "gpt",
        {"width": 4.0, "context": 128},
        {"sparsity": 0.9, "scheme": "fan_in", "dense_layers": ["last"]},
    ),
    "vgg16 channel 50% both sides, compact state (protocol B's channel-both-compact)": (
        "vgg16",
        {},
        {
            "sparsity": 0.5,
            "scheme": "channel_out",
            "execution": "channel",
            "channel_both_sides": True,
            "compact_state": True,
        },
    ),
}


def main() -> dict:
    rows = {}
    for label, (name, margs, kw) in CASES.items():
        torch.manual_seed(0)
        model = build_model(name, **margs)
        sp = st.static(model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)
        with tempfile.TemporaryDirectory() as d:
            size = st.save_sparse(sp, Path(d) / "m.safetensors").stat().st_size
        buf = io.BytesIO()
        torch.save(sp.export_state(), buf)
        rows[label] = {"sparse_bytes": size, "dense_state_dict_bytes": buf.tell(), "ratio": round(size / buf.tell(), 4)}
        print(label, rows[label], flush=True)
    record = {"rows": rows, "command": command_line(), "commit": commit(), **environment()}
    (ROOT / "benchmarks" / "results" / "sparse_checkpoint_size.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
