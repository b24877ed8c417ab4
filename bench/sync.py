"""Workspace sync: DO-LAB's engine beside ``aws s3 sync`` and ``rclone sync``, against one real S3 server.

One workspace (default: 10,000 files, about 1 GB: 9,900 small text files in 200 folders, 100 binary files of about
5 MB, six of 50 to 100 MB), one ``moto_server`` on a loopback port, one bucket, a prefix per tool. Each tool runs
the same four scenarios, each run as its own process (its wall time, and its peak RSS from ``getrusage``); scenario
by scenario, the tools one after the other on identical workspaces of their own:

1. ``full``: the first sync of the whole workspace;
2. ``unchanged``: a rerun with nothing changed;
3. ``1% changed``: 99 small files get a line appended, and 1 MiB is rewritten inside the 80 MB file, same size,
   with its mtime put back (an in-place rewrite tools that trust size and mtime cannot see);
4. ``older timestamps``: 50 small files and 2 binary files replaced by other content with an mtime one day older
   than before, as ``cp -p`` or ``tar x`` of an older copy leave them.

After every run the target is checked against the workspace: for ``aws`` and ``rclone``, every object's size and
ETag (MD5, or the multipart ETag for the part size that gives its part count) against the local file, plus missing
and extra keys; for DO-LAB, its latest snapshot is restored into an empty folder and compared file by file (SHA-256
and size). ``missed`` counts files whose stored content differs from the workspace after that run (a change
missed earlier still counts).

Tools: ``dolab`` (:class:`dolab_services.sync.engine.SyncEngine` with the S3 target and a hash cache, in a child
Python), ``aws`` (awscli's ``aws s3 sync --delete``; from ``$AWS_CLI``, else ``.dolab/bench-awscli/bin/aws``,
else ``aws`` on PATH: ``python3 -m venv .dolab/bench-awscli && .dolab/bench-awscli/bin/pip install awscli``),
``rclone`` (Debian's ``rclone sync``, its defaults: size and modtime) and ``rclone-fast`` (``--fast-list --update
--use-server-modtime``, the flags that make an unchanged rerun fast). A missing tool is skipped with a line.
Prints one table and the targets (DO-LAB's unchanged rerun at most 0.5x aws's time; full and 1% at most 1.0x;
zero missed changes; peak RSS at most rclone's); it asserts nothing::

    .venv/bin/python bench/sync.py [--scale 1.0] [--tools dolab,aws,rclone,rclone-fast] [--keep DIR]

``--scale 0.1`` makes a tenth of the files and bytes (a quick run). The moto server and the temporary folder are
removed on exit, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _signals import interrupts_as_keyboard_interrupt, uninterrupted

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "dolab-bench"


# ----- the workspace ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many files of each kind, and how big."""

    small_files: int
    folders: int
    binary_files: int
    binary_bytes: int
    big_mb: tuple[int, ...]

    @classmethod
    def scaled(cls, scale: float) -> Shape:
        big = tuple(max(1, round(mb * scale)) for mb in (50, 60, 70, 80, 90, 100))
        return cls(
            small_files=max(100, round(9900 * scale)),
            folders=max(2, round(200 * scale)),
            binary_files=max(2, round(100 * scale)),
            binary_bytes=5 * MiB,
            big_mb=big,
        )


