"""llmc command line: plan | build | launch | report | calibrate | export | schema | presets | gpus.

Thin by design: load, compile, render, print or write, exit. Exit status: 0 ok; 1 for every error, command-line
misuse included (an unknown option or command, a missing argument, a bad value: one ``error[CLI]`` line), as for
``IO`` and ``INTERNAL`` errors; 75 when ``llmc launch`` stopped a preempted stage after it saved its step (the same
command resumes it); 130 on Ctrl-C.
This is the only module that writes files. User errors never show a traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

if TYPE_CHECKING:
    import typer

    SetOpt = Annotated[list[str] | None, typer.Option()]  # the real ones: _app()
    FitOpt = Annotated[bool, typer.Option()]
    CalOpt = Annotated[Path | None, typer.Option()]

# typer (and its click and pydantic adapters) is imported when the app is first needed (``app``, any
# command but a plain ``llmc plan``): about a tenth of a ~0.3 s `llmc plan`. ``main`` runs ``plan`` with the
# options it can read unambiguously (:func:`_plan_argv`) without it; everything else goes to typer.
_APP = None
_COMMANDS: list = []  # (function, app.command keyword arguments), in definition order


def _command(**kwargs):
    """``@app.command(**kwargs)``, registered when the app is built (:func:`_app`)."""

    def register(fn):
        _COMMANDS.append((fn, kwargs))
        return fn

    return register


def _app():
    global _APP
    if _APP is None:
        import typer as typer_mod

        # the commands' bodies and their (string) annotations name these module globals
        globals().update(
            typer=typer_mod,
            SetOpt=Annotated[list[str] | None, typer_mod.Option(
                "--set", help="Override a spec field before validation: key.path=value (YAML scalar); repeatable.")],
            FitOpt=Annotated[bool, typer_mod.Option("--no-fit-check",
                                                    help="Search as if every layout fitted in memory.")],
            CalOpt=Annotated[Path | None, typer_mod.Option(
                "--calibration", help="Calibration JSON from `llmc calibrate` (overrides the spec's calibration:).")],
        )
        app = typer_mod.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                              help="llmc: a declarative config compiler for LLM training runs.")
        for fn, kwargs in _COMMANDS:
            app.command(**kwargs)(fn)
        _APP = app
    return _APP


def __getattr__(name: str):
    if name == "app":  # ``from llmc.cli import app`` (tests, typer.testing.CliRunner)
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _echo(text: str, err: bool = False) -> None:
    """``typer.echo`` for the plain text llmc prints: the line, a newline, flushed."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


#: Longest error line printed (a 900 KB name quoted in full would bury everything else)
MAX_ERROR_LINE = 2000


