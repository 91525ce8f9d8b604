"""Generates a Triton model repository from LiveStage's own model code.

    livestage triton-repo --preset tiny --out model_repository [--weights DIR] [--device auto|cpu|gpu]

One python-backend model per stage. `model.py` imports `livestage.serving.stages.engines` (so the image
needs LiveStage installed, or `--sys-path` pointing at it) and serves that stage's engine:

- every stage keeps per-session state (the encoder its copy of the audio streams, the DiT stages
  their KV caches, the decoder its conv cache), so every stage uses the sequence batcher: the
  correlation id (the session) keys the state held by the model instance,
  `max_sequence_idle_microseconds` is longer than a user's longest pause, and the engine frees
  sessions idle past `idle_timeout_s` on its own, since Triton does not tell a python model that a
  sequence expired. Requests of several sessions share one execute call.
"""

from __future__ import annotations

from pathlib import Path

from livestage.models.config import get_preset

STAGES = ("encoder", "generator", "refiner", "decoder")

MODEL_PY = '''"""Triton python backend for the LiveStage `{stage}` stage (generated; do not edit)."""

import json
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {{k: v["string_value"] for k, v in config.get("parameters", {{}}).items()}}
        for path in reversed([p for p in params.get("sys_path", "").split(":") if p]):
            if path not in sys.path:
                sys.path.insert(0, path)
        import torch

        from livestage.models.bundle import build_models
        from livestage.serving.stages.engines import make_engine
        from livestage.transport.codec import decode_framed, encode_framed

        self._decode, self._encode = decode_framed, encode_framed
        threads = int(params.get("torch_threads", "0"))
        if threads:
            torch.set_num_threads(threads)
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{{args.get('model_instance_device_id', '0')}}" if gpu else "cpu"
        dtype = getattr(torch, params.get("gpu_dtype", "bfloat16")) if gpu else torch.float32
        models = build_models(params["preset"], params.get("weights_dir") or None,
                              seed=int(params.get("seed", "0")),
                              allow_seeded=params.get("allow_seeded", "false") == "true",
                              device=device, dtype=dtype)
        self.stage = params["stage"]
        self.engine = make_engine(self.stage, models, float(params.get("idle_timeout_s", "600")))
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()

    def _reap(self):
        while not self._stop.wait(0.5):
            self.engine.evict_idle()

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy()
            corrid = pb_utils.get_input_tensor_by_name(request, "CORRID")
            rows = raw.reshape(-1, raw.shape[-1])  # [batch, bytes]
            keys = [None] * len(rows) if corrid is None else [
                "seq-%d" % int(c) for c in corrid.as_numpy().reshape(-1)]
            out = []
            for row, key in zip(rows, keys):
                msg = self._decode(row.tobytes())
                if key is not None:
                    msg.session_id = key  # per-session state is keyed by the sequence id
                out.append(np.frombuffer(self._encode(self.engine.handle(msg)), dtype=np.uint8))
            width = max(len(o) for o in out)
            packed = np.zeros((len(out), width), dtype=np.uint8)  # replies padded to one width
            for i, o in enumerate(out):
                packed[i, :len(o)] = o
            tensor = pb_utils.Tensor("RESPONSE", packed.reshape(raw.shape[:-1] + (width,)))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self):
        self._stop.set()
'''


def config_pbtxt(stage: str, params: dict[str, str], device: str, idle_timeout_s: float,
                 max_sessions: int = 16) -> str:
    # KIND_AUTO: on GPUs when the node has them, else on CPU (the fallback); gpu/cpu pin it.
    kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}[device]
    params_txt = ",\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in sorted(params.items()))
    # Every stage holds per-session state: one slot per live session on the instance (the
    # `oldest` strategy keeps each sequence's requests in order and runs ready ones at once); the
    # slot outlives our own idle timeout.
    idle_us = int(idle_timeout_s * 1e6) + 60_000_000
    batching = (f"max_batch_size: {max_sessions}\n"
                "sequence_batching {\n"
                f"  max_sequence_idle_microseconds: {idle_us}\n"
                f"  oldest {{ max_candidate_sequences: {max_sessions} max_queue_delay_microseconds: 0 }}\n"
                "  control_input [ { name: \"CORRID\" control [ { kind: CONTROL_SEQUENCE_CORRID "
                "data_type: TYPE_UINT64 } ] } ]\n"
                "}\n")
    return (f'name: "{stage}"\nbackend: "python"\n{batching}'
            'input [ { name: "REQUEST" data_type: TYPE_UINT8 dims: [ -1 ] } ]\n'
            'output [ { name: "RESPONSE" data_type: TYPE_UINT8 dims: [ -1 ] } ]\n'
            f"instance_group [ {{ count: 1 kind: {kind} }} ]\n"
            f"parameters [\n{params_txt}\n]\n")


def build_repository(out: str | Path, preset: str, weights_dir: str = "", seed: int = 0,
                     allow_seeded: bool = False, device: str = "auto", idle_timeout_s: float = 600.0,
                     sys_path: str = "", torch_threads: int = 0, stages: tuple[str, ...] = STAGES) -> Path:
    """Writes `<out>/<stage>/config.pbtxt` and `<out>/<stage>/1/model.py` for every stage."""
    get_preset(preset)  # unknown presets fail here, not inside Triton
    if device not in ("cpu", "gpu", "auto"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    out = Path(out)
    for stage in stages:
        params = {"stage": stage, "preset": preset, "weights_dir": weights_dir, "seed": str(seed),
                  "allow_seeded": str(allow_seeded).lower(), "idle_timeout_s": str(idle_timeout_s),
                  "sys_path": sys_path, "torch_threads": str(torch_threads)}
        (out / stage / "1").mkdir(parents=True, exist_ok=True)
        (out / stage / "config.pbtxt").write_text(config_pbtxt(stage, params, device, idle_timeout_s))
        (out / stage / "1" / "model.py").write_text(MODEL_PY.format(stage=stage))
    return out
