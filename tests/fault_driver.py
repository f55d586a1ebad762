"""Run a tiny training job in a child process, optionally killing itself (SIGKILL) inside a checkpoint write.

Usage: python fault_driver.py RUN_DIR STEPS [--kill-in-write N] [--resume]

``--kill-in-write N`` sends SIGKILL to this process during the N-th checkpoint write, after half of
the file's bytes reached the temporary file and before it is renamed: the worst moment to die.
"""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sdeflow.experiments import images as images_app
from training_helpers import tiny_config, tiny_images, tiny_model, tiny_train_config  # noqa: E402


def main() -> None:
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    if "--kill-in-write" in sys.argv:
        target = int(sys.argv[sys.argv.index("--kill-in-write") + 1])
        writes = {"n": 0}
        real_fdopen = os.fdopen

        class HalfThenDie:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.handle.write(data[: len(data) // 2])
                self.handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        def fdopen(fd, mode="r", *args, **kwargs):
            handle = real_fdopen(fd, mode, *args, **kwargs)
            writes["n"] += 1
            return HalfThenDie(handle) if writes["n"] == target else handle

        os.fdopen = fdopen  # the one os module, used by storage.files
    config = tiny_config()
    images_app.train_images(tiny_model(config), tiny_images(), run_dir,
                   tiny_train_config(steps=steps, checkpoint_every=2, keep_checkpoints=10),
                   config, resume="--resume" in sys.argv)


if __name__ == "__main__":
    main()
