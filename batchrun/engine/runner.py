"""The runner: turns a step (``engine.step.Step``) into one packed forward pass and returns the logits to
sample from. Computes, never decides (the scheduler decides).

All sequences of a step go in one row: token ids concatenated, position ids restarting per sequence, no
padding. The model's attention layers run the chosen attention backend (``engine.attention``) over the
paged KV pool.

Steps of short sequences are replayed from CUDA graphs where the backend supports it: decode steps (one new
token per sequence) and steps that also carry short chunks (at most ``GRAPH_SEQ_TOKENS`` tokens: the forced
text a constraint appends, BatchPrompt's items). The step is padded to the next of a few token bucket sizes
(its sampled positions to the next row bucket), and a shape (tokens, sampled rows, shared levels) is
captured on its first use (``CAPTURE_AFTER``; ``BATCHRUN_CAPTURE_AFTER=2`` waits for a third use, as before
2026-12-01). A capture costs about one eager step, and a replay is one launch instead of the hundreds of the
model's Python code. ``BATCHRUN_CUDA_GRAPHS=0`` turns them off.

Eager steps are padded too (``BATCHRUN_STEP_BUCKETS=0`` turns it off): tokens to the next token bucket
(beyond 2048: the next multiple of ``PAD_TOKENS``), sampled positions to the next row bucket (or multiple),
so that a run has few matrix-product shapes, each seen again, instead of one per step: cuBLAS spends
milliseconds on its first call for each shape (on 1b fewshot, 0.5 s of host time in the first run of a
process, profiled). Spare tokens write their K/V to the pool's spare slot, as in graph steps. Measured on the
H200, 1b fewshot 0.25, each the first run of its process (``benchmarks/results/gpu-variants-h200.jsonl``):
with both, 1.23-1.50 s over seeds 4-7, against 1.43-1.87 s before.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from batchrun.engine import attention, fused
from batchrun.engine.loader import LoadedModel, cache_dir
from batchrun.engine.requests import Interrupted
from batchrun.engine.step import Step
from batchrun.errors import RuntimeFailure

log = logging.getLogger("batchrun")


def check_supported(model) -> None:
    """Refuse, with a clear message, models whose attention batchrun cannot own."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise RuntimeFailure(f"engine.backend: {name} does not support custom attention functions in transformers; "
                             "use engine.backend: reference")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        raise RuntimeFailure(f"engine.backend: {name} uses {sorted(kinds - {'full_attention'})} layers, which "
                             "batchrun's engine does not implement yet; use engine.backend: reference")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise RuntimeFailure(f"engine.backend: {name} uses sliding-window attention, which batchrun's engine does "
                             "not implement yet; use engine.backend: reference")


LONG_STEP_LOG_S = 10.0  # a step running longer than this logs its progress, layer by layer, this often
# Sampled rows: powers of two. Each bucket a run meets costs one capture (about an eager step); on 1b fewshot
# these gave 1.13 / 1.33 s against 1.36 / 1.50 s with 16 buckets (48, 96, ... too), seeds 5 / 7
# (benchmarks/results/gpu-variants-h200.jsonl).
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GRAPH_TOKENS = (*GRAPH_BUCKETS, 1536, 2048)  # tokens in a step replayed from a graph
PAD_TOKENS = 256  # eager steps beyond the largest token bucket, padded to a multiple of this (STEP_BUCKETS)
GRAPH_SEQ_TOKENS = 64  # the longest sequence chunk a graph step may carry (longer: a prefill step, eager)
CAPTURE_AFTER = 0  # a decode shape is captured on its next use after this many (BATCHRUN_CAPTURE_AFTER)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    ints: torch.Tensor  # [2 * tokens + rows] int64: input ids, positions, sampled positions (static input)
    logits: torch.Tensor  # [rows, vocab] fp32 (the static output)


