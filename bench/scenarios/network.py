"""network: a disk copied across a shaped link: nbdcopy over NBD/TCP, imageio, the engine.

Per link (10 Gbit/s; 1 Gbit/s with 10 ms RTT; 100 Mbit/s with 50 ms RTT): two fresh network
namespaces joined by a veth pair shaped by tc tbf (bench/harness/netns.py), the servers in the
source's (nbdkit serving the image over TCP, `transfer serve` and ovirt-imageio's daemon over
HTTPS), the clients in the target's, through a relay that delays each direction by half the
RTT. Every tool copies to null: (imageio's client, to a file in /dev/shm) and each copy's digest
is checked against the image's. Measured: wall (spawn to
reaping), bytes on the wire (the veth's counters, both directions), CPU-s per GiB of data on
each side. Workloads: a Debian root filesystem image (mmdebstrap, ext4 in a partitioned 4 GiB
raw disk, built once and cached) and the mixed synthetic image. Details: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from typing import Any

from transfer.cli import parse_size
from transfer.demo import file_digest

from ..harness.images import prepare_image
from ..harness.machine import (ENGINE, PYTHON, ROOT, GiB, MiB, allocated_bytes, fmt,
                               invalid_text, md_table, median, missing_programs, paired,
                               proc_cpu_seconds, provenance, say, size_text, walls)
from ..harness.measure import failed, json_result, measure
from ..harness.netns import SRC_IP, Link
from ..harness.runner import Context, Outcome, defaults, parser, reproduce

NAME = "network"
WORKDIR = True
LINKS = {"10g": (10_000_000_000, 0.0), "1g10": (1_000_000_000, 0.010),
         "100m50": (100_000_000, 0.050)}
TOOLS = ("nbdcopy", "nbdcopy-tuned", "engine-nbd", "engine-hop", "imageio")  # imageio last:
# its 4 GiB download into /dev/shm is freed after its run, outside the others' runs
PEERS = ("nbdcopy", "nbdcopy-tuned")  # the bars' peers; the table also compares with imageio
BARS = {"10g": 1.0, "1g10": 2.5, "100m50": 3.0}  # engine over the hop ÷ the best nbdcopy
BAR_WIRE = 0.40  # at 1g10: the hop's bytes on the wire ÷ nbdcopy's
CACHE = "/var/tmp/transfer-bench-cache"
IMAGEIO = os.path.join(os.path.dirname(PYTHON), "ovirt-imageio")  # the test extra installs it
IMAGEIO_OUT = "/dev/shm/transfer-bench-imageio.raw"
NBD_PORT, HOP_PORT, IMAGEIO_PORT = 10809, 54322, 54323
RELAY = {NBD_PORT: 20809, HOP_PORT: 24322, IMAGEIO_PORT: 24323}
# ovirt-imageio's client, as Forklift and CDI use it against an oVirt host: download() writes
# through qemu-nbd, so into a sparse file in /dev/shm (the other tools write to null:)
IMAGEIO_CLIENT = ("import sys; from ovirt_imageio import client; "
                  "client.download(sys.argv[1], sys.argv[2], sys.argv[3], fmt='raw')")


def debian_image(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """bookworm (standard, a kernel, ssh, python3) in ext4 in a GPT-partitioned 4 GiB raw
    disk; made with mmdebstrap (Debian packages) once, cached in CACHE."""
    image = os.path.join(CACHE, "debian-bookworm.raw")
    if not os.path.exists(image):
        os.makedirs(CACHE, exist_ok=True)
        root, tmp = os.path.join(CACHE, "debian-root"), image + ".tmp"
        shutil.rmtree(root, ignore_errors=True)
        say("building the Debian image with mmdebstrap (once; cached in " + CACHE + ") ...")
        subprocess.run(["mmdebstrap", "--variant=standard", "--mode=root", "--format=directory",
                        "--include=linux-image-amd64,openssh-server,python3,systemd-sysv",
                        "bookworm", root], check=True, capture_output=True, timeout=3600)
        with open(tmp, "wb") as f:
            f.truncate(4 * GiB)
        sectors = (4 * GiB - 2 * MiB) // 512
        subprocess.run(["sfdisk", "-q", tmp], input=f"label: gpt\nstart=2048, size={sectors}, "
                       "type=linux\n", text=True, check=True, capture_output=True)
        subprocess.run(["mkfs.ext4", "-F", "-q", "-d", root, "-E", "offset=1048576", tmp,
                        f"{sectors // 2}k"], check=True, capture_output=True, timeout=600)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, image)
    return image, {"kind": "debian", "size": os.path.getsize(image),
                   "alloc_bytes": allocated_bytes(image), "digest": file_digest(image)}


def pki(workdir: str) -> dict[str, str]:
    """A CA and a server certificate for localhost and the source's address (openssl)."""
    d = os.path.join(workdir, "pki")
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    ssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj",
        "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE")
    ssl("req", *ec, "-keyout", "key.pem", "-out", "s.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write(f"subjectAltName=DNS:localhost,IP:{SRC_IP}\nbasicConstraints=CA:FALSE\n")
    ssl("x509", "-req", "-in", "s.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": os.path.join(d, "ca.pem"), "cert": os.path.join(d, "cert.pem"),
            "key": os.path.join(d, "key.pem")}


class Servers:
    """nbdkit and transfer serve in the source's namespace, and the delaying relays in the
    target's; the addresses the clients use."""

    def __init__(self, ctx: Context, link: Link, image: str, rtt: float, certs: dict) -> None:
        self.ctx, self.link, self.procs = ctx, link, []
        log = open(os.path.join(ctx.workdir, "servers.log"), "ab")
        self.nbdkit = self._start(link.src, ["nbdkit", "-f", "-r", "-i", SRC_IP, "-p",
                                             str(NBD_PORT), "file", image], log)
        self.serve = self._start(link.src, [str(ENGINE), "serve", image, "--listen",
                                            f"{SRC_IP}:{HOP_PORT}", "--tls-cert",
                                            certs["cert"], "--tls-key", certs["key"]], log,
                                 stdout=subprocess.PIPE)
        ticket = self.serve.stdout.readline().split()[0].rsplit("/", 1)[1]
        self.imageio = self._start(link.src, [PYTHON, IMAGEIO, "--conf-dir",
                                              imageio_conf(ctx.workdir, certs)], log)
        # as on an oVirt host: the daemon reads the disk over NBD (here the same nbdkit)
        imageio_ticket = add_imageio_ticket(ctx.workdir, f"nbd://{SRC_IP}:{NBD_PORT}/",
                                            os.path.getsize(image))
        host = {port: (SRC_IP, port) for port in RELAY}
        if rtt:
            for port, to in RELAY.items():
                r = self._start(link.dst, [PYTHON, "-m",
                                           "bench.harness.netns", "relay", "--listen",
                                           str(to), "--to", f"{SRC_IP}:{port}", "--delay",
                                           str(rtt / 2)], log, stdout=subprocess.PIPE)
                r.stdout.readline()  # "ready"
            host = {port: ("localhost", to) for port, to in RELAY.items()}
        nbd, hop, imageio = host[NBD_PORT], host[HOP_PORT], host[IMAGEIO_PORT]
        self.nbd_uri = f"nbd://{'127.0.0.1' if rtt else nbd[0]}:{nbd[1]}"
        self.hop_url = f"https://{hop[0]}:{hop[1]}/images/{ticket}"
        self.imageio_url = f"https://{imageio[0]}:{imageio[1]}/images/{imageio_ticket}"
        self._wait_nbd()

    def _start(self, ns: str, argv: list[str], log: Any, **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(self.link.exec(ns, argv), stderr=log, text=True,
                             stdout=kw.pop("stdout", log), cwd=str(ROOT))
        self.procs.append(p)
        return p

    def _wait_nbd(self) -> None:
        for _ in range(300):
            if subprocess.run(self.link.exec(self.link.dst, ["nbdinfo", "--size",
                                                             self.nbd_uri]),
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("nbdkit did not answer in the source namespace")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()  # our own children (ip netns exec execs them: the pid is theirs)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def imageio_conf(workdir: str, certs: dict) -> str:
    """ovirt-imageio's conf dir (its conf.d/*.conf override _internal/config.py): TLS with
    the bench's certificate on the source's address, a control socket, INFO logs to stderr,
    no systemd, no privilege drop (tests/imageio_test.py has the same, commented)."""
    d = os.path.join(workdir, "imageio")
    os.makedirs(os.path.join(d, "conf.d"), exist_ok=True)
    with open(os.path.join(d, "conf.d", "50-bench.conf"), "w") as f:
        f.write(f"[daemon]\nsystemd_enable = false\ndrop_privileges = false\n"
                f"[tls]\nenable = true\nkey_file = {certs['key']}\ncert_file = {certs['cert']}\n"
                f"ca_file = {certs['ca']}\n[remote]\nhost = {SRC_IP}\nport = {IMAGEIO_PORT}\n"
                f"[local]\nenable = false\n[control]\ntransport = unix\n"
                f"socket = {os.path.join(d, 'control.sock')}\n[handlers]\nkeys = stderr\n"
                f"[logger_root]\nlevel = INFO\nhandlers = stderr\n")
    return d


def add_imageio_ticket(workdir: str, url: str, size: int) -> str:
    """A read ticket for url through imageio's control socket, once it listens."""
    tid = str(uuid.uuid4())
    body = json.dumps({"uuid": tid, "size": size, "url": url,
                       "timeout": 3600, "ops": ["read"], "transfer_id": "bench"})
    for _ in range(300):
        c = http.client.HTTPConnection("localhost", timeout=10)
        c.sock = socket.socket(socket.AF_UNIX)
        try:
            c.sock.connect(os.path.join(workdir, "imageio", "control.sock"))
            c.request("PUT", f"/tickets/{tid}", body=body,
                      headers={"Content-Type": "application/json"})
            if c.getresponse().status == 200:
                return tid
        except OSError:
            time.sleep(0.1)
        finally:
            c.close()
    raise RuntimeError("ovirt-imageio did not take a ticket on its control socket")


def argv_of(tool: str, s: Servers, certs: dict, report: str) -> list[str]:
    if tool == "imageio":
        return [PYTHON, "-c", IMAGEIO_CLIENT, s.imageio_url, IMAGEIO_OUT, certs["ca"]]
    if tool == "nbdcopy":
        return ["nbdcopy", s.nbd_uri, "null:"]
    if tool == "nbdcopy-tuned":
        return ["nbdcopy", "--connections=8", "--requests=64", s.nbd_uri, "null:"]
    uri = s.nbd_uri if tool == "engine-nbd" else s.hop_url
    return [str(ENGINE), "copy", uri, "null:", "--progress", "none", "--report", report,
            "--tls-ca", certs["ca"]] if tool == "engine-hop" else [
        str(ENGINE), "copy", uri, "null:", "--progress", "none", "--report", report]


def run_one(ctx: Context, link: Link, s: Servers, certs: dict, case: dict[str, Any],
            tool: str, rep: int) -> None:
    report, files = (os.path.join(ctx.workdir, n) for n in ("report.json", "child"))
    if os.path.exists(report):
        os.unlink(report)
    rec: dict[str, Any] = {"type": "run", "scenario": NAME, **case, "tool": tool, "rep": rep,
                           "warmup": False}
    server = {"engine-hop": s.serve, "imageio": s.imageio}.get(tool, s.nbdkit)
    wire0, srv0 = link.wire_bytes(), proc_cpu_seconds(server.pid)
    rec.update(measure(link.exec(link.dst, argv_of(tool, s, certs, report)), files,
                       3600.0, wait=False))
    rec["wire_bytes"] = link.wire_bytes() - wire0
    rec["server_cpu_s"] = round(proc_cpu_seconds(server.pid) - srv0, 3)
    problems = failed(rec, files)
    if tool.startswith("engine") and rec["exit"] == 0:
        data = json_result(report, problems, tool)
        if data.get("digest") != case["digest"]:
            problems.append(f"digest {data.get('digest')} != the image's {case['digest']}")
    if tool == "imageio":
        if rec["exit"] == 0 and file_digest(IMAGEIO_OUT) != case["digest"]:
            problems.append("imageio's download differs from the image")
        with contextlib.suppress(OSError):
            os.unlink(IMAGEIO_OUT)
    ctx.record(rec, problems, tool.startswith("engine") or tool == "imageio")
    say(f"  {case['link']:7} {case['workload']:7} {tool:13} rep {rep + 1} "
        f"{rec['wall_s']:7.2f} s  wire {rec['wire_bytes'] / MiB:8.1f} MiB  cpu "
        f"{rec['client_cpu_s']:.2f} + server {rec['server_cpu_s']:.2f} s"
        + invalid_text(problems))


def summarize(runs: list[dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
    mine = [r for r in runs if r["link"] == case["link"] and r["workload"] == case["workload"]]
    data_gib = max(case["alloc_bytes"], 1) / GiB
    tools: dict[str, Any] = {}
    for tool in TOOLS:
        good = [r for r in mine if r["tool"] == tool and r["valid"]]
        tools[tool] = {
            "wall_s": median([r["wall_s"] for r in good]),
            "wire_mib": median([r["wire_bytes"] / MiB for r in good]),
            "client_cpu_s_per_gib": median([r["client_cpu_s"] / data_gib for r in good]),
            "server_cpu_s_per_gib": median([r["server_cpu_s"] / data_gib for r in good]),
            "valid": f"{len(good)}/{sum(r['tool'] == tool for r in mine)}"}
    reps = {t: sorted((r for r in mine if r["tool"] == t), key=lambda r: r["rep"])
            for t in TOOLS}
    over = {p: paired(walls(reps[p]), walls(reps["engine-hop"])) for p in (*PEERS, "imageio")}
    best = max(PEERS, key=lambda p: -(tools[p]["wall_s"] or float("inf")))
    wire = tools["engine-hop"]["wire_mib"], tools[best]["wire_mib"]
    return {**case, "tools": tools, "best_peer": best, "hop_over_best": over[best]["median"],
            "hop_over_peer": {p: o["median"] for p, o in over.items()},
            "wire_hop_over_best": None if None in wire or not wire[1] else wire[0] / wire[1]}


def table(summary: dict[str, Any]) -> str:
    head = ("| link | workload | tool | median wall s | on the wire MiB | CPU-s/GiB client | "
            "CPU-s/GiB server | hop ÷ tool (wall) | valid |")
    lines = []
    for c in summary["cases"]:
        for tool, t in c["tools"].items():
            ratio = c["hop_over_peer"].get(tool)
            lines.append(f"| {c['link']} | {c['workload']} | {tool} | {fmt(t['wall_s'], '.2f')} "
                         f"| {fmt(t['wire_mib'], '.0f')} | "
                         f"{fmt(t['client_cpu_s_per_gib'], '.2f')} | "
                         f"{fmt(t['server_cpu_s_per_gib'], '.2f')} | {fmt(ratio, '.2f')} | "
                         f"{t['valid']} |")
    return md_table(head, lines)


def bars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in summary["cases"]:
        v, need = c["hop_over_best"], BARS[c["link"]]
        out.append({"bar": f"{c['link']} {c['workload']}: engine over the hop ÷ "
                           f"{c['best_peer']} ≥ {need:g}", "value": v,
                    "met": None if v is None else v >= need})
        if c["link"] == "1g10":
            w = c["wire_hop_over_best"]
            out.append({"bar": f"1g10 {c['workload']}: bytes on the wire, hop ÷ "
                               f"{c['best_peer']} ≤ {BAR_WIRE:g}", "value": w,
                        "met": None if w is None else w <= BAR_WIRE})
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = parser(NAME, "A disk across a shaped link: nbdcopy over NBD/TCP against the engine "
                     "over NBD and over transfer serve's HTTPS frames.",
               "the mixed image at 256 MiB, 1g10 only, 1 rep", workdir="certificates, images")
    p.add_argument("--links", help=f"comma-separated, of {','.join(LINKS)} (default all)")
    p.add_argument("--workloads", help="comma-separated, of debian,mixed (default both)")
    p.add_argument("--size", type=parse_size, help="the mixed image's size (default 1G)")
    p.add_argument("--seed", type=int, default=1, help="the mixed image's seed (default 1)")
    p.add_argument("--reps", type=int, help="runs per tool (default 3)")
    a = p.parse_args(argv)
    defaults(a, links=(",".join(LINKS), "1g10"), workloads=("debian,mixed", "mixed"),
             size=(GiB, 256 * MiB), reps=(3, 1))
    a.links = [x for x in a.links.split(",") if x]
    a.workloads = [x for x in a.workloads.split(",") if x]
    if not set(a.links) <= set(LINKS) or not set(a.workloads) <= {"debian", "mixed"}:
        p.error(f"--links of {','.join(LINKS)}, --workloads of debian,mixed")
    if a.reps < 1:
        p.error("--reps must be at least 1")
    return a


def reproduce_command(a: argparse.Namespace) -> str:
    return reproduce(NAME, "--links", ",".join(a.links), "--workloads", ",".join(a.workloads),
                     "--size", size_text(a.size), "--seed", str(a.seed), "--reps", str(a.reps))


def preflight(a: argparse.Namespace) -> list[str]:
    need = ["ip", "tc", "nbdkit", "nbdcopy", "nbdinfo", "openssl", "qemu-nbd", IMAGEIO]
    if "debian" in a.workloads:
        need += ["mmdebstrap", "sfdisk", "mkfs.ext4"]
    return missing_programs(*need)


def run(ctx: Context) -> Outcome:
    a = ctx.a
    images = {}
    for w in a.workloads:
        if w == "debian":
            images[w] = debian_image(a)
        else:
            path, meta = prepare_image(ctx.workdir, a)
            images[w] = path, dict(meta, alloc_bytes=allocated_bytes(path))
    ctx.prov = provenance(ctx.workdir, workload=", ".join(
        f"{w}: {size_text(m['size'])}, {m['alloc_bytes'] / MiB:.0f} MiB allocated"
        for w, (_, m) in images.items()))
    certs = pki(ctx.workdir)
    cases = []
    for name in a.links:
        rate, rtt = LINKS[name]
        with Link(rate) as link:
            for w, (path, meta) in images.items():
                case = {"link": name, "rate_bit": rate, "rtt_s": rtt, "workload": w,
                        "size": meta["size"], "alloc_bytes": meta["alloc_bytes"],
                        "digest": meta["digest"]}
                s = Servers(ctx, link, path, rtt, certs)
                try:
                    for rep in range(a.reps):
                        for tool in TOOLS:
                            run_one(ctx, link, s, certs, case, tool, rep)
                finally:
                    s.close()
                cases.append(summarize(ctx.runs, case))
    summary = {"type": "summary", "scenario": NAME, "cases": cases, "provenance": ctx.prov}
    ctx.emit(summary)
    text = [table(summary), "", "Wall: spawn to reaping, medians; on the wire: the veth's "
            "bytes, both directions; CPU-s per GiB of the image's allocated data; hop ÷ tool: "
            "the tool's wall ÷ the engine over the hop's, rep by rep (> 1: the hop is faster)."]
    return Outcome(bars(summary), text, invalid="a run failed or an engine digest differs")
