"""Migration plans (transfer.plans, `transfer plan`): real nbdkit hosts, real copies, no mocks.

Each source host is one nbdkit serving a directory (file plugin, dir=): every disk is its own
export, so its log filter's lines say which disk each connection read. The rate filter makes
a host a shared capacity, slow enough that copies overlap. Tests wait for events (a status
file's state, a journal's completion, a lock held), never for a length of time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from .conftest import require, run_cli
from transfer.errors import BadInput
from transfer.plans import parse
from transfer.plans.schedule import Job, Slots, Vm, simulate
from transfer.plans.spec import from_dict
from transfer.plans.state import done_digest, running

MiB = 1 << 20


def wait_for(cond, what: str, timeout: float = 120.0, proc=None):
    """Until cond() is true (looked at every 20 ms); fails naming what was awaited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {err}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def status_of(state: str) -> dict | None:
    try:
        with open(os.path.join(state, "status.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Host:
    """One source host: nbdkit serving a directory of disk files, logged and rate-limited."""

    def __init__(self, nbdkit, tmp_path, name: str, rate: str = "24M") -> None:
        self.name, self.dir = name, tmp_path / name
        self.dir.mkdir()
        self.log = str(tmp_path / f"{name}.log")
        # -t 1: one thread per connection. nbdkit 1.32.5 aborts (connections.c:402,
        # raw_send_socket: Assertion `sock >= 0') about once in 20 runs when a client is
        # killed while its requests sleep in the rate filter on several threads.
        self.start = lambda: nbdkit("file", f"dir={self.dir}", f"logfile={self.log}",
                                    f"rate={rate}", filters=("log", "rate"),
                                    options=("-t", "1"))
        self.server = None

    def disk(self, name: str, size: int, seed: int) -> str:
        data = bytearray(os.urandom(size))
        data[size // 2: size // 2 + size // 4] = bytes(size // 4)  # a zero run in the middle
        (self.dir / name).write_bytes(bytes(data))
        return name

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.server.sock}"

    def connections(self, start: int = 0) -> list[dict]:
        """Each connection the log shows (from byte offset start): export, open and close
        times, whether it read."""
        conns: dict[str, dict] = {}
        with open(self.log) as f:
            f.seek(start)
            for line in f:
                m = re.match(r"(\S+ \S+) connection=(\d+) (\w+)(?: export=(\S*))?", line)
                if not m:
                    continue
                t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                c = conns.setdefault(m[2], {"export": None, "open": t, "close": None,
                                            "reads": 0})
                if m[3] == "Connect":
                    c["export"], c["open"] = m[4], t
                elif m[3] == "Disconnect":
                    c["close"] = t
                elif m[3] == "Read":
                    c["reads"] += 1
        return list(conns.values())

    def most_disks_at_once(self) -> int:
        """The most exports read at one moment: each export's reading connections' spans,
        merged, swept in time order."""
        spans: dict[str, list] = {}
        for c in self.connections():
            if c["reads"] and c["export"]:
                spans.setdefault(c["export"], []).append((c["open"], c["close"] or 1e18))
        events = []
        for export, ss in spans.items():
            ss.sort()
            merged = [list(ss[0])]
            for a, b in ss[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            events += [(a, 1) for a, _ in merged] + [(b, -1) for _, b in merged]
        most = now = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):
            now += step
            most = max(most, now)
        return most


def twelve_vm_plan(tmp_path, nbdkit) -> tuple[str, list[Host], dict]:
    """12 VMs on 3 hosts (4 each; every other VM has 2 disks), maxInflightDisksPerHost 2."""
    hosts = [Host(nbdkit, tmp_path, f"esx{h}") for h in range(3)]
    disks = {}
    vms = []
    for i in range(12):
        h = hosts[i % 3]
        names = [f"vm{i}-d{k}" for k in range(1 + i % 2)]
        for k, n in enumerate(names):
            h.disk(n, (1 + (i + k) % 3) * MiB, i)
        vms.append((f"vm{i}", h, names))
    for h in hosts:
        h.server = h.start()
    (tmp_path / "targets").mkdir()
    lines = ["maxInflightDisksPerHost: 2", "vms:"]
    for name, h, names in vms:
        lines += [f"  - name: {name}", f"    host: {h.name}", "    type: cold", "    disks:"]
        for n in names:
            target = str(tmp_path / "targets" / n)
            lines += [f"      - source: {h.uri(n)}", f"        target: {target}"]
            disks[(name, f"disk{names.index(n)}")] = (h, n, target)
    plan = tmp_path / "plan.yaml"
    plan.write_text("\n".join(lines) + "\n")
    return str(plan), hosts, disks


def test_twelve_vms_on_three_hosts_killed_and_resumed(tmp_path, nbdkit):
    """Through the CLI: the dry run, a run killed (SIGKILL) once a disk is done, the run
    again. At most 2 disks read at once on each host (its own log), every target equals its
    source, and no disk finished before the kill is opened again."""
    require("qemu-img")
    plan, hosts, disks = twelve_vm_plan(tmp_path, nbdkit)
    state, report = str(tmp_path / "state"), str(tmp_path / "report.json")

    dry = run_cli("plan", "run", plan, "--state", state, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    pred = json.loads(dry.stdout)
    assert pred["predicted_seconds"] > 0 and set(pred["hosts"]) == {"esx0", "esx1", "esx2"}
    assert len(pred["schedule"]) == len(disks) and not os.listdir(tmp_path / "targets")

    cmd = [sys.executable, "-m", "transfer.cli", "plan", "run", plan, "--state", state,
           "--report", report, "--progress", "none"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(d["state"] == "done" for d in (status_of(state) or {"disks": []})
                         ["disks"]), "a disk done", proc=first)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    spec = from_dict(json.load(open(os.path.join(state, "plan.json"))))
    finished = {(vm.name, d.name) for vm in spec.vms for d in vm.disks
                if done_digest(state, vm, d) is not None}
    assert finished and len(finished) < len(disks)
    marks = {h.name: os.path.getsize(h.log) for h in hosts}

    again = run_cli("plan", "run", plan, "--state", state, "--report", report,
                    "--progress", "none")
    assert again.returncode == 0, (again.stderr, [h.server.proc.poll() for h in hosts])
    r = json.load(open(report))
    assert r["done"] == len(disks) and r["failed"] == 0
    assert r["predicted_seconds"] > 0 and r["seconds"] > 0
    assert all(h["rate"] > 0 and h["measured_rate"] > 0 for h in r["hosts"].values())
    rows = {(vm["name"], d["disk"]): d for vm in r["vms"] for d in vm["disks"]}
    assert {k for k, d in rows.items() if d["finished_before"]} == finished
    for key, (h, export, target) in disks.items():
        assert open(h.dir / export, "rb").read() == open(target, "rb").read(), key
        if key in finished:  # not opened at all by the second run
            again_opened = [c for c in h.connections(marks[h.name]) if c["export"] == export]
            assert again_opened == [], f"{key} was opened again after the resume"
    for h in hosts:
        assert h.most_disks_at_once() == 2, h.name  # copies overlapped, never beyond the limit


def warm_plan(tmp_path, nbdkit, **extra) -> tuple[str, Host]:
    h = Host(nbdkit, tmp_path, "esx9", rate="64M")
    h.disk("w", 2 * MiB, 1)
    h.server = h.start()
    text = (f"vms:\n  - name: w1\n    host: esx9\n    type: warm\n    disks:\n"
            f"      - source: {h.uri('w')}\n        target: {tmp_path / 'w.img'}\n")
    plan = tmp_path / "warm.yaml"
    plan.write_text(text)
    return str(plan), h


def test_warm_vm_waits_for_cutover_status_and_a_second_run_refused(tmp_path, nbdkit):
    """A warm VM without a cutover time copies its first pass and waits without a slot; status
    shows it (table and JSON); a second `plan run` on the state is refused (exit 2); `plan
    cutover` ends it with the final pass."""
    plan, h = warm_plan(tmp_path, nbdkit)
    state = str(tmp_path / "state")
    cmd = [sys.executable, "-m", "transfer.cli", "plan", "run", plan, "--state", state,
           "--report", str(tmp_path / "r.json"), "--progress", "none"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(d["state"] == "precopied" for d in
                             (status_of(state) or {"disks": []})["disks"]), "precopied", proc=run)
        assert running(state)
        second = run_cli("plan", "run", plan, "--state", state, "--progress", "none")
        assert second.returncode == 2 and "another `transfer plan run`" in second.stderr
        table = run_cli("plan", "status", "--state", state)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].startswith("plan: running") and "VM" in lines[1] and "DOWNTIME" in lines[1]
        assert re.search(r"^w1\s+disk0\s+esx9\s+0\s+.*precopied", table.stdout, re.M)
        js = json.loads(run_cli("plan", "status", "--state", state, "--json").stdout)
        assert js["running"] and js["disks"][0]["state"] == "precopied"
        assert js["disks"][0]["pass"] == 0
        cut = run_cli("plan", "cutover", "--state", state, "w1")
        assert cut.returncode == 0, cut.stderr
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    finally:
        if run.poll() is None:
            run.kill()
    assert open(h.dir / "w", "rb").read() == open(tmp_path / "w.img", "rb").read()
    js = json.loads(run_cli("plan", "status", "--state", state, "--json").stdout)
    assert not js["running"] and js["disks"][0]["state"] == "done" and js["disks"][0]["pass"] == 1
    bad = run_cli("plan", "cutover", "--state", state, "nosuch")
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_conversion_verified_and_a_difference_fails(tmp_path, nbdkit):
    h = Host(nbdkit, tmp_path, "esx5", rate="800M")
    for n in ("c1", "c2"):
        h.disk(n, MiB, 2)
    h.server = h.start()
    good, bad = tmp_path / "c1.img", tmp_path / "c2.img"
    good.write_bytes((h.dir / "c1").read_bytes())
    bad.write_bytes(bytes(MiB))
    plan = tmp_path / "conv.json"  # JSON is accepted
    plan.write_text(json.dumps({"vms": [
        {"name": "c1", "host": "esx5", "type": "conversion",
         "disks": [{"source": h.uri("c1"), "target": str(good)}]},
        {"name": "c2", "host": "esx5", "type": "conversion",
         "disks": [{"source": h.uri("c2"), "target": str(bad)}]}]}))
    state = str(tmp_path / "state")
    dry = run_cli("plan", "run", str(plan), "--dry-run")  # the schedule, as a person reads it
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("predicted: ") and "host esx5: " in dry.stdout
    assert re.search(r"^\s+0\.0\s+\S+\s+esx5\s+c1/disk0\s", dry.stdout, re.M), dry.stdout
    r = run_cli("plan", "run", str(plan), "--state", state, "--report", str(tmp_path / "r.json"),
                "--progress", "none")
    assert r.returncode == 6, r.stderr  # VerifyFailed's exit code
    rep = json.load(open(tmp_path / "r.json"))
    states = {vm["name"]: vm["disks"][0]["state"] for vm in rep["vms"]}
    assert states == {"c1": "done", "c2": "failed"} and rep["failed"] == 1
    assert os.path.exists(os.path.join(state, "vms", "c1", "disk0", "done.json"))


GOOD = """\
maxInflightDisksPerHost: 2
maxInflight: 3
vms:
  - name: a
    host: h1
    type: cold
    disks:
      - source: /src/a
        target: /dst/a
  - name: b
    host: h1
    type: warm
    cutover: 2099-01-01T00:00:00Z
    disks:
      - source: /src/b
        target: /dst/b
        changes: [x.json]
"""

BAD = [
    ("maxInflightDisksPerHost: 2\nvmz: []\n", 2, "unknown key 'vmz'"),
    (GOOD.replace("    host: h1\n    type: cold", "    host: h1\n    colour: red\n    type: cold"),
     6, "unknown key 'colour'"),
    (GOOD.replace("        target: /dst/a", "        target: /dst/a\n        size: 1"),
     10, "unknown key 'size'"),
    (GOOD.replace("name: b", "name: a"), 10, "VM 'a' is listed twice"),
    (GOOD.replace("/src/b", "/src/a"), 15, "same source as a/disk0"),
    (GOOD.replace("/dst/b", "/dst/a"), 15, "same target as a/disk0"),
    (GOOD.replace("maxInflightDisksPerHost: 2", "maxInflightDisksPerHost: 0"), 1,
     "must be 1 or more"),
    (GOOD.replace("maxInflight: 3", "maxInflight: -1"), 2, "must be 1 or more"),
    (GOOD.replace("2099-01-01", "2001-01-01"), 13, "in the past"),
    (GOOD.replace("type: cold", "type: tepid"), 6, "not one of cold, warm, live, conversion"),
    (GOOD.replace("      - source: /src/a\n", "      - name: x\n        name: y\n"), 9,
     "given twice"),
]


@pytest.mark.parametrize("text,line,why", BAD, ids=[b[2] for b in BAD])
def test_a_bad_plan_is_refused_with_its_line(text, line, why):
    with pytest.raises(BadInput) as e:
        parse(text, "p.yaml")
    assert f"line {line}: " in str(e.value) and why in str(e.value), str(e.value)


def test_a_good_plan_and_the_cli_refusal(tmp_path):
    p = parse(GOOD)
    assert (p.per_host, p.overall, [v.name for v in p.vms]) == (2, 3, ["a", "b"])
    assert p.vms[1].disks[0].changes == ["x.json"] and p.vms[1].cutover > time.time()
    assert parse("vms:\n  - {name: a, host: h, type: cold, disks: [{source: s, target: t}]}"
                 ).per_host == 20  # Forklift's default
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD[4][0])
    r = run_cli("plan", "run", str(bad), "--state", str(tmp_path / "s"))
    assert r.returncode == 2 and "line 15: " in r.stderr and "same source" in r.stderr
    assert not os.path.exists(tmp_path / "s")  # refused before anything started


def vm(name: str, host: str, *sizes: int) -> Vm:
    return Vm(name, host, [Job(name, f"d{i}", host, s) for i, s in enumerate(sizes)])


def test_largest_first_per_host_and_the_host_shared():
    t, es = simulate([vm("s", "h", 100), vm("l", "h", 300), vm("m", "h", 200)], {"h": 100.0},
                     2, None)
    starts = {e.vm: e.start for e in es}
    assert starts["l"] == starts["m"] == 0 and starts["s"] > 0  # LPT: the small one waits
    assert t == pytest.approx(6.0)  # the host busy throughout: 600 bytes at 100 B/s


def test_a_vm_over_the_limit_runs_alone_when_its_host_is_idle():
    t, es = simulate([vm("big", "h", 10, 10, 10), vm("a", "h", 100), vm("b", "h", 50)],
                     {"h": 10.0}, 2, None)
    big = [e for e in es if e.vm == "big"]
    others_end = max(e.end for e in es if e.vm != "big")
    assert all(e.start >= others_end for e in big)  # alone, after the host emptied
    assert t == pytest.approx(18.0)


def test_the_plans_limit_and_its_slots():
    s = Slots(2, 3)
    assert s.fits("h1", 2)
    s.take("h1", 2)
    assert not s.fits("h1", 1) and s.fits("h2", 1) and not s.fits("h2", 2)
    s.take("h2", 1)
    assert not s.fits("h3", 1)
    s.give("h1", 2)
    s.give("h2", 1)
    assert s.fits("h3", 5)  # the plan idle: a VM bigger than every limit starts alone
    t, es = simulate([vm(f"v{i}", f"h{i}", 100) for i in range(4)], {f"h{i}": 100.0
                                                                      for i in range(4)}, 2, 3)
    assert t == pytest.approx(2.0) and sorted(e.start for e in es) == [0, 0, 0, 1.0]


def test_a_live_vm_through_its_qmp_socket(tmp_path):
    """A live VM's disk (qmp: + node:) runs transfer.migration.migrate's whole migration on
    its own state under the plan's; run again, the finished disk is not migrated again."""
    require("qemu-storage-daemon")
    from transfer.demo.servers import QemuStorageDaemon

    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
    qsd = QemuStorageDaemon(str(tmp_path / "unused.sock"), str(image),
                            qmp=str(tmp_path / "qmp.sock"), fmt="raw", nbd=False).start()
    try:
        plan = tmp_path / "live.yaml"
        target = tmp_path / "t.img"
        plan.write_text(f"vms:\n  - name: app1\n    host: kvm2\n    type: live\n    disks:\n"
                        f"      - qmp: {qsd.qmp}\n        node: disk0\n"
                        f"        target: {target}\n")
        state, report = str(tmp_path / "state"), str(tmp_path / "r.json")
        for _ in range(2):
            r = run_cli("plan", "run", str(plan), "--state", state, "--report", report,
                        "--progress", "none")
            assert r.returncode == 0, r.stderr
        rep = json.load(open(report))
        disk = rep["vms"][0]["disks"][0]
        assert disk["state"] == "done" and disk["finished_before"]  # the second run skipped it
        assert target.read_bytes() == image.read_bytes()
        assert os.path.exists(os.path.join(state, "vms", "app1", "disk0", "sync", "journal"))
    finally:
        qsd.stop()


def test_warm_vm_with_changes_files_cut_over_by_its_time(tmp_path, nbdkit):
    """A VMware-like warm disk: a precopy pass with the first changes file, the final pass at
    the VM's cutover time with the last; what changed in the source between passes is on the
    target, and each pass is its own checkpoint in the disk's sync journal."""
    h = Host(nbdkit, tmp_path, "esx7", rate="400M")
    h.disk("w", 2 * MiB, 3)
    h.server = h.start()
    c1, c2 = tmp_path / "c1.json", tmp_path / "c2.json"
    for c in (c1, c2):
        c.write_text(json.dumps({"startOffset": 0, "length": 2 * MiB, "changedArea": []}))
    cutover = datetime.utcfromtimestamp(time.time() + 3600).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = tmp_path / "w.yaml"
    plan.write_text(f"vms:\n  - name: w2\n    host: esx7\n    type: warm\n"
                    f"    cutover: {cutover}\n    disks:\n"
                    f"      - source: {h.uri('w')}\n        target: {tmp_path / 'w.img'}\n"
                    f"        changes: [{c1}, {c2}]\n")
    state = str(tmp_path / "state")
    cmd = [sys.executable, "-m", "transfer.cli", "plan", "run", str(plan), "--state", state,
           "--progress", "none"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(d["state"] == "precopied" and d["pass"] == 1 for d in
                             (status_of(state) or {"disks": []})["disks"]), "pass 1", proc=run)
        with open(h.dir / "w", "r+b") as f:  # the guest writes; the last changes file says so
            f.seek(MiB)
            f.write(b"\x5a" * 4096)
        c2.write_text(json.dumps({"startOffset": 0, "length": 2 * MiB,
                                  "changedArea": [{"start": MiB, "length": 4096}]}))
        assert run_cli("plan", "cutover", "--state", state).returncode == 0  # all warm VMs
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    finally:
        if run.poll() is None:
            run.kill()
    assert (h.dir / "w").read_bytes() == (tmp_path / "w.img").read_bytes()
    journal = open(os.path.join(state, "vms", "w2", "disk0", "journal"), "rb").read()
    for checkpoint in (b"plan-0", b"plan-1", b"plan-final"):
        assert checkpoint in journal


def test_sigterm_stops_the_plan_and_the_next_run_finishes_it(tmp_path, nbdkit):
    h = Host(nbdkit, tmp_path, "esx3", rate="16M")
    h.disk("s", 4 * MiB, 4)
    h.server = h.start()
    plan = tmp_path / "s.yaml"
    plan.write_text(f"vms:\n  - name: s1\n    host: esx3\n    type: cold\n    disks:\n"
                    f"      - source: {h.uri('s')}\n        target: {tmp_path / 's.img'}\n")
    state = str(tmp_path / "state")
    cmd = [sys.executable, "-m", "transfer.cli", "plan", "run", str(plan), "--state", state,
           "--progress", "none"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(d["state"] == "copying" and d["bytes"] > 0 for d in
                         (status_of(state) or {"disks": []})["disks"]), "copying", proc=run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 5 and "Traceback" not in err, err
    js = json.loads(run_cli("plan", "status", "--state", state, "--json").stdout)
    assert [d["state"] for d in js["disks"]] == ["stopped"]
    again = run_cli("plan", "run", str(plan), "--state", state, "--progress", "none")
    assert again.returncode == 0, again.stderr
    assert (h.dir / "s").read_bytes() == (tmp_path / "s.img").read_bytes()


def test_a_warm_qmp_vm_cut_over_by_plan_cutover(tmp_path):
    """A warm VM's disk over QMP: the migration's precopy pass, then `plan cutover` reaches
    the migration through its own state's signal and it cuts over."""
    require("qemu-storage-daemon")
    from transfer.demo.servers import QemuStorageDaemon

    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB) + bytes(MiB))
    qsd = QemuStorageDaemon(str(tmp_path / "unused.sock"), str(image),
                            qmp=str(tmp_path / "qmp.sock"), fmt="raw", nbd=False).start()
    run = None
    try:
        plan, target = tmp_path / "wq.yaml", tmp_path / "t.img"
        plan.write_text(f"vms:\n  - name: db1\n    host: kvm1\n    type: warm\n    disks:\n"
                        f"      - qmp: {qsd.qmp}\n        node: disk0\n"
                        f"        target: {target}\n")
        state = str(tmp_path / "state")
        run = subprocess.Popen([sys.executable, "-m", "transfer.cli", "plan", "run", str(plan),
                                "--state", state, "--progress", "none"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(d["pass"] == 0 for d in (status_of(state) or {"disks": []})
                             ["disks"]), "the precopy pass", proc=run)
        assert run_cli("plan", "cutover", "--state", state, "db1").returncode == 0
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert target.read_bytes() == image.read_bytes()
        js = json.loads(run_cli("plan", "status", "--state", state, "--json").stdout)
        assert js["disks"][0]["state"] == "done" and js["disks"][0]["passes"] >= 2
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        qsd.stop()


def test_a_vm_with_more_disks_than_the_limit_runs_alone(tmp_path, nbdkit):
    """maxInflightDisksPerHost 2, a VM of 3 disks: it starts once its host is idle, all three
    at once, and nothing else reads on the host meanwhile (the host's own log)."""
    h = Host(nbdkit, tmp_path, "esx4", rate="32M")
    h.disk("small", 3 * MiB + MiB // 2, 1)  # the larger VM by bytes: LPT starts it first
    for k in range(3):
        h.disk(f"big{k}", MiB, 2 + k)
    h.server = h.start()
    disks = "".join(f"      - source: {h.uri(f'big{k}')}\n        target: {tmp_path / f'b{k}'}\n"
                    for k in range(3))
    plan = tmp_path / "alone.yaml"
    plan.write_text(f"maxInflightDisksPerHost: 2\nvms:\n"
                    f"  - name: big\n    host: esx4\n    type: cold\n    disks:\n{disks}"
                    f"  - name: small\n    host: esx4\n    type: cold\n    disks:\n"
                    f"      - source: {h.uri('small')}\n        target: {tmp_path / 's'}\n")
    r = run_cli("plan", "run", str(plan), "--state", str(tmp_path / "state"), "--progress",
                "none")
    assert r.returncode == 0, r.stderr
    reads = [c for c in h.connections() if c["reads"]]
    small_end = max(c["close"] for c in reads if c["export"] == "small")
    big_start = min(c["open"] for c in reads if c["export"].startswith("big"))
    sample = min(c["open"] for c in reads)  # the rate sample (before anything copies)
    copies = [c for c in reads if c["open"] > sample]
    assert min(c["open"] for c in copies if c["export"] == "small") < big_start
    assert small_end <= big_start
    assert h.most_disks_at_once() == 3
    for k in range(3):
        assert (h.dir / f"big{k}").read_bytes() == (tmp_path / f"b{k}").read_bytes()


def test_warm_qmp_vms_give_their_slot_back_between_passes(tmp_path):
    """Two warm VMs over QMP on one host limited to one disk in flight: the first's precopy
    pass ends and, while it waits for its cutover, its slot lets the second make its own.
    (Holding the slot for the whole migration, the second could not start before the first's
    cutover, which is only asked for once both have precopied.)"""
    require("qemu-storage-daemon")
    from transfer.demo.servers import QemuStorageDaemon

    daemons, lines = [], ["maxInflightDisksPerHost: 1", "vms:"]
    try:
        for name in ("db1", "db2"):
            image = tmp_path / f"{name}.raw"
            image.write_bytes(os.urandom(MiB) + bytes(MiB))
            daemons.append(QemuStorageDaemon(
                str(tmp_path / f"{name}-unused.sock"), str(image),
                qmp=str(tmp_path / f"{name}-qmp.sock"), fmt="raw", nbd=False).start())
            lines += [f"  - name: {name}", "    host: kvm1", "    type: warm", "    disks:",
                      f"      - qmp: {daemons[-1].qmp}", "        node: disk0",
                      f"        target: {tmp_path / (name + '.target')}"]
        plan, state = tmp_path / "two.yaml", str(tmp_path / "state")
        plan.write_text("\n".join(lines) + "\n")
        run = subprocess.Popen([sys.executable, "-m", "transfer.cli", "plan", "run", str(plan),
                                "--state", state, "--progress", "none"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: all(d["state"] == "precopied" for d in
                                 (status_of(state) or {"disks": [{"state": "?"}]})["disks"]),
                     "both VMs precopied before any cutover", proc=run)
            assert run_cli("plan", "cutover", "--state", state).returncode == 0
            out, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        for name in ("db1", "db2"):
            assert (tmp_path / f"{name}.target").read_bytes() == (
                tmp_path / f"{name}.raw").read_bytes()
    finally:
        for q in daemons:
            q.stop()


def test_a_warm_vm_with_two_qmp_disks_is_one_migration(tmp_path):
    """A warm VM whose disks are two nodes of one daemon: one migration moves both (its state
    the VM's directory, each node's sync state under it), and `plan cutover` cuts both over."""
    require("qemu-storage-daemon")
    from transfer.demo.servers import QemuStorageDaemon

    images = [tmp_path / "a.raw", tmp_path / "b.raw"]
    for i, image in enumerate(images):
        image.write_bytes(os.urandom((i + 1) * MiB) + bytes(MiB))
    qsd = QemuStorageDaemon(str(tmp_path / "unused.sock"), str(images[0]),
                            qmp=str(tmp_path / "qmp.sock"), fmt="raw", nbd=False,
                            more=[(str(images[1]), "disk1")]).start()
    run = None
    try:
        plan, state = tmp_path / "vm.yaml", str(tmp_path / "state")
        plan.write_text("vms:\n  - name: db1\n    host: kvm1\n    type: warm\n    disks:\n"
                        + "".join(f"      - qmp: {qsd.qmp}\n        node: disk{i}\n"
                                  f"        target: {tmp_path / f't{i}.img'}\n" for i in (0, 1)))
        run = subprocess.Popen([sys.executable, "-m", "transfer.cli", "plan", "run", str(plan),
                                "--state", state, "--progress", "none"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: all(d["state"] == "precopied" for d in
                             (status_of(state) or {"disks": [{"state": "?"}]})["disks"]),
                 "both disks precopied", proc=run)
        assert run_cli("plan", "cutover", "--state", state, "db1").returncode == 0
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        for i, image in enumerate(images):
            assert (tmp_path / f"t{i}.img").read_bytes() == image.read_bytes()
        vm_dir = os.path.join(state, "vms", "db1")
        log = json.load(open(os.path.join(vm_dir, "migrate.json")))
        assert all(os.path.exists(os.path.join(vm_dir, "disks", f"disk{i}", "journal"))
                   for i in (0, 1)), os.listdir(vm_dir)
        assert log["next"] >= 2  # pass 0 and the final pass, each of both disks
        js = json.loads(run_cli("plan", "status", "--state", state, "--json").stdout)
        assert [d["state"] for d in js["disks"]] == ["done", "done"]
        assert all(d["digest"] for d in js["disks"])
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        qsd.stop()