def _one_line(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (a path holding a newline or a terminal
    escape sequence stays one inert line), its middle cut past :data:`MAX_ERROR_LINE` characters."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(text) > MAX_ERROR_LINE:
        half = MAX_ERROR_LINE // 2
        text = f"{text[:half]} ... [{len(text) - 2 * half:,} characters cut] ... {text[-half:]}"
    return text


def _fail(lines: list[str]) -> None:
    for line in lines:
        _echo(_one_line(line), err=True)
    raise SystemExit(1)  # what typer.Exit(1) becomes


#: Version of the ``llmc plan --format json`` report document (``schema_version``): bumped when a field is removed or
#: changes meaning; a new field does not bump it. Every report and error document has ``ok`` (false exactly when the
#: command exits 1), ``schema_version``, ``llmc_version``, ``spec`` (the same keys on failure, null where not known)
#: and ``diagnostics`` (all of them, warnings and infos too); a plan with errors is the whole report with ``ok`` false.
PLAN_SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _Planned:
    """What loading and compiling a spec found (:func:`_planned`).

    ``compiled``: a valid spec's compiled plan, calibrated as asked (its numbers are the report's), with every
    diagnostic; None when the spec is invalid (a best-effort spec's numbers mean nothing) or its calibration could
    not be read. ``diagnostics``: every diagnostic of every phase, located and sorted (errors first).
    """

    spec: Path
    sets: list[str] | None  # the --set overrides as given
    loaded: object | None  # llmc.spec.load.LoadedSpec; None when no spec was read (an unreadable --set)
    compiled: object | None  # llmc.compiler.result.Compiled
    diagnostics: list


def _planned(spec: Path, sets: list[str] | None = None, *, fit_check: bool = True,
             calibration: Path | None = None) -> _Planned:
    """Load (with --set overrides) + compile, collecting every error of every phase (nothing printed).

    The spec is read once (``read_spec``: ``-`` is standard input) and its bytes are what the lock's
    sha256 records; the overrides are appended to them. A spec with schema errors is still compiled from
    its best-effort version, so the plan errors that do not depend on the invalid values show too. A
    calibration that cannot be read is an error (K007) beside the others, which are those of the plan
    without it.
    """
    from llmc.compiler.compile import compile_loaded
    from llmc.diagnostics import Diagnostic, sort_diagnostics
    from llmc.spec.facts import gather_facts

    overrides = []
    if sets:
        from llmc.overrides import OverrideError, locate, parse_override, read_with_overrides

        bad = []
        for text in sets:
            try:
                overrides.append(parse_override(text))
            except OverrideError as e:  # located like every other spec error: "--set 'TEXT': error[S001] ..."
                bad.append(Diagnostic(code=e.code, severity="error", path="", message=e.why, file=e.where))
        if bad:  # the spec with some overrides left out is another spec: nothing more to check
            return _Planned(spec, sets, None, None, bad)
        loaded = read_with_overrides(spec, overrides)
    else:
        from llmc.spec.load import read_spec

        loaded = read_spec(spec)
    base = loaded.run or loaded.partial
    cal, cal_error = _calibration(spec, loaded, base, calibration) if base is not None else (None, None)
    out = compile_loaded(loaded, facts=gather_facts(base, loaded.base_dir) if base is not None else None,
                         calibration=cal, fit_check=fit_check)
    compiled = out.compiled if loaded.run is not None and cal_error is None else None
    diags = list(out.diagnostics)
    if sets:  # the compiler's diagnostics about an overridden value name the override, not the file's line
        diags = [locate(d, overrides, loaded.lines) for d in diags]
        if cal_error is not None and calibration is None:  # the spec's calibration: key (or its --set)
            cal_error = locate(cal_error, overrides, loaded.lines)
    if cal_error is not None:
        diags.append(cal_error)
    diags = sort_diagnostics(diags)
    if compiled is not None:  # the report's diagnostics: every one (the loader's too), as located here
        compiled = dataclasses.replace(compiled, diagnostics=diags)
    return _Planned(spec, sets, loaded, compiled, diags)


def _compile(spec: Path, sets: list[str] | None = None, *, fit_check: bool = True,
             calibration: Path | None = None):
    """:func:`_planned`'s compiled plan; on any error, every error line on standard error and exit 1."""
    from llmc.diagnostics import errors

    p = _planned(spec, sets, fit_check=fit_check, calibration=calibration)
    errs = errors(p.diagnostics)
    if errs:
        _fail([d.render() for d in errs])
    return p.compiled


def _spec_json(p: _Planned | None, spec: Path) -> dict:
    """The failure document's ``spec``: the success document's keys (``Compiled.to_json``), null where not known."""
    from llmc.compiler.compile import spec_sha256  # (the lock's spec.sha256: one definition)

    loaded = p.loaded if p is not None else None
    run = getattr(loaded, "run", None)
    given = list(getattr(loaded, "overrides", None) or (p.sets if p is not None else None) or [])
    return {"path": loaded.file if loaded is not None else str(spec),
            "sha256": spec_sha256(None, loaded.spec_bytes) if loaded is not None and loaded.spec_bytes
            else None,
            "file_sha256": getattr(loaded, "spec_file_sha256", None),
            "overrides": given,
            "name": run.name if run is not None else None,
            "resolved": run.model_dump(mode="json") if run is not None else None}


def _plan_document(compiled, ok: bool) -> dict:
    """The plan report as JSON (``Compiled.to_json``) with ``ok`` and ``schema_version``."""
    return {**compiled.to_json(), "ok": ok, "schema_version": PLAN_SCHEMA_VERSION}


def _failure_document(p: _Planned | None, spec: Path, diags) -> dict:
    """``llmc plan --format json`` when there is no plan to report: ``ok`` false and every diagnostic."""
    import llmc

    return {"ok": False, "schema_version": PLAN_SCHEMA_VERSION, "llmc_version": llmc.__version__,
            "spec": _spec_json(p, spec), "diagnostics": [d.to_json() for d in diags]}


def _json_text(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)


def _exception_diagnostic(e: Exception):
    """The error ``main`` prints for an exception that ends a command (``error[IO]``, ``error[INTERNAL]``), as a
    Diagnostic for the JSON document (``main`` still prints its line)."""
    from llmc.diagnostics import Diagnostic

    if isinstance(e, OSError):
        return Diagnostic(code="IO", severity="error", path="", message=str(e.strerror or e),
                          hint="check the path and its permissions", file=getattr(e, "filename", None) or None)
    return Diagnostic(code="INTERNAL", severity="error", path="", message=f"{type(e).__name__}: {e}",
                      hint="this is a bug in llmc; rerun with LLMC_DEBUG=1 for the traceback and please report it")


def _calibration(spec: Path, loaded, run, option: Path | None):
    """(the Calibration named by --calibration (relative to the cwd) or the spec's ``calibration:`` (relative to the
    spec file), None) -- (None, None) when neither is given, (None, the K007 Diagnostic) when it cannot be read:
    located in the file given with --calibration, at the spec's ``calibration:`` line for the spec's own."""
    if option is None and not run.calibration:
        return None, None
    from llmc.diagnostics import Diagnostic, line_for
    from llmc.measurements import MeasurementError, load_calibration

    # which file the plan and the lock were made with (the lock records the factors themselves); a lock is committed:
    # the spec's relative path as it is, else (--calibration, relative to the working directory, or an absolute path)
    # the file name only
    given = str(option) if option is not None else str(run.calibration)
    named = given if option is None and not Path(given).is_absolute() else Path(given).name
    try:
        if option is not None:
            return load_calibration(option, record_as=named), None
        return load_calibration(run.calibration, str(spec), record_as=named), None
    except MeasurementError as e:
        if option is not None:  # "FILE[:LINE]: error[K007] PATH: MESSAGE (HINT)", as MeasurementError.located()
            return None, Diagnostic(code=e.code, severity="error", path=e.path, message=e.message, hint=e.hint,
                                    line=e.line or None, file=e.file)
        where = f"{e.file}:{e.line}" if e.line else e.file
        inner = f"{e.path}: " if e.path and e.path != "calibration" else ""
        return None, Diagnostic(code=e.code, severity="error", path="calibration", message=f"{where}: {inner}{e.message}",
                                hint=e.hint, line=line_for(loaded.lines, "calibration"), file=loaded.file)


@_command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Run spec (YAML).")],
    format: Annotated[str, typer.Option("--format", "-f", help="text or json")] = "text",
    diff: Annotated[Path | None, typer.Option("--diff", help="Compare with an earlier plan.lock.json.")] = None,
    set_: SetOpt = None,
    no_fit_check: FitOpt = False,
    calibration: CalOpt = None,
) -> None:
    """Validate the spec, do the math, search a parallelism plan and print the report."""
    if format not in ("text", "json"):
        _fail([f"llmc plan: error[CLI] --format must be 'text' or 'json' (got {format!r}) (see `llmc plan --help`)"])
    if format == "text":
        _plan(spec, diff, set_, not no_fit_check, calibration, None)
        return
    # --format json: exactly one JSON document on standard output, whatever ends the command (a program reads it)
    state: dict = {"printed": False, "planned": None}
    try:
        _plan(spec, diff, set_, not no_fit_check, calibration, state)
    except Exception as e:  # main prints its error[IO] / error[INTERNAL] line
        if not state["printed"]:
            state["printed"] = True
            _echo(_json_text(_failure_document(state["planned"], spec, [_exception_diagnostic(e)])))
        raise


def _plan(spec: Path, diff: Path | None, sets: list[str] | None, fit_check: bool, calibration: Path | None,
          state: dict | None) -> None:
    """``llmc plan``; ``state`` (--format json): None for the text report, else ``printed`` (set once the document
    is on standard output) and ``planned`` (what was compiled, for a document about a later failure)."""
    from llmc.diagnostics import errors, sort_diagnostics

    def out(text: str) -> None:
        if state is not None:
            state["printed"] = True
        _echo(text)

    def failed(p: _Planned, diags) -> None:  # no plan to report: the error lines, and the JSON document
        if state is not None:
            out(_json_text(_failure_document(p, spec, diags)))
        _fail([d.render() for d in errors(diags)])

    p = _planned(spec, sets, fit_check=fit_check, calibration=calibration)
    if state is not None:
        state["planned"] = p
    compiled = p.compiled
    errs = errors(p.diagnostics)
    if errs and compiled is None:
        failed(p, p.diagnostics)
    if errs:  # a valid spec's plan with errors (over budget, nothing fits, ...): the whole report, then exit 1
        if state is not None:
            out(_json_text(_plan_document(compiled, ok=False)))
        else:
            from llmc import report

            report.print_report(compiled)
        _fail([d.render() for d in errs])
    if diff is not None:
        from llmc.diagnostics import Diagnostic
        from llmc.emit.lock import diff_lock
        from llmc.lockfile import read_lock

        def bad_lock(message: str, hint: str = "") -> None:
            failed(p, sort_diagnostics([*p.diagnostics, Diagnostic(
                code="X001", severity="error", path="", message=message, hint=hint, file=str(diff))]))

        try:
            old = read_lock(diff)
        except ValueError as e:
            bad_lock(str(e))
        # the spec path as a build next to that lock would record it (relative to the lock's folder)
        here = _for_build(compiled, spec, diff.resolve().parent)
        try:
            text = diff_lock(old, here, fmt="json" if state is not None else "text")
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            bad_lock(f"malformed lockfile: {type(e).__name__}: {e}", "rebuild it with `llmc build`")
        if state is not None:  # every document of `llmc plan --format json` says whether it failed
            text = json.dumps({**json.loads(text), "ok": True, "schema_version": PLAN_SCHEMA_VERSION}, indent=2,
                              sort_keys=True, default=str)
        out(text)
        return
    if state is not None:
        out(_json_text(_plan_document(compiled, ok=True)))
    else:
        from llmc import report  # rich: imported only for the text report

        report.print_report(compiled)


