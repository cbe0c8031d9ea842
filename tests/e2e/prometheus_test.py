#!/usr/bin/env python3
"""A real Prometheus (Debian's `prometheus`) scrapes a running cluster.

`splitmoe up` gives every process --metrics-listen; `splitmoe status --json` names each
endpoint (the router's metrics_url and every worker's). The test writes a Prometheus config with
those targets, starts Prometheus, sends requests through the cluster, and checks through
Prometheus' query API that every target is up and that the values agree with what was done:
requests by outcome, output tokens, time-to-first-token / per-output-token / end-to-end
histogram counts, latent bytes sent by prefill = received by decode, cache blocks, per-expert
token counts on the router and the attention workers, the expert services' work, readiness.
Skipped (exit 77) only when the prometheus binary is absent.

  prometheus_test.py --splitmoe build/bin/splitmoe
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base, expr):
    result = query(base, expr)
    return float(result[0]["value"][1]) if result else None


def wait_for(what, fn, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        ok, last = fn()
        if ok:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splitmoe", required=True)
    args = ap.parse_args()
    if not os.path.exists(PROMETHEUS):
        print("SKIP: prometheus is not installed (scripts/setup.sh installs Debian's)")
        return 77
    work = tempfile.mkdtemp(prefix="splitmoe-prom-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    procs = []
    try:
        model = os.path.join(work, "tiny")
        subprocess.run([args.splitmoe, "make-tiny", "--out", model, "--no-tokenizer"],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        up = subprocess.Popen([args.splitmoe, "up", "--model", model, "--experts", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env)
        procs.append(up)
        endpoint = None
        while endpoint is None:
            line = up.stdout.readline()
            if not line:
                raise RuntimeError("up exited before ready")
            if line.startswith("ready grpc="):
                endpoint = line.split()[1].split("=", 1)[1].split(",")[0]
        status = json.loads(subprocess.run(
            [args.splitmoe, "status", "--endpoint", endpoint, "--json"], check=True,
            capture_output=True, text=True, env=env).stdout)
        targets = {"router": [status["metrics_url"]]}
        for w in status["workers"]:
            role = w["role"].replace("WORKER_ROLE_", "").lower()
            targets.setdefault(role, []).append(w["metrics_url"])
        assert all(u for urls in targets.values() for u in urls), targets
        assert sorted(targets) == ["decode", "expert", "prefill", "router"], targets
        assert len(targets["expert"]) == 2

        port = free_port()
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n")
            for role, urls in targets.items():
                hosts = [urllib.parse.urlparse(u).netloc for u in urls]
                f.write(f"  - job_name: {role}\n    metrics_path: /metrics\n"
                        f"    static_configs:\n      - targets: {json.dumps(hosts)}\n")
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work}/tsdb",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(prom)
        base = f"http://127.0.0.1:{port}"

        # Work for the cluster: 5 requests of 6 tokens, one refused (a token id past the
        # vocabulary).
        requests, tokens = 5, 6
        for i in range(requests):
            subprocess.run([args.splitmoe, "generate", "--endpoint", endpoint, "--prompt-tokens",
                            f"{i + 1},2,3,4", "--max-tokens", str(tokens), "--ignore-eos",
                            "--json"], check=True, capture_output=True, env=env)
        refused = subprocess.run([args.splitmoe, "generate", "--endpoint", endpoint,
                                  "--prompt-tokens", "1,99999999", "--max-tokens", "4"],
                                 capture_output=True, env=env)
        assert refused.returncode != 0

        def all_up():
            r = query(base, "up")
            return len(r) == 5 and all(x["value"][1] == "1" for x in r), r
        wait_for("every target up", all_up)

        def counted():
            ok = scalar(base, 'sum(splitmoe_requests_total{outcome="ok"})')
            return ok == requests, ok
        wait_for("requests counted", counted)
        checks = {
            'sum(splitmoe_requests_total{outcome="error",code="INVALID_ARGUMENT"})': 1,
            "sum(splitmoe_output_tokens_total)": requests * tokens,
            "sum(splitmoe_time_to_first_token_seconds_count)": requests,
            "sum(splitmoe_time_per_output_token_seconds_count)": requests * (tokens - 1),
            "sum(splitmoe_e2e_request_latency_seconds_count)": requests,
            "sum(splitmoe_prompt_tokens_total)": requests * 4,
            "splitmoe_ready": 1,
            'sum(splitmoe_tokens_processed_total{job="prefill"})': requests,
        }

        def values_agree():
            got = {k: scalar(base, k) for k in checks}
            return all(got[k] == v for k, v in checks.items()), got
        wait_for("values", values_agree)

        def traffic():
            sent = scalar(base, 'sum(splitmoe_latent_bytes_sent_total{job="prefill"})')
            received = scalar(base, 'sum(splitmoe_latent_bytes_received_total{job="decode"})')
            router_tokens = scalar(base, 'sum(splitmoe_expert_tokens_total{job="router"})')
            worker_tokens = scalar(base, "sum(splitmoe_moe_expert_tokens_total)")
            expert_work = scalar(base, 'sum(splitmoe_tokens_processed_total{job="expert"})')
            free = scalar(base, 'sum(splitmoe_cache_blocks_free{job="decode"})')
            used = scalar(base, 'sum(splitmoe_cache_blocks_used{job="decode"})')
            ok = (sent and sent > 0 and sent == received and router_tokens and
                  router_tokens == worker_tokens and expert_work == worker_tokens and
                  free and free > 0 and used == 0)
            return ok, dict(sent=sent, received=received, router_tokens=router_tokens,
                            worker_tokens=worker_tokens, expert_work=expert_work, free=free,
                            used=used)
        print("traffic", wait_for("traffic counters", traffic))
        print("ok   every process scraped by Prometheus; values agree with the work done")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
