"""A small realistic audio corpus, made offline, for measuring whether pre-training learns.

Sources (Debian/Ubuntu packages `espeak-ng`, `fluidsynth` and `fluid-soundfont-gm`; nothing is downloaded):
- speech: espeak-ng in six languages and many voice variants, speaking random numbers (so the
  words and their sounds depend on the language), and single English digit words;
- music: eight General-MIDI instruments of the FluidR3 soundfont playing random melodies and
  chords, rendered by fluidsynth;
- environment: procedural textures (rain, wind, engine, water, babble).
Every clip is mixed with background noise (coloured noise or a texture) at a random SNR.

`write_corpus` writes the unlabelled pre-training corpus; `write_tasks` the three labelled probe
tasks in EVAR's metadata format (file_name, label, split), drawn from separate random streams, so
no probe clip is in the corpus:
- digits: which English digit word is spoken (10 classes, 1 s clips);
- language: which language is spoken (6 classes, 3 s clips);
- instrument: which instrument plays (8 classes, 3 s clips).
"""
import csv
import io
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import soundfile as sf
import soxr
from scipy.signal import butter, lfilter, sosfilt

SAMPLE_RATE = 16000
SOUNDFONT = Path('/usr/share/sounds/sf2/FluidR3_GM.sf2')
LANGUAGES = ('en', 'de', 'fr', 'es', 'it', 'pl')
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
VOICE_VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4', 'f5', 'klatt', 'klatt2',
                  'klatt3', 'croak', 'grandma', 'grandpa', 'Andy', 'Annie', 'david', 'john', 'linda', 'max')
# GM program number (0-based) and the MIDI note range each instrument plays in.
INSTRUMENTS = {'piano': (0, 40, 84), 'organ': (19, 36, 79), 'guitar': (24, 40, 76), 'bass': (33, 28, 55),
               'violin': (40, 55, 88), 'trumpet': (56, 54, 82), 'sax': (65, 49, 80), 'flute': (73, 60, 93)}
TEXTURES = ('rain', 'wind', 'engine', 'water', 'babble')
SPLIT_SHARES = (('train', 0.6), ('valid', 0.15), ('test', 0.25))


def missing_tools() -> list[str]:
    """What this machine lacks to build the corpus ([] when everything is there)."""
    missing = [f'{tool} (Debian package {tool})' for tool in ('espeak-ng', 'fluidsynth') if not shutil.which(tool)]
    if not SOUNDFONT.is_file():
        missing.append(f'{SOUNDFONT} (Debian package fluid-soundfont-gm)')
    return missing


# ----- sources ----------------------------------------------------------------------------------

def read_wav_bytes(data: bytes) -> np.ndarray:
    """WAV bytes -> mono float32 at SAMPLE_RATE."""
    wav, sr = sf.read(io.BytesIO(data), dtype='float32', always_2d=True)
    wav = wav.mean(axis=1)
    return soxr.resample(wav, sr, SAMPLE_RATE, quality='HQ').astype(np.float32) if sr != SAMPLE_RATE else wav


def speak(text: str, language: str, rng: np.random.Generator) -> np.ndarray:
    """espeak-ng reading `text` in `language` with a random voice variant, speed, pitch and intonation."""
    voice = f'{language}+{VOICE_VARIANTS[rng.integers(len(VOICE_VARIANTS))]}'
    cmd = ['espeak-ng', '-v', voice, '-s', str(int(rng.integers(120, 230))), '-p', str(int(rng.integers(15, 85))),
           '-k', '0', '-g', str(int(rng.integers(0, 6))), '--stdout', text]
    wav = read_wav_bytes(subprocess.run(cmd, check=True, capture_output=True).stdout)
    return trim_silence(wav)


def random_numbers(rng: np.random.Generator) -> str:
    """Two to four random numbers of one to four digits, e.g. '347 92 1508'."""
    return ' '.join(str(int(rng.integers(0, 10 ** int(rng.integers(1, 5))))) for _ in range(int(rng.integers(2, 5))))


def trim_silence(wav: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wav) > threshold)
    return wav[loud[0]:loud[-1] + 1] if len(loud) else wav


