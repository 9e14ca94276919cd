"""Data for SASRec: readers, filters, splits, the MovieLens-1M download and training batches.

Items are numbered 1..num_items everywhere (0 is padding); a user's history is a 1-D int64 array in time order.

- :func:`read_sasrec_txt`: the original SASRec text format, ``user item`` per line, a user's lines in time order.
- :func:`read_interactions` + :func:`filter_min_interactions`: a CSV/Parquet table with user, item and timestamp
  columns, and the SCE code's popularity filters.
- :func:`leave_one_out` and :func:`temporal_split`: the two evaluation protocols of the SCE paper.
- :func:`download_movielens_1m`: the GroupLens archive, checked against its SHA-256.
- :class:`TrainBatches`: right-aligned (input, target) windows of ``max_len`` items, padding 0.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

PAD_ID = 0
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# SHA-256 of GroupLens' ml-1m.zip (its published MD5 is c4d9eecfca2ab87c1945afe126590906); the same value is pinned
# by TensorFlow Recommenders' MovieLens example and several independent projects.
ML1M_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
ML1M_COLUMNS = ("user", "item", "rating", "timestamp")
# The SCE paper's filters (all datasets but Amazon Beauty): items with >= 5 and users with >= 20 interactions.
SCE_MIN_ITEM_INTERACTIONS = 5
SCE_MIN_USER_INTERACTIONS = 20
# Temporal split: interactions at or after the 95% timestamp quantile are the test period (SCE reference).
TEMPORAL_TEST_QUANTILE = 0.95
HASH_BLOCK = 1 << 20


@dataclass
class SequenceData:
    """Histories of ``len(sequences)`` users over items 1..num_items.

    ``user_ids[u]`` is user u's id in the source; ``item_ids[i]`` is item i's id in the source (entry 0 unused),
    or None when the source ids already are 1..num_items.
    """

    sequences: list[np.ndarray]
    num_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray | None = None

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_counts(self) -> torch.Tensor:
        """(num_items + 1,) float64 interaction counts per item id (entry 0, padding, is 0)."""
        flat = np.concatenate(self.sequences) if self.sequences else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(np.bincount(flat, minlength=self.num_items + 1).astype(np.float64))

    def head(self, num_users: int) -> SequenceData:
        """The first ``num_users`` users, same catalogue (for quick runs and tests)."""
        return SequenceData(self.sequences[:num_users], self.num_items, self.user_ids[:num_users], self.item_ids)


@dataclass
class Split:
    """Training histories and the validation/test (input history, target item) pairs.

    ``train`` are the histories the model learns from (each gives ``len - 1`` next-item examples);
    ``valid_inputs[u]`` / ``valid_targets[u]`` and ``test_inputs[u]`` / ``test_targets[u]`` are what ranking sees.
    """

    train: list[np.ndarray]
    valid_inputs: list[np.ndarray]
    valid_targets: np.ndarray
    test_inputs: list[np.ndarray]
    test_targets: np.ndarray
    num_items: int
    item_ids: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def item_counts(self) -> torch.Tensor:
        """(num_items + 1,) float64 counts of each item in the training histories (for popularity sampling)."""
        flat = np.concatenate(self.train) if self.train else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(np.bincount(flat, minlength=self.num_items + 1).astype(np.float64))


def _fail(path, line_no: int, message: str):
    raise ValueError(f"{path}:{line_no}: {message}")


INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
_DIGITS = re.compile(rb"[0-9]+")  # the SASRec and MovieLens files: ids are plain ASCII decimal numbers
_INTEGER = r"[+-]?[0-9]+"  # a table's integer ids and timestamps
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"  # a table's (finite) float timestamps
CSV_SEPARATORS = ",;\t| "
# Local files read through `datasets` (load_interactions_dataset), by extension.
DATASETS_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SNIFF_BYTES = 1 << 16


def _text_lines(path):
    """``(line_no, text)`` for each line of a UTF-8 file; invalid UTF-8 raises ValueError naming the line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _fail(path, line_no, f"not valid UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at column "
                                     f"{exc.start + 1})")


