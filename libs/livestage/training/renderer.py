"""A procedural renderer of talking characters: the training data of the demo model.

No photographic data can be downloaded, so identities are drawn: face shape, skin, hair style and
colour, clothes, accessories and background vary per seed. Each frame is drawn from a `FaceState`
(head pose, blink, gaze, smile, mouth openness and width) that a `MotionModel` drives from
- the speak audio: mouth openness follows the loudness envelope, mouth width the brightness of
  the sound (a crude viseme: "ee" wide, "oo" narrow), small head motion follows the stress;
- the listen audio: while the user talks the character stays attentive (gaze on the user, no
  mouth motion) and nods in the user's pauses, with a slight smile;
- text directives at given times: "smile", "nod", "look left", "look right", "look up", "blink".
Everything is deterministic for a seed. `references()` renders the reference images a session is
opened with (global portrait, side views, expressions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

DIRECTIVES = ("smile", "nod", "look left", "look right", "look up", "blink")

LISTENING_NOD_DEGREES = 16.0
"""Amplitude of the nod in the user's pauses. At 9 degrees (the first shipped run) the face moved
3.6 pixels at 128x128, under half a latent pixel, and no model learnt it."""

DIRECTED_NOD_DEGREES = 18.0
"""Amplitude of the nod a "nod" directive asks for (a little more than the listening nod)."""


def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))  # type: ignore[return-value]


@dataclass(frozen=True)
class Identity:
    """Who the character is: everything that stays fixed over a session."""

    face_width: float
    face_height: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int          # 0 short, 1 long, 2 bun
    shirt: tuple[int, int, int]
    background: tuple[int, int, int]
    background_stripes: bool
    eyes: tuple[int, int, int]
    accessory: str           # "", "glasses", "hat", "earrings"
    lips: tuple[int, int, int]

    @classmethod
    def sample(cls, seed: int) -> "Identity":
        rng = np.random.default_rng([seed, 7])
        skin_tone = rng.uniform(0.25, 1.0)
        skin = tuple(int(c * (0.45 + 0.55 * skin_tone)) for c in (235, 190, 160))
        return cls(face_width=float(rng.uniform(0.34, 0.44)), face_height=float(rng.uniform(0.46, 0.56)),
                   skin=skin, hair=_colour(rng, 10, 160), hair_style=int(rng.integers(0, 3)),
                   shirt=_colour(rng, 20, 240), background=_colour(rng, 30, 220),
                   background_stripes=bool(rng.random() < 0.4), eyes=_colour(rng, 20, 140),
                   accessory=str(rng.choice(["", "", "glasses", "hat", "earrings"])),
                   lips=(int(rng.integers(140, 200)), int(rng.integers(40, 90)), int(rng.integers(50, 100))))


@dataclass(frozen=True)
class FaceState:
    """What changes frame to frame (angles in degrees, the rest in 0..1 or -1..1)."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    mouth_open: float = 0.0
    mouth_width: float = 0.5
    blink: float = 0.0
    gaze_x: float = 0.0
    gaze_y: float = 0.0
    smile: float = 0.0


