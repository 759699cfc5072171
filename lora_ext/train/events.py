"""What a run tells its subscribers (the tab, the CLI's bar, TensorBoard) and hands back at the end."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    kind: str                   # 'message' | 'step' | 'sample' | 'save' | 'done' | 'cancelled'
    step: int = 0
    total: int = 0
    epoch: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    paths: list = field(default_factory=list)
    text: str = ""
    latents: tuple | None = None    # a step while latents are still being cached: (images cached, images in all)


@dataclass
class Result:
    lora_path: str | None
    state_path: str | None
    steps: int
    cancelled: bool
    losses: list
    report: dict
    messages: list
