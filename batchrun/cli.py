"""The ``batchrun`` command: a thin layer over ``batchrun.api``.

Logs and progress go to stderr; results to stdout. With ``--json`` the last stdout line is one JSON object
(also on failure: ``{"status": "error", "exit_code": N, ...}``). Exit codes: 0 ok, 1 runtime failure,
2 usage, 65 input data error, 75 temporary failure (output locked, interrupted), 78 invalid spec.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from batchrun import __version__
from batchrun.errors import EXIT_FAILURE, EXIT_TEMPFAIL, BatchrunError

log = logging.getLogger("batchrun")

_SET = click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
                    help="Override a spec field, e.g. --set sampling.max_tokens=16 (repeatable; VALUE is YAML).")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print a one-line JSON summary as the last line.")
_JOB = click.argument("job", type=click.Path(dir_okay=False))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            try:
                return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(),
                                   **json.loads(msg)})
            except ValueError:
                pass
        return json.dumps({"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": msg})


def _setup_logging(log_format: str, verbose: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s batchrun %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _short(text: str, most: int = 60) -> str:
    line = " ".join(text.split())
    return repr(line if len(line) <= most else line[: most - 1] + "…")


def _emit_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, default=str))


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn batchrun's errors into a message on stderr (and JSON on stdout) and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return fn(*args, **kwargs)
        except BatchrunError as e:
            click.echo(f"error: {e}", err=True)
            if as_json:
                _emit_json({"status": "error", "exit_code": e.exit_code, "kind": e.kind, "error": e.message,
                            "problems": e.problems})
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; committed rows are kept, rerun the same command to resume", err=True)
            if as_json:
                _emit_json({"status": "interrupted", "exit_code": EXIT_TEMPFAIL})
            sys.exit(EXIT_TEMPFAIL)
        except Exception as e:  # a bug: say so plainly, keep the traceback for the report
            log.exception("unexpected failure")
            if as_json:
                _emit_json({"status": "error", "exit_code": EXIT_FAILURE, "kind": "internal_error",
                            "error": f"{type(e).__name__}: {e}"})
            sys.exit(EXIT_FAILURE)

    return wrapper


class _Cli(click.Group):
    """The command group; a command-line error (unknown option, a JOB that is a directory, ...) still ends with
    the one JSON line when ``--json`` was given, and exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            e.show()
            if "--json" in argv:
                _emit_json({"status": "error", "exit_code": e.exit_code, "kind": "usage_error",
                            "error": e.format_message()})
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_TEMPFAIL)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrun")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Format of log lines on stderr (json: one object per line, for log collectors).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr; no progress.")
@click.pass_context
def cli(ctx: click.Context, log_format: str, verbose: int, quiet: bool) -> None:
    """batchrun: offline batch inference for LLMs. A YAML job reads a table of prompts through DuckDB,
    runs a transformers model over every row, and writes a Parquet dataset.

    \b
    Quick start:
      batchrun validate jobs/example.yaml
      batchrun submit jobs/example.yaml
      batchrun status out/example
    """
    ctx.obj = {"log_format": log_format, "quiet": quiet}
    _setup_logging(log_format, verbose, quiet)


@cli.command()
@_JOB
@_SET
@click.option("--fresh", is_flag=True, help="Delete this job's earlier results in output.path and start over.")
@_JSON
@click.pass_context
@_guard
def submit(ctx: click.Context, job: str, overrides: tuple[str, ...], fresh: bool, as_json: bool) -> None:
    """Run JOB to completion and write its Parquet results.

    Re-running a finished job does nothing (use --fresh to rebuild); re-running an unfinished one keeps
    the rows already written and computes only the rest.

    \b
    Example:
      batchrun submit jobs/example.yaml --set sampling.max_tokens=4 --json
    """
    from batchrun import api
    from batchrun.runtime.progress import default_progress

    t0 = time.monotonic()
    progress = default_progress(ctx.obj["log_format"], ctx.obj["quiet"])
    result = api.submit(job, overrides, fresh=fresh, progress=progress)
    summary = {**result.to_dict(), "exit_code": 0, "elapsed_s": round(time.monotonic() - t0, 3)}
    if result.status == "already_complete":
        click.echo(f"{result.job}: already complete ({result.rows_total} rows in {result.output}); "
                   "use --fresh to rebuild")
    else:
        click.echo(f"{result.job}: {result.rows_ok} rows ok, {result.rows_error} with errors"
                   + (f", {result.rows_skipped} kept from an earlier run" if result.rows_skipped else "")
                   + f"; {result.prompt_tokens} prompt + {result.output_tokens} output tokens "
                   f"in {summary['elapsed_s']:.1f}s -> {result.output}")
    if as_json:
        _emit_json({"status": result.status, **summary})


