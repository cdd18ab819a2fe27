"""ESC-50 as a Clotho-format dataset: captions made from the class names.

Each clip gets 5 captions drawn (seeded, per file) from a pool: a few natural phrasings for the known
ESC-50 classes plus general templates that work for any class name ("the sound of {x}", "{x} can be
heard", ...), with names humanised ("chirping_birds" -> "chirping birds"). The metadata lists ``.wav``
names while the shared copy holds ``.ogg`` files with the same stem; the CSV names the file that exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from atae.data.clotho import csv_rows, header_columns, read_text, write_caption_csv_rows
from atae.errors import DataError

AUDIO_SUFFIXES = (".wav", ".ogg", ".flac", ".mp3")
CAPTIONS_PER_CLIP = 5

GENERIC_TEMPLATES = ("the sound of {x}", "{x} can be heard", "a recording of {x}", "{x} in the background",
                     "someone recorded {x}", "a short clip of {x}", "{x} is audible nearby")

# class -> (noun phrase, natural sentences); anything not listed uses the humanised name.
PHRASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dog": ("a dog", ("a dog barks", "a dog is barking loudly")),
    "rooster": ("a rooster", ("a rooster crows", "a rooster crows in the morning")),
    "pig": ("a pig", ("a pig grunts", "a pig is oinking")),
    "cow": ("a cow", ("a cow moos", "a cow is mooing in a field")),
    "frog": ("a frog", ("a frog croaks", "frogs are croaking")),
    "cat": ("a cat", ("a cat meows", "a cat is meowing")),
    "hen": ("a hen", ("a hen clucks", "chickens are clucking")),
    "insects": ("insects", ("insects are buzzing", "a flying insect buzzes")),
    "sheep": ("a sheep", ("a sheep bleats", "sheep are bleating")),
    "crow": ("a crow", ("a crow caws", "crows are cawing")),
    "rain": ("rain", ("rain is falling", "rain pours down steadily")),
    "sea_waves": ("sea waves", ("waves crash on the shore", "the sea is washing onto a beach")),
    "crackling_fire": ("a crackling fire", ("a fire crackles", "wood is burning and crackling")),
    "crickets": ("crickets", ("crickets are chirping", "crickets chirp at night")),
    "chirping_birds": ("chirping birds", ("birds are chirping", "birds sing in the trees")),
    "water_drops": ("water drops", ("water is dripping", "drops of water fall")),
    "wind": ("wind", ("the wind is blowing", "wind blows strongly")),
    "pouring_water": ("pouring water", ("water is poured into a container", "someone pours water")),
    "toilet_flush": ("a toilet flush", ("a toilet is flushed", "a toilet flushes")),
    "thunderstorm": ("a thunderstorm", ("thunder rumbles in a storm", "a thunderstorm rages")),
    "crying_baby": ("a crying baby", ("a baby is crying", "an infant cries loudly")),
    "sneezing": ("sneezing", ("a person sneezes", "someone sneezes")),
    "clapping": ("clapping", ("people are clapping", "someone claps their hands")),
    "breathing": ("breathing", ("a person is breathing heavily", "someone breathes in and out")),
    "coughing": ("coughing", ("a person coughs", "someone is coughing")),
    "footsteps": ("footsteps", ("someone is walking", "footsteps on a hard floor")),
    "laughing": ("laughing", ("a person laughs", "people are laughing")),
    "brushing_teeth": ("brushing teeth", ("someone brushes their teeth", "a toothbrush scrubs teeth")),
    "snoring": ("snoring", ("a person is snoring", "someone snores while asleep")),
    "drinking_sipping": ("drinking", ("someone sips a drink", "a person is drinking and swallowing")),
    "door_wood_knock": ("a knock on a wooden door", ("someone knocks on a door", "knocking on wood")),
    "mouse_click": ("mouse clicks", ("a computer mouse is clicked", "someone clicks a mouse")),
    "keyboard_typing": ("keyboard typing", ("someone types on a keyboard", "keys are typed rapidly")),
    "door_wood_creaks": ("a creaking door", ("a wooden door creaks", "a door creaks open")),
    "can_opening": ("a can opening", ("a can is opened", "someone cracks open a can")),
    "washing_machine": ("a washing machine", ("a washing machine is running", "a washer spins")),
    "vacuum_cleaner": ("a vacuum cleaner", ("a vacuum cleaner is running", "someone is vacuuming")),
    "clock_alarm": ("a clock alarm", ("an alarm clock rings", "an alarm is beeping")),
    "clock_tick": ("a ticking clock", ("a clock is ticking", "a clock ticks steadily")),
    "glass_breaking": ("breaking glass", ("glass shatters", "a glass breaks")),
    "helicopter": ("a helicopter", ("a helicopter flies overhead", "helicopter rotors whir")),
    "chainsaw": ("a chainsaw", ("a chainsaw is running", "a chainsaw cuts wood")),
    "siren": ("a siren", ("a siren wails", "an emergency siren is blaring")),
    "car_horn": ("a car horn", ("a car honks its horn", "a car horn beeps")),
    "engine": ("an engine", ("an engine is running", "a motor idles")),
    "train": ("a train", ("a train passes by", "a train rolls along the tracks")),
    "church_bells": ("church bells", ("church bells are ringing", "bells ring from a church")),
    "airplane": ("an airplane", ("an airplane flies overhead", "a plane passes in the sky")),
    "fireworks": ("fireworks", ("fireworks are exploding", "fireworks pop and bang")),
    "hand_saw": ("a hand saw", ("someone is sawing wood", "a hand saw cuts through wood")),
}


def humanise(name: str) -> str:
    """'chirping_birds' -> 'chirping birds'."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()).lower()


