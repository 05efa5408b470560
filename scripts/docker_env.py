#!/usr/bin/env python3
"""A private Docker engine and the dmoe image, on machines that have no Docker and no registry.

Used by ``tests/test_compose.py`` and ``scripts/compose_demo.py``; also a command::

    python scripts/docker_env.py prepare           # everything below, then stop the daemon
    python scripts/docker_env.py run -- CMD ...    # ... and run CMD with DOCKER_HOST set, then stop

Steps, each skipped when its result is already there:

1. **Packages.** ``docker.io``, ``docker-compose`` and ``debootstrap`` from apt if missing.
2. **Daemon.** Our own ``dockerd`` on a private socket and exec root in a short temp folder (unix
   socket paths are limited to ~108 bytes) with its data root in the cache folder, so images
   survive between runs. A lock on the data root keeps two runs from sharing it (the loser gets
   a throw-away data root). ``--bridge none``: we never touch a host ``docker0``; compose creates
   its own networks. The daemon is stopped (SIGTERM, then SIGKILL) when we are done.
3. **Base image.** No registry, so Debian is bootstrapped with ``debootstrap --variant=minbase``
   plus python3, python3-venv, ca-certificates and iproute2 from the mirror and suite apt is
   configured with (read from ``/etc/apt/sources.list.d/*.sources`` or ``sources.list``), packed
   as a tarball in the cache and loaded with ``docker import``.
4. **Wheelhouse.** ``pip wheel`` on the host (whose pip already knows where the CPU torch wheel
   lives) of the project's dependencies, for the base image's Python version, kept in the cache.
5. **Image.** ``docker build --network none`` with ``BASE_IMAGE`` = the local base image and the
   wheelhouse placed in the build context (streamed as a tar, so the repository stays clean);
   the Dockerfile then installs with ``pip install --no-index --find-links``. Nothing is fetched.

Environment: ``DMOE_DOCKER_CACHE`` (cache folder, default ``~/.cache/dmoe-docker``),
``DMOE_DOCKER_SUITE`` (override the Debian suite), ``DMOE_DOCKER=system`` (use the already
running engine named by ``DOCKER_HOST`` or the default socket instead of a private one),
``DMOE_BASE_IMAGE`` (build on this image instead of the debootstrap one, e.g. ``python:3.11-slim``
on a machine that can pull it; the wheelhouse still makes the build itself offline).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout: import the repository's dmoe

from dmoe.sim.docker_api import DockerAPI, DockerAPIError  # noqa: E402

BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "iproute2")
APT_PACKAGES = {"dockerd": "docker.io", "docker": "docker.io", "debootstrap": "debootstrap"}
# What the image build needs from the checkout (the wheelhouse is added under docker/wheelhouse/).
CONTEXT_PATHS = ("Dockerfile", "pyproject.toml", "README.md", "dmoe", "node", "coordinator", "docker", "scenarios")
CONTEXT_MTIME = 1_577_836_800  # fixed mtimes keep build-cache keys stable (>= 1980 for zip)
DEFAULT_IMAGE = "dmoe:local"


class DockerEnvError(RuntimeError):
    """A preparation step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"[docker-env {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    path = Path(os.environ.get("DMOE_DOCKER_CACHE") or Path.home() / ".cache" / "dmoe-docker")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, quiet: bool = False,
        stdin: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; raise DockerEnvError with its output tail if it fails."""
    proc = subprocess.run(list(cmd), env={**os.environ, **(env or {})}, text=True, stdin=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise DockerEnvError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{tail}")
    if not quiet and proc.stdout.strip():
        print(proc.stdout.rstrip(), file=sys.stderr)
    return proc


# --- 1. packages -----------------------------------------------------------------------------------


def compose_command(env: dict[str, str] | None = None) -> list[str] | None:
    """``docker compose`` (v2 plugin) if present, else ``docker-compose`` (v1, Debian's package)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def ensure_packages(*, need_debootstrap: bool = True) -> None:
    missing = sorted({pkg for binary, pkg in APT_PACKAGES.items()
                      if shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
                      and (need_debootstrap or binary != "debootstrap")})
    if compose_command() is None:
        missing.append("docker-compose")
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DockerEnvError(f"missing {', '.join(missing)} and no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update", "-qq"], env=env, quiet=True)
    run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, quiet=True)


