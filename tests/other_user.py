"""A real second, unprivileged user for tests of what a hostile local user can do.

`second_user` creates a fresh system user (its own group, no home, no shell) for one
test and removes it afterwards; `AsUser` runs a function in a forked child that has
dropped to that user (setgroups, setgid, setuid) before it touches anything, so the
agent learns who it is from SO_PEERCRED as it would for a real job. Without root (or
without useradd) the tests that need it are skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

Report = Callable[[Any], None]


@pytest.fixture
def second_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user and become it")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if useradd is None or userdel is None:
        pytest.skip("useradd/userdel are not installed (Debian package: passwd)")
    name = f"rpt{secrets.token_hex(4)}"
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/bin/false", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run([userdel, name], check=False, capture_output=True)


class AsUser:
    """A forked process running `fn(report)` as `user`; each report is one JSON line.

    `groups` are the child's supplementary groups; `close_fds` closes every inherited
    descriptor but the report pipe first; `timeout` is `read`'s default deadline.
    """

    def __init__(
        self,
        user: pwd.struct_passwd,
        fn: Callable[[Report], None],
        groups: tuple[int, ...] = (),
        *,
        close_fds: bool = False,
        timeout: float = 30.0,
    ) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges first, touch nothing of the parent's
            try:
                os.close(r)
                if close_fds:
                    os.closerange(3, w)
                    os.closerange(w + 1, 4096)
                os.setgroups(list(groups))
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                out = os.fdopen(w, "w", buffering=1)
                fn(lambda obj: print(json.dumps(obj), file=out, flush=True))
            except BaseException as exc:
                os.write(w, (json.dumps({"crash": repr(exc)}) + "\n").encode())
            finally:
                os._exit(0)
        os.close(w)
        self.pid = pid
        self._fd = r
        self._buf = b""
        self.timeout = timeout

    def read(self, timeout: float | None = None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            assert ready, "the child said nothing in time"
            chunk = os.read(self._fd, 65536)
            assert chunk, "the child exited without a report"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        assert not (isinstance(obj, dict) and "crash" in obj), obj
        return obj

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._fd)


def as_user(user: pwd.struct_passwd, fn: Callable[[Report], None], timeout: float = 60) -> Any:
    """Run `fn` as `user`; its one report."""
    child = AsUser(user, fn)
    try:
        return child.read(timeout)
    finally:
        child.stop()