def _id(path, line_no: int, text: str, what: str) -> int:
    """A non-negative decimal id in int64 range, else ValueError naming the file and line."""
    if not _DIGITS.fullmatch(text.encode("utf-8", "replace")):
        _fail(path, line_no, f"{what} must be a non-negative integer, got {text!r}")
    value = int(text)
    if value > INT64_MAX:
        _fail(path, line_no, f"{what} {text} does not fit in int64 (max {INT64_MAX})")
    return value


def read_sasrec_txt(path: str | os.PathLike) -> SequenceData:
    """Read the SASRec text format: one ``user item`` pair of positive integers per line, in time order per user.

    Users are numbered in order of first appearance; their items keep the file's line order (the original reader
    does the same, so a user's lines need not be contiguous). Item ids must be >= 1 (0 is padding); the catalogue
    is 1..max item id. Blank lines are skipped. Raises ``ValueError`` naming the file and line number for a line
    that is not valid UTF-8, not two ASCII decimal integers, an id < 1 or an id beyond int64, and for a file with no
    interactions.
    """
    users: dict[int, list[int]] = {}
    for line_no, line in _text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            _fail(path, line_no, f"expected 'user item', got {len(fields)} fields: {line.rstrip()!r}")
        if not all(_DIGITS.fullmatch(f.encode("utf-8", "replace")) for f in fields):
            _fail(path, line_no, f"ids must be integers, got {line.rstrip()!r}")
        user, item = (_id(path, line_no, f, name) for f, name in zip(fields, ("user id", "item id"), strict=True))
        if user < 1 or item < 1:
            _fail(path, line_no, f"ids start at 1 (item 0 is padding), got {line.rstrip()!r}")
        users.setdefault(user, []).append(item)
    if not users:
        raise ValueError(f"{path}: no interactions")
    sequences = [np.asarray(items, dtype=np.int64) for items in users.values()]
    num_items = int(max(int(s.max()) for s in sequences))
    return SequenceData(sequences, num_items, np.asarray(list(users), dtype=np.int64))


def _first_bad(values: pd.Series, pattern: str) -> int | None:
    """Position of the first string in ``values`` that does not fully match ``pattern`` (None: all match)."""
    bad = ~values.str.fullmatch(pattern, na=False).to_numpy()
    return int(bad.argmax()) if bad.any() else None


def _ids_column(values: pd.Series, where, what: str) -> pd.Series:
    """Integer ids as int64 when every value is an integer (each in int64 range), else the strings themselves."""
    if _first_bad(values, _INTEGER) is not None:
        return values
    as_int = values.map(int)
    out_of_range = ((as_int > INT64_MAX) | (as_int < INT64_MIN)).to_numpy()
    if out_of_range.any():
        row = int(out_of_range.argmax())
        raise ValueError(f"{where(row)}: {what} {values.iloc[row]} does not fit in int64")
    return as_int.astype(np.int64)


def _timestamps_column(values: pd.Series, where) -> pd.Series:
    """Numeric timestamps: int64 if every value is an integer, else finite float64; anything else is an error (a
    string column would sort "10" before "9")."""
    if _first_bad(values, _INTEGER) is None:
        return _ids_column(values, where, "timestamp")
    row = _first_bad(values, _NUMBER)
    if row is not None:
        raise ValueError(f"{where(row)}: timestamp must be a number, got {values.iloc[row]!r}")
    floats = values.astype(np.float64)
    if not np.isfinite(floats.to_numpy()).all():
        row = int((~np.isfinite(floats.to_numpy())).argmax())
        raise ValueError(f"{where(row)}: timestamp {values.iloc[row]!r} is not finite")
    return floats


