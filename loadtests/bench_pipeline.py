"""Distributed pipeline vs the in-process runtime, measured in one run.

    python loadtests/bench_pipeline.py --presets tiny demo [--chunks 12]

For each preset it runs the same session twice: in-process (every stage in this process, the
model-core runtime) and distributed (nats-server, redis-server and one process per service on
loopback, chunks pipelined across processes). It prints per-stage latency (median, p95), the
end-to-end chunk latency, time to first chunk, throughput, the distributed/in-process ratios, and
the bytes and messages the NATS server received per chunk (its /varz monitor): what the services
put on the wire.
Sessions run unpaced (as fast as possible) so the numbers are compute + transport, not the clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from livestage.devstack.stack import LocalStack
from livestage.media.samples import sample_character, sample_speech
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.protos import session_pb2 as pb
from livestage.protos import session_pb2_grpc
from livestage.runtime.pipeline import InProcessChunkPipeline
from livestage.runtime.session_runtime import SessionRuntime
from livestage.client import session_channel
from livestage.transport import Subjects


def nats_traffic(stack: LocalStack) -> dict[str, int]:
    """Bytes and messages the NATS server has received and sent so far (its /varz monitor)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.nats.extra['monitor_port']}/varz", timeout=5) as r:
        v = json.loads(r.read())
    return {k: int(v[k]) for k in ("in_bytes", "out_bytes", "in_msgs", "out_msgs")}


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p95": float("nan")}
    return {"median": round(float(np.median(values)), 2), "p95": round(float(np.percentile(values, 95)), 2)}


async def run_inprocess(preset_name: str, chunks: int) -> dict:
    preset = get_preset(preset_name)
    models = build_models(preset, None, seed=0)
    t0 = time.perf_counter()
    pipeline = InProcessChunkPipeline(models, [("global", sample_character((preset.height, preset.width)))])
    timings: dict[str, list[float]] = {}
    first: list[float] = []

    async def on_chunk(d) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
        for k, v in d.timings_ms.items():
            timings.setdefault(k, []).append(v)

    runtime = SessionRuntime("bench", preset.chunk, pipeline, lookahead=2, realtime=False, on_chunk=on_chunk)
    runtime.push_speak_audio(sample_speech(chunks + 4, preset.chunk.sample_rate, 1))
    start = time.perf_counter()
    await runtime.run(max_chunks=chunks)
    wall = time.perf_counter() - start
    return {"stages_ms": {k: stats(v[1:]) for k, v in timings.items()},
            "end_to_end_ms": stats(timings["total"][1:]), "time_to_first_chunk_s": round(first[0], 3),
            "chunks_per_s": round(chunks / wall, 3)}


