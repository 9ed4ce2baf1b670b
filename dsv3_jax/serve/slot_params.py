"""Each engine slot's sampling parameters: host arrays set when a request is admitted, gathered
per prefill call, and kept on the device for decode steps until the next admission."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from dsv3_jax.serve.request import SamplingParams
from dsv3_jax.serve.sampling import SamplingArrays


class SlotParams:
    """`SamplingArrays` per slot (temperature, top-k / top-p, seed, penalties, logit bias, stop
    tokens for min_tokens); `put` places a host array on the device laid out like the slots."""

    def __init__(self, slots: int, vocab: int, put: Callable[[np.ndarray], jax.Array]):
        B, V = slots, vocab
        self.put = put
        self.temperature, self.top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        self.top_k, self.seed = np.zeros(B, np.int32), np.zeros(B, np.uint32)
        self.presence, self.frequency = np.zeros(B, np.float32), np.zeros(B, np.float32)
        self.repetition, self.min_tokens = np.ones(B, np.float32), np.zeros(B, np.int32)
        self.bias, self.stop_mask = np.zeros((B, V), np.float32), np.zeros((B, V), bool)
        self._device: dict[int, SamplingArrays] = {}  # by slots covered

    def set(self, slot: int, p: SamplingParams) -> None:
        """Slot `slot` now serves a request with parameters `p` (validated: they fit)."""
        self.temperature[slot] = p.temperature
        self.top_k[slot] = p.top_k or 0
        self.top_p[slot] = 1.0 if p.top_p is None else p.top_p
        self.seed[slot] = p.seed % (1 << 32)
        self.presence[slot], self.frequency[slot] = p.presence_penalty, p.frequency_penalty
        self.repetition[slot], self.min_tokens[slot] = p.repetition_penalty, p.min_tokens
        self.bias[slot] = 0
        for t, b in p.logit_bias:
            self.bias[slot, t] += b
        self.stop_mask[slot] = False
        self.stop_mask[slot, list(p.stop_token_ids)] = True
        self._device.clear()

    def rows(self, rows) -> SamplingArrays:
        """The host arrays of slots `rows` (a prefill call's batch)."""
        return SamplingArrays(self.temperature[rows], self.top_k[rows], self.top_p[rows],
                              self.seed[rows], self.presence[rows], self.frequency[rows],
                              self.repetition[rows], self.min_tokens[rows], self.bias[rows],
                              self.stop_mask[rows])

    def first(self, k: int) -> SamplingArrays:
        """The first `k` slots' arrays on the device (a decode step's), placed once per admission."""
        if k not in self._device:
            self._device[k] = jax.tree.map(self.put, self.rows(np.arange(k)))
        return self._device[k]
