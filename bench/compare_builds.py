"""Before/after timings of two builds of cim_ext on CPU, each measured in its own processes, alternately.

    python -m bench.compare_builds --old /path/to/old/checkout [--pairs 3] [--out bench/results/x.json]

Two builds register the same operator names, so they cannot share a process: each round runs the old build (its
checkout first on PYTHONPATH, built in place) and then this one, and the report gives per-case medians over the
rounds and the old/new ratio of each pair. Cases: compress (B = 256 uint8 / float32 images), rational forward and
forward + backward ([256, 64, 56, 56]), and the host cost of one call on tiny inputs (a 3x32x32 image, 8x4x4 maps),
with torch.add as the cost of one eager op. Both builds run with their outputs served from memory the process holds
(``bench.allocator.resident_env``), so the ratios compare the kernels, not the page faults of fresh outputs.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _timed(fn, calls, repeats):
    """Median and fastest seconds per call over ``repeats`` batches of ``calls`` calls (after two warm-up calls)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times), min(times)


def measure():
    """One build's timings (the cim_ext first on sys.path), as a dict case -> (median, min) seconds."""
    import torch

    import cim_ext
    from bench import cases

    images, boxes = cases.image_inputs(device="cpu")
    floats = images.float() / 255
    x = cases.activation_input(device="cpu")
    rational = cim_ext.nn.Rational()
    num, den = rational.numerator, rational.denominator
    x_grad = x.clone().requires_grad_(True)
    ones = torch.ones_like(x)
    gen = torch.Generator().manual_seed(0)
    tiny = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen)
    tiny_box = torch.tensor([[4, 20, 6, 28]])
    fmaps, weight, labels = torch.rand(1, 8, 4, 4, generator=gen), torch.randn(10, 8, generator=gen), torch.tensor([3])
    small_x, a = torch.randn(1, 4, 4, 4), torch.ones(4)
    out = {
        "compress[uint8]": _timed(lambda: cim_ext.compress(images, boxes, 4.0), 1, 20),
        "compress[float32]": _timed(lambda: cim_ext.compress(floats, boxes, 4.0), 1, 20),
        "rational[forward]": _timed(lambda: cim_ext.rational(x, num.detach(), den.detach()), 1, 20),
        "rational[forward_backward]": _timed(
            lambda: torch.autograd.grad(cim_ext.rational(x_grad, num, den), (x_grad, num, den), ones), 1, 20),
    }
    with torch.no_grad():
        out.update({
            "host[compress]": _timed(lambda: cim_ext.compress(tiny, tiny_box, 4.0), 100, 20),
            "host[cam_to_boxes]": _timed(lambda: cim_ext.cam_to_boxes(fmaps, weight, labels, (32, 32), 0.6), 100, 20),
            "host[cam]": _timed(lambda: cim_ext.cam(fmaps, weight, labels), 100, 20),
            "host[rational]": _timed(lambda: cim_ext.rational(small_x, num.detach(), den.detach()), 100, 20),
            "host[torch.add]": _timed(lambda: torch.add(a, a), 100, 20),
        })
    return out


def _run(build, old_checkout):
    # Imported here: a measuring process (this file run as a script) must import nothing of this checkout's bench
    # before the build under test is first on its path.
    from bench.allocator import resident_env

    env = resident_env(os.environ)
    if build == "old":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [old_checkout, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure"], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="checkout of the old build (built in place)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure()))
        return
    if not args.old:
        parser.error("--old is required")
    rounds = [(_run("old", args.old), _run("new", args.old)) for _ in range(args.pairs)]
    report = {}
    for case in rounds[0][0]:
        old = statistics.median(r[0][case][0] for r in rounds)
        new = statistics.median(r[1][case][0] for r in rounds)
        report[case] = {"old_median_s": old, "new_median_s": new, "old_over_new": old / new,
                        "pairs_old_over_new": [r[0][case][0] / r[1][case][0] for r in rounds]}
        print(f"{case:28s} old {old * 1e3:9.4f} ms  new {new * 1e3:9.4f} ms  old/new {old / new:5.2f}")
    import torch

    from bench.allocator import RESIDENT_TUNABLES, resident_env

    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "THP_MEM_ALLOC_ENABLE": resident_env(os.environ).get("THP_MEM_ALLOC_ENABLE"),
            "GLIBC_TUNABLES": RESIDENT_TUNABLES, "old": args.old, "pairs": args.pairs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": info, "cases": report}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