def _read_csv_rows(path: str, sep: str | None) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and each row's line number, by the ``csv`` module (so every error can name its line)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(path, raw.count(b"\n", 0, exc.start) + 1, f"not valid UTF-8 (byte {raw[exc.start:exc.start + 1]!r})")
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected a header line with the column names)")
    if "\0" in text:
        _fail(path, text.count("\n", 0, text.index("\0")) + 1, "NUL byte: not a text CSV file")
    if sep is None:
        try:
            sep = csv.Sniffer().sniff(text[:SNIFF_BYTES], delimiters=CSV_SEPARATORS).delimiter
        except csv.Error as exc:
            raise ValueError(f"{path}: could not detect the separator ({exc}); pass sep=") from None
    if not isinstance(sep, str) or len(sep) != 1:
        raise ValueError(f"sep must be one character or None, got {sep!r}")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    rows, lines, header = [], [], None
    try:
        for row in reader:
            if not row or all(not field.strip() for field in row):
                continue  # blank line
            if header is None:
                header = [field.strip() for field in row]
                continue
            if len(row) != len(header):
                _fail(path, reader.line_num, f"expected {len(header)} fields (as the header), got {len(row)}: "
                                             f"{sep.join(row)!r}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        _fail(path, reader.line_num, f"malformed CSV: {exc}")
    return header, rows, lines


def read_interactions(path: str | os.PathLike, *, user_col: str = "user", item_col: str = "item",
                      time_col: str = "timestamp", sep: str | None = ",") -> pd.DataFrame:
    """A CSV (``sep``: its one-character separator; None detects it) or Parquet table as a DataFrame with columns
    ``user``, ``item``, ``timestamp`` (renamed from the given column names; other columns dropped).

    CSV: a UTF-8 file whose first non-blank line names the columns; blank lines are skipped. User and item ids are
    int64 when every value is an integer, else kept as strings. Timestamps must be numbers (int64, or float64 if any
    has a fraction or exponent) or, in Parquet, a datetime column. Every malformed input raises ``ValueError``
    naming the file and the line (CSV) or data row (Parquet): invalid UTF-8, a row with more or fewer fields than
    the header, an empty field, a non-numeric or non-finite timestamp, an integer beyond int64, a missing column,
    an empty or unreadable file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    wanted = {user_col: "user", item_col: "item", time_col: "timestamp"}
    if path.endswith((".parquet", ".pq")):
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, ...): name the file whatever it is
            raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        return _validated_frame(table, path, wanted, lambda row: f"{path}: data row {row + 1}")
    header, rows, lines = _read_csv_rows(path, sep)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns are {header}")
    index = [header.index(c) for c in wanted]
    table = pd.DataFrame({column: pd.Series([row[i].strip() for row in rows], dtype=object)
                          for i, column in zip(index, wanted, strict=True)})
    return _validated_frame(table, path, wanted, lambda row: f"{path}:{lines[row]}", from_text=True)


def load_interactions_dataset(source: str, *, split: str = "train", config: str | None = None,
                              user_col: str = "user", item_col: str = "item",
                              time_col: str = "timestamp") -> pd.DataFrame:
    """An interaction table through ``datasets.load_dataset``: a local ``.json``/``.jsonl``/``.csv``/``.parquet``/
    ``.arrow`` file (by extension), or a Hugging Face Hub dataset name with ``config`` and ``split`` (needs
    internet). Returns the (user, item, timestamp) DataFrame of :func:`read_interactions`, validated the same way;
    errors name the source and the row."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{source}: reading it needs the `datasets` package (pip install 'largevocab[hf]')") \
            from exc
    extension = os.path.splitext(source)[1].lower()
    try:
        if os.path.isfile(source):
            if extension not in DATASETS_BUILDERS:
                raise ValueError(f"{source}: unknown file type {extension!r} for datasets; use one of "
                                 f"{sorted(DATASETS_BUILDERS)}")
            data = datasets.load_dataset(DATASETS_BUILDERS[extension], data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, config, split=split)
    except ValueError:
        raise
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, network errors, builder errors)
        kind = "file" if os.path.isfile(source) else "Hub dataset (no file by that name here; needs internet)"
        raise ValueError(f"{source}: could not load it as a {kind}: {type(exc).__name__}: {exc}") from None
    label = source if os.path.isfile(source) else f"{source} [{split}]"
    return _validated_frame(data.to_pandas(), label, {user_col: "user", item_col: "item", time_col: "timestamp"},
                            lambda row: f"{label}: row {row + 1}")


