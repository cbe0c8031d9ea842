#!/usr/bin/env python3
"""A multi-host cluster for real: every process in its own Linux network namespace ("host"),
joined by veth links to a bridge in a hub namespace, addresses 10.213.<pid>.x/24 that exist only
inside the namespaces this test makes (deleted afterwards). UCX runs over tcp on the links.

  router (.2)  prefill (.3)  decode-a (.4)  decode-b (.5)  expert 0 (.6)  expert 0 spare (.7)
  expert 1 (.8)  and this test's client in the root namespace (.1)

Checks:
  1. greedy outputs through the cluster equal the single-process engine's;
  2. the latents and the MoE traffic cross the links: the prefill and decode hosts' interface
     byte counters grow by at least the latent bytes the workers report, and the expert hosts'
     by the MoE traffic;
  3. a link taken down mid-run (`ip link set DEV down` on the hub side: a partition) is a
     failure the cluster notices (the router marks the worker unhealthy) and survives: with the
     link of expert shard 0's first replica down, and then the link of a decode worker down while
     requests run, every request still answers exactly as the engine (the spare replica and the
     other decode worker take over).
Needs root (ip netns); otherwise it says so and exits 77 (skipped, never passed).

  multihost_test.py --splitmoe build/bin/splitmoe
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SKIP = 77


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class Net:
    """A hub namespace with a bridge, and one namespace per host with a veth into the bridge."""

    def __init__(self):
        self.tag = f"sm{os.getpid() % 100000}"
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.hub = f"{self.tag}hub"
        self.hosts = {}  # name -> (netns, address, hub-side interface)
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        # The root namespace (this test's client) joins as .1.
        self.root_if = f"{self.tag}r"
        sh("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", "p0",
           "netns", self.hub)
        sh("ip", "-n", self.hub, "link", "set", "p0", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.root_if)
        sh("ip", "link", "set", self.root_if, "up")

    def add_host(self, name, index):
        ns = f"{self.tag}{name}"
        hub_if = f"p{index}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", self.hub, "link", "add", hub_if, "type", "veth", "peer", "name", "eth0",
           "netns", ns)
        sh("ip", "-n", self.hub, "link", "set", hub_if, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.subnet}.{index}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = (ns, f"{self.subnet}.{index}", hub_if)
        return self.hosts[name][1]

    def bytes(self, name):
        """(rx, tx) bytes of the host's eth0."""
        ns = self.hosts[name][0]
        rx = int(sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/rx_bytes")
                 .stdout)
        tx = int(sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes")
                 .stdout)
        return rx, tx

    def link(self, name, up):
        sh("ip", "-n", self.hub, "link", "set", self.hosts[name][2], "up" if up else "down")

    def close(self):
        for ns, _, _ in self.hosts.values():
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.root_if, check=False)
        sh("ip", "netns", "del", self.hub, check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splitmoe", required=True)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("SKIP: network namespaces need root and iproute2")
        return SKIP
    probe = subprocess.run(["ip", "netns", "add", f"smprobe{os.getpid()}"], capture_output=True)
    if probe.returncode != 0:
        print(f"SKIP: cannot make a network namespace: {probe.stderr.decode().strip()}")
        return SKIP
    sh("ip", "netns", "del", f"smprobe{os.getpid()}")

    work = tempfile.mkdtemp(prefix="splitmoe-multihost-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", UCX_TLS="tcp", UCX_NET_DEVICES="eth0")
    root_env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    net = Net()
    procs = {}
    failures = 0
    try:
        model = os.path.join(work, "tiny")
        sh(args.splitmoe, "make-tiny", "--out", model, "--no-tokenizer")
        layout = [("router", 2), ("prefill", 3), ("decode_a", 4), ("decode_b", 5),
                  ("expert0", 6), ("expert0s", 7), ("expert1", 8)]
        addr = {name: net.add_host(name, i) for name, i in layout}

        def start(name, argv):
            ns = net.hosts[name][0]
            p = subprocess.Popen(["ip", "netns", "exec", ns, args.splitmoe, *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env=env)
            procs[name] = p
            deadline = time.time() + 120
            while time.time() < deadline:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name} exited before listening")
                if line.startswith("listening "):
                    return line.split()[1]
            raise RuntimeError(f"{name} did not start")

        router = start("router", ["router", "--model", model, "--listen",
                                  f"{addr['router']}:7000", "--heartbeat-ms", "200"])
        common = ["--model", model, "--router", router, "--moe-transport", "ucx",
                  "--expert-deadline-ms", "2000"]
        start("expert0", ["expert", "--model", model, "--router", router, "--listen",
                          f"{addr['expert0']}:7001", "--shard", "0", "--num-shards", "2"])
        start("expert0s", ["expert", "--model", model, "--router", router, "--listen",
                           f"{addr['expert0s']}:7001", "--shard", "0", "--num-shards", "2"])
        start("expert1", ["expert", "--model", model, "--router", router, "--listen",
                          f"{addr['expert1']}:7001", "--shard", "1", "--num-shards", "2"])
        for d in ("decode_a", "decode_b"):
            start(d, ["decode", *common, "--listen", f"{addr[d]}:7002"])
        start("prefill", ["prefill", *common, "--listen", f"{addr['prefill']}:7003"])

        def status():
            out = subprocess.run([args.splitmoe, "status", "--endpoint", router, "--json"],
                                 capture_output=True, text=True, env=root_env, timeout=30)
            return json.loads(out.stdout) if out.returncode == 0 else None

        def wait_for(what, fn, timeout=60):
            deadline = time.time() + timeout
            last = None
            while time.time() < deadline:
                ok, last = fn()
                if ok:
                    return last
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {what}; last: {last}")

        def healthy_count():
            s = status()
            n = sum(1 for w in (s or {}).get("workers", []) if w.get("healthy"))
            return n == 6, n
        wait_for("all six workers healthy", healthy_count)

        prompts = [[1 + i, 7, 42, 99, 3 * i + 5] for i in range(6)]
        tokens = 24

        def engine(prompt, tokens=tokens):
            out = subprocess.run([args.splitmoe, "generate", "--model", model, "--prompt-tokens",
                                  ",".join(map(str, prompt)), "--max-tokens", str(tokens),
                                  "--ignore-eos", "--json"], check=True, capture_output=True,
                                 text=True, env=root_env)
            return json.loads(out.stdout)["tokens"]

        def cluster(prompt, tokens=tokens):
            out = subprocess.run([args.splitmoe, "generate", "--endpoint", router,
                                  "--prompt-tokens", ",".join(map(str, prompt)), "--max-tokens",
                                  str(tokens), "--ignore-eos", "--json"], capture_output=True,
                                 text=True, env=root_env, timeout=120)
            if out.returncode != 0:
                return f"error: {out.stderr.strip()}"
            return json.loads(out.stdout)["tokens"]

        reference = [engine(p) for p in prompts]

        def check(name, fn):
            nonlocal failures
            try:
                fn()
                print(f"ok   {name}")
            except Exception as e:  # report every check, then fail
                failures += 1
                print(f"FAIL {name}: {e}")

        def run_all(parallel=3, tokens=tokens):
            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                return list(pool.map(lambda p: cluster(p, tokens), prompts))

        before = {name: net.bytes(name) for name in addr}

        def equal_and_crossing():
            got = run_all()
            assert got == reference, f"cluster {got} != engine {reference}"
            after = {name: net.bytes(name) for name in addr}
            s = status()
            moved = {w["role"]: 0 for w in s["workers"]}
            sent = sum(int(w["load"].get("latent_bytes_sent", 0)) for w in s["workers"])
            received = sum(int(w["load"].get("latent_bytes_received", 0)) for w in s["workers"])
            assert sent > 0 and sent == received, (sent, received)
            prefill_tx = after["prefill"][1] - before["prefill"][1]
            decode_rx = sum(after[d][0] - before[d][0] for d in ("decode_a", "decode_b"))
            assert prefill_tx >= sent, f"prefill sent {prefill_tx} bytes on its link < {sent}"
            assert decode_rx >= received, f"decode got {decode_rx} bytes < {received}"
            parts_ucx = int(s["routing"].get("expert_parts_ucx", 0))
            assert parts_ucx > 0, s["routing"]
            expert_rx = sum(after[e][0] - before[e][0] for e in ("expert0", "expert0s", "expert1"))
            assert expert_rx > 0, "no MoE bytes reached the expert hosts"
            print(f"     latents {sent} B (prefill link tx {prefill_tx} B, decode links rx "
                  f"{decode_rx} B); MoE parts over UCX {parts_ucx}, expert links rx {expert_rx} B")
            del moved
        check("outputs equal the engine; latents and MoE traffic cross the links",
              equal_and_crossing)

        def worker_health(name):
            s = status() or {}
            host = addr[name]
            for w in s.get("workers", []):
                if w["address"].startswith(host + ":"):
                    return w.get("healthy", False)
            return None

        def out_of_service(name):
            # Unhealthy, or already forgotten (the router drops a worker 10 s after it stopped).
            h = worker_health(name)
            return h is not True, h

        def expert_link_down():
            assert worker_health("expert0") is True
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(run_all, 2)
                time.sleep(0.3)
                net.link("expert0", False)  # partition shard 0's first replica mid-run
                started = time.time()
                got = running.result()
                print(f"     requests during the partition took {time.time() - started:.1f} s")
            assert got == reference, f"during the partition: {got}"
            wait_for("the router to notice the partitioned expert",
                     lambda: out_of_service("expert0"))
            got = run_all()
            assert got == reference, f"after the partition: {got}"
        check("an expert replica's link down mid-run: noticed, the spare serves", expert_link_down)

        long_tokens = 200
        long_reference = [engine(p, long_tokens) for p in prompts]

        def decode_link_down():
            assert worker_health("decode_a") is True
            failovers_before = int((status() or {}).get("request_failovers", 0))

            def busy(name):
                s = status() or {}
                for w in s.get("workers", []):
                    if w["address"].startswith(addr[name] + ":"):
                        return int(w.get("load", {}).get("sequences_running", 0)) > 0
                return False
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(run_all, 6, long_tokens)
                # Cut the link while decode-a runs sequences (its heartbeat says so).
                wait_for("decode-a to run sequences", lambda: (busy("decode_a"), None), 60)
                net.link("decode_a", False)
                got = running.result()
            assert got == long_reference, f"during the partition: {got}"
            wait_for("the router to notice the partitioned decode worker",
                     lambda: out_of_service("decode_a"))
            assert run_all() == reference
            moved = int(status().get("request_failovers", 0)) - failovers_before
            assert moved > 0, "no request moved off the partitioned decode worker"
            print(f"     requests moved off decode-a: {moved}")
        check("a decode worker's link down mid-run: noticed, requests move and finish",
              decode_link_down)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        net.close()
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"{failures} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
