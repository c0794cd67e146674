"""lorakit: LoRA fine-tuning for any PyTorch model, a drop-in for PEFT's LoRA.

This module is the public API (PEFT's names) and nothing else; ARCHITECTURE.md maps the package."""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import LoraConfig, PeftConfig, TaskType
from .functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
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
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

from .version import __version__

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "lora_delta",
    "register_lora_layer",
    "set_peft_model_state_dict",
]