def _validated_frame(table: pd.DataFrame, source: str, wanted: dict, where, *, from_text: bool = False) \
        -> pd.DataFrame:
    """``table``'s ``wanted`` columns renamed to user, item, timestamp, checked (``where(row)`` names a row in
    errors); ``from_text``: every value is a string to parse (CSV)."""
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; columns are {list(table.columns)}")
    table = table[list(wanted)].rename(columns=wanted).reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{source}: no interactions (only a header)")
    for name in ("user", "item", "timestamp"):
        column = table[name]
        empty = column.isna().to_numpy()
        if from_text:
            empty = empty | (column == "").to_numpy()
        if empty.any():
            raise ValueError(f"{where(int(empty.argmax()))}: missing {name}")
    timestamps = table["timestamp"]
    if from_text or timestamps.dtype == object or pd.api.types.is_string_dtype(timestamps):
        # Text values (CSV, or a string column): parse them, naming the first bad one.
        if from_text:
            for name in ("user", "item"):
                table[name] = _ids_column(table[name], where, f"{name} id")
        table["timestamp"] = _timestamps_column(timestamps.astype(str), where)
    elif pd.api.types.is_bool_dtype(timestamps) or not (
            pd.api.types.is_numeric_dtype(timestamps) or pd.api.types.is_datetime64_any_dtype(timestamps)):
        raise ValueError(f"{source}: timestamp column must be numeric or datetime, got {timestamps.dtype}")
    elif pd.api.types.is_float_dtype(timestamps) and not np.isfinite(timestamps.to_numpy()).all():
        row = int((~np.isfinite(timestamps.to_numpy())).argmax())
        raise ValueError(f"{where(row)}: timestamp {timestamps.iloc[row]!r} is not finite")
    return table


def filter_min_interactions(table: pd.DataFrame, *, min_item: int = SCE_MIN_ITEM_INTERACTIONS,
                            min_user: int = SCE_MIN_USER_INTERACTIONS, iterate: bool = False) -> pd.DataFrame:
    """Drop items with fewer than ``min_item`` interactions, then users with fewer than ``min_user``.

    One pass in that order is what the SCE preprocessing does (a user filter can leave some item below the item
    threshold again); ``iterate=True`` repeats both until nothing changes (a k-core).
    """
    while True:
        before = len(table)
        item_counts = table["item"].map(table["item"].value_counts())
        table = table[item_counts >= min_item]
        user_counts = table["user"].map(table["user"].value_counts())
        table = table[user_counts >= min_user]
        if not iterate or len(table) == before:
            return table


def table_to_sequences(table: pd.DataFrame) -> SequenceData:
    """Re-index items to 1..V (sorted source ids) and users to 0..U-1, and build the time-ordered histories (a
    stable sort on timestamp, so equal timestamps keep the table's row order)."""
    table = table.sort_values(["user", "timestamp"], kind="stable")
    item_ids = np.sort(table["item"].unique())
    items = np.searchsorted(item_ids, table["item"].to_numpy()) + 1
    users = table["user"].to_numpy()
    user_ids, starts = np.unique(users, return_index=True)
    bounds = list(starts[1:]) + [len(users)]
    sequences = [items[a:b].astype(np.int64) for a, b in zip(starts, bounds, strict=True)]
    return SequenceData(sequences, len(item_ids), user_ids, np.concatenate([[0], item_ids]))


