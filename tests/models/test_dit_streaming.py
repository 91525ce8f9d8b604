"""The causal DiT: cached chunk-by-chunk generation equals one full-sequence forward, bounded
memory over long sessions, RoPE positions that never run out, strict weight loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from livestage.models.attention import MaskedSequenceAttention, sdpa
from livestage.models.config import ChunkConfig, get_preset
from livestage.models.dit import AudioContext, WanDiT, is_extra_key
from livestage.models.kv_cache import ChunkKVCache
from livestage.models.rope import Rotary3D, apply_rotary, grid_positions
from livestage.models.weights import WeightsError, load_weights, save_weights, seeded_init



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only in this module; kept per test so other modules (training) keep autograd."""
    with torch.no_grad():
        yield

LATENT = 4  # latent height/width -> 2x2 tokens per latent frame with patch (1, 2, 2)


def _model(sink_chunks: int = 3, window_chunks: int = 2, **dit_changes) -> WanDiT:
    preset = get_preset("tiny")
    dit = dataclasses.replace(preset.dit, **dit_changes)
    chunk = dataclasses.replace(preset.chunk, sink_chunks=sink_chunks, window_chunks=window_chunks)
    model = WanDiT(dit, chunk).eval()
    seeded_init(model, seed=7)
    return model


