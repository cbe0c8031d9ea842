#!/usr/bin/python3
"""Offline checks of deploy/Dockerfile (run by check_dockerfile.sh; no docker needed).

  check_dockerfile.py --repo ROOT [--bin SPLITMOE]

- Structure: every stage FROM debian:12 and named; the build stage installs through
  scripts/setup.sh and builds with scripts/build.sh (no package list of its own); the runtime
  stage's apt-get install is update + install -y --no-install-recommends + list cleanup in one
  RUN; the last USER is numeric and not root; ENTRYPOINT is the exec form ["splitmoe"]; no ADD,
  no sudo, no `latest`, absolute WORKDIRs.
- Packages: every runtime package exists in this Debian 12 machine's apt lists (apt-cache).
- Libraries (with --bin): every shared library the binary loads (ldd) belongs (dpkg -S) to a
  package in the runtime packages' dependency closure (apt-cache depends --recurse), and every
  runtime package named provides one of them. CUDA's libraries (a GPU build's) and a sanitizer
  build's runtimes are left out: the image's build has neither.
- Files: what COPY takes from the context exists and deploy/Dockerfile.dockerignore keeps it;
  what COPY --from=build takes is what setup.sh and build.sh make (third_party/tokenizer's files,
  build/bin/splitmoe) and exists here after them; the ignore file keeps build trees out.
Prints every failure and exits 1 if there was one.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys

errors = []


def fail(message):
    errors.append(message)


def instructions(path):
    """[(line number, INSTRUCTION, arguments)] with continuations joined, comments dropped."""
    out, buf, start = [], "", 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if not buf and (not stripped or stripped.startswith("#")):
                continue
            if buf and stripped.startswith("#"):
                continue  # a comment inside a continued instruction
            if not buf:
                start = n
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            buf += stripped
            word, _, rest = buf.partition(" ")
            out.append((start, word.upper(), rest.strip()))
            buf = ""
    if buf:
        fail(f"deploy/Dockerfile:{start}: an instruction ends in a line continuation")
    return out


def ignored(patterns, rel):
    """Whether the ignore file keeps `rel` (a context path) out, dockerignore style: the last
    matching pattern wins, `!` re-includes, a pattern matching a parent directory covers it."""
    result = False
    parts = rel.split("/")
    for p in patterns:
        negate = p.startswith("!")
        p = p[1:] if negate else p
        p = p.strip("/")
        regex = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        for i in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:i])):
                result = not negate
                break
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--bin", default="")
    opts = ap.parse_args()
    repo = os.path.abspath(opts.repo)
    dockerfile = os.path.join(repo, "deploy", "Dockerfile")
    ins = instructions(dockerfile)
    with open(os.path.join(repo, "deploy", "Dockerfile.dockerignore"), encoding="utf-8") as f:
        patterns = [l.strip() for l in f if l.strip() and not l.strip().startswith("#")]

    # Stages.
    stages = []  # [name, [(line, instruction, args)]]
    for line, word, args in ins:
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            image, name = (m.group(1), m.group(2)) if m else (args, None)
            if image != "debian:12":
                fail(f"deploy/Dockerfile:{line}: FROM {image}: every stage is debian:12")
            if not name:
                fail(f"deploy/Dockerfile:{line}: name every stage (FROM debian:12 AS NAME)")
            stages.append([name, []])
        elif not stages:
            if word not in ("ARG",):
                fail(f"deploy/Dockerfile:{line}: {word} before FROM")
        else:
            stages[-1][1].append((line, word, args))
    names = [s[0] for s in stages]
    if len(stages) < 2 or "build" not in names:
        fail(f"deploy/Dockerfile: a multi-stage build with a `build` stage, got stages {names}")
        return report()
    build = dict(stages)["build"]
    runtime = stages[-1][1]
    if stages[-1][0] == "build":
        fail("deploy/Dockerfile: the last stage (the image) is the build stage")

    for line, word, args in ins:
        where = f"deploy/Dockerfile:{line}"
        if word == "ADD":
            fail(f"{where}: ADD: use COPY")
        if word == "MAINTAINER":
            fail(f"{where}: MAINTAINER is deprecated")
        if word == "RUN" and re.search(r"\bsudo\b", args):
            fail(f"{where}: sudo in RUN")
        if word == "WORKDIR" and not args.startswith("/"):
            fail(f"{where}: WORKDIR {args} is not absolute")
        if ":latest" in args:
            fail(f"{where}: a `latest` tag")
        if word == "RUN" and "|" in args.replace("||", "") and not any(
                w == "SHELL" and "pipefail" in a for _, w, a in ins if _ < line):
            fail(f"{where}: a pipe in RUN without SHELL [..., \"-o\", \"pipefail\", ...]")

    # Build stage: the project's own scripts.
    build_runs = " ".join(a for _, w, a in build if w == "RUN")
    if "./scripts/setup.sh" not in build_runs:
        fail("deploy/Dockerfile: the build stage does not run ./scripts/setup.sh")
    if "./scripts/build.sh" not in build_runs:
        fail("deploy/Dockerfile: the build stage does not run ./scripts/build.sh")
    # setup.sh runs `npm install` in folders of the repository: their package files must be in
    # the image before the RUN of setup.sh (the Dockerfile copies them ahead of the rest).
    with open(os.path.join(repo, "scripts", "setup.sh"), encoding="utf-8") as f:
        npm_dirs = re.findall(r"cd\s+([\w./-]+)\s*&&\s*npm\s+(?:install|ci)", f.read())
    copied = []
    for line, word, args in build:
        if word == "RUN" and "./scripts/setup.sh" in args:
            for d in npm_dirs:
                for name in ("package.json", "package-lock.json"):
                    path = f"{d}/{name}"
                    if os.path.exists(os.path.join(repo, path)) and not any(
                            c in (path, d, d + "/", ".") for c in copied):
                        fail(f"deploy/Dockerfile:{line}: scripts/setup.sh runs npm in {d}, "
                             f"but {path} is not copied before it")
            break
        if word == "COPY":
            copied += [w for w in shlex.split(args) if not w.startswith("--")][:-1]
    if re.search(r"apt-get\s+install", build_runs):
        fail("deploy/Dockerfile: the build stage installs packages itself; scripts/setup.sh "
             "names them")

    # Runtime stage: packages.
    installs = [(l, a) for l, w, a in runtime if w == "RUN" and re.search(r"apt-get\s+install", a)]
    packages = []
    for line, args in installs:
        where = f"deploy/Dockerfile:{line}"
        if not re.search(r"apt-get\s+update", args):
            fail(f"{where}: apt-get install without apt-get update in the same RUN")
        if "--no-install-recommends" not in args or not re.search(r"\s-y\b|--yes", args):
            fail(f"{where}: apt-get install needs -y --no-install-recommends")
        if "rm -rf /var/lib/apt/lists/*" not in args:
            fail(f"{where}: remove /var/lib/apt/lists/* in the same RUN")
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if "install" in words and any(w.endswith("apt-get") for w in words):
                packages += [w for w in words[words.index("install") + 1:] if not
                             w.startswith("-")]
    if not packages:
        fail("deploy/Dockerfile: the runtime stage installs no runtime libraries")
    for p in packages:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p) or "=" in p:
            fail(f"deploy/Dockerfile: {p!r} is not a package name")
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages],
                       capture_output=True, text=True)
    shown = set(re.findall(r"^Package: (\S+)$", r.stdout, re.M))
    for p in packages:
        if p not in shown:
            fail(f"deploy/Dockerfile: runtime package {p} is not in Debian 12's apt lists")

    # Libraries the binary loads, against the packages.
    if opts.bin:
        check_libraries(opts.bin, packages)

    # The user and the entry point.
    users = [a for _, w, a in runtime if w == "USER"]
    if not users:
        fail("deploy/Dockerfile: the image runs as root (no USER)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit() or uid == "0":
            fail(f"deploy/Dockerfile: USER {users[-1]}: a numeric non-root uid (Kubernetes' "
                 "runAsNonRoot can only verify a number)")
    entry = [a for _, w, a in runtime if w == "ENTRYPOINT"]
    if not entry or entry[-1].replace(" ", "") != '["splitmoe"]':
        fail(f"deploy/Dockerfile: ENTRYPOINT must be [\"splitmoe\"], got {entry}")

    # Files.
    for stage_name, body in stages:
        for line, word, args in body:
            where = f"deploy/Dockerfile:{line}"
            if word != "COPY":
                continue
            words = shlex.split(args) if not args.startswith("[") else []
            source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")),
                                None)
            paths = [w for w in words if not w.startswith("--")]
            if len(paths) < 2:
                fail(f"{where}: COPY needs a source and a destination")
                continue
            sources, dest = paths[:-1], paths[-1]
            if len(sources) > 1 and not dest.endswith("/"):
                fail(f"{where}: several sources need a destination ending in /")
            for s in sources:
                if source_stage is None:
                    if s == ".":
                        continue
                    if not os.path.exists(os.path.join(repo, s)):
                        fail(f"{where}: COPY {s}: not in the repository")
                    elif ignored(patterns, s):
                        fail(f"{where}: COPY {s}: deploy/Dockerfile.dockerignore leaves it out")
                elif source_stage == "build":
                    check_build_output(where, repo, build, s)
                else:
                    fail(f"{where}: COPY --from={source_stage}: not a stage of this file")
    for must in ("build", "build-asan", "tools/tokenizer-oracle/node_modules",
                 "third_party/tokenizer", ".git"):
        if not ignored(patterns, must):
            fail(f"deploy/Dockerfile.dockerignore: does not leave out {must}")
    return report()


def check_build_output(where, repo, build, path):
    """A path COPY --from=build takes: made by setup.sh or build.sh (or a RUN from them)."""
    runs = " ".join(a for _, w, a in build if w == "RUN")
    if path.startswith("/src/"):
        rel = path[len("/src/"):]
        if rel.startswith("third_party/tokenizer/"):
            with open(os.path.join(repo, "scripts", "setup.sh"), encoding="utf-8") as f:
                setup = f.read()
            if os.path.basename(rel) not in setup or "third_party/tokenizer" not in setup:
                fail(f"{where}: {path}: scripts/setup.sh does not put it there")
            if not os.path.isfile(os.path.join(repo, rel)):
                fail(f"{where}: {path}: absent here after scripts/setup.sh")
        elif rel.startswith("build/"):
            if os.path.basename(rel) == "splitmoe" and "./scripts/build.sh" in runs:
                check_binary_path(where, repo)
            else:
                fail(f"{where}: {path}: not something scripts/build.sh makes")
        elif not os.path.exists(os.path.join(repo, rel)):
            fail(f"{where}: {path}: not in the repository")
    elif path == "/usr/local/bin/splitmoe":
        if not re.search(r"build/bin/splitmoe\s+/usr/local/bin/splitmoe", runs):
            fail(f"{where}: {path}: no RUN of the build stage puts build/bin/splitmoe there")
        check_binary_path(where, repo)
    else:
        fail(f"{where}: COPY --from=build {path}: unknown build output")


def check_binary_path(where, repo):
    """build.sh's binary is build/bin/splitmoe: CMake's runtime output directory and target."""
    with open(os.path.join(repo, "CMakeLists.txt"), encoding="utf-8") as f:
        top = f.read()
    with open(os.path.join(repo, "tools", "cli", "CMakeLists.txt"), encoding="utf-8") as f:
        cli = f.read()
    if "CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin" not in top or \
            not re.search(r"add_executable\(splitmoe\b", cli):
        fail(f"{where}: build/bin/splitmoe is no longer where CMake puts the binary")


def check_libraries(binary, packages):
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"ldd {binary}: {r.stderr.strip()}")
        return
    libs = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m and m.group(2) != "not":
            libs[m.group(1)] = m.group(2)
        elif "not found" in line:
            fail(f"ldd {binary}: {line.strip()}")
    candidates = {}
    for name, path in libs.items():
        if path.startswith("/usr/local/cuda") or re.match(
                r"lib(cuda|cudart|cublas|cublasLt|cufft|curand|cusolver|cusparse|nccl|nvrtc|"
                r"nvJitLink|nvToolsExt)\b", name):
            continue  # this build's CUDA libraries; the image is built without CUDA
        real = os.path.realpath(path)
        candidates[name] = [p for p in dict.fromkeys(
            [path, real, "/usr" + path if path.startswith("/lib") else path,
             "/usr" + real if real.startswith("/lib") else real])]
    # One dpkg -S for all (it is slow per call): lines "pkg[, pkg]: /path".
    s = subprocess.run(["dpkg", "-S", *sorted({p for c in candidates.values() for p in c})],
                       capture_output=True, text=True)
    owner_of = {}
    for line in s.stdout.splitlines():
        pkgs, _, path = line.rpartition(": ")
        owner_of[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    owners = {}
    for name, paths in candidates.items():
        found = [owner_of[p] for p in paths if p in owner_of]
        if found:
            owners[name] = found[0]
        else:
            fail(f"{name} ({libs[name]}) belongs to no Debian package")
    r = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                        *packages], capture_output=True, text=True)
    closure = set(l.strip() for l in r.stdout.splitlines() if l and not l.startswith(" "))
    closure |= set(re.findall(r"^\s+([a-z0-9][a-z0-9+.-]+)$", r.stdout, re.M))
    # In every debian:12 image (Essential: yes, or required by apt).
    closure |= {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "liblzma5"}
    # A sanitizer build's runtimes (scripts/test.sh runs these checks in build-asan too): not
    # what a release build links.
    owners = {n: o for n, o in owners.items()
              if not re.fullmatch(r"lib(asan|ubsan|tsan|lsan|hwasan)\d+", o)}
    for name, owner in sorted(owners.items()):
        if owner.split(",")[0] not in closure:
            fail(f"{name} is in {owner}, which the runtime stage does not install (add it)")
    used = set(o.split(",")[0] for o in owners.values())
    for p in packages:
        if p not in used:
            fail(f"runtime package {p} provides no library the binary loads (drop it)")


def report():
    if errors:
        print(f"check_dockerfile: {len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
