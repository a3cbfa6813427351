"""Token masks for masked modeling, as permutations: the first `len_keep` tokens of
`ids_shuffle` stay visible, the rest are masked, and `ids_restore` undoes the shuffle."""
import torch


def random_unstructured_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                             device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Mask any `mask_ratio` of the F'*T' tokens independently per sample.

    Returns ids_shuffle [B, N] (int64; ascending noise, so low noise = visible) and len_keep.
    """
    n_tokens = grid_size[0] * grid_size[1]
    len_keep = int(n_tokens * (1 - mask_ratio))
    noise = torch.rand(batch, n_tokens, device=device)
    return torch.argsort(noise, dim=1), len_keep


def _visible_first(masked: torch.Tensor) -> torch.Tensor:
    """ids_shuffle [B, N] for a boolean mask [B, N] (True = masked): a stable sort of the 0/1 mask
    puts the visible tokens first, each group in grid order."""
    return torch.argsort(masked.to(torch.uint8), dim=1, stable=True)


def random_structured_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                           device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Mask whole frequency rows and time columns, about `mask_ratio` of the tokens.

    One random row count (never all rows) and the matching column count are drawn per batch, so
    every sample has the same number of masked tokens; which rows and columns is drawn per sample.
    Returns ids_shuffle [B, N] with the visible tokens first (in grid order) and len_keep.
    """
    grid_f, grid_t = grid_size
    n_rows = min(grid_f - 1, int(grid_f * (mask_ratio + 1.0 / grid_f) * float(torch.rand(()))))
    n_cols = int(grid_t * max(mask_ratio + 0.5 / grid_t - n_rows / grid_f, 0.0))
    rows = torch.rand(batch, grid_f, device=device).argsort(dim=1)[:, :n_rows]
    cols = torch.rand(batch, grid_t, device=device).argsort(dim=1)[:, :n_cols]
    masked = torch.zeros(batch, grid_f, grid_t, dtype=torch.bool, device=device)
    masked.scatter_(1, rows[:, :, None].expand(-1, -1, grid_t), True)
    masked.scatter_(2, cols[:, None, :].expand(-1, grid_f, -1), True)
    masked = masked.flatten(1)
    len_keep = int((~masked[0]).sum())
    return _visible_first(masked), len_keep


def time_span_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                   device: torch.device | str | None = None, *, span: int, share: float = 1.0
                   ) -> tuple[torch.Tensor, int]:
    """Mask whole time columns (every frequency row) in runs of `span` columns, round(mask_ratio * T')
    columns per sample: span masking as in wav2vec 2.0 and HuBERT, for short (e.g. 40 ms) patches
    that unstructured masking lets a predictor fill in from their visible neighbours.

    Runs start at a random offset per sample; the last run chosen may be cut short to hit the count
    exactly, so every sample has the same number of masked tokens. With share < 1, each sample is
    span-masked with that probability and otherwise masked anywhere (unstructured), as many tokens.
    Returns ids_shuffle [B, N] with the visible tokens first and len_keep.
    """
    grid_f, grid_t = grid_size
    n_masked_cols = min(max(round(grid_t * mask_ratio), 1), grid_t - 1)
    offset = torch.randint(span, (batch, 1), device=device)
    run = (torch.arange(grid_t, device=device) + offset) // span  # [B, T'] run index of each column
    n_runs = (grid_t - 1 + span) // span + 1
    run_rank = torch.rand(batch, n_runs, device=device).argsort(dim=1).argsort(dim=1)  # random order of runs
    # Columns ordered by their run's rank, then by time: the first n_masked_cols are masked.
    order = (run_rank.gather(1, run) * grid_t + torch.arange(grid_t, device=device)).argsort(dim=1)
    masked_cols = torch.zeros(batch, grid_t, dtype=torch.bool, device=device)
    masked_cols.scatter_(1, order[:, :n_masked_cols], True)
    masked = masked_cols[:, None, :].expand(-1, grid_f, -1).flatten(1)  # tokens are row-major over [F', T']
    len_keep = grid_f * (grid_t - n_masked_cols)
    ids_shuffle = _visible_first(masked)
    if share < 1:
        unstructured = random_unstructured_mask(batch, grid_size, mask_ratio, device)[0]  # with this len_keep
        ids_shuffle = torch.where(torch.rand(batch, 1, device=device) < share, ids_shuffle, unstructured)
    return ids_shuffle, len_keep