def make_workspace(root: Path, shape: Shape, seed: int = 42) -> Path:
    """Write the workspace; returns the path of the 80 MB file (the fourth big one)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    pool = b" ".join(rng.choice(words) + (b"\n" if rng.random() < 0.1 else b"") for _ in range(40000))
    for i in range(shape.small_files):
        folder = root / f"notes/{i % shape.folders:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(0, len(pool) - 20000)
        (folder / f"note-{i:05d}.txt").write_bytes(pool[start : start + rng.randint(500, 9500)])
    (root / "data").mkdir()
    for i in range(shape.binary_files):
        (root / "data" / f"blob-{i:03d}.bin").write_bytes(
            rng.randbytes(rng.randint(shape.binary_bytes // 2, shape.binary_bytes * 3 // 2))
        )
    (root / "models").mkdir()
    for i, mb in enumerate(shape.big_mb):
        with open(root / "models" / f"model-{i}.bin", "wb") as f:
            for _ in range(mb):
                f.write(rng.randbytes(MiB))
    return root / "models" / "model-3.bin"


def change_one_percent(root: Path, shape: Shape, big: Path) -> None:
    """99 small files appended; 1 MiB rewritten inside the big file, same size, mtime put back."""
    notes = sorted(root.glob("notes/*/*.txt"))
    for path in notes[:: max(1, len(notes) // 99)][:99]:
        with open(path, "ab") as f:
            f.write(b"\nappended in the 1% scenario\n")
    st = big.stat()
    with open(big, "r+b") as f:
        f.seek(min(10 * MiB, st.st_size // 2))
        f.write(random.Random(7).randbytes(min(MiB, st.st_size // 4)))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))


def restore_older_copies(root: Path) -> None:
    """50 small and 2 binary files replaced by other content, their mtime a day older (cp -p / tar x)."""
    rng = random.Random(11)
    notes = sorted(root.glob("notes/*/*.txt"))
    blobs = sorted(root.glob("data/*.bin"))
    for path in notes[3 :: max(1, len(notes) // 50)][:50] + blobs[1:3]:
        st = path.stat()
        data = path.read_bytes()
        older = bytes(reversed(data)) if path.suffix == ".txt" else rng.randbytes(len(data))
        path.write_bytes(older)
        os.utime(path, ns=(st.st_mtime_ns - 86_400 * 10**9, st.st_mtime_ns - 86_400 * 10**9))


# ----- checks -----------------------------------------------------------------------------------------------


def _local_etags(path: Path) -> dict[str, str]:
    """MD5, and the multipart ETags this file would have for common part sizes."""
    whole = hashlib.md5(usedforsecurity=False)
    sizes = (5 * MiB, 8 * MiB, 16 * MiB, 64 * MiB)
    parts: dict[int, list[bytes]] = {s: [] for s in sizes}
    current = {s: hashlib.md5(usedforsecurity=False) for s in sizes}
    filled = dict.fromkeys(sizes, 0)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            whole.update(chunk)
            for s in sizes:
                current[s].update(chunk)
                filled[s] += len(chunk)
                if filled[s] >= s:
                    parts[s].append(current[s].digest())
                    current[s], filled[s] = hashlib.md5(usedforsecurity=False), 0
    etags = {"": whole.hexdigest()}
    for s in sizes:
        digests = parts[s] + ([current[s].digest()] if filled[s] else [])
        etags[f"{len(digests)}@{s}"] = (
            f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"
        )
    return etags


def check_bucket(s3: object, prefix: str, root: Path) -> int:
    """Files whose object is missing or differs, plus objects with no file."""
    stored: dict[str, tuple[int, str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):  # type: ignore[attr-defined]
        for obj in page.get("Contents", ()):
            stored[obj["Key"][len(prefix) + 1 :]] = (obj["Size"], obj["ETag"].strip('"'))
    missed = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in stored:
            missed += 1
            continue
        size, etag = stored.pop(rel)
        if size != path.stat().st_size or etag not in _local_etags(path).values():
            missed += 1
    return missed + len(stored)


def tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    """rel path -> (size, sha256) of every file."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(MiB), b""):
                h.update(chunk)
        out[path.relative_to(root).as_posix()] = (path.stat().st_size, h.hexdigest())
    return out


