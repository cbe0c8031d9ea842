#!/usr/bin/env python3
"""Readiness of a cluster, asked the way load balancers and Kubernetes ask it.

A router starts alone; gRPC's grpc.health.v1 (whole server "" and splitmoe.v1.Generation) and
HTTP GET /health answer NOT_SERVING / 503 (with the reason) until a worker of every role and a
replica of every expert shard serve, SERVING / 200 after; killing the decode worker (kill -9)
or an expert shard's only replica turns them back, and a new one restores them. ClusterInfo stays
SERVING throughout (the liveness probe's service).

  readiness_test.py --splitmoe build/bin/splitmoe
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import grpc

SERVING, NOT_SERVING = 1, 2


def health(channel, service):
    """grpc.health.v1.Health/Check, the messages encoded by hand (one string, one enum)."""
    data = service.encode()
    request = (b"\x0a" + bytes([len(data)]) + data) if data else b""
    call = channel.unary_unary("/grpc.health.v1.Health/Check")
    reply = call(request, timeout=5)
    return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0


def http_health(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Proc:
    def __init__(self, argv, env):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=env, text=True)
        self.lines = {}
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{argv[1]} exited before listening")
            key, _, value = line.strip().partition(" ")
            self.lines[key] = value
            if key == "listening" and (argv[1] != "router" or "http" in self.lines):
                return
            if key == "http":
                return

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def wait_for(what, predicate, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        ok, last = predicate()
        if ok:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splitmoe", required=True)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="splitmoe-ready-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    procs = []
    try:
        model = os.path.join(work, "tiny")
        subprocess.run([args.splitmoe, "make-tiny", "--out", model, "--no-tokenizer"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        router = Proc([args.splitmoe, "router", "--model", model, "--listen", "127.0.0.1:0",
                       "--http-listen", "127.0.0.1:0", "--heartbeat-ms", "100"], env)
        procs.append(router)
        address, url = router.lines["listening"], "http://" + router.lines["http"]
        channel = grpc.insecure_channel(address)

        def state():
            h = health(channel, "")
            g = health(channel, "splitmoe.v1.Generation")
            code, body = http_health(url)
            return h, g, code, body

        def expect_not_ready(reason):
            def check():
                h, g, code, body = state()
                ok = (h == NOT_SERVING and g == NOT_SERVING and code == 503 and
                      reason in body.get("reason", ""))
                return ok, (h, g, code, body)
            wait_for(f"not ready ({reason})", check)
            assert health(channel, "splitmoe.v1.ClusterInfo") == SERVING

        def expect_ready():
            def check():
                h, g, code, body = state()
                return (h == SERVING and g == SERVING and code == 200 and
                        body.get("status") == "ok"), (h, g, code, body)
            wait_for("ready", check)
            assert health(channel, "splitmoe.v1.ClusterInfo") == SERVING

        def start(role, *extra):
            p = Proc([args.splitmoe, role, "--model", model, "--router", address,
                      "--listen", "127.0.0.1:0", *extra], env)
            procs.append(p)
            return p

        expect_not_ready("no prefill worker serving")
        expert = start("expert", "--shard", "0", "--num-shards", "1")
        decode = start("decode")
        expect_not_ready("no prefill worker serving")
        start("prefill")
        expect_ready()
        print("ok   not ready until every role serves, ready after")

        decode.kill()
        expect_not_ready("no decode worker serving")
        start("decode")
        expect_ready()
        print("ok   a dead decode worker makes it unready, a new one ready again")

        expert.kill()
        expect_not_ready("expert shard(s) 0 without a live replica")
        start("expert", "--shard", "0", "--num-shards", "1")
        expect_ready()
        print("ok   an expert shard without replicas makes it unready, a new replica ready again")
    finally:
        for p in reversed(procs):
            p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