@cli.command()
@_JOB
@_SET
@_JSON
@_guard
def validate(job: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check JOB's spec (fields, values, template syntax) without reading input or loading a model.

    Exits 78 and lists every problem, one per line, if the spec is invalid.

    \b
    Example:
      batchrun validate jobs/example.yaml --set engine.device=cpu
    """
    from batchrun import api

    spec = api.validate(job, overrides)
    click.echo(f"{job}: valid (job {spec.name!r}, spec hash {spec.spec_hash()})")
    if as_json:
        _emit_json({"status": "ok", "exit_code": 0, "job": spec.name, "spec_hash": spec.spec_hash(),
                    "spec": spec.to_dict()})


@cli.command()
@_JOB
@_SET
@click.option("--workers", type=click.IntRange(1, 4096), default=None,
              help="Also cut the plan into shards for this many workers: their cost, balance, duplicated prefill "
                   "(default: as many as engine.devices lists).")
@_JSON
@_guard
def plan(job: str, overrides: tuple[str, ...], workers: int | None, as_json: bool) -> None:
    """Dry run: read JOB's input, tokenize, build the plan and simulate it; report what sharing saves.

    Shows rows, prompt tokens, unique tokens of the global prefix trie, prefill tokens after sharing,
    shared prefixes and their share degrees, prefill packing, the KV budget with the projected peak, and
    the estimated number of steps. Loads the tokenizer and model config only (no weights); writes nothing.

    \b
    Example:
      batchrun plan jobs/example.yaml --json
    """
    from batchrun import api

    report = api.plan(job, overrides, workers=workers)
    d = report.to_dict()
    sd = d["share_degree"]
    degree = f"; share degree min {sd['min']} / median {sd['median']:g} / max {sd['max']}" if sd else ""
    lines = [
        ("rows", f"{d['rows']:,} ({d['rows_error']:,} fail before the engine)"),
        ("prompt tokens", f"{d['prompt_tokens']:,}"),
        ("unique tokens", f"{d['unique_tokens']:,} (nodes of the prefix trie)"),
        ("prefill tokens", f"{d['prefill_tokens']:,} after sharing ({100 * d['saving_ratio']:.1f}% saved)"),
        ("shared prefixes", f"{d['shared_prefixes']:,} in {d['prefix_levels']} level(s){degree}"),
        ("prefill packs", f"{d['packs']:,} of {d['pack_capacity']:,} tokens, "
                          f"{100 * d['packing_efficiency']:.1f}% full"),
        ("output tokens", f"at most {d['max_output_tokens']:,}"),
        ("KV budget", f"{d['kv_budget_tokens']:,} tokens; projected peak {d['projected_kv_peak']:,}"
                      + (f"; {d['rows_too_big']:,} rows too big for it" if d["rows_too_big"] else "")),
        ("estimated steps", f"{d['estimated_steps']:,}"),
        ("planning time", f"{d['plan_s']:.3f}s"),
    ]
    if d["constraint"]:
        c = d["constraint"]
        lines.append(("constraint", f"{c['kind']} on {c['rows']:,} rows ({c['grammars']} grammar(s) compiled in "
                                    f"{c['compile_s']:.3f}s; a token mask on the CPU per generated token)"))
    if d["shards"]:
        sh = d["shards"]
        lines.append(("shards", f"{sh['shards']} for {workers} worker(s), balance {sh['balance']:.2f} (largest / mean "
                                f"cost); {sh['duplicated_prefill_tokens']:,} prefix tokens computed again"))
    if d["batchprompt"]:
        b = d["batchprompt"]
        s = b["single_item"]
        lines = [("mode", f"batchprompt, {b['layout']} layout: {b['items']:,} items, {b['items_per_prompt']} per "
                          f"prompt, up to {b['rounds']} round(s)" + (" (SEAS)" if b["seas"] else "")),
                 ("instruction", f"{b['shared_prefix_tokens']:,} tokens shared by every prompt: "
                                 + _short(b["instruction"])),
                 ("rounds", f"{b['first_round_prompts']:,} prompts in the first round, at most "
                            f"{b['most_prompts']:,} in all (SEAS drops settled items), plus single-item "
                            "prompts for items without a valid answer"),
                 ("single-item", f"{s['prompts']:,} prompts, {s['computed_tokens']:,} tokens computed after "
                                 "sharing (for comparison)"),
                 *[(f"round 0 {k}", v) for k, v in lines if k in ("prompt tokens", "prefill tokens",
                                                                  "KV budget")],
                 ("planning time", f"{d['plan_s']:.3f}s")]
    click.echo(f"{d['job']}: plan")
    for k, v in lines:
        click.echo(f"  {k:<22} {v}" if d["batchprompt"] else f"  {k:<16} {v}")
    if as_json:
        _emit_json({"status": "ok", "exit_code": 0, **d})


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@_JSON
@_guard
def status(output_dir: str, as_json: bool) -> None:
    """Show what OUTPUT_DIR holds: complete, incomplete (rerun submit to resume), empty or missing.

    \b
    Example:
      batchrun status out/example
    """
    from batchrun import api

    st = api.status(output_dir)
    click.echo(f"{output_dir}: {st['state']}, {st['rows_committed']} rows in {st['parts']} part file(s)")
    for key in ("job", "created_at", "finished_at", "rows", "tokens", "timings", "model"):
        if key in st:
            click.echo(f"  {key}: {st[key]}")
    for problem in st.get("problems") or []:
        click.echo(f"  problem: {problem}")
    if st.get("fix"):
        click.echo(f"  fix: {st['fix']}")
    if as_json:
        _emit_json({"status": "ok", "exit_code": 0, **st})


@cli.command()
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["openai_batch"]), required=True,
              help="openai_batch: the OpenAI Batch API's output and error JSONL.")
@click.option("--output", "path", type=click.Path(dir_okay=False), required=True,
              help="The output JSONL; the error JSONL goes beside it (NAME.errors.jsonl).")
@_JSON
@_guard
def export(output_dir: str, fmt: str, path: str, as_json: bool) -> None:
    """Write a finished job's results in another format; the Parquet dataset stays as it is.

    \b
    Example (a job with input.format openai_batch):
      batchrun export out/requests --format openai_batch --output results.jsonl
    """
    from batchrun import api

    done = api.export(output_dir, fmt, path)
    click.echo(f"{done['responses']} response(s) -> {done['output']}; {done['failed']} error(s) -> {done['errors']}")
    if as_json:
        _emit_json({"status": "ok", "exit_code": 0, **done})


@cli.command()
@click.option("--expect-gpu", is_flag=True, help="Exit 1 unless a CUDA device is usable.")
@_JSON
@_guard
def doctor(expect_gpu: bool, as_json: bool) -> None:
    """Show what this machine gives the engine: torch's build, the GPUs, the device and dtype that
    engine.device auto picks, and the attention backend there.

    \b
    Example (after installing on a GPU machine):
      batchrun doctor --expect-gpu
    """
    from batchrun import api

    d = api.doctor(expect_gpu)
    click.echo(f"batchrun {d['batchrun']}, Python {d['python']}, torch {d['versions']['torch']} ({d['torch_build']})")
    for g in d["gpus"]:
        click.echo(f"  {g['device']}: {g['name']}, {g['memory_gb']} GiB, compute capability {g['capability']}")
    if not d["gpus"]:
        click.echo("  no CUDA device" + (" (a CPU build of torch)" if d["torch_build"] == "cpu" else ""))
    click.echo(f"  engine.device auto: {d['auto_device']} ({d['auto_dtype']}), attention: {d['attention']}, "
               f"CPU threads: {d['cpu_threads']}")
    click.echo("  " + ", ".join(f"{k} {v or '(not installed)'}" for k, v in d["versions"].items() if k != "torch"))
    if as_json:
        _emit_json({"status": "ok", "exit_code": 0, **d})


def main() -> None:
    cli(prog_name="batchrun")


if __name__ == "__main__":
    main()
