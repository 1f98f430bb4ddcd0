"""The asyncio forms, on plain ``asyncio.run`` (no plugin needed)."""

from __future__ import annotations

import asyncio

import pytest

from smolvm import SmolVM, VMState
from smolvm.exceptions import InvalidStateError


def test_async_with_run_stop_start(make_vm, vm_ids):
    async def main():
        async with SmolVM() as vm:
            make_vm.track(vm.vm_id)
            assert vm.status == VMState.RUNNING
            r = await vm.async_run("echo hi")
            assert r.ok and r.output == "hi", r

            await vm.async_stop()
            assert vm.status == VMState.STOPPED
            with pytest.raises(InvalidStateError):
                await vm.async_run("true")

            await vm.async_start()
            assert vm.status == VMState.RUNNING
            r = await vm.async_run("echo $0; exit 4", shell="raw")
            assert r.exit_code == 4 and r.output in ("sh", "/bin/sh"), r
            return vm.vm_id

    vm_id = asyncio.run(main())
    assert vm_id not in vm_ids(), "__aexit__ did not delete the VM it created"


def test_async_delete(make_vm, vm_ids):
    vm = make_vm()

    async def main():
        await vm.async_delete()

    asyncio.run(main())
    assert vm.vm_id not in vm_ids()


def test_async_run_does_not_block_the_loop(running_vm):
    async def main():
        done = asyncio.Event()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.05)

        async def command():
            try:
                return await running_vm.async_run("sleep 1; echo slept")
            finally:
                done.set()

        r, _ = await asyncio.gather(command(), ticker())
        return r, ticks

    r, ticks = asyncio.run(main())
    assert r.output == "slept"
    # A 1 s command leaves the loop ~20 ticks; a blocked loop gets ~1.
    assert ticks >= 5, f"the event loop ran {ticks} times during a 1 s command"


def test_concurrent_async_runs(running_vm):
    async def main():
        return await asyncio.gather(
            *(running_vm.async_run(f"sleep 0.5; echo tok-{i}") for i in range(6))
        )

    results = asyncio.run(main())
    assert [r.output for r in results] == [f"tok-{i}" for i in range(6)]


def test_cancelled_async_run_leaves_the_vm_usable(running_vm):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(running_vm.async_run("sleep 30"), 1.0)
        return await running_vm.async_run("echo still-here")

    assert asyncio.run(main()).output == "still-here"
    # And from the blocking API, after that loop is gone.
    assert running_vm.run("echo sync-too").output == "sync-too"