def _inputs(model: WanDiT, n_chunks: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = model.chunk.latent_frames_per_chunk
    latents = [torch.randn(1, 16, f, LATENT, LATENT, generator=gen) for _ in range(n_chunks)]
    timesteps = [float(torch.randint(0, 1000, (1,), generator=gen)) for _ in range(n_chunks)]
    a = model.chunk.audio_window_frames
    speak = [torch.randn(1, a, model.config.audio_dim, generator=gen) for _ in range(n_chunks)]
    listen = [torch.randn(1, a, model.config.audio_dim, generator=gen) for _ in range(n_chunks)]
    refs = [("global", torch.randn(1, 16, 1, LATENT, LATENT, generator=gen)),
            ("view", torch.randn(1, 16, 1, LATENT, LATENT, generator=gen)),
            ("expression", torch.randn(1, 16, 1, LATENT, LATENT, generator=gen)),
            ("expression", torch.randn(1, 16, 1, LATENT, LATENT, generator=gen))]
    text = torch.randn(1, 5, model.config.text_dim, generator=gen)
    return latents, timesteps, speak, listen, refs, text


def _streamed(model: WanDiT, n_chunks: int, seed: int = 0) -> tuple[list[torch.Tensor], ChunkKVCache]:
    latents, timesteps, speak, listen, refs, text = _inputs(model, n_chunks, seed)
    cache = ChunkKVCache(model.cache_geometry(LATENT, LATENT))
    context = model.embed_text(text)
    model.prefill_references(refs, model.embed_text(text[:, :0]), cache)
    outs = []
    tpf = cache.geometry.grid_height * cache.geometry.grid_width
    for i in range(n_chunks):
        audio = model.audio_context(speak[i], listen[i], model.chunk.latent_frames_per_chunk, tpf)
        out = model.forward_chunk(latents[i], torch.tensor([timesteps[i]]), context, cache, audio,
                                  capture=True, chunk_index=i)
        cache.append(out.cached)
        outs.append(out.flow)
    return outs, cache


class WindowRelativeAttention:
    """Reference attention over the whole sequence: query chunk i sees the references, the sink
    chunks, the last `window` chunks before it and itself, each key rotated with the slot it has
    in chunk i's window. Computed densely per query block from one full-sequence q/k/v."""

    def __init__(self, model: WanDiT, n_ref: int, ref_positions: torch.Tensor, n_chunks: int,
                 tokens_per_chunk: int, geometry):
        self.model, self.n_ref, self.n_chunks, self.tpc = model, n_ref, n_chunks, tokens_per_chunk
        self.ref_positions, self.geometry = ref_positions, geometry
        self.rotary: Rotary3D = model.rotary

    def _rope(self, x, positions):
        return apply_rotary(x, self.rotary.table(positions).to(x.device, torch.float32))

    def attend(self, layer, q, k, v):
        out = torch.empty_like(q)
        r = self.n_ref
        rq = self._rope(q[:, :r], self.ref_positions)
        rk = self._rope(k[:, :r], self.ref_positions)
        out[:, :r] = sdpa(rq, rk, v[:, :r])
        g = self.geometry
        for i in range(self.n_chunks):
            visible = [j for j in range(i) if j < g.sink_chunks]
            window = [j for j in range(g.sink_chunks, i)][-g.window_chunks:] if g.window_chunks else []
            visible += window + [i]
            keys = [rk]
            vals = [v[:, :r]]
            for slot, j in enumerate(visible):
                sl = slice(r + j * self.tpc, r + (j + 1) * self.tpc)
                keys.append(self._rope(k[:, sl], g.chunk_positions(slot)))
                vals.append(v[:, sl])
            sl = slice(r + i * self.tpc, r + (i + 1) * self.tpc)
            qi = self._rope(q[:, sl], g.chunk_positions(len(visible) - 1))
            out[:, sl] = sdpa(qi, torch.cat(keys, 1), torch.cat(vals, 1))
        return out


def _full_sequence(model: WanDiT, n_chunks: int, plan_factory, seed: int = 0) -> list[torch.Tensor]:
    """One forward over [references | chunk 0 | ... | chunk n-1] with per-token timesteps."""
    latents, timesteps, speak, listen, refs, text = _inputs(model, n_chunks, seed)
    geometry = model.cache_geometry(LATENT, LATENT)
    ref_tokens = model.reference_tokens(refs)
    ref_positions = model.reference_positions([k for k, _ in refs], geometry)
    video = [model.embed_video(x)[0] for x in latents]
    tpc = video[0].shape[1]
    tokens = torch.cat([ref_tokens, *video], dim=1)
    t = torch.cat([torch.zeros(ref_tokens.shape[1])] + [torch.full((tpc,), ts) for ts in timesteps])
    e, e0 = model.time_modulation(t[None])
    # Text: references were prefilled with an empty directive, video chunks use the directive.
    ctx_ref = model.embed_text(text[:, :0])
    ctx_vid = model.embed_text(text)
    # Per-chunk audio windows: chunk i's tokens only see chunk i's window (block diagonal).
    tpf = geometry.grid_height * geometry.grid_width
    ctxs = [model.audio_context(speak[i], listen[i], model.chunk.latent_frames_per_chunk, tpf)
            for i in range(n_chunks)]
    a = ctxs[0].speak.shape[1]
    speak_mask = torch.zeros(n_chunks * tpc, n_chunks * a, dtype=torch.bool)
    listen_mask = torch.zeros_like(speak_mask)
    for i, c in enumerate(ctxs):
        speak_mask[i * tpc:(i + 1) * tpc, i * a:(i + 1) * a] = c.speak_mask
        listen_mask[i * tpc:(i + 1) * tpc, i * a:(i + 1) * a] = c.listen_mask
    audio = AudioContext(torch.cat([c.speak for c in ctxs], 1), torch.cat([c.listen for c in ctxs], 1),
                         speak_mask, listen_mask)
    plan = plan_factory(ref_tokens.shape[1], ref_positions, tpc, geometry)
    n_ref = ref_tokens.shape[1]
    # Text cross-attention differs between the reference and video tokens, so run the blocks by
    # hand: split the cross-attention input, everything else is the model's own code.
    x = tokens
    for layer, block in enumerate(model.blocks):
        mods = block._modulation(e0)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        y = block.self_attn((block.norm1(x).float() * (1 + scale1) + shift1), plan, layer)
        x = x + y * gate1
        normed = block.norm3(x)
        x = x + torch.cat([block.cross_attn(normed[:, :n_ref], ctx_ref),
                           block.cross_attn(normed[:, n_ref:], ctx_vid)], 1)
        x = block._audio(x, audio, n_ref)
        y = block.ffn(block.norm2(x).float() * (1 + scale2) + shift2)
        x = x + y * gate2
    out = model.head(x, e)
    grid = (model.chunk.latent_frames_per_chunk, LATENT // 2, LATENT // 2)
    return [model.unpatchify(out[:, n_ref + i * tpc:n_ref + (i + 1) * tpc], grid)
            for i in range(n_chunks)]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def test_cached_chunks_equal_one_masked_full_sequence_forward():
    """Before the window slides, window positions equal absolute ones: one plain masked forward."""
    model = _model()
    n = 6  # 3 sinks + 2 window + current: nothing evicted yet
    streamed, _ = _streamed(model, n)

    def plan(n_ref, ref_positions, tpc, geometry):
        positions = torch.cat([ref_positions] + [geometry.chunk_positions(i) for i in range(n)])
        total = n_ref + n * tpc
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:n_ref, :n_ref] = True
        for i in range(n):
            rows = slice(n_ref + i * tpc, n_ref + (i + 1) * tpc)
            mask[rows, :n_ref] = True
            mask[rows, n_ref:n_ref + (i + 1) * tpc] = True  # chunk-causal
        return MaskedSequenceAttention(model.rotary, positions, mask)

    full = _full_sequence(model, n, plan)
    assert _max_rel(streamed, full) < 1e-5


def test_cached_chunks_equal_full_sequence_with_sinks_and_sliding_window():
    """After eviction: 3 sinks + 2-chunk window, keys re-roped to their slot, 12 chunks."""
    model = _model()
    n = 12
    streamed, cache = _streamed(model, n)
    assert [c.chunk_index for c in cache.history()] == [0, 1, 2, 10, 11]
    full = _full_sequence(
        model, n, lambda n_ref, rp, tpc, g: WindowRelativeAttention(model, n_ref, rp, n, tpc, g)
    )
    assert _max_rel(streamed, full) < 1e-5
    # The window really matters: a model that saw everything would give other outputs.
    assert _max_rel(streamed[-1:], _streamed(_model(window_chunks=9), n)[0][-1:]) > 1e-3


def test_cache_memory_and_attended_keys_stay_flat_over_200_chunks():
    model = _model()
    cache = ChunkKVCache(model.cache_geometry(LATENT, LATENT))
    gen = torch.Generator().manual_seed(1)
    context = model.embed_text(torch.zeros(1, 0, model.config.text_dim))
    sizes, key_counts = [], []
    for i in range(200):
        x = torch.randn(1, 16, model.chunk.latent_frames_per_chunk, LATENT, LATENT, generator=gen)
        out = model.forward_chunk(x, torch.tensor([500.0]), context, cache, capture=True, chunk_index=i)
        cache.append(out.cached)
        sizes.append(cache.nbytes())
        view = cache.rotary_views(model.rotary)
        key_counts.append(view.keys[0].shape[1])
    assert len(set(sizes[5:])) == 1, "cache size must not change once sinks and window are full"
    assert sizes[-1] <= cache.max_bytes()
    assert sizes[-1] == cache.max_bytes()  # the bound is tight: 5 chunks of K/V, no reference
    assert len(set(key_counts[5:])) == 1 and key_counts[-1] == 5 * cache.geometry.tokens_per_chunk
    assert [c.chunk_index for c in cache.sinks] == [0, 1, 2]


def test_positions_never_exceed_the_rope_table_in_long_sessions():
    model = _model(rope_max_positions=40)  # latent frames of a 50-chunk session: 100 > 40
    rotary = model.rotary
    with pytest.raises(ValueError, match="out of range"):
        rotary.table(grid_positions(50 * model.chunk.latent_frames_per_chunk, 1, 1))
    outs, cache = _streamed(model, 50)
    assert all(torch.isfinite(o).all() for o in outs)
    assert cache.history()[-1].chunk_index == 49


def test_state_dict_roundtrip_and_clear_errors(tmp_path):
    model = _model()
    path = tmp_path / "backbone.safetensors"
    save_weights(model, path)
    other = WanDiT(model.config, model.chunk).eval()
    load_weights(other, path)
    x = torch.randn(1, 16, 2, LATENT, LATENT)
    ctx = torch.randn(1, 3, model.config.text_dim)
    assert torch.equal(model(x, torch.tensor([300.0]), ctx), other(x, torch.tensor([300.0]), ctx))

    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    missing = dict(state)
    del missing["blocks.1.self_attn.q.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing key 'blocks.1.self_attn.q.weight'"):
        load_weights(other, tmp_path / "missing.safetensors")
    bad_shape = dict(state)
    bad_shape["head.head.weight"] = torch.zeros(3, 3)
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch for key 'head.head.weight'"):
        load_weights(other, tmp_path / "shape.safetensors")
    extra = dict(state)
    extra["blocks.9.ffn.0.weight"] = torch.zeros(1)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected key 'blocks.9.ffn.0.weight'"):
        load_weights(other, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(other, tmp_path / "nope.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(other, tmp_path / "corrupt.safetensors")


def test_wan_base_checkpoint_loads_into_audio_preset_only_with_extras_allowed(tmp_path):
    """A plain Wan checkpoint (no audio/reference modules) fills the Wan part of an avatar model."""
    model = _model()
    base = WanDiT(dataclasses.replace(model.config, audio_dim=0, references=False))
    path = tmp_path / "wan.safetensors"
    save_weights(base, path)
    with pytest.raises(WeightsError, match="missing key"):
        load_weights(model, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, path, allow_missing=is_extra_key)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and not any(is_extra_key(k) for k in changed)
    assert torch.equal(after["blocks.0.self_attn.q.weight"], base.state_dict()["blocks.0.self_attn.q.weight"])
    assert sum(is_extra_key(k) for k in after) > 0


def test_conditions_change_the_output():
    model = _model()
    a, _ = _streamed(model, 2, seed=0)
    latents, timesteps, speak, listen, refs, text = _inputs(model, 2, seed=0)
    cache = ChunkKVCache(model.cache_geometry(LATENT, LATENT))
    model.prefill_references(refs, model.embed_text(text[:, :0]), cache)
    tpf = 4
    audio = model.audio_context(speak[0] * 0, listen[0], model.chunk.latent_frames_per_chunk, tpf)
    out = model.forward_chunk(latents[0], torch.tensor([timesteps[0]]), model.embed_text(text),
                              cache, audio)
    assert float((out.flow - a[0]).abs().max()) > 1e-4, "speak audio must influence the chunk"
