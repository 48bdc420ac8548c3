"""An aarch64 CPython with the edge SDK installed, runnable on this x86 machine (no Pi needed).

Owns: building and running the emulated environment under ``.cache/arm/`` (gitignored).
Everything comes from the package registries, so it works on a fresh clone:

* ``qemu/``: qemu user mode from Debian's backports (10.0; the release's own 7.2 crashes at
  ``import onnxruntime`` 1.31.1), fetched with ``apt-get download`` and unpacked, not
  installed. It runs aarch64 Linux binaries; no binfmt is needed because we call
  ``qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11`` explicitly.
* ``rootfs/``: Debian arm64 packages for CPython 3.11 and its shared libraries, fetched with
  ``apt-get download`` into a private APT state (the host's package state is not touched) and
  unpacked with ``dpkg -x``.
* ``wheels/``: aarch64 wheels of the project's device extras, resolved by
  ``pip download --platform ..._aarch64`` from the project's own wheel, so the extra's declared
  dependencies are exactly what gets installed.
* ``site-edge/``, ``site-litert/``: ``fedge[edge]`` and ``fedge[litert]`` each installed alone
  (``pip install --target``); a device script runs with one of them as its only site dir. The
  project's own packages are refreshed in place when the work tree changes.
* ``pip-check.json``: pip run *by the emulated python*, as on a Pi, must resolve each extra to
  the same distributions (done once per dependency set: minutes under emulation).

Each layer is rebuilt only when what decides its content changes (a key in ``build.json``);
``build.json`` also keeps each layer's cold build time. Must not import project packages: it
runs before anything is installed and only shells out.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "arm"
RECORD = CACHE / "build.json"
PIP_CHECK = CACHE / "pip-check.json"
# Static x86_64 binaries of qemu user mode (Debian package); only qemu-aarch64 is used.
QEMU_PACKAGE = "qemu-user"
QEMU = CACHE / "qemu" / "usr" / "bin" / "qemu-aarch64"
PYTHON_IN_ROOT = "usr/bin/python3.11"

# Roots of the Debian dependency closure: the interpreter, its stdlib, and the C++ runtime that
# onnxruntime and LiteRT link against.
DEB_ROOTS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
# Reached through mailcap / dpkg only; a Python process never loads them.
DEB_SKIP = frozenset(
    {"perl", "perl-base", "perl-modules-5.36", "libperl5.36", "dpkg", "tar", "install-info",
     "mailcap", "mime-support", "media-types"}
)
# pip matches --platform tags literally (no expansion to older glibc levels), so list the
# manylinux levels wheels are published under; Debian 12 / Raspberry Pi OS 12 have glibc 2.36.
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
PIP_TARGET = ("--only-binary=:all:", *(f"--platform={p}" for p in PLATFORMS),
              "--python-version=3.11", "--implementation=cp", "--abi=cp311")
CONSTRAINTS = (REPO / "constraints.txt", Path(__file__).with_name("constraints-aarch64.txt"))
# What the project wheel is built from; a change reinstalls only the project's own packages.
PROJECT_SOURCES = ("pyproject.toml", "README.md", "edge_sdk", "model_export", "coordinator",
                   "fedge")
EXTRAS = ("edge", "litert")


def log(msg: str) -> None:
    print(f"[arm] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Env:
    """A built environment: where things are and how long building them took (cold)."""

    root: Path
    sites: dict[str, Path]
    build_seconds: dict[str, float]
    rebuilt: tuple[str, ...]

    @property
    def env_build_seconds(self) -> float:
        """The cold build: every layer but the refresh of the project's own code."""
        return round(sum(v for k, v in self.build_seconds.items() if k != "project"), 1)

    def command(self, args: Sequence[str]) -> list[str]:
        # -S: no site module, so no dist-packages dir (the root's or, through qemu's -L
        # fallback, the host's) is on sys.path; the extra's site dir is the only one.
        return [str(QEMU), "-L", str(self.root), str(self.root / PYTHON_IN_ROOT), "-S", *args]

    def environ(self, extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(CACHE),
            "PYTHONPATH": str(self.sites[extra]),
            "PYTHONNOUSERSITE": "1",
        }

    def run(self, extra: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run the aarch64 python with ``args`` and the ``extra``'s site dir only (output
        captured; the caller checks the exit status)."""
        return subprocess.run(self.command(args), env=self.environ(extra), text=True,
                              capture_output=True, check=False)


def qemu_version() -> str:
    """``10.0.2`` for ``qemu-aarch64 version 10.0.2 (Debian ...)``."""
    first = _sh([str(QEMU), "--version"]).splitlines()[0]
    return first.split(" version ", 1)[1].split()[0]


def _sh(cmd: Sequence[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, cwd=cwd).stdout


def _pip(*args: str) -> None:
    # pip's chatter (build-backend deprecations, the host's find-links, a resolver note about
    # the *host* environment that does not apply to --target) is shown only when pip fails.
    out = subprocess.run([sys.executable, "-m", "pip", "--quiet", *args], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if out.returncode != 0:
        print(out.stdout, file=sys.stderr)
        raise SystemExit(f"[arm] pip {args[0]} failed (exit {out.returncode})")


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            for f in files:
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(str(f.relative_to(REPO) if f.is_relative_to(REPO) else f).encode())
                    h.update(f.read_bytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def _layer(record: dict[str, dict[str, object]], rebuilt: list[str], name: str, key: str,
           path: Path | None, build: Callable[[], None]) -> None:
    entry = record.get(name, {})
    if entry.get("key") == key and (path is None or path.exists()):
        log(f"{name}: up to date (cold build took {entry['seconds']} s)")
        return
    log(f"{name}: building")
    if path is not None and path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    build()
    seconds = round(time.perf_counter() - t0, 1)
    record[name] = {"key": key, "seconds": seconds}
    rebuilt.append(name)
    CACHE.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    log(f"{name}: built in {seconds} s")


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit("[arm] /etc/os-release names no VERSION_CODENAME: a Debian host is needed")


def _debian_archive(codename: str) -> str:
    """The Debian archive URI this host's APT is configured with (never a hard-coded mirror)."""
    query = ["apt-get", "indextargets", "--format", "$(REPO_URI)", "Created-By: Packages",
             f"Release: {codename}", "Component: main"]
    uris = sorted(set(_sh(query).split()))
    if not uris and os.geteuid() == 0:
        _sh(["apt-get", "update", "-qq"])
        uris = sorted(set(_sh(query).split()))
    if not uris:
        raise SystemExit(f"[arm] no APT source for {codename} main is configured on this host")
    return uris[0]