# --- 2. daemon ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    os.setsid()
    with contextlib.suppress(OSError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class PrivateDockerd:
    """``dockerd`` on its own socket, exec root and data root; ``stop()`` ends it."""

    data_root: Path | None = None  # None: <cache>/data-root if free, else a throw-away one
    state: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _lock: IO[str] | None = field(default=None, init=False)
    _own_data_root: bool = field(default=False, init=False)

    @property
    def socket(self) -> Path:
        return self.state / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket}"}

    def _pick_data_root(self) -> Path:
        if self.data_root is not None:
            return self.data_root
        shared = cache_dir() / "data-root"
        lock = open(cache_dir() / "data-root.lock", "w")  # noqa: SIM115 - held while the daemon runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            log("cached data root is in use by another run; using a throw-away one (slower build)")
            self._own_data_root = True
            return self.state / "data"
        self._lock = lock
        return shared

    def start(self, *, timeout: float = 90.0) -> PrivateDockerd:
        dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if dockerd is None:
            raise DockerEnvError("dockerd not found (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise DockerEnvError("a private dockerd needs root; run as root or set DMOE_DOCKER=system")
        self.state = Path(tempfile.mkdtemp(prefix="dmoe-dockerd-", dir="/tmp"))
        root = self._pick_data_root()
        root.mkdir(parents=True, exist_ok=True)
        cmd = [dockerd, "--host", f"unix://{self.socket}", "--data-root", str(root),
               "--exec-root", str(self.state / "x"), "--pidfile", str(self.state / "dockerd.pid"),
               "--bridge", "none", "--storage-driver", "overlay2", "--log-level", "warn"]
        log(f"starting dockerd on {self.socket} (data root {root})")
        logfile = open(self.state / "dockerd.log", "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        logfile.close()
        api = DockerAPI(str(self.socket), timeout=10)
        deadline = time.monotonic() + timeout
        while not api.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise DockerEnvError(f"dockerd did not come up; its log ends with:\n{tail}")
            time.sleep(0.3)
        self._prune(api)
        return self

    def _prune(self, api: DockerAPI) -> None:
        """Leftovers of an interrupted earlier run on the cached data root (ours alone: we hold its lock)."""
        for path in ("/containers/prune", "/networks/prune", "/volumes/prune"):
            with contextlib.suppress(DockerAPIError):
                api.request("POST", path)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.state / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            log("stopping dockerd")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its managed containerd and shims, if any remain
        self.proc = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if hasattr(self, "state"):
            shutil.rmtree(self.state, ignore_errors=True)


# --- 3. base image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]
    keyring: str | None


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields:
            yield fields


def apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """Binary (``deb``) sources apt is configured with, in apt's file order."""
    found: list[AptSource] = []
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list")) + sorted(
        (etc / "sources.list.d").glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for st in _deb822_stanzas(text):
                if "deb" not in st.get("types", "").split() or st.get("enabled", "yes").lower() == "no":
                    continue
                for uri in st.get("uris", "").split():
                    for suite in st.get("suites", "").split():
                        found.append(AptSource(uri, suite, tuple(st.get("components", "main").split()),
                                               st.get("signed-by") if "\n" not in st.get("signed-by", "") else None))
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                m = re.match(r"deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)\s*(?P<comps>.*)", line)
                if not m:
                    continue
                keyring = None
                for opt in (m["opts"] or "").split():
                    if opt.startswith("signed-by="):
                        keyring = opt.split("=", 1)[1]
                found.append(AptSource(m["uri"], m["suite"], tuple(m["comps"].split()) or ("main",), keyring))
    return found


def debian_source() -> AptSource:
    """The main Debian archive apt uses (not -updates/-security, not third-party repositories)."""
    wanted = os.environ.get("DMOE_DOCKER_SUITE")
    for src in apt_sources():
        if "security" in src.uri or "-" in src.suite or "main" not in src.components:
            continue
        if not (Path("/usr/share/debootstrap/scripts") / src.suite).exists() and not wanted:
            continue  # a third-party repository (its suite is not a Debian release)
        return AptSource(src.uri, wanted or src.suite, ("main",), src.keyring)
    raise DockerEnvError("no Debian mirror found in apt's sources (/etc/apt/sources.list[.d]); "
                         "add one or use DMOE_DOCKER=system with an engine that has a base image")


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


@dataclass(frozen=True)
class BaseImage:
    tag: str
    python: str  # "3.11"
    suite: str


def ensure_base_image(api: DockerAPI, docker_env: dict[str, str]) -> BaseImage:
    src = debian_source()
    stem = cache_dir() / f"base-{src.suite}-{_arch()}"
    tarball, meta_path = stem.with_suffix(".tar"), stem.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and tarball.exists() else None
    if meta is None or meta.get("packages") != list(BASE_PACKAGES):
        meta = _debootstrap(src, tarball)
        meta_path.write_text(json.dumps(meta, indent=1))
    base = BaseImage(tag=f"dmoe-base:{src.suite}", python=meta["python"], suite=src.suite)
    have = api.images(base.tag)
    stamp = stem.with_suffix(".imported")  # `docker import` cannot label, so remember the id it gave
    if have and stamp.exists() and stamp.read_text().strip() == f"{have[0]['Id']} {meta['sha']}":
        return base
    log(f"importing base image {base.tag} from {tarball.name}")
    run(["docker", "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["/bin/bash"]', str(tarball), base.tag],
        env=docker_env, quiet=True)
    stamp.write_text(f"{api.images(base.tag)[0]['Id']} {meta['sha']}\n")
    return base


def _debootstrap(src: AptSource, tarball: Path) -> dict[str, object]:
    debootstrap = shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if debootstrap is None:
        raise DockerEnvError("debootstrap not found (apt-get install debootstrap)")
    work = Path(tempfile.mkdtemp(prefix="dmoe-rootfs-", dir=cache_dir()))
    rootfs = work / "rootfs"
    cmd = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "--components=main"]
    if src.keyring and Path(src.keyring).exists():
        cmd.append(f"--keyring={src.keyring}")
    cmd += [src.suite, str(rootfs), src.uri]
    log(f"debootstrap {src.suite} from {src.uri} (about a minute) ...")
    t0 = time.monotonic()
    try:
        run(cmd, quiet=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        version = run(["chroot", str(rootfs), "python3", "-c",
                       "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"], quiet=True).stdout.strip()
        partial = tarball.with_suffix(".tar.partial")
        run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."], quiet=True)
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        partial.replace(tarball)
    finally:
        for mnt in ("proc", "sys", "dev/pts"):  # debootstrap unmounts on success; be sure on failure
            subprocess.run(["umount", "-l", str(rootfs / mnt)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    log(f"base rootfs ready in {time.monotonic() - t0:.0f}s (python {version})")
    return {"suite": src.suite, "mirror": src.uri, "python": version, "packages": list(BASE_PACKAGES),
            "sha": digest.hexdigest()[:16]}


# --- 4. wheelhouse ----------------------------------------------------------------------------------


def project_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    build = tomllib.loads((REPO / "pyproject.toml").read_text()).get("build-system", {}).get("requires", [])
    return sorted(set(project.get("dependencies", [])) | set(build) | {"wheel"})


def _python_for(version: str) -> str:
    """A host interpreter whose X.Y matches the image's, so pip picks wheels for the right ABI."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    for name in (f"python{version}", "python3"):
        exe = shutil.which(name)
        if exe and run([exe, "-c", "import sys, pip; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                       quiet=True).stdout.strip() == version:
            return exe
    raise DockerEnvError(f"the base image has Python {version} but no python{version} with pip exists on the host "
                         "to prepare a matching wheelhouse; set DMOE_DOCKER_SUITE to a suite with the host's Python")


def ensure_wheelhouse(python_version: str) -> Path:
    reqs = project_requirements()
    wheelhouse = cache_dir() / f"wheelhouse-cp{python_version.replace('.', '')}-{_arch()}"
    stamp = wheelhouse / ".requirements"
    if stamp.exists() and stamp.read_text().splitlines() == reqs:
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    python = _python_for(python_version)
    log(f"preparing wheelhouse {wheelhouse} with {python} -m pip wheel ({len(reqs)} requirements) ...")
    t0 = time.monotonic()
    req_file = wheelhouse / "requirements.in"
    req_file.write_text("\n".join(reqs) + "\n")
    run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheelhouse), "--find-links", str(wheelhouse),
         "-r", str(req_file)], quiet=True)
    stamp.write_text("\n".join(reqs) + "\n")
    log(f"wheelhouse ready in {time.monotonic() - t0:.0f}s")
    return wheelhouse


# --- 5. image ----------------------------------------------------------------------------------------


def _context_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in info.name or info.name.endswith((".pyc", ".pyo")):
        return None
    info.mtime = CONTEXT_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_context(stream: IO[bytes], wheelhouse: Path | None) -> None:
    """The build context as a tar stream: the checkout's CONTEXT_PATHS plus the wheelhouse."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for rel in CONTEXT_PATHS:
            if (REPO / rel).exists():
                tar.add(REPO / rel, arcname=rel, filter=_context_filter)
        if wheelhouse is not None:
            for whl in sorted(wheelhouse.glob("*.whl")):
                tar.add(whl, arcname=f"docker/wheelhouse/{whl.name}", filter=_context_filter)


def build_image(*, docker_env: dict[str, str], base_tag: str | None, wheelhouse: Path | None,
                tag: str = DEFAULT_IMAGE) -> None:
    cmd = ["docker", "build", "--network", "none", "-t", tag, "-f", "Dockerfile"]
    if base_tag:
        cmd += ["--build-arg", f"BASE_IMAGE={base_tag}"]
    cmd.append("-")
    log(f"building image {tag} (base {base_tag or 'default'}) ...")
    t0 = time.monotonic()
    env = {**os.environ, **docker_env, "DOCKER_BUILDKIT": "0"}  # classic builder: a tar context on stdin
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    out = io.BytesIO()

    import threading

    reader = threading.Thread(target=lambda: out.write(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        write_context(proc.stdin, wheelhouse)
    except BrokenPipeError:
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    code = proc.wait()
    reader.join()
    if code != 0:
        tail = "\n".join(out.getvalue().decode(errors="replace").splitlines()[-30:])
        raise DockerEnvError(f"docker build failed (exit {code}):\n{tail}")
    log(f"image {tag} built in {time.monotonic() - t0:.0f}s")


# --- all together ------------------------------------------------------------------------------------


class DockerEnv:
    """Context manager: packages, daemon, base image, wheelhouse, image; stops the daemon on exit.

    ``env`` holds DOCKER_HOST (and DMOE_IMAGE) for docker/compose commands run inside.
    """

    def __init__(self, *, image: str = DEFAULT_IMAGE, build: bool = True) -> None:
        self.image = image
        self.build = build
        self.system = os.environ.get("DMOE_DOCKER", "private") == "system"
        self.daemon: PrivateDockerd | None = None
        self.env: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.compose: list[str] = []

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    def __enter__(self) -> DockerEnv:
        t0 = time.monotonic()
        ensure_packages(need_debootstrap=self.build and not os.environ.get("DMOE_BASE_IMAGE"))
        self._timed("packages_s", t0)
        try:
            t0 = time.monotonic()
            if self.system:
                api = DockerAPI()
                if not api.ping():
                    raise DockerEnvError(f"DMOE_DOCKER=system but no engine answers at {api.socket_path}")
                self.env = {"DOCKER_HOST": f"unix://{api.socket_path}", "DOCKER_SOCKET": api.socket_path}
            else:
                self.daemon = PrivateDockerd().start()
                self.env = {**self.daemon.env, "DOCKER_SOCKET": str(self.daemon.socket)}
                api = DockerAPI(str(self.daemon.socket))
            self._timed("daemon_s", t0)
            self.env["DMOE_IMAGE"] = self.image
            compose = compose_command(self.env)
            if compose is None:
                raise DockerEnvError("neither `docker compose` nor `docker-compose` is available")
            self.compose = compose
            if self.build:
                t0 = time.monotonic()
                base = self._base_image(api)
                self._timed("base_image_s", t0)
                t0 = time.monotonic()
                wheelhouse = ensure_wheelhouse(base.python)
                self._timed("wheelhouse_s", t0)
                t0 = time.monotonic()
                build_image(docker_env=self.env, base_tag=base.tag, wheelhouse=wheelhouse, tag=self.image)
                with contextlib.suppress(DockerAPIError):  # earlier builds' images: gigabytes of old torch layers
                    api.request("POST", "/images/prune", query={"filters": json.dumps({"dangling": ["true"]})},
                                timeout=300)
                self._timed("image_s", t0)
        except BaseException:
            self.close()
            raise
        return self

    def _base_image(self, api: DockerAPI) -> BaseImage:
        """DMOE_BASE_IMAGE if given (any image with python3 + venv), else our debootstrap image."""
        tag = os.environ.get("DMOE_BASE_IMAGE")
        if not tag:
            return ensure_base_image(api, self.env)
        probe = run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", tag, "-c",
                     "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"], env=self.env, quiet=True)
        return BaseImage(tag=tag, python=probe.stdout.strip().splitlines()[-1], suite="")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docker_env.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=os.environ.get("DMOE_IMAGE", DEFAULT_IMAGE), help="tag of the dmoe image")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("prepare", help="install, start dockerd, build base image, wheelhouse and image, stop")
    run_p = sub.add_parser("run", help="prepare, then run a command with DOCKER_HOST set, then stop dockerd")
    run_p.add_argument("cmd", nargs=argparse.REMAINDER, help="command (after --)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        with DockerEnv(image=args.image) as denv:
            log(f"ready in {time.monotonic() - t0:.0f}s: {json.dumps(denv.timings)}")
            if args.what == "run":
                cmd = [c for c in args.cmd if c != "--"] or ["docker", "info"]
                return subprocess.call(cmd, env={**denv.run_env(), "DMOE_COMPOSE": " ".join(denv.compose)})
    except DockerEnvError as e:
        print(f"docker_env: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
