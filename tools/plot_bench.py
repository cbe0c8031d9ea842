#!/usr/bin/python3
"""Plots `splitmoe bench --json` results: time per output token (p50) and output tokens/s
against concurrency, one line per series (e.g. the engine's continuous batching and a cluster).

    tools/plot_bench.py --out docs/bench_concurrency.png \
        --series engine bench-model-c1.json bench-model-c2.json ... \
        --series cluster bench-endpoint-c1.json ...

Needs Debian's python3-matplotlib (installed by scripts/setup.sh).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--series", nargs="+", action="append", required=True,
                        metavar=("NAME", "JSON"), help="a name, then bench --json files")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig, (tpot, tput) = plt.subplots(1, 2, figsize=(10, 4))
    for series in args.series:
        name, files = series[0], series[1:]
        runs = sorted((json.load(open(f)) for f in files), key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in runs]
        tpot.plot(c, [r["tpot_ms"]["p50"] for r in runs], marker="o", label=name)
        tput.plot(c, [r["output_tokens_per_s"] for r in runs], marker="o", label=name)
    tpot.set_xlabel("concurrency")
    tpot.set_ylabel("time per output token, p50 (ms)")
    tput.set_xlabel("concurrency")
    tput.set_ylabel("output tokens/s")
    for ax in (tpot, tput):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