def render_face(identity: Identity, state: FaceState, size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """One frame, uint8 [H, W, 3]. Drawn at 2x and downsampled (anti-aliasing)."""
    h, w = size
    s = 2
    W, H = w * s, h * s
    img = Image.new("RGB", (W, H), identity.background)
    d = ImageDraw.Draw(img)
    if identity.background_stripes:
        darker = tuple(int(c * 0.8) for c in identity.background)
        for x in range(0, W, max(W // 8, 1)):
            d.rectangle([x, 0, x + W // 16, H], fill=darker)
    # head pose: yaw/pitch shift the face centre, roll rotates the head layer
    cx = W * (0.5 + 0.22 * math.sin(math.radians(state.yaw)))
    cy = H * (0.45 + 0.18 * math.sin(math.radians(state.pitch)))
    fw, fh = identity.face_width * W, identity.face_height * H
    d.rectangle([W * 0.12, H * 0.82, W * 0.88, H], fill=identity.shirt)
    d.rectangle([cx - fw * 0.18, cy + fh * 0.35, cx + fw * 0.18, H * 0.86], fill=identity.skin)  # neck
    head = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    hd = ImageDraw.Draw(head)
    if identity.hair_style == 1:
        hd.rectangle([cx - fw * 0.62, cy - fh * 0.45, cx + fw * 0.62, cy + fh * 0.55], fill=identity.hair)
    hd.ellipse([cx - fw * 0.58, cy - fh * 0.62, cx + fw * 0.58, cy + fh * 0.35], fill=identity.hair)
    if identity.hair_style == 2:
        hd.ellipse([cx - fw * 0.22, cy - fh * 0.85, cx + fw * 0.22, cy - fh * 0.45], fill=identity.hair)
    hd.ellipse([cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2], fill=identity.skin)
    turn = math.sin(math.radians(state.yaw))  # features slide towards the side the head turns to
    ex, ey, er = fw * 0.2, cy - fh * 0.08, fw * 0.09
    for side in (-1, 1):
        x = cx + side * ex + turn * fw * 0.12
        open_ = max(1.0 - state.blink, 0.05)
        hd.ellipse([x - er, ey - er * 0.6 * open_, x + er, ey + er * 0.6 * open_], fill=(250, 250, 250))
        if open_ > 0.2:
            px = x + state.gaze_x * er * 0.5
            py = ey - state.gaze_y * er * 0.3
            pr = er * 0.45 * min(open_ * 1.5, 1.0)
            hd.ellipse([px - pr, py - pr, px + pr, py + pr], fill=identity.eyes)
        brow_y = ey - er * (1.2 + 0.3 * state.smile)
        hd.line([x - er, brow_y, x + er, brow_y - er * 0.2 * side * 0], fill=identity.hair, width=max(W // 80, 2))
        if identity.accessory == "glasses":
            hd.ellipse([x - er * 1.5, ey - er * 1.2, x + er * 1.5, ey + er * 1.2], outline=(20, 20, 20), width=max(W // 100, 2))
        if identity.accessory == "earrings":
            hd.ellipse([cx + side * fw * 0.5 - 4, cy + fh * 0.05, cx + side * fw * 0.5 + 4, cy + fh * 0.05 + 8], fill=(230, 200, 40))
    if identity.accessory == "hat":
        hd.rectangle([cx - fw * 0.7, cy - fh * 0.55, cx + fw * 0.7, cy - fh * 0.45], fill=identity.shirt)
        hd.rectangle([cx - fw * 0.45, cy - fh * 0.9, cx + fw * 0.45, cy - fh * 0.5], fill=identity.shirt)
    # mouth: width from the viseme/smile, height from the openness
    mx, my = cx + turn * fw * 0.1, cy + fh * 0.25
    mw = fw * (0.16 + 0.14 * state.mouth_width + 0.08 * state.smile)
    mh = fh * (0.015 + 0.16 * state.mouth_open)
    hd.ellipse([mx - mw, my - mh - fh * 0.02 * state.smile, mx + mw, my + mh], fill=identity.lips)
    if state.mouth_open > 0.08:
        hd.ellipse([mx - mw * 0.8, my - mh * 0.7, mx + mw * 0.8, my + mh * 0.7], fill=(60, 15, 25))
    head = head.rotate(-state.roll, center=(cx, cy + fh * 0.3), resample=Image.BICUBIC)
    img.paste(head, (0, 0), head)
    return np.asarray(img.resize((w, h), Image.LANCZOS), dtype=np.uint8)


def audio_features(audio: np.ndarray, sample_rate: int, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per video frame: loudness in 0..1 (RMS, compressed) and brightness in 0..1 (zero-crossing
    rate), the two cues the mouth follows."""
    hop = sample_rate / fps
    n = int(len(audio) / hop)
    loud, bright = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for i in range(n):
        seg = audio[int(i * hop):int((i + 1) * hop)]
        if seg.size:
            rms = float(np.sqrt(np.mean(seg ** 2)))
            loud[i] = min(1.0, (max(rms, 1e-5) / 0.15) ** 0.6) if rms > 0.01 else 0.0
            bright[i] = min(1.0, float(np.mean(np.abs(np.diff(np.sign(seg))) > 0)) * 6)
    return loud, bright


@dataclass
class MotionModel:
    """Turns audio and directives into a `FaceState` per frame (deterministic per seed)."""

    fps: int
    seed: int = 0
    nod_amplitude: float = LISTENING_NOD_DEGREES
    listening_smile: float = 0.6
    states: list[FaceState] = field(default_factory=list)

    def run(self, speak: np.ndarray, listen: np.ndarray, sample_rate: int, frames: int,
            directives: list[tuple[float, str]] = ()) -> list[FaceState]:
        rng = np.random.default_rng([self.seed, 11])
        s_loud, s_bright = audio_features(np.pad(speak, (0, max(0, frames * sample_rate // self.fps - len(speak)))), sample_rate, self.fps)
        l_loud, _ = audio_features(np.pad(listen, (0, max(0, frames * sample_rate // self.fps - len(listen)))), sample_rate, self.fps)
        blink_at = set(np.cumsum(rng.integers(int(2 * self.fps), int(5 * self.fps), 64)).tolist())
        active: dict[str, float] = {}
        smooth_open = 0.0
        user_talk = 0.0   # voiced seconds in the user's current turn
        pause = 0.0       # seconds since the user last made a sound
        nod_phase = -1.0
        states = []
        for i in range(frames):
            t = i / self.fps
            for at, text in directives:
                if abs(at - t) < 0.5 / self.fps:
                    active[text.strip().lower()] = t
            speaking = s_loud[i] > 0.05 if i < len(s_loud) else False
            target_open = float(s_loud[i]) if i < len(s_loud) else 0.0
            smooth_open += 0.6 * (target_open - smooth_open)
            user = l_loud[i] > 0.05 if i < len(l_loud) else False
            # listening: attentive while the user talks, a nod when they pause after talking
            pause = 0.0 if user else pause + 1 / self.fps
            user_talk = user_talk + 1 / self.fps if user else user_talk
            if pause >= 0.4 and user_talk > 0.6 and nod_phase < 0:
                nod_phase = 0.0
            elif pause > 2.0:
                user_talk = 0.0
            pitch = 0.0
            if nod_phase >= 0:
                pitch = self.nod_amplitude * math.sin(nod_phase * math.pi * 2)
                nod_phase += 1.5 / self.fps
                if nod_phase >= 1.0:
                    nod_phase, user_talk = -1.0, 0.0
            yaw = 3.0 * math.sin(t * 0.7 + self.seed) + (2.0 * math.sin(t * 5.0) * target_open if speaking else 0.0)
            roll = 2.0 * math.sin(t * 0.45 + self.seed * 0.5)
            gaze_x = 0.0 if user else 0.2 * math.sin(t * 0.3 + self.seed)
            gaze_y = 0.0
            smile = self.listening_smile if (user_talk > 0 and pause < 1.0 and not speaking) else 0.0
            blink = 1.0 if (i in blink_at or i - 1 in blink_at) else 0.0
            for text, since in list(active.items()):
                age = t - since
                if text == "smile" and age < 3.0:
                    smile = 1.0
                elif text == "nod" and age < 1.0:
                    pitch = DIRECTED_NOD_DEGREES * math.sin(age * math.pi * 2)
                elif text in ("look left", "look right") and age < 2.0:
                    yaw, gaze_x = (-25.0, -1.0) if text == "look left" else (25.0, 1.0)
                elif text == "look up" and age < 2.0:
                    pitch, gaze_y = -15.0, 1.0
                elif text == "blink" and age < 0.15:
                    blink = 1.0
            states.append(FaceState(yaw=yaw, pitch=pitch, roll=roll, mouth_open=smooth_open if speaking or smooth_open > 0.05 else 0.0,
                                    mouth_width=float(s_bright[i]) if i < len(s_bright) and speaking else 0.5,
                                    blink=blink, gaze_x=gaze_x, gaze_y=gaze_y, smile=smile))
        self.states = states
        return states


@dataclass
class Clip:
    identity: Identity
    frames: np.ndarray            # uint8 [T, H, W, 3]
    states: list[FaceState]
    speak_audio: np.ndarray
    listen_audio: np.ndarray
    directives: list[tuple[float, str]]
    fps: int
    sample_rate: int


def render_clip(identity: Identity, speak_audio: np.ndarray, listen_audio: np.ndarray, *, fps: int = 24,
                sample_rate: int = 16000, size: tuple[int, int] = (128, 128), seconds: float | None = None,
                directives: list[tuple[float, str]] = (), seed: int = 0) -> Clip:
    """A clip of the character reacting to both audio streams and the directives."""
    for _, text in directives:
        if text.strip().lower() not in DIRECTIVES:
            raise ValueError(f"directive {text!r}: known directives are {', '.join(DIRECTIVES)}")
    seconds = seconds if seconds is not None else max(len(speak_audio), len(listen_audio)) / sample_rate
    frames = int(round(seconds * fps))
    states = MotionModel(fps, seed).run(speak_audio, listen_audio, sample_rate, frames, list(directives))
    video = np.stack([render_face(identity, st, size) for st in states]) if states else np.zeros((0, *size, 3), np.uint8)
    return Clip(identity, video, states, speak_audio, listen_audio, list(directives), fps, sample_rate)


def references(identity: Identity, size: tuple[int, int] = (128, 128)) -> dict[str, list[np.ndarray]]:
    """The images a session for this identity is opened with: one global portrait, side views,
    expressions (smile, open mouth, eyes closed)."""
    neutral = FaceState()
    return {
        "global": [render_face(identity, neutral, size)],
        "view": [render_face(identity, replace(neutral, yaw=y), size) for y in (-30.0, 30.0)],
        "expression": [render_face(identity, replace(neutral, **kw), size)
                       for kw in ({"smile": 1.0}, {"mouth_open": 0.8}, {"blink": 1.0})],
    }
