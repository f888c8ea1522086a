"""Lay out ConvAI2, DSTC7 or Ubuntu v2 files fetched elsewhere so that ParlAI 1.7.2's own
teachers read them and never try to download.

ParlAI downloads its data on first use and marks the folder with ``.built``; where that marker
holds another version, ParlAI *deletes the whole folder* and downloads again (see
``parlai/core/build_data.py`` and each task's ``build.py``). Offline, that means a user's data
is one wrong marker away from being lost. So this module:

- checks every file the teachers read (names, line format, candidate counts, the label among
  the candidates, JSON/CSV well-formedness) and names the first bad file and line;
- builds the folder in a staging directory next to the target, writes ``.built`` last with the
  exact version ParlAI checks, and renames it into place in one step;
- never deletes, overwrites or edits anything it did not create: an existing target with other
  content or another version is refused with a message saying what to do;
- extracts archives only after refusing absolute paths, ``..`` members and links that point
  out, and then with tarfile's ``data`` filter as a second guard.
"""
import csv
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from parlai_poly import archives
from parlai_poly.storage import replace_dir, sha256_file

BUILT_MARKER = ".built"
FIXTURE_NOTE = "README.parlai-poly-fixture.txt"
SEARCH_DEPTH = 2  # how deep below --from (or an archive's root) the data files may sit


def quiet(message: str) -> None:
    """The default log: library callers get results and exceptions, not prints."""


class PrepareError(Exception):
    """Bad input for prepare or fixtures: the message is the one line the user sees."""


