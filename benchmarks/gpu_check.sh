#!/usr/bin/env bash
# The GPU checks, for whenever a CUDA machine is at hand (about 5 minutes on one GPU):
#   1. every test marked `gpu` (every method and backend for a few steps: masks exact, loss finite, resume exact; 2:4);
#   2. a short dense-against-sparse step-time table on the GPU (ResNet-18, batch 256), written to $OUT or results/.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root, with the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
timeout 180 python3 - "$OUT/gpu_step_times.json" <<'PY'
import json, statistics, sys, time
import torch, torch.nn.functional as F
import sparsetrain as st

assert torch.cuda.is_available(), "no CUDA GPU"
rows = []
x = torch.randn(256, 3, 32, 32, device="cuda")
y = torch.randint(0, 10, (256,), device="cuda")

def timed(model, opt, steps=20):
    times = []
    for i in range(steps + 5):
        torch.cuda.synchronize(); t = time.perf_counter()
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize()
        if i >= 5: times.append(time.perf_counter() - t)
    return statistics.median(times)

for config, sparsity in (("dense", 0.0), ("masked", 0.9), ("csr", 0.95), ("swat", 0.9)):
    torch.manual_seed(0)
    model = st.build_model("resnet18").cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if config == "swat":
        st.swat(model, opt, sparsity=sparsity)
    elif config != "dense":
        st.static(model, opt, sparsity=sparsity, execution=config)  # the factory runs its layers on the backend
    rows.append({"config": config, "sparsity": sparsity, "step_s": round(timed(model, opt), 5), "gpu": torch.cuda.get_device_name()})
    print(rows[-1], flush=True)
dense = rows[0]["step_s"]
for r in rows:
    r["step_ratio"] = round(r["step_s"] / dense, 3)
json.dump(rows, open(sys.argv[1], "w"), indent=2)
PY