class _Apt:
    """A private APT state under ``.cache/arm/``: package lists and downloads for another
    architecture or suite never touch the host's (nothing is installed; ``dpkg -x`` only)."""

    def __init__(self, state: Path, arch: str, sources: str | None = None) -> None:
        shutil.rmtree(state, ignore_errors=True)
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "archives" / "partial").mkdir(parents=True)
        (state / "status").touch()
        self.options = [
            f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}",
            f"-oDir::State={state}", f"-oDir::State::status={state / 'status'}",
            f"-oDir::State::Lists={state / 'lists'}", f"-oDir::Cache={state}",
            f"-oDir::Cache::Archives={state / 'archives'}", "-oAPT::Sandbox::User=root",
            "-oDebug::NoLocking=1",
        ]
        if sources is not None:  # otherwise the host's sources, for this architecture
            (state / "sources.list").write_text(sources)
            (state / "sources.list.d").mkdir()
            self.options += [f"-oDir::Etc::SourceList={state / 'sources.list'}",
                             f"-oDir::Etc::SourceParts={state / 'sources.list.d'}"]
        self.state = state
        _sh(["apt-get", *self.options, "-q", "update"])

    def cache(self, *args: str) -> str:
        return _sh(["apt-cache", *self.options, *args])

    def unpack(self, names: Sequence[str], root: Path) -> list[str]:
        """``apt-get download`` the packages and ``dpkg -x`` each into ``root``."""
        debs = self.state / "debs"
        debs.mkdir(exist_ok=True)
        _sh(["apt-get", *self.options, "download", *names], cwd=debs)
        root.mkdir(parents=True, exist_ok=True)
        files = sorted(debs.glob("*.deb"))
        for deb in files:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        return [f.name for f in files]


