"""The agent surface from Python: streaming output, files and directories,
filesystem requests, the persistent environment, guest ports."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time

import pytest

from smolvm import FileInfo, GuestFileError, SmolVM, StreamEvent, ValidationError
from smolvm.exceptions import OperationTimeoutError


def test_on_stdout_gets_lines_as_they_come(running_vm):
    seen = []
    t = time.monotonic()
    r = running_vm.run(
        "for i in 1 2 3; do echo $i; sleep 1; done; echo done >&2",
        shell="raw",
        on_stdout=lambda s: seen.append((time.monotonic() - t, s)),
        on_stderr=lambda s: seen.append((time.monotonic() - t, "ERR:" + s)),
    )
    total = time.monotonic() - t
    assert r.exit_code == 0
    assert r.stdout == "1\n2\n3\n"
    assert r.stderr == "done\n"
    assert "".join(s for _, s in seen if not s.startswith("ERR:")) == "1\n2\n3\n"
    first = seen[0][0]
    assert first + 1.5 < total, f"first chunk at {first:.2f}s of {total:.2f}s: not streamed"


def test_run_stream_yields_started_output_and_exit(running_vm):
    events = list(running_vm.run_stream("echo a; echo b >&2; exit 3", shell="raw"))
    assert all(isinstance(e, StreamEvent) for e in events)
    assert events[0].type == "started" and events[0].pid > 1
    assert events[-1].type == "exit" and events[-1].exit_code == 3
    assert "".join(e.data for e in events if e.type == "stdout") == "a\n"
    assert "".join(e.data for e in events if e.type == "stderr") == "b\n"
    stamps = [e.timestamp for e in events]
    assert stamps == sorted(stamps)


def test_run_stream_keeps_a_split_character_whole(running_vm):
    # 'é' is two bytes; printed byte by byte with a pause between them.
    out = "".join(
        e.data
        for e in running_vm.run_stream(r"printf '\303'; sleep 0.3; printf '\251\n'", shell="raw")
        if e.type == "stdout"
    )
    assert out == "é\n"


def test_run_stream_timeout_and_early_close(running_vm):
    with pytest.raises(OperationTimeoutError):
        for _ in running_vm.run_stream("sleep 30", timeout=1, shell="raw"):
            pass
    # Closing the generator early kills the command.
    gen = running_vm.run_stream("echo go; exec sleep 77", shell="raw")
    for ev in gen:
        if ev.type == "stdout":
            break
    gen.close()
    deadline = time.monotonic() + 20
    while running_vm.run("pgrep -x -f 'sleep 77' || true", shell="raw").output:
        assert time.monotonic() < deadline, "the abandoned command still runs"
        time.sleep(0.2)


def test_file_round_trip_keeps_bytes_mode_and_mtime(running_vm, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 5)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    assert running_vm.upload_file(src, "/root/py/deep/src.bin") == len(data)
    digest = hashlib.sha256(data).hexdigest()
    assert running_vm.run("sha256sum /root/py/deep/src.bin | cut -d' ' -f1").output == digest
    info = running_vm.files.stat("/root/py/deep/src.bin")
    assert isinstance(info, FileInfo)
    assert (info.kind, info.size, info.mode, int(info.mtime)) == ("file", len(data), 0o640, 1_600_000_000)
    dst = tmp_path / "out" / "dst.bin"
    assert running_vm.download_file("/root/py/deep/src.bin", dst) == len(data)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == digest
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert int(dst.stat().st_mtime) == 1_600_000_000
    # max_bytes refuses and writes nothing.
    with pytest.raises(ValidationError):
        running_vm.download_file("/root/py/deep/src.bin", tmp_path / "small.bin", max_bytes=10)
    assert not (tmp_path / "small.bin").exists()
    with pytest.raises(ValidationError, match="absolute"):
        running_vm.upload_file(src, "relative/x")
    with pytest.raises(GuestFileError) as e:
        running_vm.download_file("/root/py/nope", tmp_path / "n")
    assert e.value.kind == "path_not_found"


def test_directory_round_trip_with_symlinks(running_vm, tmp_path):
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "f.txt").write_text("hi\n")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("a/f.txt", src / "link")
    up = running_vm.upload_dir(src, "/root/pytree")
    assert (up["files"], up["symlinks"]) == (2, 1)
    assert running_vm.run("/root/pytree/run.sh").output == "ran"
    back = tmp_path / "back"
    down = running_vm.download_dir("/root/pytree", back)
    assert (down["files"], down["symlinks"]) == (2, 1)
    assert (back / "a" / "f.txt").read_text() == "hi\n"
    assert os.readlink(back / "link") == "a/f.txt"
    assert (back / "empty").is_dir()
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755


def test_guest_symlinks_are_never_followed_on_download(running_vm, tmp_path):
    running_vm.run(
        "rm -rf /root/evil && mkdir -p /root/evil/sub && ln -s /tmp /root/evil/tmp && "
        "ln -s ../../../../../../etc /root/evil/sub/up && echo ok > /root/evil/sub/real",
        shell="raw",
    )
    dest = tmp_path / "dest"
    r = running_vm.download_dir("/root/evil", dest)
    assert (r["files"], r["symlinks"]) == (1, 2)
    assert os.path.islink(dest / "tmp") and os.path.islink(dest / "sub" / "up")
    assert sorted(os.listdir(tmp_path)) == ["dest"], "nothing lands beside the destination"


def test_files_requests(running_vm):
    f = running_vm.files
    f.mkdir("/root/pyfs/x/y")
    assert f.exists("/root/pyfs/x/y")
    assert not f.exists("/root/pyfs/nope")
    running_vm.run("echo hi > /root/pyfs/x/g", shell="raw")
    assert [(e.name, e.kind) for e in f.list("/root/pyfs/x")] == [("g", "file"), ("y", "dir")]
    f.rename("/root/pyfs/x/g", "/root/pyfs/x/h")
    assert running_vm.run("cat /root/pyfs/x/h", shell="raw").output == "hi"
    with pytest.raises(GuestFileError) as e:
        f.remove("/root/pyfs/x")
    assert e.value.kind == "path_exists"
    with pytest.raises(GuestFileError) as e:
        f.mkdir("/root/pyfs/x/y", parents=False)
    assert e.value.kind == "path_exists"
    f.remove("/root/pyfs", recursive=True)
    assert not f.exists("/root/pyfs")
    with pytest.raises(GuestFileError) as e:
        f.stat("/root/pyfs")
    assert e.value.kind == "path_not_found"
    with pytest.raises(ValidationError):
        f.stat("rel")
    running_vm.sync()


def test_wait_for_port(running_vm):
    with pytest.raises(OperationTimeoutError):
        running_vm.wait_for_port(8765, timeout=0.5)
    running_vm.run(
        "cd /tmp && (sleep 1; exec python3 -m http.server 8765 --bind 127.0.0.1) >/dev/null 2>&1 </dev/null &",
        shell="raw",
    )
    running_vm.wait_for_port(8765, timeout=60)
    running_vm.run("pkill -f 'http.server 8765' || true", shell="raw")
    with pytest.raises(ValidationError):
        running_vm.wait_for_port(0)


def test_persistent_env_across_processes_and_restart(make_vm):
    vm = make_vm(env={"BASE": "b"})
    vm.start()
    assert vm.set_env_vars({"A": "1", "B": "two words"}) == {"BASE": "b", "A": "1", "B": "two words"}
    assert vm.run('echo "$BASE|$A|$B"').output == "b|1|two words"
    # Another process sees and changes the same environment.
    code = (
        "from smolvm import SmolVM; vm = SmolVM.from_id(%r); "
        "vm.set_env_vars({'C': '3'}); vm.unset_env_vars(['B']); "
        "print(vm.run('echo \"$A|${B-unset}|$C\"').output)" % vm.vm_id
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1|unset|3"
    assert vm.list_env_vars() == {"BASE": "b", "A": "1", "C": "3"}
    assert vm.run("echo $A", env={"A": "mine"}).output == "mine"
    vm.stop()
    vm.start()
    assert vm.run('echo "$A|$C"').output == "1|3"
    assert vm.set_env_vars({"ONLY": "x"}, merge=False) == {"ONLY": "x"}
    with pytest.raises(ValidationError):
        vm.set_env_vars({"1BAD": "x"})
    with pytest.raises(ValidationError):
        vm.set_env_vars({"A-B": "x"})
    assert vm.list_env_vars() == {"ONLY": "x"}


def test_pty_session_size_resize_ctrl_c_and_exit(running_vm):
    with running_vm.pty(["bash", "--norc", "-i"], rows=30, cols=100) as t:
        t.write("tty; stty size\r")
        out = t.read_until("30 100", timeout=30)
        assert b"/dev/pts/" in out
        t.resize(40, 120)
        t.write("stty size\r")
        t.read_until("40 120", timeout=30)
        # Ctrl-C interrupts the guest's foreground process, not us.
        t.write("sleep 60; echo slept-$((1+1))\r")
        time.sleep(1)
        t.write("\x03")
        t.write("echo after-$((6*7))\r")
        out = t.read_until("after-42", timeout=30)
        assert b"slept-2" not in out, "Ctrl-C did not reach the guest's sleep"
        t.write("exit 4\r")
        assert t.wait(timeout=30) == 4
        assert t.read() == b""


def test_cli_shell_on_a_terminal(running_vm):
    import fcntl
    import pty as ptymod
    import select
    import struct
    import termios

    cli = os.environ.get("SMOLVM_CLI")
    assert cli, "SMOLVM_CLI names the smolvm binary under test"
    pid, fd = ptymod.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(cli, [cli, "shell", running_vm.vm_id])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 99, 0, 0))

    def read_until(marker: bytes, t: float = 60.0) -> bytes:
        buf, end = b"", time.monotonic() + t
        while marker not in buf:
            assert time.monotonic() < end, f"{marker!r} not seen; got {buf[-200:]!r}"
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    break
        return buf

    os.write(fd, b"stty size; echo marker-$((2+3))\r")
    assert b"33 99" in read_until(b"marker-5")
    os.write(fd, b"sleep 60\r")
    time.sleep(1)
    os.write(fd, b"\x03")
    os.write(fd, b"echo alive-$((1+1))\r")
    read_until(b"alive-2")
    os.write(fd, b"exit 3\r")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3


def test_background_process_reattached_from_another_process(running_vm):
    proc = running_vm.spawn("echo started; exec sleep 1000", shell="raw")
    assert proc.handle > 0 and proc.pid > 1
    # Another Python process finds it, reads what it printed, signals it.
    code = (
        "from smolvm import SmolVM; vm = SmolVM.from_id(%r); p = vm.attach(%d); "
        "it = p.stream(); ev = next(e for e in it if e.type == 'stdout'); print(ev.data.strip()); "
        "it.close(); p.signal(15)" % (running_vm.vm_id, proc.handle)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "started"
    r = proc.wait(timeout=60)
    assert r.exit_code == 128 + 15
    assert r.stdout == "started\n"
    info = {p.handle: p for p in running_vm.processes()}[proc.handle]
    assert not info.running and info.exit_code == 143
    proc.forget()
    assert proc.handle not in {p.handle for p in running_vm.processes()}


def test_background_process_stdin_and_dropped_output(running_vm):
    cat = running_vm.spawn(["cat"], stdin=True)
    cat.write_stdin("line one\n")
    cat.write_stdin(b"line two\n")
    cat.close_stdin()
    r = cat.wait(timeout=60)
    assert (r.exit_code, r.stdout) == (0, "line one\nline two\n")
    big = running_vm.spawn("head -c 3000000 /dev/zero | tr '\\0' x", shell="raw")
    assert big.wait(timeout=120).exit_code == 0
    events = list(big.stream(from_start=True))
    dropped = [int(e.data) for e in events if e.type == "dropped"]
    assert dropped and dropped[0] >= 3_000_000 - 1024 * 1024
    got = sum(len(e.data) for e in events if e.type == "stdout")
    assert got + dropped[0] == 3_000_000


def test_async_file_transfer_and_port(running_vm, tmp_path):
    import asyncio

    src = tmp_path / "a.txt"
    src.write_text("async hello\n")

    async def go():
        n = await running_vm.async_upload_file(src, "/root/async/a.txt")
        m = await running_vm.async_download_file("/root/async/a.txt", tmp_path / "b.txt")
        with pytest.raises(OperationTimeoutError):
            await running_vm.async_wait_for_port(8799, timeout=0.3)
        return n, m

    assert asyncio.run(go()) == (12, 12)
    assert (tmp_path / "b.txt").read_text() == "async hello\n"


def test_background_wait_times_out_and_close_kills(running_vm):
    from smolvm import ProcessNotFoundError

    quiet = running_vm.spawn("exec sleep 300", shell="raw")
    t = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        quiet.wait(timeout=1)
    assert time.monotonic() - t < 10, "wait(timeout) must not wait for output"
    assert quiet.info().running, "a timed-out wait leaves it running"
    quiet.kill()
    assert quiet.wait(timeout=60).exit_code == 128 + 9
    # Without stdin=True its stdin is /dev/null: a reader sees EOF at once.
    r = running_vm.spawn("cat; echo eof-seen", shell="raw").wait(timeout=60)
    assert r.stdout == "eof-seen\n"
    with pytest.raises(ProcessNotFoundError):
        running_vm.attach(999_999)
    # Closing a terminal session kills its process, even while a reader
    # thread waits in it.
    with running_vm.pty(["sh", "-c", "echo ready; exec sleep 300"]) as t:
        t.read_until("ready", timeout=30)
    deadline = time.monotonic() + 30
    while running_vm.run("pgrep -x -f 'sleep 300' || true", shell="raw").output:
        assert time.monotonic() < deadline, "the closed terminal's process still runs"
        time.sleep(0.3)


def test_callbacks_respect_max_output(running_vm):
    seen = []
    r = running_vm.run("head -c 100000 /dev/zero | tr '\\0' a", shell="raw", max_output=1000, on_stdout=seen.append)
    assert len(r.stdout) == 1000 and r.truncated
    assert sum(len(s) for s in seen) == 100000


def test_async_run_stream(running_vm):
    import asyncio

    async def go():
        got = []
        async for ev in running_vm.async_run_stream("echo one; sleep 0.5; echo two >&2; exit 5", shell="raw"):
            got.append((ev.type, ev.data, ev.exit_code))
        # Leaving the loop early kills the command.
        async for ev in running_vm.async_run_stream("echo go; exec sleep 88", shell="raw"):
            if ev.type == "stdout":
                break
        return got

    got = asyncio.run(go())
    assert got[0][0] == "started"
    assert ("stdout", "one\n", None) in got and ("stderr", "two\n", None) in got
    assert got[-1] == ("exit", "", 5)
    deadline = time.monotonic() + 20
    while running_vm.run("pgrep -x -f 'sleep 88' || true", shell="raw").output:
        assert time.monotonic() < deadline, "the abandoned async command still runs"
        time.sleep(0.2)


def test_download_dir_max_bytes_writes_nothing(running_vm, tmp_path):
    running_vm.run("rm -rf /root/lim && mkdir -p /root/lim/a && head -c 3000 /dev/zero > /root/lim/a/f && "
                   "head -c 3000 /dev/zero > /root/lim/g", shell="raw")
    with pytest.raises(ValidationError, match="max_bytes"):
        running_vm.download_dir("/root/lim", tmp_path / "lim", max_bytes=5000)
    assert not (tmp_path / "lim").exists()
    r = running_vm.download_dir("/root/lim", tmp_path / "lim", max_bytes=6000)
    assert (r["files"], r["bytes"]) == (2, 6000)
