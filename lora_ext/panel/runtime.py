"""What the Additional Networks panel does around a generation, without the webui: slots -> engine requests
-> the model changed (or given back) -> infotext fields and messages. The webui script calls this."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import slots as slotlib
from ..apply import Engine, Request
from ..cache import LoraCache
from ..library import LoraLibrary, UnsafeName


@dataclass
class Outcome:
    infotext: dict = field(default_factory=dict)    # fields for p.extra_generation_params
    messages: list = field(default_factory=list)    # warnings for the console and the generation's comments
    report: object = None


class PanelRuntime:
    def __init__(self, library: LoraLibrary, cache_bytes: int = 1 << 30, mode: str = "merge",
                 block_presets: str | None = None):
        self.library = library
        self.engine = Engine(LoraCache(cache_bytes), mode)
        self.block_presets = block_presets      # a file of the user's block-weight presets (NAME:v1,v2,...)
        self._masks: dict = {}                  # the text of a slot's mask -> masks.Mask (its resized copies kept)
        self._live = None                       # (host, requests, mode, UNet parts on) of the generation under way

    def _mask(self, slot):
        from . import masks

        if not slot.mask:
            return None
        if slot.mask not in self._masks:
            if len(self._masks) >= 32:
                self._masks.pop(next(iter(self._masks)))
            self._masks[slot.mask] = masks.decode(slot.mask)
        return self._masks[slot.mask]

    def _block_factors(self, slot, arch_name: str) -> tuple:
        """((block, factor), ...) of the slot's block weights; ValueError says what to write."""
        from .. import blocks

        if not slot.block_weights:
            return ()
        user = {}
        if self.block_presets and os.path.isfile(self.block_presets):
            with open(self.block_presets, encoding="utf-8") as f:
                user = blocks.parse_presets(f.read())
        return tuple(blocks.parse(slot.block_weights, arch_name, user).items())

    def run(self, host, slots: list, mode: str | None = None) -> Outcome:
        """Makes the host's model compute what the active slots ask for (and nothing else)."""
        outcome = Outcome()
        requests, slot_errors, notes = [], [], []
        for i, slot in enumerate(slots):
            if not slot.active:
                continue
            try:
                path = self.library.path(slot.model)
            except (FileNotFoundError, UnsafeName) as e:
                slot_errors.append(f"slot {i + 1}: {e}")
                continue
            try:
                factors = self._block_factors(slot, host.arch.name)
                mask = self._mask(slot)
            except (ValueError, OSError) as e:
                slot_errors.append(f"slot {i + 1}: skipped: {e}")
                continue
            unet, te = slot.weights
            if mask is not None and te != 0:
                notes.append(f"slot {i + 1}: the mask limits the UNet part; the text encoder part acts on the whole "
                             f"prompt (give it weight 0 to keep this LoRA out of the rest of the image)")
            requests.append(Request(path, unet, te, name=slot.model, blocks=factors, mask=mask,
                                    start=slot.start, stop=slot.stop))
        report = self.engine.apply(host, requests, mode, at=0.0)
        self._live = (host, requests, mode, tuple(r.active_at(0.0) for r in requests)) \
            if any(r.scheduled for r in requests) else None
        outcome.report = report
        outcome.messages = [f"Additional Networks: {m}" for m in slot_errors + report.warnings + notes]
        refused = slot_errors + [w for w in report.warnings if ": skipped: " in w]
        used = {item["name"] for item in report.applied}
        kept = [s if s.active and s.model in used else slotlib.Slot() for s in slots]
        outcome.infotext = slotlib.to_infotext(kept, self.library.short_hash, self._mask_label)
        if refused:
            # the API's caller sees the generation parameters, not the console
            outcome.infotext["AddNet Warning"] = "; ".join(refused)
        return outcome

    def _mask_label(self, slot) -> str:
        mask = self._masks.get(slot.mask)
        return mask.label if mask is not None else ""

    def step(self, host, index: int, total: int):
        """Sampling reached step `index` of `total`: slots with a step range switch their UNet part on or off
        here (bypass: hook lists swapped; merge: the weights they touch rewritten once). None if nothing
        changed. A second sampling pass (hires fix) follows the same schedule over its own steps."""
        if self._live is None or self._live[0].model is not host.model or total <= 0:
            return None
        _, requests, mode, on = self._live
        at = min(max(index / total, 0.0), 1.0)
        now = tuple(r.active_at(at) for r in requests)
        if now == on:
            return None
        self._live = (host, requests, mode, now)
        return self.engine.apply(host, requests, mode, at=at)

    @property
    def scheduled(self) -> bool:
        """Whether a slot of the generation under way switches its UNet part on or off during sampling."""
        return self._live is not None

    @property
    def text_encoder_edits(self) -> int:
        return self.engine.text_encoder_edits

    def bake(self, host, items: list) -> Outcome:
        """Merges LoRAs into the model's weights for good (until its checkpoint is loaded again): the panel's
        own LoRAs are given back first, then these merged and our copies of the old weights dropped, so later
        generations (with or without panel LoRAs) start from the baked weights. `items`: [(name, unet, te)]."""
        outcome = Outcome()
        if host.patcher is not None:
            # Forge merges every generation's patches into weights it restores from its own copy: a bake
            # would last until its next merge, or spoil that copy
            outcome.messages.append("Bake is not available on this model (Forge merges LoRAs itself): merge "
                                    "into a new checkpoint and load that, or use the panel's slots")
            return outcome
        requests = []
        for name, unet, te in items:
            try:
                requests.append(Request(self.library.path(name), unet, te, name=name))
            except (FileNotFoundError, UnsafeName) as e:
                outcome.messages.append(str(e))
        if outcome.messages:
            return outcome
        self._live = None
        self.engine.restore(host)
        outcome.report = self.engine.apply(host, requests, "merge")
        self.engine.forget(host.model)
        outcome.messages += outcome.report.warnings
        return outcome

    def restore(self, host) -> None:
        self._live = None
        self.engine.restore(host)

    def forget(self, model) -> None:
        self._live = None
        self.engine.forget(model)

    def info_line(self, name: str) -> str:
        """One line about a file for the panel: architecture, network, rank/alpha, hash, training figures."""
        if not name or name == slotlib.NONE:
            return ""
        from ..files import LoraFileError

        try:
            lora, _ = self.engine.cache.get(self.library.path(name), None)
        except (LoraFileError, FileNotFoundError, UnsafeName) as e:
            return f"cannot read it: {e}"
        parts = [lora.arch.name.upper(), lora.network]
        kinds = lora.by_kind()
        for kind, label in (("linear", "rank"), ("conv", "conv rank")):
            if kinds.get(kind):
                rank, alpha = kinds[kind]["rank"], kinds[kind]["alpha"]
                # a LoKr with both factors full has no rank, and alpha does not scale it
                parts.append(f"{label} {rank} (alpha {alpha:g})" if rank is not None else f"{label} full")
        if "linear" in kinds and kinds["linear"] is None:
            parts.append("ranks vary")
        h = self.library.short_hash(name)
        if h:
            parts.append(f"hash {h}")
        md = lora.metadata
        if md.get("ss_resolution"):
            parts.append(f"trained at {md['ss_resolution']}")
        steps = md.get("ss_max_train_steps") or md.get("ss_steps")
        if steps:
            parts.append(f"{steps} steps")
        return " · ".join(parts)
