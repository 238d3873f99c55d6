"""What changes base training's bits: run a small training and single layers in fresh processes, vary one thing.

Usage: python benchmarks/reproducibility.py [--epochs 3] [--clips 64]

Each variant runs in a fresh process (ATEN_CPU_CAPABILITY is read once, at import): the same
training (the ``fast`` encoder on random log-mel-shaped features, fixed seed) and single
forward/backward passes of each layer type on fixed inputs. The table gives the max abs
difference to the reference (thread count 2, the CPU's best vector instruction set, the stable
data order); 0 means bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORKER = r"""
import json, sys
import torch
from safetensors.torch import save_file

out, threads, order, epochs, clips, classes = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
from earmark.audio.features import LogMel
from earmark.encoders.config import resolve_config
from earmark.encoders.mamba import build_encoder
from earmark.training.supervised import TrainConfig, train_supervised

torch.set_num_threads(threads)
res = {}
def rec(name, *ts):
    for k, t in enumerate(ts):
        res[f"op:{name}:{k}"] = t.detach().float().contiguous().clone()

g = torch.Generator().manual_seed(0)
cfg = resolve_config("fast")
torch.manual_seed(0)
enc = build_encoder(cfg)
x = torch.randn(8, cfg.n_mels, 100, generator=g)
# single layers, forward + backward
lin = torch.nn.Linear(256, 128); a = torch.randn(64, 256, generator=g, requires_grad=True)
y = lin(a); y.square().sum().backward(); rec("linear (matmul)", y, a.grad, lin.weight.grad)
pe = enc.patch_embed; xi = x[:, None].clone().requires_grad_(True)
y = pe(xi); y.square().sum().backward(); rec("patch conv2d", y, xi.grad, pe.weight.grad)
norm = enc.layers[0].norm; h = torch.randn(8, 100, cfg.embed_dim, generator=g, requires_grad=True)
y = norm(h); y.square().sum().backward(); rec("RMSNorm", y, h.grad)
mixer = enc.layers[0].mixer; h2 = h.detach().clone().requires_grad_(True)
y = mixer(h2); y.square().sum().backward(); rec("Mamba mixer (conv + scan)", y, h2.grad)
s = torch.randn(64, 60, generator=g, requires_grad=True)
y = torch.log_softmax(s, -1); y.square().sum().backward(); rec("log_softmax", y, s.grad)
enc.zero_grad()
y = enc(x); y.square().sum().backward(); rec("whole encoder", y, *[p.grad for p in enc.parameters()])
wave = torch.randn(4, 16000, generator=g)
rec("log-mel front end", LogMel()(wave))
# the training
torch.manual_seed(0)
enc = build_encoder(cfg)
feats = torch.randn(clips, cfg.n_mels, 100, generator=torch.Generator().manual_seed(1))
labels = torch.arange(clips) % classes
if order == "reversed":
    feats, labels = feats.flip(0), labels.flip(0)
def on_epoch(e, m):
    for k, v in m.state_dict().items():
        res[f"epoch{e}:{k}"] = v.detach().clone()
tc = TrainConfig(epochs=epochs, batch_size=16, threads=threads, warmup_epochs=0.5)
train_supervised(enc, feats, labels, classes, tc, progress=False, on_epoch=on_epoch)
save_file(res, out)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))
"""

VARIANTS = {
    "reference": {},
    "repeat": {},
    "threads 1": {"threads": 1},
    "threads 4": {"threads": 4},
    "cpu avx2": {"env": "avx2"},
    "cpu default": {"env": "default"},
    # what a machine without AVX-512 runs: ATen's kernels, MKL's GEMM and oneDNN's conv all at AVX2
    "no AVX-512": {"env": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "data reversed": {"order": "reversed"},
}


def run_variant(name: str, spec: dict, tmp: Path, epochs: int, clips: int, classes: int) -> tuple[dict, str]:
    from safetensors.torch import load_file

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    if "env" in spec:
        env["ATEN_CPU_CAPABILITY"] = spec["env"]
    else:
        env.pop("ATEN_CPU_CAPABILITY", None)
    for key in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
        if key in spec:
            env[key] = spec[key]
    out = tmp / f"{name.replace(' ', '_')}.safetensors"
    args = [sys.executable, "-c", WORKER, str(out), str(spec.get("threads", 2)), spec.get("order", "stable"),
            str(epochs), str(clips), str(classes)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return load_file(out), f"{info['capability']}, {info['threads']} thr"


def max_diff(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix)]
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--clips", type=int, default=120)
    ap.add_argument("--classes", type=int, default=60, help="60 = the demo's base session; the head's width")
    args = ap.parse_args()
    results, labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in VARIANTS.items():
            results[name], labels[name] = run_variant(name, spec, Path(tmp), args.epochs, args.clips, args.classes)
    ref = results["reference"]
    ops = sorted({k.split(":")[1] for k in ref if k.startswith("op:")}, key=lambda n: list(ref).index(f"op:{n}:0"))
    rows = [(f"op: {op}", f"op:{op}:") for op in ops]
    rows += [(f"training, encoder after epoch {e + 1}", f"epoch{e}:") for e in range(args.epochs)]
    names = [n for n in VARIANTS if n != "reference"]
    print(f"torch {torch.__version__}; reference: {labels['reference']}; max abs difference to the reference "
          f"(0 = bit-identical); {args.clips} clips of {args.classes} classes x {args.epochs} epochs, fast encoder")
    width = max(len(r[0]) for r in rows)
    print(" " * width + " | " + " | ".join(f"{n:>14}" for n in names))
    print(" " * width + " | " + " | ".join(f"{labels[n]:>14}" for n in names))
    for label, prefix in rows:
        cells = []
        for n in names:
            if n == "data reversed" and prefix.startswith("op:"):
                cells.append(f"{'(same)':>14}")
                continue
            cells.append(f"{max_diff(results[n], ref, prefix):14.3g}")
        print(f"{label:<{width}} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
