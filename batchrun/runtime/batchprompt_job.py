"""A ``mode: batchprompt`` job: its preparation, its run and its output rows.

Every input row still to run is one item: ``prompt.template`` renders its text (a row whose template fails is
a row error, as in generate mode). The items go through ``runtime.batchprompt`` (prompts of several items,
rounds, votes, single-item fallbacks) and each becomes one output row: ``output`` holds the label, with the
votes, probabilities, confidence, rounds, prompts and fallback flag (``io.sink.BATCHPROMPT_FIELDS``).

The rounds depend on each other (SEAS drops settled items), so the rows are written when the last round is
done; a stop before that leaves the job resumable with nothing of this run written. The summary and the
manifest report what the prompts cost (prompts, prompt tokens, tokens computed after prefix sharing, output
tokens) next to what single-item prompts (with the same sharing) would cost for the same items.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchrun.engine.requests import Interrupted, Request
from batchrun.errors import SpecError
from batchrun.io.prompts import render, use_chat
from batchrun.io.sink import BATCHPROMPT_FIELDS, RESULT_FIELDS
from batchrun.io.source import read_source
from batchrun.plan.batchprompt import BatchPromptConfig, ItemResult, round_prompts
from batchrun.runtime.assemble import RowResult
from batchrun.runtime.batchprompt import BatchPrompter, Layout, Prompter, Usage, config_of, plan_of
from batchrun.spec import JobSpec, SamplingSpec

log = logging.getLogger("batchrun")


@dataclass
class BatchPromptWork:
    """What a batchprompt job has to do: the items (prompter item i is input row ``rows[i]``)."""

    prompter: Prompter
    rows: list[int]
    config: BatchPromptConfig
    single_item: dict[str, int]  # what single-item prompts (with prefix sharing) cost for these items
    report: dict[str, Any] = field(default_factory=dict)  # after the run: prompts, tokens, rounds

    def plan_report(self) -> dict[str, Any]:
        """What ``batchrun plan`` shows: the shared instruction and the rounds."""
        p, c = self.prompter, self.config
        first = round_prompts(range(len(self.rows)), c, 0)
        shared = 0
        if len(self.rows) > 1:  # the instruction (and examples): what any two prompts share
            a, b = p.request(0, [0]).prompt_ids, p.request(1, [1]).prompt_ids
            shared = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return {"layout": p.layout.kind, "labels": list(p.layout.labels) if p.layout.labels else None,
                "items": len(self.rows), "items_per_prompt": c.items_per_prompt, "rounds": c.rounds,
                "seas": c.seas, "calibrate": c.calibrate, "instruction": p.layout.instruction,
                "shared_prefix_tokens": shared, "first_round_prompts": len(first),
                "most_prompts": len(first) * c.rounds, "single_item": self.single_item}


class BatchPromptRows:
    """Output rows of a batchprompt job (``runtime.assemble.Assembler``'s ``fields`` and ``failed``)."""

    def __init__(self) -> None:
        self.fields = [*RESULT_FIELDS, *BATCHPROMPT_FIELDS]

    def failed(self, row: int, message: str) -> list[RowResult]:
        return [RowResult(row, {"output": None, "prompt_tokens": None, "output_tokens": None,
                                "finish_reason": "error", "error": message, "votes": None, "label_probs": None,
                                "confidence": None, "rounds": 0, "prompts": [], "fallback": False})]

    def result(self, row: int, r: ItemResult, prompt_ids: list[int]) -> RowResult:
        error = None if r.label is not None else "no valid answer in any round, nor from a single-item prompt"
        return RowResult(row, {"output": r.label, "prompt_tokens": None, "output_tokens": None,
                               "finish_reason": "error" if error else "stop", "error": error,
                               "votes": list(r.votes.items()), "label_probs": list(r.probs.items()),
                               "confidence": round(r.confidence, 6), "rounds": r.rounds, "prompts": prompt_ids,
                               "fallback": r.fallback})


def prepare_batchprompt(spec: JobSpec, tokenizer: Any, max_context: int | None, done: Collection[Any]) -> Any:
    """``runtime.prepare.prepare`` for a batchprompt job: the items, their row errors, the first round's
    requests and plan (for the KV budget and ``batchrun plan``), and what single-item prompts would cost."""
    from batchrun.runtime.prepare import PreparedJob, output_columns, plan_config

    bp = spec.batchprompt
    assert bp is not None
    timings = {}
    t = time.monotonic()
    source = read_source(spec.input)
    columns = output_columns(spec, source)
    timings["read_s"] = time.monotonic() - t
    t = time.monotonic()
    users, systems, errors = render(spec.prompt, source.table)
    ids = source.table.column(source.id_column).to_pylist()
    todo = [i for i, row_id in enumerate(ids) if row_id not in done]
    system = _one_system([systems[i] for i in todo if errors[i] is None])
    layout = Layout.from_spec(bp, use_chat(spec.prompt, tokenizer), system,
                              [(shot.user, shot.assistant) for shot in spec.prompt.fewshot])
    cfg = config_of(bp)
    probe = Prompter(tokenizer, layout, [users[i] or "" for i in todo])
    singles = probe.requests([[k] for k in range(len(todo))])
    row_errors, rows, items, single_reqs = [], [], [], []
    for k, i in enumerate(todo):
        message = errors[i]
        if message is None and max_context and _length(singles[k]) > max_context:
            message = (f"the item's single-item prompt is {_length(singles[k])} tokens with its answer; the "
                       f"model's context is {max_context}")
        if message is not None:
            row_errors.append((i, message))
        else:
            rows.append(i), items.append(users[i]), single_reqs.append(singles[k])
    prompter = Prompter(tokenizer, layout, items)
    first = round_prompts(range(len(items)), cfg, 0)
    requests = prompter.requests(first)
    if max_context:
        longest = max((_length(r) for r in requests), default=0)
        if longest > max_context:
            raise SpecError(f"batchprompt.items_per_prompt: a prompt of {cfg.items_per_prompt} items is up to "
                            f"{longest} tokens with its answers, past the model's context ({max_context}); "
                            "lower items_per_prompt")
    timings["tokenize_s"] = time.monotonic() - t
    t = time.monotonic()
    plan = plan_of(requests, plan_config(spec))
    single = _cost(single_reqs, plan_config(spec))
    timings["plan_s"] = time.monotonic() - t
    work = BatchPromptWork(prompter, rows, cfg, single)
    log.info("batchprompt: %d items, %d per prompt, up to %d rounds; first round %d prompts", len(items),
             cfg.items_per_prompt, cfg.rounds, len(requests))
    return PreparedJob(source, columns, ids, None, requests, _rows_of(rows, first), row_errors, plan,
                       BatchPromptRows(), timings, None, work)


def _one_system(systems: Sequence[str | None]) -> str | None:
    distinct = set(systems)
    if len(distinct) > 1:
        raise SpecError("prompt.system: in mode batchprompt the system prompt is shared by every prompt; it must "
                        "not depend on the row")
    return next(iter(distinct), None)


def _length(r: Request) -> int:
    return len(r.prompt_ids) + r.max_tokens


def _rows_of(rows: list[int], first: list[list[int]]) -> Any:
    """The input row of each first-round prompt's first item (``PreparedJob.request_rows``)."""
    import numpy as np

    return np.array([rows[p[0]] for p in first], dtype=np.int64)


def _cost(requests: Sequence[Request], config: Any) -> dict[str, int]:
    """Prompts, prompt tokens and tokens computed after sharing (plus outputs: a label each; free answers:
    ``answer_tokens``, at most) of ``requests``."""
    if not requests:
        return {"prompts": 0, "prompt_tokens": 0, "computed_tokens": 0, "output_tokens": 0}
    out = sum(r.max_tokens - 1 for r in requests)  # (the label, or the longest answer; not the EOS)
    return {"prompts": len(requests), "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "computed_tokens": plan_of(requests, config).stats()["unique_tokens"] + out, "output_tokens": out}


def execute_batchprompt(spec: JobSpec, prepared: Any, loaded: Any, emit: Any, progress: Any, already_done: int,
                        stop: Any, run: Any) -> Any:
    """Run the rounds, then emit every item's row (``emit``: a list of RowResult); fill ``run`` (a
    ``runtime.job.Execution``)."""
    from batchrun.engine.factory import kv_usage, make_engine
    from batchrun.runtime.prepare import plan_config

    work: BatchPromptWork = prepared.batchprompt
    for row, message in prepared.errors:
        emit(prepared.assembler.failed(row, message))
    progress.start(prepared.num_rows, already_done=already_done + len(prepared.errors))
    if not work.rows:
        progress.finish()
        return run
    # Greedy, no stop strings (the spec allows no other sampling here); the first round is the largest.
    engine = make_engine(spec.model_copy(update={"sampling": SamplingSpec()}), loaded, prepared.requests)
    rounds: list[int] = []

    def on_round(r: int, prompts: int) -> None:
        rounds.append(prompts)
        log.info("batchprompt: round %d, %d prompts", r, prompts)

    bp = BatchPrompter(engine, work.prompter, plan_config(spec), interrupt=lambda: stop.requested,
                       on_round=on_round)
    t = time.monotonic()
    try:
        outcome = bp.classify(work.config)
        starts = [sum(outcome.prompts[:r]) for r in range(len(outcome.prompts))]
        for item, row in enumerate(work.rows):
            r = outcome.results[item]
            emit([prepared.assembler.result(row, r, [starts[a] + b for a, b in r.prompts])])
        progress.advance(len(work.rows), bp.usage.output_tokens)
    except Interrupted:
        run.stopped_by = stop.signal
        return run
    finally:
        run.generate_s = time.monotonic() - t
        progress.finish()
    run.stopped_by = stop.signal
    run.kv_budget_tokens, run.kv_peak_tokens = kv_usage(engine)
    run.prompt_tokens, run.output_tokens = bp.usage.prompt_tokens, bp.usage.output_tokens
    work.report = _report(work, bp.usage, outcome.prompts, outcome.fallback_prompts)
    return run


def _report(work: BatchPromptWork, usage: Usage, per_round: list[int], fallback: int) -> dict[str, Any]:
    single = work.single_item
    c = work.config
    out = {"layout": work.prompter.layout.kind, "items": len(work.rows), "items_per_prompt": c.items_per_prompt,
           "rounds": c.rounds, "prompts_per_round": per_round, "fallback_prompts": fallback, **usage.to_dict(),
           "single_item": single}
    if single["computed_tokens"]:
        out["computed_vs_single_item"] = round(usage.computed_tokens / single["computed_tokens"], 4)
    return out