def _for_build(compiled, spec: Path, build_dir: Path):
    """The compiled run as its build records it: the spec path relative to the build directory, so no
    artifact depends on the directory ``llmc build`` ran from. A spec read as standard input (``-``, ``/dev/stdin``,
    ``<(command)``: ``llmc.spec.load.reads_stdin``) is recorded
    as :data:`~llmc.spec.load.STDIN_SPEC`, its relative paths resolving against the current directory (as
    ``llmc.spec.load.spec_base_dir`` read them), recorded relative to the build directory (``Compiled.spec_dir``)."""
    import dataclasses

    from llmc.spec.load import STDIN_SPEC, reads_stdin

    if reads_stdin(spec):
        where = Path(os.path.relpath(Path.cwd().resolve(), build_dir.resolve())).as_posix()
        rel, folder = STDIN_SPEC, where
    else:
        rel, folder = Path(os.path.relpath(spec.resolve(), build_dir.resolve())).as_posix(), None
    diags = [dataclasses.replace(d, file=rel) if d.file == compiled.spec_path else d for d in compiled.diagnostics]
    return dataclasses.replace(compiled, spec_path=rel, spec_dir=folder, diagnostics=diags)


@_command()
def build(
    spec: Annotated[Path, typer.Argument(help="Run spec (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default build/<name>).")] = None,
    set_: SetOpt = None,
    no_fit_check: FitOpt = False,
    calibration: CalOpt = None,
) -> None:
    """Compile the spec and write the deterministic job artifacts (crash-safe; only llmc's own files)."""
    from llmc.buildfs import BuildDirError, write_build

    if out is not None and out.exists() and not out.is_dir():
        _fail([f"{out}: error[X011] -o names a file, not a directory (give the build directory to write)"])
    compiled = _compile(spec, set_, fit_check=not no_fit_check, calibration=calibration)
    from llmc.diagnostics import SpecError
    from llmc.emit import build_warnings, render_artifacts

    out = out or Path("build") / compiled.spec.name
    here = _for_build(compiled, spec, out)
    try:
        files = render_artifacts(here)
    except SpecError as e:
        _fail([d.render() for d in e.diagnostics])
    held = _hold_run_locks(out)  # a launch (or trainer) running this build: refused; none starts while it is written
    try:
        res = write_build(out, files, protect=[spec])
    except BuildDirError as e:
        msg, where, root = e.message, out, str(out.resolve())  # the line names the directory as given
        if msg.startswith(root + ": "):
            msg = msg[len(root) + 2:]
        elif msg.startswith(root + "/") and ": " in msg:
            rel, msg = msg[len(root) + 1:].split(": ", 1)
            where = out / rel
        _fail([f"{where}: error[X010] {msg}" + (f" ({e.hint})" if e.hint else "")])
    finally:
        for lk in held:
            lk.release()
    # the plan's warnings too (a setting the chosen backend does not run, T013; a budget, B005; ...): a build is
    # often made without reading `llmc plan`, and these say what will not run as the spec reads
    for d in [d for d in compiled.diagnostics if d.severity == "warning"] + build_warnings(compiled):
        typer.echo(d.render(), err=True)
    typer.echo(f"wrote {len(res.written)} of {len(files)} files to {out}"
               + (f" ({len(res.unchanged)} unchanged)" if res.unchanged else "")
               + (f", removed {len(res.removed)} stale" if res.removed else ""))
    for rel in res.kept:
        typer.echo(f"{out / rel}: warning[X012] kept: no longer written by this build, but edited since llmc "
                   "wrote it (or no longer a file); it is yours now", err=True)
    for line in _stale_runs(out, files.get("plan.lock.json")) + _unresumable_runs(out):
        _echo(_one_line(line), err=True)
    for name in sorted(files):
        typer.echo(f"  {name}")


def _hold_run_locks(out: Path) -> list:
    """The run locks of ``out``'s run directory (``run/.lock``, ``llmc launch``'s, and ``run/<stage>/.lock``, a trainer's
    rank 0's: ``llmc.runtime.runlock.RunLock``) that exist, held, so that no launch starts on a half-written build;
    a lock a live process holds (a launch or a trainer running this build) stops the build with one line naming it
    (error X015): rewriting the lock and artifacts under a running launch makes its next stage fail."""
    from llmc.runtime.runlock import LOCK_NAME, RunLock, RunLockBusy, held_by

    run = out / "run"
    try:
        dirs = [run, *sorted(p for p in run.iterdir() if p.is_dir() and not p.is_symlink())] if run.is_dir() else []
    except OSError:
        dirs = [run]
    held: list = []
    for d in dirs:
        f = d / LOCK_NAME
        if not f.is_file() or f.is_symlink():
            continue
        try:
            held.append(RunLock(d).acquire())
            continue
        except RunLockBusy:
            who = held_by(d) or "another process (holder not recorded yet)"
        except OSError:  # (cannot take it, e.g. a read-only run directory: only a live holder stops the build)
            who = held_by(d)
            if who is None:
                continue
        for lk in held:
            lk.release()
        what = "an `llmc launch` of this build" if d == run else f"a trainer of stage {d.name!r}"
        _fail([f"{f}: error[X015] {what} is running ({who}): rebuilding would change the build under it (wait for "
               f"it to finish, stop it, or build into another directory with -o)"])
    return held


def _stale_runs(out: Path, lock_text: str | bytes | None) -> list[str]:
    """Warnings for the stages in ``out/run`` that finished under another lock than the one just built: the next
    ``llmc launch`` refuses them (``llmc.runtime.job.finished_stage``)."""
    if lock_text is None or not (out / "run").is_dir():
        return []
    from llmc.runtime.job import FINISHED_HOW, finished_stage, rerun_command, trained_options

    lock = json.loads(lock_text)
    lines = []
    for e in lock.get("stages") or []:
        name = e.get("name") if isinstance(e, dict) else None
        f = finished_stage(lock, str(name), out / "run" / str(name), export=True, build_dir=out) if name else None
        if f is not None and f.change is not None:
            what = FINISHED_HOW[f.cause]
            rerun = rerun_command(out, str(name), trained_options(f, out, lock))  # (where it trained)
            pins = (f"; or, if the spec is unchanged, pin {' and '.join(f'`{p}`' for p in f.pins)} in it and "
                    "rebuild: the finished run stays valid") if f.pins else ""
            lines.append(f"{out / 'run' / str(name)}: warning[X013] stage {name!r} finished {what} "
                         f"({f.change}): the next `llmc launch` refuses it (`{rerun}` sets it and the stages after it "
                         f"aside and trains them again; the stages before it stay){pins}")
    return lines


