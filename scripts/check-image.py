"""The container image checked against what deploys it (scripts/check-image).

No container runtime works on the machines this project is developed and
tested on, and no image registry is reachable, so deploy/Dockerfile is never
built here. Instead it is parsed (PyPI `dockerfile`, Docker's own parser)
and held to the Helm chart and the kustomize base:

- every base image pinned to a version (or a digest), the build stage's
  Rust no older than the workspace's `rust-version`, build and runtime on
  the same Debian release (the binaries link against its glibc);
- a numeric, non-root `USER uid:gid` equal to the pods' `runAsUser` and
  `runAsGroup` (a kubelet can only enforce `runAsNonRoot` on a numeric one);
- every executable the chart's containers run (their `command`, or the
  image's ENTRYPOINT) copied into the runtime stage from what the build
  stage's `cargo build` produces, and every subcommand they pass one the
  binary accepts: the same `cargo build` line is run here (skipped with
  STAMPEDE_IMAGE_SKIP_BUILD=1) and each container's arguments are given to
  the binary it built, with `--help`;
- the ports the processes listen on (the image's ENV, overridden by the
  chart's ConfigMap) bound to all interfaces and equal to the ports the
  probes and Services name;
- no secret baked in: no ENV, ARG or LABEL holding a token, password or a
  URL with credentials, the runtime stage copying nothing from the build
  context, and a .dockerignore keeping data directories, environment
  files and the VCS out of the context.
"""
import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import dockerfile
import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CHART = ROOT / "helm" / "stampede"
BASE = ROOT / "deploy" / "kubernetes" / "base"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|_KEY$", re.I)
URL_WITH_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@", re.I)
# What the build context must never carry: local data directories (their
# store.db holds actors' private keys), environment files, build output.
MUST_IGNORE = [".git", "target", "data", "*.env", ".env", "**/*.db"]

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg):
    print(f"ok   {msg}")


def stages(commands):
    """The stages in order: (name or None, image, [commands])."""
    out = []
    for c in commands:
        if c.cmd == "FROM":
            v = c.value
            name = v[2] if len(v) >= 3 and v[1].upper() == "AS" else None
            out.append((name, v[0], []))
        elif out:
            out[-1][2].append(c)
    return out


def check_pins(st):
    before = len(failures)
    names = {n for n, _, _ in st if n}
    debian = {}
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())
    msrv = tuple(int(x) for x in workspace["workspace"]["package"]["rust-version"].split("."))
    for name, image, _ in st:
        if image in names:
            continue
        repo, _, tag = image.partition(":")
        if "@sha256:" in image:
            ok(f"{image}: pinned by digest")
        elif not tag or tag == "latest" or not re.match(r"^\d+\.\d+", tag):
            fail(f"base image {image} is not pinned to a version (want e.g. rust:1.95.0-bookworm, debian:12.11-slim)")
            continue
        if repo == "rust":
            version = tuple(int(x) for x in re.match(r"^(\d+)\.(\d+)", tag).groups())
            if version < msrv[:2]:
                fail(f"{image}: Rust {version} is older than the workspace's rust-version {msrv}")
        release = "12" if ("bookworm" in tag or repo == "debian" and tag.startswith("12")) else tag
        debian[name or "runtime"] = release
    if len(set(debian.values())) > 1:
        fail(f"build and runtime stages on different Debian releases: {debian}")
    if len(failures) == before:
        ok(f"base images pinned: {', '.join(i for n, i, _ in st if i not in names)}")


def last_user(cmds):
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    return users[-1] if users else None


