"""`cryoptycho batch INPUT… -o OUTDIR`: reconstruct many datasets or spools on a Dask cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from ..overrides import parse_set

#: How long a batch on a scheduler waits for its first worker before saying so (not forever).
WORKER_WAIT_S = 60.0


def _gpus(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    if not value:
        return []
    try:
        gpus = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected GPU indices like 0,1,2, got {value!r}", ctx, param) from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"GPU indices must be distinct and ≥ 0, got {value!r}", ctx, param)
    return gpus


@click.command("batch")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the result files (<name>.result.h5) and batch-summary.json.")
@click.option("--options", "options_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file of reconstruction options (applied on top of a spool's own).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Set any option (repeatable).")
@click.option("--scheduler", help="Address of a running Dask scheduler (tcp://host:8786); its "
                                  "workers must advertise --resources GPU=1 when --gpu is given.")
@click.option("--gpus", callback=_gpus, help="Local GPUs to use, e.g. 0,1,2,3: one worker per GPU.")
@click.option("--gpu", "gpu_flag", is_flag=True, help="With --scheduler: tasks claim the GPU resource "
                                                        "and use the CuPy backend.")
@click.option("-j", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local CPU workers (without --gpus/--scheduler).")
@click.option("--threads", is_flag=True, help="Local workers as threads of this process, not processes.")
@click.option("--average", is_flag=True, help="Align and average all results into average.result.h5.")
@click.option("--skip-existing", is_flag=True, help="Leave out inputs whose result file exists (resume).")
@click.option("--export/--no-export", default=None, help="Also write phase MRC and PNG per result (default: no).")
@click.option("--formats", metavar="LIST", help="Outputs per result, e.g. h5,png (h5 always; default h5).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(inputs: tuple[str, ...], output_dir: Path, options_file: Path | None, sets: tuple[str, ...],
            scheduler: str | None, gpus: list[int], gpu_flag: bool, workers: int, threads: bool,
            average: bool, skip_existing: bool, export: bool | None, formats: str | None, quiet: bool) -> None:
    """Reconstruct every INPUT (dataset or spool files, folders of them, or globs) in parallel.

    The same command runs on a laptop (local CPU workers), on a multi-GPU host (--gpus) and on a
    Dask cluster (--scheduler). Exit status 1 when any input failed; batch-summary.json says why.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..batch import (
        ClusterSpec,
        average_results,
        confirm_outputs,
        discover,
        merged_options,
        open_client,
        plan,
        require_gpu_workers,
        run_batch,
        write_summary,
    )
    from ..storage.outputs import formats_for

    try:  # an optional extra: its absence was a RuntimeError traceback once the inputs were read
        import distributed  # noqa: F401
    except ImportError:
        raise click.ClickException('cryoptycho batch needs Dask: pip install "cryoptycho[batch]"') from None
    try:
        chosen = formats_for(formats, export, export_default=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    overrides = _overrides(options_file, sets)
    output_dir = output_dir.resolve()  # the workers' working directories are not this one
    gpu = bool(gpus) or gpu_flag
    if gpu_flag and not scheduler:
        raise click.UsageError("--gpu goes with --scheduler; for local GPUs use --gpus 0,1,…")
    if gpu:
        overrides.setdefault("backend", "cupy")
    try:
        merged_options(overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(f"invalid options: {problems}") from None
    try:
        jobs = plan(discover(inputs), output_dir, skip_existing)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if not jobs:
        click.echo("every input already has a result (--skip-existing): nothing to do")
        return
    spec = ClusterSpec(scheduler=scheduler, gpus=gpus, workers=workers, processes=not threads)
    columns = (TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with open_client(spec) as client, Progress(*columns, disable=quiet) as bar:
        try:
            if gpu:
                require_gpu_workers(client)
            elif scheduler:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (RuntimeError, TimeoutError) as exc:
            raise click.ClickException(f"scheduler {scheduler}: {exc}" if scheduler else str(exc)) from None
        task = bar.add_task("jobs", total=len(jobs), failed=0)
        failed = 0

        def done(result: Any) -> None:
            nonlocal failed
            failed += not result.ok
            bar.update(task, advance=1, failed=failed)
            if not result.ok:
                bar.console.print(f"[red]failed[/red] {result.source}: {result.error.splitlines()[0]}")

        reported = run_batch(client, jobs, overrides, gpu=gpu, formats=chosen, on_done=done)
        results = confirm_outputs(reported)
        for before, after in zip(reported, results, strict=True):
            if before.ok and not after.ok:
                bar.console.print(f"[red]missing[/red] {after.source}: {after.error}")
        summary_avg = None
        if average:
            good = sorted(r.output for r in results if r.ok)
            try:
                summary_avg = client.submit(average_results, good, str(output_dir / "average.result.h5"),
                                            chosen, pure=False).result()
            except ValueError as exc:
                summary_avg = {"error": str(exc)}
                bar.console.print(f"[red]average failed[/red]: {exc}")
            else:
                if not Path(summary_avg["path"]).is_file():
                    summary_avg["error"] = f"the worker wrote {summary_avg['path']}, but it does not exist here"
                    bar.console.print(f"[red]average missing[/red]: {summary_avg['error']}")
    summary = write_summary(output_dir / "batch-summary.json", results, summary_avg)
    ok = sum(r.ok for r in results)
    click.echo(f"{ok}/{len(results)} reconstructed into {output_dir}; summary {summary}")
    if ok < len(results) or (summary_avg is not None and "error" in summary_avg):
        raise SystemExit(1)


def _overrides(options_file: Path | None, sets: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if options_file is not None:
        try:
            loaded = json.loads(options_file.read_text())
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"{options_file}: not valid JSON ({exc})", param_hint="--options") from None
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{options_file}: expected a JSON object", param_hint="--options")
        out.update(loaded)
    for key, value in parse_set(sets).items():
        if key == "stream" and isinstance(value, dict) and isinstance(out.get("stream"), dict):
            out["stream"] = {**out["stream"], **value}
        else:
            out[key] = value
    return out
