"""Two processes on CPU (gloo) through accelerate, as several GPUs would run: the heads stay in
sync, each process trains on its own share of the data, and only rank 0 writes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_reliability import metric_lines

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow      # several processes: the full suite only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spy: Path, *train_args: str) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` of tests/distributed_run.py, on CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / "tests" / "distributed_run.py"), str(spy),
               *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own process group, so a hang is cleaned up whole (launcher and both ranks).
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)   # patient: a loaded 2-core machine is slow
    except subprocess.TimeoutExpired:
        # torchrun may put the ranks in their own groups: kill everything running this driver.
        subprocess.run(["pkill", "-9", "-f", str(spy)], check=False)
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"two-process run timed out:\n{output[-6000:]}")
    assert process.returncode == 0, output[-4000:]


COMMON = ["--set", "train.batch_size=6", "--set", "data.triplets=false", "--set", "train.log_every=1",
          "--set", "train.checkpoint_every=2", "--set", "train.sample_every=0", "--set", "sample.steps=1"]


def test_two_processes_train_one_model(tmp_path, tiny_model_dir, chairs_dir):
    steps = 4
    spy = tmp_path / "spy"
    launch(spy, "--name", "ddp", "--set", f"run.output_dir={tmp_path}", "--set", f"train.steps={steps}", *COMMON)
    ranks = [json.loads((spy / f"rank{i}.json").read_text()) for i in (0, 1)]
    heads = [load_file(str(spy / f"heads_rank{i}.safetensors")) for i in (0, 1)]

    # Both ranks end with identical heads (DDP averaged every gradient), and say so in state.json.
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    run = tmp_path / "ddp"
    fingerprints = json.loads((run / "checkpoints" / f"step_{steps:06d}" / "state.json").read_text())["rank_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    # Each rank trained on its own share: 4 batches of 6 views each, none shared.
    assert all(len(r["seen"]) == steps * 6 for r in ranks)
    views = [{s.rsplit("/", 1)[0] for s in r["seen"]} for r in ranks]
    assert not views[0] & views[1]

    # Only rank 0 wrote: checkpoints, samples, metrics, environment; logged losses are the mean
    # over both processes' batches.
    assert ranks[1]["calls"] == []
    assert ranks[0]["calls"].count("save_checkpoint") == 2 and "validate" in ranks[0]["calls"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]                    # once, not once per rank
    for line, own in zip(lines, zip(ranks[0]["losses"], ranks[1]["losses"])):
        assert abs(line["denoise"] - sum(own) / 2) < 1e-6
    (environment,) = json.loads((run / "environment.json").read_text())
    assert environment["num_processes"] == 2

    # Resume with two processes: each gets its own noise stream and log sums back, so stopping at
    # step 2 and resuming ends exactly where the straight run did.
    launch(tmp_path / "spy2", "--name", "ddp2", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=2", *COMMON)
    launch(tmp_path / "spy3", "--name", "ddp2", "--set", f"run.output_dir={tmp_path}", "--set", f"train.steps={steps}",
           "--resume")
    resumed = load_file(str(tmp_path / "spy3" / "heads_rank0.safetensors"))
    assert all(torch.equal(resumed[k], heads[0][k]) for k in heads[0])
    training_lines = lambda run: [x for x in metric_lines(run) if "loss" in x]    # noqa: E731
    assert training_lines(tmp_path / "ddp2") == training_lines(run)


STALLED_TEARDOWN = """
import sys, threading, time
from guided_concepts.checkpointing import end_training_patiently

class Accelerator:                     # a two-process run whose process-group teardown never returns
    num_processes = {processes}
    def end_training(self):
        if self.num_processes == 1:
            print("ended", flush=True)
            return
        threading.Event().wait()       # blocks without holding the GIL, like a stuck C++ teardown

end_training_patiently(Accelerator(), patience_s=1.0)
print("returned", flush=True)
"""


def test_stalled_teardown_exits_instead_of_hanging():
    # A multi-process teardown stuck after the run finished: warning, stacks, exit 0 (not a hang).
    run = subprocess.run([sys.executable, "-c", STALLED_TEARDOWN.format(repo=str(REPO), processes=2)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0
    assert "teardown stalled for 1 s" in run.stderr and "end_training" in run.stderr   # where it stuck
    assert "returned" not in run.stdout
    # One process: plain end_training, no watchdog.
    single = subprocess.run([sys.executable, "-c", STALLED_TEARDOWN.format(repo=str(REPO), processes=1)],
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0 and single.stdout.split() == ["ended", "returned"] and not single.stderr
