"""Visualisation helpers of RuntimeM2D: mask and reconstruct a crop, decode encoder outputs back to an
LMS (MAE-family models), and invert an LMS to a waveform."""
from typing import TYPE_CHECKING

import numpy as np
import torch

from m2d.model.vit import M2DViT

if TYPE_CHECKING:
    from m2d.runtime.runtime import RuntimeM2D


def require_decoder(runtime: 'RuntimeM2D', what: str) -> None:
    if runtime.backbone.encoder_only:
        raise ValueError(f'{what} needs the decoder, but this model was loaded encoder-only '
                         '(the checkpoint has no decoder weights, or encoder_only=True)')


def reconstruct(runtime: 'RuntimeM2D', lms: torch.Tensor, mask_ratio: float, start_frame: int = 0):
    """Mask and reconstruct one model-width crop of lms [B, 1, F, T] from start_frame.

    -> (loss, lms_cropped [B, 1, F, W], recons, errormap, mask [B, F', T']); recons and errormap
    are None for M2D, whose predictor outputs representations rather than spectrogram patches.
    """
    require_decoder(runtime, 'reconstruct()')
    lms = runtime.check_lms(lms)
    W = runtime.cfg.input_size[1]
    cropped = lms[..., start_frame:start_frame + W]
    if cropped.shape[-1] != W:
        raise ValueError(f'reconstruct() needs {W} frames from start_frame={start_frame}; '
                         f'the LMS has {lms.shape[-1]}')
    with torch.inference_mode():
        loss, recons, errormap, mask = runtime.backbone.forward_viz(cropped, mask_ratio)
    return loss, cropped, recons, errormap, mask


def decode_to_lms(runtime: 'RuntimeM2D', latent: torch.Tensor) -> torch.Tensor:
    """Decode encoder outputs for all tokens [B, 1+N, D] (forward_encoder with mask_ratio=0) to an
    LMS [B, 1, F, W]. MAE-family models only; the decoder was trained on masked patches, so
    visible-patch reconstructions are indicative only."""
    require_decoder(runtime, 'decode_to_lms()')
    if isinstance(runtime.backbone, M2DViT):
        raise ValueError("decode_to_lms() needs a decoder that predicts spectrogram patches (MSM-MAE/MAE); "
                         "M2D's predictor outputs representations")
    n_tokens = runtime.backbone.patch_embed.num_patches
    if latent.ndim != 3 or latent.shape[1] != n_tokens + 1:
        raise ValueError(f'decode_to_lms() takes encoder outputs [B, {n_tokens + 1}, D], got {list(latent.shape)}')
    ids_restore = torch.arange(n_tokens, device=latent.device).expand(latent.shape[0], -1)
    with torch.inference_mode():
        return runtime.backbone.unpatchify(runtime.backbone.decode(latent, ids_restore))


def lms_to_wav(runtime: 'RuntimeM2D', single_lms: torch.Tensor, norm_stats: tuple[float, float], sr: int = 16000,
               n_fft: int = 400, hop_length: int = 160, win_length: int = 400) -> np.ndarray:
    """Invert one normalised LMS [F, T] (or [1, F, T]) to a waveform with Griffin-Lim (librosa).
    Use the normalisation stats (mean, std) that produced the LMS."""
    import librosa  # imported here: only this helper needs it
    mu, sigma = (float(v) for v in norm_stats)
    mel_power = (torch.as_tensor(single_lms).detach().cpu().float().squeeze(0) * sigma + mu).exp().numpy()
    return librosa.feature.inverse.mel_to_audio(mel_power, sr=sr, n_fft=n_fft, hop_length=hop_length,
                                                win_length=win_length, fmin=runtime.cfg.f_min,
                                                fmax=runtime.cfg.f_max, power=2.0)

