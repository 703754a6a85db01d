"""Run by `torchrun` in tests/test_multiprocess.py: label a data file on every process, where process 1 dies
(SIGKILL, as the out-of-memory killer does) at its third image, when process 0 is mid-way with finished records
that no shard holds yet.

    torchrun --standalone --nproc-per-node 2 tests/multiprocess_worker.py MODEL DATA OUT
"""

from __future__ import annotations

import os
import signal
import sys
import time

from sdrpn.data import file_fingerprint, read_samples
from sdrpn.distributed import run_state
from sdrpn.images import load_image
from sdrpn.labeling import LabelSettings, generate_labels
from sdrpn.models import load_model


def main(model: str, data: str, out: str) -> int:
    rank = run_state().process_index
    opened = {"n": 0}

    def open_image(path):
        opened["n"] += 1
        if rank == 1:
            time.sleep(0.4)
            if opened["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        elif opened["n"] > 2:
            time.sleep(0.5)
        return load_image(path)

    adapter = load_model(model)
    read = read_samples(data)
    try:
        generate_labels(
            adapter,
            read.samples,
            out,
            LabelSettings(max_new_tokens=3),
            batch_size=1,
            shard_size=8,  # the share of each: only the end of the run writes a shard
            progress=False,
            open_image=open_image,
            data=file_fingerprint(data),  # as `sdrpn label` records them, so that the command resumes the folder
            image_root=read.root,
        )
    except KeyboardInterrupt:
        print(f"rank {rank} interrupted after {opened['n']} images", flush=True)
        return 130
    print(f"rank {rank} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