class BadFileError(PrepareError):
    """A problem in one file, named first (with its line, where there is one) as editors do."""

    def __init__(self, path, line: Optional[int], problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{self.path}:{line}: {problem}" if line else f"{self.path}: {problem}")

    def shown_from(self, staged: Path, origin: str) -> "BadFileError":
        """The same error naming the user's file rather than our staging copy of it."""
        prefix = str(staged) + os.sep
        if not self.path.startswith(prefix):
            return self
        return BadFileError(f"{origin}/{self.path[len(prefix):]}", self.line, self.problem)


def bad_file(path, line: Optional[int], problem: str) -> BadFileError:
    return BadFileError(path, line, problem)


# ----------------------------------------------------------------------------- ConvAI2


@dataclass(frozen=True)
class FileReport:
    examples: int
    note: str = ""


FBDIALOG_ID = re.compile(r"(\d+)(?: |$)")


def check_fbdialog_file(path: Path, num_candidates: Optional[int]) -> FileReport:
    """ConvAI2's fbdialog file, parsed as ParlAI's FbDeprecatedDialogTeacher parses it.

    Lines are ``N text`` (context, e.g. ``your persona: ...``) or ``N text<TAB>label<TAB>
    <TAB>c1|...|cK``; N is 1 at an episode's first line and then grows (ParlAI starts a new
    episode whenever N does not grow, so a restart other than at 1 means lost lines). Each episode
    must end on a labelled line: a file cut between lines otherwise looks complete. With
    ``num_candidates`` set, every labelled line needs exactly that many candidates and its
    label among them."""
    examples = 0
    last_id = last_line = None
    last_line_labelled = True
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(path, lineno, raw).strip().replace("\\n", "\n")
            if not line:
                continue
            match = FBDIALOG_ID.match(line)
            if not match:
                raise bad_file(path, lineno, "does not start with a line number and a space")
            line_id = int(match.group(1))
            if line_id == 1 and last_id is not None and not last_line_labelled:
                raise bad_file(path, lineno - 1, "episode ends without a labelled line (truncated?)")
            if line_id != 1 and line_id <= (last_id or 0):
                raise bad_file(path, lineno, f"line number {line_id} after {last_id} starts an episode without its line 1")
            last_id, last_line = line_id, lineno
            fields = line[match.end():].split("\t")
            last_line_labelled = len(fields) > 1
            if last_line_labelled:
                check_fbdialog_example(path, lineno, fields, num_candidates)
                examples += 1
    if not last_line_labelled:
        raise bad_file(path, last_line, "episode ends without a labelled line (truncated?)")
    if examples == 0:
        raise bad_file(path, None, "no labelled lines: no examples")
    note = f"{num_candidates} candidates each" if num_candidates else "no candidates"
    return FileReport(examples, note)


def check_fbdialog_example(path: Path, lineno: int, fields: List[str], num_candidates: Optional[int]) -> None:
    fields = [f.strip() for f in fields]
    if not fields[1]:
        raise bad_file(path, lineno, "has a tab but an empty label")
    if num_candidates is None:
        return
    if len(fields) < 4 or not fields[3]:
        raise bad_file(path, lineno, "has no candidates: expected text<TAB>label<TAB><TAB>c1|c2|...")
    candidates = fields[3].split("|")
    if len(candidates) != num_candidates:
        raise bad_file(path, lineno, f"has {len(candidates)} candidates, expected {num_candidates} (truncated?)")
    for label in fields[1].split("|"):
        if label not in candidates:
            raise bad_file(path, lineno, f"label {shorten(label)!r} is not among its candidates")


def decode_line(path: Path, lineno: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_file(path, lineno, f"not valid UTF-8 ({e.reason})") from None


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- DSTC7

DSTC7_RESPONSES = "ubuntu_responses_subtask_1.tsv"
JSON_SPACE = re.compile(r"[ \t\n\r]*")


def read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise bad_file(path, line, f"not valid UTF-8 ({e.reason})") from None


def iter_json_list(path: Path) -> Iterator[Tuple[int, object]]:
    """(line where it starts, element) for each element of the top-level JSON list.

    Decoding element by element, rather than with one json.loads, is what lets a bad example
    be reported by line in a file of 100,000 examples."""
    text = read_utf8(path)
    decoder = json.JSONDecoder()
    lines = LineCounter(text)
    pos = JSON_SPACE.match(text).end()
    if text[pos:pos + 1] != "[":
        raise bad_file(path, lines.at(pos), "expected a JSON list of examples")
    pos = JSON_SPACE.match(text, pos + 1).end()
    if text[pos:pos + 1] == "]":
        return
    while True:
        try:
            element, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise bad_file(path, e.lineno, f"bad JSON: {e.msg} at column {e.colno} (truncated?)") from None
        yield lines.at(pos), element
        pos = JSON_SPACE.match(text, end).end()
        separator = text[pos:pos + 1]
        if separator == "]":
            break
        if separator != ",":
            found = "end of file" if not separator else repr(separator)
            raise bad_file(path, lines.at(pos), f"bad JSON: expected ',' or ']', found {found} (truncated?)")
        pos = JSON_SPACE.match(text, pos + 1).end()
    after = JSON_SPACE.match(text, pos + 1).end()
    if after < len(text):
        raise bad_file(path, lines.at(after), "bad JSON: text after the closing ']'")


class LineCounter:
    """Line numbers of increasing offsets into one text, counting each newline once."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def read_dstc7_responses(path: Path) -> Dict[str, str]:
    """example-id -> correct reply, from the test answers TSV.

    ParlAI drops the last character of every line (``line[0:-1]``), so a last line without
    its newline, or a Windows line end, would silently change the label."""
    responses: Dict[str, str] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(path, lineno, raw)
            if not line.endswith("\n"):
                raise bad_file(path, lineno, "last line has no newline (truncated?); ParlAI would cut its last character")
            if line.endswith("\r\n"):
                raise bad_file(path, lineno, "Windows line end: ParlAI would keep the \\r in the label")
            parts = line[:-1].split("\t")
            if len(parts) < 3:
                raise bad_file(path, lineno, "expected example-id<TAB>candidate-id<TAB>utterance")
            responses[parts[0]] = parts[2]
    if not responses:
        raise bad_file(path, None, "empty: no answers")
    return responses


def check_dstc7_file(path: Path, num_options: int, exact: bool, responses: Optional[Dict[str, str]]) -> FileReport:
    """One ubuntu_*_subtask_1*.json file: the fields ParlAI's DSTC7Teacher reads, the option
    count, and the correct answer among the options (from the TSV where ``responses`` is
    given, as the teacher does for test)."""
    examples = 0
    for line, example in iter_json_list(path):
        check_dstc7_example(path, line, example, num_options, exact, responses)
        examples += 1
    if examples == 0:
        raise bad_file(path, None, "an empty list: no examples")
    count = f"{num_options}" if exact else f"at least {num_options}"
    return FileReport(examples, f"{count} options each")


def check_dstc7_example(path: Path, line: int, example, num_options: int, exact: bool,
                        responses: Optional[Dict[str, str]]) -> None:
    if not isinstance(example, dict):
        raise bad_file(path, line, "example is not a JSON object")
    for key in ("example-id", "messages-so-far", "options-for-next"):
        if key not in example:
            raise bad_file(path, line, f"example has no {key!r}")
    where = f"example-id {example['example-id']}"
    check_utterance_list(path, line, where, example["messages-so-far"], "messages-so-far", ("speaker", "utterance"))
    options = example["options-for-next"]
    check_utterance_list(path, line, where, options, "options-for-next", ("utterance",))
    if (exact and len(options) != num_options) or len(options) < num_options:
        expected = f"{num_options}" if exact else f"at least {num_options}"
        raise bad_file(path, line, f"{where} has {len(options)} options-for-next, expected {expected}")
    label = dstc7_label(path, line, where, example, responses)
    if label not in {o["utterance"] for o in options}:
        raise bad_file(path, line, f"{where}: correct answer {shorten(label)!r} is not among options-for-next")


def dstc7_label(path: Path, line: int, where: str, example: dict, responses: Optional[Dict[str, str]]) -> str:
    if responses is not None:
        key = str(example["example-id"])
        if key not in responses:
            raise bad_file(path, line, f"{where} has no answer in {DSTC7_RESPONSES}")
        return responses[key]
    answers = example.get("options-for-correct-answers")
    check_utterance_list(path, line, where, answers, "options-for-correct-answers", ("utterance",))
    return answers[0]["utterance"]


def check_utterance_list(path: Path, line: int, where: str, items, name: str, keys: Tuple[str, ...]) -> None:
    if not isinstance(items, list) or not items:
        raise bad_file(path, line, f"{where}: {name!r} must be a non-empty list")
    for item in items:
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in keys):
            raise bad_file(path, line, f"{where}: every {name!r} entry needs string fields {', '.join(keys)}")


# ----------------------------------------------------------------------------- Ubuntu

UBUNTU_TRAIN_COLUMNS = 3  # Context, Utterance, Label
UBUNTU_EVAL_COLUMNS = 11  # Context, Ground Truth Utterance, 9 distractors


def check_ubuntu_csv(path: Path, columns: int) -> FileReport:
    """A {train,valid,test}.csv: a header, then rows of exactly ``columns`` fields.

    ParlAI gives candidates only to rows of more than 3 fields, the response plus the
    distractors, so 11 fields means 10 candidates with the label always among them. A row
    cut short (a truncated file) shows up as a wrong field count. Train Labels are checked
    too, and rows with Label 0 reported: ParlAI ignores the column and trains on them as if
    they were correct replies."""
    rows = negatives = 0
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        end_line = 0
        try:
            for row in reader:
                start_line, end_line = end_line + 1, reader.line_num
                check_ubuntu_row(path, start_line, row, columns, header=start_line == 1)
                if start_line > 1:
                    rows += 1
                    negatives += columns == UBUNTU_TRAIN_COLUMNS and float(row[2]) == 0
        except csv.Error as e:
            raise bad_file(path, reader.line_num, f"bad CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise bad_file(path, end_line + 1, f"not valid UTF-8 ({e.reason})") from None
    if end_line == 0:
        raise bad_file(path, None, "empty: expected a header row")
    if rows == 0:
        raise bad_file(path, None, "a header but no rows: no examples")
    if columns == UBUNTU_TRAIN_COLUMNS:
        note = f"no candidates (train); {negatives} rows with Label 0, which ParlAI trains on as positives" if negatives else "no candidates (train)"
    else:
        note = f"{columns - 1} candidates each"
    return FileReport(rows, note)


def check_ubuntu_row(path: Path, line: int, row: List[str], columns: int, header: bool) -> None:
    if len(row) != columns:
        what = "header has" if header else "row has"
        raise bad_file(path, line, f"{what} {len(row)} fields, expected {columns} (truncated?)")
    if header:
        return
    if not row[0].strip() or not row[1].strip():
        raise bad_file(path, line, "empty context or response")
    if columns == UBUNTU_TRAIN_COLUMNS:
        try:
            label = float(row[2])
        except ValueError:
            label = None
        if label not in (0.0, 1.0):
            raise bad_file(path, line, f"Label {row[2]!r} is not 0 or 1")


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """What one ParlAI task reads: its folder under the datapath, the ``.built`` version its
    build.py checks (None: any marker will do), the official archive's name, and a checker
    for every file name the teachers may open."""

    task: str
    folder: str
    version: Optional[str]
    archive: str
    required: Tuple[str, ...]
    optional: Tuple[str, ...]

    @property
    def known_files(self) -> Tuple[str, ...]:
        return self.required + self.optional


CONVAI2_FILES = tuple(
    f"{split}_{who}_{variant}{cands}.txt"
    for split in ("train", "valid")
    for who in ("self", "other", "both", "none")
    for variant in ("original", "revised")
    for cands in ("", "_no_cands")
)
CONVAI2_REQUIRED = ("train_self_original.txt", "valid_self_original.txt")
DSTC7_REQUIRED = tuple(f"ubuntu_{s}_subtask_1.json" for s in ("train", "dev", "test")) + (DSTC7_RESPONSES,)
DSTC7_OPTIONAL = ("ubuntu_train_subtask_1_augmented.json", "ubuntu_train_subtask_1_sampled.json")

LAYOUTS: Dict[str, Layout] = {
    "convai2": Layout("convai2", "ConvAI2", "v5.0", "convai2_fix_723.tgz", CONVAI2_REQUIRED,
                      tuple(n for n in CONVAI2_FILES if n not in CONVAI2_REQUIRED)),
    "dstc7": Layout("dstc7", "dstc7", "2.0", "dstc7_v2.tgz", DSTC7_REQUIRED, DSTC7_OPTIONAL),
    "ubuntu": Layout("ubuntu", "Ubuntu", None, "ubuntu.tar.gz", ("train.csv", "valid.csv", "test.csv"), ()),
}
CONVAI2_CANDIDATES = 20
DSTC7_OPTIONS = 100
DSTC7_SAMPLED_OPTIONS = 16  # the Sampled teacher keeps 16 options: it needs at least that many


def check_layout_files(layout: Layout, folder: Path) -> Dict[str, FileReport]:
    """Check every known file present in ``folder`` (the required ones must be there)."""
    missing = [name for name in layout.required if not (folder / name).is_file()]
    if missing:
        raise PrepareError(f"{folder}: missing {', '.join(missing)} (needed by ParlAI's {layout.task} teachers)")
    present = [name for name in layout.known_files if (folder / name).is_file()]
    responses = read_dstc7_responses(folder / DSTC7_RESPONSES) if layout.task == "dstc7" else None
    return {name: check_known_file(layout, folder / name, responses) for name in present}


def check_known_file(layout: Layout, path: Path, dstc7_responses: Optional[Dict[str, str]]) -> FileReport:
    name = path.name
    if layout.task == "convai2":
        return check_fbdialog_file(path, None if name.endswith("_no_cands.txt") else CONVAI2_CANDIDATES)
    if layout.task == "ubuntu":
        return check_ubuntu_csv(path, UBUNTU_TRAIN_COLUMNS if name == "train.csv" else UBUNTU_EVAL_COLUMNS)
    if name == DSTC7_RESPONSES:
        return FileReport(len(dstc7_responses), "test answers")
    if name in DSTC7_OPTIONAL:
        return check_dstc7_file(path, DSTC7_SAMPLED_OPTIONS, exact=False, responses=None)
    return check_dstc7_file(path, DSTC7_OPTIONS, exact=True, responses=dstc7_responses if "_test_" in name else None)


# ----------------------------------------------------------------------------- target folder


def built_version(folder: Path) -> Optional[str]:
    """The version line of ``folder/.built`` ('' when it has none), None without a marker."""
    marker = folder / BUILT_MARKER
    if not marker.is_file():
        return None
    lines = marker.read_text(encoding="utf-8", errors="replace").split("\n")
    return lines[1] if len(lines) > 1 else ""


def is_built_for(folder: Path, layout: Layout) -> bool:
    """ParlAI's own test (build_data.built): a version must match exactly, else any marker."""
    version = built_version(folder)
    return version is not None and (layout.version is None or version == layout.version)


def refuse_unusable_target(target: Path, layout: Layout) -> None:
    """Raise unless ``target`` is absent, empty, or already a built folder of the right version
    (which is then compared file by file once the new content is staged)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise PrepareError(f"{target} exists and is a link or a file, not a plain directory; refusing to touch it")
    if not target.exists() or not any(target.iterdir()) or is_built_for(target, layout):
        return
    version = built_version(target)
    if version is None:
        raise PrepareError(
            f"{target} exists, is not empty and has no {BUILT_MARKER} marker; refusing to touch it "
            "(ParlAI would download into it). Move it away and run this again; to use files already "
            "in it, pass the moved folder as --from.")
    raise PrepareError(
        f"{target} holds data marked version {version!r}, but ParlAI's {layout.task} teacher wants "
        f"{layout.version!r} and would DELETE that folder on its next run; refusing to touch it. "
        "Move it away and run this again.")


def file_hashes(folder: Path) -> Dict[str, str]:
    """relative path -> sha256 of every file except the marker (its timestamp always differs)."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != BUILT_MARKER:
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def same_content(a: Path, b: Path) -> Tuple[bool, str]:
    """Whether two folders hold the same files, and the first difference if not."""
    hashes_a, hashes_b = file_hashes(a), file_hashes(b)
    for name in sorted(set(hashes_a) | set(hashes_b)):
        if hashes_a.get(name) != hashes_b.get(name):
            return False, name
    return True, ""


def move_into_place(staged: Path, target: Path, layout: Layout, log: Callable[[str], None]) -> None:
    """Rename the staged folder to ``target``, or leave an identical ``target`` as it is.

    A folder that appears meanwhile is never overwritten either (``storage.replace_dir``
    replaces only an empty one here)."""
    refuse_unusable_target(target, layout)
    if target.exists() and any(target.iterdir()):
        identical, differing = same_content(staged, target)
        if not identical:
            note = " (it holds parlai-poly fixture data)" if (target / FIXTURE_NOTE).exists() else ""
            raise PrepareError(
                f"{target} is already prepared{note} with different content (first difference: "
                f"{differing}); refusing to overwrite it. Move it away and run this again.")
        log(f"{target} already holds exactly this data; left as it was")
        return
    appeared = lambda path: PrepareError(f"{path} appeared while preparing it; left as it was")  # noqa: E731
    replace_dir(str(staged), str(target), owned=lambda path: False, refused=appeared)  # never over data
    log(f"ready: {target}")


def mark_built(folder: Path, layout: Layout) -> None:
    """The marker, with ParlAI's own mark_done so that its built() reads it back exactly."""
    from parlai.core.build_data import mark_done

    mark_done(str(folder), layout.version)


def make_missing_dirs(path: Path) -> List[Path]:
    """mkdir -p, returning the directories created (deepest last) so a failure can undo it."""
    created = []
    for parent in reversed([path] + list(path.parents)):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def install_dataset(layout: Layout, datapath: Path, populate: Callable[[Path], Optional[str]],
                    log: Callable[[str], None] = quiet) -> Path:
    """Fill a staging folder with ``populate``, check it, mark it built, move it into place.

    ``populate`` returns where the files came from (a folder, or ``archive/inner/folder``),
    so that an error names the user's file, not our staging copy.

    Whatever happens, only the staging folder (and datapath directories this call created)
    are removed: the datapath is left as it was unless the new folder went into place."""
    datapath = Path(datapath).absolute()
    target = datapath / layout.folder
    refuse_unusable_target(target, layout)
    created = make_missing_dirs(datapath)
    staging = Path(tempfile.mkdtemp(prefix=f".{layout.folder}.staging-", dir=datapath))
    installed = False
    try:
        folder = staging / layout.folder
        folder.mkdir()
        origin = populate(folder)
        try:
            reports = check_layout_files(layout, folder)
        except BadFileError as e:
            raise (e.shown_from(folder, origin) if origin else e) from None
        for name, report in reports.items():
            log(f"  {name}: {report.examples} examples, {report.note}")
        mark_built(folder, layout)
        move_into_place(folder, target, layout, log)
        installed = True
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not installed:
            for directory in reversed(created):
                try_rmdir(directory)


def try_rmdir(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty: something else put files there meanwhile, so it stays


# ----------------------------------------------------------------------------- sources


def extract_archive(archive: Path, destination: Path) -> None:
    """Shared safe extraction (parlai_poly.archives), its error shown as one of ours."""
    try:
        archives.extract_archive(archive, destination)
    except archives.ArchiveError as e:
        raise bad_file(archive, None, e.problem) from None


def find_data_folder(root: Path, layout: Layout, shown_as: Optional[str] = None) -> Path:
    """The folder holding the required files: ``root`` or one folder at most SEARCH_DEPTH
    below it (archives may or may not wrap their files in a top folder). ``shown_as`` names
    ``root`` in messages (an archive, for its extraction folder)."""
    shown_as = shown_as or str(root)
    candidates = [root] + [p for depth in range(1, SEARCH_DEPTH + 1) for p in sorted(root.glob("/".join(["*"] * depth)))]
    holding = [p for p in candidates if p.is_dir() and not p.is_symlink() and all((p / n).is_file() for n in layout.required)]
    if len(holding) > 1:
        inner = ", ".join(p.relative_to(root).as_posix() for p in holding)
        raise PrepareError(f"{shown_as}: the {layout.task} files are in several folders ({inner}); keep only one")
    if not holding:
        present = [n for n in layout.required if (root / n).is_file()]
        missing = [n for n in layout.required if n not in present]
        raise PrepareError(f"{shown_as}: missing {', '.join(missing)} (looked there and up to {SEARCH_DEPTH} folders below)")
    return holding[0]


def gather_known_files(source: Path, folder: Path, layout: Layout, move: bool, log: Callable[[str], None]) -> None:
    """Put the files ParlAI reads into ``folder``: moved out of our own extraction folder,
    copied from a user's folder (whose files stay untouched)."""
    for name in layout.known_files:
        if (source / name).is_file():
            if move and not (source / name).is_symlink():
                os.replace(source / name, folder / name)
            else:
                shutil.copyfile(source / name, folder / name)
    ignored = sorted(p.name for p in source.iterdir() if p.name not in layout.known_files and p.name != BUILT_MARKER)
    if ignored:
        log(f"  not used by ParlAI's {layout.task} teachers, not copied: {', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}")


def official_archive_note(archive: Path, layout: Layout) -> str:
    """Whether the archive is byte for byte the one ParlAI would download (informational:
    the content checks decide)."""
    import importlib

    resources = importlib.import_module(f"parlai.tasks.{layout.task}.build").RESOURCES
    digest = sha256_file(archive)
    if any(r.hashcode == digest for r in resources):
        return f"{archive.name}: sha256 matches ParlAI's official {layout.archive}"
    return f"{archive.name}: not byte-identical to ParlAI's {layout.archive} (fine if the files check out)"


def source_populator(layout: Layout, source: Path, log: Callable[[str], None]) -> Callable[[Path], None]:
    """How to fill the staging folder from --from: an archive is extracted inside the staging
    area; a directory is searched for the files (or for the official archive) and copied."""
    source = Path(source).absolute()
    if not source.exists():
        raise PrepareError(f"{source}: no such file or directory")
    if source.is_dir() and not has_required_files(source, layout) and (source / layout.archive).is_file():
        source = source / layout.archive
    if source.is_file() and not archives.is_tar_name(source):
        raise PrepareError(f"{source}: expected a directory or a tar archive ({layout.archive})")

    def populate(folder: Path) -> str:
        root = source
        if source.is_file():
            log(official_archive_note(source, layout))
            root = folder.parent / "unpacked"
            root.mkdir()
            extract_archive(source, root)
        data_folder = find_data_folder(root, layout, shown_as=str(source))
        gather_known_files(data_folder, folder, layout, source.is_file(), log)
        if source.is_file():
            return str(source / data_folder.relative_to(root))
        return str(data_folder)

    return populate


def has_required_files(folder: Path, layout: Layout) -> bool:
    try:
        find_data_folder(folder, layout)
        return True
    except PrepareError:
        return False


def prepare(task: str, source, datapath, log: Callable[[str], None] = quiet) -> Path:
    """Check the official files at ``source`` and install them as ``<datapath>/<folder>``."""
    layout = LAYOUTS[task]
    return install_dataset(layout, Path(datapath), source_populator(layout, Path(source), log), log)
