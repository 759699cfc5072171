"""A LoRA extracted from two checkpoints (a fine-tune and its base): each target layer's difference,
truncated by randomized SVD, read one tensor pair at a time from the files as merge.py reads them."""
from __future__ import annotations

from .. import naming
from ..merge import MergeError, CheckpointReader
from .lowrank import _as_stored, truncate


def extract(base_path: str, tuned_path: str, rank: int, conv_rank: int | None = None, min_change: float = 1e-7):
    """A LoRA approximating tuned - base, module by module (one pair of tensors in memory at a time): randomized
    SVD to `rank` (`conv_rank` for 3x3 convs; without it, those are left out). Layers that did not change are
    left out. Returns ({kohya name: StoredModule}, {name: kept energy}, arch)."""
    base, tuned = CheckpointReader(base_path), CheckpointReader(tuned_path)
    arch = naming.arch_from_state_dict(base.shapes)
    if naming.arch_from_state_dict(tuned.shapes) != arch:
        raise MergeError(f"{tuned_path} and {base_path} are not the same architecture and size")
    modules, kept = {}, {}
    for t in naming.targets(arch):
        if t.kind == naming.CONV and not conv_rank:
            continue
        key = t.checkpoint_key
        delta = tuned.get(key).float() - base.get(key).float()
        if t.qkv is not None:
            n = delta.shape[0] // 3
            delta = delta[t.qkv * n:(t.qkv + 1) * n]
        scale = float(base.get(key).float().abs().mean()) or 1.0
        if float(delta.abs().max()) <= min_change * scale:
            continue
        kernel = tuple(delta.shape[1:]) if delta.ndim == 4 else None
        f = truncate(delta.reshape(delta.shape[0], -1), conv_rank if t.kind == naming.CONV else rank)
        modules[t.kohya], kept[t.kohya] = _as_stored(f, None, kernel), f.energy
    return modules, kept, arch
