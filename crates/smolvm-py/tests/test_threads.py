"""One handle, many threads: blocking calls release the GIL and run at
the same time."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor


def test_blocking_run_releases_the_gil(running_vm):
    window = {}

    def command():
        window["start"] = time.monotonic()
        window["result"] = running_vm.run("sleep 2; echo done")
        window["end"] = time.monotonic()

    t = threading.Thread(target=command)
    beats = []
    t.start()
    while t.is_alive():
        beats.append(time.monotonic())
        time.sleep(0.02)
    t.join()
    assert window["result"].output == "done"
    start, end = window["start"], window["end"]
    assert end - start > 1.5, window
    # Had run() held the GIL, this thread could not have run while it waited.
    inside = [b for b in beats if start + 0.5 < b < end - 0.5]
    assert len(inside) >= 5, f"{len(inside)} heartbeats during a {end - start:.1f}s run()"


def test_eight_threads_on_one_handle(running_vm):
    n = 8
    barrier_dir = f"/tmp/barrier-{uuid.uuid4().hex[:8]}"
    # A barrier in the guest: each command waits until all eight have
    # started. Were run() calls on one handle serialized, the first would
    # never see the others and would fail (exit 99).
    script = (
        "mkdir -p {d} && touch {d}/{i} && w=0; "
        'while [ "$(ls {d} | wc -l)" -lt {n} ]; do '
        "  w=$((w+1)); [ $w -gt 900 ] && exit 99; sleep 0.1; "
        "done; echo out-{tok}; echo err-{tok} >&2"
    )
    tokens = [uuid.uuid4().hex for _ in range(n)]
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        return running_vm.run(script.format(d=barrier_dir, i=i, n=n, tok=tokens[i]), timeout=120)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    for i, r in enumerate(results):
        assert r.exit_code == 0, f"thread {i}: {r}"
        assert r.stdout == f"out-{tokens[i]}\n", f"thread {i} got another's output: {r}"
        assert r.stderr == f"err-{tokens[i]}\n", f"thread {i}: {r}"


def test_threads_mixing_reads_and_commands(running_vm):
    """status / info / run from several threads at once on one handle."""
    errors = []

    def worker(i):
        try:
            for j in range(3):
                assert running_vm.status == "running"
                assert running_vm.info.vm_id == running_vm.vm_id
                assert running_vm.run(f"echo {i}-{j}").output == f"{i}-{j}"
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