def chart_docs():
    chart = helm.Chart.load(str(CHART))
    out = chart.render({"migration": {"enabled": True}}, name="stampede", namespace="federation", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def kustomize_docs():
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = []
    for r in k["resources"]:
        docs.extend(d for d in yaml.safe_load_all((BASE / r).read_text()) if d)
    return docs


def pods(docs):
    """(where, pod spec) of every Deployment and Job."""
    for d in docs:
        if d.get("kind") in ("Deployment", "Job"):
            yield f"{d['kind']} {d['metadata']['name']}", d["spec"]["template"]["spec"]


def check_user(runtime_cmds, sources):
    before = len(failures)
    user = last_user(runtime_cmds)
    if user is None:
        fail("the runtime stage sets no USER: it would run as root")
        return
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        fail(f"USER {user} is not numeric (a kubelet cannot check runAsNonRoot on a name)")
        return
    if int(uid) == 0:
        fail("USER is root")
    for label, docs in sources:
        for where, pod in pods(docs):
            sc = pod.get("securityContext", {})
            if sc.get("runAsUser") is not None and sc["runAsUser"] != int(uid):
                fail(f"{label} {where}: runAsUser {sc['runAsUser']} is not the image's USER {uid}")
            if gid and sc.get("runAsGroup") is not None and sc["runAsGroup"] != int(gid):
                fail(f"{label} {where}: runAsGroup {sc['runAsGroup']} is not the image's group {gid}")
            if not gid and sc.get("runAsGroup") is not None:
                fail(f"{label} {where}: runAsGroup {sc['runAsGroup']} but the image's USER names no group")
    if len(failures) == before:
        ok(f"USER {user}: numeric, non-root, the pods' runAsUser/runAsGroup")


def build_outputs(build_cmds):
    """The cargo build line and the files the build stage puts in each
    directory: {dest dir: {file name: source path}}."""
    cargo, produced = None, {}
    for c in build_cmds:
        if c.cmd != "RUN":
            continue
        for part in re.split(r"&&|;", " ".join(c.value)):
            words = shlex.split(part)
            if words[:2] == ["cargo", "build"]:
                cargo = words
            elif words[:1] == ["cp"]:
                *srcs, dest = words[1:]
                for s in srcs:
                    produced.setdefault(dest.rstrip("/") + "/", {})[pathlib.PurePosixPath(s).name] = s
    return cargo, produced


def runtime_files(runtime_cmds, produced, build_name):
    """Files in the runtime image copied from the build stage: {path: source}."""
    files = {}
    for c in runtime_cmds:
        if c.cmd not in ("COPY", "ADD"):
            continue
        src_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
        *srcs, dest = c.value
        if src_stage is None:
            fail(f"runtime stage copies {srcs} from the build context (secrets or stray files would ship): copy from the build stage only")
            continue
        if src_stage != build_name:
            continue
        for s in srcs:
            for name, origin in produced.get(s.rstrip("/") + "/", {}).items():
                files[dest.rstrip("/") + "/" + name] = origin
    return files


def entrypoint(runtime_cmds):
    eps = [c for c in runtime_cmds if c.cmd == "ENTRYPOINT"]
    if not eps:
        return []
    if not eps[-1].json:
        fail("ENTRYPOINT in shell form: signals would reach /bin/sh, not stampede")
    return list(eps[-1].value)


def image_env(runtime_cmds):
    env = {}
    for c in runtime_cmds:
        if c.cmd == "ENV":
            v = list(c.value)
            env.update(zip(v[0::2], v[1::2]))
    return env


def run_build(cargo):
    """Runs the build stage's cargo line here; whether its binaries can be run."""
    if cargo is None:
        fail("the build stage has no cargo build line")
        return False
    if os.environ.get("STAMPEDE_IMAGE_SKIP_BUILD") == "1":
        print(f"skip the build stage's line (STAMPEDE_IMAGE_SKIP_BUILD=1): {' '.join(cargo)}")
        return False
    print(f"run  the build stage's line: {' '.join(cargo)}", flush=True)
    if subprocess.run(cargo, cwd=ROOT).returncode != 0:
        fail(f"the build stage's line failed here: {' '.join(cargo)}")
        return False
    return True


def check_commands(label, docs, files, ep, built, env):
    """Each container's executable is in the image; its arguments are
    accepted by the binary the build stage's cargo line built (when
    `built`); the ports it listens on are the ones its probes name."""
    before = len(failures)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    config = {}
    for d in docs:
        if d.get("kind") == "ConfigMap":
            config.update(d.get("data") or {})
    checked = set()
    for where, pod in pods(docs):
        for c in pod["containers"]:
            argv = (c.get("command") or ep) + (c.get("args") or [])
            if not argv:
                fail(f"{label} {where}/{c['name']}: runs nothing (no command, no ENTRYPOINT)")
                continue
            exe = argv[0]
            if exe not in files:
                fail(f"{label} {where}/{c['name']}: runs {exe}, which the build stage does not put in the image ({sorted(files)})")
                continue
            key = tuple(argv)
            if built and key not in checked:
                local = target / pathlib.PurePosixPath(files[exe]).relative_to("target")
                r = subprocess.run([str(local), *argv[1:], "--help"], capture_output=True, text=True)
                if r.returncode != 0:
                    fail(f"{label} {where}/{c['name']}: `{' '.join(argv[1:])}` is refused by {exe}: {r.stderr.strip()}")
            checked.add(key)
            # The ports it listens on, as the pod's environment sets them.
            effective = dict(env)
            effective.update(config)
            for e in c.get("env") or []:
                effective[e["name"]] = e.get("value", "")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
            for var, port_name in (("STAMPEDE_HTTP_ADDR", "http"), ("STAMPEDE_GRPC_ADDR", "grpc"), ("STAMPEDE_METRICS_ADDR", "metrics")):
                if port_name not in ports:
                    continue
                addr = effective.get(var, "")
                host, _, port = addr.rpartition(":")
                if host not in ("0.0.0.0", "[::]", "::"):
                    fail(f"{label} {where}/{c['name']}: {var}={addr} does not listen on every interface: probes and Services cannot reach it")
                if port != str(ports[port_name]):
                    fail(f"{label} {where}/{c['name']}: {var}={addr} but the {port_name} port is {ports[port_name]}")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe) or {}
                for kind in ("grpc", "httpGet", "tcpSocket"):
                    port = (p.get(kind) or {}).get("port")
                    if port is not None and port not in ports.values() and port not in ports:
                        fail(f"{label} {where}/{c['name']}: {probe} on port {port}, which the container does not listen on")
                if "exec" in p:
                    cmd = p["exec"]["command"][0]
                    if cmd not in files:
                        fail(f"{label} {where}/{c['name']}: {probe} runs {cmd}, which is not in the image")
    runs = ", ".join(" ".join(a) for a in sorted(checked))
    if len(failures) == before:
        ok(f"{label}: every container runs a binary of the build stage ({runs}){' accepted by the binary built here' if built else ''}")


