"""No command writes over a file it reads: ``train`` (its pretrained checkpoint, its data), ``eval`` (the
checkpoint, the data sets) and ``export`` (the trained run it exports) check their outputs first.

Paths are compared after resolving symbolic links (and as the same inode when both exist); an output
folder inside an ImageFolder root counts too, since what is written there becomes part of the data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

RUN_FILES = ("model.pt", "summary.json", "log.jsonl", "run.lock")


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """``path`` is ``folder`` or lies below it."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files ``petal-fast train`` keeps in an output folder (those that exist, and the fixed names)."""
    folder = Path(run_dir)
    found = [folder / name for name in RUN_FILES]
    if folder.is_dir():
        found += sorted(folder.glob("checkpoint_last*.pt"))
    return found


def data_inputs(spec: str | os.PathLike | None) -> tuple[list[Path], list[Path]]:
    """(files, folders) a data set spec reads: a file (a ``.rec`` with its ``.idx``, a ``.bin``), or a
    folder (an ImageFolder root, or one holding ``train.rec``)."""
    if not spec:
        return [], []
    path = Path(os.fspath(spec))
    if path.is_dir():
        rec = path / "train.rec"
        return ([rec, rec.with_suffix(".idx")], []) if rec.is_file() else ([], [path])
    files = [path]
    if path.suffix == ".rec":
        files.append(path.with_suffix(".idx"))
    return files, []


def check_outputs(command: str, outputs: Iterable[str | os.PathLike], inputs: Mapping[str, Iterable[str | os.PathLike]],
                  folders: Mapping[str, Iterable[str | os.PathLike]] = {}) -> None:
    """ValueError if an output is one of the ``inputs`` ({what: files}) or lies inside one of the
    ``folders`` ({what: folders the command reads every file of})."""
    outputs = list(outputs)
    for what, files in inputs.items():
        for source in files:
            for out in outputs:
                if same_file(out, source):
                    raise ValueError(f"{command}: the output {out} is {what} ({source}), which this command reads; "
                                     "writing it would destroy that input. Choose another output path")
    for what, roots in folders.items():
        for root in roots:
            for out in outputs:
                if inside(out, root):
                    raise ValueError(f"{command}: the output {out} lies inside {what} ({root}), whose files this "
                                     "command reads; what it writes there would become part of it. Choose an "
                                     "output outside that folder")