def caption_pool(category: str) -> list[str]:
    """Every caption this module can make for a class (natural phrasings first, then templates)."""
    noun, sentences = PHRASES.get(category, (humanise(category), ()))
    pool = list(sentences) + [t.format(x=noun) for t in GENERIC_TEMPLATES]
    return [p[0].upper() + p[1:] for p in pool]


def captions_for(category: str, key: str, seed: int = 0, n: int = CAPTIONS_PER_CLIP) -> list[str]:
    """n distinct captions for one clip, chosen by a generator seeded from (seed, key)."""
    pool = caption_pool(category)
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng(h)
    return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def _find_audio(audio_dir: Path, name: str) -> str | None:
    if (audio_dir / name).is_file():
        return name
    stem = Path(name).stem
    for suf in AUDIO_SUFFIXES:
        if (audio_dir / (stem + suf)).is_file():
            return stem + suf
    return None


def write_caption_csv(meta_csv, audio_dir, out_csv, folds: Iterable[int], seed: int = 0) -> Path:
    """Write a Clotho-format CSV for the ESC-50 clips of ``folds`` whose audio exists (atomically).

    Rows follow the metadata order. Clips whose audio is absent are left out; if none is found the
    audio folder is wrong -> DataError.
    """
    meta_csv, audio_dir, out_csv = Path(meta_csv), Path(audio_dir), Path(out_csv)
    folds = {int(f) for f in folds}
    rows = csv_rows(read_text(meta_csv, fallback_problem=[]))
    if not rows:
        raise DataError("the metadata CSV is empty", path=meta_csv)
    cols, _ = header_columns(meta_csv, rows[0], ["filename", "fold", "category"], None,
                             "filename,fold,target,category,esc10,src_file,take")
    out_rows, n_listed = [], 0
    for line, r in enumerate(rows[1:], start=2):
        try:
            fold = int(r[cols["fold"]])
        except (ValueError, IndexError):
            raise DataError(f"line {line}: bad fold value", path=meta_csv) from None
        if fold not in folds:
            continue
        n_listed += 1
        name = _find_audio(audio_dir, r[cols["filename"]])
        if name is not None:
            out_rows.append([name] + captions_for(r[cols["category"]], Path(name).stem, seed))
    if not out_rows:
        raise DataError(f"none of the {n_listed} clips of folds {sorted(folds)} has audio in this folder",
                        path=audio_dir, fix="check the ESC-50 audio folder and the fold numbers")
    return write_caption_csv_rows(out_csv, out_rows, CAPTIONS_PER_CLIP)
