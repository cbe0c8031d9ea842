#!/usr/bin/python3
"""Offline checks of the Kubernetes manifests in deploy/k8s (run by check_manifests.sh).

  check_manifests.py --repo ROOT --kubectl KUBECTL [--bin SPLITMOE]

1. Every YAML document under deploy/k8s parses (python3-yaml) and names apiVersion and kind.
2. kubectl, offline: `kubectl kustomize deploy/k8s` renders the set; `kubectl label --local`
   decodes every object; `kubectl set env --local` decodes every pod-template object into its
   typed API struct (wrong field types fail there).
3. What matters for splitmoe, on the rendered objects: probes, scrape annotations, args that the
   role accepts (flag names from the binary with --bin, else from tools/cli's sources), flag
   values consistent with ports, probes, Services, mounts and each other, expert shards
   0..N-1 each with an autoscaler, one image, resources, non-root, and every Secret, ConfigMap
   and PersistentVolumeClaim referenced either defined or listed in
   deploy/k8s/operator-provided.txt.
Prints every failure and exits 1 if there was one.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROLES = {"router": "Router", "expert": "Expert", "prefill": "PrefillCommand",
         "decode": "DecodeCommand"}
WORKERS = ("prefill", "decode", "expert")
SECURITY_FLAGS = ("tls-cert", "tls-key", "tls-ca", "cluster-token-file")
FILE_FLAGS = SECURITY_FLAGS + ("api-keys",)
PROBE_MODEL = "/nonexistent/splitmoe-manifest-check-model"
ROUTER_GATED = "splitmoe.v1.Generation"
SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"}

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------
# Flag names a role accepts.

def balanced(text, start, open_char, close_char):
    """The text from text[start] (== open_char) to its matching close_char, inclusive."""
    depth = 0
    i = start
    in_string = False
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == open_char:
            depth += 1
        elif c == close_char:
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
        i += 1
    raise ValueError(f"unbalanced {open_char}{close_char}")


def literals(text):
    return set(re.findall(r'"([a-z0-9][a-z0-9-]*)"', text))


def source_flags(repo):
    """{role: (valued, boolean)} read from the roles' Flags::Parse calls in tools/cli/*.cc,
    plus the internal plane's flags that main() takes for every role (TakeSecurityFlags)."""
    cli = os.path.join(repo, "tools", "cli")
    text = ""
    for name in sorted(os.listdir(cli)):
        if name.endswith(".cc"):
            with open(os.path.join(cli, name), encoding="utf-8") as f:
                text += f.read() + "\n"
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"TakeSecurityFlags\b.*?kFlags\s*=\s*\{", text, re.S)
    if not m:
        raise ValueError("tools/cli: TakeSecurityFlags's kFlags not found")
    security = literals(balanced(text, m.end() - 1, "{", "}"))
    out = {}
    for role, function in ROLES.items():
        m = re.search(r"absl::Status\s+%s\s*\(\s*int\s+argc" % function, text)
        if not m:
            raise ValueError(f"tools/cli: the {role} command ({function}) not found")
        p = text.find(".Parse(", m.end())
        if p < 0:
            raise ValueError(f"tools/cli: {function} calls no Flags::Parse")
        call = balanced(text, p + len(".Parse"), "(", ")")
        groups, depth, start = [], 0, None
        for i, c in enumerate(call):
            if c == "{":
                if depth == 0:
                    start = i
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    groups.append(call[start:i + 1])
        if not groups:
            raise ValueError(f"tools/cli: {function}'s Flags::Parse names its flags in no "
                             "{...} list this check can read; run it with --bin")
        valued = literals(groups[0])
        boolean = literals(groups[1]) if len(groups) > 1 else set()
        out[role] = (valued | security, boolean)
    return out


# ---------------------------------------------------------------------------------------------
# Helpers over the rendered objects.

def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def name_of(obj):
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def pod_spec(obj):
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return ((obj.get("spec") or {}).get("template") or {}).get("spec")
    if obj.get("kind") == "Pod":
        return obj.get("spec")
    return None