def check_secrets(all_cmds):
    for c in all_cmds:
        if c.cmd in ("ENV", "ARG", "LABEL"):
            v = list(c.value)
            pairs = zip(v[0::2], v[1::2]) if c.cmd != "ARG" else (tuple(x.split("=", 1) + [""])[:2] for x in v)
            for k, val in pairs:
                if SECRET_NAME.search(k) and val:
                    fail(f"line {c.start_line}: {c.cmd} {k} bakes a secret into the image")
                if URL_WITH_CREDENTIALS.search(val):
                    fail(f"line {c.start_line}: {c.cmd} {k} holds a URL with credentials")
    ignore_file = ROOT / ".dockerignore"
    if not ignore_file.exists():
        fail(".dockerignore missing: `COPY . .` would send data directories (actors' private keys), .env files and .git")
        return
    ignored = {l.strip() for l in ignore_file.read_text().splitlines() if l.strip() and not l.startswith("#")}
    missing = [p for p in MUST_IGNORE if p not in ignored]
    if missing:
        fail(f".dockerignore does not exclude {missing}")
        return
    ok("no secrets in ENV/ARG/LABEL; the context excludes " + ", ".join(MUST_IGNORE))


def check(text, build):
    """Every check of the Dockerfile `text`; `build` runs its cargo line."""
    cmds = dockerfile.parse_string(text)
    st = stages(cmds)
    if len(st) < 2:
        fail("deploy/Dockerfile is not multi-stage")
        return
    (build_name, _, build_cmds), (_, _, runtime_cmds) = st[0], st[-1]
    ok(f"parsed: {len(st)} stages, {len(cmds)} instructions")
    check_pins(st)
    chart, base = chart_docs(), kustomize_docs()
    check_user(runtime_cmds, [("chart", chart), ("kustomize", base)])
    cargo, produced = build_outputs(build_cmds)
    files = runtime_files(runtime_cmds, produced, build_name)
    ep = entrypoint(runtime_cmds)
    env = image_env(runtime_cmds)
    built = run_build(cargo) if build else False
    if built:
        # Every file the build stage copies out was made by its cargo line.
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        for origin in sorted({o for d in produced.values() for o in d.values()}):
            local = target / pathlib.PurePosixPath(origin).relative_to("target")
            if not local.is_file():
                fail(f"the build stage copies {origin}, which its cargo line does not make")
    check_commands("chart", chart, files, ep, built, env)
    check_commands("kustomize base", base, files, ep, built, env)
    check_secrets(cmds)


# Each of these breaks the real Dockerfile in one way the checks must catch.
BREAKAGES = [
    ("rust:1.95.0-bookworm", "rust:1-bookworm"),
    ("debian:12.11-slim", "debian:latest"),
    ("debian:12.11-slim", "debian:13.1-slim"),
    ("USER 10001:10001", "USER stampede"),
    ("USER 10001:10001", "USER 10002:10001"),
    ("USER 10001:10001", "USER 0"),
    ("COPY --from=build /out/ /usr/local/bin/", "COPY --from=build /out/ /opt/stampede/"),
    ("cp target/release/stampede target/release/stampede-ingest", "cp target/release/stampede-ingest"),
    ('ENTRYPOINT ["/usr/local/bin/stampede"]', 'ENTRYPOINT /usr/local/bin/stampede'),
    ("STAMPEDE_GRPC_ADDR=0.0.0.0:50051", "STAMPEDE_GRPC_ADDR=0.0.0.0:50051 STAMPEDE_API_TOKEN=0123456789abcdef"),
    ("STAMPEDE_LOG_FORMAT=json", "STAMPEDE_LOG_FORMAT=json STAMPEDE_DATABASE_URL=postgres://stampede:hunter2@db/stampede"),
    ("COPY --from=build /out/ /usr/local/bin/", "COPY --from=build /out/ /usr/local/bin/\nCOPY .env /etc/stampede.env"),
]


def main():
    text = DOCKERFILE.read_text()
    print("deploy/Dockerfile:")
    check(text, build=True)
    real = list(failures)
    caught = 0
    for old, new in BREAKAGES:
        assert old in text, f"breakage {old!r} no longer applies to deploy/Dockerfile"
        before = len(failures)
        with contextlib.redirect_stdout(io.StringIO()):
            check(text.replace(old, new, 1), build=False)
        if len(failures) > before:
            caught += 1
        else:
            real.append(f"the checks let a broken Dockerfile through: {old!r} -> {new!r}")
            print(f"FAIL {real[-1]}")
        del failures[before:]
    failures[:] = real
    if caught == len(BREAKAGES):
        ok(f"each of {caught} broken variants of the Dockerfile is caught")


main()
if failures:
    print(f"{len(failures)} image check(s) failed")
    sys.exit(1)
print("image checks passed (the image itself was not built: no container runtime here)")
