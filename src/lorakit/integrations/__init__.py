"""lorakit's bridges to other libraries' tools: the transformers ``Trainer`` (:mod:`.trainer`) and diffusers'
LoRA file format (:mod:`.diffusers_export`). They import the core; the core never imports them, and importing
``lorakit`` loads neither transformers nor diffusers.
"""