def check_dolab(endpoint: str, root: Path, scratch: Path) -> int:
    """Restore DO-LAB's latest snapshot into an empty folder and count the files that differ."""
    from dolab_services.sync.engine import SyncEngine
    from dolab_services.sync.s3 import S3Store

    out = scratch / "restored"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = S3Store(
        BUCKET,
        "dolab",
        endpoint_url=endpoint,
        access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
        secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    SyncEngine(store).restore(out)
    want, got = tree_digest(root), tree_digest(out)
    shutil.rmtree(out, ignore_errors=True)
    return sum(1 for k in want.keys() | got.keys() if want.get(k) != got.get(k))


# ----- tools ------------------------------------------------------------------------------------------------


@dataclass
class Tool:
    """A sync tool: the command that syncs ``root`` to its prefix, and how its result is checked."""

    name: str
    command: Callable[[Path], list[str]]
    env: dict[str, str]


def find_aws() -> str | None:
    for candidate in (
        os.environ.get("AWS_CLI", ""),
        str(REPO / ".dolab/bench-awscli/bin/aws"),
        shutil.which("aws") or "",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def tools(endpoint: str, scratch: Path, wanted: list[str]) -> list[Tool]:
    found: list[Tool] = []
    # The S3 server is plain HTTP on loopback: a CA bundle from the environment only breaks rclone's AWS SDK.
    base_env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"} | CREDS
    dolab_code = (
        "import json, sys; from pathlib import Path;"
        "from dolab_services.sync.engine import SyncEngine;"
        "from dolab_services.sync.s3 import S3Store;"
        f"s = S3Store({BUCKET!r}, 'dolab', endpoint_url={endpoint!r}, access_key_id='bench',"
        " secret_access_key='bench-secret', region_name='us-east-1');"
        f"r = SyncEngine(s).backup(Path(sys.argv[1]), cache_path=Path({str(scratch / 'dolab-cache.json.gz')!r}));"
        "print(json.dumps({'snapshot': r.snapshot, 'uploaded': r.uploaded_files, 'hashed': r.hashed_files}))"
    )
    for name in wanted:
        if name == "dolab":
            found.append(Tool(name, lambda root: [sys.executable, "-c", dolab_code, str(root)], base_env))
        elif name == "aws":
            aws = find_aws()
            if aws is None:
                print(
                    "aws: not found (python3 -m venv .dolab/bench-awscli && .dolab/bench-awscli/bin/pip install"
                    " awscli); skipped"
                )
                continue
            found.append(
                Tool(
                    name,
                    lambda root, aws=aws: [
                        aws,
                        "s3",
                        "sync",
                        str(root),
                        f"s3://{BUCKET}/aws",
                        "--delete",
                        "--only-show-errors",
                        "--endpoint-url",
                        endpoint,
                    ],
                    base_env,
                )
            )
        elif name in ("rclone", "rclone-fast"):
            rclone = shutil.which("rclone")
            if rclone is None:
                print(f"{name}: rclone not found (apt-get install rclone); skipped")
                continue
            env = {
                **base_env,
                "RCLONE_CONFIG_BENCH_TYPE": "s3",
                "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
                "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
                "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": CREDS["AWS_ACCESS_KEY_ID"],
                "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": CREDS["AWS_SECRET_ACCESS_KEY"],
                "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
            }
            flags = ["--fast-list", "--update", "--use-server-modtime"] if name == "rclone-fast" else []
            found.append(
                Tool(
                    name,
                    lambda root, f=flags, n=name, exe=rclone: [exe, "sync", str(root), f"bench:{BUCKET}/{n}", *f],
                    env,
                )
            )
    return found


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; (wall seconds, its peak RSS in MiB, its stdout). A small wrapper process runs it, so that the
    peak RSS (``RUSAGE_CHILDREN``) is this command's alone. Raises with its stderr when it fails."""
    wrapper = (
        "import json, resource, subprocess, sys, time;"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True);"
        "w = time.perf_counter() - t;"
        "print(json.dumps({'rc': p.returncode, 'wall': w,"
        " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " 'out': p.stdout.decode(errors='replace')[-500:], 'err': p.stderr.decode(errors='replace')[-2000:]}))"
    )
    reply = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, check=True)
    data = json.loads(reply.stdout)
    if data["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed ({data['rc']}): {data['err']}")
    return data["wall"], data["rss"], data["out"].strip()


