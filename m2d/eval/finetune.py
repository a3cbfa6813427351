"""Fine-tuning: the M2D encoder plus a linear head trained end to end on a task, best-valid state tested.

Defaults are those of for_evar/m2d.yaml (ft_lr 2.0, ft_bs 128, ft_epochs 200, warmup 5, mixup 0.5,
freq/time masks 30/192, RRC on); the published per-task command lines override some of them, e.g.
    m2d eval finetune WEIGHT_FILE esc50 --lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.0 --rrc True
"""
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from m2d.errors import UsageError
from m2d.eval import EARLIER_KEYWORDS, renamed_keywords
from m2d.eval.augment import augment_lms, mixup, one_hot
from m2d.eval.embeddings import ClipDataset, clip_loader, make_runtime, norm_stats, normalize
from m2d.eval.linear_probe import score
from m2d.eval.results import DEFAULT_RESULTS, append_result
from m2d.eval.tasks import TaskData, load_task, resolve_task
from m2d.runtime.runtime import RuntimeM2D


@dataclass
class FinetuneConfig:
    lr: float = 2.0
    optim: str = 'sgd'          # sgd (momentum 0.9) | adamw
    batch_size: int = 128
    epochs: int = 200
    warmup_epochs: int = 5
    early_stop: int = -1        # epochs without a better valid score before stopping; -1: never
    mixup: float = 0.5
    freq_mask: int = 30
    time_mask: int = 192
    rrc: bool = True
    training_mask: float = 0.0
    seed: int = 0


class FinetuneModel(nn.Module):
    """Audio [B, S] -> LMS normalised with dataset stats -> (augmented in training) -> M2D -> mean -> Linear
    -> logits [B, C].

    bf16: run the encoder and head under bfloat16 autocast (the log-mel front end stays float32).
    """

    def __init__(self, runtime: RuntimeM2D, n_classes: int, stats: tuple[float, float], cfg: FinetuneConfig,
                 bf16: bool = False):
        super().__init__()
        self.runtime, self.stats, self.cfg, self.bf16 = runtime, stats, cfg, bf16
        self.head = nn.Linear(runtime.cfg.feature_d, n_classes)
        # A near-zero head keeps early gradients for the encoder small.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        lms = normalize(self.runtime, self.runtime.to_feature(audio), self.stats)
        if self.training:
            lms = augment_lms(lms, self.cfg.freq_mask, self.cfg.time_mask, self.cfg.rrc)
        with torch.autocast(lms.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.head(self.runtime.encode_lms(lms).mean(dim=1)).float()


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup over `warmup` steps, then half-cycle cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optim == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    if cfg.optim == 'adamw':
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    raise UsageError(f'unknown optimizer {cfg.optim!r}; use sgd or adamw')


@torch.no_grad()
def predict(model: FinetuneModel, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (logits [N, C], targets [N] or [N, C]) of a whole loader, in eval mode."""
    model.eval()
    logits, targets = [], []
    for audio, y in loader:
        logits.append(model(audio.to(model.runtime.device)).cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def _loader(task: TaskData, rows: np.ndarray, batch_size: int, train: bool, num_workers: int, sample_rate: int):
    samples = int(round(task.spec.seconds * sample_rate))
    dataset = ClipDataset([task.files[i] for i in rows], samples, task.y[rows], random_crop=train,
                          sample_rate=sample_rate)
    return torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(rows)), shuffle=train,
                                       drop_last=train, num_workers=num_workers)


@renamed_keywords(**EARLIER_KEYWORDS)
def finetune(weight_file: Union[str, Path], task: str, cfg: FinetuneConfig = FinetuneConfig(),
             evar_root: Optional[str] = None, data_path: Optional[str] = None, clip_seconds: Optional[float] = None,
             fold: int = 1, results: Optional[Union[str, Path]] = DEFAULT_RESULTS, num_workers: int = 0,
             device: Optional[str] = 'auto', **runtime_settings) -> dict:
    """Fine-tune `weight_file` on `task` (fold tasks: hold out `fold`; see resolve_task for evar_root, data_path
    and clip_seconds); append the test score to `results` and return the row."""
    started = time.time()
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UsageError(f'fine-tuning needs epochs >= 1 and batch_size >= 1 (got {cfg.epochs}, {cfg.batch_size})')
    spec = resolve_task(task, evar_root, data_path, clip_seconds)
    data = load_task(spec)
    index = data.indices(fold, seed=cfg.seed) if data.fold is not None else data.indices()
    runtime = make_runtime(weight_file, device=device, seed=cfg.seed, training_mask=cfg.training_mask,
                           **runtime_settings)
    torch.manual_seed(cfg.seed)
    sr = runtime.sample_rate  # the audio the model was trained on: 32 kHz for p32k weights
    stats = runtime.norm_stats or norm_stats(runtime, clip_loader([data.files[i] for i in index['train']], spec.seconds,
                                                                  cfg.batch_size, num_workers, sample_rate=sr))
    bf16 = runtime.device.type == 'cuda' and torch.cuda.is_bf16_supported()
    model = FinetuneModel(runtime, len(data.classes), stats, cfg, bf16).to(runtime.device)
    train = _loader(data, index['train'], cfg.batch_size, True, num_workers, sr)
    valid, test = (_loader(data, index[s], cfg.batch_size, False, num_workers, sr) for s in ('valid', 'test'))
    opt = make_optimizer(model, cfg)
    total, warmup = cfg.epochs * len(train), cfg.warmup_epochs * len(train)
    best, best_state, since_best, step = -1.0, None, 0, 0
    for epoch in range(cfg.epochs):
        model.train()
        for audio, y in tqdm(train, desc=f'finetune epoch {epoch + 1}/{cfg.epochs}', leave=False):
            for group in opt.param_groups:
                group['lr'] = lr_at(step, total, warmup, cfg.lr)
            audio, target = audio.to(runtime.device), one_hot(y, len(data.classes), data.multi_label).to(runtime.device)
            audio, target = mixup(audio, target, cfg.mixup)  # mixed waveforms, mixed targets
            logits = model(audio)
            loss = (F.binary_cross_entropy_with_logits(logits, target) if data.multi_label
                    else torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean())
            if not torch.isfinite(loss):
                raise FloatingPointError(f'fine-tuning loss became {loss.item()} at epoch {epoch + 1}; lower --lr')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        valid_score = score(*predict(model, valid), data.multi_label)
        if valid_score > best:
            best, best_state, since_best = valid_score, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if 0 < cfg.early_stop <= since_best:
                break
    model.load_state_dict(best_state)
    test_score = score(*predict(model, test), data.multi_label)
    options = ' '.join(f'{k}={v}' for k, v in asdict(cfg).items())
    if runtime_settings.get('norm_stats'):
        options += f' norm_stats={list(runtime_settings["norm_stats"])}'
    row = dict(weight=str(weight_file), task=spec.name, metric='mAP' if data.multi_label else 'accuracy',
               score=test_score, seconds=round(time.time() - started, 1), mode='finetune', options=options)
    if results is not None:
        row = append_result(results, **row)
    return {**row, 'valid': best, 'epochs_run': epoch + 1}
