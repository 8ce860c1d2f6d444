"""Training-step throughput of a backbone on MNIST-shaped input, eager vs ``torch.compile`` (the measurement behind
``TrainConfig.compile`` and the reproduce cpu profile's choice).

    python bench/bench_train_step.py --model vit_tiny --threads 2 --batch 64 [--patch-size 7] [--out FOLDER]

AdamW steps on random 1x28x28 images, 10 classes; 3 warm-up steps after the first (compiling) one, then the median
of 10 timed steps, on the CPU. Appends one JSON line per mode (date, torch version, threads) to
``FOLDER/train_step_cpu_<date>.jsonl`` (default folder: bench/results).
"""
import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wfnet.models import build_model


def measure(model_name: str, mode: str, threads: int, batch: int, patch_size: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, 10, in_chans=1, image_size=28, patch_size=patch_size)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    fwd = torch.compile(model) if mode == "compile" else model
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"model": model_name, "patch_size": patch_size, "mode": mode, "threads": threads, "batch": batch,
            "first_step_s": round(first, 2), "step_s_median": round(times[5], 4),
            "img_per_s": round(batch / times[5], 1), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    a = p.parse_args()
    for mode in ("eager", "compile"):
        r = measure(a.model, mode, a.threads, a.batch, a.patch_size)
        print(json.dumps(r))
        path = Path(a.out) / f"train_step_cpu_{datetime.date.today().isoformat()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