# ----- the run ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        sys.exit("bench/sync.py needs moto_server: pip install -e '.[test]'")
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(url, timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    sys.exit("moto_server did not start")


SCENARIOS = ("full", "unchanged", "1% changed", "older timestamps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 10,000-file, 1 GB workspace")
    parser.add_argument("--tools", default="dolab,aws,rclone,rclone-fast", help="comma-separated tools to run")
    parser.add_argument("--keep", help="keep the workspaces in this folder (default: a temporary one, removed)")
    args = parser.parse_args()
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dolab-bench-sync-"))
    scratch.mkdir(parents=True, exist_ok=True)
    moto = None
    rows: list[tuple[str, str, float, float, int]] = []
    with interrupts_as_keyboard_interrupt():
        try:
            moto, endpoint = start_moto(scratch / "moto.log")
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket=BUCKET)
            shape = Shape.scaled(args.scale)
            chosen = tools(endpoint, scratch, args.tools.split(","))
            roots, bigs = {}, {}
            for tool in chosen:  # one identical workspace per tool
                roots[tool.name] = root = scratch / f"ws-{tool.name}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                t = time.perf_counter()
                bigs[tool.name] = make_workspace(root, shape)
                files = sum(1 for p in root.rglob("*") if p.is_file())
                size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
                print(
                    f"{tool.name}: workspace of {files} files, {size / MiB:.0f} MiB"
                    f" made in {time.perf_counter() - t:.1f} s",
                    flush=True,
                )
            # Scenario by scenario, the tools one after the other: a machine whose load drifts treats them alike.
            for scenario in SCENARIOS:
                for tool in chosen:
                    root = roots[tool.name]
                    if scenario == "1% changed":
                        change_one_percent(root, shape, bigs[tool.name])
                    elif scenario == "older timestamps":
                        restore_older_copies(root)
                    wall, rss, out = measured(tool.command(root), tool.env)
                    if tool.name == "dolab":
                        missed = check_dolab(endpoint, root, scratch)
                    else:
                        missed = check_bucket(s3, tool.name, root)
                    rows.append((scenario, tool.name, wall, rss, missed))
                    print(
                        f"{scenario:17} {tool.name:12} {wall:7.2f} s  peak RSS {rss:6.0f} MiB  missed {missed}"
                        f"  {out[:100]}",
                        flush=True,
                    )
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            with uninterrupted():
                if moto is not None:
                    moto.terminate()
                    moto.wait(30)
                if not args.keep:
                    shutil.rmtree(scratch, ignore_errors=True)
    report(rows)
    return 0


def report(rows: list[tuple[str, str, float, float, int]]) -> None:
    print()
    print(f"{'scenario':17} {'tool':12} {'seconds':>8} {'peak RSS MiB':>13} {'missed':>7}")
    for scenario, tool, wall, rss, missed in rows:
        print(f"{scenario:17} {tool:12} {wall:8.2f} {rss:13.0f} {missed:7d}")
    by = {(s, t): (w, r, m) for s, t, w, r, m in rows}
    print()
    for scenario, factor in (("full", 1.0), ("unchanged", 0.5), ("1% changed", 1.0)):
        if (scenario, "dolab") in by and (scenario, "aws") in by:
            ratio = by[(scenario, "dolab")][0] / by[(scenario, "aws")][0]
            verdict = "met" if ratio <= factor else "NOT met"
            print(f"target {scenario}: DO-LAB {ratio:.2f}x aws s3 sync's time (at most {factor}x): {verdict}")
    dolab_missed = sum(m for (s, t), (_, _, m) in by.items() if t == "dolab")
    print(f"target zero missed changes: DO-LAB missed {dolab_missed}: {'met' if dolab_missed == 0 else 'NOT met'}")
    dolab_rss = max((r for (s, t), (_, r, _) in by.items() if t == "dolab"), default=0)
    rclone_rss = max((r for (s, t), (_, r, _) in by.items() if t == "rclone"), default=0)
    if dolab_rss and rclone_rss:
        verdict = "met" if dolab_rss <= rclone_rss else "NOT met"
        print(f"target peak RSS: DO-LAB {dolab_rss:.0f} MiB, rclone {rclone_rss:.0f} MiB: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
