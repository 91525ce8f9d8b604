"""`livestage` command line: render a clip in-process, verify checkpoints against the reference.

    livestage render --image face.png --speak speech.wav [--listen user.wav] --out clip.mp4
    livestage render --sample --out clip.mp4          # bundled sample character and voice
    livestage checkpoint verify FILE [--tolerance 1e-4]
    livestage tenant add NAME [--file tenants.yaml]   # a new API key (printed once) and its entry

Errors are one line on stderr (`livestage: error: ...`) with exit status 2; a parity check
beyond tolerance exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


def _parse_directive_at(value: str) -> tuple[int, str]:
    chunk, sep, text = value.partition(":")
    if not sep or not chunk.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected CHUNK:TEXT, got {value!r}")
    return int(chunk), text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="render a talking-avatar clip in-process to MP4")
    render.add_argument("--preset", default="tiny", help="model preset (tiny, demo, wan-1.3b, lpm-14b)")
    render.add_argument("--weights", type=Path, help="directory of safetensors weights")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--image", type=Path, help="global reference image")
    render.add_argument("--view", type=Path, action="append", default=[], help="body view (<=4)")
    render.add_argument("--expression", type=Path, action="append", default=[], help="expression (<=8)")
    render.add_argument("--speak", type=Path, help="the character's speech (16 kHz audio)")
    render.add_argument("--listen", type=Path, help="the user's speech (16 kHz audio)")
    render.add_argument("--resample", action="store_true", help="accept and resample other rates")
    render.add_argument("--directive", default="", help="text directive from the start")
    render.add_argument("--directive-at", type=_parse_directive_at, action="append", default=[],
                        metavar="CHUNK:TEXT", help="change the directive at a chunk boundary")
    render.add_argument("--seconds", type=float, help="length (default: the longest audio)")
    render.add_argument("--max-seconds", type=float, default=3600.0)
    render.add_argument("--sample", action="store_true", help="use the bundled sample character and voice")
    render.add_argument("--out", type=Path, required=True, help="output MP4 path")
    render.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")

    repo = sub.add_parser("triton-repo", help="generate a Triton model repository from our model code")
    repo.add_argument("--preset", default="tiny")
    repo.add_argument("--out", type=Path, required=True)
    repo.add_argument("--weights", default="", help="weights directory inside the Triton image")
    repo.add_argument("--seed", type=int, default=0)
    repo.add_argument("--allow-seeded", action="store_true", help="dev only: run without weights")
    repo.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                      help="instance kind: auto = GPU where there is one, else CPU")
    repo.add_argument("--idle-timeout", type=float, default=600.0,
                      help="seconds before an abandoned session's caches are freed")
    repo.add_argument("--sys-path", default="", help="extra import path for LiveStage in the image")

    demo = sub.add_parser("demo", help="the main job: the whole stack, a sample character asked a "
                                       "sample question, the MP4 of its answer and the latencies")
    demo.add_argument("--preset", default="demo")
    demo.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    demo.add_argument("--workdir", type=Path, default=Path(".work/demo"))
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the answer")

    train = sub.add_parser("train", help="the demo model's training recipe (resumable): data, VAE, "
                                         "teacher, the four distillation stages, export")
    train.add_argument("--preset", default="demo", help="demo (about 2 h on 2 CPU cores) or tiny")
    train.add_argument("--workdir", type=Path, default=None, help="default .work/train/<preset>")
    train.add_argument("--out", type=Path, default=None,
                       help="where the weights go (default: the preset's shipped weights directory)")
    train.add_argument("--until", default="export", help="stop after this stage")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--warm-start", type=Path, default=None,
                       help="start from earlier exported weights: keep their VAE, fine-tune their teacher")

    evaluate = sub.add_parser("evaluate", help="quality report of the trained demo model (JSON + plots)")
    evaluate.add_argument("--preset", default="demo")
    evaluate.add_argument("--workdir", type=Path, default=None, help="default .work/train/<preset>")
    evaluate.add_argument("--weights", type=Path, default=None, help="default: the shipped weights")
    evaluate.add_argument("--out", type=Path, default=Path("docs/evaluation"))
    evaluate.add_argument("--long-minutes", type=float, default=10.0)
    evaluate.add_argument("--short-minutes", type=float, default=1.0)
    evaluate.add_argument("--threads", type=int, default=0)

    ckpt = sub.add_parser("checkpoint", help="checkpoint tools")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_sub.add_parser("verify", help="compare our model with a reference parity archive")
    verify.add_argument("file", type=Path)
    verify.add_argument("--tolerance", type=float, default=None)

    tenant = sub.add_parser("tenant", help="tenants of the session API (LIVESTAGE_TENANTS_FILE)")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True)
    add = tenant_sub.add_parser("add", help="make a new API key for a tenant: prints the key (shown once) "
                                            "and the tenants-file entry holding only its digest")
    add.add_argument("name", help="tenant id: lowercase letters, digits and '-'")
    add.add_argument("--file", type=Path, help="also add the entry to this tenants file (created if missing)")
    add.add_argument("--max-sessions", type=int, default=4)
    add.add_argument("--max-session-seconds", type=int, default=3600)
    return parser


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def cmd_render(args: argparse.Namespace) -> int:
    from livestage.media import MediaError, Mp4Writer, load_audio, load_image
    from livestage.media.audio import resample_audio
    from livestage.media.samples import SampleCharacter
    from livestage.models.bundle import build_models
    from livestage.models.config import get_preset
    from livestage.runtime.pipeline import StreamingAvatar

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    size = (preset.height, preset.width)
    rate = preset.chunk.sample_rate
    try:
        if args.sample:
            # the bundled character listens to the bundled question, then speaks the answer
            sample = SampleCharacter.load()
            references = sample.reference_images(size)
            question, answer = sample.question, sample.answer
            if rate != 16000:
                question, answer = resample_audio(question, 16000, rate), resample_audio(answer, 16000, rate)
            pause = np.zeros(rate // 2, dtype=np.float32)
            listen = np.concatenate([question, np.zeros(pause.size + answer.size, np.float32)])
            speak = np.concatenate([np.zeros(question.size, np.float32), pause, answer])
        else:
            if args.image is None or args.speak is None:
                raise CliError("render needs --image and --speak (or --sample)")
            references = [("global", load_image(args.image, size))]
            references += [("view", load_image(p, size)) for p in args.view]
            references += [("expression", load_image(p, size)) for p in args.expression]
            speak = load_audio(args.speak, rate, resample=args.resample, max_seconds=args.max_seconds)
            listen = (load_audio(args.listen, rate, resample=args.resample, max_seconds=args.max_seconds)
                      if args.listen else np.zeros(0, dtype=np.float32))
    except MediaError as exc:
        raise CliError(str(exc)) from None
    seconds = args.seconds or max(len(speak), len(listen)) / rate
    if seconds <= 0:
        raise CliError("nothing to render: --seconds must be > 0")
    n_chunks = math.ceil(seconds / preset.chunk.chunk_seconds - 1e-9)

    models = build_models(preset, args.weights, seed=args.seed, allow_seeded=args.weights is None)
    weights = models.describe()
    avatar = StreamingAvatar(models, references, seed=args.seed, directive=args.directive)
    avatar.push_speak_audio(speak)
    avatar.push_listen_audio(listen)
    changes = dict(args.directive_at)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    totals = []
    with Mp4Writer(args.out, fps=preset.chunk.fps, width=preset.width, height=preset.height,
                   audio_rate=rate) as writer:
        for k in range(n_chunks):
            if k in changes:
                avatar.set_directive(changes[k])
            result = avatar.step()
            writer.write_frames(result.frames)
            writer.write_audio(result.speak_audio)
            totals.append(result.timings_ms["total"])
            _emit({**result.timing_record(), "directive": avatar.directive,
                   "speaking": result.speaking})
    wall = time.perf_counter() - started
    video_seconds = n_chunks * preset.chunk.chunk_seconds
    _emit({"event": "done", "out": str(args.out), "preset": preset.name, "chunks": n_chunks,
           "video_seconds": video_seconds, "rtf": round(wall / video_seconds, 3),
           "median_chunk_ms": round(float(np.median(totals)), 2),
           "weights": weights, "seeded_weights": models.seeded})
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from livestage.models.parity import DEFAULT_TOLERANCE, verify_archive
    from livestage.models.weights import WeightsError

    tol = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE
    try:
        report = verify_archive(args.file, tolerance=tol)
    except WeightsError as exc:
        raise CliError(str(exc)) from None
    for name, err in sorted(report.errors.items()):
        status = "ok" if err <= tol else "FAIL"
        print(f"{report.kind} output.{name}: max relative error {err:.3e} (tolerance {tol:.0e}) {status}")
    print(f"{args.file}: {'PASS' if report.passed else 'FAIL'}")
    return 0 if report.passed else EXIT_FAILED


def cmd_train(args: argparse.Namespace) -> int:
    from livestage.training.recipe import STAGES, Recipe, RecipeConfig

    if args.until not in STAGES:
        raise CliError(f"--until must be one of {', '.join(STAGES)}, got {args.until!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(".work/train") / args.preset
    config = RecipeConfig.for_preset(args.preset)
    if args.warm_start is not None:
        config.warm_start = str(args.warm_start)
    summary = Recipe(args.preset, workdir, config, out=args.out, seed=args.seed,
                     log=lambda line: print(line, flush=True)).run(args.until)
    _emit(summary)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from livestage.training.evaluation import EvaluationConfig, run_evaluation

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(".work/train") / args.preset
    report = run_evaluation(args.preset, workdir, args.out, args.weights,
                            EvaluationConfig(long_minutes=args.long_minutes, short_minutes=args.short_minutes),
                            log=lambda line: print(line, flush=True))
    _emit({"event": "done", "report": str(args.out / "report.json"), "summary": report.get("summary", {})})
    return 0


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from livestage.serving.triton.repository import build_repository

    if not args.weights and not args.allow_seeded:
        raise CliError("give --weights DIR (as seen inside the Triton image) or --allow-seeded")
    out = build_repository(args.out, args.preset, weights_dir=args.weights, seed=args.seed,
                           allow_seeded=args.allow_seeded, device=args.device,
                           idle_timeout_s=args.idle_timeout, sys_path=args.sys_path)
    for stage_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        print(f"{stage_dir}/config.pbtxt")
    return 0


def cmd_tenant_add(args: argparse.Namespace) -> int:
    """Prints `key: <key>` and the YAML entry; with --file, adds the entry there (the file is
    validated as a whole first, so a typo never locks every tenant out)."""
    import yaml

    from livestage.security.tenants import TenantFileError, new_key, parse_tenants, tenant_entry

    key = new_key()
    entry = tenant_entry(args.name, key, args.max_sessions, args.max_session_seconds)
    try:
        parse_tenants(yaml.safe_dump({"tenants": [entry]}), "tenant")
    except TenantFileError as exc:
        raise CliError(str(exc).replace("tenant: tenants[0].", "")) from None
    if args.file is not None:
        doc = {"tenants": []}
        if args.file.exists():
            doc = yaml.safe_load(args.file.read_text()) or {"tenants": []}
            parse_tenants(args.file.read_text(), str(args.file))  # the existing file must be valid
        doc.setdefault("tenants", [])
        if any(t.get("id") == args.name for t in doc["tenants"]):
            raise CliError(f"{args.file}: tenant {args.name!r} exists; rotate its key by editing key_sha256")
        doc["tenants"].append(entry)
        text = yaml.safe_dump(doc, sort_keys=False)
        parse_tenants(text, str(args.file))
        tmp = args.file.with_name(args.file.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.file)  # atomic: the session API never reads half a file
    print(f"key: {key}")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            return cmd_render(args)
        if args.command == "triton-repo":
            return cmd_triton_repo(args)
        if args.command == "demo":
            from livestage.devstack.demo import run_demo

            summary = run_demo(args.preset, args.out, args.workdir, args.timeout)
            return 0 if summary.get("out") else 1
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "checkpoint" and args.checkpoint_command == "verify":
            return cmd_checkpoint_verify(args)
        if args.command == "tenant" and args.tenant_command == "add":
            return cmd_tenant_add(args)
    except CliError as exc:
        print(f"livestage: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        print(f"livestage: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return EXIT_USAGE
    parser.error("unknown command")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