def template_labels(obj):
    return (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get(
        "labels") or {}


def host_port(value):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return None, None
    return host, int(port)


def quantity(text):
    text = str(text)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    if not m or (m.group(2) and m.group(2) not in units):
        return None
    return float(m.group(1)) * units.get(m.group(2), 1)


def expand(value, env):
    """Kubernetes' $(VAR) expansion of a container arg; the names it could not expand."""
    missing = []

    def sub(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        if m.group(1) in env:
            return env[m.group(1)]
        missing.append(m.group(1))
        return m.group(0)

    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value), missing


def parse_args(where, role, args, valued, boolean):
    """[(name, value or None)] from `--name=value` and boolean `--name` (one arg per flag:
    the manifests never split a flag from its value). valued None: names not checked here."""
    out = []
    for a in args:
        if not a.startswith("--"):
            fail(where, f"unexpected argument {a!r}: write each flag as one --name=value arg")
            continue
        name, eq, value = a[2:].partition("=")
        if valued is not None and name not in valued and name not in boolean:
            fail(where, f"splitmoe {role} has no flag --{name}")
        if eq:
            if name in boolean and value not in ("true", "false"):
                fail(where, f"--{name} takes no value")
            out.append((name, value))
        elif name in boolean or valued is None:
            out.append((name, None))
        else:
            fail(where, f"--{name} needs a value: write --{name}=VALUE")
            out.append((name, ""))
    return out


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--bin", default="")
    opts = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="splitmoe-k8s-check-")
    try:
        return run(opts, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(opts, tmp):
    repo = os.path.abspath(opts.repo)
    k8s = os.path.join(repo, "deploy", "k8s")
    # kubectl never reaches a cluster: an empty configuration, and only offline commands.
    kubeconfig = os.path.join(tmp, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    kenv = dict(os.environ, KUBECONFIG=kubeconfig, HOME=tmp)

    def kubectl(*args, stdin=None):
        r = subprocess.run([opts.kubectl, *args], env=kenv, input=stdin, capture_output=True,
                           text=True, timeout=120)
        return r.returncode, r.stdout, r.stderr.strip()

    # 1. Every YAML document parses.
    files = []
    for root, _, names in os.walk(k8s):
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".yaml", ".yml"))]
    for path in files:
        rel = os.path.relpath(path, repo)
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            fail(rel, f"does not parse: {e}")
            continue
        for d in docs:
            if not isinstance(d, dict) or "apiVersion" not in d or "kind" not in d:
                fail(rel, "a document without apiVersion and kind")
            elif d["kind"] != "Kustomization" and not (d.get("metadata") or {}).get("name"):
                fail(rel, f"a {d['kind']} without metadata.name")
    if errors:
        return report()

    # 2. kubectl, offline.
    rc, rendered_text, err = kubectl("kustomize", k8s)
    if rc != 0:
        fail("kubectl kustomize deploy/k8s", err)
        return report()
    rendered_path = os.path.join(tmp, "rendered.yaml")
    with open(rendered_path, "w") as f:
        f.write(rendered_text)
    objects = load_docs(rendered_path)
    kustomization = load_docs(os.path.join(k8s, "kustomization.yaml"))[0]
    listed = [os.path.join(k8s, r) for r in kustomization.get("resources") or []]
    for path in listed + [rendered_path]:
        rel = "kustomize output" if path == rendered_path else os.path.relpath(path, repo)
        rc, out, err = kubectl("label", "--local", "--dry-run=client", "-o", "yaml", "-f", path,
                               "splitmoe.io/manifest-check=1")
        if rc != 0:
            fail(f"kubectl label --local {rel}", err)
    for path in files:
        if path not in listed and os.path.basename(path) != "kustomization.yaml":
            fail(os.path.relpath(path, repo), "not listed in deploy/k8s/kustomization.yaml")
    workloads = [o for o in objects if pod_spec(o) is not None]
    workloads_path = os.path.join(tmp, "workloads.yaml")
    with open(workloads_path, "w") as f:
        yaml.safe_dump_all(workloads, f)
    rc, out, err = kubectl("set", "env", "--local", "--dry-run=client", "-o", "yaml", "-f",
                           workloads_path, "SPLITMOE_MANIFEST_CHECK=1")
    if rc != 0:
        fail("kubectl set env --local (typed decode of the pod templates)", err or "failed")

    # 3. What matters for splitmoe.
    check_objects(repo, k8s, objects, kustomization, opts.bin, tmp)
    return report()


