"""Build the Kotlin project with Maven and run its JVM tools (also used by benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "android_bridge"
TARGET = PROJECT / "target"
MAIN_CLASS = "dev.fedge.android.tools.ToolsKt"


@dataclass(frozen=True)
class KotlinTools:
    classpath: str

    def command(self, *args: str) -> list[str]:
        java = shutil.which("java") or "java"
        return [java, "-cp", self.classpath, MAIN_CLASS, *args]

    def run(self, *args: str, timeout: float = 300.0) -> str:
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as err:
            return subprocess.Popen(self.command(*args), stdout=err, stderr=subprocess.STDOUT)


def mvn(*args: str) -> str:
    """Run Maven quietly on the project; its standard output."""
    exe = shutil.which("mvn")
    if exe is None:
        raise FileNotFoundError("Maven (mvn) is not installed")
    done = subprocess.run(
        [exe, "-B", "-q", "-Dstyle.color=never", "-f", str(PROJECT / "pom.xml"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
        env={**os.environ, "MAVEN_OPTS": os.environ.get("MAVEN_OPTS", "-Xmx1g")},
    )
    if done.returncode != 0:
        output = done.stdout[-4000:] + done.stderr[-2000:]
        raise RuntimeError(f"mvn {' '.join(args)} failed:\n{output}")
    return done.stdout


def build_tools() -> KotlinTools:
    """Compile main and test sources and list the runtime classpath, without android-all: the
    core, the trainer and the tools run on a plain JVM (org.json from Maven Central)."""
    listing = TARGET / "tools.classpath"
    mvn(
        "test-compile",
        "dependency:build-classpath",
        "-DincludeScope=test",
        "-DexcludeArtifactIds=android-all",
        f"-Dmdep.outputFile={listing}",
    )
    deps = listing.read_text().strip()
    parts = [str(TARGET / "classes"), str(TARGET / "test-classes"), deps]
    return KotlinTools(os.pathsep.join(parts))


def write_raw_data(directory: Path, x: np.ndarray, y: np.ndarray, **meta: object) -> Path:
    """The tools' data layout: ``meta.json``, ``x.f32`` and ``y.i64`` (little-endian)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(x, dtype="<f4")
    (directory / "x.f32").write_bytes(x.tobytes())
    (directory / "y.i64").write_bytes(np.ascontiguousarray(y, dtype="<i8").tobytes())
    body = {"n": len(y), "features": int(np.prod(x.shape[1:])), **meta}
    (directory / "meta.json").write_text(json.dumps(body))
    return directory


def read_f32(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").astype(np.float32)


__all__: Sequence[str] = ["KotlinTools", "build_tools", "mvn", "read_f32", "write_raw_data"]
