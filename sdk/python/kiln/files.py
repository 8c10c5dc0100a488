"""The files API of a microVM: its filesystem as one of the guest's users sees it.

Reads and archive downloads stream; writes take bytes or a file object and stream it;
``watch_files`` yields events as they happen. Every call takes ``user`` (default: the
image's user); the guest's permissions decide, and its errors come back as
:class:`kiln.KilnError` (``AccessDenied``, ``ResourceNotFoundException``, …).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Iterator, Optional, Union

from . import KilnError, _error, _query

_CHUNK = 1 << 20


def _safe_member(m: tarfile.TarInfo) -> bool:
    """A member that lands inside the destination: a plain file or directory with a relative
    path that does not climb out. Links and devices from a guest are skipped."""
    name = m.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return (m.isfile() or m.isdir()) and not name.startswith("/") and ".." not in parts


class FilesMixin:
    """Methods of :class:`kiln.Client` for files; ``microvmIdentifier`` first, then the path."""

    def _files(self, microvmIdentifier: str, rest: str = "", **params) -> str:
        return f"/v1/microvms/{urllib.parse.quote(microvmIdentifier, safe='')}/files{rest}" + _query(**params)

    def _open(self, method: str, path: str, body=None, length: Optional[int] = None,
              ctype: str = "application/octet-stream", timeout: Optional[float] = -1.0):
        req = urllib.request.Request(self.endpoint + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self._key}")
        if body is not None:
            req.add_header("Content-Type", ctype)
            req.add_header("Content-Length", str(length))
        try:
            return urllib.request.urlopen(req, timeout=self.timeout if timeout == -1.0 else timeout,
                                          context=self._ssl)
        except urllib.error.HTTPError as e:
            raise _error(e) from None

    def list_files(self, microvmIdentifier: str, path: str, user: Optional[str] = None,
                   limit: Optional[int] = None) -> dict:
        """``{"path", "entries": [{name, path, kind, size, mode, uid, gid, modifiedMs}], "truncated"}``."""
        return self._call("GET", self._files(microvmIdentifier, path=path, user=user, limit=limit))

    def stat_file(self, microvmIdentifier: str, path: str, user: Optional[str] = None) -> dict:
        return self._call("GET", self._files(microvmIdentifier, "/stat", path=path, user=user))

    def iter_file(self, microvmIdentifier: str, path: str, user: Optional[str] = None,
                  chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """A file's bytes in chunks as they arrive: for files too large to hold in memory."""
        with self._open("GET", self._files(microvmIdentifier, "/content", path=path, user=user)) as resp:
            while True:
                chunk = resp.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def read_file(self, microvmIdentifier: str, path: str, user: Optional[str] = None) -> bytes:
        return b"".join(self.iter_file(microvmIdentifier, path, user))

    def write_file(self, microvmIdentifier: str, path: str, data: Union[bytes, str, IO[bytes]],
                   user: Optional[str] = None, mode: Optional[str] = None,
                   createParents: bool = False) -> dict:
        """Writes ``data`` (bytes, str as UTF-8, or a seekable binary file, streamed) to ``path``
        atomically; ``mode`` in octal (``"0755"``). Returns the new file's entry."""
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, (bytes, bytearray)):
            body, length = bytes(data), len(data)
        else:
            start = data.tell()
            length = data.seek(0, io.SEEK_END) - start
            data.seek(start)
            body = data
        url = self._files(microvmIdentifier, "/content", path=path, user=user, mode=mode,
                          createParents="true" if createParents else None)
        with self._open("PUT", url, body, length, timeout=None) as resp:
            return json.loads(resp.read())

    def make_directory(self, microvmIdentifier: str, path: str, user: Optional[str] = None,
                       mode: Optional[str] = None, parents: bool = True) -> dict:
        body = {"path": path, "parents": parents}
        if user is not None:
            body["user"] = user
        if mode is not None:
            body["mode"] = mode
        return self._call("POST", self._files(microvmIdentifier, "/mkdir"), body)

    def move_file(self, microvmIdentifier: str, source: str, destination: str,
                  user: Optional[str] = None) -> dict:
        body = {"from": source, "to": destination}
        if user is not None:
            body["user"] = user
        return self._call("POST", self._files(microvmIdentifier, "/move"), body)

    def remove_file(self, microvmIdentifier: str, path: str, user: Optional[str] = None,
                    recursive: bool = False) -> None:
        self._call("DELETE", self._files(microvmIdentifier, path=path, user=user,
                                         recursive="true" if recursive else None))

    def upload_directory(self, microvmIdentifier: str, local_dir: str, path: str,
                         user: Optional[str] = None) -> dict:
        """The contents of ``local_dir`` into the guest directory ``path`` (made if missing), as
        a tar stream; files are owned by ``user``."""
        if not os.path.isdir(local_dir):
            raise ValueError(f"{local_dir!r} is not a directory")
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w") as tar:
                for name in sorted(os.listdir(local_dir)):
                    tar.add(os.path.join(local_dir, name), arcname=name)
            length = tmp.tell()
            tmp.seek(0)
            url = self._files(microvmIdentifier, "/archive", path=path, user=user)
            with self._open("PUT", url, tmp, length, ctype="application/x-tar", timeout=None) as resp:
                return json.loads(resp.read())

    def download_directory(self, microvmIdentifier: str, path: str, local_dir: str,
                           user: Optional[str] = None) -> list:
        """The guest directory ``path`` into ``local_dir`` (made if missing). Only plain files
        and directories inside ``local_dir`` are written (a guest's links and ``..`` entries
        are skipped); returns the names written."""
        os.makedirs(local_dir, exist_ok=True)
        written = []
        url = self._files(microvmIdentifier, "/archive", path=path, user=user)
        with self._open("GET", url, timeout=None) as resp, tarfile.open(fileobj=resp, mode="r|") as tar:
            for member in tar:
                if not _safe_member(member):
                    continue
                target = os.path.join(local_dir, member.name)
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                src = tar.extractfile(member)
                with open(target, "wb") as out:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                written.append(member.name.lstrip("./") or member.name)
        return written

    def watch_files(self, microvmIdentifier: str, path: str, user: Optional[str] = None) -> Iterator[dict]:
        """Yields ``{"kind": "create"|"modify"|"delete", "path", "isDir"}`` for changes under
        ``path`` until the watch ends; raises :class:`KilnError` (``WatchEnded``) when kilnd
        ends it with a reason (the microVM was suspended or stopped). Close the generator to
        stop watching."""
        # Opened here, not at the first next(): changes made after this call are seen.
        resp = self._open("GET", self._files(microvmIdentifier, "/watch", path=path, user=user), timeout=None)
        return _events(resp)


def _events(resp) -> Iterator[dict]:
    """The `file` events of a watch response until its `end` (or `error`, raised)."""
    event = ""
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                if event == "file":
                    yield json.loads(data)
                elif event == "error":
                    raise KilnError(409, "WatchEnded", data)
                elif event == "end":
                    return
