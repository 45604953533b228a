"""How a training step's time depends on its torch threads when another process keeps the cores busy.

Times one training step (forward, loss, backward, SGD) of a network at 1..N threads, first on an idle machine,
then beside a background process that runs a torch matmul loop with 1 and with N threads (another user's job).
Prints a table of median milliseconds per step and the ratio to the idle time at the same thread count: what
``kdbench``'s thread default (``kdbench.scheduler.job_threads``) is chosen from.

    python benchmarks/bench_threads.py [--model kdbench:resnet20] [--size 16] [--batch 32] [--steps 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _busy(threads: int, stop) -> None:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a) * 0.5


def _time_steps(model: str, size: int, batch: int, steps: int, threads: int) -> float:
    import torch

    from kdbench.models.sources import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model(model, 10, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        out = net(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="kdbench:resnet20")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    cpus = os.cpu_count() or 1
    counts = sorted({1, cpus})
    ctx = mp.get_context("spawn")
    rows = []
    for bg in [0] + counts:
        stop = ctx.Event()
        proc = None
        if bg:
            proc = ctx.Process(target=_busy, args=(bg, stop), daemon=True)
            proc.start()
            time.sleep(2.0)
        for th in counts:  # each timing in a fresh process: torch's thread pool is set once per process
            rows.append((bg, th, _in_child(ctx, a, th)))
        if proc is not None:
            stop.set()
            proc.join(10)
    idle = {th: ms for bg, th, ms in rows if bg == 0}
    print(f"{a.model}, batch {a.batch} x {a.size} px, {cpus} CPUs, median of {a.steps} steps")
    print("| background threads | step threads | ms/step | × idle (same threads) |")
    print("|---:|---:|---:|---:|")
    for bg, th, ms in rows:
        print(f"| {bg or '-'} | {th} | {ms:.1f} | {ms / idle[th]:.2f} |")


def _child(args, q) -> None:
    q.put(_time_steps(*args))


def _in_child(ctx, a, threads: int) -> float:
    q = ctx.Queue()
    w = ctx.Process(target=_child, args=((a.model, a.size, a.batch, a.steps, threads), q))
    w.start()
    ms = q.get()
    w.join()
    return ms


if __name__ == "__main__":
    main()
