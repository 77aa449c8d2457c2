"""The measured process of ``bench_contention``: the demo model's training step, timed on request.

    python -m benchmarks.contention_worker {petal_fast|torch_first} PRESET BATCH CLASSES

``torch_first`` imports torch before petal_fast, as a script that starts with ``import torch`` does:
the OpenMP runtime is then loaded with its default wait (spinning), since petal_fast's passive
default comes too late; ``petal_fast`` imports petal_fast first. That is why this is a module of
its own, started fresh per configuration: the import order is the thing measured. Protocol on
stdin/stdout, one line each: it prints ``ready`` after the warm-up, then for every line
``SECONDS`` it trains that long and prints a JSON object (steps, images, wall seconds, per-step ms,
threads, wait policy).
"""
import sys

if __name__ == "__main__" and sys.argv[1:2] == ["torch_first"]:
    import torch  # noqa: F401  (before petal_fast, on purpose)

import json  # noqa: E402
import time  # noqa: E402

import petal_fast  # noqa: E402, F401  (first, unless torch_first)
import torch  # noqa: E402

from petal_fast import threads  # noqa: E402


def main(argv: list[str]) -> None:
    from benchmarks.bench_e2e import build, train_step_fn
    _, preset, batch, classes = argv[0], argv[1], int(argv[2]), int(argv[3])
    model, reference, images, labels = build(preset, classes, batch, torch.device("cpu"), torch.float32)
    del reference
    model.train()
    step = train_step_fn(model, images, labels, None)
    for _ in range(3):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        seconds = float(line)
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        wall = time.perf_counter() - start
        print(json.dumps({"steps": len(times), "images": len(times) * batch, "wall": wall, "ms": times,
                          "threads": torch.get_num_threads(), "wait": threads.wait_policy()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
