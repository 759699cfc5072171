"""kohya's --base_weights: LoRA files merged into the model before training (each at its
--base_weights_multiplier, 1 where none is given), so that the new LoRA learns on top of them. The merge goes
through the panel's engine (lora_ext.apply), which keeps each touched weight's original and gives it back,
bit-exact, after the run: the webui's loaded model is the same after training as before."""
from __future__ import annotations


def multipliers(cfg) -> list:
    """One per file: kohya's, 1.0 past the end of the list."""
    given = [float(m) for m in cfg.base_weights_multiplier]
    return [given[i] if i < len(given) else 1.0 for i in range(len(cfg.base_weights))]


def merged(host, cfg, emit_message):
    """The engine holding the merged files (its restore() gives the weights back), or None without any."""
    if not cfg.base_weights:
        return None
    if host.patcher is not None:
        raise ValueError("base_weights: this host merges LoRAs through its own patches (Forge), which training "
                         "does not see; merge them into a checkpoint first (the LoRA tab's Merge)")
    from ..apply import Engine, Request

    engine = Engine()
    requests = [Request(path, m, m) for path, m in zip(cfg.base_weights, multipliers(cfg))]
    report = engine.apply(host, requests)
    for item in report.applied:
        emit_message(f"base_weights: {item['name']} merged into the model for the run ({item['modules']} layers)")
    for warning in report.warnings:
        emit_message(f"base_weights: {warning}")
    return engine