def _unresumable_runs(out: Path) -> list[str]:
    """Warnings (X017) for the unfinished runs in the build directory ``out`` (just written) that the next ``llmc
    launch`` refuses to resume: X013's sibling for stages not finished. Each backend whose checkpoints are there
    (llmc's in ``run/<stage>/``, torchtitan's in ``outputs/``) is asked as its launch would be
    (``llmc.resume.resumptions``), so the line is the launch's refusal."""
    from llmc.launch import LaunchError, _launched_backend, launch_commands, load_build
    from llmc.resume import resumptions
    from llmc.runtime.job import LaunchOptions

    if not any((out / "run").glob("*/*/step-*")) and not any((out / "outputs").glob("torchtitan*/*/step-*")):
        return []  # (no checkpoint anywhere: nothing to resume; the common case reads nothing more)
    lines, seen = [], set()
    try:
        b, lock = load_build(out)
        default = _launched_backend(b, lock, None)
    except (LaunchError, KeyError, TypeError, ValueError, AttributeError):
        return []
    for backend in ("native", "torchtitan"):  # (a DeepSpeed checkpoint's state is checked as DeepSpeed loads it)
        opts = LaunchOptions(backend=backend if backend != default else None)  # (what its commands carry)
        try:
            found = resumptions(out, launch_commands(out, backend=backend, options=opts), opts)
        except (LaunchError, OSError):
            continue  # (a backend this build has no artifacts for, or one the launch refuses for its own reasons)
        for r in found:
            if r.refusal and (r.stage, r.checkpoint) not in seen:
                seen.add((r.stage, r.checkpoint))
                how = f" --backend {backend}" if backend != default else ""
                # (the refusal names the stage and its unfinished run)
                lines.append(f"{r.checkpoint}: warning[X017] the next `llmc launch{how}` refuses to resume this: "
                             f"{r.refusal}")
    return lines




