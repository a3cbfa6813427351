"""The log-mel spectrogram (LMS) front end: 16 kHz mono audio -> log(mel power + eps), and the
running statistics that dataset-wide LMS normalisation uses."""
import math
from typing import Union

import nnAudio.features
import numpy as np
import torch
import torch.nn as nn

EPS = torch.finfo(torch.float32).eps


class RunningMeanStd:
    """Mean and std (population; sample_std: unbiased) over every value of many arrays, in float64."""

    def __init__(self):
        self.total = self.total_sq = 0.0
        self.count = 0

    def add(self, x: Union[torch.Tensor, np.ndarray]) -> None:
        x = x.double() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
        self.total += float(x.sum())
        self.total_sq += float((x * x).sum())
        self.count += x.size if isinstance(x, np.ndarray) else x.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.total_sq / self.count - self.mean ** 2, 0.0))

    @property
    def sample_std(self) -> float:
        """The unbiased (n - 1) std, as torch.std."""
        return self.std * math.sqrt(self.count / max(self.count - 1, 1))


class LogMelSpectrogram(nn.Module):
    """Audio [B, S] (or [S]) -> LMS [B, n_mels, T], T = 1 + S // hop_length.

    nnAudio's MelSpectrogram (Hann window, centred frames with reflect padding, Slaney mel scale and
    area norm as librosa), power 2, then log(mel + float32 eps): the published front end.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int = 400,
                 hop_length: int = 160, n_mels: int = 80, f_min: float = 50, f_max: float = 8000):
        super().__init__()
        self.sample_rate, self.hop_length = sample_rate, hop_length
        self.melspec = nnAudio.features.MelSpectrogram(
            sr=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length, n_mels=n_mels,
            fmin=f_min, fmax=f_max, center=True, power=2, verbose=False)

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_length

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return (self.melspec(audio) + EPS).log()
