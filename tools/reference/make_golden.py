#!/usr/bin/python3
"""Regenerates tests/golden/<variant>.json from the PyTorch reference.

For each variant of tests/golden/variants.json: writes the checkpoint with
`splitmoe make-tiny` (its flags are part of the golden data), then runs
dsref.py `score` (teacher-forced top-K logprobs, and MTP when the variant
says so) and `generate` (greedy) on every prompt. The C++ engine never touches
these numbers: golden_test.cc compares the engine's CLI output against them.

Usage: tools/reference/make_golden.py [--build build] [--only NAME ...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF = os.path.join(ROOT, "tools", "reference", "dsref.py")


def prompt_tokens(spec):
    """A prompt is a list of ids or {length, seed}: BOS then (i * 7919 + seed) % 2048."""
    if isinstance(spec, list):
        return spec
    return [0] + [(i * 7919 + spec["seed"]) % 2048 for i in range(1, spec["length"])]


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(ROOT, "build"))
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    splitmoe = os.path.join(args.build, "bin", "splitmoe")
    golden_dir = os.path.join(ROOT, "tests", "golden")
    with open(os.path.join(golden_dir, "variants.json")) as f:
        spec = json.load(f)
    top, max_tokens = spec["top_logprobs"], spec["max_tokens"]
    for variant in spec["variants"]:
        name = variant["name"]
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as model:
            subprocess.run([splitmoe, "make-tiny", "--out", model] + variant["make_tiny"], check=True,
                           capture_output=True)
            cases = []
            for p in spec["prompts"]:
                ids = ",".join(str(t) for t in prompt_tokens(p))
                # float64: the whole tolerance is left to the engine (fp32 rounding alone reaches
                # 6e-5 on 150-token prompts).
                score_cmd = [sys.executable, REF, "score", "--model", model, "--prompt-tokens", ids,
                             "--top-logprobs", str(top), "--dtype", "float64"]
                if variant.get("mtp"):
                    score_cmd.append("--mtp")
                score = run_json(score_cmd)
                gen = run_json([sys.executable, REF, "generate", "--model", model, "--prompt-tokens", ids,
                                "--max-tokens", str(max_tokens), "--top-logprobs", str(top), "--dtype", "float64"])
                cases.append({"prompt_tokens": prompt_tokens(p), "score": score, "generate": gen})
                print(f"{name}: prompt of {len(prompt_tokens(p))} tokens -> {gen['tokens']}", flush=True)
        out = {"variant": name, "make_tiny": variant["make_tiny"], "generated_by": "tools/reference/make_golden.py",
               "cases": cases}
        with open(os.path.join(golden_dir, name + ".json"), "w") as f:
            json.dump(out, f, separators=(",", ":"))
            f.write("\n")


if __name__ == "__main__":
    main()
