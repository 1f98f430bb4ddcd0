"""The SDK with the rest of the world: the CLI (one inventory), other Python
processes (reconnect from anywhere), and the built wheel in a fresh venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smolvm import SmolVM, VMState
from smolvm.exceptions import VMNotFoundError


def run_python(script, cwd, timeout=120):
    """Runs ``script`` in a new process of this interpreter, with this
    environment (same SMOLVM_DATA_DIR); returns the JSON its last stdout
    line holds."""
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=dict(os.environ),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (
        f"the child process exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    )
    lines = p.stdout.strip().splitlines()
    assert lines, f"the child printed nothing\n--- stderr\n{p.stderr}"
    return json.loads(lines[-1])


def cli(binary, *args, timeout=120):
    p = subprocess.run(
        [str(binary), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (
        f"`smolvm {' '.join(args)}` exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    )
    return p.stdout


def cli_vms(binary, *flags):
    return {v["id"]: v for v in json.loads(cli(binary, "ls", "--json", *flags))}


# --- the CLI ---------------------------------------------------------------


def test_cli_sees_a_python_vm_and_python_sees_the_cli_remove_it(smolvm_cli, make_vm, new_name):
    name = new_name("py2cli")
    vm = make_vm(name=name, memory=256)
    listed = cli_vms(smolvm_cli, "--all")
    assert name in listed, f"`smolvm ls --all --json` does not list {name}: {sorted(listed)}"
    assert listed[name]["state"] == "created"
    assert listed[name]["memory_mib"] == 256
    assert name not in cli_vms(smolvm_cli), "a created VM is not live"

    cli(smolvm_cli, "rm", name)
    with pytest.raises(VMNotFoundError):
        vm.refresh()
    assert name not in {i.vm_id for i in SmolVM.list()}


def test_python_drives_a_cli_vm(smolvm_cli, make_vm, new_name):
    name = new_name("cli2py")
    out = cli(smolvm_cli, "create", "--name", name, "--memory", "256", "--quiet")
    make_vm.track(name)
    assert out.strip() == name

    vm = SmolVM.from_id(name)
    assert vm.status == VMState.CREATED
    assert vm.info.config.memory == 256
    vm.start()
    assert vm.run("echo from-python > /tmp/x").ok

    live = cli_vms(smolvm_cli)
    assert name in live and live[name]["state"] == "running", live.get(name)
    assert cli(smolvm_cli, "exec", name, "--", "cat", "/tmp/x") == "from-python\n"

    # A state change made by the CLI is what Python sees next.
    cli(smolvm_cli, "pause", name)
    assert vm.status == VMState.PAUSED
    cli(smolvm_cli, "resume", name)
    assert vm.status == VMState.RUNNING
    assert vm.run("cat /tmp/x").output == "from-python"

    vm.delete()
    assert name not in cli_vms(smolvm_cli, "--all")


# --- other Python processes ------------------------------------------------


def test_persistent_vm_is_reached_from_another_process(make_vm, tmp_path):
    name = "persistent-agent-vm"
    vm = make_vm(name=name)
    vm.start()
    assert vm.run("echo made-by-parent > /root/marker").ok
    vm.close()

    got = run_python(
        f"""
        import json
        from smolvm import SmolVM
        vm = SmolVM.from_id({name!r})
        r = vm.run("cat /root/marker; echo child-was-here >> /root/marker")
        print(json.dumps({{"status": vm.status.value, "out": r.output, "ok": r.ok}}))
        """,
        tmp_path,
    )
    assert got == {"status": "running", "out": "made-by-parent", "ok": True}

    # The child's exit took nothing with it.
    again = SmolVM.from_id(name)
    assert again.status == VMState.RUNNING
    assert again.run("cat /root/marker").stdout == "made-by-parent\nchild-was-here\n"
    again.delete()
    assert name not in {i.vm_id for i in SmolVM.list()}


def test_pause_and_resume_from_another_process(make_vm, tmp_path):
    vm = make_vm()
    vm.start()
    got = run_python(
        f"""
        import json
        from smolvm import SmolVM
        vm2 = SmolVM.from_id({vm.vm_id!r})
        seen = [vm2.status.value]
        vm2.pause()
        seen.append(vm2.status.value)
        vm2.resume()
        seen.append(vm2.status.value)
        r = vm2.run("echo resumed-in-child")
        print(json.dumps({{"seen": seen, "out": r.output}}))
        """,
        tmp_path,
    )
    assert got == {"seen": ["running", "paused", "running"], "out": "resumed-in-child"}
    assert vm.status == VMState.RUNNING
    assert vm.run("echo parent-still-works").output == "parent-still-works"


# --- the wheel -------------------------------------------------------------


def test_wheel_in_a_fresh_venv(tmp_path, vm_ids):
    wheel = os.environ.get("SMOLVM_WHEEL")
    if not wheel:
        pytest.fail(
            "SMOLVM_WHEEL is not set: build the SDK's wheel (e.g. `pip wheel --no-deps -w "
            "target/wheels ./crates/smolvm-py`) and run the tests with "
            "SMOLVM_WHEEL=/path/to/smolvm_sdk-<version>-<tags>.whl (this test installs it "
            "into a fresh venv; it is never skipped)"
        )
    wheel = Path(wheel).resolve()
    assert wheel.is_file() and wheel.suffix == ".whl", f"SMOLVM_WHEEL={wheel} is not a .whl file"

    # Nothing from the build tree: no target/ on PATH, no companion binary
    # overrides; the wheel must bring its supervisor and guest agent.
    clean = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "SMOLVM_DATA_DIR": os.environ["SMOLVM_DATA_DIR"],
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    }
    for keep in ("SMOLVM_CACHE_DIR", "XDG_CACHE_HOME", "SMOLVM_ACCEL"):
        if os.environ.get(keep):
            clean[keep] = os.environ[keep]

    def sh(*argv, timeout=300):
        p = subprocess.run(
            [str(a) for a in argv],
            env=clean,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert p.returncode == 0, (
            f"{' '.join(map(str, argv))} exited {p.returncode}\n"
            f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
        )
        return p.stdout

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    sh(py, "-m", "pip", "install", "--no-index", wheel)

    script = textwrap.dedent(
        """
        import json
        import smolvm
        from smolvm import SmolVM
        with SmolVM() as vm:
            vm_id = vm.vm_id
            out = vm.run("echo wheel-ok").output
        print(json.dumps({"file": smolvm.__file__, "out": out, "id": vm_id}))
        """
    )
    # -I: no current directory or user site on sys.path, no PYTHON* variables.
    got = json.loads(sh(py, "-I", "-c", script, timeout=180).strip().splitlines()[-1])
    assert got["out"] == "wheel-ok"
    assert Path(got["file"]).resolve().is_relative_to(venv.resolve()), (
        f"smolvm was imported from {got['file']}, not from the venv"
    )
    assert got["id"] not in vm_ids()