def report():
    if errors:
        print(f"check_manifests: {len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        return 1
    return 0


def check_objects(repo, k8s, objects, kustomization, binary, tmp):
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    namespaces = [o["metadata"]["name"] for o in by_kind.get("Namespace", [])]
    if len(namespaces) != 1:
        fail("deploy/k8s", f"expected one Namespace, found {namespaces}")
    namespace = namespaces[0] if namespaces else None
    for o in objects:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != namespace:
            fail(name_of(o), f"not in namespace {namespace}")

    # Flag names: from the binary when one is given (probe_binary), else from the sources.
    flag_sets = None
    if not binary:
        try:
            flag_sets = source_flags(repo)
        except (OSError, ValueError) as e:
            fail("tools/cli", f"cannot read the roles' flags: {e}")

    # The image's user, from the Dockerfile.
    dockerfile_uid = None
    try:
        with open(os.path.join(repo, "deploy", "Dockerfile"), encoding="utf-8") as f:
            users = re.findall(r"^USER\s+(\d+)", f.read(), re.M)
        dockerfile_uid = int(users[-1]) if users else None
    except OSError:
        pass

    # Operator-provided objects.
    provided = {}
    with open(os.path.join(k8s, "operator-provided.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if len(words) != 3:
                fail("deploy/k8s/operator-provided.txt", f"not KIND NAME KEYS: {line!r}")
                continue
            keys = set() if words[2] == "-" else set(words[2].split(","))
            provided[(words[0], words[1])] = keys
    defined = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    referenced = set()

    def ref(where, kind, name, key=None):
        if not name:
            fail(where, f"a {kind} reference without a name")
            return
        referenced.add((kind, name))
        if (kind, name) in defined:
            obj = defined[(kind, name)]
            keys = set((obj.get("data") or {}).keys()) | set((obj.get("stringData") or {}).keys())
            if key is not None and kind in ("Secret", "ConfigMap") and key not in keys:
                fail(where, f"{kind} {name} has no key {key!r}")
        elif (kind, name) in provided:
            if key is not None and provided[(kind, name)] and key not in provided[(kind, name)]:
                fail(where, f"{kind} {name} (operator-provided) is listed without key {key!r}")
        else:
            fail(where, f"{kind} {name} is neither defined nor listed in "
                        "deploy/k8s/operator-provided.txt")

    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind.get("ConfigMap", [])}

    # The image.
    want_image = None
    for entry in kustomization.get("images") or []:
        if entry.get("name") == "splitmoe":
            want_image = f"{entry.get('newName', 'splitmoe')}:{entry.get('newTag', 'latest')}"
    if want_image is None:
        fail("deploy/k8s/kustomization.yaml", "no images entry for `splitmoe`")

    # (workload, container, its name, role, {flag: (raw, expanded)}, env, fieldRefs, volumes)
    containers = []
    for o in objects:
        spec = pod_spec(o)
        if spec is None:
            continue
        where = name_of(o)
        if o["kind"] == "Deployment":
            selector = ((o["spec"].get("selector") or {}).get("matchLabels")) or {}
            labels = template_labels(o)
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                fail(where, "spec.selector.matchLabels is empty or does not match the template")
        annotations = ((o["spec"].get("template") or {}).get("metadata") or {}).get(
            "annotations") or {}
        for key, value in SCRAPE.items():
            if annotations.get(key) != value:
                fail(where, f"pod template annotation {key}: {value!r} missing")
        if not str(annotations.get("prometheus.io/port", "")).isdigit():
            fail(where, "pod template annotation prometheus.io/port missing")
        security = spec.get("securityContext") or {}
        if security.get("runAsNonRoot") is not True:
            fail(where, "securityContext.runAsNonRoot is not true")
        if dockerfile_uid is not None and security.get("runAsUser") != dockerfile_uid:
            fail(where, f"runAsUser {security.get('runAsUser')} is not the image's USER "
                        f"{dockerfile_uid} (deploy/Dockerfile)")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for v in volumes.values():
            if "secret" in v:
                ref(where, "Secret", v["secret"].get("secretName"))
                for item in v["secret"].get("items") or []:
                    ref(where, "Secret", v["secret"].get("secretName"), item.get("key"))
            if "configMap" in v:
                ref(where, "ConfigMap", v["configMap"].get("name"))
            if "persistentVolumeClaim" in v:
                ref(where, "PersistentVolumeClaim", v["persistentVolumeClaim"].get("claimName"))
        for s in spec.get("imagePullSecrets") or []:
            ref(where, "Secret", s.get("name"))
        if len(spec.get("containers") or []) != 1:
            fail(where, "expected one container (splitmoe)")
        for c in spec.get("containers") or []:
            cw = f"{where} container {c.get('name')}"
            if want_image and c.get("image") != want_image:
                fail(cw, f"image {c.get('image')!r}, not {want_image!r} (kustomization images)")
            if c.get("command") not in (None, ["splitmoe"]):
                fail(cw, "sets command: the image's ENTRYPOINT is splitmoe, give the role in args")
            for probe in ("readinessProbe", "livenessProbe"):
                if not c.get(probe):
                    fail(cw, f"no {probe}")
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if (resources.get(kind) or {}).get(r) is None:
                        fail(cw, f"no resources.{kind}.{r}")
            for r in ("cpu", "memory"):
                req = quantity((resources.get("requests") or {}).get(r, 0))
                lim = quantity((resources.get("limits") or {}).get(r, 0))
                if req is None or lim is None:
                    fail(cw, f"resources.*.{r}: not a quantity")
                elif lim and req > lim:
                    fail(cw, f"resources.requests.{r} exceeds the limit")
            csec = c.get("securityContext") or {}
            if csec.get("allowPrivilegeEscalation") is not False:
                fail(cw, "securityContext.allowPrivilegeEscalation is not false")
            # Environment, for $(VAR) expansion.
            env = {}
            for e in c.get("envFrom") or []:
                if "configMapRef" in e:
                    name = e["configMapRef"].get("name")
                    ref(cw, "ConfigMap", name)
                    env.update({k: str(v) for k, v in configmaps.get(name, {}).items()})
                if "secretRef" in e:
                    ref(cw, "Secret", e["secretRef"].get("name"))
            fieldrefs = {}
            for e in c.get("env") or []:
                source = e.get("valueFrom") or {}
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                elif "fieldRef" in source:
                    fieldrefs[e["name"]] = source["fieldRef"].get("fieldPath")
                    env[e["name"]] = "<" + source["fieldRef"].get("fieldPath", "") + ">"
                elif "configMapKeyRef" in source:
                    k = source["configMapKeyRef"]
                    ref(cw, "ConfigMap", k.get("name"), k.get("key"))
                    env[e["name"]] = str(configmaps.get(k.get("name"), {}).get(k.get("key"), ""))
                elif "secretKeyRef" in source:
                    k = source["secretKeyRef"]
                    ref(cw, "Secret", k.get("name"), k.get("key"))
                    env[e["name"]] = "<secret>"
                else:
                    env[e["name"]] = "<" + next(iter(source), "?") + ">"
            args = [str(a) for a in c.get("args") or []]
            if not args or args[0] not in ROLES:
                fail(cw, f"args must begin with a role ({', '.join(ROLES)}), got {args[:1]}")
                continue
            role = args[0]
            valued, boolean = flag_sets[role] if flag_sets else (None, set())
            raw = parse_args(cw, role, args[1:], valued, boolean)
            flags = {}
            for name, value in raw:
                if name in flags:
                    fail(cw, f"--{name} given twice")
                expanded = value
                if value is not None:
                    expanded, missing = expand(value, env)
                    for m in missing:
                        fail(cw, f"--{name}: $({m}) is not in the container's environment "
                                 "(the kubelet would pass it literally)")
                flags[name] = (value, expanded)
            containers.append((o, c, cw, role, flags, env, fieldrefs, volumes))

    if binary:
        probe_binary(binary, containers, tmp)

    ports_of = {}
    for o, c, cw, role, flags, env, fieldrefs, volumes in containers:
        ports = {}
        for p in c.get("ports") or []:
            if p.get("name") in ports:
                fail(cw, f"two container ports named {p.get('name')}")
            ports[p.get("name")] = p.get("containerPort")
        ports_of[id(c)] = ports
        numbers = set(ports.values())

        def flag_port(name, hosts):
            if name not in flags:
                return None
            host, port = host_port(flags[name][1])
            if port is None:
                fail(cw, f"--{name}={flags[name][1]}: not HOST:PORT")
                return None
            if host not in hosts:
                fail(cw, f"--{name}={flags[name][0]}: listen on {' or '.join(sorted(hosts))} "
                         "(the pod's traffic arrives on its pod IP)")
            if port not in numbers:
                fail(cw, f"--{name} port {port} is not a containerPort")
            return port

        required = ["model", "metrics-listen"] + (["router"] if role in WORKERS else []) + \
                   (["shard", "num-shards"] if role == "expert" else []) + \
                   (["internal-listen", "http-listen"] if role == "router" else [])
        for name in required:
            if name not in flags:
                fail(cw, f"splitmoe {role} needs --{name} here")
        # The model: a read-only mount of a read-only PersistentVolumeClaim.
        if "model" in flags:
            path = flags["model"][1]
            mounts = [m for m in c.get("volumeMounts") or []
                      if path == m.get("mountPath") or path.startswith(m.get("mountPath") + "/")]
            if not mounts:
                fail(cw, f"--model={path} is on no volume mount")
            for m in mounts:
                v = volumes.get(m.get("name"), {})
                if not m.get("mountPath", "").startswith("/models/"):
                    fail(cw, f"the model is mounted at {m.get('mountPath')}, not /models/<name>")
                if m.get("readOnly") is not True:
                    fail(cw, f"the model mount {m.get('mountPath')} is not readOnly")
                pvc = v.get("persistentVolumeClaim")
                if not pvc or pvc.get("readOnly") is not True:
                    fail(cw, "the model volume is not a read-only persistentVolumeClaim")
        # Files the flags name: in a mounted Secret, under a key it has.
        for name in FILE_FLAGS:
            if name not in flags or not flags[name][1]:
                continue
            path = flags[name][1]
            mounts = [m for m in c.get("volumeMounts") or []
                      if path.startswith(m.get("mountPath", "").rstrip("/") + "/")]
            if not mounts:
                fail(cw, f"--{name}={path} is on no volume mount")
                continue
            m = max(mounts, key=lambda m: len(m["mountPath"]))
            if m.get("readOnly") is not True:
                fail(cw, f"--{name}: the mount {m['mountPath']} is not readOnly")
            secret = (volumes.get(m["name"]) or {}).get("secret")
            if not secret:
                fail(cw, f"--{name}: {m['mountPath']} is not a Secret volume")
                continue
            key = path[len(m["mountPath"].rstrip("/")) + 1:]
            items = secret.get("items")
            if items:
                paths = {i.get("path"): i.get("key") for i in items}
                if key not in paths:
                    fail(cw, f"--{name}: the Secret volume has no item at {key}")
                else:
                    ref(cw, "Secret", secret.get("secretName"), paths[key])
            else:
                ref(cw, "Secret", secret.get("secretName"), key)
        # The internal plane: one mode, as the binary allows, and closed.
        tls = [bool(flags.get(n, (None, ""))[1]) for n in ("tls-cert", "tls-key", "tls-ca")]
        token = bool(flags.get("cluster-token-file", (None, ""))[1])
        if any(tls) and not all(tls):
            fail(cw, "--tls-cert, --tls-key and --tls-ca go together")
        if all(tls) and token:
            fail(cw, "--cluster-token-file and TLS together (the binary refuses)")
        if not all(tls) and not token:
            fail(cw, "the internal plane is open: give --cluster-token-file (or TLS)")
        mode = "tls" if all(tls) else "token" if token else "open"
        c["_mode"] = mode
        # Addresses and ports.
        metrics = flag_port("metrics-listen", {"0.0.0.0", "[::]", "<status.podIP>"})
        annotations = ((o["spec"].get("template") or {}).get("metadata") or {}).get(
            "annotations") or {}
        if metrics is not None and str(metrics) != str(annotations.get("prometheus.io/port")):
            fail(cw, f"prometheus.io/port {annotations.get('prometheus.io/port')} is not the "
                     f"--metrics-listen port {metrics}")
        if metrics is not None and ports.get("metrics") != metrics:
            fail(cw, "the container port named metrics is not the --metrics-listen port")
        grpc_port = None
        if role in WORKERS:
            # A worker registers the address it is bound to (a wildcard becomes the pod's host
            # name, which other pods cannot resolve): it must listen on its pod IP.
            listen = flags.get("listen", (None, None))[0] or ""
            var = re.fullmatch(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\):(\d+)", listen)
            if not var or fieldrefs.get(var.group(1)) != "status.podIP":
                fail(cw, f"--listen={listen}: a worker listens on $(POD_IP):PORT with POD_IP "
                         "from fieldRef status.podIP (the address it registers)")
            grpc_port = flag_port("listen", {"<status.podIP>"})
        else:
            grpc_port = flag_port("listen", {"0.0.0.0", "[::]"})
            internal = flag_port("internal-listen", {"0.0.0.0", "[::]"})
            http = flag_port("http-listen", {"0.0.0.0", "[::]"})
            c["_internal_port"] = internal
            if ports.get("http") != http:
                fail(cw, "the container port named http is not the --http-listen port")
        if grpc_port is not None and ports.get("grpc") != grpc_port:
            fail(cw, "the container port named grpc is not the --listen port")
        c["_grpc_port"] = grpc_port

        # Probes on the processes' health.
        def probe_port(probe, pw):
            for kind in ("grpc", "httpGet", "tcpSocket"):
                if kind in probe:
                    port = probe[kind].get("port")
                    if kind == "grpc" and not isinstance(port, int):
                        fail(cw, f"{pw}: a grpc probe's port must be a number")
                    if isinstance(port, str):
                        if port not in ports:
                            fail(cw, f"{pw}: no container port named {port}")
                        port = ports.get(port)
                    elif port not in numbers:
                        fail(cw, f"{pw}: port {port} is not a containerPort")
                    return kind, port, probe[kind]
            fail(cw, f"{pw}: neither grpc, httpGet nor tcpSocket")
            return None, None, {}

        for pw in ("startupProbe", "livenessProbe", "readinessProbe"):
            if not c.get(pw):
                continue
            kind, port, body = probe_port(c[pw], pw)
            if role == "router" and pw == "readinessProbe":
                want = host_port(flags["http-listen"][1])[1] if "http-listen" in flags else None
                if kind != "httpGet" or body.get("path") != "/health" or port != want:
                    fail(cw, f"{pw}: the router is ready when HTTP GET /health on its "
                             f"--http-listen port ({want}) answers")
            elif kind != "grpc" or port != grpc_port:
                fail(cw, f"{pw}: a grpc.health.v1 probe (grpc: port) on the --listen port "
                         f"({grpc_port})")
            elif role == "router" and body.get("service") in (None, "", ROUTER_GATED):
                # router/readiness.h: "" and Generation are NOT_SERVING until the cluster can
                # serve (minutes of weight loading): a liveness probe on them kills the router.
                fail(cw, f"{pw}: name a service that is SERVING while the router lives "
                         f"(grpc.service: splitmoe.v1.ClusterInfo), not {body.get('service')!r}")
            if kind == "grpc" and mode == "tls" and role in WORKERS:
                fail(cw, f"{pw}: with mutual TLS the worker's port asks every caller for a "
                         "client certificate, which the kubelet's gRPC probe cannot present")
        if role in WORKERS and mode == "tls":
            fail(cw, "mutual TLS on Kubernetes: a worker registers its pod IP, which a "
                     "certificate shared by a Deployment's pods cannot name (deploy/README.md)")

    modes = {c["_mode"] for _, c, *_ in containers}
    if len(modes) > 1:
        fail("deploy/k8s", f"the roles' internal planes differ: {sorted(modes)}")

    # Services: selectors that select, ports that exist.
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for s in services.values():
        sw = name_of(s)
        selector = (s.get("spec") or {}).get("selector") or {}
        chosen = [(o, c) for o, c, *_ in containers
                  if selector and all(template_labels(o).get(k) == v for k, v in selector.items())]
        if not chosen:
            fail(sw, "its selector matches no pod template")
        for p in (s.get("spec") or {}).get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            for o, c in chosen:
                ports = ports_of[id(c)]
                if (isinstance(target, str) and target not in ports) or \
                        (isinstance(target, int) and target not in ports.values()):
                    fail(sw, f"port {p.get('name')}: {name_of(o)} has no container port {target}")
    routers = [(o, c) for o, c, cw, role, *_ in containers if role == "router"]
    if len(routers) < 1:
        fail("deploy/k8s", "no router Deployment")
    public = [s for s in services.values()
              if any(p.get("port") == 50051 for p in s["spec"].get("ports") or [])]
    for want_port, name in ((50051, "grpc"), (8000, "http"), (9400, "metrics")):
        if not any(p.get("port") == want_port and p.get("name") == name
                   for s in public for p in s["spec"].get("ports") or []):
            fail("router Service", f"no port {name} {want_port} beside grpc 50051")

    # Workers reach the router's internal port through a Service.
    for o, c, cw, role, flags, *_ in containers:
        if role not in WORKERS or "router" not in flags:
            continue
        for address in flags["router"][1].split(","):
            host, port = host_port(address.strip())
            service = services.get((host or "").split(".")[0])
            if service is None or port is None:
                fail(cw, f"--router: {address} is not SERVICE:PORT of a Service defined here")
                continue
            sp = [p for p in service["spec"].get("ports") or [] if p.get("port") == port]
            if not sp:
                fail(cw, f"--router: Service {host} has no port {port}")
                continue
            if service["spec"].get("publishNotReadyAddresses") is not True:
                fail(cw, f"--router: Service {host} lacks publishNotReadyAddresses: true (the "
                         "router is not Ready until workers register through it)")
            selector = service["spec"].get("selector") or {}
            for ro, rc in routers:
                if not all(template_labels(ro).get(k) == v for k, v in selector.items()):
                    continue
                target = sp[0].get("targetPort", port)
                number = ports_of[id(rc)].get(target) if isinstance(target, str) else target
                if number != rc.get("_internal_port"):
                    fail(cw, f"--router: {address} reaches router port {number}, not its "
                             f"--internal-listen port {rc.get('_internal_port')}")

    # Expert shards: 0..N-1, one pool each, each with an autoscaler and a disruption budget.
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    shards, counts = {}, set()
    for o, c, cw, role, flags, *_ in containers:
        if role != "expert":
            continue
        try:
            shard = int(flags.get("shard", (None, "x"))[1])
            counts.add(int(flags.get("num-shards", (None, "x"))[1]))
        except ValueError:
            fail(cw, "--shard and --num-shards must be integers")
            continue
        if shard in shards:
            fail(cw, f"shard {shard} has two pools ({name_of(shards[shard])})")
        shards[shard] = o
        targets = [h for h in hpas if (h["spec"].get("scaleTargetRef") or {}).get("name") ==
                   o["metadata"]["name"] and h["spec"]["scaleTargetRef"].get("kind") == o["kind"]]
        if len(targets) != 1:
            fail(cw, f"expected one HorizontalPodAutoscaler for the pool, found {len(targets)}")
        for h in targets:
            lo, hi = h["spec"].get("minReplicas", 1), h["spec"].get("maxReplicas", 0)
            if not 1 <= lo <= hi:
                fail(name_of(h), f"minReplicas {lo} / maxReplicas {hi}")
            if h["spec"]["scaleTargetRef"].get("apiVersion") != "apps/v1":
                fail(name_of(h), "scaleTargetRef.apiVersion is not apps/v1")
        if "replicas" in o["spec"]:
            fail(cw, "sets spec.replicas, which every `kubectl apply` would reset under its "
                     "autoscaler")
        labels = template_labels(o)
        if not any(all(labels.get(k) == v for k, v in
                       ((p["spec"].get("selector") or {}).get("matchLabels") or {}).items())
                   and (p["spec"].get("selector") or {}).get("matchLabels") == o["spec"][
                       "selector"]["matchLabels"] for p in pdbs):
            fail(cw, "no PodDisruptionBudget selects exactly this pool")
    if len(counts) > 1:
        fail("expert pools", f"--num-shards differs between pools: {sorted(counts)}")
    if counts and shards:
        n = counts.pop()
        if sorted(shards) != list(range(n)):
            fail("expert pools", f"--num-shards={n} but the pools serve shards {sorted(shards)}")
        check_generated(repo, k8s, n)
    elif not shards:
        fail("deploy/k8s", "no expert pool")
    for o, c, cw, role, *_ in containers:
        if role in ("router", "prefill", "decode") and not isinstance(o["spec"].get("replicas"),
                                                                       int):
            fail(cw, "no spec.replicas (its replica count)")
    for h in hpas:
        target = (h["spec"].get("scaleTargetRef") or {})
        if (target.get("kind"), target.get("name")) not in defined:
            fail(name_of(h), f"scales {target.get('kind')}/{target.get('name')}, not defined")

    # Operator-provided objects that nothing references are stale.
    for key in provided:
        if key not in referenced:
            fail("deploy/k8s/operator-provided.txt", f"{key[0]} {key[1]} is referenced nowhere")
        if key in defined:
            fail("deploy/k8s/operator-provided.txt", f"{key[0]} {key[1]} is also defined")


def check_generated(repo, k8s, n):
    """experts.yaml is gen-experts.sh's output (with the settings its header records)."""
    path = os.path.join(k8s, "experts.yaml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^# Generated by deploy/k8s/gen-experts\.sh (\d+)(.*)$", text, re.M)
    if not m:
        fail("deploy/k8s/experts.yaml", "has no gen-experts.sh header")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPERT_")}
    env.update(dict(re.findall(r"(EXPERT_[A-Z_]+)=(\S+)", m.group(2))))
    r = subprocess.run(["bash", os.path.join(k8s, "gen-experts.sh"), m.group(1), "--stdout"],
                       env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail("deploy/k8s/gen-experts.sh", r.stderr.strip())
    elif r.stdout != text:
        fail("deploy/k8s/experts.yaml", "differs from `deploy/k8s/gen-experts.sh "
             f"{m.group(1)}`'s output: edit the script, not the file, and run it")
    if int(m.group(1)) != n:
        fail("deploy/k8s/experts.yaml", f"header says {m.group(1)} shards, args say {n}")


def probe_binary(binary, containers, tmp):
    """Runs `splitmoe ROLE` with each container's flags (addresses on loopback, a model
    directory that does not exist): the flags are all accepted, with valid values, when the
    process gets as far as opening the model."""
    token = os.path.join(tmp, "token")
    with open(token, "w") as f:
        f.write("manifest-check-token-0123456789\n")
    keys = os.path.join(tmp, "api-keys")
    with open(keys, "w") as f:
        f.write("manifest-check-key\n")
    seen = set()
    for o, c, cw, role, flags, *_ in containers:
        argv = [binary, role]
        for name, (raw, value) in flags.items():
            if name == "model":
                value = PROBE_MODEL
            elif name.endswith("listen"):
                value = "127.0.0.1:0"
            elif name == "router":
                value = ",".join("127.0.0.1:9" for _ in value.split(","))
            elif name == "cluster-token-file" and value:
                value = token
            elif name == "api-keys" and value:
                value = keys
            elif name in ("tls-cert", "tls-key", "tls-ca") and value:
                continue  # TLS material is checked above; the probe runs with the token
            argv.append(f"--{name}" if value is None else f"--{name}={value}")
        if tuple(argv) in seen:
            continue
        seen.add(tuple(argv))
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            out = (r.stdout + r.stderr).strip()
        except subprocess.TimeoutExpired:
            fail(cw, f"`{' '.join(argv)}` did not stop within 60 s")
            continue
        if PROBE_MODEL not in out:
            fail(cw, f"splitmoe {role} refuses these args: {out.splitlines()[-1] if out else r.returncode}")


if __name__ == "__main__":
    sys.exit(main())
