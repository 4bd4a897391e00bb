"""The bench images, made once per work directory and shared by the scenarios that copy a disk
(cold-copy, warm-delta, live-converge): the same size and seed give the same bytes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from typing import Any

from transfer.demo import file_digest
from transfer.demo.synth import make_image

from .machine import MiB, allocated_bytes, say, size_text

ALLOCATED = 0.5  # the mixed image: half of it allocated
KINDS = ("mixed", "random")  # half allocated, of every kind of block; all random data


def make_random_image(path: str, size: int, seed: int) -> dict[str, int]:
    """Every byte random (numpy's PCG64 from the seed): no holes, no zero blocks, nothing to
    compress; the same size and seed give the same bytes."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x72616E64])
    chunk = 64 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
    return {"random": size, "text": 0, "zero_allocated": 0, "hole": 0}


def image_stem(kind: str) -> str:
    """The mixed image keeps the name every scenario knows (source.img: a --keep work directory
    is shared between them); the others are source-KIND.img."""
    return "source" if kind == "mixed" else f"source-{kind}"


def prepare_image(workdir: str, a: argparse.Namespace, kind: str = "mixed"
                  ) -> tuple[str, dict[str, Any]]:
    """The image of this kind, --size and --seed in workdir: made, or reused when the one there
    was made with the same (its .json says so)."""
    image = os.path.join(workdir, f"{image_stem(kind)}.img")
    meta_path = os.path.join(workdir, f"{image_stem(kind)}.json")
    allocated = ALLOCATED if kind == "mixed" else 1.0
    want = {"kind": kind, "size": a.size, "seed": a.seed, "allocated_fraction": allocated}
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want and os.path.getsize(image) == a.size:
            say(f"reusing {image} ({kind}, size {size_text(a.size)}, seed {a.seed})")
            return image, meta
    except (OSError, ValueError):
        pass
    with contextlib.suppress(FileNotFoundError):  # else a qcow2 copy of an older image is served
        os.unlink(os.path.join(workdir, f"{image_stem(kind)}.qcow2"))
    t = time.perf_counter()
    if kind == "mixed":
        say(f"making the {size_text(a.size)} mixed image, seed {a.seed}, half allocated ...")
        layout = make_image(image, a.size, a.seed, allocated=ALLOCATED)
    else:
        say(f"making the {size_text(a.size)} random image, seed {a.seed} ...")
        layout = make_random_image(image, a.size, a.seed)
    meta = dict(want, layout=layout, alloc_bytes=allocated_bytes(image))
    say(f"  made in {time.perf_counter() - t:.1f} s: "
        + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in layout.items()))
    t = time.perf_counter()
    meta["digest"] = file_digest(image)
    say(f"  digest {meta['digest']} in {time.perf_counter() - t:.1f} s")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return image, meta


def prepare_qcow2(image: str) -> str:
    """A qcow2 copy of the raw image for qemu-nbd (qemu-img convert: zero blocks become
    unallocated clusters, as in a real qcow2 disk), made once."""
    qcow2 = image[:-len(".img")] + ".qcow2"
    if os.path.exists(qcow2):
        return qcow2
    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2 + ".part"],
                   check=True, capture_output=True)
    os.rename(qcow2 + ".part", qcow2)
    say(f"  qcow2 copy for qemu-nbd made in {time.perf_counter() - t:.1f} s "
        f"({os.stat(qcow2).st_blocks * 512 / MiB:.0f} MiB on disk)")
    return qcow2


def image_info(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("kind", "size", "seed", "allocated_fraction", "alloc_bytes",
                                     "layout", "digest")}
