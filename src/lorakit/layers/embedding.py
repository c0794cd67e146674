"""``nn.Embedding``: A is looked up like the base table, B maps the looked-up rank-sized rows to the embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import add_lora, add_lora_groups
from .base import LoraLayer
from .rows import RowAdapters, WatchedTable, watched

__all__ = ["Embedding"]


class Embedding(LoraLayer):
    """``nn.Embedding``: A is ``r × num_embeddings`` and is looked up like the base table, B is ``dim × r``."""

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    transpose_delta = True
    supports_dora = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        # new names, written into the tables as LoraLayer.__init__ does (see lorakit.layers.construction)
        self._modules.update(lora_embedding_A=watched(nn.ParameterDict(), "_parameters"),
                             lora_embedding_B=watched(nn.ParameterDict(), "_parameters"))
        vars(self).update(in_features=base_layer.num_embeddings, out_features=base_layer.embedding_dim)

    def _create_factors(self, adapter_name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))

    def _factor_params(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        modules = self._modules  # ParameterDict keeps its entries in _parameters
        return (modules["lora_embedding_A"]._parameters[adapter_name],
                modules["lora_embedding_B"]._parameters[adapter_name])

    def _watched(self, present) -> bool:
        modules = self._modules
        return self._own_tables_watched() and all(
            type(modules[name]._parameters) is WatchedTable for name in ("lora_embedding_A", "lora_embedding_B"))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        """Reversed roles (PEFT, for True and "gaussian" alike): A starts at zero and B normal, so the looked-up
        rows start at zero while B's columns already point somewhere. ``False``: both normal."""
        A, B = self._factor_params(adapter_name)
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
            nn.init.normal_(B)

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def _add_adapter_output(self, out: Tensor, x: Tensor, adapter_name: str) -> Tensor:
        A, B = self._factor_params(adapter_name)
        return add_lora(out, self._lookup(x, A.T), B, self.scaling[adapter_name])

    def _add_row_outputs(self, out: Tensor, x: Tensor, rows: RowAdapters) -> Tensor:
        """One lookup in all adapters' A tables laid end to end, then batched matmuls with B, grouped by adapter."""
        index = rows.for_batch(x.shape[0])
        stacks = self._stacked_factors(rows.names)
        A_stack, B_stack = stacks.A, stacks.B  # (K+1, r, num), (K+1, dim, r)
        tables = A_stack.transpose(1, 2).reshape(-1, A_stack.shape[1])  # ((K+1)·num, r)
        offset = (index * self.in_features).view(-1, *([1] * (x.dim() - 1)))
        h = F.embedding(x + offset, tables)
        n = x.shape[0]
        if rows.in_order and n == len(rows.names):  # row i runs adapter i: B's stack as it is
            y = torch.bmm(h.reshape(n, -1, h.shape[-1]), stacks.B_rows_t)
            return out + y.view(out.shape).to(out.dtype)
        groups = rows.groups(n)  # rows grouped by adapter, base rows left out
        if groups is None:
            return out
        return add_lora_groups(out, h, groups.take, groups.dest, groups.src, B_stack[groups.slots])