class Runner:
    """Owns the KV pool tensors and the attention backend; ``forward(step)`` runs one step.

    Between decoder layers it polls ``interrupt`` (so a stop request ends even a minutes-long CPU prefill
    step within about one layer's time) and, in a long step, logs how far it got."""

    def __init__(self, loaded: LoadedModel, num_slots: int):
        model = loaded.model
        check_supported(model)
        # Triton's compiled kernels kept with batchrun's cache (a container that keeps it compiles them once).
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
        model.set_attn_implementation(attention.register())
        # Fused RMSNorm and SwiGLU kernels in this engine's forward passes on a GPU (``engine.fused``).
        self.fused = loaded.device.startswith("cuda") and fused.install(model) > 0
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dtype = next(model.parameters()).dtype
        shape = (cfg.num_hidden_layers, num_slots + 1, kv_heads, head_dim)  # + a spare slot (padding writes)
        k_pool = torch.empty(shape, dtype=dtype, device=loaded.device)  # only written slots are read
        v_pool = torch.empty(shape, dtype=dtype, device=loaded.device)
        self.backend = attention.choose_backend(loaded.device, dtype)(k_pool, v_pool, heads)
        self.use_graphs = (loaded.device.startswith("cuda") and self.backend.graphs
                           and os.environ.get("BATCHRUN_CUDA_GRAPHS", "1") != "0")
        self.pad_steps = self.backend.graphs and os.environ.get("BATCHRUN_STEP_BUCKETS", "1") == "1"
        self.capture_after = _env_count("BATCHRUN_CAPTURE_AFTER", CAPTURE_AFTER)
        self.padded_steps = 0
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._seen: dict[tuple[int, int, int], int] = {}
        self._graph_pool = None
        self.graph_steps = 0
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.vocab = self.head.weight.shape[0]
        self.device = loaded.device
        self.interrupt: Callable[[], bool] | None = None
        self._layers = list(getattr(self.decoder, "layers", []))
        # The hooks hold the runner weakly and go when it goes: a model outlives its engines, and an engine's
        # KV pool must not (a second engine on the same model needs that memory).
        me = weakref.ref(self)
        hooks = [layer.register_forward_pre_hook(functools.partial(_between_layers, me, i))
                 for i, layer in enumerate(self._layers)]
        weakref.finalize(self, _remove, hooks)
        self._step_started = self._last_log = 0.0
        self._step_tokens = 0

    def between_layers(self, index: int) -> None:
        if self.interrupt is not None and self.interrupt():
            raise Interrupted
        now = time.monotonic()
        if now - self._last_log >= LONG_STEP_LOG_S:
            self._last_log = now
            log.info("a long step: %d tokens, layer %d of %d after %.0f s", self._step_tokens, index + 1,
                     len(self._layers), now - self._step_started)

    @torch.inference_mode()
    def forward(self, step: Step, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step; return logits [len(step.sample_index), vocab], in the order of ``step.sample_keys``.
        ``previous``: the tokens the step before drew, on the device, for the step's placeholders
        (``engine.step.placeholder``). Launches work and returns; nothing here waits for the device."""
        t = step.num_tokens
        self._step_started = self._last_log = time.monotonic()
        self._step_tokens = t
        key = self._graph_key(step) if self.use_graphs else None
        if key is not None:
            self._seen[key] = seen = self._seen.get(key, 0) + 1
            if (key in self._graphs or seen > self.capture_after) and self.backend.prepare_graph(step, key[0], key[2]):
                return self._replay(step, key, previous)
        rows = len(step.sample_index)
        tokens, sampled = (_bucket(t, GRAPH_TOKENS), _bucket(rows, GRAPH_BUCKETS)) if self.pad_steps else (t, rows)
        # One host-to-device copy for the packed row's ids and positions and the sampled positions (padded:
        # spare tokens are token 0 at position 0; spare sampled positions read token 0's hidden state).
        pad = [0] * (tokens - t)
        ints = _to_device(step.token_ids + pad + step.positions + pad + step.sample_index + [0] * (sampled - rows),
                          self.device)
        ids, pos, last = ints[:tokens], ints[tokens : 2 * tokens], ints[2 * tokens :]
        if step.waits:
            ids = _fill_placeholders(ids, previous)
        if tokens != t:
            self.backend.prepare(step, tokens)
            self.padded_steps += 1
        else:
            self.backend.prepare(step)
        hidden = self._hidden(ids, pos)
        if not rows:
            return hidden.new_empty(0, self.head.weight.shape[0])
        return self.head(hidden[0, last]).float()[:rows]

    @staticmethod
    def _graph_key(step: Step) -> tuple[int, int, int] | None:
        """(tokens bucket, sampled rows bucket, shared levels) of a step a graph may run, else None."""
        t, rows = step.num_tokens, len(step.sample_index)
        if t > GRAPH_TOKENS[-1] or not 0 < rows <= GRAPH_BUCKETS[-1]:
            return None
        if any(len(s.tokens) > GRAPH_SEQ_TOKENS for s in step.seqs):
            return None
        return _bucket(t, GRAPH_TOKENS), _bucket(rows, GRAPH_BUCKETS), max(len(s.levels) for s in step.seqs) - 1

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [1, T, hidden] over the packed row, attention by the backend."""
        with attention.use_backend(self.backend), fused.active() if self.fused else nullcontext():
            return self.decoder(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state

    def _replay(self, step: Step, key: tuple[int, int, int], previous: torch.Tensor | None) -> torch.Tensor:
        tokens, rows, t = key[0], key[1], step.num_tokens
        pad = [0] * (tokens - t)
        ints = _to_device(step.token_ids + pad + step.positions + pad + step.sample_index
                          + [0] * (rows - len(step.sample_index)), self.device)
        if step.waits:
            ints[:tokens] = _fill_placeholders(ints[:tokens], previous)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(ints, tokens)
        else:
            g.ints.copy_(ints)
        g.graph.replay()
        self.graph_steps += 1
        return g.logits[: len(step.sample_index)]

    def _capture(self, ints: torch.Tensor, tokens: int) -> _Graph:
        """Capture the forward pass over the static ``ints`` (ids and positions of ``tokens`` tokens, then the
        sampled positions; the backend's static metadata is laid out already). The first capture is preceded
        by an eager run on a side stream (lazy initialisation)."""
        ids, pos, last = ints[:tokens], ints[tokens : 2 * tokens], ints[2 * tokens :]

        def run() -> torch.Tensor:
            return self.head(self._hidden(ids, pos)[0, last]).float()

        interrupt, self.interrupt = self.interrupt, None  # (nothing may stop a capture half-way)
        main = torch.cuda.current_stream()
        try:
            if self._graph_pool is None:
                self._capture_stream = torch.cuda.Stream()
                self._capture_stream.wait_stream(main)
                with torch.cuda.stream(self._capture_stream):
                    run()
                self._graph_pool = torch.cuda.graph_pool_handle()
            # (Not ``torch.cuda.graph``: it empties the allocator's cache at every capture, and the next
            # prefill step would then wait on fresh device allocations. Thread-local: the mask worker may take
            # pinned memory meanwhile, which a global capture would count as an error.)
            graph = torch.cuda.CUDAGraph()
            self._capture_stream.wait_stream(main)
            with torch.cuda.stream(self._capture_stream):
                graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
                try:
                    logits = run()
                finally:
                    graph.capture_end()
            main.wait_stream(self._capture_stream)
        finally:
            self.interrupt = interrupt
        return _Graph(graph, ints, logits)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    """``n`` padded: the next of ``buckets``, beyond the largest the next multiple of ``PAD_TOKENS``."""
    if n > buckets[-1]:
        return -(-n // PAD_TOKENS) * PAD_TOKENS
    return next(b for b in buckets if b >= n) if n else 0


def _env_count(name: str, default: int) -> int:
    """The environment variable ``name`` as a count (>= 0), else ``default``; anything else is refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise RuntimeFailure(f"{name}={raw!r}: expected a whole number >= 0")
    return int(raw)


def _to_device(values: list[int], device: str) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, copied from pinned memory without waiting (the caching
    host allocator keeps the pinned block until the copy is done, so it is never overwritten early)."""
    host = torch.tensor(values, dtype=torch.long, pin_memory=device != "cpu")
    return host if device == "cpu" else host.to(device, non_blocking=True)


def _fill_placeholders(ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``ids`` with each placeholder (-1 - j) replaced by ``previous[j]``, on the device."""
    return torch.where(ids < 0, previous[(-1 - ids).clamp_(min=0)], ids)


def _between_layers(runner: weakref.ref, index: int, module: Any, args: Any) -> None:
    me = runner()
    if me is not None:
        me.between_layers(index)


def _remove(hooks: list) -> None:
    for h in hooks:
        h.remove()
