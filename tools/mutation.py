"""Mutation testing of the method's core modules with cosmic-ray (``make mutation``; docs/mutation.md).

Each module is mutated in a copy of the checkout (``build/mutation/tree``: tracked and untracked,
not ignored, files), never in the checkout itself, so an interrupted run leaves no mutant behind and
nobody's working files are touched. The copy and its ``kernels/`` (which holds ``mmcam_kernels/``) are
first on ``PYTHONPATH``, ahead of the editable install. The runner of each module is its own test
files, with ``-x``: a mutant is killed by the first failing test.

Mutation operators: the usual small faults, one replacement per operator, as mutmut makes them
(``+``/``-``, ``*``/``/``, ``//`` to ``/``, ``%`` to ``//``, ``**`` to ``*``, shifts swapped,
``&``/``|``, ``^`` to ``&``, ``<`` / ``<=`` / ``>`` / ``>=`` moved across the boundary, ``==`` / ``!=``
and ``is`` / ``is not`` negated, unary minus dropped, ``not`` removed, ``True`` / ``False``,
``and`` / ``or``, ``break`` / ``continue`` swapped, numbers off by one, loops that run zero times,
exception types replaced). Mutants inside type annotations are not run: with ``from __future__
import annotations`` those are strings, never evaluated.

A module has hundreds of mutants and every run starts Python, torch and, for the kernels, Triton's
interpreter: to stay within about an hour on 2 cores each module runs a fixed random sample
(``SAMPLE``, or ``--sample``; seeded by the module's name; 0 runs them all). ``--survivors`` reruns
the last run's survivors only, after tests were added for them. Results go to
``build/mutation/<module>.txt``: killed / survived per module, and every survivor's diff.

Usage: ``python tools/mutation.py [--sample N] [module ...]`` (modules: the keys of MODULES).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "mutation"
TREE = BUILD / "tree"
PYTHON = Path(sys.executable)

# module -> (file, test command arguments after `pytest -x -q`, needs the Triton interpreter, timeout s)
MODULES: dict[str, tuple[str, list[str], bool, int]] = {
    "minmaxcam": ("mmcam_fast/minmaxcam.py", ["tests/test_minmaxcam.py", "tests/test_minmaxcam_dispatch.py"],
                  False, 300),
    "sampler": ("mmcam_fast/data/sampler.py",
                ["tests/test_sampler.py", "tests/test_sampler_contract.py"], False, 120),
    "cam_mask": ("kernels/mmcam_kernels/cam_mask.py", [
        "tests/interpret/test_cam_mask.py", "tests/interpret/test_kernel_properties.py", "-k",
        "(non_square or ties or constant or strided or expanded or bf16_features or every_block_tail"
        " or cam_mask_dtype_layout_grid or integer_maps or launchable or require_grad) and not random"], True,
        400),
    "set_regularizers": ("kernels/mmcam_kernels/set_regularizers.py", [
        "tests/interpret/test_set_regularizers.py", "tests/interpret/test_kernel_properties.py", "-k",
        "set_regularizers or f_orig or strided_inputs or identical_members or launchable"], True, 300),
    "level_tree": ("mmcam_fast/evaluation/level_tree.py", [
        "tests/test_evaluation_fast_levels.py", "tests/test_evaluation_box_properties.py",
        "tests/test_evaluation_level_bounds.py", "tests/test_evaluation_fast.py"], False, 300),
    "box_fast": ("mmcam_fast/evaluation/box_fast.py", [
        "tests/test_evaluation_box_properties.py", "tests/test_evaluation_fast.py"], False, 300),
    "engine": ("mmcam_fast/engine.py", ["tests/test_engine_switches.py", "tests/test_engine.py"], False, 400),
}
# mutants per module in a run (``--sample`` overrides): each costs a Python start with torch and its
# test files (15-40 s on 2 shared cores); the modules of the kill-rate target get more
SAMPLE = {"minmaxcam": 30, "sampler": 60, "cam_mask": 30, "set_regularizers": 30, "level_tree": 30,
          "box_fast": 15, "engine": 15}

OPERATORS = re.compile(
    r"core/(ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul"
    r"|LShift_RShift|RShift_LShift|BitAnd_BitOr|BitOr_BitAnd|BitXor_BitAnd)"
    r"|ReplaceComparisonOperator_(Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is)"
    r"|ReplaceUnaryOperator_(USub_UAdd|Delete_Not)|ReplaceTrueWithFalse|ReplaceFalseWithTrue"
    r"|ReplaceAndWithOr|ReplaceOrWithAnd|ReplaceBreakWithContinue|ReplaceContinueWithBreak"
    r"|NumberReplacer|ZeroIterationForLoop|ExceptionReplacer)$")


def copy_tree() -> None:
    """The checkout's files (tracked and untracked, not ignored) into TREE, afresh."""
    if TREE.exists():
        shutil.rmtree(TREE)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (TREE / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, TREE / name)


