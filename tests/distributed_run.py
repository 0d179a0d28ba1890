"""Driver for tests/test_distributed.py, run under `accelerate launch` (one copy per process):
train.main as usual, plus what each process saw and did, written to OUT/rank<i>.json and its
final heads to OUT/heads_rank<i>.safetensors.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_run.py OUT <train.py args>
"""
import faulthandler
import json
import os
import sys
from pathlib import Path


from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guided_concepts import system  # noqa: E402
from guided_concepts import train  # noqa: E402

out, argv = Path(sys.argv[1]), sys.argv[2:]
# A rank that hangs (a collective another rank never joins, a stuck teardown) prints every thread's
# stack, so the test's timeout message says where it stopped.
faulthandler.dump_traceback_later(240, repeat=True)
rank = int(os.environ.get("RANK", "0"))
seen, calls, systems, losses = [], [], [], []

original_losses, original_init = train.training_losses, system.GuidedConcepts.__init__


def spy_losses(self, batch, *args, **kwargs):
    seen.extend(f"{o}/{v}/{'flip' if f else 'plain'}" for o, v, f in
                zip(batch["object_name"], batch["view_id"], batch["flipped"].tolist()))
    terms = original_losses(self, batch, *args, **kwargs)
    losses.append(terms["denoise"][1].detach().float().mean().item())     # this rank's own
    return terms


def spy_init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    systems.append(self)


train.training_losses, system.GuidedConcepts.__init__ = spy_losses, spy_init
for name in ("save_checkpoint", "validate", "export_tokens", "append_environment", "prepare_run_dir"):
    def wrapped(*args, _original=getattr(train, name), _name=name, **kwargs):
        calls.append(_name)
        return _original(*args, **kwargs)
    setattr(train, name, wrapped)



def write_record():
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in systems[-1].trainable_state().items()}, str(out / f"heads_rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "calls": calls, "losses": losses}))


def spy_end_training(self, _original=Accelerator.end_training):
    write_record()          # before the teardown: the heads are final once every rank met at the barrier
    return _original(self)


Accelerator.end_training = spy_end_training
train.main(argv)
write_record()              # again after main: a run that stops early ends without end_training too
