"""Does masked-patch pretraining on the base classes' audio help the incremental result?

Pretrains the `fast` encoder on the base session's training clips only (no labels), then runs the
demo from it with fewer supervised epochs so that pretraining + training fit the CPU time of the
plain demo; prints both summaries. Usage: python benchmarks/pretrain_effect.py [--steps 400 --epochs 13]
"""

from __future__ import annotations

import argparse
import time

import torch

from earmark.audio import AudioConfig
from earmark.encoders.config import resolve_config as encoder_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.experiments import RunConfig, run
from earmark.experiments.prepare import resolve_dataset
from earmark.scenarios import ClassIncremental
from earmark.training.base import load_features
from earmark.training.pretrain import PretrainConfig, pretrain
from earmark.training.supervised import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=13)
    ap.add_argument("--out", default="runs/pretrain-effect")
    args = ap.parse_args()
    config = RunConfig(out=f"{args.out}/with-pretraining", progress=False)
    ds = resolve_dataset(config)
    train, test = ds.split(config.test_fold)
    scenario = ClassIncremental(ds, train, test, initial_increment=config.initial, increment=config.increment,
                                shots=config.shots, seed=config.seed)
    t0 = time.perf_counter()
    emb = AudioEmbedder(encoder_config(config.encoder), AudioConfig(clip_seconds=config.clip_seconds))
    raw, _, _ = load_features(emb, [ds.paths[i] for i in scenario[0].train_indices], False)
    feats = emb.normalizer.fit(raw)(raw)
    torch.manual_seed(0)
    ckpt = f"{args.out}/pretrained.safetensors"
    hist = pretrain(emb.encoder, feats, PretrainConfig(steps=args.steps, batch_size=16, lr=5e-4,
                                                       warmup_steps=args.steps // 10), ckpt, progress=False)
    pre_s = time.perf_counter() - t0
    print(f"pretraining: {args.steps} steps in {pre_s:.0f} s, loss {hist.loss[0]:.2f} -> {hist.loss[-1]:.2f}")
    config.pretrained = ckpt
    config.train = TrainConfig(epochs=args.epochs)
    res = run(config)
    m = res["learners"]
    print(f"\nwith pretraining ({pre_s:.0f} s) + {args.epochs} epochs ({res['timings']['base_training']:.0f} s):")
    for name in m:
        s = m[name]["metrics"]
        print(f"  {name}: AA {100 * s['average_incremental_accuracy']:.1f} last {100 * s['last_accuracy']:.1f}")


if __name__ == "__main__":
    main()