async def run_distributed(stack: LocalStack, preset_name: str, chunks: int) -> dict:
    preset = get_preset(preset_name)
    channel = session_channel(stack.session_address, stack.api_key)
    client = session_pb2_grpc.SessionServiceStub(channel)
    bus = await stack.connect_bus()
    import io

    from PIL import Image
    img = sample_character((preset.height, preset.width))
    buf = io.BytesIO()
    Image.fromarray(((img.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(buf, format="PNG")
    t0 = time.perf_counter()
    session = await client.CreateSession(pb.CreateSessionRequest(
        character=pb.Character(references=[pb.ReferenceImage(kind=pb.REFERENCE_KIND_GLOBAL, image=buf.getvalue())]),
        options=pb.SessionOptions(realtime=False, lookahead_chunks=2)))
    sid = session.session_id
    arrivals: list[float] = []
    done = asyncio.Event()

    async def on_frames(msg, headers, reply) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) >= chunks:
            done.set()

    await bus.subscribe(Subjects.session_frames(sid), on_frames)
    timings: dict[str, list[float]] = {}

    async def collect() -> None:
        async for ev in client.StreamEvents(pb.SessionRef(session_id=sid)):
            if ev.WhichOneof("event") == "chunk_timing":
                for k, v in ev.chunk_timing.stage_ms.items():
                    timings.setdefault(k, []).append(v)
                timings.setdefault("end_to_end", []).append(ev.chunk_timing.end_to_end_ms)

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    start = time.perf_counter()
    traffic_before = nats_traffic(stack)
    await client.StartSession(pb.SessionRef(session_id=sid))
    speech = sample_speech(chunks + 4, preset.chunk.sample_rate, 1)
    pcm = (speech * 32767).astype("<i2").tobytes()

    async def audio():
        for i in range(0, len(pcm), 32000):
            yield pb.AudioChunk(session_id=sid, pcm16=pcm[i:i + 32000], sample_rate=16000, channels=1)

    await client.PushSpeakAudio(audio())
    await asyncio.wait_for(done.wait(), 600)
    wall = arrivals[-1] - start
    traffic = {k: v - traffic_before[k] for k, v in nats_traffic(stack).items()}
    await client.EndSession(pb.SessionRef(session_id=sid))
    await asyncio.wait_for(collector, 30)
    await bus.close()
    await channel.close()
    return {"stages_ms": {k: stats(v[1:]) for k, v in timings.items() if k != "end_to_end"},
            "end_to_end_ms": stats(timings.get("end_to_end", [])[1:]),
            "time_to_first_chunk_s": round(arrivals[0] - start, 3),
            "create_session_s": round(start - t0, 3),
            "nats_bytes_in_per_chunk": round(traffic["in_bytes"] / len(arrivals)),
            "nats_msgs_in_per_chunk": round(traffic["in_msgs"] / len(arrivals), 1),
            "chunks_per_s": round(len(arrivals) / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("out/bench_pipeline.json"))
    args = parser.parse_args()
    results = {}
    for name in args.presets:
        inproc = asyncio.run(run_inprocess(name, args.chunks))
        with tempfile.TemporaryDirectory() as tmp:
            with LocalStack(Path(tmp), preset=name) as stack:
                dist = asyncio.run(run_distributed(stack, name, args.chunks))
        ratio = dist["end_to_end_ms"]["median"] / inproc["end_to_end_ms"]["median"]
        results[name] = {"in_process": inproc, "distributed": dist,
                         "e2e_latency_ratio": round(ratio, 3),
                         "throughput_ratio": round(dist["chunks_per_s"] / inproc["chunks_per_s"], 3)}
        print(f"\n== {name} ({args.chunks} chunks, unpaced)")
        print(f"{'':<22}{'in-process':>14}{'distributed':>14}")
        stages = sorted(set(inproc["stages_ms"]) | set(dist["stages_ms"]))
        alias = {"encode": "encoder", "generate": "generator", "refine": "refiner", "decode": "decoder"}
        for s in ("encode", "generate", "refine", "decode"):
            a = inproc["stages_ms"].get(s, {}).get("median", float("nan"))
            b = dist["stages_ms"].get(alias[s], {}).get("median", float("nan"))
            print(f"{s + ' ms (median)':<22}{a:>14.1f}{b:>14.1f}")
        print(f"{'chunk e2e ms (median)':<22}{inproc['end_to_end_ms']['median']:>14.1f}{dist['end_to_end_ms']['median']:>14.1f}")
        print(f"{'chunk e2e ms (p95)':<22}{inproc['end_to_end_ms']['p95']:>14.1f}{dist['end_to_end_ms']['p95']:>14.1f}")
        print(f"{'first chunk s':<22}{inproc['time_to_first_chunk_s']:>14.3f}{dist['time_to_first_chunk_s']:>14.3f}")
        print(f"{'chunks/s':<22}{inproc['chunks_per_s']:>14.3f}{dist['chunks_per_s']:>14.3f}")
        print(f"NATS per chunk (distributed): {dist['nats_bytes_in_per_chunk']} bytes in, "
              f"{dist['nats_msgs_in_per_chunk']} messages in")
        print(f"distributed/in-process: e2e latency x{ratio:.2f}, throughput x{results[name]['throughput_ratio']:.2f}")
        del stages
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