def _fetch_qemu(qemu_dir: Path) -> None:
    # Debian 12's own qemu (7.2) crashes at `import onnxruntime` 1.31.1; the backports
    # build (10.0) runs it. Only the statically linked binary is used: nothing is installed.
    codename = _codename()
    sources = (f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
               f"{_debian_archive(codename)} {codename}-backports main\n")
    log(f"qemu: apt-get download qemu-user from {codename}-backports (private APT state)")
    apt = _Apt(CACHE / "apt-qemu", "amd64", sources)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        apt.unpack([QEMU_PACKAGE], Path(tmp))
        # The package holds an emulator for every architecture (360 MB); keep one.
        QEMU.parent.mkdir(parents=True)
        shutil.move(Path(tmp) / QEMU.relative_to(qemu_dir), QEMU)
    shutil.rmtree(apt.state)


def _build_rootfs(root: Path) -> None:
    log("rootfs: apt-get update (arm64 lists of the host's sources, private state)")
    apt = _Apt(CACHE / "apt-arm64", "arm64")
    closure = apt.cache("depends", "--recurse", "--no-recommends", "--no-suggests",
                        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                        *DEB_ROOTS)
    # Top-level lines are package names; indented lines are their dependency edges and
    # "<name>" lines are virtual packages that some real package provides.
    names = sorted({line for line in closure.splitlines()
                    if line and not line.startswith((" ", "<")) and line not in DEB_SKIP})
    log(f"rootfs: apt-get download and dpkg -x {len(names)} arm64 packages")
    debs = apt.unpack(names, root)
    (root / "fedge-packages.txt").write_text("\n".join(debs) + "\n")
    shutil.rmtree(apt.state)


def _build_project_wheel(dist: Path) -> Path:
    # Built from a copy so that no build/ or egg-info lands in the shared work tree.
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in PROJECT_SOURCES:
            p = REPO / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(p, src / name)
        shutil.rmtree(dist, ignore_errors=True)
        _pip("wheel", "--no-deps", "--wheel-dir", str(dist), str(src))
    (wheel,) = dist.glob("fedge-*.whl")
    return wheel


def _constraint_args() -> list[str]:
    return [a for c in CONSTRAINTS for a in ("-c", str(c))]


def _download_wheels(wheels: Path) -> None:
    wheel = _build_project_wheel(CACHE / "dist-resolve")
    spec = f"{wheel}[{','.join(EXTRAS)}]"
    log(f"wheels: pip download --platform aarch64 {spec.split('/')[-1]}")
    _pip("download", *PIP_TARGET, *_constraint_args(), "--dest", str(wheels), spec)
    (wheels / wheel.name).unlink()  # the project wheel is rebuilt with the site dirs


def _install_sites(sites: dict[str, Path], wheels: Path) -> None:
    wheel = _build_project_wheel(CACHE / "dist-resolve")
    for extra, site in sites.items():
        shutil.rmtree(site, ignore_errors=True)
        log(f"{site.name}: pip install --target fedge[{extra}] (aarch64 wheels only)")
        _pip("install", *PIP_TARGET, *_constraint_args(), "--no-index",
             "--find-links", str(wheels), "--target", str(site), f"{wheel}[{extra}]")
        shutil.rmtree(site / "bin", ignore_errors=True)  # x86 launcher of the console script


def _refresh_project(sites: dict[str, Path]) -> None:
    # The work tree changes far more often than the dependencies: replace only the project's
    # own packages (pip --upgrade swaps whole top-level package dirs, so removed modules go).
    wheel = _build_project_wheel(CACHE / "dist")
    for site in sites.values():
        log(f"{site.name}: pip install --target --no-deps --upgrade {wheel.name}")
        _pip("install", *PIP_TARGET, "--no-deps", "--upgrade", "--target", str(site), str(wheel))
        shutil.rmtree(site / "bin", ignore_errors=True)


