"""lorakit: LoRA fine-tuning for any PyTorch model, a drop-in for PEFT's LoRA.

This module is the public API (PEFT's names) and nothing else; ARCHITECTURE.md maps the package."""

from .config import LoraConfig, TaskType
from .layers import LoraLayer, register_lora_layer
from .model import LoraModel
from .modules_to_save import ModulesToSaveWrapper
from .ops import lora_delta
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

from .version import __version__

__all__ = [
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TaskType",
    "get_peft_model",
    "lora_delta",
    "register_lora_layer",
]
