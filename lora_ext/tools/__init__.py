"""Tools on LoRA files: inspect (describe), resize / merge LoRAs / extract (lora_tools, lowrank, extract), and the
comparison grid after training (compare)."""
