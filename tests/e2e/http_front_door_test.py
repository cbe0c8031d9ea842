#!/usr/bin/env python3
"""The HTTP front door at the byte level, with hostile and unusual clients (raw sockets):
HEAD answers headers only and the connection stays usable; pipelined requests are answered in
order; an Authorization header with bytes gRPC refuses in metadata, a body past the limit (413),
a malformed request (400), JSON nested 200,000 deep (400), a client that hangs up mid-stream
and one that sends half a request and goes: each gets a clear answer or is dropped, and the
router keeps serving (a normal request still matches the engine afterwards).

  http_front_door_test.py --splitmoe build/bin/splitmoe
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


def connect(host, port):
    s = socket.create_connection((host, port), timeout=30)
    return s


def read_response(sock, buf=b""):
    """One HTTP/1.1 response (Content-Length or chunked); returns (status, headers, body, rest)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; got {buf!r}")
        buf += data
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    body = b""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(buf) < size + 2:
                buf += sock.recv(65536)
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        n = int(headers.get("content-length", "0"))
        return status, headers, None, buf, n
    return status, headers, body, buf, None


def response(sock, buf=b"", head=False):
    status, headers, body, buf, n = read_response(sock, buf)
    if body is None:
        if head:
            return status, headers, b"", buf
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise EOFError("short body")
            buf += data
        body, buf = buf[:n], buf[n:]
    return status, headers, body, buf


def post(path, body, extra=b""):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n").encode() + extra + b"\r\n" + payload


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splitmoe", required=True)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="splitmoe-http-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    up = None
    failures = 0
    try:
        model = os.path.join(work, "tiny")
        subprocess.run([args.splitmoe, "make-tiny", "--out", model, "--no-tokenizer"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        up = subprocess.Popen([args.splitmoe, "up", "--model", model, "--http-port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=env)
        http = grpc = None
        while http is None:
            line = up.stdout.readline()
            if not line:
                raise RuntimeError("up exited before ready")
            if line.startswith("ready "):
                fields = dict(f.split("=", 1) for f in line.split()[1:])
                grpc, http = fields["grpc"], fields["http"]
        host, port = http.replace("http://", "").rsplit(":", 1)
        port = int(port)
        completion = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}
        reference = json.loads(subprocess.run(
            [args.splitmoe, "generate", "--model", model, "--prompt-tokens", "1,2,3",
             "--max-tokens", "5", "--json"], check=True, capture_output=True, text=True,
            env=env).stdout)["text"]

        def check(name, fn):
            nonlocal failures
            try:
                fn()
                print(f"ok   {name}")
            except Exception as e:  # report every check
                failures += 1
                print(f"FAIL {name}: {e!r}")

        def still_serving():
            s = connect(host, port)
            s.sendall(post("/v1/completions", completion))
            status, _, body, _ = response(s)
            s.close()
            assert status == 200, (status, body)
            assert json.loads(body)["choices"][0]["text"] == reference

        def head_then_get():
            s = connect(host, port)
            s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body, buf = response(s, head=True)
            assert status == 200 and int(headers["content-length"]) > 0, (status, headers)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, buf = response(s, buf)
            assert status == 200 and json.loads(body)["status"] == "ok", (status, body)
            s.close()
        check("HEAD answers headers only; the connection stays in step", head_then_get)

        def pipelined():
            s = connect(host, port)
            s.sendall(post("/v1/completions", completion) + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, buf = response(s)
            assert status == 200 and json.loads(body)["choices"][0]["text"] == reference
            status, _, body, buf = response(s, buf)
            assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny", body
            s.close()
        check("pipelined requests are answered in order", pipelined)

        def odd_authorization():
            s = connect(host, port)
            s.sendall(post("/v1/completions", completion, b"Authorization: Bearer \xff\xfe\t x\r\n"))
            status, _, body, _ = response(s)
            s.close()
            assert status == 200, (status, body)
            still_serving()
        check("an Authorization header gRPC could not carry does not reach it", odd_authorization)

        def too_large():
            s = connect(host, port)
            big = b"{\"prompt\": \"" + b"a" * (5 << 20) + b"\"}"
            try:
                s.sendall(post("/v1/completions", big))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed while we were still sending
            status, _, body, _ = response(s)
            s.close()
            assert status == 413 and "larger than" in json.loads(body)["error"]["message"]
        check("a body past the limit is 413", too_large)

        def malformed():
            s = connect(host, port)
            s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
            status, _, body, _ = response(s)
            s.close()
            assert status == 400, status
        check("a malformed request is 400", malformed)

        def deep_json():
            s = connect(host, port)
            started = time.time()
            s.sendall(post("/v1/chat/completions", b"[" * 200000 + b"]" * 200000))
            status, _, body, _ = response(s)
            s.close()
            assert status == 400 and "deeper" in json.loads(body)["error"]["message"], body
            assert time.time() - started < 10
            still_serving()
        check("JSON nested 200,000 deep is 400 and harms nothing", deep_json)

        def hang_ups():
            # Mid-stream.
            s = connect(host, port)
            body = dict(completion, max_tokens=100, stream=True, prompt=[4, 5, 6])
            s.sendall(post("/v1/completions", body))
            s.recv(100)  # the headers and the first bytes
            s.close()
            # Half a request.
            s = connect(host, port)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            s.close()
            # Nothing is left in flight, and it still serves.
            for _ in range(100):
                status = json.loads(subprocess.run(
                    [args.splitmoe, "status", "--endpoint", grpc, "--json"], check=True,
                    capture_output=True, text=True, env=env).stdout)
                if status.get("requests_in_flight", 0) == 0:
                    break
                time.sleep(0.1)
            assert status.get("requests_in_flight", 0) == 0, status
            still_serving()
        check("clients that hang up mid-stream or mid-request free everything", hang_ups)
    finally:
        if up is not None:
            up.terminate()
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"{failures} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
