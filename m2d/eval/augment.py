"""Fine-tuning augmentations on normalised LMS batches [B, 1, F, T]: SpecAugment-style masks,
random resized crop (RRC) and mixup. Each draws its randomness from torch's global generator."""
import torch
import torch.nn.functional as F


def mask_bands(x: torch.Tensor, max_width: int, dim: int) -> torch.Tensor:
    """Zero one band per sample along `dim` (2: frequency, 3: time) of width U{0..max_width-1} at a random start.
    Zero is the mean of a normalised LMS, so a masked band carries no information."""
    size = x.shape[dim]
    if max_width <= 0:
        return x
    width = torch.randint(0, min(max_width, size + 1), (x.shape[0],), device=x.device)
    start = (torch.rand(x.shape[0], device=x.device) * (size - width + 1)).long()
    pos = torch.arange(size, device=x.device)
    band = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])  # [B, size]
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = size
    return x.masked_fill(band.view(shape), 0.0)


def random_resized_crop(x: torch.Tensor, virtual_scale: float = 1.5, freq_scale=(0.6, 1.5),
                        time_scale=(0.6, 1.5)) -> torch.Tensor:
    """Per sample: place the LMS in a zero canvas virtual_scale times wider, crop a random region of
    freq_scale x time_scale of the input size (clipped to the canvas) and resize it back to [F, T]."""
    B, C, Fq, T = x.shape
    canvas = x.new_zeros(B, C, Fq, int(T * virtual_scale))
    left = (canvas.shape[-1] - T) // 2
    canvas[..., left:left + T] = x
    out = torch.empty_like(x)
    for i in range(B):
        h = min(Fq, max(1, int(Fq * float(torch.empty(()).uniform_(*freq_scale)))))
        w = min(canvas.shape[-1], max(1, int(T * float(torch.empty(()).uniform_(*time_scale)))))
        top = int(torch.randint(0, Fq - h + 1, ()))
        start = int(torch.randint(0, canvas.shape[-1] - w + 1, ()))
        crop = canvas[i:i + 1, :, top:top + h, start:start + w]
        out[i] = F.interpolate(crop, size=(Fq, T), mode='bilinear', align_corners=True)[0]
    return out


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random other one of the batch, lam ~ Beta(alpha, alpha) per batch:
    x [B, ...], y [B, C] (one- or multi-hot, float) -> mixed (x, y). alpha <= 0 returns them unchanged."""
    if alpha <= 0:
        return x, y
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def augment_lms(x: torch.Tensor, freq_mask: int = 0, time_mask: int = 0, rrc: bool = False) -> torch.Tensor:
    """Fine-tuning feature augmentation [B, 1, F, T]: RRC (optional), then a frequency and a time mask."""
    if rrc:
        x = random_resized_crop(x)
    return mask_bands(mask_bands(x, freq_mask, 2), time_mask, 3)


def one_hot(y: torch.Tensor, n_classes: int, multi_label: bool) -> torch.Tensor:
    """Class indices [B] -> float one-hot [B, C]; multi-hot targets pass through as float."""
    return y.float() if multi_label else F.one_hot(y.long(), n_classes).float()

