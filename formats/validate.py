"""Validation of a converted model directory, as CI pipelines run it (`qwen3pack validate`)."""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .rankfile import FormatError
from .reader import checksum_problems, rank_file_problems, read_manifest, read_rank_file


@dataclass
class Report:
    directory: str
    problems: list = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    checksums: bool = True

    @property
    def ok(self):
        return not self.problems

    def to_json(self):
        return {"directory": self.directory, "valid": self.ok, "problems": self.problems,
                "files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "checksums_checked": self.checksums}


def _rank_problems(directory, manifest, rank):
    """(problems, the rank file or None when unreadable); checksums are left to the caller."""
    entry = manifest["rank_files"][rank]
    try:
        rank_file = read_rank_file(directory / entry["file"])
    except FormatError as error:
        return [str(error)], None
    return list(rank_file_problems(rank_file, manifest, rank)), rank_file


def validate(directory, quick=False):
    """Every problem of a converted model: the manifest, each rank file against it and against its
    own bounds, the set as a whole, and (unless `quick`) every tensor's checksum."""
    started = time.perf_counter()
    directory = Path(directory)
    report = Report(str(directory), checksums=not quick)
    try:
        manifest = read_manifest(directory)
    except FormatError as error:
        report.problems.append(str(error))
        return report
    listed = {entry["file"] for entry in manifest["rank_files"]}
    for stray in sorted(p.name for p in directory.glob("rank-*.q3p") if p.name not in listed):
        report.problems.append(f"{stray}: a rank file that the manifest does not list (another conversion's?)")
    rank_files = []
    for rank in range(len(manifest["rank_files"])):
        problems, rank_file = _rank_problems(directory, manifest, rank)
        report.problems += problems
        if rank_file is not None:
            rank_files.append(rank_file)
            report.files += 1
            report.bytes += rank_file.file_size
    if not quick and rank_files:
        # One thread per file: the CRC releases the GIL, so files are checked in parallel.
        with ThreadPoolExecutor(max_workers=min(4, len(rank_files))) as pool:
            for problems in pool.map(lambda rf: list(checksum_problems(rf)), rank_files):
                report.problems += problems
    report.seconds = time.perf_counter() - started
    return report