def _var_len(value: int) -> bytes:
    """A MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def write_midi(path: Path, events: list[tuple[int, bytes]]) -> None:
    """A format-0 MIDI file from (time in ms, message bytes) events; one tick is one millisecond."""
    track = bytearray(_var_len(0) + b'\xff\x51\x03' + (480_000).to_bytes(3, 'big'))  # 480 ticks = 480 ms per beat
    now = 0
    for time_ms, message in sorted(events, key=lambda e: e[0]):
        track += _var_len(time_ms - now) + message
        now = time_ms
    track += _var_len(0) + b'\xff\x2f\x00'
    path.write_bytes(b'MThd' + struct.pack('>IHHH', 6, 0, 1, 480) + b'MTrk' + struct.pack('>I', len(track)) + track)


def melody(instrument: str, seconds: float, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Random notes (start ms, end ms, MIDI key, velocity) filling `seconds`: a walk on a random scale,
    sometimes with chords."""
    _, low, high = INSTRUMENTS[instrument]
    scale = np.array([0, 2, 4, 5, 7, 9, 11] if rng.random() < 0.5 else [0, 2, 3, 5, 7, 8, 10])
    keys = sorted({k for octave in range(0, 128, 12) for k in octave + scale + int(rng.integers(12))
                   if low <= k <= high})
    pos, t, notes = int(rng.integers(len(keys))), 0, []
    while t < seconds * 1000 - 100:
        length = int(rng.uniform(120, 700))
        chord = [0, 2, 4] if rng.random() < 0.2 else [0]
        velocity = int(rng.integers(50, 121))
        for step in chord:
            notes.append((t, t + int(length * rng.uniform(0.6, 1.0)), keys[min(pos + step, len(keys) - 1)], velocity))
        t += length
        pos = int(np.clip(pos + rng.integers(-3, 4), 0, len(keys) - 1))
    return notes


def render_instruments(parts: list[tuple[str, float, np.random.Generator]], workdir: Path) -> list[np.ndarray]:
    """Render (instrument, seconds, rng) clips with one fluidsynth run: the clips follow each other in
    one MIDI file with gaps for the release and reverb tails, and are cut apart afterwards."""
    gap_ms = 1500
    events, starts, t = [], [], 0
    for instrument, seconds, rng in parts:
        events.append((t, bytes([0xC0, INSTRUMENTS[instrument][0]])))
        for start, end, key, velocity in melody(instrument, seconds, rng):
            events += [(t + start, bytes([0x90, key, velocity])), (t + end, bytes([0x80, key, 0]))]
        starts.append(t)
        t += int(seconds * 1000) + gap_ms
    midi, wav_path = workdir / 'parts.mid', workdir / 'parts.wav'
    write_midi(midi, events)
    subprocess.run(['fluidsynth', '-ni', '-q', '-g', '0.7', '-r', str(SAMPLE_RATE), '-F', str(wav_path),
                    str(SOUNDFONT), str(midi)], check=True, capture_output=True)
    audio, sr = sf.read(wav_path, dtype='float32', always_2d=True)
    audio = audio.mean(axis=1)
    assert sr == SAMPLE_RATE, sr
    clips = []
    for start, (_, seconds, _) in zip(starts, parts):
        a = start * SAMPLE_RATE // 1000
        clips.append(fit_length(audio[a:a + int(seconds * SAMPLE_RATE)], seconds))
    return clips


def _lowpass_noise(n: int, cutoff_hz: float, rng: np.random.Generator) -> np.ndarray:
    sos = butter(2, min(cutoff_hz, SAMPLE_RATE * 0.45), 'low', fs=SAMPLE_RATE, output='sos')
    return sosfilt(sos, rng.standard_normal(n))


