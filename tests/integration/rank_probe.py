"""Writes '<rank> <world> <this host's address>' to OUT/<rank>: shows on which emulated host torchrun placed each rank."""
import os
import socket
import sys
from pathlib import Path

import torch.distributed as dist

from sparsecomm.dist_utils import shutdown_process_group

dist.init_process_group("gloo")
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((os.environ["MASTER_ADDR"], 9))  # UDP connect sends nothing; it picks the route's source address
(out / str(dist.get_rank())).write_text(f"{dist.get_rank()} {dist.get_world_size()} {s.getsockname()[0]}")
shutdown_process_group()  # barrier, then destroy
