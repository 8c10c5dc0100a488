"""The processes API of a microVM: programs that run on their own (across suspend and resume
too), with their output kept by the guest (the newest 1 MiB each) and streamed as it comes.

``start_process`` answers at once with the process (its ``pid`` is its id);
``process_output`` streams its output from any offset; ``write_process_stdin``,
``signal_process`` and ``resize_process`` act on it; ``wait_process`` waits for its exit.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from typing import Dict, Iterator, List, Optional, Union

from . import KilnError, _query


class OutputChunk:
    """Bytes of a process's output: ``stream`` ("stdout" or "stderr"), ``offset`` in its whole
    output, ``data``. A process on a terminal has one stream, "stdout"."""

    __slots__ = ("stream", "offset", "data")

    def __init__(self, stream: str, offset: int, data: bytes):
        self.stream, self.offset, self.data = stream, offset, data

    @property
    def end(self) -> int:
        """The offset after these bytes: where to resume (``from_offset``)."""
        return self.offset + len(self.data)

    def __repr__(self) -> str:
        return f"OutputChunk({self.stream!r}, {self.offset}, {self.data!r})"


class ProcessOutput:
    """Iterates a process's :class:`OutputChunk` s as they come; after the last one,
    ``exit`` is the process as it exited. A suspend or stop ends the stream with
    :class:`kiln.KilnError` (``OutputEnded``); resume at ``position`` after a resume.
    ``close()`` (or leaving a ``with`` block) detaches; the process runs on."""

    def __init__(self, resp, from_offset: int):
        self._resp = resp
        self.position = from_offset
        self.exit: Optional[dict] = None

    def __enter__(self) -> "ProcessOutput":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._resp.close()

    def __iter__(self) -> Iterator[OutputChunk]:
        event = ""
        with self._resp:
            for raw in self._resp:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if event == "output":
                        v = json.loads(data)
                        chunk = OutputChunk(v["stream"], v["offset"], base64.b64decode(v["data"]))
                        self.position = chunk.end
                        yield chunk
                    elif event == "exit":
                        self.exit = json.loads(data)
                        return
                    elif event == "error":
                        raise KilnError(409, "OutputEnded", data)

    def read_all(self) -> bytes:
        """Every remaining byte until the exit (stdout and stderr in the order they came)."""
        return b"".join(c.data for c in self)


class ProcessesMixin:
    """Methods of :class:`kiln.Client` for processes; ``microvmIdentifier`` first."""

    def _procs(self, microvmIdentifier: str, rest: str = "", **params) -> str:
        return (f"/v1/microvms/{urllib.parse.quote(microvmIdentifier, safe='')}/processes{rest}"
                + _query(**params))

    def start_process(self, microvmIdentifier: str, command: Optional[List[str]] = None,
                      shell: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                      cwd: Optional[str] = None, user: Optional[str] = None,
                      pty: Union[None, tuple, dict] = None, stdin: bool = False,
                      tag: Optional[str] = None) -> dict:
        """Starts ``command`` (a list) or ``shell`` (a line for ``/bin/sh -c``); ``pty=(cols,
        rows)`` runs it on a terminal. Returns the process (``pid``, ``running``, …)."""
        body: dict = {"stdin": stdin}
        for key, value in (("command", command), ("shell", shell), ("env", env), ("cwd", cwd),
                           ("user", user), ("tag", tag)):
            if value is not None:
                body[key] = value
        if pty is not None:
            body["pty"] = pty if isinstance(pty, dict) else {"cols": pty[0], "rows": pty[1]}
        return self._call("POST", self._procs(microvmIdentifier), body)

    def list_processes(self, microvmIdentifier: str, running: Optional[bool] = None,
                       tag: Optional[str] = None, limit: Optional[int] = None,
                       cursor: Optional[str] = None) -> dict:
        """``{"processes": [...], "nextCursor"?}``, by pid."""
        flag = None if running is None else str(running).lower()
        return self._call("GET", self._procs(microvmIdentifier, running=flag, tag=tag, limit=limit,
                                             cursor=cursor))

    def get_process(self, microvmIdentifier: str, pid: int, wait_seconds: Optional[int] = None) -> dict:
        return self._call("GET", self._procs(microvmIdentifier, f"/{int(pid)}", waitSeconds=wait_seconds))

    def wait_process(self, microvmIdentifier: str, pid: int, timeout: float = 300.0) -> dict:
        """The process once it exited; :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {pid} still runs after {timeout} s")
            proc = self.get_process(microvmIdentifier, pid, wait_seconds=max(1, min(int(left), 60)))
            if not proc["running"]:
                return proc

    def process_output(self, microvmIdentifier: str, pid: int, from_offset: int = 0) -> ProcessOutput:
        """The process's output from ``from_offset`` on, as it comes (see :class:`ProcessOutput`)."""
        resp = self._open("GET", self._procs(microvmIdentifier, f"/{int(pid)}/output", **{"from": from_offset}),
                          timeout=None)
        return ProcessOutput(resp, from_offset)

    def write_process_stdin(self, microvmIdentifier: str, pid: int, data: Union[bytes, str] = b"",
                            eof: bool = False) -> None:
        """Writes ``data`` (at most 1 MiB; str is UTF-8) to its stdin; ``eof=True`` then closes it."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        path = self._procs(microvmIdentifier, f"/{int(pid)}/stdin", eof="true" if eof else None)
        self._call("POST", path, raw=raw, ctype="application/octet-stream")

    def signal_process(self, microvmIdentifier: str, pid: int, signal: Union[str, int] = "TERM") -> None:
        """Sends ``signal`` (a name such as "TERM", "INT", "KILL", or a number) to its process group."""
        self._call("POST", self._procs(microvmIdentifier, f"/{int(pid)}/signal"), {"signal": str(signal)})

    def resize_process(self, microvmIdentifier: str, pid: int, cols: int, rows: int) -> None:
        self._call("POST", self._procs(microvmIdentifier, f"/{int(pid)}/resize"), {"cols": cols, "rows": rows})
