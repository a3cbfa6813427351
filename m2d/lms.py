"""The log-mel spectrogram (LMS) front end: 16 kHz mono audio -> log(mel power + eps)."""
import nnAudio.features
import torch
import torch.nn as nn

EPS = torch.finfo(torch.float32).eps


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