def texture(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A procedural environmental sound of `seconds`."""
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if kind == 'rain':  # a noise bed and many decaying drops
        x = 0.3 * _lowpass_noise(n, rng.uniform(2000, 7000), rng)
        drop = np.exp(-np.arange(int(0.01 * SAMPLE_RATE)) / (0.002 * SAMPLE_RATE))
        for start in rng.integers(0, n - len(drop), int(seconds * rng.uniform(50, 400))):
            x[start:start + len(drop)] += drop * rng.standard_normal(len(drop)) * rng.uniform(0.2, 1.5)
    elif kind == 'wind':  # low-passed noise whose level and colour drift slowly
        gusts = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.6) * t + rng.uniform(0, 6.3))
        x = _lowpass_noise(n, rng.uniform(200, 1200), rng) * gusts + 0.2 * _lowpass_noise(n, 3000, rng) * gusts ** 3
    elif kind == 'engine':  # harmonics of a firing rate, amplitude-modulated, plus rumble
        f0 = rng.uniform(25, 90)
        x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 12))
        x = x * (1 + 0.3 * np.sin(2 * np.pi * f0 / 2 * t)) + 0.5 * _lowpass_noise(n, 400, rng)
    elif kind == 'water':  # bubbles: short rising sine chirps over band noise
        x = 0.2 * lfilter([1, -1], [1], _lowpass_noise(n, 4000, rng))
        for start in rng.integers(0, n - SAMPLE_RATE // 20, int(seconds * rng.uniform(20, 80))):
            m = int(rng.uniform(0.01, 0.04) * SAMPLE_RATE)
            f = rng.uniform(300, 2500) * (1 + np.linspace(0, rng.uniform(0.1, 0.6), m))
            x[start:start + m] += np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * np.exp(-np.linspace(0, 5, m))
    elif kind == 'babble':  # several far-away talkers
        x = np.zeros(n)
        for _ in range(int(rng.integers(3, 7))):
            voice = fit_length(speak(random_numbers(rng), LANGUAGES[rng.integers(len(LANGUAGES))], rng), seconds, rng)
            x += np.roll(voice, int(rng.integers(n)))
        x = lfilter([0.3], [1, -0.7], x)
    else:
        raise ValueError(f'unknown texture {kind!r}')
    return normalise(x.astype(np.float32))


# ----- mixing -----------------------------------------------------------------------------------

def normalise(x: np.ndarray, peak: float = 0.5) -> np.ndarray:
    return (x * (peak / max(float(np.abs(x).max()), 1e-6))).astype(np.float32)


def fit_length(x: np.ndarray, seconds: float, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Crop (at a random place with rng, else the start) or zero-pad (at a random offset with rng) to `seconds`."""
    n = int(round(seconds * SAMPLE_RATE))
    if len(x) >= n:
        start = int(rng.integers(len(x) - n + 1)) if rng is not None else 0
        return x[start:start + n]
    offset = int(rng.integers(n - len(x) + 1)) if rng is not None else 0
    return np.pad(x, (offset, n - len(x) - offset))


def background(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise, or a texture."""
    n = int(round(seconds * SAMPLE_RATE))
    kind = rng.integers(4)
    if kind == 3:
        return texture(TEXTURES[rng.integers(len(TEXTURES) - 1)], seconds, rng)  # no babble: keep labels clean
    noise = rng.standard_normal(n)
    if kind == 1:
        noise = lfilter([0.049922, -0.095993, 0.050612, -0.004408], [1, -2.494956, 2.017265, -0.522190], noise)
    elif kind == 2:
        noise = lfilter([1], [1, -0.98], noise)
    return normalise(noise)


def add_noise(x: np.ndarray, rng: np.random.Generator, snr_db: tuple[float, float] = (5.0, 30.0)) -> np.ndarray:
    """x plus background noise at a random SNR (dB), then peak-normalised to a random level."""
    noise = fit_length(background(len(x) / SAMPLE_RATE, rng), len(x) / SAMPLE_RATE)
    snr = rng.uniform(*snr_db)
    power = lambda v: float(np.mean(v.astype(np.float64) ** 2)) + 1e-12  # noqa: E731
    mixed = x + noise * np.sqrt(power(x) / power(noise) / 10 ** (snr / 10))
    return normalise(mixed, peak=rng.uniform(0.2, 0.9))


# ----- corpus and tasks -------------------------------------------------------------------------

def _write(path: Path, wav: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav, SAMPLE_RATE, subtype='PCM_16')


def _rendered_music(items: list[tuple[str, float, np.random.Generator]], batch: int = 40) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        return [clip for i in range(0, len(items), batch) for clip in render_instruments(items[i:i + batch], Path(tmp))]


def write_corpus(root: Path, n_files: int = 1000, seed: int = 0) -> list[Path]:
    """The unlabelled pre-training corpus: n_files clips of 2-6 s below root (speech 45%, music 35%,
    environment 20%), each over background noise. Returns the files."""
    rng = np.random.default_rng([seed, 1])
    kinds = rng.choice(['sentence', 'word', 'music', 'texture'], size=n_files, p=[0.35, 0.10, 0.35, 0.20])
    seconds = rng.uniform(2, 6, n_files).round(2)
    child = [np.random.default_rng([seed, 2, i]) for i in range(n_files)]
    music = iter(_rendered_music([(list(INSTRUMENTS)[c.integers(len(INSTRUMENTS))], s, c)
                                  for k, s, c in zip(kinds, seconds, child) if k == 'music']))
    paths = []
    for i, (kind, s, r) in enumerate(zip(kinds, seconds, child)):
        if kind == 'sentence':
            wav = fit_length(speak(random_numbers(r), LANGUAGES[r.integers(len(LANGUAGES))], r), s, r)
        elif kind == 'word':
            wav = fit_length(speak(DIGITS[r.integers(10)] if r.random() < 0.5 else random_numbers(r).split()[0],
                                   LANGUAGES[r.integers(len(LANGUAGES))], r), s, r)
        elif kind == 'music':
            wav = next(music)
        else:
            wav = texture(TEXTURES[r.integers(len(TEXTURES))], s, r)
        path = root / kind / f'{i:05d}.wav'
        _write(path, add_noise(wav, r))
        paths.append(path)
    return paths


TASKS: dict[str, tuple[tuple[str, ...], int, float]] = {  # name: (classes, clips per class, seconds)
    'digits': (DIGITS, 60, 1.0),
    'language': (LANGUAGES, 80, 3.0),
    'instrument': (tuple(INSTRUMENTS), 60, 3.0),
}


def write_tasks(root: Path, seed: int = 0, clips_per_class: Optional[int] = None) -> dict[str, Path]:
    """The labelled probe tasks below root/<task>/ (audio/ and metadata.csv with file_name, label, split),
    with TASKS' clips per class unless `clips_per_class` is given. Returns {task: metadata path}."""
    out = {}
    for t, (name, (classes, per_class, seconds)) in enumerate(TASKS.items()):
        per_class = clips_per_class or per_class
        rng = np.random.default_rng([seed, 100 + t])
        labels = [c for c in classes for _ in range(per_class)]
        child = [np.random.default_rng([seed, 100 + t, i]) for i in range(len(labels))]
        if name == 'instrument':
            clips = _rendered_music([(label, seconds, r) for label, r in zip(labels, child)])
        elif name == 'language':
            clips = [fit_length(speak(random_numbers(r), label, r), seconds, r) for label, r in zip(labels, child)]
        else:
            clips = [fit_length(speak(label, 'en', r), seconds, r) for label, r in zip(labels, child)]
        splits = _stratified_splits(labels, rng)
        rows = []
        for i, (label, clip, r, split) in enumerate(zip(labels, clips, child, splits)):
            file_name = f'{label}/{i:04d}.wav'
            _write(root / name / 'audio' / file_name, add_noise(clip, r))
            rows.append((file_name, label, split))
        metadata = root / name / 'metadata.csv'
        with open(metadata, 'w', newline='') as f:
            csv.writer(f).writerows([('file_name', 'label', 'split'), *rows])
        out[name] = metadata
    return out


def _stratified_splits(labels: list[str], rng: np.random.Generator) -> list[str]:
    """train/valid/test per SPLIT_SHARES within each class, at random."""
    splits = [''] * len(labels)
    for c in sorted(set(labels)):
        idx = rng.permutation([i for i, label in enumerate(labels) if label == c])
        bounds = np.cumsum([0] + [round(share * len(idx)) for _, share in SPLIT_SHARES[:-1]] + [len(idx)])
        bounds[-1] = len(idx)
        for (split, _), a, b in zip(SPLIT_SHARES, bounds[:-1], bounds[1:]):
            for i in idx[a:b]:
                splits[i] = split
    return splits


def build(root: Path, n_files: int = 1000, seed: int = 0, clips_per_class: Optional[int] = None,
          log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The corpus (root/corpus) and tasks (root/tasks), built once: a finished build leaves
    root/DONE holding its settings, and a build with other settings starts over."""
    stamp = f'n_files={n_files} seed={seed}' + (f' clips_per_class={clips_per_class}' if clips_per_class else '') + '\n'
    done = root / 'DONE'
    tasks = {name: root / 'tasks' / name / 'metadata.csv' for name in TASKS}
    if done.is_file() and done.read_text() == stamp:
        return root / 'corpus', tasks
    for sub in ('corpus', 'tasks'):
        shutil.rmtree(root / sub, ignore_errors=True)
    log(f'Building the corpus ({n_files} clips) and the probe tasks in {root} ...')
    write_corpus(root / 'corpus', n_files, seed)
    write_tasks(root / 'tasks', seed, clips_per_class)
    done.write_text(stamp)
    return root / 'corpus', tasks
