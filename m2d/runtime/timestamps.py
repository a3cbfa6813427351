"""Frame embeddings with their timestamps, as the HEAR API wants them: evenly spaced, centred on the
frames each embedding covers, none past the end of the audio; finer hops than a patch by encoding
shifted copies."""
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from m2d.runtime.runtime import RuntimeM2D


def hop_frames(runtime: 'RuntimeM2D', hop_ms: float) -> int:
    """A timestamp hop in ms -> LMS frames; it must divide the patch width (pt frames)."""
    frame_ms = 1000.0 * runtime.cfg.hop_size / runtime.cfg.sample_rate
    pt = runtime.cfg.patch_size[1]
    hop = round(hop_ms / frame_ms)
    if hop < 1 or abs(hop * frame_ms - hop_ms) > 1e-6 or pt % hop:
        choices = ', '.join(f'{h * frame_ms:g}' for h in range(1, pt + 1) if pt % h == 0)
        raise ValueError(f'timestamp hop {hop_ms} ms is not a divisor of the patch width ({pt} frames of '
                         f'{frame_ms:g} ms); choose one of {choices}')
    return hop


def timestamp_embeddings(runtime: 'RuntimeM2D', audio: torch.Tensor, hop_ms: Optional[float] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio [B, S] -> (frame embeddings [B, T', feature_d], timestamps [B, T'] in ms).

    By default (hop_ms None and cfg.timestamp_hop_ms 0) there is one embedding per patch width
    (pt LMS frames: 160 ms). A finer hop_ms (a divisor of that, e.g. 40) also encodes the
    spectrogram shifted by every multiple of the hop and interleaves the results, at pt / hop
    times the cost. As HEAR requires, timestamps are evenly spaced by the hop, each the centre of
    the pt frames its embedding starts (LMS frame i is centred at i * hop_size samples), and none
    lies past the end of the audio: the tail embeddings centred there are left out.
    """
    if runtime.cfg.flat_features:
        raise ValueError('timestamps need frame features; flat token features (training_mask > 0) have none')
    pt = runtime.cfg.patch_size[1]
    hop_ms = hop_ms if hop_ms is not None else runtime.cfg.timestamp_hop_ms
    hop = hop_frames(runtime, hop_ms) if hop_ms else pt
    lms = runtime.to_normalized_spec(audio)
    T = lms.shape[-1]
    # Shift s gives the embeddings starting at LMS frames s, s + pt, ...; a too-short tail is
    # zero-padded to one patch, as encode_lms pads.
    shifted = [runtime.encode_lms(F.pad(lms[..., s:], (0, max(0, pt - (T - s))))) for s in range(0, min(pt, T), hop)]
    n_first = shifted[0].shape[1]
    x = torch.stack([F.pad(e, (0, 0, 0, n_first - e.shape[1])) for e in shifted], dim=2).flatten(1, 2)
    # Flattened (frame, shift) order sorts the embeddings by start frame: the j-th starts at j * hop.
    frame_ms = 1000.0 * runtime.cfg.hop_size / runtime.cfg.sample_rate
    ts = (torch.arange(0, T, hop, dtype=torch.float64) + (pt - 1) / 2) * frame_ms
    # check_audio's one-patch minimum keeps the first centre inside the audio.
    ts = ts[ts <= 1000.0 * audio.shape[-1] / runtime.cfg.sample_rate]
    x = x[:, :len(ts)]
    return x, ts.float().to(x.device).expand(x.shape[0], -1).contiguous()

