"""Benchmark of the in-process streaming runtime: per-chunk latency per stage and real-time factor.

    python loadtests/bench_model.py --presets tiny demo [--chunks 12] [--warmup 2]

For each preset (seeded weights: speed does not depend on the values) it streams a sample
character driven by a speech-like voice and prints, per stage, the median and p95 of the per-chunk
latency, and the real-time factor (seconds of compute per second of video; < 1 is real time).
All presets are measured in one run so their numbers compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from livestage.media.samples import sample_character, sample_speech
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.runtime.pipeline import STAGES, StreamingAvatar


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bench_preset(name: str, chunks: int, warmup: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False) -> dict:
    preset = get_preset(name)
    models = build_models(preset, None, seed=0, device=device, dtype=dtype, compile=compile)
    rate = preset.chunk.sample_rate
    avatar = StreamingAvatar(models, [("global", sample_character((preset.height, preset.width)))])
    total_s = (chunks + warmup) * preset.chunk.chunk_seconds
    avatar.push_speak_audio(sample_speech(total_s, rate, seed=1))
    avatar.push_listen_audio(sample_speech(total_s, rate, seed=2) * 0.5)
    timings: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    for i in range(chunks + warmup):
        result = avatar.step()
        if i >= warmup:
            for k, v in result.timings_ms.items():
                timings[k].append(v)
    chunk_ms = preset.chunk.chunk_seconds * 1000
    return {
        "preset": name,
        "device": str(models.device) + (f" ({torch.cuda.get_device_name()})" if models.device.type == "cuda" else ""),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile,
        "resolution": f"{preset.width}x{preset.height}",
        "fps": preset.chunk.fps,
        "frames_per_chunk": preset.chunk.frames_per_chunk,
        "tokens_per_chunk": preset.tokens_per_chunk,
        "nfe_per_chunk": avatar.generator.sampler.nfe + avatar.refiner.sampler.nfe,
        "chunks": chunks,
        "stages_ms": {s: {"median": round(percentile(v, 50), 2), "p95": round(percentile(v, 95), 2)}
                      for s, v in timings.items()},
        "rtf_median": round(percentile(timings["total"], 50) / chunk_ms, 3),
        "rtf_p95": round(percentile(timings["total"], 95) / chunk_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench_model.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks and VAE decoder")
    args = parser.parse_args()
    results = []
    started = time.time()
    for name in args.presets:
        r = bench_preset(name, args.chunks, args.warmup, args.device, getattr(torch, args.dtype), args.compile)
        results.append(r)
        print(f"\n== {name} on {r['device']} {r['dtype']}{' compiled' if r['compiled'] else ''}: {r['resolution']} @ {r['fps']} fps, {r['tokens_per_chunk']} tokens/chunk, "
              f"{r['nfe_per_chunk']} DiT passes/chunk, {r['chunks']} chunks")
        print(f"{'stage':<10}{'median ms':>12}{'p95 ms':>12}")
        for stage, v in r["stages_ms"].items():
            print(f"{stage:<10}{v['median']:>12.1f}{v['p95']:>12.1f}")
        print(f"real-time factor: {r['rtf_median']:.3f} (median), {r['rtf_p95']:.3f} (p95)"
              f"  {'REAL TIME' if r['rtf_median'] < 1 else 'slower than real time'}")
    meta = {"machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwritten {args.out} ({meta})")


if __name__ == "__main__":
    main()