def leave_one_out(data: SequenceData, *, min_length: int = 3) -> Split:
    """Last item of each history is the test target, the one before it the validation target (SASRec protocol).

    Training histories drop the last two items; validation ranks from ``history[:-2]``, test from
    ``history[:-1]``. Users with fewer than ``min_length`` (>= 3) items are trained on whole and not evaluated,
    as in the original SASRec code.
    """
    if min_length < 3:
        raise ValueError(f"min_length must be >= 3 (an input, a validation and a test item), got {min_length}")
    train, valid_inputs, valid_targets, test_inputs, test_targets = [], [], [], [], []
    for seq in data.sequences:
        if len(seq) < min_length:
            train.append(seq)
            continue
        train.append(seq[:-2])
        valid_inputs.append(seq[:-2])
        valid_targets.append(seq[-2])
        test_inputs.append(seq[:-1])
        test_targets.append(seq[-1])
    return Split(train, valid_inputs, np.asarray(valid_targets, dtype=np.int64), test_inputs,
                 np.asarray(test_targets, dtype=np.int64), data.num_items, data.item_ids,
                 {"protocol": "leave-one-out", "users": len(data.sequences), "eval_users": len(test_targets)})


def temporal_split(table: pd.DataFrame, *, quantile: float = TEMPORAL_TEST_QUANTILE) -> Split:
    """The SCE paper's global temporal split of a (user, item, timestamp) table.

    ``t*`` = the ``quantile`` of all timestamps (nearest observed value). Training: the interactions before ``t*``
    of users with no interaction at or after ``t*`` (test users are removed from training). Test users' histories
    are their interactions from ``t*`` on, restricted to items seen in training; the last one is the test target
    and the one before it the validation target, and only users with at least 3 such interactions are evaluated
    (the same users for validation and test). Items are re-indexed 1..V over the training items.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    cut = table["timestamp"].quantile(quantile, interpolation="nearest")
    after = table["timestamp"] >= cut
    test_users = table.loc[after, "user"].unique()
    train_table = table[~after & ~table["user"].isin(test_users)]
    if train_table.empty:
        raise ValueError(f"temporal split at quantile {quantile}: no training interactions left")
    train = table_to_sequences(train_table)
    known = table["item"].isin(train.item_ids[1:])
    test_data = table_to_sequences(table[after & known]) if (after & known).any() else None
    valid_inputs, valid_targets, test_inputs, test_targets = [], [], [], []
    if test_data is not None:
        remap = np.searchsorted(train.item_ids[1:], test_data.item_ids[1:]) + 1  # test ids -> training ids
        for seq in test_data.sequences:
            if len(seq) < 3:
                continue
            seq = remap[seq - 1]
            valid_inputs.append(seq[:-2])
            valid_targets.append(seq[-2])
            test_inputs.append(seq[:-1])
            test_targets.append(seq[-1])
    return Split(train.sequences, valid_inputs, np.asarray(valid_targets, dtype=np.int64), test_inputs,
                 np.asarray(test_targets, dtype=np.int64), train.num_items, train.item_ids,
                 {"protocol": "temporal", "quantile": quantile, "cut_timestamp": cut.item() if hasattr(cut, "item")
                  else cut, "train_users": len(train.sequences), "eval_users": len(test_targets)})


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_movielens_1m(dest: str | os.PathLike, *, url: str = ML1M_URL, sha256: str = ML1M_SHA256) -> str:
    """Download GroupLens' MovieLens-1M archive into ``dest``, check its SHA-256 and extract it; returns the path of
    ``ratings.dat`` (read it with :func:`read_movielens_ratings`).

    An archive already in ``dest`` with the right checksum is not downloaded again. A download with a wrong
    checksum is deleted and raises ``ValueError`` with both digests. MovieLens may not be redistributed: this
    fetches it from GroupLens for the user, who accepts its licence.
    """
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    archive = os.path.join(dest, "ml-1m.zip")
    if not (os.path.exists(archive) and _sha256(archive) == sha256):
        fd, partial = tempfile.mkstemp(dir=dest, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
                shutil.copyfileobj(response, out, HASH_BLOCK)
            got = _sha256(partial)
            if got != sha256:
                raise ValueError(f"{url}: SHA-256 {got} does not match the expected {sha256}")
            os.replace(partial, archive)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith("ratings.dat")]
        if not names:
            raise ValueError(f"{archive}: no ratings.dat in the archive")
        # Extract member by member under dest only: a crafted name with '..' or an absolute path is refused.
        root = os.path.realpath(dest)
        for name in zf.namelist():
            target = os.path.realpath(os.path.join(dest, name))
            if os.path.commonpath([root, target]) != root:
                raise ValueError(f"{archive}: member {name!r} would be written outside {dest}")
        zf.extractall(dest)
    return os.path.join(dest, names[0])


def read_movielens_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """MovieLens-1M ``ratings.dat`` (``user::item::rating::timestamp``) as a DataFrame (user, item, rating,
    timestamp; int64): feed it to :func:`filter_min_interactions` and :func:`table_to_sequences` /
    :func:`temporal_split`.

    Raises ``ValueError`` naming the file and line for a line that is not valid UTF-8 (the file is ASCII), has
    other than 4 ``::``-separated fields, or a field that is not a non-negative integer in int64 range, and for a
    file with no ratings. Blank lines are skipped.
    """
    columns: list[list[int]] = [[] for _ in ML1M_COLUMNS]
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        fields = line.strip().split("::")
        if len(fields) != len(ML1M_COLUMNS):
            _fail(path, line_no, f"expected 'user::item::rating::timestamp', got {len(fields)} fields: "
                                 f"{line.rstrip()!r}")
        for column, name, text in zip(columns, ML1M_COLUMNS, fields, strict=True):
            column.append(_id(path, line_no, text.strip(), name))
    if not columns[0]:
        raise ValueError(f"{path}: no ratings")
    return pd.DataFrame({name: np.asarray(values, dtype=np.int64)
                         for name, values in zip(ML1M_COLUMNS, columns, strict=True)})


class TrainBatches:
    """Epochs of training batches: ``(inputs, targets)`` int64 (B, max_len), right-aligned, padding 0.

    A history ``s`` gives the window ``inputs = s[-(max_len + 1):-1]``, ``targets = s[-max_len:]`` (target t is the
    item after input t), its most recent ``max_len`` transitions, as in the reference samplers. Histories with
    fewer than 2 items have no transition and are skipped. Each epoch visits every other history once in an order
    shuffled by a NumPy generator seeded with ``seed`` (epoch e uses the generator's e-th permutation);
    ``drop_last`` drops the last incomplete batch (the SCE reference does).
    """

    def __init__(self, histories: list[np.ndarray], *, max_len: int, batch_size: int, seed: int = 0,
                 drop_last: bool = False) -> None:
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len and batch_size must be >= 1, got {max_len} and {batch_size}")
        self.histories = [np.asarray(h, dtype=np.int64) for h in histories if len(h) >= 2]
        if not self.histories:
            raise ValueError("no training history has 2 or more items")
        if drop_last and len(self.histories) < batch_size:  # every epoch would be empty
            raise ValueError(f"drop_last with {len(self.histories)} training histories and batch_size {batch_size}: "
                             "no full batch to train on")
        self.max_len, self.batch_size, self.drop_last = max_len, batch_size, drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.histories)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def collate(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = np.zeros((len(histories), self.max_len), dtype=np.int64)
        targets = np.zeros_like(inputs)
        for row, s in enumerate(histories):
            window = s[-(self.max_len + 1):]
            n = len(window) - 1
            inputs[row, self.max_len - n:] = window[:-1]
            targets[row, self.max_len - n:] = window[1:]
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def __iter__(self):
        order = self.rng.permutation(len(self.histories))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield self.collate([self.histories[i] for i in chunk])


def right_align(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """(B, max_len) int64: the last ``max_len`` items of each history, right-aligned, padding 0 (model inputs for
    ranking)."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, s in enumerate(histories):
        tail = s[-max_len:]
        if len(tail):
            out[row, max_len - len(tail):] = tail
    return torch.from_numpy(out)
