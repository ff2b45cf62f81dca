"""Parameter-efficient fine-tuning on a frozen (possibly compressed) base: LoRA, DoRA, QLoRA, IA3,
Houlsby adapters, prompt tuning, BitFit; merging, and adapters saved in HF peft's format."""

from slimlm.peft.config import IA3, Adapters, BitFit, DoRA, LoRA, PeftTrain, PromptTuning, QLoRA
from slimlm.peft.handler import apply_adapters, apply_bitfit, apply_lora, apply_prompt_tuning
from slimlm.peft.merge import merge_lora
from slimlm.peft.save import load_adapter, save_adapter

__all__ = ["IA3", "Adapters", "BitFit", "DoRA", "LoRA", "PeftTrain", "PromptTuning", "QLoRA", "apply_adapters",
           "apply_bitfit", "apply_lora", "apply_prompt_tuning", "load_adapter", "merge_lora", "save_adapter"]
