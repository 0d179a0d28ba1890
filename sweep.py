"""`python sweep.py --sweep section.key=v1,v2,... [train.py's arguments]`: one run per value in a
sweep folder, then every run evaluated and one report (table, plots, sample grid) written in that
folder. Its own entry point, so the training loop does not import evaluation and reporting.

    python sweep.py --sweep losses.shape.mask_weight=0.01,0.05,0.1,0.2,0.3,0.5,1.0 --set train.steps=150

Finished runs (a checkpoint at train.steps) are reused, so an interrupted sweep continues where
it stopped when run again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guided_concepts import train
from guided_concepts.argtypes import positive_int
from guided_concepts.cli import entry_point
from guided_concepts.checkpointing import RunFolderError, check_run_name, latest_intact_checkpoint, load_state
from guided_concepts.configs.schema import ConfigError
from guided_concepts.evaluation.image_metrics import ClipScorer
from guided_concepts.evaluation.report import write_report
from guided_concepts.evaluation.runner import EvalSettings, evaluate_run, write_results


def parse_sweep(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or "." not in key or not items:
        raise ConfigError(f"--sweep {text!r}: expected section.key=v1,v2,...")
    return key.strip(), items


def without_option(argv: list[str], flag: str, value_prefix: str = "") -> list[str]:
    """argv without `flag VALUE` (or `flag=VALUE`) pairs whose value starts with value_prefix."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == flag and i + 1 < len(argv) and argv[i + 1].startswith(value_prefix):
            skip = True
        elif not arg.startswith(f"{flag}={value_prefix}"):
            out.append(arg)
    return out


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other argument goes to each run as to train.py (see python train.py -h).")
    p.add_argument("--sweep", required=True, metavar="KEY=V1,V2,...", help="one run per value, then evaluate all")
    p.add_argument("--eval-samples", type=positive_int, default=2, help="samples per prompt in the evaluation")
    p.add_argument("--eval-steps", type=positive_int, default=10, help="sampling steps in the evaluation")
    p.add_argument("--clip", help="a CLIP model folder or hub id for the CLIP scores (default: none)")
    sweep_args, rest = p.parse_known_args(argv)
    if "--help-config" in rest:
        sys.exit("error: --help-config: run it with train.py and the same arguments plus --set KEY=VALUE")
    try:
        key, values = parse_sweep(sweep_args.sweep)
        # Validate the key and every value before the first run starts.
        configs = [train.parse_args(rest + ["--set", f"{key}={v}"])[0] for v in values]
    except ConfigError as err:
        sys.exit(f"error: {err}")
    base = configs[0]
    unnamed = without_option(without_option(rest, "--name"), "--set", "run.name=")
    named = unnamed != rest                       # --name NAME, --name=NAME or --set run.name=NAME
    name = base.run.name if named else f"sweep_{key.replace('.', '_')}"
    try:
        check_run_name(name)
    except RunFolderError as err:
        sys.exit(f"error: {err}")
    sweep_dir = Path(base.run.output_dir) / name
    rest = without_option(unnamed, "--set", "run.output_dir=")     # each run's own name and folder below
    run_dirs = []
    for value, cfg in zip(values, configs):
        run_name = f"{key}={value.replace('/', '_')}"       # one run per value, inside the sweep's folder
        run_dir = sweep_dir / run_name
        done = latest_intact_checkpoint(run_dir)[0]          # a damaged newest one: resume says so
        step = load_state(done)["step"] if done else 0
        if "--overwrite" in rest or step < cfg.train.steps:
            # An interrupted run continues from its checkpoint; a finished one is reused.
            resume = ["--resume"] if done is not None and "--overwrite" not in rest else []
            print(f"sweep: {key}={value}" + (f" (resuming at step {step})" if resume else ""))
            train.main(rest + ["--set", f"{key}={value}", "--set", f"run.output_dir={sweep_dir}", "--name", run_name]
                       + resume)
        run_dirs.append(run_dir)
    settings = EvalSettings(num_samples=sweep_args.eval_samples, steps=sweep_args.eval_steps, clip=sweep_args.clip)
    clip = ClipScorer(settings.clip)
    results = [evaluate_run(run_dir, settings, clip) for run_dir in run_dirs]
    write_results(results, sweep_dir)
    report = write_report(results, sweep_dir, key, values, base.run.report_to)
    print(f"sweep report: {report}")
    return sweep_dir


if __name__ == "__main__":
    entry_point(main)
