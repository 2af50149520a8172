"""Accented English for adapting Whisper: English sayings read by espeak-ng in a foreign voice.

The text is modern English: the sayings of BSD ``fortune`` (Debian's ``fortunes`` and
``fortunes-min``, BSD licence, Regents of the University of California), one saying a "verse";
or the King James Version (1611, public domain; Debian's ``bible-kjv-text``, read through its
``bible`` program), whose archaic spelling an adapter learns along with the voice (measured:
an adapter trained on KJV Proverbs made plain ``en-us`` 10 points worse on modern sentences).
Consecutive verses are joined into clips of about ``clip_words`` words (one espeak-ng call
per clip, so a clip is one natural 10-29 s reading: Whisper-base fails differently on single
short sentences, where it hallucinates endings). The clips are shuffled by ``seed``; the first
``num_eval`` are held out, and a training clip that repeats any held-out verse's text is
dropped, so no held-out sentence is ever trained on.

Each clip exists in the ``voice`` being adapted to (the target, e.g. ``fr``) and in the
``control_voice`` (``en-us``): held-out clips of both measure the adapter's gain and what it
costs on plain speech; ``control_fraction`` of the training clips are also trained on in the
control voice, so the adapter does not learn to read every voice as accented. Audio is cached
by :func:`encdec.whisper.clips.synthesize` under ``$ENCDEC_CACHE/accent`` (outside git).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from encdec.whisper.audio import SAMPLE_RATE, load_audio
from encdec.whisper.clips import synthesize
from encdec.whisper.recordings import kjv_verses

PROVERBS = tuple(f"Proverbs{c}:1-40" for c in range(10, 30))
"""Proverbs 10-29: plain English sayings with almost no proper names (names dominate the error
of narrative chapters even in the ``en-us`` voice: 20% WER measured on Ruth 1)."""

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_FILES = tuple(
    "fortunes literature wisdom people work education platitudes science art miscellaneous".split()
)
"""Files of plain prose sayings (Debian ``fortunes``; ``fortunes``/``literature`` are in
``fortunes-min``); files of verse, dialogue, code or topical jokes are left out."""

_UNSPOKEN = re.compile(r"[0-9@#$%&*_<>{}\[\]|/\\=+^~\":;()]|\b[A-Z]{2,}\b")
"""Digits, symbols and capitalised acronyms: espeak-ng reads them in ways Whisper writes
differently ("200" / "two hundred", "NASA" / "N-A-S-A"), which would score the text, not the voice."""

MAX_CLIP_SECONDS = 29.0
"""A clip must fit one 30 s Whisper window; longer syntheses are dropped."""


@dataclasses.dataclass(frozen=True)
class AccentDataConfig:
    """Which text, voices and split."""

    source: str = "fortunes"
    """``fortunes`` (modern sayings, ``fortune_files``) or ``kjv`` (``passages``)."""
    fortune_files: tuple[str, ...] = FORTUNE_FILES
    """Fortune files (names under ``/usr/share/games/fortunes``, or paths)."""
    passages: tuple[str, ...] = PROVERBS
    """KJV passages (``Book<chapter>:<first>-<last>``, as Debian's ``bible -f`` takes them)."""
    voice: str = "fr"
    """The espeak-ng voice adapted to (reading English)."""
    control_voice: str = "en-us"
    """The plain voice whose WER must not rise."""
    speed: int = 170
    """espeak-ng words per minute."""
    clip_words: int = 40
    """Verses are joined until a clip has at least this many words."""
    num_eval: int = 20
    """Held-out clips (each in both voices)."""
    num_train: int = 160
    """Training clips in the target voice (at most what the passages give)."""
    control_fraction: float = 0.25
    """Share of the training clips also trained on in the control voice."""
    verses_file: str | None = None
    """A text file, one verse a line, read instead of ``passages`` (tests use tiny ones)."""
    seed: int = 0
    """Seeds the shuffle that chooses held-out clips."""
    cache_dir: str | None = None
    """Where clips are cached (default ``$ENCDEC_CACHE/accent``, ``~/.cache/encdec/accent``)."""

    def __post_init__(self):
        for name in ("passages", "fortune_files"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.source not in ("fortunes", "kjv"):
            raise ValueError(f"source: must be fortunes or kjv, got {self.source!r}")
        for name in ("speed", "clip_words", "num_eval", "num_train"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not 0.0 <= self.control_fraction <= 1.0:
            raise ValueError(f"control_fraction: must be in [0, 1], got {self.control_fraction!r}")
        if self.source == "kjv" and not self.passages:
            raise ValueError("passages: give at least one passage")
        if self.source == "fortunes" and not self.fortune_files:
            raise ValueError("fortune_files: give at least one fortune file")


@dataclasses.dataclass(frozen=True)
class Clip:
    text: str
    voice: str
    path: Path
    """16-bit WAV (espeak-ng's 22,050 Hz; read with :func:`encdec.whisper.audio.load_audio`)."""


@dataclasses.dataclass(frozen=True)
class AccentSplit:
    train: tuple[Clip, ...]
    """Target-voice clips, then their control-voice copies."""
    eval_target: tuple[Clip, ...]
    eval_control: tuple[Clip, ...]
    """The same held-out texts as ``eval_target``, in the control voice."""


def cache_dir(config: AccentDataConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    root = os.environ.get("ENCDEC_CACHE") or Path.home() / ".cache" / "encdec"
    return Path(root) / "accent"


def fortune_sayings(files: Sequence[str] = FORTUNE_FILES, directory: str = FORTUNE_DIR) -> list[str]:
    """The one-paragraph prose sayings of ``fortune`` files, attributions (``-- Author``) cut.

    Indented entries (verse, dialogue, lists) and sayings with digits, symbols or acronyms are
    left out (see ``_UNSPOKEN``), as are fragments under 4 words and sayings over 60.
    """
    sayings = []
    for name in files:
        path = Path(name) if os.sep in name else Path(directory) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"fortune file {path} not found (Debian: apt-get install -y fortunes fortunes-min)"
            )
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in entry.strip("\n%").split("\n") if not line.strip().startswith("--")]
            if any(line.startswith(("\t", "  ")) for line in lines):
                continue
            text = " ".join(" ".join(lines).split())
            if text.isascii() and not _UNSPOKEN.search(text) and 4 <= len(text.split()) <= 60:
                sayings.append(text)
    return sayings


def group_verses(verses: Sequence[str], clip_words: int) -> list[tuple[str, ...]]:
    """Consecutive verses joined until each group has ``clip_words`` words (a short tail is dropped)."""
    groups, current, words = [], [], 0
    for verse in verses:
        current.append(verse)
        words += len(verse.split())
        if words >= clip_words:
            groups.append(tuple(current))
            current, words = [], 0
    return groups


def split_groups(
    groups: Sequence[tuple[str, ...]], num_eval: int, num_train: int, seed: int
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """``(train, held_out)`` groups: a seeded shuffle, held-out first; a training group sharing
    a verse's text with any held-out group is dropped."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    if len(order) <= num_eval:
        raise ValueError(f"{len(groups)} clips cannot leave {num_eval} held out and train on the rest")
    held = [groups[i] for i in order[:num_eval]]
    held_verses = {v for g in held for v in g}
    train = [groups[i] for i in order[num_eval:] if not held_verses.intersection(groups[i])]
    return train[:num_train], held


def _clip(text: str, voice: str, directory: Path, speed: int) -> Clip | None:
    (path,) = synthesize([text], directory / voice, voice=voice, speed=speed)
    seconds = len(load_audio(path)) / SAMPLE_RATE
    return Clip(text, voice, path) if seconds <= MAX_CLIP_SECONDS else None


def build_split(config: AccentDataConfig, verses: Sequence[str] | None = None) -> AccentSplit:
    """Synthesize (or reuse) every clip of the split; ``verses`` replaces the KJV passages."""
    if verses is None and config.verses_file:
        verses = [v.strip() for v in Path(config.verses_file).read_text().splitlines() if v.strip()]
    if verses is None:
        kjv = config.source == "kjv"
        verses = kjv_verses(config.passages) if kjv else fortune_sayings(config.fortune_files)
    verses = list(verses)
    train_groups, held_groups = split_groups(
        group_verses(verses, config.clip_words), config.num_eval, config.num_train, config.seed
    )
    directory = cache_dir(config)

    def clips(groups, voice):
        made = (_clip(" ".join(g), voice, directory, config.speed) for g in groups)
        return [c for c in made if c is not None]

    eval_target, eval_control = [], []
    for group in held_groups:  # a held-out text counts only if it fits a window in both voices
        pair = clips([group], config.voice), clips([group], config.control_voice)
        if pair[0] and pair[1]:
            eval_target += pair[0]
            eval_control += pair[1]
    train = clips(train_groups, config.voice)
    control_count = round(config.control_fraction * len(train_groups))
    train += clips(train_groups[:control_count], config.control_voice)
    return AccentSplit(tuple(train), tuple(eval_target), tuple(eval_control))