def ensure_env() -> Env:
    """Build (or reuse) the environment, printing progress to stderr; concurrent callers
    (``./dev arm`` and the slow test) wait for each other instead of building twice."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_env()


def _ensure_env() -> Env:
    record: dict[str, dict[str, object]] = (
        json.loads(RECORD.read_text()) if RECORD.exists() else {})
    rebuilt: list[str] = []
    root, wheels = CACHE / "rootfs", CACHE / "wheels"
    sites = {extra: CACHE / f"site-{extra}" for extra in EXTRAS}
    _layer(record, rebuilt, "qemu", _digest(QEMU_PACKAGE, "backports"), CACHE / "qemu",
           lambda: _fetch_qemu(CACHE / "qemu"))
    _layer(record, rebuilt, "rootfs", _digest(DEB_ROOTS, sorted(DEB_SKIP)), root,
           lambda: _build_rootfs(root))
    _layer(record, rebuilt, "wheels", _digest(PIP_TARGET, EXTRAS, REPO / "pyproject.toml",
                                              *CONSTRAINTS), wheels,
           lambda: _download_wheels(wheels))
    if any(not s.exists() for s in sites.values()):
        record.pop("sites", None)
    _layer(record, rebuilt, "sites", str(record["wheels"]["key"]), None,
           lambda: _install_sites(sites, wheels))
    project_key = _digest(record["sites"]["key"], *(REPO / s for s in PROJECT_SOURCES))
    if "sites" in rebuilt:  # it just installed the current project wheel
        record["project"] = {"key": project_key, "seconds": 0.0}
    _layer(record, rebuilt, "project", project_key, None, lambda: _refresh_project(sites))
    env = Env(root=root, sites=sites, build_seconds={}, rebuilt=())
    if not PIP_CHECK.exists():
        record.pop("aarch64-pip", None)
    _layer(record, rebuilt, "aarch64-pip", str(record["sites"]["key"]), None,
           lambda: _check_pip_on_aarch64(env))
    seconds = {k: float(v["seconds"]) for k, v in record.items()}  # type: ignore[arg-type]
    return Env(root=root, sites=sites, build_seconds=seconds, rebuilt=tuple(rebuilt))


def _dists(site: Path) -> list[str]:
    """``name==version`` of every distribution installed in a site dir."""
    found = []
    for info in site.glob("*.dist-info"):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        found.append(f"{name.lower().replace('_', '-')}=={version}")
    return sorted(found)


def _check_pip_on_aarch64(env: Env) -> None:
    """What a Pi does: pip running on the aarch64 python resolves ``fedge[extra]`` by itself.
    Recorded in ``pip-check.json``: it must pick the same distributions the host installed
    into the site dir with ``--platform`` (slow under emulation, so done once per deps)."""
    tool = CACHE / "pip-tool"
    shutil.rmtree(tool, ignore_errors=True)
    _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(tool), "pip")
    (pip_wheel,) = tool.glob("pip-*.whl")
    project = _build_project_wheel(CACHE / "dist-resolve")
    result: dict[str, object] = {}
    for extra, site in env.sites.items():
        log(f"aarch64-pip: pip install fedge[{extra}] run by the emulated python itself")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            args = [f"{pip_wheel}/pip", "install", "--quiet", "--no-cache-dir", "--target", tmp,
                    *_constraint_args(), f"{project}[{extra}]"]
            # The host's pip config (local mirrors, find-links) must not leak in via qemu -L.
            environ = {**env.environ(extra), "PYTHONPATH": "", "PIP_CONFIG_FILE": os.devnull,
                       "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}
            done = subprocess.run(env.command(args), env=environ, text=True,
                                  capture_output=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"[arm] pip on aarch64 failed:\n{done.stderr[-3000:]}")
            native, ours = _dists(Path(tmp)), _dists(site)
        result[extra] = {"same": native == ours, "aarch64_pip": native, "host_pip": ours}
    PIP_CHECK.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tool)


def pip_check() -> dict[str, dict[str, object]]:
    """The last :func:`_check_pip_on_aarch64` result, per extra."""
    return dict(json.loads(PIP_CHECK.read_text()))


def main() -> int:
    env = ensure_env()
    out = env.run("edge", ["-c", "import platform, onnxruntime, numpy; print(platform.machine())"])
    if out.returncode != 0:
        raise SystemExit(f"[arm] the aarch64 python failed:\n{out.stderr}")
    log(f"aarch64 python says: {out.stdout.strip()}")
    print(json.dumps({"machine": out.stdout.strip(), "env_build_seconds": env.env_build_seconds,
                      "layers": env.build_seconds}))
    return 0 if out.stdout.strip() == "aarch64" else 1


if __name__ == "__main__":
    sys.exit(main())
