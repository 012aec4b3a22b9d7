"""llmc command line: plan | build | launch | schema | presets | gpus.

Thin by design: load, compile, render, print or write, exit (0 ok, 1 errors, 2 usage).
This is the only module that writes files. User errors never show a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmc: a declarative config compiler for LLM training runs.")


def _fail(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(1)


def _compile(spec: Path):
    """Load + compile; on spec errors print every one (one line each) and exit 1."""
    from llmc.compiler.compile import compile_spec
    from llmc.diagnostics import SpecError, errors
    from llmc.spec.facts import gather_facts
    from llmc.spec.load import load_spec

    try:
        run, lines = load_spec(spec)
        # the spec file is read once more, here, for the sha256 recorded in every artifact
        compiled = compile_spec(run, spec_path=str(spec), yaml_lines=lines, spec_bytes=spec.read_bytes(),
                                facts=gather_facts(run, spec.parent))
    except SpecError as e:
        _fail([d.render() for d in e.diagnostics])
    errs = errors(compiled.diagnostics)
    if errs:
        _fail([d.render() for d in errs])
    return compiled


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Run spec (YAML).")],
    format: Annotated[str, typer.Option("--format", "-f", help="text or json")] = "text",
    diff: Annotated[Path | None, typer.Option("--diff", help="Compare with an earlier plan.lock.json.")] = None,
) -> None:
    """Validate the spec, do the math, search a parallelism plan and print the report."""
    if format not in ("text", "json"):
        _fail([f"error: --format must be 'text' or 'json' (got {format!r})"])
    compiled = _compile(spec)
    if diff is not None:
        from llmc.emit.lock import diff_lock
        from llmc.lockfile import read_lock

        try:
            old = read_lock(diff)
        except ValueError as e:
            _fail([f"{diff}: error[X001] {e}"])
        typer.echo(diff_lock(old, compiled, fmt=format))
        return
    if format == "json":
        typer.echo(json.dumps(compiled.to_json(), indent=2, sort_keys=True))
    else:
        from llmc import report  # rich: imported only for the text report

        report.print_report(compiled)


@app.command()
def build(
    spec: Annotated[Path, typer.Argument(help="Run spec (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default build/<name>).")] = None,
) -> None:
    """Compile the spec and write the deterministic job artifacts (atomically)."""
    compiled = _compile(spec)
    from llmc.diagnostics import SpecError
    from llmc.emit import build_warnings, render_artifacts

    try:
        files = render_artifacts(compiled)
    except SpecError as e:
        _fail([d.render() for d in e.diagnostics])
    out = out or Path("build") / compiled.spec.name
    _write_tree_atomic(out, files)
    for d in build_warnings(compiled):
        typer.echo(d.render(), err=True)
    typer.echo(f"wrote {len(files)} files to {out}")
    for name in sorted(files):
        typer.echo(f"  {name}")


def _write_tree_atomic(out: Path, files: dict[str, str]) -> None:
    """Write all files into a temp dir next to ``out``, then swap it in; nothing half-written."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, text in files.items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            if name.endswith(".sh") or name.endswith(".sbatch"):
                p.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@app.command()
def launch(
    build_dir: Annotated[Path, typer.Argument(help="A directory written by `llmc build`.")],
    backend: Annotated[str | None, typer.Option(
        help="native, torchtitan or deepspeed (default: native, or torchtitan when the plan uses pp/cp/ep)")] = None,
    nproc: Annotated[int | None, typer.Option(help="Processes per node (default: from the plan, or 1 on CPU).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact command and exit.")] = False,
    stage: Annotated[str | None, typer.Option(help="Run only this stage.")] = None,
) -> None:
    """Run a built job: torchrun for native/torchtitan, the deepspeed launcher for DeepSpeed."""
    from llmc.launch import LaunchError, launch_commands

    try:
        cmds = launch_commands(build_dir, backend=backend, nproc=nproc, stage=stage)
    except LaunchError as e:
        _fail([f"{build_dir}: error[L001] {e}"])
    import shlex

    for c in cmds:
        typer.echo("+ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items()) + (" " if c.env else "")
                   + shlex.join(c.argv))
        if dry_run:
            continue
        if c.skip_reason:
            typer.echo(f"  skipped: {c.skip_reason}")
            continue
        rc = _run_child(c.argv, env={**os.environ, **c.env}, cwd=c.cwd)
        if rc != 0:
            _fail([f"{build_dir}: error[L002] stage {c.stage!r} exited with code {rc}"])


def _run_child(argv: list[str], env: dict, cwd) -> int:
    """Run one launch command in its own process group; if llmc is interrupted or terminated, the
    whole group (torchrun / deepspeed and their workers) is stopped too, so nothing is left behind."""
    import signal
    import subprocess

    proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True)

    def stop(signum, _frame):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    except SystemExit:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the run spec (for editor completion)."""
    from llmc.spec.load import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@app.command()
def presets() -> None:
    """List the built-in model presets."""
    from llmc.spec.presets import PRESETS

    for name in sorted(PRESETS):
        typer.echo(name)


@app.command()
def gpus() -> None:
    """List the hardware table."""
    from llmc.compiler.hardware import GPUS

    for key, g in sorted(GPUS.items()):
        typer.echo(f"{key:12s} {g.name}")


def main() -> None:
    """Console entry point: user errors exit 1 with one line; never a traceback unless LLMC_DEBUG=1."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # unreadable spec, unwritable output dir, full disk ...
        if os.environ.get("LLMC_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        typer.echo(f"{where}error[IO] {e.strerror or e} (check the path and its permissions)", err=True)
        sys.exit(1)
    except Exception as e:  # a bug in llmc, not in the spec: still one line, with a way to see more
        if os.environ.get("LLMC_DEBUG"):
            raise
        typer.echo(f"error[INTERNAL] {type(e).__name__}: {e} (this is a bug in llmc; rerun with "
                   "LLMC_DEBUG=1 for the traceback and please report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
