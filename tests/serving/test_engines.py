"""The stage engines in-process: the encoder's own audio streams, latents in the model's dtype,
and typed errors for bad requests."""

from __future__ import annotations

import numpy as np
import torch

from livestage.media.samples import sample_character, sample_speech
from livestage.models.audio import StreamingAudioWindow
from livestage.models.bundle import build_models
from livestage.models.config import get_preset
from livestage.protos import stages_pb2 as spb
from livestage.runtime.session_runtime import AudioCursor
from livestage.runtime.stages import ConditionEncoder
from livestage.serving.stages import wire
from livestage.serving.stages.backends import LocalBackend, chain_chunk, encode_references, open_engines
from livestage.serving.stages.engines import make_engine
from livestage.transport import encode, kind_of, to_torch, wrap

PRESET = get_preset("tiny")
STAGES = ("encoder", "generator", "refiner", "decoder")


def _backends(dtype=torch.float32) -> dict[str, LocalBackend]:
    models = build_models("tiny", None, seed=0, dtype=dtype)
    return {s: LocalBackend(make_engine(s, models)) for s in STAGES}


def _open(backends, sid="s") -> None:
    reply = encode_references(backends["encoder"], sid, [("global", sample_character((PRESET.height, PRESET.width)))])
    assert kind_of(reply) == "references_encoded"
    for stage, answer in open_engines(backends, sid, reply.references_encoded.references).items():
        assert kind_of(answer) == "engine_opened", (stage, answer)


def test_the_encoder_reads_the_same_windows_from_audio_sent_once():
    """Speech pushed in uneven pieces, a cut (interrupt), and the listen stream filling a chunk
    that was already requested: the encoder's conditions equal encoding the runtime's windows."""
    backends = _backends()
    _open(backends)
    encoder = ConditionEncoder(backends["encoder"].engine.models)
    chunk = PRESET.chunk
    speak, listen = StreamingAudioWindow.for_chunks(chunk), StreamingAudioWindow.for_chunks(chunk)
    speak_sent, listen_sent = AudioCursor(speak), AudioCursor(listen)
    voice = sample_speech(8.0, chunk.sample_rate, 3)
    n = chunk.samples_per_chunk
    sent_bytes = 0
    for k in range(7):
        if k == 1:
            speak.push(voice[: int(2.5 * n)])
        if k == 3:
            speak.drop_after(3.0)  # an interrupt cut the speech at chunk 3
            listen.pad_to(2.0)
            listen.push(voice[: n // 2])  # lands inside chunk 2, already requested
        if k == 5:
            speak.pad_to(5.0)
            speak.push(voice[:n])
        windows = (speak.window(k), listen.window(k))
        request = spb.ChunkRequest(speak=wire.audio_slice(*_delta(speak_sent)),
                                   listen=wire.audio_slice(*_delta(listen_sent)), played_chunk=k)
        sent_bytes += len(request.speak.samples.data) + len(request.listen.samples.data)
        out = backends["encoder"].call(wrap(request, "s", k))
        assert kind_of(out) == "chunk_computed", out
        got = wire.conditions_from_pb(out.chunk_computed.encoded.conditions, k)
        want = encoder.encode_chunk(k, *windows)
        assert torch.equal(got.speak, want.speak) and torch.equal(got.listen, want.listen), k
        assert (got.speaking, got.user_speaking) == (want.speaking, want.user_speaking), k
        speak.trim_before(k)
        listen.trim_before(k)
    # every sample crossed once: far less than the 3-s windows of 7 chunks x 2 streams
    assert sent_bytes < 7 * 2 * 3 * n * 4 / 2


def _delta(cursor: AudioCursor) -> tuple[int, np.ndarray]:
    d = cursor.delta()
    return d.start_sample, d.samples


def test_latents_travel_in_the_model_dtype():
    backends = _backends(torch.bfloat16)
    _open(backends)
    n = PRESET.chunk.samples_per_chunk
    request = spb.ChunkRequest(speak=wire.audio_slice(0, sample_speech(1.0, 16000, 1)[:n]),
                               listen=wire.audio_slice(0, np.zeros(n, np.float32)))
    out = chain_chunk(backends, wrap(request, "s", 0))
    coarse = out["generator"].chunk_computed.latents.latents
    assert coarse.dtype == spb.DTYPE_BFLOAT16
    assert out["encoder"].chunk_computed.encoded.conditions.speak.dtype == spb.DTYPE_BFLOAT16
    assert to_torch(coarse).dtype == torch.bfloat16
    assert out["decoder"].chunk_computed.frames.dtype == spb.DTYPE_UINT8
    # half the bytes of the float32 form
    assert len(coarse.data) == 2 * int(np.prod(list(coarse.shape)))


def test_bad_requests_get_typed_errors_naming_the_problem():
    backends = _backends()
    _open(backends)
    reply = backends["generator"].call(wrap(spb.EncodedChunk(), "nobody", 0))
    assert kind_of(reply) == "stage_error" and "unknown session 'nobody'" in reply.stage_error.message
    lying = spb.Tensor(dtype=spb.DTYPE_FLOAT32, shape=[16000], data=b"\0" * 8)
    reply = backends["encoder"].call(wrap(spb.ChunkRequest(speak=spb.AudioSlice(samples=lying)), "s", 0))
    assert kind_of(reply) == "stage_error" and "speak.samples" in reply.stage_error.message
    reply = backends["decoder"].call(wrap(spb.UserText(text="hi"), "s"))
    assert kind_of(reply) == "stage_error" and "user_text" in reply.stage_error.message
    reply = backends["encoder"].call(wrap(spb.EncodeReferences(), "t"))
    assert kind_of(reply) == "stage_error" and "GLOBAL" in reply.stage_error.message
    assert len(encode(reply)) < 200
