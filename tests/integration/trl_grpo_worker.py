"""A TRL GRPOTrainer run with the sparsecomm callback (tests/integration/test_trl.py): tiny model, offline, CPU.

    python tests/integration/trl_grpo_worker.py COMM OUT        (or under torchrun)
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from sparsecomm.dist_utils import shutdown_process_group
from sparsecomm.integrations.trl import SparsecommCallback, make_aspg
from sparsecomm.rl.models import build_model, char_tokenizer
from sparsecomm.rl.tasks import datasets, make_task

comm, out = sys.argv[1], sys.argv[2]
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
tok = char_tokenizer()
model, _ = build_model("tiny", tok, seed=0)
task = make_task("addition", digits=1)
data = datasets(task, 0, 0, 0, 64)["rl"]
ds = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in data])


def reward(prompts, completions, answer, **kw):  # varies on an untrained model, so advantages are nonzero
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=4, max_steps=4, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                  learning_rate=1e-3)
opt = make_aspg(model, lr=1e-3, density=0.05) if comm == "aspg" else None
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                      optimizers=(opt, None))
cb = SparsecommCallback.attach(trainer, comm=comm, run_dir=out + "/stats")
trainer.train()
rank = dist.get_rank() if dist.is_initialized() else 0
# every parameter, exactly: the test compares replicas tensor by tensor with torch.equal
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/r{rank}.pt")
with open(f"{out}/r{rank}.json", "w") as f:
    json.dump({"last": cb.last}, f)
shutdown_process_group()  # barrier, then destroy: no rank tears gloo down under a peer's last collective