@_command()
def launch(
    build_dir: Annotated[str, typer.Argument(help="A directory written by `llmc build`.")],
    backend: Annotated[str | None, typer.Option(
        help="native, torchtitan or deepspeed (default: the backend the plan was computed for)")] = None,
    nproc: Annotated[int | None, typer.Option(help="Processes per node (default: from the plan; a CPU build: its world size). Only the plan's count, unless every stage run is a native post-training one.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the exact command and exit.")] = False,
    stage: Annotated[str | None, typer.Option(help="Run only this stage.")] = None,
    from_stage: Annotated[str | None, typer.Option(
        "--from", help="Run this stage and every stage after it in the run order (with --no-resume: each of them "
        "set aside first and trained again).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Launch even if plan.lock.json was edited by hand.")] = False,
    allow_edited: Annotated[bool, typer.Option(
        "--allow-edited", help="Run a torchtitan job or DeepSpeed config edited since `llmc build` wrote it (warned).")
    ] = False,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Start the stages over: their earlier runs, finished "
                                            "ones too, are set aside (run/<stage>.set-aside-N, with the tokenizer they "
                                            "trained with), never deleted.")] = False,
    fallback_checkpoint: Annotated[bool, typer.Option(
        "--fallback-checkpoint", help="Resume from the newest checkpoint that verifies, walking back past a damaged "
        "newer one (llmc's trainer; without it a damaged newest checkpoint stops the stage).")] = False,
) -> None:
    """Run a built job on this node: prepare, then each stage under torchrun (native, torchtitan and DeepSpeed alike).

    For a run over several nodes, use the build's scripts: launch/, torchtitan/, or deepspeed/launch.sh with a HOSTFILE (the DeepSpeed launcher).

    One launch per build at a time; stages run in order and finished ones are skipped, so after a failure, fix the cause and run the same command again. A stage finished under another lock (a build directory rebuilt from another spec) is refused, never skipped or trained over: --no-resume --from STAGE sets it and the stages after it aside and trains them again.

    A SIGTERM or SIGUSR1 (a preemption, a time limit) makes llmc's runtime save the step it is on; the launch then exits 75 and the same command resumes from that step."""
    from llmc.buildfs import BuildDirError, recover
    from llmc.launch import (
        LaunchError,
        check_lock_integrity,
        disk_warning,
        edited_artifacts,
        launch_commands,
        load_build,
        nproc_problem,
        preemption_times,
        resume_checkpoint,
        software_warning,
        spec_change_warning,
        start_stage,
        unfit_warning,
    )
    from llmc.resume import resumptions

    if not build_dir:  # (a Path would read '' as '.')
        _fail(["error[L001] no build directory given (an empty path; name the directory `llmc build -o` wrote)"])
    build_dir = Path(build_dir)
    from llmc.runtime.job import LaunchOptions, launch_command

    # what every command this launch prints carries of it (llmc.runtime.job.launch_command): its skip and refusal
    # lines, and what a failure tells the user to run: this command again (nothing of it ran yet), or it without
    # --no-resume (to resume what it trained: its stages set aside once, the rerun skips the finished ones)
    options = LaunchOptions(backend=backend, nproc=nproc, force=force, allow_edited=allow_edited)
    same = {"stage": stage, "from_stage": from_stage, "fallback_checkpoint": fallback_checkpoint}
    again, resume_cmd = (launch_command(build_dir, options, no_resume=no_resume, **same),
                         launch_command(build_dir, options, **same))
    try:
        if build_dir.is_dir():
            recover(build_dir)
        problem = check_lock_integrity(build_dir)
        if problem and not force:
            raise LaunchError(f"{problem} (rebuild with `llmc build`, or pass --force to launch it as it is)")
        if problem:
            typer.echo(f"{build_dir}: warning[L004] {problem}; launching anyway (--force)", err=True)
        cmds = launch_commands(build_dir, backend=backend, nproc=nproc, stage=stage,
                               fallback_checkpoint=fallback_checkpoint, from_stage=from_stage, options=options)
        # a process count the plan's layout cannot run on: refused now, not by the trainer after prepare
        wrong_nproc = nproc_problem(build_dir, cmds, nproc)
        if wrong_nproc:
            raise LaunchError(wrong_nproc)
        # after a SIGTERM / SIGINT / SIGUSR1 llmc passes on, a stage's trainers save their current step
        # (llmc.runtime.preempt, the torchtitan job's PreemptibleTrainer): torchrun allows them the plan's shutdown
        # time (unless the environment sets its own) and llmc waits longer than that before it kills the stage
        built = load_build(build_dir)[1]
        shutdown, wait = preemption_times(built, os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
        # the spec at the lock's path changed since the build (L009): launched as built, with the command to rebuild
        spec_changed = spec_change_warning(build_dir, built)
    except (LaunchError, BuildDirError) as e:
        _fail([f"{build_dir}: error[L001] {e}"])
    import shlex

    # artifacts the commands run that were edited after `llmc build` wrote them (the lock: L001 above)
    edited = edited_artifacts(build_dir, cmds)
    if edited and not allow_edited:
        _fail([f"{build_dir / rel}: error[L006] changed since `llmc build` wrote it ({why}, in .llmc-build.json): "
               "launching would run what the compiler never produced (rebuild with `llmc build`, or pass "
               "--allow-edited to run it as it is)" for rel, why in edited])
    for rel, why in edited:
        _echo(_one_line(f"{build_dir / rel}: warning[L007] changed since `llmc build` wrote it ({why}); "
                        "running it as it is (--allow-edited)"), err=True)
    # stages finished under another lock: refused (--no-resume sets them aside below, before anything runs)
    stale = [c for c in cmds if c.stale]
    if stale and not no_resume:
        _fail([f"{build_dir}: error[L005] {c.stale}" for c in stale])
    # each stage's unfinished run: resumed from its newest checkpoint (said), or refused now, before prepare, with
    # what its launch or trainer would stop on after it (L005: a torchtitan run started under another lock; L018: a
    # checkpoint this build cannot continue); --no-resume sets those runs aside instead
    resumed = []
    if not no_resume:
        try:
            resumed = resumptions(build_dir, cmds, options)
        except LaunchError as e:
            _fail([f"{build_dir}: error[L001] {e}"])
    refused = [r for r in resumed if r.refusal]
    if refused:
        _fail([_one_line(f"{build_dir}: error[L005] {r.refusal}" if r.lock_change else
                         f"{build_dir}: error[L018] {r.refusal}") for r in refused])
    for c in cmds:
        if c.legacy:
            _echo(_one_line(f"{build_dir}: warning[L008] {c.legacy}"), err=True)
    if spec_changed:
        _echo(_one_line(spec_changed), err=True)
    # pre-training on a backend whose run the compiler found not to fit the GPU (L015): said, not refused
    unfit = unfit_warning(build_dir, cmds, backend)
    if unfit:
        _echo(_one_line(unfit), err=True)
    # torch (or the launched backend's library) another release than the build targets (L017): said, not refused
    versions = software_warning(build_dir, cmds, backend)
    if versions:
        _echo(_one_line(versions), err=True)
    # less free space where run/ is than the stages it runs keep at their peak, the lock's figures (L019): said
    short = disk_warning(build_dir, cmds, built, resume=not no_resume)
    if short:
        _echo(_one_line(short), err=True)
    for note in (n for c in cmds for n in c.notes):  # a link on the run's write path it allows (a scratch disk)
        _echo(note, err=True)
    for r in resumed:
        _echo(_one_line(f"{build_dir}: note: {r.note()}"), err=True)
    for c in cmds:
        typer.echo("+ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items()) + (" " if c.env else "")
                   + shlex.join(c.argv))
    if dry_run:
        return
    # eval.tasks' registered names against lm-evaluation-harness's task index, once, before any training (L016)
    from llmc.launch import check_eval_tasks

    unknown, uncached = check_eval_tasks(build_dir, cmds)
    for line in uncached:
        _echo(_one_line(line), err=True)
    if unknown:
        _fail(unknown)
    from llmc.runtime.runlock import EXIT_PREEMPTED, RunLock, RunLockBusy

    b = build_dir.resolve()
    try:
        lock = RunLock(b / "run").acquire()
    except RunLockBusy as e:
        _fail([f"{build_dir}: error[L003] {e}"])
    except OSError as e:
        _fail([_write_failure(e, build_dir, None, "the run lock (its holder's record)", cmds, rerun=again)])
    if no_resume:  # under the run lock: set every stage this launch runs aside, then plan the commands again
        from llmc.fileio import set_aside
        from llmc.runtime.job import set_stage_aside

        for name in dict.fromkeys(c.stage for c in cmds if c.stage and c.stage != "prepare" and "/" not in c.stage):
            # (before this launch's prepare: a run that kept no tokenizer of its own takes the one it trained with)
            try:
                moved = set_stage_aside(b / "run" / name, b / "assets")
            except OSError as e:
                lock.release()
                _fail([_write_failure(e, build_dir, name, "its earlier run, setting it aside (--no-resume)", cmds,
                                      b / "run" / name, rerun=again)])
            if moved is not None:
                _echo(f"{name}: the earlier run is set aside in {os.path.relpath(moved)}")
        # a torchtitan stage's checkpoints, which its job would resume from, go aside with it
        for dump in dict.fromkeys(c.dump_dir for c in cmds if c.dump_dir):
            try:
                moved = set_aside(dump)
            except OSError as e:
                lock.release()
                _fail([_write_failure(e, build_dir, None, "the torchtitan checkpoints, setting them aside "
                                      "(--no-resume)", cmds, dump, rerun=again)])
            if moved is not None:
                _echo(f"{os.path.relpath(dump)}: its torchtitan checkpoints are set aside in {os.path.relpath(moved)}")
        try:
            cmds = launch_commands(build_dir, backend=backend, nproc=nproc, stage=stage,
                                   fallback_checkpoint=fallback_checkpoint, from_stage=from_stage, options=options)
        except LaunchError as e:
            lock.release()
            _fail([f"{build_dir}: error[L001] {e}"])
        if any(c.stale for c in cmds):  # (a stage that starts from one this launch does not run: --stage)
            lock.release()
            _fail([f"{build_dir}: error[L005] {c.stale}" for c in cmds if c.stale])
    try:
        for c in cmds:
            if c.skip_reason:
                typer.echo(f"{c.stage}: skipped: {c.skip_reason}")
                continue
            try:
                start_stage(c, b, options)
            except LaunchError as e:
                lock.release()
                _fail([f"{build_dir}: error[L005] {e}"])
            except OSError as e:
                lock.release()
                _fail([_write_failure(e, build_dir, c.stage, "the stage's folder (its copy of the tokenizer, its "
                                      "record)", cmds, c.stage_dir, rerun=resume_cmd)])
            log = b / "run" / (c.stage if c.stage != "prepare" else ".prepare") / "stderr.log"
            env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown), **os.environ, **c.env}
            try:
                ran = _run_logged(c.argv, env=env, cwd=c.cwd, log=log, grace_s=wait)
            except OSError as e:  # its log could not even be opened (a full disk, a read-only run folder)
                lock.release()
                _fail([_write_failure(e, build_dir, c.stage, "the stage's log", cmds, log, rerun=resume_cmd)])
            rc, cause = ran[0], ran[1]
            how, log_error = getattr(ran, "exit", None), getattr(ran, "log_error", None)
            quoted = resume_cmd  # (the stages this launch runs, resumed: finished ones skipped)
            rel = os.path.relpath(log)
            if log_error is not None:
                rel += f", incomplete: writing it failed ({log_error.strerror or log_error})"
            if rc == EXIT_PREEMPTED:  # every rank reported it saved a checkpoint of its current step, then stopped
                saved = resume_checkpoint(c.checkpoints)
                _echo(_one_line(f"{build_dir}: stage {c.stage!r} preempted: stopped by a signal (a preemption, the "
                                f"time limit or a cancel) after saving its current step"
                                + (f" ({os.path.relpath(saved)})" if saved else "")
                                + f"; rerun `{quoted}` to resume from it"), err=True)
                raise SystemExit(EXIT_PREEMPTED)
            if rc != 0 and how is not None and how.signals and c.checkpoints:
                # a stop was passed on, but not every rank reported saving its step (a hung or killed rank): not
                # preempted, whatever the launcher's own status; what a rerun resumes from is the newest checkpoint
                saved = resume_checkpoint(c.checkpoints)
                told = (f"{len(how.reported)} of {how.world} ranks reported"
                        + (f" ({', '.join(f'rank {r}: exit {x}' for r, x in sorted(how.reported.items()))})"
                           if how.reported else "")) if how.reported else "no rank reported"
                resume = (f"rerun `{quoted}` to resume from {os.path.relpath(saved)}, the newest "
                          "complete checkpoint (later steps are lost)" if saved else
                          f"no complete checkpoint in {os.path.relpath(c.checkpoints)}: rerun `{quoted}` "
                          "to start the stage over")
                _fail([f"{build_dir}: error[L002] stage {c.stage!r} stopped by a signal ({how.signals[0]} passed on) "
                       f"without every rank reporting that it saved its current step ({told}; exit {rc}: {cause}): "
                       f"not counted as preempted; {resume} (full log: {rel})"])
            if rc != 0:
                hint = _space_hint(b, cmds) if _no_space(cause) else ""
                failed = f"stage {c.stage!r} trained; its eval failed" if c.evaluates else f"stage {c.stage!r} failed"
                _fail([f"{build_dir}: error[L002] {failed} (exit {rc}): {cause} "
                       + (f"({hint}) " if hint else "")
                       + f"(fix it and rerun `{quoted}`: finished stages are skipped; full log: {rel})"])
            if log_error is not None:  # it finished, but what it printed could not all be kept
                lock.release()
                _fail([_write_failure(log_error, build_dir, c.stage, "the stage's log (the stage itself "
                                      "finished)", cmds, log, rerun=resume_cmd)])
    finally:
        lock.release()


