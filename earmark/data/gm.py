"""General MIDI tables for the built-in dataset: candidate classes, slugs and plausible pitch ranges.

Candidates are the 128 GM programs (bank 0) and the GM percussion keys 35-81 (bank 128, kit 0).
Each gets a stable ``index`` (programs 0-127, drums 128+) that seeds its clips, so a class renders
the same audio whichever other classes are selected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pretty_midi

DRUM_KEYS = range(35, 82)

# Plausible MIDI pitch range per GM family (program // 8), roughly the real instruments' ranges.
_FAMILY_RANGES: tuple[tuple[int, int], ...] = (
    (36, 96),  # piano
    (55, 96),  # chromatic percussion
    (36, 91),  # organ
    (40, 84),  # guitar
    (28, 60),  # bass
    (40, 88),  # strings
    (40, 84),  # ensemble
    (40, 80),  # brass
    (48, 84),  # reed
    (60, 96),  # pipe
    (48, 84),  # synth lead
    (40, 84),  # synth pad
    (40, 84),  # synth effects
    (48, 84),  # ethnic
    (48, 84),  # percussive
    (48, 72),  # sound effects: narrow, they stop sounding like themselves when transposed far
)

# Instruments whose range differs clearly from their family's.
_PROGRAM_RANGES: dict[int, tuple[int, int]] = {
    9: (72, 105),  # glockenspiel
    11: (53, 89),  # vibraphone
    12: (45, 96),  # marimba
    13: (65, 105),  # xylophone
    14: (60, 77),  # tubular bells
    22: (60, 84),  # harmonica
    40: (55, 100),  # violin
    41: (48, 88),  # viola
    42: (36, 76),  # cello
    43: (28, 60),  # contrabass
    46: (24, 96),  # harp
    47: (40, 55),  # timpani
    55: (48, 72),  # orchestra hit
    56: (54, 84),  # trumpet
    57: (40, 72),  # trombone
    58: (28, 58),  # tuba
    59: (54, 84),  # muted trumpet
    60: (41, 77),  # french horn
    64: (56, 88),  # soprano sax
    65: (49, 81),  # alto sax
    66: (44, 76),  # tenor sax
    67: (36, 69),  # baritone sax
    68: (58, 91),  # oboe
    69: (52, 81),  # english horn
    70: (34, 72),  # bassoon
    71: (50, 91),  # clarinet
    72: (74, 105),  # piccolo
    78: (60, 78),  # whistle: TimGM6mb has no whistle sample above key 78
    112: (72, 96),  # tinkle bell
    114: (52, 76),  # steel drums
    116: (36, 60),  # taiko
    117: (40, 64),  # melodic tom
}


def slugify(name: str) -> str:
    """Lower-case ``[a-z0-9_]`` form of a name, safe in CSV cells and file names."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class GMCandidate:
    """One renderable sound: a melodic program (pitch varies) or a drum key (pitch fixed)."""

    index: int
    name: str
    program: int | None
    drum_key: int | None
    low: int
    high: int

    @property
    def is_drum(self) -> bool:
        return self.drum_key is not None


def gm_candidates() -> list[GMCandidate]:
    """All candidate classes in a fixed order: programs 0-127, then drum keys 35-81."""
    out = []
    for program in range(128):
        low, high = _PROGRAM_RANGES.get(program, _FAMILY_RANGES[program // 8])
        name = slugify(pretty_midi.program_to_instrument_name(program))
        out.append(GMCandidate(program, name, program, None, low, high))
    for key in DRUM_KEYS:
        name = "drum_" + slugify(pretty_midi.note_number_to_drum_name(key))
        out.append(GMCandidate(len(out), name, None, key, key, key))
    return out
