"""Running commands: results, exit codes, timeouts, shells, env and cwd.

These only run commands, so they share one running VM (``running_vm``),
except the VM-level environment test, which needs a VM made with ``env``."""

from __future__ import annotations

import time
import uuid

import pytest

from smolvm import CommandResult
from smolvm.exceptions import OperationTimeoutError, SmolVMError


def test_result_fields(running_vm):
    r = running_vm.run("printf 'out\\n'; printf 'err\\n' >&2")
    assert isinstance(r, CommandResult)
    assert r.exit_code == 0
    assert r.ok is True
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    assert r.output == "out"


def test_output_is_stdout_stripped(running_vm):
    r = running_vm.run("printf '  two\\nlines  \\n\\n'")
    assert r.stdout == "  two\nlines  \n\n"
    assert r.output == "two\nlines"


def test_nonzero_exit_is_a_result_not_an_exception(running_vm):
    r = running_vm.run("echo partial; echo why >&2; exit 3")
    assert r.exit_code == 3
    assert r.ok is False
    assert r.output == "partial"
    assert r.stderr == "why\n"


def test_killed_by_a_signal(running_vm):
    r = running_vm.run("kill -9 $$")
    assert r.ok is False
    assert r.exit_code == 128 + 9, r


def test_large_output_arrives_whole(running_vm):
    r = running_vm.run("head -c 1000000 /dev/zero | tr '\\0' a")
    assert r.ok, r.stderr
    assert len(r.stdout) == 1_000_000
    assert set(r.stdout) == {"a"}


def test_utf8_output(running_vm):
    assert running_vm.run("printf 'h\\303\\251llo \\342\\234\\223'").stdout == "héllo ✓"


def test_timeout_raises_and_kills_the_process_group(running_vm):
    tag = uuid.uuid4().hex[:8]
    # Both sleeps (the foreground one and the one in the background) are in
    # the command's process group; `sleep 317` is nothing else's argv.
    cmd = f"sleep 317 & echo $! > /tmp/bg-{tag}; echo started; sleep 317"
    t = time.monotonic()
    with pytest.raises(OperationTimeoutError) as ei:
        running_vm.run(cmd, timeout=2)
    elapsed = time.monotonic() - t
    assert isinstance(ei.value, SmolVMError)
    assert ei.value.kind == "timeout"
    assert ei.value.message
    assert elapsed < 60, f"a 2 s timeout took {elapsed:.1f}s"

    # The VM is still usable, and neither sleep is left (the agent reaps the
    # killed processes at once; allow it a moment under TCG). `grep -x`
    # matches whole argv lines, so it never counts itself.
    r = running_vm.run(
        "for i in $(seq 50); do "
        "  n=$(ps -eo args= | grep -cx 'sleep 317'); [ \"$n\" = 0 ] && exit 0; sleep 0.2; "
        "done; ps -eo pid,stat,args | grep 'sleep 317'; exit 1",
        timeout=60,
    )
    assert r.ok, f"the timed-out command's processes still run:\n{r.stdout}"
    bg = running_vm.run(f"cat /tmp/bg-{tag}").output
    assert bg.isdigit(), bg
    r = running_vm.run(f"ps -o pid= -p {bg} || true")
    assert r.output == "", f"the background sleep (pid {bg}) survived the timeout"


def test_login_and_raw_shells(running_vm):
    probe = "shopt -q login_shell && echo login || echo not-login"
    assert running_vm.run(probe, shell="login").output == "login"
    # /bin/sh (dash) has no shopt: the fallback prints.
    assert running_vm.run(probe, shell="raw").output == "not-login"

    login0 = running_vm.run("echo $0", shell="login").output
    raw0 = running_vm.run("echo $0", shell="raw").output
    assert login0.endswith("bash"), login0
    assert raw0 in ("sh", "/bin/sh"), raw0
    # The default is the login shell.
    assert running_vm.run(probe).output == "login"


def test_cwd(running_vm):
    assert running_vm.run("pwd", cwd="/tmp").output == "/tmp"
    assert running_vm.run("pwd", cwd="/tmp", shell="raw").output == "/tmp"


def test_per_run_env(running_vm):
    r = running_vm.run('echo "$SMOLVM_T1-$SMOLVM_T2"', env={"SMOLVM_T1": "a b", "SMOLVM_T2": "c"})
    assert r.output == "a b-c"
    # Nothing of it stays for the next command.
    assert running_vm.run('echo "[$SMOLVM_T1]"').output == "[]"


def test_vm_env_and_per_run_override(make_vm):
    vm = make_vm(env={"FOO": "bar", "KEEP": "k"})
    assert vm.info.config.env_vars == {"FOO": "bar", "KEEP": "k"}
    vm.start()
    assert vm.run("echo $FOO").output == "bar"
    assert vm.run("echo $FOO", shell="raw").output == "bar"
    assert vm.run("echo $FOO-$KEEP", env={"FOO": "baz"}).output == "baz-k"
    # The override was for that command only.
    assert vm.run("echo $FOO").output == "bar"


def test_a_timed_out_command_keeps_what_it_printed(running_vm):
    with pytest.raises(OperationTimeoutError) as ei:
        running_vm.run("echo partial; echo err >&2; sleep 300", timeout=2, shell="raw")
    assert ei.value.stdout == "partial\n"
    assert ei.value.stderr == "err\n"
    assert ei.value.details["timeout_seconds"] == 2
    assert ei.value.vm_id == running_vm.vm_id


def test_output_is_capped_by_max_output(running_vm):
    r = running_vm.run("head -c 3000000 /dev/zero | tr '\\0' a", shell="raw", max_output=1000)
    assert r.ok
    assert r.truncated
    assert r.stdout == "a" * 1000
    whole = running_vm.run("head -c 3000000 /dev/zero | tr '\\0' a", shell="raw")
    assert not whole.truncated and len(whole.stdout) == 3000000


def test_guest_output_is_raw_and_escape_text_defuses_it(running_vm):
    r = running_vm.run(r"printf '\033]52;c;cGF3bmVk\007\033[31mred\n'", shell="raw")
    assert "\x1b" in r.stdout, "run() must hand back the guest's bytes as they are"
    from smolvm import escape_text

    safe = escape_text(r.stdout)
    assert "\x1b" not in safe and "\x07" not in safe
    assert "red" in safe