def _no_space(text: str) -> bool:
    """Does an error line say a file system is full (ENOSPC) or over its quota (EDQUOT)?"""
    return any(w in text for w in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"[Errno {errno.ENOSPC}]",
                                   f"[Errno {errno.EDQUOT}]"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _space_hint(b: Path, cmds) -> str:
    """What a full disk can get back: the unfinished checkpoint folders (``*.tmp``, interrupted saves, never loaded)
    of the stages' checkpoint folders, with their sizes; listed for the user to delete, never deleted here."""
    from llmc.launch import unfinished_checkpoints

    tmps = unfinished_checkpoints(b / "run", [getattr(c, "checkpoints", None) for c in cmds])
    if not tmps:
        return "free space on that file system"
    shown = ", ".join(f"{os.path.relpath(p)} ({_size(n)})" for p, n in tmps[:6])
    more = f" and {len(tmps) - 6} more" if len(tmps) > 6 else ""
    return (f"free space on that file system: unfinished checkpoint folders (interrupted saves, never loaded) hold "
            f"{_size(sum(n for _, n in tmps))} there and may be deleted: {shown}{more}")


def _write_failure(e: OSError, build_dir: Path, stage: str | None, what: str, cmds, path=None,
                   rerun: str | None = None) -> str:
    """The one line for a file ``llmc launch`` itself could not write (its lock, a stage's log or folder): the file,
    the stage, the error and, on a full disk, the space a user may get back (:func:`_space_hint`)."""
    from llmc.runtime.job import launch_command

    where = getattr(e, "filename", None) or path or build_dir
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = _space_hint(Path(build_dir).resolve(), cmds) if full else "check the path and its permissions"
    of = f"stage {stage!r}: " if stage else ""
    return (f"{where}: error[L014] {of}`llmc launch` cannot write {what}: {e.strerror or e} ({hint}; then rerun "
            f"`{rerun or launch_command(build_dir)}`)")


class _StageRun(tuple):
    """What :func:`_run_logged` returns: ``(status, cause)`` (indexable as a pair), with ``exit`` (the
    ``llmc.runtime.runlock.StageExit``: the signals passed on, the ranks' reports) and ``log_error`` (the OSError
    that stopped writing the log, else None) as attributes."""

    def __new__(cls, status: int, cause: str, exit=None, log_error: OSError | None = None):
        t = super().__new__(cls, (status, cause))
        t.exit, t.log_error = exit, log_error
        return t


#: How much of a stage attempt's stderr ``_run_logged`` keeps in memory for its cause line, whatever reaches the log
#: (the tail: llmc's error line, the exception and torchrun's report come last)
_TAIL_BYTES = 4 << 20


def _run_logged(argv: list[str], env: dict, cwd, log: Path, grace_s: float) -> _StageRun:
    """Run one stage command under ``supervise`` (its process group never outlives llmc, even on SIGHUP
    or SIGKILL) with its stderr shown live and appended to ``log``; returns (exit code, the last error
    line of this attempt's stderr), with how it ended (:class:`_StageRun`). A stage whose ranks all reported
    saving their step on a SIGTERM / SIGUSR1 llmc passed on comes back as ``EXIT_PREEMPTED``
    (``supervise_stage``); one that has not exited ``grace_s`` seconds after it is killed. A log that cannot be
    written (a full disk) stops being written, not read: the stage runs on (a pipe nobody reads would block it), its
    cause line comes from the tail kept in memory, and the error comes back as ``log_error``."""
    import threading

    from llmc.launch import StderrRelay
    from llmc.runtime.runlock import supervise_stage

    relay = StderrRelay()  # the terminal gets llmc's lines, not tracebacks or torchrun's report (the log gets all)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    tail = bytearray()
    failed: list[OSError] = []
    f = open(log, "ab", buffering=0)  # unbuffered: a write that fails fails here, not at close
    try:
        r, w = os.pipe()
        saved = os.dup(2)
    except BaseException:
        f.close()
        raise

    def pump() -> None:
        show = True
        while chunk := os.read(r, 65536):
            tail.extend(chunk)
            if len(tail) > _TAIL_BYTES:
                del tail[:len(tail) - _TAIL_BYTES]
            if not failed:
                try:
                    view = memoryview(chunk)
                    while view:  # (a raw write may take part of it)
                        n = f.write(view)
                        if not n:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        view = view[n:]
                except OSError as e:  # ENOSPC carries no file name: the launch names the log
                    failed.append(e)
            if show:
                try:
                    os.write(saved, relay.feed(chunk))
                except OSError:  # the terminal went away (SIGHUP): keep logging
                    show = False

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    os.dup2(w, 2)  # the child inherits the pipe as its stderr
    os.close(w)
    how = None
    try:
        how = supervise_stage(argv, env=env, cwd=cwd, grace_s=grace_s)
    finally:
        rc = how.status if how is not None else 1
        sys.stderr.flush()
        os.dup2(saved, 2)  # drops our copy of the pipe's write end: the pump sees EOF
        t.join(timeout=10)
        if not t.is_alive():
            try:
                os.write(saved, relay.close(failed=rc != 0))
            except OSError:
                pass
        os.close(saved)
        if not t.is_alive():
            os.close(r)
            try:
                f.close()
            except OSError as e:
                failed.append(e)
    return _StageRun(rc, last_error_line(bytes(tail).decode("utf-8", "replace")), how, failed[0] if failed else None)


def last_error_line(text: str) -> str:
    """The line of a child's stderr that says what went wrong, in this order: llmc's own one-line error; the
    signal that ended a worker, when torchrun's failure report names one as the root cause ("Signal 9 (SIGKILL)
    received by PID N": the worker printed nothing, the OOM killer or a user killed it); the last Python
    exception line; the signal that stopped torchrun itself before any worker reported an error (its
    SignalException: a stop passed on while the workers were starting); the status of the report's root-cause
    worker; else the last line that says something (never a separator such as the report's "=====" banner, nor a
    traceback's source or caret line)."""
    import re
    import signal as _signal

    # torch.distributed's excepthook prefixes each line a rank prints of its traceback with "[rankN]: " (as
    # llmc.launch.StderrRelay reads them): the line itself is what follows it
    raw = [re.sub(r"^\[rank\d+\]: ?", "", ln, count=1) for ln in text.splitlines()]
    stopped = [m for ln in raw if (m := re.search(r"SignalException: Process \d+ got signal: (\d+)", ln))]
    # a traceback's quoted source line (indented 4, after its '  File "...", line N' line) and its caret marks say
    # nothing themselves (the exception line that ends the traceback is not indented)
    raw = [ln.strip() for i, ln in enumerate(raw)
           if not (i and raw[i - 1].startswith('  File "') and ln.startswith("    "))
           and not re.fullmatch(r"\s*[\^~]+\s*", ln)]
    # torchrun's wrappers (ChildFailedError, SignalException) repeat after the worker's own error: not the cause
    lines = [ln for ln in raw if ln and "torch.distributed.elastic" not in ln]
    # torchrun's report (torch/distributed/elastic/multiprocessing/errors/__init__.py): "Root Cause (first observed
    # failure):", then "rank : R (local_rank: L)", "exitcode : N (pid: P)" and "traceback : ..." of that worker
    root: dict[str, str] = {}
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Root Cause")]
    for ln in lines[starts[-1] + 1:] if starts else []:
        m = re.match(r"(rank|exitcode|traceback)\s*:\s*(.*)", ln)
        if m and m.group(1) not in root:
            root[m.group(1)] = m.group(2).strip()
        elif not re.search(r"[A-Za-z0-9]", ln) and root:  # the closing banner
            break
    rank = re.match(r"-?\d+", root.get("rank", ""))
    of_rank = f" (rank {rank.group()})" if rank else ""
    patterns = (r"error\[[A-Z]+\d*\]", r"^[\w.]*(Error|Exception|Interrupt)\b.*:", r"^[\w.]*(Error|Exception)\b")
    hits = [ln for ln in lines if re.search(patterns[0], ln)]
    if hits:
        return hits[-1][:400]
    if re.match(r"Signal \d+ \(\w+\) received by PID", root.get("traceback", "")):
        return (root["traceback"] + of_rank)[:400]
    for pat in patterns[1:]:
        hits = [ln for ln in lines if re.search(pat, ln)]
        if hits:
            return hits[-1][:400]
    if stopped:
        n = int(stopped[-1].group(1))
        name = _signal.Signals(n).name if n in {s.value for s in _signal.Signals} else "an unknown signal"
        return f"torchrun got signal {n} ({name}) and stopped its workers before any reported an error"
    code = re.match(r"-?\d+", root.get("exitcode", ""))
    if code:
        return f"a worker{of_rank} exited with status {code.group()} (torchrun's report; it printed no error)"
    said = [ln for ln in lines if re.search(r"[A-Za-z0-9]", ln)]  # not a separator line ("=====", "-----")
    return said[-1][:400] if said else "no error output (see the log)"


@_command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A build directory, or its run/ (or one stage's) directory.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default <run dir>/report).")]
    = None,
) -> None:
    """Plot a run's measured metrics against the build's predictions (PNGs and report.html)."""
    from llmc.lockfile import LOCK_FILE, read_lock
    from llmc.runreport import make_report, read_stages, summary_lines

    rd = run_dir.resolve()
    if (rd / LOCK_FILE).exists():
        build_dir, rd = rd, rd / "run"
    else:
        build_dir = next((p for p in rd.parents if (p / LOCK_FILE).exists()), None)
        if build_dir is None:
            _fail([f"{run_dir}: error[L010] no {LOCK_FILE} here or above (give a build directory or its run/)"])
    try:
        lock = read_lock(build_dir / LOCK_FILE)
    except ValueError as e:
        _fail([f"{build_dir / LOCK_FILE}: error[X001] {e}"])
    from llmc.runtime.metrics_io import MetricsError  # torch-free

    dest = out or rd / "report"
    try:
        stages = read_stages(rd, lock)  # (each metrics.jsonl read once, for the files and the summary)
        paths = make_report(rd, lock, dest, stages)
        skipped: list[str] = []  # run files left out of the report (warnings)
        summary = summary_lines(rd, lock, skipped, stages)  # validation loss first -> last, eval task results
    except FileNotFoundError as e:
        _fail([f"{run_dir}: error[L011] {e}"])
    except MetricsError as e:
        _fail([f"{os.path.relpath(e.path)}:{e.line}: error[L012] metrics record {e.problem} (llmc writes one JSON "
               "object per line: restore or delete that line, then rerun)"])
    typer.echo(f"wrote {len(paths)} files to {dest}")
    for p in paths:
        typer.echo(f"  {p.name}")
    for line in skipped:
        typer.echo(line, err=True)
    for line in summary:
        typer.echo(line)


def _calibration_out_problem(out: Path, inputs: list[str]) -> str | None:
    """Why ``llmc calibrate -o OUT`` must not write ``out`` (None: it may): it is one of the inputs, a directory,
    or an existing file that is not a calibration ``llmc calibrate`` wrote (nothing the user owns is overwritten)."""
    from llmc.fileio import read_regular_file

    target = out.resolve()
    if any(Path(p).resolve() == target for p in inputs):
        return "-o names one of the inputs (give a new file for the calibration)"
    if target.is_dir():
        return "-o names a directory (give the calibration JSON file to write)"
    if not target.exists() and not target.is_symlink():
        return None
    try:
        doc = json.loads(read_regular_file(target, 2**20))
    except (OSError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("kind") != "llmc-calibration":
        return "exists and is not a calibration llmc wrote (move it away or give a new file; llmc never overwrites it)"
    return None


@_command()
def calibrate(
    inputs: Annotated[list[str], typer.Argument(help="Measured runs: metrics.jsonl / run folders, build "
                                                     "directories (the run of the stage their plan describes), "
                                                     "torchtitan logs, or benchmark tables (.yaml/.csv).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration JSON to write.")],
    lock: Annotated[Path | None, typer.Option("--lock", help="plan.lock.json the measured runs were built from.")]
    = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Use only runs of this backend.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Use only runs on this GPU.")] = None,
) -> None:
    """Fit the time/memory calibration factors to measured runs (use with `calibration:` or --calibration)."""
    from llmc.measurements import calibrate_main

    problem = _calibration_out_problem(out, [*inputs, *([str(lock)] if lock else [])])
    if problem:
        _fail([f"{out}: error[K010] {problem}"])
    rc = calibrate_main(list(inputs), str(out), lock=str(lock) if lock else None, backend=backend, gpu=gpu)
    if rc:
        raise typer.Exit(rc)


@_command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A build directory (with plan.lock.json) or its run/ folder.")],
    stage: Annotated[str, typer.Option("--stage", help="The stage to export (pretrain for the main run).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output directory (default run/<stage>/hf; with --step, run/<stage>/hf-step-N).")]
    = None,
    allow_stale: Annotated[bool, typer.Option(
        "--allow-stale", help="Export a stage `llmc launch` refuses as stale (finished under another lock than "
        "this build's, or started from such a stage): warned, and recorded as stale in .llmc-export.json.")] = False,
    step: Annotated[int | None, typer.Option(
        "--step", min=0, help="Export the stage's kept checkpoint of step N (llmc's, DeepSpeed's or torchtitan's), "
        "not its final one, into run/<stage>/hf-step-N; also a stage still training or stopped early.")] = None,
) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer) from a stage's checkpoint.

    The stage's final checkpoint, or with --step N its kept checkpoint of step N (a step it no longer keeps is refused, naming the steps kept). A stage `llmc launch` would refuse as stale (finished under another lock) is refused here too, unless --allow-stale. The export's .llmc-export.json records its provenance: the lock's sha256, the fingerprint of the run exported, the checkpoint step and llmc's version."""
    from llmc.runtime.export import main as export_main  # torch: only once the stage is found

    rc = export_main([f"--stage={stage}", *([f"--out={out}"] if out else []),
                      *([f"--step={step}"] if step is not None else []),
                      *(["--allow-stale"] if allow_stale else []), "--", str(run_dir)])
    if rc:
        raise typer.Exit(rc)


@_command()
def schema() -> None:
    """Print the JSON Schema of the run spec (for editor completion)."""
    from llmc.spec.load import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@_command()
def presets() -> None:
    """List the built-in model presets."""
    from llmc.spec.presets import PRESETS

    for name in sorted(PRESETS):
        typer.echo(name)


@_command()
def gpus(
    format: Annotated[str, typer.Option("--format", "-f", help="text or json")] = "text",
) -> None:
    """List the hardware table: each part's dense peaks, memory, links, node and price, with its source
    (`--format json`: every field, as `hardware.gpu_overrides` names them)."""
    import dataclasses

    from llmc.compiler.hardware import GPUS

    if format not in ("text", "json"):
        _fail([f"llmc gpus: error[CLI] --format must be 'text' or 'json' (got {format!r}) (see `llmc gpus --help`)"])
    if format == "json":
        _echo(json.dumps({k: dataclasses.asdict(g) for k, g in sorted(GPUS.items())}, indent=2, sort_keys=True))
        return

    def num(x) -> str:
        return "-" if not x else f"{x:,.0f}" if x >= 10 else f"{x:g}"

    head = ("key", "bf16 TF", "fp8 TF", "HBM GB", "usable GiB", "HBM TB/s", "NVLink GB/s", "net Gb/s", "per node",
            "host GiB", "$/GPU-h", "name")
    rows = [(k, num(g.bf16_tflops), num(g.fp8_tflops), num(g.hbm_marketed_gb),
             f"{g.hbm_gib:.2f}" + ("" if g.hbm_source else "*"), f"{g.hbm_gbps / 1000:.2f}",
             num(g.nvlink_gbps), num(g.net_gbps), str(g.gpus_per_node), num(g.host_gib), f"{g.usd_per_hour:.2f}",
             g.name) for k, g in sorted(GPUS.items())]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        typer.echo("  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    typer.echo("\ndense peaks (no 2:4 sparsity); per GPU; HBM GB: the datasheet's; usable GiB: what the device reports "
               "(torch total_memory), what plans fit against (* = none published: the datasheet's decimal GB); "
               "sources: llmc gpus --format json (source, hbm_source)")


_PLAN_OPTIONS = {"--format": "format", "-f": "format", "--diff": "diff", "--set": "set_",
                 "--calibration": "calibration"}


def _plan_argv(argv: list[str]) -> dict | None:
    """``plan``'s arguments when ``argv`` is ``plan SPEC`` with options spelled as typer reads them (``--opt
    VALUE``, ``--opt=VALUE``, ``-f VALUE``, ``--set`` repeated, ``--no-fit-check``); None for anything else
    (help, usage errors, other commands, unusual spellings), which typer then handles."""
    if not argv or argv[0] != "plan":
        return None
    args: dict = {"spec": None, "format": "text", "diff": None, "set_": None, "no_fit_check": False,
                  "calibration": None}
    seen: set[str] = set()
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--no-fit-check" and arg not in seen:
            seen.add(arg)
            args["no_fit_check"] = True
            i += 1
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        key = _PLAN_OPTIONS.get(name)
        if key is not None:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                value = argv[i + 1]
            i += 1 if eq else 2
            if not value or value.startswith("-"):
                return None
            if key == "set_":
                args["set_"] = [*(args["set_"] or []), value]
            elif key in seen:
                return None
            else:
                seen.add(key)
                args[key] = value
            continue
        if (arg.startswith("-") and arg != "-") or args["spec"] is not None:
            return None
        args["spec"] = arg
        i += 1
    if args["spec"] is None:
        return None
    for key in ("spec", "diff", "calibration"):
        if args[key] is not None:
            args[key] = Path(args[key])
    return args


def _plan_direct(args: dict) -> None:
    """``plan(**args)`` ending as typer's standalone mode ends a command: exit 0, or 1 after a closed pipe
    (silently) or an interrupt ("Aborted!")."""
    try:
        plan(**args)
    except (EOFError, KeyboardInterrupt):
        _echo("\nAborted!", err=True)
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- nothing more reaches the closed pipe
        sys.exit(1)
    sys.exit(0)


def _run_app() -> None:
    """The typer app with click's usage errors (an unknown option, a value of the wrong type, a missing
    argument) as one ``error[CLI]`` line and exit 1, like every other bad input; ``llmc`` alone prints the
    help."""
    import typer as typer_mod

    try:  # typer (pinned 0.29) vendors click as typer._click; its exceptions are not click's
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - a typer that uses click itself
        from click import exceptions as cx

    try:
        rc = _app()(standalone_mode=False, prog_name="llmc")
    except cx.NoArgsIsHelpError as e:
        _echo(e.format_message())
        sys.exit(0)
    except cx.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "llmc"
        msg = " ".join(e.format_message().split())
        _echo(f"{cmd}: error[CLI] {msg} (see `{cmd} --help`)", err=True)
        sys.exit(1)
    except typer_mod.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


def _without_pydantic_plugins() -> None:
    """Run pydantic without third-party plugins, as ``PYDANTIC_DISABLE_PLUGINS=__all__`` does, unless that variable is
    set. pydantic's plugin loader imports ``importlib.metadata`` (and with it ``email``, ``zipfile``, ...) and scans
    every installed distribution's entry points when the first model class is built: about 40 ms of a 0.35 s
    ``llmc plan`` on a 2-core host, for plugins (observability hooks) that llmc's own spec models do not use. Its
    only entry point, ``get_plugins`` (pydantic/plugin/_schema_validator.py), is answered with no plugins."""
    if "PYDANTIC_DISABLE_PLUGINS" in os.environ or "pydantic.plugin._loader" in sys.modules:
        return
    import types

    loader = types.ModuleType("pydantic.plugin._loader")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules["pydantic.plugin._loader"] = loader


def main() -> None:
    """Console entry point: user errors exit 1 with one line; never a traceback unless LLMC_DEBUG=1."""
    _without_pydantic_plugins()
    try:
        args = _plan_argv(sys.argv[1:])
        if args is None:
            _run_app()
        else:
            _plan_direct(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:  # unreadable spec, unwritable output dir, full disk ...
        if os.environ.get("LLMC_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _echo(f"{where}error[IO] {e.strerror or e} (check the path and its permissions)", err=True)
        sys.exit(1)
    except Exception as e:  # a bug in llmc, not in the spec: still one line, with a way to see more
        if os.environ.get("LLMC_DEBUG"):
            raise
        _echo(f"error[INTERNAL] {type(e).__name__}: {e} (this is a bug in llmc; rerun with "
              "LLMC_DEBUG=1 for the traceback and please report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