def environment(interpret: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MMCAM_KERNELS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TREE), str(TREE / "kernels")])
    env.setdefault("MMCAM_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    env["NUMBA_CACHE_DIR"] = str(BUILD / "numba-cache")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of every annotation in the file."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
            args = node.args
            for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
                if arg is not None:
                    annotations.append(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for a in filter(None, annotations):
            spans.append(((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)))
    return spans


def select(session: Path, file: Path, sample: int, seed: str, only: set | None = None) -> tuple[int, int]:
    """Mark as skipped: other operators, mutants in annotations, those outside the sample (or ``only``)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(file)

    def in_annotation(mutation) -> bool:
        start = tuple(mutation.start_pos)
        return any(a <= start < b for a, b in spans)

    with use_db(str(session), WorkDB.Mode.open) as db:
        items = list(db.pending_work_items)
        eligible = [i for i in items
                    if all(OPERATORS.match(m.operator_name) and not in_annotation(m) for m in i.mutations)]
        eligible.sort(key=mutation_key)  # the database's order is not the same from one init to the next
        chosen = eligible
        if only is not None:
            chosen = [i for i in eligible if mutation_key(i) in only]
        elif sample and len(eligible) > sample:
            chosen = random.Random(seed).sample(eligible, sample)
        keep = {i.job_id for i in chosen}
        for item in items:
            if item.job_id not in keep:
                skipped = WorkResult(output="not selected", worker_outcome=WorkerOutcome.SKIPPED)
                db.set_result(item.job_id, skipped)
    return len(eligible), len(chosen)


def mutation_key(item) -> tuple:
    m = item.mutations[0]
    return m.operator_name, m.occurrence, tuple(m.start_pos)


def outcomes(session: Path) -> tuple[int, list]:
    """Killed count and surviving work items of a finished session."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed, survivors = 0, []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                survivors.append((item, result))
            else:
                killed += 1
    return killed, survivors


def run_module(name: str, sample: int | None, survivors_only: bool = False) -> str:
    file, tests, interpret, timeout = MODULES[name]
    sample = SAMPLE[name] if sample is None else sample
    session = BUILD / f"{name}.sqlite"
    earlier_killed, only = 0, None
    if survivors_only:  # the earlier run's survivors again, against the tests as they are now
        earlier_killed, survivors = outcomes(session)
        only = {mutation_key(item) for item, _ in survivors}
        session = BUILD / f"{name}.survivors.sqlite"
    session.unlink(missing_ok=True)
    command = " ".join([str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                        *(shlex.quote(t) for t in tests)])
    config = BUILD / f"{name}.toml"
    config.write_text("\n".join([
        "[cosmic-ray]", f"module-path = {json.dumps(file)}", f"timeout = {float(timeout)}",
        "excluded-modules = []", f"test-command = {json.dumps(command)}", "",
        "[cosmic-ray.distributor]", 'name = "local"', ""]))
    env = environment(interpret)
    cosmic_ray = [str(PYTHON), "-m", "cosmic_ray.cli"]
    subprocess.run([*cosmic_ray, "init", str(config), str(session)], cwd=TREE, env=env, check=True)
    eligible, chosen = select(session, TREE / file, sample, name, only)
    baseline = subprocess.run(shlex.split(command), cwd=TREE, env=env, capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the runner fails without a mutant:\n{baseline.stdout[-3000:]}")
    start = time.time()
    subprocess.run([*cosmic_ray, "exec", str(config), str(session)], cwd=TREE, env=env, check=True)
    return report(name, session, eligible, chosen, time.time() - start, earlier_killed)


def report(name: str, session: Path, eligible: int, chosen: int, seconds: float,
           earlier_killed: int = 0) -> str:
    killed, survivors = outcomes(session)
    lines = []
    for item, result in survivors:
        m = item.mutations[0]
        lines.append(f"--- survived: {item.job_id} {m.operator_name} at {m.start_pos[0]}:{m.start_pos[1]}")
        lines.append(result.diff or "")
    run = chosen + earlier_killed
    summary = (f"{name}: {run} of {eligible} mutants run, {killed + earlier_killed} killed, {len(survivors)} "
               f"survived ({seconds / 60:.1f} min{', survivors rerun' if earlier_killed else ''})")
    (BUILD / f"{name}.txt").write_text(summary + "\n\n" + "\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    sample = os.environ.get("MUTATION_SAMPLE")
    parser.add_argument("--sample", type=int, default=int(sample) if sample else None,
                        help="mutants per module, a fixed random sample (0: all; default: SAMPLE)")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the survivors of the last run of each module (after new tests)")
    parser.add_argument("--keep-tree", action="store_true", help="reuse build/mutation/tree as it is")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    BUILD.mkdir(parents=True, exist_ok=True)
    if not args.keep_tree or not TREE.exists():
        copy_tree()
    summaries = [run_module(name, args.sample, args.survivors) for name in modules]
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
