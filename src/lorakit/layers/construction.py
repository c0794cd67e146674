"""Building lorakit's modules without ``nn.Module.__init__``: the one construction shortcut, in one place.

An adapted layer is seven modules (the layer, three ModuleDicts, A, B, dropout), so wrapping a 32-layer Llama
builds over 1500 of them, and ``nn.Module.__init__`` writes its 17 fields one at a time through
``super().__setattr__``. Here a module gets the same fields as a pristine ``nn.Module()`` of the installed torch
(with fresh empty tables) in one dict update, and its children and parameters are written straight into its
tables where their names are new (``Module.__setattr__``'s checks would find nothing to do). The results are
ordinary modules (tests/core/test_construction.py compares them with constructor-built ones). What this skips:
torch's global module/parameter registration hooks for these internal parts.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .rows import WatchedTable, note_data_swap

__all__ = ["init_module", "new_module", "add_child", "replace_child", "Factor"]

try:  # the hooks Module.add_module calls for every child (none unless a program registered one)
    from torch.nn.modules.module import _global_module_registration_hooks as _REGISTRATION_HOOKS
except ImportError:  # a torch that keeps them elsewhere: assume there are hooks, always take add_module
    _REGISTRATION_HOOKS = {0: 0}

_PRISTINE = vars(nn.Module())  # the fields nn.Module.__init__ gives a module in the installed torch
_MODULE_FIELDS = {k: v for k, v in _PRISTINE.items() if not isinstance(v, (dict, set))}
_MODULE_TABLES = tuple((k, type(v)) for k, v in _PRISTINE.items() if isinstance(v, (dict, set)))


def _init_written(module: nn.Module) -> None:
    """:func:`init_module` with the tables of torch 2.x's ``nn.Module.__init__`` written out: a third faster than
    building them in a loop, which matters at over 1500 modules a model."""
    vars(module).update(
        _MODULE_FIELDS, _parameters={}, _buffers={}, _non_persistent_buffers_set=set(), _modules={},
        _backward_pre_hooks=OrderedDict(), _backward_hooks=OrderedDict(), _forward_hooks=OrderedDict(),
        _forward_hooks_with_kwargs=OrderedDict(), _forward_hooks_always_called=OrderedDict(),
        _forward_pre_hooks=OrderedDict(), _forward_pre_hooks_with_kwargs=OrderedDict(),
        _state_dict_hooks=OrderedDict(), _state_dict_pre_hooks=OrderedDict(),
        _load_state_dict_pre_hooks=OrderedDict(), _load_state_dict_post_hooks=OrderedDict(),
    )


def _init_looped(module: nn.Module) -> None:
    """:func:`init_module` for any torch: the tables a pristine module has, built one by one."""
    state = vars(module)
    state.update(_MODULE_FIELDS)
    for key, table in _MODULE_TABLES:
        state[key] = table()


def _same_state(init) -> bool:
    """Whether ``init`` gives a module exactly the fields and table types ``nn.Module.__init__`` does."""
    probe = nn.Module.__new__(nn.Module)
    init(probe)
    return {k: type(v) for k, v in vars(probe).items()} == {k: type(v) for k, v in _PRISTINE.items()}


#: Give a module the state ``nn.Module.__init__`` gives it, in half the time. ``nn.Module.__init__`` writes its
#: 17 fields one at a time through ``super().__setattr__``; an adapted layer is eight modules (the layer, four
#: ModuleDicts, A, B, dropout), so a 32-layer Llama builds 1792 of them. The fields are those of a pristine
#: ``nn.Module()`` of the installed torch, with fresh empty tables (written out where they are torch 2.x's).
init_module = _init_written if _same_state(_init_written) else _init_looped


def new_module(cls: type, training: bool = True) -> nn.Module:
    """A new ``cls`` (a module whose ``__init__`` adds nothing to ``nn.Module``'s: ModuleDict, Identity) in the
    given mode (it has no children yet, so its own flag is all ``train()`` would set)."""
    module = cls.__new__(cls)
    init_module(module)
    vars(module)["training"] = training
    return module


def add_child(holder: nn.ModuleDict, name: str, module: nn.Module) -> None:
    """``holder[name] = module`` for a plain ``ModuleDict``, without ``add_module``'s ``hasattr(holder, name)``.

    That check raises and catches an AttributeError inside ``Module.__getattr__`` for every new name (~2 µs, three
    times per adapted layer). Here the same question is answered from the places ``hasattr`` would look (the
    instance dict, the class, the parameter/buffer/module tables); anything unusual (another holder class, an odd
    name, an existing attribute, registration hooks) takes ``holder[name] = module`` and its errors.
    """
    if (
        type(holder) is nn.ModuleDict and not _REGISTRATION_HOOKS and type(name) is str and name and "." not in name
        and (name in holder._modules or not (name in vars(holder) or hasattr(nn.ModuleDict, name)
                                             or name in holder._parameters or name in holder._buffers))
    ):
        holder._modules[name] = module
    else:
        holder[name] = module


def replace_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    """``setattr(parent, name, module)`` for a child ``parent`` already has under ``name`` (an adapted layer taking
    its base layer's place). ``Module.__setattr__`` would check ``module`` against parameters, clear ``name`` from
    tables it is not in and run registration hooks; where none of that applies, the child is swapped directly."""
    if (
        name in parent._modules and type(parent).__setattr__ is nn.Module.__setattr__ and not _REGISTRATION_HOOKS
        and name not in vars(parent) and name not in parent._parameters and name not in parent._buffers
        and name not in parent._non_persistent_buffers_set and not isinstance(module, nn.Parameter)
    ):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


class Factor(nn.Linear):
    """A bias-free ``nn.Linear`` whose weight is allocated but not initialised.

    ``nn.Linear`` initialises in its constructor and LoRA re-initialises right after; skipping the first one
    halves the cost of building adapters (the conv factors are rare enough to take the plain constructors).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        init_module(self)
        vars(self).update(in_features=in_features, out_features=out_features)
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        # new names, written straight into the table (see LoraLayer.__init__); a watched table, so that replacing
        # the weight later shows to a mixed batch's stack cache (lorakit.layers.rows.StackCache)
        vars(self)["_parameters"] = WatchedTable(weight=weight, bias=None)

    def _apply(self, fn, recurse: bool = True):
        """``Module._apply`` may swap the weight's data through ``.data``, which no stack cache would see
        otherwise (see :func:`~lorakit.layers.rows.note_data_swap`)."""
        result = super()._apply(fn, recurse)
        note_data_swap()
        return result
