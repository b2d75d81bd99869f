#!/usr/bin/env bash
# The GPU checks, for whenever a CUDA machine is at hand (about 5 minutes on one GPU):
#   1. every test marked `gpu` (every method and backend for a few steps: masks exact, loss finite, resume exact; 2:4);
#   2. a short dense-against-sparse step-time table on the GPU (ResNet-18, batch 256), written to $OUT or results/;
#   3. GPU protocol B (A B A B pairs, median ratio): the GPT at width 2048 (D-speed shape: context 128, batch 16,
#      bfloat16) dense, masked 2:4 and 2:4 on sparse tensor cores (backend semi_structured); VGG-16 (CIFAR, batch
#      128) dense, masked 90% and SWAT-U 90%; records appended to $OUT/gpu_protocol_b.jsonl (a configuration that
#      fails is recorded with its error, so the others still land).
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
timeout 420 python3 - "$OUT/gpu_protocol_b.jsonl" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, statistics, sys, time
import torch, torch.nn.functional as F
import sparsetrain as st

out_path, commit = sys.argv[1], sys.argv[2]
dev = "cuda"

def sync_time(step):
    torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
    return time.perf_counter() - t

def pairs(step_a, step_b, n=20, warmup=5):
    for _ in range(warmup):
        step_a(); step_b()
    a, b = [], []
    for _ in range(n):
        a.append(sync_time(step_a)); b.append(sync_time(step_b))
    return a, b

def gpt_step(config):
    torch.manual_seed(0)
    model = st.build_model("gpt", width=16.0, context=128).to(dev, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if config == "masked-2:4":
        st.static(model, opt, sparsity=0.5, scheme="nm_2:4", dense_layers=["last"], total_steps=100)
    elif config == "semi_structured-2:4":
        st.static(model, opt, sparsity=0.5, scheme="nm_2:4", dense_layers=["last"], total_steps=100,
                  execution="semi_structured")
    vocab = model.tok.num_embeddings
    x = torch.randint(0, vocab, (16, 128), device=dev); y = torch.randint(0, vocab, (16, 128), device=dev)
    def step():
        loss = F.cross_entropy(model(x).reshape(-1, vocab).float(), y.reshape(-1)); opt.zero_grad(); loss.backward(); opt.step()
    return step

def vgg_step(config):
    torch.manual_seed(0)
    model = st.build_model("vgg16").to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if config == "masked":
        st.static(model, opt, sparsity=0.9, total_steps=100)
    elif config == "swat":
        st.swat(model, opt, sparsity=0.9, total_steps=100)
    x = torch.randn(128, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device=dev)
    def step():
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    return step

rows = [("gpt", 16, "masked-2:4", 0.5, gpt_step), ("gpt", 16, "semi_structured-2:4", 0.5, gpt_step),
        ("vgg16", 128, "masked", 0.9, vgg_step), ("vgg16", 128, "swat", 0.9, vgg_step)]
dense = {}
with open(out_path, "a") as f:
    for model_name, batch, config, sparsity, make in rows:
        record = {"protocol": "B", "device": torch.cuda.get_device_name(), "model": model_name, "batch": batch,
                  "config": config, "sparsity": sparsity, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "command": "bash benchmarks/gpu_check.sh", "commit": commit}
        try:
            if model_name not in dense:
                dense[model_name] = make("dense")
            torch.cuda.reset_peak_memory_stats()
            t_dense, t_sparse = pairs(dense[model_name], make(config))
            record.update(step_ratio=round(statistics.median(s / d for d, s in zip(t_dense, t_sparse)), 4),
                          step_s_dense_median=round(statistics.median(t_dense), 5),
                          step_s_sparse_median=round(statistics.median(t_sparse), 5))
        except Exception as e:  # recorded, so that one configuration's failure does not lose the others
            record["error"] = f"{type(e).__name__}: {e}"[:500]
        print(record, flush=True)
        f.write(json.dumps(record) + "\n")
PY
