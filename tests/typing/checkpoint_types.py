"""The checkpoint functions as a user's editor sees them: checked by mypy, never run by pytest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, assert_type

import torch
from torch import nn

from trainkit import Checkpoint, load_checkpoint, load_weights, save_checkpoint

model = nn.Linear(4, 2)
opt = torch.optim.Adam(model.parameters())
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
scaler = torch.amp.GradScaler("cpu")

assert_type(
    save_checkpoint("a.ckpt", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                    epoch=0, step=0, extra={"note": "lr 0.1", "sizes": [1, 2]}),
    Path,
)  # fmt: skip
save_checkpoint("b.ckpt", model=model, scheduler=plateau, epoch=1, step=0)
ckpt = load_checkpoint("a.ckpt", model=model, optimizer=opt, scheduler=sched, scaler=scaler)
assert_type(ckpt, Checkpoint)
assert_type(ckpt.extra, dict[str, Any])
assert_type(ckpt.classes, dict[str, str | None])
assert_type(load_weights("a.ckpt", model, map_location="cpu"), nn.Linear)
